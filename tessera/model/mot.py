"""Mixture-of-Transformers (BAGEL): modality experts that share self-attention.

`MoTDecoderLayer` is a `Qwen2DecoderLayer` (as `modular_qwen2.py` subclasses Llama's layers)
with a visual expert beside each position-wise part: the FFN (`visual_mlp`) and, with
`attention=True`, the q/k/v/o projections (`MoTAttention`) and both norms. The text expert keeps
the base layer's own module names, so its weights are the base model's; the visual expert starts
as an exact copy. Attention itself runs over the whole sequence, so text and visual positions
still see each other.

Which positions are visual arrives as the `visual_mask` keyword (B, L) bool, which
`Qwen2Model.forward` passes to every decoder layer with its other keyword arguments: no shared
mutable state. Both experts run on every position and `torch.where` keeps each position's own
(twice the expert FLOPs of an index-and-scatter, but no data-dependent shapes, so no host
synchronisation in the training step and one graph for `torch.compile`).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (
    ALL_ATTENTION_FUNCTIONS,
    Qwen2Attention,
    Qwen2DecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# The KV cache's keyword: transformers 5.24 renamed `past_key_values` to `cache` in Qwen2's forwards (the old
# name is renamed back with a warning until 5.40). Decoder layers receive it under the installed name, and a
# layer that looked only for the other would run without its cache: pass and take whichever is installed.
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2DecoderLayer.forward).parameters else "past_key_values"


def pop_cache(kwargs: dict):
    """The KV cache from a forward's keyword arguments, under either name (removed from `kwargs`)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def routed(text: nn.Module, visual: nn.Module, x: torch.Tensor, visual_mask: torch.Tensor | None) -> torch.Tensor:
    """text(x) at text positions, visual(x) at visual positions. x (B, L, D), visual_mask (B, L) bool | None."""
    if visual_mask is None:
        return text(x)
    return torch.where(visual_mask.unsqueeze(-1), visual(x).to(x.dtype), text(x))


class MoTAttention(Qwen2Attention):
    """Qwen2 attention whose q/k/v/o projections have a visual expert (`visual_q_proj`, ...)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        for name in PROJECTIONS:
            setattr(self, f"visual_{name}", copy.deepcopy(getattr(self, name)))

    def forward(self, hidden_states, position_embeddings, attention_mask, visual_mask=None, **kwargs):
        cache = pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        def project(name, x):
            return routed(getattr(self, name), getattr(self, f"visual_{name}"), x, visual_mask)

        query_states = project("q_proj", hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = project("k_proj", hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = project("v_proj", hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return project("o_proj", attn_output), attn_weights


class MoTDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer with a visual FFN expert (and, with `attention`, visual attention
    projections and norms). forward(..., visual_mask=(B, L) bool) -> hidden states (B, L, D)."""

    def __init__(self, config, layer_idx: int, attention: bool = False):
        super().__init__(config, layer_idx)
        self.mot_attention = attention
        if attention:
            self.self_attn = MoTAttention(config, layer_idx)
            self.visual_input_layernorm = copy.deepcopy(self.input_layernorm)
            self.visual_post_attention_layernorm = copy.deepcopy(self.post_attention_layernorm)
        self.visual_mlp = copy.deepcopy(self.mlp)

    @classmethod
    def from_layer(cls, layer: Qwen2DecoderLayer, config, layer_idx: int, attention: bool = False) -> "MoTDecoderLayer":
        """The base layer's weights as the text expert, and an exact copy of them as the visual expert."""
        new = cls(config, layer_idx, attention).to(next(layer.parameters()).dtype)
        missing, unexpected = new.load_state_dict(layer.state_dict(), strict=False)
        assert not unexpected and all(".visual_" in f".{k}" for k in missing), (missing, unexpected)
        new.copy_text_to_visual()
        return new

    @torch.no_grad()
    def copy_text_to_visual(self) -> None:
        pairs = [(self.mlp, self.visual_mlp)]
        if self.mot_attention:
            pairs += [(self.input_layernorm, self.visual_input_layernorm),
                      (self.post_attention_layernorm, self.visual_post_attention_layernorm)]
            pairs += [(getattr(self.self_attn, n), getattr(self.self_attn, f"visual_{n}")) for n in PROJECTIONS]
        for text, visual in pairs:
            visual.load_state_dict(text.state_dict())

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, visual_mask=None, **kwargs):
        kwargs[CACHE_ARG] = pop_cache(kwargs)  # the name the installed Qwen2Attention takes
        both = self.mot_attention
        residual = hidden_states
        if both:
            hidden_states = routed(self.input_layernorm, self.visual_input_layernorm, hidden_states, visual_mask)
            kwargs["visual_mask"] = visual_mask
        else:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                          use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        if both:
            hidden_states = routed(self.post_attention_layernorm, self.visual_post_attention_layernorm, hidden_states, visual_mask)
        else:
            hidden_states = self.post_attention_layernorm(hidden_states)
        return residual + routed(self.mlp, self.visual_mlp, hidden_states, visual_mask)


def apply_mot(lm, attention: bool = False) -> None:
    """Replace every decoder layer of a Qwen2-architecture causal LM by its `MoTDecoderLayer`, in place."""
    layers = lm.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, Qwen2DecoderLayer):
            raise ValueError(f"MoT needs Qwen2-style decoder layers; layer {i} is {type(layer).__name__}")
        layers[i] = MoTDecoderLayer.from_layer(layer, lm.config, i, attention)


def is_visual_expert(name: str) -> bool:
    return ".visual_" in f".{name}"


def visual_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_visual_expert(n)]
