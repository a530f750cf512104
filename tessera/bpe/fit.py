"""The fit loop of the visual BPE: count once, then choose → broadcast → apply → reduce deltas.

Shards (in-process `_core.Shard`s, or Ray actors holding them: `tessera.bpe.distributed`)
count their pairs once; the driver's `_core.Table` holds the global counts F and picks each
merge; every shard applies it and returns only the count deltas it caused. With the same
global counts the choice is the same, so any number of shards gives identical merges.

Checkpoints (every `checkpoint_every` merges) hold the merges so far and each shard's
anchor map; a re-run with the same corpus and parameters resumes from the latest one and
ends with the same merges as an uninterrupted fit.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tessera.bpe.core import _core
from tessera.bpe.shards import Corpus, LocalShards, ShardSet

DIRS = ("h", "v")


@dataclass
class FitParams:
    codebook_size: int
    num_merges: int
    alpha: float = 0.0
    top_k: int = 32
    min_frequency: int = 2
    max_tile: tuple[int, int] = (4, 4)

    def __post_init__(self):
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        if self.num_merges < 0:
            raise ValueError(f"num_merges must be >= 0, got {self.num_merges}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if len(self.max_tile) != 2 or min(self.max_tile) < 1:
            raise ValueError(f"max_tile must be (h, w) >= 1, got {self.max_tile}")
        self.max_tile = (int(self.max_tile[0]), int(self.max_tile[1]))

    def to_dict(self) -> dict:
        return {"codebook_size": self.codebook_size, "num_merges": self.num_merges, "alpha": self.alpha,
                "top_k": self.top_k, "min_frequency": self.min_frequency, "max_tile": list(self.max_tile)}


@dataclass
class FitResult:
    merges: list[tuple[int, int, str]]
    shapes: list[tuple[int, int]]  # of the new ids, in order
    report: dict = field(default_factory=dict)


def merged_shape(shape_h: list[int], shape_w: list[int], a: int, b: int, d: int) -> tuple[int, int]:
    return (shape_h[a], shape_w[a] + shape_w[b]) if d == 0 else (shape_h[a] + shape_h[b], shape_w[a])


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_state_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "state.json")


def load_checkpoint(ckpt_dir: str | None, params: FitParams, fingerprint: str, num_shards: int):
    """-> (merges, tiles per shard) of a matching checkpoint, or None."""
    if not ckpt_dir or not os.path.exists(_ckpt_state_path(ckpt_dir)):
        return None
    with open(_ckpt_state_path(ckpt_dir)) as f:
        state = json.load(f)
    if state["params"] != params.to_dict() or state["corpus"] != fingerprint or state["num_shards"] != num_shards:
        return None
    tiles = [np.load(os.path.join(ckpt_dir, f"shard-{i}-{state['step']:06d}.npy")) for i in range(num_shards)]
    return [tuple(m) for m in state["merges"]], tiles


def save_checkpoint(ckpt_dir: str, params: FitParams, fingerprint: str, merges: list, tiles: list[np.ndarray]) -> None:
    """Shard files first, then state.json atomically: a crash mid-save leaves the previous checkpoint intact."""
    os.makedirs(ckpt_dir, exist_ok=True)
    step = len(merges)
    for i, t in enumerate(tiles):
        np.save(os.path.join(ckpt_dir, f"shard-{i}-{step:06d}.npy"), t)
    tmp = _ckpt_state_path(ckpt_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"params": params.to_dict(), "corpus": fingerprint, "num_shards": len(tiles), "step": step,
                   "merges": [list(m) for m in merges]}, f)
    os.replace(tmp, _ckpt_state_path(ckpt_dir))
    for name in os.listdir(ckpt_dir):  # older shard files
        if name.startswith("shard-") and not name.endswith(f"-{step:06d}.npy"):
            os.remove(os.path.join(ckpt_dir, name))


# ----------------------------------------------------------------------------- the loop


def run_fit(corpus: Corpus, params: FitParams, num_workers: int = 1, checkpoint_dir: str | None = None,
            checkpoint_every: int = 0, progress: bool = False, stop_after: int | None = None) -> FitResult:
    """Fit merges on `corpus`. `stop_after` (tests) stops after that many merges of this call, as if killed."""
    K = params.codebook_size
    t_start = time.perf_counter()
    corpora = corpus.split(num_workers)
    fingerprint = corpus.fingerprint()
    resumed = load_checkpoint(checkpoint_dir, params, fingerprint, len(corpora))
    merges: list[tuple[int, int, int]] = []
    shape_h, shape_w = [1] * K, [1] * K
    tiles = None
    if resumed is not None:
        merges, tiles = [(int(a), int(b), DIRS.index(d) if isinstance(d, str) else int(d)) for a, b, d in resumed[0]], resumed[1]
        for a, b, d in merges:
            h, w = merged_shape(shape_h, shape_w, a, b, d)
            shape_h.append(h)
            shape_w.append(w)

    seconds = {"build": 0.0, "count": 0.0, "choose": 0.0, "apply": 0.0, "reduce": 0.0, "checkpoint": 0.0}
    t = time.perf_counter()
    if num_workers > 1:
        from tessera.bpe.distributed import RayShards

        shards: ShardSet = RayShards(corpora, tiles, shape_h, shape_w)
    else:
        shards = LocalShards(corpora, tiles, shape_h, shape_w)
    seconds["build"] = time.perf_counter() - t

    table = _core.Table(list(shape_h), list(shape_w), params.max_tile[0], params.max_tile[1], params.min_frequency)
    t = time.perf_counter()
    for keys, counts in shards.count():
        table.add(keys, counts)
    seconds["count"] = time.perf_counter() - t
    initial = shards.stats()

    frequencies, merged_counts = [], []
    done_this_call = 0
    last_print = 0.0
    for i in range(len(merges), params.num_merges):
        if stop_after is not None and done_this_call >= stop_after:
            break
        t = time.perf_counter()
        a, b, d, f, p = table.choose(params.top_k, params.alpha)
        seconds["choose"] += time.perf_counter() - t
        if a < 0:
            break
        h, w = merged_shape(shape_h, shape_w, a, b, d)
        shape_h.append(h)
        shape_w.append(w)
        table.add_shape(h, w)
        t = time.perf_counter()
        results = shards.apply(a, b, d, K + i, h, w)
        seconds["apply"] += time.perf_counter() - t
        t = time.perf_counter()
        n = 0
        for keys, deltas, merged in results:
            table.add(keys, deltas)
            n += merged
        seconds["reduce"] += time.perf_counter() - t
        merges.append((a, b, d))
        frequencies.append(int(f))
        merged_counts.append(int(n))
        done_this_call += 1
        if checkpoint_dir and checkpoint_every and len(merges) % checkpoint_every == 0:
            t = time.perf_counter()
            save_checkpoint(checkpoint_dir, params, fingerprint, [(a_, b_, DIRS[d_]) for a_, b_, d_ in merges], shards.tiles())
            seconds["checkpoint"] += time.perf_counter() - t
        if progress and (time.perf_counter() - last_print > 2.0 or len(merges) == params.num_merges):
            last_print = time.perf_counter()
            print(f"\r[bpe] merge {len(merges)}/{params.num_merges}  F={f}  shape={h}x{w}  "
                  f"{time.perf_counter() - t_start:.1f}s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    final = shards.stats()
    report = {
        "merges_done": len(merges),
        "resumed_from": 0 if resumed is None else len(resumed[0]),
        "stopped_early": len(merges) < params.num_merges and (stop_after is None or done_this_call < stop_after),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_s": round(time.perf_counter() - t_start, 3),
        "input_tokens": int(initial["cells"]),
        "output_tokens": int(final["tiles"]),
        "compression_ratio": round(initial["cells"] / max(final["tiles"], 1), 4),
        "num_grids": corpus.num_grids,
        "num_shards": len(corpora),
        "pairs_in_table": int(table.num_pairs()),
        # tile + owner maps (8 B/cell) and the position index (4 B per entry) held by the shards
        "index_bytes_per_input_token": round((8 * final["cells"] + 4 * final["index_entries"]) / max(initial["cells"], 1), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "merge_frequencies": frequencies[:50],
        "occurrences_merged_total": int(sum(merged_counts)),
    }
    return FitResult([(a, b, DIRS[d]) for a, b, d in merges], list(zip(shape_h[K:], shape_w[K:])), report)
