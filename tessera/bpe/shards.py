"""The shards a visual-BPE fit runs over: a `Corpus` of code grids and the in-process shard set.

Both the fit loop (`tessera.bpe.fit`) and the Ray actors holding shards (`tessera.bpe.distributed`)
build on this module; `distributed` no longer imports `fit`, which breaks the import cycle.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np

from tessera.bpe.core import _core


def _checked_codes(a: np.ndarray, ndim: int, codebook_size: int, where: str) -> np.ndarray:
    """`a` if it is a non-empty `ndim`-D array of integer codes in [0, codebook_size), else ValueError
    (prefixed by `where`)."""
    if a.ndim != ndim or a.size == 0:
        raise ValueError(f"{where}expected a non-empty {ndim}-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}expected integer codes, got {a.dtype}")
    if a.min() < 0 or a.max() >= codebook_size:
        raise ValueError(f"{where}codes must lie in [0, {codebook_size}), got [{a.min()}, {a.max()}]")
    return a


@dataclass
class Corpus:
    """Grids concatenated row-major: `cells` (N,) int32, `offsets` (G + 1,), `heights`/`widths` (G,)."""

    cells: np.ndarray
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray

    @staticmethod
    def from_grids(grids: Iterable[np.ndarray], codebook_size: int) -> "Corpus":
        parts, hs, ws = [], [], []
        for i, g in enumerate(grids):
            g = _checked_codes(np.asarray(g), 2, codebook_size, f"grid {i}: ")
            parts.append(np.ascontiguousarray(g, dtype=np.int32).ravel())
            hs.append(g.shape[0])
            ws.append(g.shape[1])
        if not parts:
            raise ValueError("no grids to fit on")
        sizes = np.array([p.size for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return Corpus(np.concatenate(parts), offsets, np.array(hs, np.int32), np.array(ws, np.int32))

    @staticmethod
    def from_array(grids: np.ndarray, codebook_size: int) -> "Corpus":
        """(G, H, W) integer codes of one shape -> a Corpus viewing them (no per-grid copies: a
        shard that makes or reads millions of grids holds them once)."""
        _checked_codes(grids, 3, codebook_size, "")
        G, H, W = grids.shape
        cells = np.ascontiguousarray(grids, dtype=np.int32).reshape(-1)
        return Corpus(cells, np.arange(G + 1, dtype=np.int64) * (H * W), np.full(G, H, np.int32), np.full(G, W, np.int32))

    @property
    def num_grids(self) -> int:
        return len(self.heights)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.cells, self.offsets, self.heights, self.widths):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def split(self, n: int) -> list["Corpus"]:
        """n contiguous shards with about equal numbers of cells (whole grids each)."""
        n = max(1, min(n, self.num_grids))
        bounds = np.searchsorted(self.offsets, np.linspace(0, self.offsets[-1], n + 1)[1:-1])
        edges = [0, *sorted(set(int(b) for b in bounds if 0 < b < self.num_grids)), self.num_grids]
        out = []
        for g0, g1 in zip(edges[:-1], edges[1:]):
            c0, c1 = self.offsets[g0], self.offsets[g1]
            out.append(Corpus(self.cells[c0:c1], self.offsets[g0:g1 + 1] - c0, self.heights[g0:g1], self.widths[g0:g1]))
        return out


@dataclass(frozen=True)
class GridSource:
    """One shard's grids, loaded where the shard lives: a Ray actor reads (or makes) its own part
    of the corpus, so no process holds all of it and nothing large crosses the object store.
    `load(*args)` -> `Corpus` must be importable by the actor; `fingerprint` names the content
    (it keys checkpoints, as `Corpus.fingerprint` does)."""

    load_fn: Callable[..., Corpus]
    args: tuple
    fingerprint: str
    num_grids: int

    def load(self) -> Corpus:
        return self.load_fn(*self.args)


def source_fingerprint(sources: list[GridSource]) -> str:
    return hashlib.sha256("\n".join(s.fingerprint for s in sources).encode()).hexdigest()[:16]


class ShardSet(Protocol):
    def count(self) -> list[tuple[np.ndarray, np.ndarray]]: ...
    def apply(self, a: int, b: int, d: int, new_id: int, h: int, w: int) -> list[tuple[np.ndarray, np.ndarray, int]]: ...
    def tiles(self) -> list[np.ndarray]: ...
    def stats(self) -> dict: ...  # cells, tiles, index_entries, keys, compactions, load_s (making or reading
    # GridSource grids; shards in parallel count once), shard_peak_rss_mb (one per shard process)


def load_source(source: Corpus | GridSource, tiles: np.ndarray | None, vocab_size: int) -> Corpus:
    """A source's grids, checked as `Corpus.from_grids` checks grids (codes in [0, vocab_size) unless
    saved tiles replace them); a Corpus is returned as it is."""
    if isinstance(source, Corpus):
        return source
    corpus = source.load()
    if not isinstance(corpus, Corpus):
        raise ValueError(f"grid source {source.fingerprint}: load() must return a Corpus, got {type(corpus).__name__}")
    if tiles is None:
        _checked_codes(corpus.cells, 1, vocab_size, f"grid source {source.fingerprint}: ")
    return corpus


def tile_id_bytes(max_id: int) -> int:
    """Bytes a shard stores per tile id when the fit creates ids up to `max_id`."""
    return 2 if max_id <= _core.Shard16.max_id else 4


def make_shard(corpus: Corpus, tiles: np.ndarray | None, shape_h: list[int], shape_w: list[int],
               max_id: int | None = None) -> "_core.Shard":
    """A compiled shard; `max_id`, the largest id the fit can create, picks 2-byte tile ids
    (`Shard16`) when it fits in them (the default assumes no more ids than `shape_h` has)."""
    max_id = len(shape_h) - 1 if max_id is None else max_id
    shard_class = _core.Shard16 if tile_id_bytes(max_id) == 2 else _core.Shard
    return shard_class(corpus.cells if tiles is None else tiles, corpus.offsets.tolist(), corpus.heights.tolist(),
                       corpus.widths.tolist(), shape_h, shape_w)


class LocalShards:
    """Shards in this process (num_workers=1)."""

    def __init__(self, corpora: list[Corpus | GridSource], tiles: list[np.ndarray] | None, shape_h: list[int], shape_w: list[int],
                 max_id: int | None = None):
        saved = tiles or [None] * len(corpora)
        t0 = time.perf_counter()
        corpora = [load_source(c, t, len(shape_h)) for c, t in zip(corpora, saved)]
        self.load_s = time.perf_counter() - t0
        self.shards = [make_shard(c, t, shape_h, shape_w, max_id) for c, t in zip(corpora, saved)]

    def count(self):
        return [s.count() for s in self.shards]

    def apply(self, a, b, d, new_id, h, w):
        return [s.apply(a, b, d, new_id, h, w) for s in self.shards]

    def tiles(self):
        return [s.tiles() for s in self.shards]

    def stats(self):
        return {"cells": sum(s.num_cells() for s in self.shards), "tiles": sum(s.num_tiles() for s in self.shards),
                "index_entries": sum(s.index_entries() for s in self.shards), "keys": sum(s.num_keys() for s in self.shards),
                "compactions": sum(s.compactions() for s in self.shards), "load_s": self.load_s,
                "shard_peak_rss_mb": []}  # in the driver's


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
