"""The fit loop of the visual BPE: count once, then choose → broadcast → apply → reduce deltas.

Shards (in-process `_core.Shard`s, or Ray actors holding them: `tessera.bpe.distributed`, the
backend chosen by the caller; this module never imports Ray) count their pairs once; the driver's `_core.Table` holds the global counts F and picks each
merge; every shard applies it and returns only the count deltas it caused. With the same
global counts the choice is the same, so any number of shards gives identical merges.

Checkpoints (every `checkpoint_every` merges) hold the merges so far and each shard's
anchor map; a re-run with the same corpus and parameters resumes from the latest one and
ends with the same merges as an uninterrupted fit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from tessera.bpe.core import _core
from tessera.bpe.shards import Corpus, GridSource, LocalShards, ShardSet, peak_rss_mb, source_fingerprint, tile_id_bytes
from tessera.timing import Timer

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
        if len(self.max_tile) != 2 or min(self.max_tile) < 1 or max(self.max_tile) > 16:
            raise ValueError(f"max_tile must be (h, w) in 1..16, got {self.max_tile}")
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


@dataclass
class FitCheckpointer:
    """Every `every` merges: each shard's anchor map (one .npy per shard), then `state.json` with the
    merges so far, written atomically, so a crash mid-save leaves the previous checkpoint intact.
    A checkpoint is used only for the same corpus, parameters and number of shards."""

    directory: str
    every: int

    @property
    def _state_path(self) -> str:
        return os.path.join(self.directory, "state.json")

    def due(self, merges_done: int) -> bool:
        return self.every > 0 and merges_done % self.every == 0

    def load(self, params: FitParams, fingerprint: str, num_shards: int):
        """-> (merges, tiles per shard) of a matching checkpoint, or None."""
        if not os.path.exists(self._state_path):
            return None
        with open(self._state_path) as f:
            state = json.load(f)
        if state["params"] != params.to_dict() or state["corpus"] != fingerprint or state["num_shards"] != num_shards:
            return None
        tiles = [np.load(os.path.join(self.directory, f"shard-{i}-{state['step']:06d}.npy")) for i in range(num_shards)]
        return [tuple(m) for m in state["merges"]], tiles

    def save(self, params: FitParams, fingerprint: str, merges: list, tiles: list[np.ndarray]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        step = len(merges)
        for i, t in enumerate(tiles):
            np.save(os.path.join(self.directory, f"shard-{i}-{step:06d}.npy"), t)
        tmp = self._state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"params": params.to_dict(), "corpus": fingerprint, "num_shards": len(tiles), "step": step,
                       "merges": [list(m) for m in merges]}, f)
        os.replace(tmp, self._state_path)
        for name in os.listdir(self.directory):  # older shard files
            if name.startswith("shard-") and not name.endswith(f"-{step:06d}.npy"):
                os.remove(os.path.join(self.directory, name))


# ----------------------------------------------------------------------------- the loop

ShardBackend = Callable[[list[Corpus | GridSource], Optional[list[np.ndarray]], list[int], list[int], int], ShardSet]
"""(shard corpora or grid sources, their saved anchor maps or None, shape_h, shape_w, the largest id the
fit can create: it picks 2- or 4-byte tile ids) -> a `ShardSet`:
`LocalShards` here, or `tessera.bpe.distributed.RayShards` (one actor per shard), chosen by the caller."""


def run_fit(corpus: Corpus | list[GridSource], params: FitParams, shards: ShardBackend = LocalShards, num_shards: int = 1,
            checkpointer: FitCheckpointer | None = None, progress: bool = False,
            stop_after: int | None = None) -> FitResult:
    """Fit merges on `corpus` split into `num_shards` shards of the `shards` backend, or on one shard
    per `GridSource` (each loads its own grids where it lives); any backend and any number of shards
    give the same merges. `stop_after` (tests) stops after that many merges of this call, as if
    killed. The report's `seconds` are the phases of one `Timer`."""
    K = params.codebook_size
    timer = Timer()
    if isinstance(corpus, Corpus):
        corpora, fingerprint, num_grids = corpus.split(num_shards), corpus.fingerprint(), corpus.num_grids
    else:
        corpora, fingerprint, num_grids = list(corpus), source_fingerprint(list(corpus)), sum(s.num_grids for s in corpus)
    resumed = checkpointer.load(params, fingerprint, len(corpora)) if checkpointer else None
    merges: list[tuple[int, int, int]] = []
    shape_h, shape_w = [1] * K, [1] * K
    tiles = None
    if resumed is not None:
        merges, tiles = [(int(a), int(b), DIRS.index(d) if isinstance(d, str) else int(d)) for a, b, d in resumed[0]], resumed[1]
        for a, b, d in merges:
            h, w = merged_shape(shape_h, shape_w, a, b, d)
            shape_h.append(h)
            shape_w.append(w)

    with timer.phase("build"):
        shard_set = shards(corpora, tiles, shape_h, shape_w, K + params.num_merges - 1)
    table = _core.Table(list(shape_h), list(shape_w), params.max_tile[0], params.max_tile[1], params.min_frequency)
    with timer.phase("count"):
        for keys, counts in shard_set.count():
            table.add(keys, counts)
    initial = shard_set.stats()

    frequencies, merged_counts = [], []
    done_this_call = 0
    last_print = 0.0
    for i in range(len(merges), params.num_merges):
        if stop_after is not None and done_this_call >= stop_after:
            break
        with timer.phase("choose"):
            a, b, d, f, p = table.choose(params.top_k, params.alpha)
        if a < 0:
            break
        h, w = merged_shape(shape_h, shape_w, a, b, d)
        shape_h.append(h)
        shape_w.append(w)
        table.add_shape(h, w)
        with timer.phase("apply"):
            results = shard_set.apply(a, b, d, K + i, h, w)
        n = 0
        with timer.phase("reduce"):
            for keys, deltas, merged in results:
                table.add(keys, deltas)
                n += merged
        merges.append((a, b, d))
        frequencies.append(int(f))
        merged_counts.append(int(n))
        done_this_call += 1
        if checkpointer and checkpointer.due(len(merges)):
            with timer.phase("checkpoint"):
                checkpointer.save(params, fingerprint, [(a_, b_, DIRS[d_]) for a_, b_, d_ in merges], shard_set.tiles())
        if progress and (time.perf_counter() - last_print > 2.0 or len(merges) == params.num_merges):
            last_print = time.perf_counter()
            print(f"\r[bpe] merge {len(merges)}/{params.num_merges}  F={f}  shape={h}x{w}  {timer.total:.1f}s",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    final = shard_set.stats()
    driver_rss = peak_rss_mb()
    report = {
        "merges_done": len(merges),
        "resumed_from": 0 if resumed is None else len(resumed[0]),
        "stopped_early": len(merges) < params.num_merges and (stop_after is None or done_this_call < stop_after),
        "seconds": {"build": 0.0, "count": 0.0, "choose": 0.0, "apply": 0.0, "reduce": 0.0, "checkpoint": 0.0} | timer.rounded(),
        "wall_s": timer.total,
        "grid_load_s": round(float(initial["load_s"]), 3),  # of `build`: making or reading GridSource grids
        "input_tokens": int(initial["cells"]),
        "output_tokens": int(final["tiles"]),
        "compression_ratio": round(initial["cells"] / max(final["tiles"], 1), 4),
        "num_grids": num_grids,
        "num_shards": len(corpora),
        "pairs_in_table": int(table.num_pairs()),
        "index": {"entries_after_count": int(initial["index_entries"]), "keys_after_count": int(initial["keys"]),
                  "entries_final": int(final["index_entries"]), "compactions": int(final["compactions"])},
        # at the count, the shards' peak: tile (2 B, or 4 B beyond 65,535 ids) + back (1 B) per cell and the
        # position index (4 B per entry)
        "index_bytes_per_input_token": round(((1 + tile_id_bytes(K + params.num_merges - 1)) * initial["cells"]
                                              + 4 * initial["index_entries"]) / max(initial["cells"], 1), 2),
        "peak_rss_mb": driver_rss,  # this (the driver's) process
        "shard_peak_rss_mb": final["shard_peak_rss_mb"],  # each shard actor's process (none: shards in this one)
        "peak_rss_sum_gb": round((driver_rss + sum(final["shard_peak_rss_mb"])) / 1024, 3),
        "merge_frequencies": frequencies[:50],
        "occurrences_merged_total": int(sum(merged_counts)),
    }
    return FitResult([(a, b, DIRS[d]) for a, b, d in merges], list(zip(shape_h[K:], shape_w[K:])), report)
