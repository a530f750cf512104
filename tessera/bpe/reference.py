"""The visual BPE contract of DESIGN.md, transcribed literally: the oracle for tests and the
baseline for benchmarks. It recounts the whole corpus before every merge, so it is slow
by design; `tessera.bpe.VisualBPE` must produce exactly the same merges and tilings.

A tiling of an H x W grid is an int array `anchor_id` (H, W): the tile id at each tile's
anchor (top-left cell), -1 elsewhere. Tile shapes come from `shapes[id] = (h, w)`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

H_DIR, V_DIR = 0, 1  # "h" < "v" in every tie-break


def initial_tiling(grid: np.ndarray) -> np.ndarray:
    return np.asarray(grid, dtype=np.int64).copy()


def anchors(tiling: np.ndarray) -> list[tuple[int, int]]:
    """Anchors in raster order."""
    rs, cs = np.nonzero(tiling >= 0)
    return list(zip(rs.tolist(), cs.tolist()))


def neighbour(tiling: np.ndarray, shapes: dict, r: int, c: int, d: int) -> tuple[int, int] | None:
    """Anchor of the tile adjacent to the tile anchored at (r, c) in direction d, if the
    adjacency of the contract holds (equal height for h, equal width for v)."""
    h, w = shapes[int(tiling[r, c])]
    H, W = tiling.shape
    if d == H_DIR:
        rr, cc = r, c + w
        if cc < W and tiling[rr, cc] >= 0 and shapes[int(tiling[rr, cc])][0] == h:
            return rr, cc
    else:
        rr, cc = r + h, c
        if rr < H and tiling[rr, cc] >= 0 and shapes[int(tiling[rr, cc])][1] == w:
            return rr, cc
    return None


def count_pairs(tilings: list[np.ndarray], shapes: dict) -> Counter:
    """F(a, b, d) over the corpus, overlapping occurrences counted."""
    counts: Counter = Counter()
    for t in tilings:
        for r, c in anchors(t):
            for d in (H_DIR, V_DIR):
                nb = neighbour(t, shapes, r, c, d)
                if nb is not None:
                    counts[(int(t[r, c]), int(t[nb]), d)] += 1
    return counts


def merged_shape(shapes: dict, a: int, b: int, d: int) -> tuple[int, int]:
    (ha, wa), (hb, wb) = shapes[a], shapes[b]
    return (ha, wa + wb) if d == H_DIR else (ha + hb, wa)


def choose(counts: Counter, shapes: dict, alpha: float, top_k: int, min_frequency: int, max_tile: tuple[int, int]):
    """The merge of the contract, or None when nothing is eligible."""
    eligible = []
    for (a, b, d), f in counts.items():
        if f < min_frequency:
            continue
        mh, mw = merged_shape(shapes, a, b, d)
        if mh <= max_tile[0] and mw <= max_tile[1]:
            eligible.append((f, a, b, d))
    if not eligible:
        return None
    eligible.sort(key=lambda x: (-x[0], x[1], x[2], x[3]))
    top = eligible[:top_k]
    f_max = top[0][0]
    best = None
    for f, a, b, d in top:
        if a == b:
            c = counts.get((a, a, H_DIR), 0) + counts.get((a, a, V_DIR), 0)
        else:
            c = (counts.get((a, b, H_DIR), 0) + counts.get((a, b, V_DIR), 0)
                 + counts.get((b, a, H_DIR), 0) + counts.get((b, a, V_DIR), 0))
        p = f / f_max + alpha * (f / c)
        key = (-p, -f, a, b, d)
        if best is None or key < best[0]:
            best = (key, (a, b, d))
    return best[1]


def apply_merge(tiling: np.ndarray, shapes: dict, a: int, b: int, d: int, new_id: int) -> None:
    """One pass over tiles in raster order of anchors (in place)."""
    consumed = set()
    for r, c in anchors(tiling):
        if (r, c) in consumed or tiling[r, c] != a:
            continue
        nb = neighbour(tiling, shapes, r, c, d)
        if nb is None or nb in consumed or tiling[nb] != b:
            continue
        tiling[r, c] = new_id
        tiling[nb] = -1
        consumed.add((r, c))
        consumed.add(nb)


def fit(grids, codebook_size: int, num_merges: int, alpha: float = 0.0, top_k: int = 32, min_frequency: int = 2,
        max_tile: tuple[int, int] = (4, 4)):
    """-> (merges [(a, b, d)], shapes {id: (h, w)}, final tilings)."""
    shapes = {i: (1, 1) for i in range(codebook_size)}
    tilings = [initial_tiling(g) for g in grids]
    merges = []
    for i in range(num_merges):
        counts = count_pairs(tilings, shapes)
        choice = choose(counts, shapes, alpha, top_k, min_frequency, max_tile)
        if choice is None:
            break
        a, b, d = choice
        new_id = codebook_size + i
        shapes[new_id] = merged_shape(shapes, a, b, d)
        for t in tilings:
            apply_merge(t, shapes, a, b, d, new_id)
        merges.append(choice)
    return merges, shapes, tilings


def encode(grid: np.ndarray, merges, codebook_size: int) -> np.ndarray:
    shapes = {i: (1, 1) for i in range(codebook_size)}
    t = initial_tiling(grid)
    for i, (a, b, d) in enumerate(merges):
        shapes[codebook_size + i] = merged_shape(shapes, a, b, d)
        apply_merge(t, shapes, a, b, d, codebook_size + i)
    return t[t >= 0]
