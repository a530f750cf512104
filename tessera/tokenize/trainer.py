"""Tokenizer training without Ray: the optimiser state, one step, the loop, and held-out metrics.

`TokenizerTrainer.train_step(images)` is one step; its `state_dict()`/`load_state_dict()`
carry model, discriminator, both optimisers, EMA codebooks (buffers of the model) and the step.
`ImageStream` hands out a rank's image batches epoch after epoch and owns the data position
(epoch, batch). `TokenizerLoop` steps the trainer over the stream (the `tessera.loop` contract),
so a resumed run continues with the same weights *and* the same next batch.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import TokenizerConfig
from tessera.loop import LoopStep, TrainerStreamLoop, read_position, write_position
from tessera.tokenize.losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, lpips_model, reconstruction_loss


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class TokenizerTrainer:
    def __init__(self, model: nn.Module, cfg: TokenizerConfig, device: torch.device, discriminator: nn.Module | None = None):
        self.model = model
        self.cfg = cfg
        self.device = device
        lc = cfg.losses
        self.disc = discriminator if discriminator is not None else PatchDiscriminator(lc.disc_channels, lc.disc_layers).to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=(0.9, 0.99), weight_decay=cfg.train.weight_decay)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.train.disc_lr, betas=(0.5, 0.9))
        self.step = 0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def train_step(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) in [-1, 1] -> metrics."""
        cfg, lc = self.cfg, self.cfg.losses
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps)
        self.model.train()
        with self.autocast():
            out = self.model(images)
            rec = out["reconstruction"].float()
            rec_loss, parts = reconstruction_loss(images, rec, lc)
            loss = rec_loss + lc.commitment_weight * out["losses"]["commitment"]
            if "semantic_mse" in out["losses"]:
                loss = loss + lc.semantic_mse_weight * out["losses"]["semantic_mse"] + lc.semantic_cos_weight * out["losses"]["semantic_cos"]
            gan_on = self.step >= lc.disc_start
            metrics = {f"loss_{k}": float(v.detach()) for k, v in {**parts, **out["losses"]}.items()}
            if gan_on:
                g_loss = -self.disc(rec).mean()
                weight = adaptive_gan_weight(rec_loss, g_loss, unwrap(self.model).last_layer, lc)
                loss = loss + weight * g_loss
                metrics.update(loss_gan=float(g_loss.detach()), gan_weight=float(weight))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        if gan_on:
            with self.autocast():
                d_loss = hinge_d_loss(self.disc(images), self.disc(rec.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            metrics["loss_disc"] = float(d_loss.detach())
        self.step += 1
        metrics.update(loss=float(loss.detach()), step=self.step, lr=self.opt.param_groups[0]["lr"])
        return metrics

    def state_dict(self) -> dict:
        return {"model": unwrap(self.model).state_dict(), "disc": unwrap(self.disc).state_dict(),
                "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        unwrap(self.disc).load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = int(state["step"])


class ImageStream:
    """A rank's image batches, epoch after epoch; `state_dict()` is the data position
    {"next": [epoch, batch]} (the next batch not handed out). `batches(epoch)` -> an iterable of
    (B, 3, H, W) tensors in a fixed order per epoch (a Ray dataset shard, a list in tests)."""

    def __init__(self, batches: Callable[[int], Iterable[torch.Tensor]]):
        self.batches = batches
        self.position: tuple[int, int] = (0, 0)

    def state_dict(self) -> dict:
        return {"next": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = (int(state["next"][0]), int(state["next"][1]))

    def __iter__(self):
        epoch, skip = self.position
        while True:
            seen = 0
            for k, images in enumerate(self.batches(epoch)):
                seen += 1
                if k < skip:
                    continue
                self.position = (epoch, k + 1)
                yield images
            if seen == 0:
                raise RuntimeError("the image dataset has no full batch for this worker; lower tokenizer.train.batch_size")
            epoch, skip = epoch + 1, 0
            self.position = (epoch, 0)


class TokenizerLoop(TrainerStreamLoop):
    """`steps` optimizer steps of a `TokenizerTrainer` over an `ImageStream` (see `tessera.loop`)."""

    def __init__(self, trainer: TokenizerTrainer, stream: ImageStream, steps: int, *, log_every: int = 25,
                 checkpoint_every: int = 200, images_per_step: int = 1):
        self.trainer, self.stream, self.steps = trainer, stream, steps
        self.log_every, self.checkpoint_every, self.images_per_step = log_every, checkpoint_every, images_per_step

    def save_checkpoint(self, directory: str, rank: int) -> None:
        """Rank 0 writes the trainer's `state.pt` (DDP: the same on every rank); every rank its data position."""
        if rank == 0:
            torch.save(self.trainer.state_dict(), os.path.join(directory, "state.pt"))
        write_position(directory, rank, self.stream.state_dict(), self.trainer.step)

    def load_checkpoint(self, directory: str, rank: int) -> None:
        self.trainer.load_state_dict(torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=False))
        self.stream.load_state_dict(read_position(directory, rank))

    def __iter__(self):
        if self.trainer.step >= self.steps:
            return
        t0, start = time.perf_counter(), self.trainer.step
        for images in self.stream:
            m = self.trainer.train_step(images.to(self.trainer.device))
            step = self.trainer.step
            save = step % self.checkpoint_every == 0 or step == self.steps
            metrics = None
            if step % self.log_every == 0 or save:
                rate = (step - start) * self.images_per_step / max(time.perf_counter() - t0, 1e-9)
                metrics = {**m, "images_per_s": round(rate, 2)}
            yield LoopStep(step, metrics, save)
            if step >= self.steps:
                return


# ----------------------------------------------------------------------------- metrics


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, images in [-1, 1] mapped to [0, 1]. (B,)"""
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM per image (gaussian window, images in [-1, 1] mapped to [0, 1]). (B,)"""
    x, y = (x + 1) / 2, (y + 1) / 2
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())[:, None] @ (g / g.sum())[None, :]
    kernel = g.expand(x.shape[1], 1, window, window)
    conv = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Held-out reconstruction quality and codebook statistics. images (N, 3, H, W) in [-1, 1]."""
    model = unwrap(model).eval()
    psnrs, ssims, lp, codes_all = [], [], [], {}
    lpips = lpips_model().to(images.device)
    recs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        codes = model.encode(x)
        rec = model.decode(codes["pixel"])
        recs.append(rec)
        psnrs.append(psnr(x, rec))
        ssims.append(ssim(x, rec))
        lp.append(lpips(rec.float(), x.float()).flatten())
        for k, v in codes.items():
            codes_all.setdefault(k, []).append(v)
    out = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()), "lpips": float(torch.cat(lp).mean())}
    for name, parts in codes_all.items():
        quantizer = model.quantizer if name == "pixel" and hasattr(model, "quantizer") else getattr(model, f"{name}_quantizer")
        stats = quantizer.usage(torch.cat(parts))
        out[f"{name}_usage"] = stats["usage"]
        out[f"{name}_perplexity"] = stats["perplexity"]
        out[f"{name}_restarts"] = quantizer.restarts.tolist()
    if "pixel" in codes_all:
        out["pixel_codes_per_image"], out["pixel_top_code_share"] = code_spread(torch.cat(codes_all["pixel"])[..., 0])
    return out | {"reconstructions": torch.cat(recs)}


def code_spread(grids: torch.Tensor) -> tuple[float, float]:
    """First-depth code grids (N, h, w) -> (distinct codes an image, the share of its grid the commonest code
    takes), means over the images: a background split over several codes leaves BPE less to merge."""
    counts = [torch.unique(g, return_counts=True)[1] for g in grids.flatten(1)]
    return float(np.mean([len(c) for c in counts])), float(np.mean([int(c.max()) / c.sum().item() for c in counts]))
