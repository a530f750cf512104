"""Stage data mixtures: which samples a stage sees, in which order. Pure functions of the index,
the stage config and the seed, so a stage's data stream can be rebuilt exactly on resume.

A selector (`all`, or a tag `key=value`: curriculum tags plus `source=` and `kind=`) defines a
bucket of samples. Each draw picks a bucket by weight, then the bucket's next sample in a
per-epoch permutation; `epoch` counts how often that bucket has been walked (it seeds the
per-sample draws of sequence building, e.g. caption-first order and CFG dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIFFICULTY_RANK = {"easy": 0, "medium": 1, "hard": 2}


@dataclass
class SampleIndex:
    """One entry per sample of the token shards (small columns only)."""

    sample_ids: list[str]
    files: list[str]
    rows: list[int]
    tags: list[frozenset]
    text_lengths: np.ndarray
    """Text tokens per sample."""
    images: np.ndarray
    """Images per sample."""
    image_tokens: float = 0.0
    """Estimated tokens per image (set once known, see `estimate`)."""

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Estimated sequence length per sample (for sizing a stage's data): <bos>, <eos>, the text,
        and per image its tokens plus start/end/shape/frame markers."""
        return (2 + self.text_lengths + self.images * (self.image_tokens + 6)).astype(np.int64)

    def matching(self, selector: str) -> np.ndarray:
        if selector == "all":
            return np.arange(len(self))
        return np.array([i for i, t in enumerate(self.tags) if selector in t], dtype=np.int64)

    def difficulty(self, i: int) -> int:
        for t in self.tags[i]:
            if t.startswith("difficulty="):
                return DIFFICULTY_RANK.get(t.split("=", 1)[1], 1)
        return 1


def build_index(files: list[str], image_tokens: float = 0.0) -> SampleIndex:
    """Read sample ids, tags, text lengths and image counts of token shards (`image_tokens`:
    estimated tokens per image; may be set later on the index)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids, fs, rows, tags, text_lengths, n_images = [], [], [], [], [], []
    for f in files:
        t = pq.read_table(f, columns=["sample_id", "source", "kind", "curriculum", "is_image", "text_ids"])
        text_len = pc.list_value_length(pc.list_flatten(t.column("text_ids"))).to_numpy(zero_copy_only=False)
        per_row = pc.list_value_length(t.column("text_ids")).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(per_row)])
        for r, (sid, src, kind, cur, is_img) in enumerate(zip(*(t.column(c).to_pylist() for c in
                                                               ("sample_id", "source", "kind", "curriculum", "is_image")))):
            ids.append(sid)
            fs.append(f)
            rows.append(r)
            tags.append(frozenset(cur) | {f"source={src}", f"kind={kind}"})
            text_lengths.append(int(text_len[offsets[r]:offsets[r + 1]].sum()))
            n_images.append(sum(is_img))
    order = np.argsort(np.array(ids, dtype=object), kind="stable")  # independent of file listing order
    return SampleIndex([ids[i] for i in order], [fs[i] for i in order], [rows[i] for i in order],
                       [tags[i] for i in order], np.array([text_lengths[i] for i in order], dtype=np.int64),
                       np.array([n_images[i] for i in order], dtype=np.int64), image_tokens)


def stage_plan(index: SampleIndex, weights: dict[str, float], n: int, seed: int, stage: int,
               order: str = "random") -> list[tuple[int, int]]:
    """n draws of (sample index, epoch) for one stage."""
    selectors = [s for s, w in weights.items() if w > 0]
    buckets = {s: index.matching(s) for s in selectors}
    empty = [s for s in selectors if len(buckets[s]) == 0]
    if empty:
        raise ValueError(f"mixture selectors {empty} match no sample (tags look like "
                         f"{sorted(next(iter(index.tags), frozenset()))})")
    p = np.array([weights[s] for s in selectors], dtype=np.float64)
    rng = np.random.default_rng([seed, stage, 0])
    choices = rng.choice(len(selectors), size=n, p=p / p.sum())
    pointers = {s: 0 for s in selectors}
    perms: dict[tuple[str, int], np.ndarray] = {}
    plan = []
    for c in choices:
        s = selectors[c]
        k = pointers[s]
        pointers[s] += 1
        epoch, pos = divmod(k, len(buckets[s]))
        if (s, epoch) not in perms:
            perms[(s, epoch)] = np.random.default_rng([seed, stage, 1 + int(c), epoch]).permutation(len(buckets[s]))
        plan.append((int(buckets[s][perms[(s, epoch)][pos]]), epoch))
    if order == "curriculum":
        plan.sort(key=lambda item: index.difficulty(item[0]))  # stable: random order within a difficulty
    return plan


def estimate_rows(lengths: np.ndarray, seq_len: int) -> int:
    """Rows the packer makes of sequences of these lengths."""
    from tessera.model.packing import first_fit

    return max(first_fit(lengths, seq_len), default=-1) + 1
