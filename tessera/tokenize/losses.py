"""Reconstruction losses of the pixel branch: L1/L2 + LPIPS + PatchGAN hinge with an adaptive weight.

The adversarial weight follows VQGAN/DualToken: `λ = ||∇_L rec|| / (||∇_L gan|| + 1e-4)` at the
decoder's last layer L, clamped to [min, max] and scaled (DualToken: [0.3, 10] × 0.75); the
discriminator only starts after `disc_start` steps, so early training is not dominated by it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import LossConfig


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix/VQGAN): strided convs -> a map of real/fake logits."""

    def __init__(self, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> logits (B, 1, H', W')."""
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return w.clamp(cfg.gan_weight_min, cfg.gan_weight_max).detach() * cfg.gan_weight


_LPIPS = None


def lpips_model() -> nn.Module:
    """LPIPS(AlexNet). Offline the backbone is random (`pnet_rand`) with the shipped linear
    layers; with a torchvision weight cache it is the real pretrained AlexNet."""
    global _LPIPS
    if _LPIPS is None:
        import glob
        import os
        import warnings

        import lpips

        cached = glob.glob(os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-*.pth"))
        # the random backbone is drawn from a fixed seed, not the caller's RNG: the same perceptual loss
        # in every process (each Ray Train rank) and whatever ran before (test order changed it)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips builds AlexNet with torchvision's deprecated `pretrained=` arguments (not ours to change)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            torch.manual_seed(0)
            _LPIPS = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=not cached, verbose=False)
        _LPIPS.eval()
        for p in _LPIPS.parameters():
            p.requires_grad_(False)
    return _LPIPS


def reconstruction_loss(x: torch.Tensor, rec: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """x, rec (B, 3, H, W) in [-1, 1] -> (weighted sum, named parts)."""
    parts = {}
    total = x.new_zeros(())
    if cfg.l1_weight:
        parts["l1"] = F.l1_loss(rec, x)
        total = total + cfg.l1_weight * parts["l1"]
    if cfg.l2_weight:
        parts["l2"] = F.mse_loss(rec, x)
        total = total + cfg.l2_weight * parts["l2"]
    if cfg.lpips_weight:
        net = lpips_model().to(x.device)
        parts["lpips"] = net(rec.float(), x.float()).mean()
        total = total + cfg.lpips_weight * parts["lpips"]
    return total, parts
