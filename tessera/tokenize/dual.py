"""DualToken: one SigLIP ViT, two codebooks.

- pixel branch: hidden state of a shallow layer (+ an optional shortcut from an earlier
  layer) -> its own RVQ -> a conv pixel decoder; trained for reconstruction;
- semantic branch: hidden state of a deep layer -> its own RVQ -> projected back; trained
  to stay close (MSE + cosine) to the same layer of a frozen copy of the initial encoder.

The ViT is `transformers.SiglipVisionModel`: built from a config (tiny sizes for CPU), or
`from_pretrained(siglip_path)` for real weights. Offline, the initial encoder (and so the
frozen teacher) comes from `align.align_vision_encoder`, a SigLIP sigmoid-loss pre-training
on the prepared image-text pairs, so the semantic target is not a random network.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import DualConfig, VQConfig
from tessera.tokenize.rvq import ResidualVQ
from tessera.tokenize.vq import ConvDecoder


def siglip_vision_config(cfg: DualConfig, image_size: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                              image_size=image_size, patch_size=cfg.patch_size, num_channels=3)


def build_vision_encoder(cfg: DualConfig, image_size: int):
    from transformers import SiglipVisionModel

    if cfg.siglip_path:
        return SiglipVisionModel.from_pretrained(cfg.siglip_path)
    return SiglipVisionModel(siglip_vision_config(cfg, image_size))


class DualTokenizer(nn.Module):
    def __init__(self, cfg: DualConfig, image_size: int, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.encoder = encoder if encoder is not None else build_vision_encoder(cfg, image_size)
        hidden = self.encoder.config.hidden_size
        self.teacher = copy.deepcopy(self.encoder)  # frozen copy of the initial encoder
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.pixel_in = nn.Linear(hidden, cfg.pixel_rvq.dim)
        self.pixel_quantizer = ResidualVQ(cfg.pixel_rvq)
        up_steps = int(math.log2(self.encoder.config.patch_size))
        self.pixel_decoder = ConvDecoder(VQConfig(channels=cfg.decoder_channels, num_down=up_steps, res_blocks=1,
                                                  rvq=cfg.pixel_rvq), in_dim=cfg.pixel_rvq.dim)
        self.semantic_in = nn.Linear(hidden, cfg.semantic_rvq.dim)
        self.semantic_quantizer = ResidualVQ(cfg.semantic_rvq)
        self.semantic_out = nn.Linear(cfg.semantic_rvq.dim, hidden)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never leaves eval mode
        return self

    @property
    def last_layer(self) -> torch.Tensor:
        return self.pixel_decoder.out.weight

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        s = image_size // self.encoder.config.patch_size
        return s, s

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> pixel (B, h, w, Cp), semantic (B, h, w, Cs) pre-quantisation features."""
        out = self.encoder(pixel_values=images, output_hidden_states=True)
        hs = out.hidden_states  # (L + 1) x (B, h*w, hidden); [0] = patch embeddings
        B, N, _ = hs[0].shape
        side = int(math.isqrt(N))
        pixel = hs[self.cfg.pixel_layer]
        if self.cfg.shortcut_layer:
            pixel = pixel + hs[self.cfg.shortcut_layer]
        pixel = self.pixel_in(pixel).reshape(B, side, side, -1)
        semantic = self.semantic_in(hs[self.cfg.semantic_layer]).reshape(B, side, side, -1)
        return pixel, semantic

    def forward(self, images: torch.Tensor) -> dict:
        pixel, semantic = self._features(images)
        qp, pixel_codes, pinfo = self.pixel_quantizer(pixel)
        qs, semantic_codes, sinfo = self.semantic_quantizer(semantic)
        rec = self.pixel_decoder(qp.permute(0, 3, 1, 2))
        with torch.no_grad():
            target = self.teacher(pixel_values=images, output_hidden_states=True).hidden_states[self.cfg.semantic_layer]
        pred = self.semantic_out(qs).reshape(target.shape)
        sem_mse = F.mse_loss(pred, target)
        sem_cos = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        return {
            "reconstruction": rec,
            "codes": {"pixel": pixel_codes, "semantic": semantic_codes},
            "losses": {"commitment": (pinfo["commitment"] + sinfo["commitment"]) / 2, "semantic_mse": sem_mse, "semantic_cos": sem_cos},
            "residual_norms": {"pixel": pinfo["residual_norms"], "semantic": sinfo["residual_norms"]},
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel, semantic = self._features(images)
        return {"pixel": self.pixel_quantizer(pixel)[1], "semantic": self.semantic_quantizer(semantic)[1]}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """pixel codes (B, h, w, D) -> images (B, 3, H, W) in [-1, 1]."""
        q = self.pixel_quantizer.lookup(codes).permute(0, 3, 1, 2)
        return self.pixel_decoder(q).clamp(-1, 1)

    @torch.no_grad()
    def semantic_embedding(self, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Quantised semantic features -> pooled image embedding through the teacher's head
        (post-layernorm + attention pooling), comparable with the aligned text tower. (B, hidden)."""
        B, h, w, _ = semantic_codes.shape
        feats = self.semantic_out(self.semantic_quantizer.lookup(semantic_codes)).reshape(B, h * w, -1)
        vm = getattr(self.teacher, "vision_model", self.teacher)  # transformers 4.x wraps, 5.x does not
        # hidden states after the semantic layer pass through the remaining layers as the teacher would
        for layer in vm.encoder.layers[self.cfg.semantic_layer:]:
            out = layer(feats, attention_mask=None)
            feats = out[0] if isinstance(out, tuple) else out
        feats = vm.post_layernorm(feats)
        return vm.head(feats) if getattr(vm, "head", None) is not None else feats.mean(1)
