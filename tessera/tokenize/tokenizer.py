"""Build, save and load a visual tokenizer (`vq`, `dual` or `oracle` preset) as a directory:
`model.safetensors` + `config.json` (preset, the tokenizer config, content hash).

API of a loaded tokenizer (`VQTokenizer` / `DualTokenizer`):
    encode(images (B, 3, H, W) in [-1, 1]) -> {"pixel": (B, h, w, D) int64[, "semantic": ...]}
    decode(pixel codes (B, h, w, D)) -> images (B, 3, H, W) in [-1, 1]
    encode(images, features=True) -> also {"features": (B, h, w, dim)} pre-quantisation (`vq` preset only)
Deterministic given the weights (eval mode: no EMA updates, no restarts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
import torch.nn as nn

from tessera.config import TokenizerConfig, config_from_dict


def build_tokenizer(cfg: TokenizerConfig, encoder: nn.Module | None = None) -> nn.Module:
    if cfg.preset == "vq":
        from tessera.tokenize.vq import VQTokenizer

        return VQTokenizer(cfg.vq)
    if cfg.preset == "oracle":
        from tessera.tokenize.oracle import OracleTokenizer

        return OracleTokenizer(cfg.image_size, cfg.oracle_grid)
    from tessera.tokenize.dual import DualTokenizer

    return DualTokenizer(cfg.dual, cfg.image_size, encoder=encoder)


def codebooks(cfg: TokenizerConfig) -> dict[str, tuple[int, int]]:
    """Codebook name -> (size, RVQ depth) of the codes the tokenizer writes: the one place that
    reads them off a tokenizer config (BPE fitting and the model's vocabulary both ask here)."""
    if cfg.preset == "vq":
        return {"pixel": (cfg.vq.rvq.codebook_size, cfg.vq.rvq.depth)}
    if cfg.preset == "oracle":
        from tessera.tokenize.oracle import CODEBOOK_SIZE

        return {"pixel": (CODEBOOK_SIZE, 1)}
    return {"pixel": (cfg.dual.pixel_rvq.codebook_size, cfg.dual.pixel_rvq.depth),
            "semantic": (cfg.dual.semantic_rvq.codebook_size, cfg.dual.semantic_rvq.depth)}


def feature_dim(cfg: TokenizerConfig) -> int:
    """Width of the features `encode(images, features=True)` returns (0: the preset has none)."""
    return cfg.vq.rvq.dim if cfg.preset == "vq" else 0


def read_config(directory: str) -> tuple[TokenizerConfig, dict]:
    """A tokenizer directory's config.json -> (TokenizerConfig, the whole file)."""
    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    return config_from_dict({"tokenizer": meta["tokenizer"]}).tokenizer, meta


def tokenizer_device(model: nn.Module) -> torch.device:
    """Where a tokenizer's weights live (cpu for the weightless oracle)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_tokenizer(model: nn.Module, cfg: TokenizerConfig, directory: str, extra: dict | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = os.path.join(directory, "model.safetensors")
    save_file(state, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    meta = {"preset": cfg.preset, "tokenizer": dataclasses.asdict(cfg), "weights_sha256": file_hash(weights), **(extra or {})}
    with open(os.path.join(directory, "config.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(directory, "config.json.tmp"), os.path.join(directory, "config.json"))
    return meta["weights_sha256"]


def load_tokenizer(directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, TokenizerConfig, dict]:
    from safetensors.torch import load_file

    cfg, meta = read_config(directory)
    if cfg.preset == "dual":
        cfg.dual.siglip_path = ""  # the weights below hold the encoder; never refetch
    model = build_tokenizer(cfg)
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    return model.to(device).eval(), cfg, meta


def tokenizer_identity(directory: str) -> dict:
    """Path + content hash, as manifests record it."""
    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    return {"path": os.path.abspath(directory), "preset": meta["preset"], "hash": meta["weights_sha256"]}
