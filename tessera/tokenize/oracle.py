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
    """encode(images (B, 3, H, W) in [-1, 1]) -> {"pixel": (B, 3, 3, 1) int64};
    decode((B, 3, 3, 1)) -> (B, 3, image_size, image_size) in [-1, 1]."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.quantizer = CodebookUsage()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        grids = np.stack([scene_grid(analyser.analyse(p)) for p in pixels]) if len(pixels) else np.zeros((0, GRID, GRID), np.int64)
        return {"pixel": torch.from_numpy(grids[..., None]).to(images.device)}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = []
        for grid in codes[..., 0].cpu().numpy():
            scene = shapes.Scene(tuple(grid_objects(grid)), _BACKGROUND, _BACKGROUND, False, 0, noise=0.0)
            out.append(shapes.render_scene(scene, self.image_size))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.to(codes.device)

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        return GRID, GRID
