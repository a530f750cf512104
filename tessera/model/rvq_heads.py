"""The `rvq` visual interface (DualToken / Kelix): one sequence position per grid cell.

Input: a cell's embedding is, per codebook, the sum over RVQ depths of that depth's code
embedding; the codebooks' sums are concatenated and projected to the model width.

Output: per codebook a small depth transformer predicts the cell's codes from the LLM hidden
state, autoregressively over depth: step 0 sees the hidden state, step d also the embedding
of the code chosen at depth d-1; a classifier per depth gives the logits. Loss: cross-entropy
per depth (mean over depths and codebooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CodeEmbedding(nn.Module):
    """codes (N, C, D) -> (N, hidden). Separate tables per codebook and depth."""

    def __init__(self, codebook_sizes: list[int], depth: int, embed_dim: int, hidden_size: int):
        super().__init__()
        self.depth = depth
        self.tables = nn.ModuleList(nn.Embedding(depth * k, embed_dim) for k in codebook_sizes)
        self.sizes = list(codebook_sizes)
        self.proj = nn.Linear(embed_dim * len(codebook_sizes), hidden_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.depth, device=codes.device)
        parts = [table(codes[:, c] + offsets * k).sum(dim=1) for c, (table, k) in enumerate(zip(self.tables, self.sizes))]
        return self.proj(torch.cat(parts, dim=-1))


class DepthHead(nn.Module):
    """One codebook's depth transformer. hidden (N, H) [+ codes (N, D) for teacher forcing] -> logits (N, D, K)."""

    def __init__(self, hidden_size: int, codebook_size: int, depth: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.depth, self.codebook_size = depth, codebook_size
        self.inp = nn.Linear(hidden_size, dim)
        self.code_embed = nn.Embedding(depth * codebook_size, dim)
        self.pos = nn.Parameter(torch.zeros(depth, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifiers = nn.ModuleList(nn.Linear(dim, codebook_size) for _ in range(depth))
        causal = torch.triu(torch.ones(depth, depth, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def _inputs(self, hidden: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """hidden (N, H), prev_codes (N, d) codes of depths < d -> inputs (N, d+1, dim)."""
        x = self.inp(hidden).unsqueeze(1).expand(-1, prev_codes.shape[1] + 1, -1)
        if prev_codes.shape[1]:
            offsets = torch.arange(prev_codes.shape[1], device=hidden.device) * self.codebook_size
            shifted = torch.cat([torch.zeros_like(x[:, :1]), self.code_embed(prev_codes + offsets)], dim=1)
            x = x + shifted
        return x + self.pos[: x.shape[1]]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        return self.norm(self.blocks(x, mask=self.causal[:n, :n], is_causal=True))

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (N, D, K) for every depth at once."""
        h = self._run(self._inputs(hidden, codes[:, :-1]))
        return torch.stack([clf(h[:, d]) for d, clf in enumerate(self.classifiers)], dim=1)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, uncond: torch.Tensor | None = None, scale: float = 1.0, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """hidden (N, H) -> codes (N, D), depth by depth (every code is a valid code: constrained by
        construction). With `uncond` (N, H), each depth's logits are guided: u + scale * (c - u)."""
        n = hidden.shape[0]
        x = hidden if uncond is None else torch.cat([hidden, uncond])
        x = x.to(self.inp.weight.dtype)
        codes = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
        for d in range(self.depth):
            h = self._run(self._inputs(x, codes))
            logits = self.classifiers[d](h[:, d]).float()
            if uncond is not None:
                logits = guided(logits[:n], logits[n:], scale)
            code = pick(logits, temperature, top_k, generator)
            codes = torch.cat([codes, (code if uncond is None else code.repeat(2)).unsqueeze(1)], dim=1)
        return codes[:n]


PLAUSIBLE = 0.1
"""Guidance keeps the tokens whose conditional probability is at least this share of the most likely one's."""


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, alpha: float = PLAUSIBLE) -> torch.Tensor:
    """Classifier-free guidance `uncond + scale * (cond - uncond)` over the conditional's plausible tokens:
    those with p_cond >= alpha * max p_cond (the adaptive plausibility constraint of contrastive decoding,
    Li et al. 2023); the rest -inf. Without it, a token both branches rule out, the unconditional one more
    firmly, gets the largest guided logit: (..., V) -> (..., V)."""
    plausible = cond >= cond.max(dim=-1, keepdim=True).values + math.log(alpha)
    return (uncond + scale * (cond - uncond)).masked_fill(~plausible, float("-inf"))


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else sampling (optionally from the top k). logits (N, V) -> (N,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    # a seeded stream lives on its own device (the evaluator's is a CPU generator): draw there, so one seed gives
    # one sequence of draws on any device (torch.multinomial refuses a generator on another device)
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(logits.device)


def depth_loss(logits: torch.Tensor, codes: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the codes at every depth. logits (N, D, K), codes (N, D) -> the mean over cells
    and depths, or (N, D) with `reduction="none"`."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1), reduction=reduction)
    return ce if reduction == "mean" else ce.view_as(codes)
