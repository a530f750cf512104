"""`TesseraModel`: a Hugging Face causal LM with an extended vocabulary and a visual interface.

    lm            Qwen2ForCausalLM (tiny from config, or `from_pretrained`), vocabulary extended
                  by `Vocabulary.num_new` rows; the text rows stay bit-identical
    router        MoT routing state (when `mot`): visual positions use the visual experts
    code_embed    rvq interface: codes (N, C, D) -> input embedding (N, hidden)
    depth_heads   rvq interface: one DepthHead per codebook

    grid_rows,    visual_positions `2d`: learned embeddings of a visual token's anchor row and
    grid_cols     column, added to its input embedding

Inputs are packed rows (see `tessera.model.packing`): `input_ids`, `position_ids`, `doc_ids`
and `turn_ids` (B, L), `cells` (B, L, 2); `codes` (B, L, C, D) at `<|cell|>` positions for the
rvq interface. A 4-D boolean mask built from `doc_ids` and `turn_ids` keeps attention inside each
document and each independent turn (plus its shared prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import ModelConfig
from tessera.model.mot import Router, apply_mot
from tessera.model.rvq_heads import CodeEmbedding, DepthHead, depth_loss
from tessera.model.vocab import Vocabulary

IGNORE = -100


def build_base_lm(cfg: ModelConfig, text_size: int, seed: int = 0):
    """The base causal LM: `from_pretrained(cfg.pretrained)`, or a tiny Qwen2 from the config fields."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation="sdpa", torch_dtype=torch.float32)
    config = Qwen2Config(
        vocab_size=text_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def extend_vocabulary(lm, new_size: int, init: str, noise: float, seed: int = 0) -> int:
    """Grow input and output embeddings to `new_size` rows. Old rows are copied bit-exactly; new
    rows are `mean` of the old rows plus N(0, noise) or `he` (N(0, 2/hidden)). Returns the old size."""
    emb = lm.get_input_embeddings()
    old = emb.weight.shape[0]
    if new_size <= old:
        raise ValueError(f"extended vocabulary ({new_size}) must be larger than the base model's ({old})")
    gen = torch.Generator().manual_seed(seed)

    def grow(weight: torch.Tensor) -> torch.Tensor:
        n, d = new_size - old, weight.shape[1]
        if init == "mean":
            rows = weight.detach().float().mean(0, keepdim=True) + noise * torch.randn(n, d, generator=gen)
        else:
            rows = torch.randn(n, d, generator=gen) * math.sqrt(2.0 / d)
        return torch.cat([weight.detach(), rows.to(weight.dtype)], dim=0)

    tied = lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is emb.weight
    new_in = nn.Embedding(new_size, emb.weight.shape[1], dtype=emb.weight.dtype)
    new_in.weight.data.copy_(grow(emb.weight))
    lm.set_input_embeddings(new_in)
    out = lm.get_output_embeddings()
    if tied:
        out.weight = new_in.weight
    else:
        new_out = nn.Linear(out.in_features, new_size, bias=out.bias is not None, dtype=out.weight.dtype)
        new_out.weight.data.copy_(grow(out.weight))
        if out.bias is not None:
            new_out.bias.data.copy_(torch.cat([out.bias.detach(), out.bias.detach().new_zeros(new_size - old)]))
        lm.set_output_embeddings(new_out)
    lm.config.vocab_size = new_size
    return old


def packed_attention_mask(doc_ids: torch.Tensor, turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """doc_ids, turn_ids (B, L) -> (B, 1, L, L) bool, True where query i may attend key j: same
    document, j <= i, and key j in the shared prefix (turn 0) or in i's own turn."""
    L = doc_ids.shape[1]
    allowed = doc_ids[:, :, None] == doc_ids[:, None, :]
    allowed &= torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    if turn_ids is not None:
        allowed &= (turn_ids[:, None, :] == 0) | (turn_ids[:, :, None] == turn_ids[:, None, :])
    return allowed.unsqueeze(1)


class TesseraModel(nn.Module):
    def __init__(self, lm, vocab: Vocabulary, cfg: ModelConfig, codebook_sizes: list[int] | None = None, depth: int = 1):
        super().__init__()
        self.lm, self.vocab, self.cfg = lm, vocab, cfg
        self.router = Router()
        if cfg.mot:
            apply_mot(lm.model.layers, self.router, attention=cfg.mot_attention)
        self.codebook_sizes = list(codebook_sizes or [])
        self.depth = depth
        if vocab.interface == "rvq":
            if not self.codebook_sizes:
                raise ValueError("the rvq interface needs the tokenizer's codebook sizes")
            hidden, dh = lm.config.hidden_size, cfg.depth_head
            self.code_embed = CodeEmbedding(self.codebook_sizes, depth, dh.dim, hidden)
            self.depth_heads = nn.ModuleList(DepthHead(hidden, k, depth, dh.dim, dh.layers, dh.heads) for k in self.codebook_sizes)
        if cfg.visual_positions == "2d":
            hidden = lm.config.hidden_size
            self.grid_rows = nn.Embedding(cfg.max_grid, hidden)
            self.grid_cols = nn.Embedding(cfg.max_grid, hidden)
            for emb in (self.grid_rows, self.grid_cols):
                nn.init.normal_(emb.weight, std=0.02)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, cfg: ModelConfig, vocab: Vocabulary, codebook_sizes: list[int] | None = None, depth: int = 1,
               seed: int = 0) -> "TesseraModel":
        """Base LM (text rows only) -> extended vocabulary -> visual interface (and MoT experts)."""
        lm = build_base_lm(cfg, vocab.text_size, seed)
        if lm.get_input_embeddings().weight.shape[0] != vocab.text_size:
            raise ValueError(f"the base model has {lm.get_input_embeddings().weight.shape[0]} embedding rows but the "
                             f"vocabulary expects {vocab.text_size} text ids; build the Vocabulary from the model")
        extend_vocabulary(lm, vocab.size, cfg.init, cfg.init_noise, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            return cls(lm, vocab, cfg, codebook_sizes, depth)

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, codes: torch.Tensor | None, cells: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids [+ (B, L, C, D) codes] [+ (B, L, 2) anchor cells, -1 = none] -> (B, L, hidden)."""
        if int(input_ids.max()) >= self.vocab.size or int(input_ids.min()) < 0:
            bad = input_ids[(input_ids >= self.vocab.size) | (input_ids < 0)][0]
            raise ValueError(f"token id {int(bad)} outside the vocabulary of {self.vocab.size} ids")
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.vocab.interface == "rvq" and codes is not None:
            at_cell = input_ids == self.vocab.cell
            if bool(at_cell.any()):
                embeds = embeds.clone()
                embeds[at_cell] = self.code_embed(codes[at_cell]).to(embeds.dtype)
        if cells is not None and hasattr(self, "grid_rows"):
            placed = (cells[..., 0] >= 0).unsqueeze(-1)
            rc = cells.clamp(min=0, max=self.cfg.max_grid - 1)
            embeds = embeds + placed * (self.grid_rows(rc[..., 0]) + self.grid_cols(rc[..., 1])).to(embeds.dtype)
        return embeds

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids >= self.vocab.visual_base) | (input_ids == self.vocab.cell)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, turn_ids: torch.Tensor | None = None,
                cells: torch.Tensor | None = None):
        """-> (hidden (B, L, H), logits (B, L, V), past_key_values)."""
        embeds = self.embed(input_ids, codes, cells)
        if attention_mask is None and doc_ids is not None:
            attention_mask = packed_attention_mask(doc_ids, turn_ids)
        self.router.visual_mask = self.visual_mask(input_ids) if self.cfg.mot else None
        try:
            out = self.lm.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                                past_key_values=past_key_values, use_cache=use_cache)
        finally:
            self.router.visual_mask = None
        hidden = out.last_hidden_state
        return hidden, self.lm.lm_head(hidden), out.past_key_values

    def loss(self, batch: dict) -> dict:
        """Mean loss over targets, plus the text and image parts (for logging).

        batch: input_ids, position_ids, doc_ids, targets (B, L) [-100 = no loss]; rvq also
        codes and target_codes (B, L, C, D). Each rvq cell target adds its depth loss."""
        hidden, logits, _ = self(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes"),
                                 turn_ids=batch.get("turn_ids"), cells=batch.get("cells"))
        targets = batch["targets"]
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1)
        ce = F.cross_entropy(logits[valid].float(), targets[valid], reduction="none")
        is_text = targets[valid] < self.vocab.text_size
        total = ce.sum()
        image_sum = ce[~is_text].sum()
        if self.vocab.interface == "rvq":
            cell_targets = valid & (targets == self.vocab.cell)
            if bool(cell_targets.any()):
                h, tc = hidden[cell_targets], batch["target_codes"][cell_targets]  # (N, H), (N, C, D)
                d_loss = sum(depth_loss(head(h, tc[:, c]), tc[:, c]) for c, head in enumerate(self.depth_heads))
                d_sum = d_loss / len(self.depth_heads) * cell_targets.sum()
                total = total + d_sum
                image_sum = image_sum + d_sum
        n_text = is_text.sum()
        return {
            "loss": total / n,
            "text_loss": (ce[is_text].sum() / n_text.clamp(min=1)).detach(),
            "image_loss": (image_sum / (~is_text).sum().clamp(min=1)).detach(),
            "targets": n.detach(), "text_targets": n_text.detach(),
        }

    # ------------------------------------------------------------------ parameter groups

    def new_embedding_rows(self) -> slice:
        return slice(self.vocab.text_size, self.vocab.size)

    def decoder_layers(self) -> nn.ModuleList:
        return self.lm.model.layers
