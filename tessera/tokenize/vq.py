"""VQ-GAN-style convolutional tokenizer (the Being-VL path): conv encoder -> RVQ -> conv decoder.

Images (B, 3, H, W) in [-1, 1] become a code grid (B, H/f, W/f, D), f = 2**num_down; with
depth D = 1 it is the single-codebook grid the visual BPE runs on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessera.config import VQConfig
from tessera.tokenize.rvq import ResidualVQ


class ChannelNorm(nn.Module):
    """Layer norm over the channels of each position (B, C, H, W): unlike GroupNorm, whose statistics
    span the whole image, a position's output depends only on its own features."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, ch: int) -> nn.Module:
    return nn.GroupNorm(8, ch) if kind == "group" else ChannelNorm(ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str = "group", padding_mode: str = "zeros"):
        super().__init__()
        self.block = nn.Sequential(_norm(norm, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, 1, 1, padding_mode=padding_mode),
                                   _norm(norm, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, 1, 1, padding_mode=padding_mode))

    def forward(self, x):
        return x + self.block(x)


class ConvEncoder(nn.Module):
    """(B, 3, H, W) -> (B, C, H/f, W/f). `cfg.encoder_norm: channel` and `cfg.encoder_padding: replicate`
    make a code depend only on the pixels around it: the same patch gets the same code anywhere in
    any image (with GroupNorm's image-wide statistics and zero padding, a flat background gets
    different codes by its distance to the border and by what else the image holds)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, norm, pad = cfg.channels, cfg.encoder_norm, cfg.encoder_padding
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, 1, 1, padding_mode=pad)]
        for _ in range(cfg.num_down):
            layers += [ResBlock(ch, norm, pad) for _ in range(cfg.res_blocks)]
            layers += [nn.Conv2d(ch, ch, 4, 2, 1, padding_mode=pad)]
        layers += [ResBlock(ch, norm, pad), _norm(norm, ch), nn.SiLU(), nn.Conv2d(ch, cfg.rvq.dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, C, h, w)
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_dim: int | None = None):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_dim or cfg.rvq.dim, ch, 3, 1, 1), ResBlock(ch)]
        for _ in range(cfg.num_down):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, 1, 1)]
            layers += [ResBlock(ch) for _ in range(cfg.res_blocks)]
        layers += [nn.GroupNorm(8, ch), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch, 3, 3, 1, 1)  # the "last layer" of the adaptive GAN weight

    def forward(self, z):  # (B, C, h, w) -> (B, 3, H, W)
        return self.out(self.net(z))


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConvEncoder(cfg)
        self.quantizer = ResidualVQ(cfg.rvq)
        self.decoder = ConvDecoder(cfg)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.out.weight

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) in [-1, 1] -> {"reconstruction", "codes": {"pixel": (B, h, w, D)}, "losses": {...}}."""
        z = self.encoder(images).permute(0, 2, 3, 1)  # (B, h, w, C)
        q, codes, info = self.quantizer(z)
        rec = self.decoder(q.permute(0, 3, 1, 2))
        return {"reconstruction": rec, "codes": {"pixel": codes}, "losses": {"commitment": info["commitment"]},
                "residual_norms": {"pixel": info["residual_norms"]}}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, features: bool = False) -> dict[str, torch.Tensor]:
        """images -> {"pixel": codes (B, h, w, D)}; with `features` also {"features": (B, h, w, dim)}, the
        encoder's pre-quantisation output the codes quantise (what the `continuous` model interface reads)."""
        z = self.encoder(images).permute(0, 2, 3, 1)
        _, codes, _ = self.quantizer(z)
        return {"pixel": codes, "features": z} if features else {"pixel": codes}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w, D) -> images (B, 3, H, W) in [-1, 1]."""
        q = self.quantizer.lookup(codes).permute(0, 3, 1, 2)
        return self.decoder(q).clamp(-1, 1)

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        s = image_size // 2 ** self.cfg.num_down
        return s, s
