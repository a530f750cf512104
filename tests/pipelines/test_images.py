import numpy as np
import pytest

from tessera.config import ImageConfig
from tessera.pipelines import images, synth
from tessera.pipelines.images import Rejected

CFG = ImageConfig(resolution=32, min_side=16, max_aspect_ratio=3.0, max_pixels=10_000_000)


def _rgb():
    yy, xx = np.mgrid[0:48, 0:48]
    return np.stack([xx * 5, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)


def test_awkward_modes_normalise_to_rgb_of_the_configured_size():
    rgb = _rgb()
    reference = images.decode_image(synth.encode_image(rgb), CFG).astype(int)
    for name, data in synth.awkward_images(rgb).items():
        out = images.decode_image(data, CFG)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
        if name in ("palette_png", "rgba_png", "cmyk_jpeg", "exif_rotated_jpeg"):
            # same picture, up to palette/JPEG error; the EXIF one proves the rotation was undone
            assert np.abs(out.astype(int) - reference).mean() < 12, name


def test_exif_rotation_is_applied_before_size_checks():
    wide = np.zeros((20, 50, 3), np.uint8)  # 50x20 stored; EXIF 6 makes it 20x50 (portrait)
    data = synth.awkward_images(wide)["exif_rotated_jpeg"]
    out = images.decode_image(data, ImageConfig(resolution=16, min_side=16, max_aspect_ratio=3.0))
    assert out.shape == (16, 16, 3)


def test_rgba_transparency_is_composited_on_white():
    from PIL import Image

    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    out = images.decode_image(synth.encode_image(transparent), CFG)
    assert (out == 255).all()


def test_sixteen_bit_greyscale_keeps_its_range():
    from PIL import Image

    arr = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = images.decode_image(synth.encode_image(Image.fromarray(arr)), CFG)
    assert out.min() < 10 and out.max() > 245


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (None, "empty_file"),
        (b"not an image", "corrupt_image"),
        (synth.png_bomb(), "image_too_large"),
        (synth.png_bomb(5000, 5000), "image_too_large"),  # under PIL's own limit, over ours
        (synth.encode_image(np.zeros((8, 8, 3), np.uint8)), "image_too_small"),
        (synth.encode_image(np.zeros((20, 100, 3), np.uint8)), "bad_aspect_ratio"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected) as e:
        images.decode_image(data, CFG)
    assert e.value.reason == reason


def test_truncated_jpeg_is_corrupt():
    data = synth.encode_image(_rgb(), "JPEG")
    with pytest.raises(Rejected) as e:
        images.decode_image(data[: len(data) // 3], CFG)
    assert e.value.reason == "corrupt_image"


def test_bomb_is_rejected_without_decoding(monkeypatch):
    from PIL import ImageFile

    def boom(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(Rejected) as e:
        images.decode_image(synth.png_bomb(5000, 5000), CFG)
    assert e.value.reason == "image_too_large"


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_fit_modes(fit):
    out = images.decode_image(synth.encode_image(np.full((40, 80, 3), 200, np.uint8)), ImageConfig(resolution=32, fit=fit))
    assert out.shape == (32, 32, 3)
    if fit == "pad":
        assert (out[0] == 0).all() and (out[16] == 200).all()
    else:
        assert (out == 200).all()
