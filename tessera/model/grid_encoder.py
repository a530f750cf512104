"""`GridEncoder`: the bpe interface's reading of a whole image, a small CNN over its base-code grid.

A BPE tile's own embedding row says which codes it holds, not what they form with their
neighbours: a circle and a square of one colour share most of their codes, and what tells them
apart is the arrangement of codes around the object. A 4-layer LM has to learn that arrangement
through attention over ~130 tiles whose only spatial cue is an added row/column embedding, and
at the demo's budget it does not (held-out shape stays at chance in every arm; README "Learning").
A convolution has the translation equivariance that task wants. So, for an image the model
*reads* (a prompt: captioning, questions), each visual token's input embedding also gets

    grid = the image's base codes, rebuilt from its tiles (ids + anchor cells)    (n, S, S)
    feat = [Conv3x3 -> GELU] x layers over Embedding(grid)                        (n, dim, S, S)
    token += out(mean of feat over the cells its tile covers)                     (hidden,)

`out` starts at zero, so a model built with the encoder computes exactly what it would without it
until the answer loss teaches it something.

An image the model *writes* (a target: text -> image, or a caption-first pair) gets no grid
feature: the grid holds the codes of tiles not yet generated, so reading it would show each
position what it is asked to predict. The model therefore reads images through the grid and
writes them token by token -- Janus's split of understanding and generation encoders, over one
discrete vocabulary. An image counts as read when its `<|image_start|>` and `<|image_end|>` are
both in the same forward call and none of its tokens is a target; an image being generated one
token at a time (KV cache) never is.
"""

from __future__ import annotations

import torch
from torch import nn


class GridEncoder(nn.Module):
    def __init__(self, tile_codes: torch.Tensor, hidden: int, dim: int = 64, layers: int = 3, kernel: int = 3):
        """`tile_codes` (V, T, T) int64: the base codes of each visual token's tile, -1 outside the tile
        (a buffer: saved with the weights, so a loaded model needs no BPE). The base codebook's size is
        read from it: the BPE's first K tokens are the K base codes as 1x1 tiles."""
        super().__init__()
        self.register_buffer("tile_codes", tile_codes.to(torch.int64))
        self.codebook_size = int(tile_codes.max()) + 1
        self.embed = nn.Embedding(self.codebook_size + 1, dim)  # + "no code" (outside the image / not yet known)
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, kernel, padding=kernel // 2) for _ in range(layers))
        self.act = nn.GELU()
        self.out = nn.Linear(dim, hidden, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.zeros_(self.out.weight)

    @staticmethod
    def tiles_from_bpe(bpe, visual_size: int) -> torch.Tensor:
        """(visual_size, T, T) table of each BPE token's base codes (-1 padding), T the largest tile side."""
        blocks = [bpe.tile_codes(t) for t in range(visual_size)]
        side = max(max(b.shape) for b in blocks)
        table = torch.full((visual_size, side, side), -1, dtype=torch.int64)
        for t, b in enumerate(blocks):
            table[t, : b.shape[0], : b.shape[1]] = torch.as_tensor(b, dtype=torch.int64)
        return table

    def forward(self, tokens: torch.Tensor, image_of: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """tokens (N,) visual token ids (0-based in the visual vocabulary), image_of (N,) the image each
        belongs to (0..n-1), cells (N, 2) anchor (row, column) -> (N, hidden) grid features."""
        n = int(image_of.max()) + 1
        codes = self.tile_codes[tokens]  # (N, T, T)
        T = codes.shape[-1]
        side = int(cells.max()) + T
        dr, dc = torch.meshgrid(torch.arange(T, device=codes.device), torch.arange(T, device=codes.device), indexing="ij")
        rows = cells[:, 0, None, None] + dr  # (N, T, T)
        cols = cells[:, 1, None, None] + dc
        inside = codes >= 0
        img = image_of[:, None, None].expand_as(codes)
        grid = torch.full((n, side, side), self.codebook_size, dtype=torch.int64, device=codes.device)
        grid[img[inside], rows[inside], cols[inside]] = codes[inside]
        x = self.embed(grid).permute(0, 3, 1, 2)  # (n, dim, S, S)
        for conv in self.convs:
            x = self.act(conv(x))
        per_cell = x.permute(0, 2, 3, 1)[img, rows.clamp(max=side - 1), cols.clamp(max=side - 1)]  # (N, T, T, dim)
        weight = inside.unsqueeze(-1).to(per_cell.dtype)
        pooled = (per_cell * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1)
        return self.out(pooled)
