"""Mixture-of-Transformers (BAGEL): modality experts that share self-attention.

Each decoder layer's position-wise parts (the FFN; with `attention=True` also the q/k/v/o
projections and both norms) are wrapped in `ModalityRouted`, which holds a text expert (the
original module) and a visual expert (initialised as an exact copy). Attention itself runs
over the whole sequence, so text and visual positions still see each other.

Which positions are visual is set once per forward by the model on a shared `Router`
(`visual_mask`, (B, L) bool), so the Hugging Face decoder code runs unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Router:
    """Per-forward routing state shared by every `ModalityRouted` of a model (not a Module)."""

    def __init__(self):
        self.visual_mask: torch.Tensor | None = None


class ModalityRouted(nn.Module):
    """Applies `text` to text positions and `visual` to visual positions of x (B, L, *)."""

    def __init__(self, text: nn.Module, visual: nn.Module, router: Router):
        super().__init__()
        self.text = text
        self.visual = visual
        self._router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._router.visual_mask
        if mask is None or not bool(mask.any()):
            return self.text(x)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"routing mask {tuple(mask.shape)} does not match hidden states {tuple(x.shape[:2])}")
        if bool(mask.all()):
            return self.visual(x)
        text_out = self.text(x[~mask])  # (n_text, D')
        visual_out = self.visual(x[mask])  # (n_visual, D')
        out = text_out.new_empty(*mask.shape, text_out.shape[-1])
        out[~mask] = text_out
        out[mask] = visual_out.to(text_out.dtype)
        return out


def apply_mot(decoder_layers: nn.ModuleList, router: Router, attention: bool = False) -> None:
    """Wrap each layer's FFN (and with `attention` its projections and norms) in place."""
    for layer in decoder_layers:
        layer.mlp = ModalityRouted(layer.mlp, copy.deepcopy(layer.mlp), router)
        if attention:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, ModalityRouted(proj, copy.deepcopy(proj), router))
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, name)
                setattr(layer, name, ModalityRouted(norm, copy.deepcopy(norm), router))


def visual_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".visual." in n]
