"""Residual vector quantisation with EMA codebooks (DualToken's RVQ; depth 1 = plain VQ).

Choices that matter:
- nearest code by `||x||² - 2 x·Cᵀ + ||c||²` as one matmul against cached code norms; the
  EMA statistics use `index_add_`/`bincount`, never a one-hot (N, K) tensor;
- EMA updates with Laplace smoothing of the cluster sizes (VQ-VAE-2), so rarely used codes
  do not divide by ~0;
- dead-code restart: a code whose EMA usage falls below `dead_threshold` x the mean usage is replaced by a
  random vector of the current batch (at that depth's residual), so codebook usage stays high;
- optional k-means initialisation from the first batch;
- commitment loss `||x - sg(q)||²` per depth; the straight-through estimator passes gradients;
- after training, `merge_duplicates` retires codes that sit closer to another code than the features sit to
  their own codes: k-means spends spare codes splitting the largest cluster (a flat background) along
  its pixel noise, so one surface would otherwise be written with several interchangeable codes.
Codebooks are buffers, not parameters: the optimiser never touches them. A retired code keeps its vector
(anything that names it still decodes) but is never chosen again (`active`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import RVQConfig


class ResidualVQ(nn.Module):
    def __init__(self, cfg: RVQConfig):
        super().__init__()
        self.cfg = cfg
        D, K, C = cfg.depth, cfg.codebook_size, cfg.dim
        self.register_buffer("codebooks", torch.randn(D, K, C) * 0.1)
        self.register_buffer("ema_size", torch.ones(D, K))
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        self.register_buffer("restarts", torch.zeros(D, dtype=torch.long))
        self.register_buffer("active", torch.ones(D, K, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # tokenizers saved before `active` existed chose among all their codes
        state_dict.setdefault(prefix + "active", torch.ones_like(self.active))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ search

    @staticmethod
    def nearest(x: torch.Tensor, codebook: torch.Tensor, code_norms: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C), codebook (K, C) -> indices (N,) int64, by one matmul."""
        if code_norms is None:
            code_norms = (codebook * codebook).sum(-1)
        # ||x||² is the same for every code of a row: argmin needs only ||c||² - 2 x·c
        scores = torch.addmm(code_norms[None, :], x, codebook.t(), beta=1.0, alpha=-2.0)  # (N, K)
        return scores.argmin(dim=-1)

    # ------------------------------------------------------------------ training-time updates

    @torch.no_grad()
    def _kmeans(self, x: torch.Tensor, K: int) -> torch.Tensor:
        n = x.shape[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        idx = torch.randint(n, (K,), generator=g).to(x.device)
        centers = x[idx].clone()
        for _ in range(self.cfg.kmeans_iters):
            assign = self.nearest(x, centers)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=K).to(x.dtype)
            filled = counts > 0
            centers[filled] = sums[filled] / counts[filled, None]
        return centers

    @torch.no_grad()
    def _ema_update(self, depth: int, x: torch.Tensor, idx: torch.Tensor) -> None:
        cfg = self.cfg
        K = cfg.codebook_size
        counts = torch.bincount(idx, minlength=K).to(x.dtype)
        sums = torch.zeros(K, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, idx, x)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank sees the global batch statistics; DDP then broadcasts rank 0's buffers
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_size[depth].mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.ema_sum[depth].mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        n = self.ema_size[depth].sum()
        smoothed = (self.ema_size[depth] + cfg.eps) / (n + K * cfg.eps) * n  # Laplace smoothing
        self.codebooks[depth].copy_(self.ema_sum[depth] / smoothed[:, None])
        dead = self.ema_size[depth] < cfg.dead_threshold * self.ema_size[depth].mean()
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(x.shape[0], (n_dead,), device=x.device)
            fresh = x[pick]
            self.codebooks[depth][dead] = fresh
            self.ema_sum[depth][dead] = fresh
            self.ema_size[depth][dead] = 1.0
            self.restarts[depth] += n_dead

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """x (..., C) -> (quantized (..., C) with straight-through gradients, codes (..., D) int64,
        {"commitment": scalar, "residual_norms": (D + 1,) mean squared residual before each depth and after the last})."""
        cfg = self.cfg
        shape = x.shape
        flat = x.reshape(-1, cfg.dim).float()
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                residual = flat.detach()
                for d in range(cfg.depth):
                    centers = self._kmeans(residual, cfg.codebook_size)
                    self.codebooks[d].copy_(centers)
                    self.ema_sum[d].copy_(centers)
                    residual = residual - centers[self.nearest(residual, centers)]
                self.initialized.fill_(True)
        residual = flat
        quantized = torch.zeros_like(flat)
        # inference (eval, no grad) needs only the codes: skip the loss and diagnostics
        stats = self.training or torch.is_grad_enabled()
        # depth d's norms stay valid until depth d's own EMA update, which comes after its search
        code_norms = self.codebooks.pow(2).sum(-1).masked_fill(~self.active, float("inf"))  # (D, K); retired never win
        codes, commit, norms = [], flat.new_zeros(()), [flat.detach().pow(2).sum(-1).mean()] if stats else []
        for d in range(cfg.depth):
            cb = self.codebooks[d]
            idx = self.nearest(residual.detach(), cb, code_norms[d])
            q = cb[idx]
            if stats:
                commit = commit + F.mse_loss(residual, q.detach())
            if self.training:
                self._ema_update(d, residual.detach(), idx)
            quantized = quantized + q
            residual = residual - q.detach()
            codes.append(idx)
            if stats:
                norms.append(residual.detach().pow(2).sum(-1).mean())
        out = flat + (quantized - flat).detach()  # straight-through
        codes_t = torch.stack(codes, dim=-1).reshape(*shape[:-1], cfg.depth)
        info = {"commitment": commit / cfg.depth, "residual_norms": torch.stack(norms) if norms else flat.new_zeros(0)}
        return out.reshape(shape).to(x.dtype), codes_t, info

    @torch.no_grad()
    def merge_duplicates(self, features: torch.Tensor, tolerance: float) -> list[dict]:
        """Retire near-duplicate codes, depth by depth, on features (N, C) the encoder wrote for training images.

        At each depth the scale is the RMS distance from a feature (its residual) to its code. While the two
        closest used codes lie within `tolerance` x that scale, the less used is retired and the other moves to
        their usage-weighted mean (centroid agglomeration). Returns per depth {"scale", "retired", "active"}.
        The last step of training: the EMA statistics are left as they were, and retired codes stay retired."""
        if self.training:
            raise RuntimeError("merge_duplicates runs on a trained quantizer in eval mode")
        residual = features.reshape(-1, self.cfg.dim).float()
        report = []
        for d in range(self.cfg.depth):
            cb, active = self.codebooks[d], self.active[d]
            code_norms = cb.pow(2).sum(-1).masked_fill(~active, float("inf"))
            idx = self.nearest(residual, cb, code_norms)
            scale = float((residual - cb[idx]).pow(2).sum(-1).mean().sqrt())
            weight = torch.bincount(idx, minlength=self.cfg.codebook_size).to(cb.dtype)
            used = (weight > 0).nonzero().flatten()
            # pairwise distances among the used codes, computed once; a merge updates the kept code's row
            # and column and closes the retired one's
            dist = torch.cdist(cb[used], cb[used])
            dist.fill_diagonal_(float("inf"))
            retired = 0
            while True:
                i, j = divmod(int(dist.argmin()), len(used))
                if float(dist[i, j]) >= tolerance * scale:  # also when no pair is left (all inf)
                    break
                a, b = int(used[i]), int(used[j])
                (keep, k), (drop, r) = ((a, i), (b, j)) if (float(weight[a]), -a) >= (float(weight[b]), -b) else ((b, j), (a, i))  # ties: the lower index stays
                cb[keep] = (weight[keep] * cb[keep] + weight[drop] * cb[drop]) / (weight[keep] + weight[drop])
                weight[keep] += weight[drop]
                active[drop] = False
                retired += 1
                dist[r, :] = dist[:, r] = float("inf")
                row = torch.cdist(cb[keep][None], cb[used])[0].masked_fill(~active[used], float("inf"))
                row[k] = float("inf")
                dist[k, :] = dist[:, k] = row
            code_norms = cb.pow(2).sum(-1).masked_fill(~active, float("inf"))
            residual = residual - cb[self.nearest(residual, cb, code_norms)]
            report.append({"scale": round(scale, 6), "retired": retired, "active": int(active.sum())})
        return report

    @torch.no_grad()
    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) int -> summed code vectors (..., C)."""
        out = torch.zeros(*codes.shape[:-1], self.cfg.dim, device=codes.device)
        for d in range(codes.shape[-1]):
            out = out + self.codebooks[d][codes[..., d]]
        return out

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> dict:
        """Fraction of codes used and perplexity per depth for a batch of codes (..., D)."""
        flat = codes.reshape(-1, codes.shape[-1])
        used, ppl = [], []
        for d in range(flat.shape[1]):
            counts = torch.bincount(flat[:, d], minlength=self.cfg.codebook_size).float()
            p = counts / counts.sum()
            used.append(float((counts > 0).float().mean()))
            ppl.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
        return {"usage": used, "perplexity": ppl}
