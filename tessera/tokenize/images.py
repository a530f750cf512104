"""Images of prepared samples as training/eval arrays (pure functions over pyarrow batches)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image


def is_heldout(sample_id: str, every: int = 25) -> bool:
    """A stable ~1/every split by sample id, so held-out images never reach tokenizer training."""
    return int(hashlib.md5(sample_id.encode()).hexdigest()[:8], 16) % every == 0


def decode_rgb(png: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def explode_images(batch: pa.Table, image_size: int, split: str = "train", seed: int = 0) -> dict[str, np.ndarray]:
    """Sample rows -> one row per image: {"image": (N, S, S, 3) uint8, "sample_id": (N,), "caption": (N,),
    "order": (N,) int64}. `split` = "train" | "heldout" | "all"; captions are set for image_text samples
    ("" otherwise); `order` is the image's `order_key` under `seed`."""
    images, ids, captions, order = [], [], [], []
    for sid, kind, texts, imgs in zip(*(batch.column(c).to_pylist() for c in ("sample_id", "kind", "texts", "images"))):
        held = is_heldout(sid)
        if (split == "train" and held) or (split == "heldout" and not held):
            continue
        caption = next((t for t in texts if t), "") if kind == "image_text" else ""
        for position, png in enumerate(imgs):
            if png is not None:
                images.append(decode_rgb(png, image_size))
                ids.append(sid)
                captions.append(caption)
                order.append(order_key(sid, position, seed))
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"image": np.stack(images) if images else empty, "sample_id": np.array(ids, dtype=object),
            "caption": np.array(captions, dtype=object), "order": np.array(order, dtype=np.int64)}


def first_in_order(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """An `explode_images` batch -> its n images first in `order` of each split, with a "heldout" column.
    The n first of a whole dataset are among the union of its batches' n first, so this finds them
    without sorting the dataset (a sort is a shuffle: two more rounds of tasks)."""
    held = np.array([is_heldout(sid) for sid in batch["sample_id"]], dtype=bool)
    keep = np.concatenate([np.flatnonzero(held == h)[np.argsort(batch["order"][held == h], kind="stable")[:n]]
                           for h in (True, False)]).astype(np.int64)
    return {**{k: v[keep] for k, v in batch.items()}, "heldout": held[keep]}


def order_key(sample_id: str, position: int, seed: int) -> int:
    """A seeded pseudo-random int64 for the image at `position` in sample `sample_id`. Sorting by it gives
    an order that depends on the set of images and the seed alone, not on the row order of the sample
    files (a Ray Data write leaves rows in task-completion order), and that interleaves the sources."""
    digest = hashlib.blake2b(f"{seed}\0{sample_id}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def to_tensor(images):
    """(B, H, W, 3) uint8 array or tensor -> (B, 3, H, W) float in [-1, 1]."""
    import torch

    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = np.array(images)  # batches from Ray Data are read-only views; torch wants writable memory
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
