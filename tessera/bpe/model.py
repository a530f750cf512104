"""`VisualBPE`: the fitted merges of the 2-D visual BPE, with encode/decode and constrained decoding.

Every token is a rectangle of base codes (DESIGN.md "Visual BPE — the exact contract").
`merges.json` fully determines encode and decode: the codebook size, the parameters and
the merges `[a, b, "h"|"v"]`, merge i creating id K + i.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from tessera.bpe.core import _core
from tessera.bpe.fit import DIRS, FitCheckpointer, FitParams, FitResult, ShardBackend, merged_shape, run_fit
from tessera.bpe.shards import Corpus, GridSource, LocalShards

FORMAT = "tessera-visual-bpe/1"


class VisualBPE:
    def __init__(self, codebook_size: int, merges: Sequence[tuple[int, int, str]], params: dict | None = None,
                 report: dict | None = None):
        self.codebook_size = int(codebook_size)
        self.merges = [(int(a), int(b), str(d)) for a, b, d in merges]
        self.params = dict(params or {})
        self.report = dict(report or {})
        shape_h, shape_w = [1] * self.codebook_size, [1] * self.codebook_size
        for i, (a, b, d) in enumerate(self.merges):
            if d not in DIRS:
                raise ValueError(f"merge {i}: direction must be 'h' or 'v', got {d!r}")
            if not (0 <= a < self.codebook_size + i and 0 <= b < self.codebook_size + i):
                raise ValueError(f"merge {i}: ids ({a}, {b}) must be existing ids < {self.codebook_size + i}")
            h, w = merged_shape(shape_h, shape_w, a, b, DIRS.index(d))
            shape_h.append(h)
            shape_w.append(w)
        self.shape_h = np.array(shape_h, dtype=np.int32)
        self.shape_w = np.array(shape_w, dtype=np.int32)
        self._shape_lists = (shape_h, shape_w)  # plain lists: per-token lookups in `PartialTiling.push`
        self._encoder = _core.Encoder(self.codebook_size, [(a, b, DIRS.index(d)) for a, b, d in self.merges])

    # ------------------------------------------------------------------ fit

    @classmethod
    def fit(cls, grids: Iterable[np.ndarray], codebook_size: int, num_merges: int, alpha: float = 0.0, top_k: int = 32,
            min_frequency: int = 2, max_tile: tuple[int, int] = (4, 4), num_shards: int = 1,
            shards: ShardBackend = LocalShards, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            progress: bool = False, stop_after: int | None = None) -> "VisualBPE":
        """Fit on `grids` (2-D integer arrays, codes in [0, codebook_size), sizes may differ), split into
        `num_shards` shards of the `shards` backend (in process, or `tessera.bpe.distributed.RayShards`:
        one Ray actor each); the merges are identical for any backend and number of shards."""
        return cls._fit(Corpus.from_grids(grids, codebook_size), codebook_size, num_merges, alpha, top_k, min_frequency,
                        max_tile, num_shards, shards, checkpoint_dir, checkpoint_every, progress, stop_after)

    @classmethod
    def fit_sources(cls, sources: list[GridSource], codebook_size: int, num_merges: int, alpha: float = 0.0,
                    top_k: int = 32, min_frequency: int = 2, max_tile: tuple[int, int] = (4, 4),
                    shards: ShardBackend = LocalShards, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                    progress: bool = False, stop_after: int | None = None) -> "VisualBPE":
        """Fit with one shard per `GridSource`, each loading its own grids where it lives (in a Ray
        actor with `RayShards`): the corpus never passes through this process. Same merges as `fit`
        on the concatenated grids."""
        return cls._fit(list(sources), codebook_size, num_merges, alpha, top_k, min_frequency, max_tile, len(sources),
                        shards, checkpoint_dir, checkpoint_every, progress, stop_after)

    @classmethod
    def _fit(cls, corpus, codebook_size, num_merges, alpha, top_k, min_frequency, max_tile, num_shards, shards,
             checkpoint_dir, checkpoint_every, progress, stop_after) -> "VisualBPE":
        params = FitParams(codebook_size, num_merges, alpha, top_k, min_frequency, tuple(max_tile))
        checkpointer = FitCheckpointer(checkpoint_dir, checkpoint_every) if checkpoint_dir else None
        result: FitResult = run_fit(corpus, params, shards, num_shards, checkpointer, progress, stop_after)
        return cls(codebook_size, result.merges, params.to_dict(), result.report)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + len(self.merges)

    def shape(self, token: int) -> tuple[int, int]:
        return int(self.shape_h[token]), int(self.shape_w[token])

    def tile_codes(self, token: int) -> np.ndarray:
        """Base codes of a token, (h, w) int32."""
        return self._encoder.tile_codes(int(token))

    # ------------------------------------------------------------------ encode / decode

    def encode(self, grid: np.ndarray) -> np.ndarray:
        """(H, W) int codes -> (T,) int32 tile ids in raster order of anchors."""
        grid = np.asarray(grid)
        if grid.ndim != 2:
            raise ValueError(f"expected a 2-D grid, got shape {grid.shape}")
        return self._encoder.encode(grid.astype(np.int32, copy=False))

    def encode_batch(self, grids: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Many grids; a (B, H, W) array takes one compiled call."""
        if isinstance(grids, np.ndarray) and grids.ndim == 3:
            flat, lengths = self._encoder.encode_batch(grids.astype(np.int32, copy=False))
            return np.split(flat, np.cumsum(lengths)[:-1])
        return [self.encode(g) for g in grids]

    def decode(self, tokens: Sequence[int] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(T,) tile ids -> (H, W) int32 grid: each tile at the first free cell in raster order."""
        return self._encoder.decode(np.asarray(tokens, dtype=np.int32), int(shape[0]), int(shape[1]))

    def anchors(self, tokens: Sequence[int] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(T,) tile ids -> (T, 2) int64 (row, column) of each tile's anchor (top-left) cell,
        by the same placement as `decode`: each tile at the first free cell in raster order."""
        tiling = self.start_decoding(shape)
        out = np.empty((len(tokens), 2), np.int64)
        for i, t in enumerate(np.asarray(tokens).tolist()):
            out[i] = tiling.next_cell()
            tiling.push(t)
        return out

    def start_decoding(self, shape: tuple[int, int]) -> "PartialTiling":
        """Incremental decoding state for constrained generation."""
        return PartialTiling(self, shape)

    def valid_next(self, tokens: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
        """Which token ids fit at the next free cell after `tokens`: (vocab_size,) bool."""
        state = self.start_decoding(shape)
        for t in tokens:
            state.push(int(t))
        return state.valid_mask()

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {"format": FORMAT, "codebook_size": self.codebook_size, "params": self.params,
                "merges": [[a, b, d] for a, b, d in self.merges],
                "shapes": [[int(h), int(w)] for h, w in zip(self.shape_h[self.codebook_size:], self.shape_w[self.codebook_size:])]}

    @property
    def hash(self) -> str:
        """Identity of the encode/decode behaviour: codebook size and merges only."""
        payload = json.dumps({"codebook_size": self.codebook_size, "merges": [[a, b, d] for a, b, d in self.merges]})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, path: str) -> str:
        """Write merges.json (to `path`, or `path/merges.json` if `path` is a directory)."""
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "merges.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.to_dict(), "hash": self.hash}, f)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "VisualBPE":
        if os.path.isdir(path):
            path = os.path.join(path, "merges.json")
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a visual BPE file (format {data.get('format')!r}, expected {FORMAT!r})")
        bpe = cls(data["codebook_size"], [tuple(m) for m in data["merges"]], data.get("params"))
        if "shapes" in data and data["shapes"] != bpe.to_dict()["shapes"]:
            raise ValueError(f"{path}: stored shapes disagree with the merges")
        return bpe


class PartialTiling:
    """A grid being filled tile by tile in raster order (for constrained generation)."""

    def __init__(self, bpe: VisualBPE, shape: tuple[int, int]):
        self.bpe = bpe
        self.H, self.W = int(shape[0]), int(shape[1])
        # one flat bytearray, seen by numpy as the (H, W) bool grid: `push` marks and scans it with the
        # bytearray's C-level slicing and `find` (it runs per token of every image of every packed training
        # row, through `VisualBPE.anchors`), `valid_mask` reads it as an array
        self._flat = bytearray(self.H * self.W)
        self.occupied = np.frombuffer(self._flat, dtype=bool).reshape(self.H, self.W)
        self.cursor = 0
        self.max_h = int(bpe.shape_h.max())

    @property
    def done(self) -> bool:
        return self.cursor >= self.H * self.W

    def next_cell(self) -> tuple[int, int]:
        return divmod(self.cursor, self.W)

    def valid_mask(self) -> np.ndarray:
        """(vocab_size,) bool: tokens whose tile fits at the next free cell."""
        if self.done:
            return np.zeros(self.bpe.vocab_size, dtype=bool)
        r, c = self.next_cell()
        # widest free run starting at column c, for tiles of height 1..max_h
        free = ~self.occupied[r:r + self.max_h, c:]
        run = np.where(free.all(axis=1) if free.shape[1] else True, free.shape[1], np.argmin(free, axis=1))
        wmax = np.minimum.accumulate(run)  # a tile of height h needs rows r..r+h-1 free
        wmax_by_h = np.zeros(self.max_h + 1, dtype=np.int64)
        wmax_by_h[1:len(wmax) + 1] = wmax
        h = self.bpe.shape_h
        return (h <= self.H - r) & (self.bpe.shape_w <= wmax_by_h[np.minimum(h, self.max_h)])

    def push(self, token: int) -> None:
        if self.done:
            raise ValueError("more tiles than the grid holds: it is already full")
        r, c = self.next_cell()
        heights, widths = self.bpe._shape_lists
        h, w = heights[token], widths[token]
        if r + h > self.H or c + w > self.W:
            raise ValueError(f"token {token} ({h}x{w}) does not fit at ({r}, {c})")
        flat, W = self._flat, self.W
        for start in range(self.cursor, self.cursor + h * W, W):
            if flat.find(1, start, start + w) >= 0:
                raise ValueError(f"token {token} ({h}x{w}) does not fit at ({r}, {c}): it overlaps an earlier tile")
            flat[start:start + w] = b"\x01" * w
        free = flat.find(0, self.cursor)
        self.cursor = free if free >= 0 else len(flat)
