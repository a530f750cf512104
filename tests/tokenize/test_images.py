"""The tokenizer's image rows: the seeded order depends on the images and the seed, not on the row order."""

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from tessera.tokenize.images import explode_images, first_in_order, is_heldout


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(order):
    """Sample rows (two with several images, one image missing) in the given row order."""
    rows = [{"sample_id": f"s{i}", "kind": "image_text" if i % 2 else "interleaved", "texts": [f"text {i}"],
             "images": [_png(10 * i + k) if (i, k) != (3, 1) else None for k in range(1 + (i in (2, 3)) * 2)]}
            for i in range(12)]
    rows = [r for r in rows if not is_heldout(r["sample_id"])]
    return pa.Table.from_pylist([rows[j] for j in order(len(rows))])


def _in_seeded_order(table, seed):
    out = explode_images(table, image_size=8, split="train", seed=seed)
    rank = np.argsort(out["order"], kind="stable")
    return [int(out["image"][j, 0, 0, 0]) for j in rank]


def test_the_seeded_order_ignores_the_row_order_and_follows_the_seed():
    forward = _samples(lambda n: range(n))
    backward = _samples(lambda n: range(n - 1, -1, -1))
    shuffled = _samples(lambda n: np.random.default_rng(3).permutation(n))
    first = _in_seeded_order(forward, seed=0)
    assert len(first) == len(set(first)) == forward.num_rows + sum(len(x) - 1 for x in forward.column("images").to_pylist()) - 1
    assert _in_seeded_order(backward, seed=0) == first
    assert _in_seeded_order(shuffled, seed=0) == first
    assert _in_seeded_order(forward, seed=1) != first  # another seed, another stream
    assert first != sorted(first) and first != sorted(first, reverse=True)  # interleaved, not the rows' order


def test_the_first_images_of_each_split_are_found_batch_by_batch_without_a_sort():
    rows = [{"sample_id": f"s{i}", "kind": "image_text", "texts": [f"text {i}"], "images": [_png(i % 250)]} for i in range(300)]
    table = pa.Table.from_pylist(rows)
    whole = explode_images(table, image_size=8, split="all", seed=0)
    held = np.array([is_heldout(s) for s in whole["sample_id"]])
    assert 3 < held.sum() < 100
    for n in (1, 5, 1000):
        expected = {h: list(whole["sample_id"][held == h][np.argsort(whole["order"][held == h])][:n]) for h in (True, False)}
        for size in (7, 64, 300):  # any batching: the n first of the whole are among each batch's n first
            kept = [first_in_order(explode_images(table.slice(a, size), image_size=8, split="all", seed=0), n)
                    for a in range(0, 300, size)]
            got = {h: [sid for _, sid in sorted((o, sid) for b in kept for o, sid, hb in zip(b["order"], b["sample_id"], b["heldout"])
                                                   if hb == h)][:n] for h in (True, False)}
            assert got == expected, (n, size)
            assert all(len(b["image"]) == len(b["order"]) == len(b["heldout"]) <= 2 * n for b in kept)
