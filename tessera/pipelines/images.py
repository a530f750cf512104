"""Decode and normalise one image: bytes in, fixed-size RGB PNG out, or a reject reason.

Order matters: the declared size is checked from the header *before* decoding, so a
decompression bomb is rejected without allocating it; EXIF orientation is applied
before size filters (a rotated portrait is a portrait); every mode (palette, RGBA,
CMYK, 16-bit, greyscale) is brought to 8-bit RGB, transparency composited on white.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tessera.config import ImageConfig


class Rejected(Exception):
    """A row cannot be used. `reason` is one of `tessera.schema.REASONS`."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def fit_square(img: Image.Image, resolution: int, fit: str) -> Image.Image:
    w, h = img.size
    if fit == "stretch":
        return img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    if fit == "crop":
        return ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    return ImageOps.pad(img, (resolution, resolution), Image.Resampling.BICUBIC, color=(0, 0, 0))


def check_size(width: int, height: int, cfg: ImageConfig) -> None:
    if width * height > cfg.max_pixels:
        raise Rejected("image_too_large", f"{width}x{height} = {width * height} pixels > max_pixels {cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        raise Rejected("image_too_small", f"{width}x{height}: short side < min_side {cfg.min_side}")
    aspect = max(width, height) / max(min(width, height), 1)
    if aspect > cfg.max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{width}x{height}: aspect {aspect:.2f} > max_aspect_ratio {cfg.max_aspect_ratio}")


def normalize_array(arr: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (R, R, 3), R = cfg.resolution (video frames take this path)."""
    check_size(arr.shape[1], arr.shape[0], cfg)
    return np.asarray(fit_square(Image.fromarray(arr, "RGB"), cfg.resolution, cfg.fit))


def decode_image(data: bytes | None, cfg: ImageConfig) -> np.ndarray:
    """Encoded image -> uint8 (R, R, 3). Raises Rejected."""
    if data is None or len(data) == 0:
        raise Rejected("empty_file", "image has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            check_size(*img.size, cfg)  # before decoding a single pixel
            img.load()
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("image_too_large", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise Rejected("corrupt_image", f"{type(e).__name__}: {e}") from e
    check_size(*img.size, cfg)  # again: EXIF rotation swaps sides
    return np.asarray(fit_square(to_rgb(img), cfg.resolution, cfg.fit))


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless storage of a normalised image; compress_level 1 trades size for speed."""
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
