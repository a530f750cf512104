"""The oracle visual tokenizer (`tokenizer.preset: oracle`, shapes world only): one code per cell
of the scene's 3 x 3 grid naming the object in it, read from the pixels by the shapes-world
analyser (`tessera.pipelines.analyser`).

    code 0                  empty cell
    code 1 + ((colour * |shapes|) + shape) * |sizes| + size     an object

It is the ceiling of the learning study: a visual tokenizer that hands the language model the
scene's content, one token per place, so the gap between a run on these tokens and one on the
learned VQ tokens is what the real token stream costs the LM. It has no weights and needs no
training; everything downstream (tokenize, fit-bpe, the 2-D positions, train, eval) is unchanged.
`decode` draws the named objects on a plain background, so text -> image is scored the same way.
Its fidelity is that of the analyser (reported by train-tokenizer against held-out captions).

With `tokenizer.oracle_grid: G` (> 3) the same content comes in the real tokens' geometry: a G x G
grid where each object's code covers the cells its box (centred in its 3x3 cell, its size's radius)
covers and 0 is everywhere else, so an object spans 3 (small) to 4 (large) codes of a 16 x 16
grid, as in the VQ codes, and the visual BPE and the 2-D positions see many tiles an image. Between
the 3 x 3 oracle and the real tokens, it separates what the tokens' content costs the LM from what
their number and geometry cost.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from tessera.pipelines import analyser, shapes

GRID = 3
_COLOURS = list(shapes.COLOURS)
CODEBOOK_SIZE = 1 + len(_COLOURS) * len(shapes.SHAPES) * len(shapes.SIZES)
_BACKGROUND = (128, 128, 128)


def object_code(obj: shapes.ShapeObject) -> int:
    return 1 + (_COLOURS.index(obj.colour) * len(shapes.SHAPES) + shapes.SHAPES.index(obj.shape)) * len(shapes.SIZES) \
        + shapes.SIZES.index(obj.size)


def code_object(code: int, cell: int) -> shapes.ShapeObject | None:
    if code <= 0:
        return None
    rest, size = divmod(code - 1, len(shapes.SIZES))
    colour, shape = divmod(rest, len(shapes.SHAPES))
    return shapes.ShapeObject(shapes.SHAPES[shape], _COLOURS[colour], shapes.SIZES[size], shapes.POSITIONS[cell])


def scene_grid(objects: list[shapes.ShapeObject]) -> np.ndarray:
    """Objects -> (3, 3) int64 codes; a cell keeps the first (largest) object found in it."""
    grid = np.zeros(GRID * GRID, np.int64)
    for obj in objects:
        cell = shapes.POSITIONS.index(obj.position)
        if grid[cell] == 0:
            grid[cell] = object_code(obj)
    return grid.reshape(GRID, GRID)


def painted_grid(objects: list[shapes.ShapeObject], side: int) -> np.ndarray:
    """Objects -> (side, side) int64 codes: each object's code on the cells whose centre lies inside
    its box (at least the cell under the box's centre); a cell keeps the first object painted on it."""
    grid = np.zeros((side, side), np.int64)
    centres = np.arange(side) + 0.5
    for obj in objects:
        cx, cy, r = shapes.object_box(obj, side)
        rows = np.flatnonzero(np.abs(centres - cy) <= r)
        cols = np.flatnonzero(np.abs(centres - cx) <= r)
        rows = rows if rows.size else np.array([min(int(cy), side - 1)])
        cols = cols if cols.size else np.array([min(int(cx), side - 1)])
        block = grid[np.ix_(rows, cols)]
        block[block == 0] = object_code(obj)
        grid[np.ix_(rows, cols)] = block
    return grid


def cell_grid(grid: np.ndarray) -> np.ndarray:
    """(H, W) painted codes (a whole grid, or a BPE tile) -> (3, 3): each cell's most frequent object
    code among the codes whose centre lies in it (0 when none)."""
    grid = np.asarray(grid)
    row_cell, col_cell = (((np.arange(n) + 0.5) * GRID / n).astype(np.int64) for n in grid.shape)
    out = np.zeros((GRID, GRID), np.int64)
    for r in range(GRID):
        for c in range(GRID):
            codes = grid[np.ix_(row_cell == r, col_cell == c)].ravel()
            codes = codes[codes > 0]
            if codes.size:
                out[r, c] = np.bincount(codes).argmax()
    return out


def grid_objects(grid: np.ndarray) -> list[shapes.ShapeObject]:
    flat = np.asarray(grid).reshape(-1)
    return [o for cell, code in enumerate(flat) if (o := code_object(int(code), cell)) is not None]


class CodebookUsage:
    """What `tessera.tokenize.trainer.evaluate` asks of a quantizer: usage and perplexity per depth."""

    restarts = torch.zeros(1, dtype=torch.int64)

    def usage(self, codes: torch.Tensor) -> dict:
        counts = torch.bincount(codes.reshape(-1), minlength=CODEBOOK_SIZE).float()
        p = counts[counts > 0] / counts.sum()
        return {"usage": [float((counts > 0).float().mean())], "perplexity": [float(torch.exp(-(p * p.log()).sum()))]}


class OracleTokenizer(nn.Module):
    """encode(images (B, 3, H, W) in [-1, 1]) -> {"pixel": (B, G, G, 1) int64};
    decode((B, G, G, 1)) -> (B, 3, image_size, image_size) in [-1, 1]. G = `grid` (3: one code a cell)."""

    def __init__(self, image_size: int, grid: int = GRID):
        super().__init__()
        self.image_size, self.grid = image_size, grid
        self.quantizer = CodebookUsage()

    def _codes(self, objects: list[shapes.ShapeObject]) -> np.ndarray:
        return scene_grid(objects) if self.grid == GRID else painted_grid(objects, self.grid)

    def objects(self, grid: np.ndarray) -> list[shapes.ShapeObject]:
        """(G, G) codes (or a tile of them) -> the objects they name."""
        return grid_objects(grid if self.grid == GRID else cell_grid(grid))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        grids = np.stack([self._codes(analyser.analyse(p)) for p in pixels]) if len(pixels) else np.zeros((0, self.grid, self.grid), np.int64)
        return {"pixel": torch.from_numpy(grids[..., None]).to(images.device)}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = []
        for grid in codes[..., 0].cpu().numpy():
            scene = shapes.Scene(tuple(self.objects(grid)), _BACKGROUND, _BACKGROUND, False, 0, noise=0.0)
            out.append(shapes.render_scene(scene, self.image_size))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.to(codes.device)

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        return self.grid, self.grid
