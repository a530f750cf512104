"""`align`: SigLIP sigmoid-loss pre-training of the dual tokenizer's ViT on image-text pairs.

Offline there are no SigLIP weights, and a random frozen teacher would make the semantic
branch meaningless. This trains `transformers.SiglipModel` (the ViT of the dual tokenizer
plus a small byte-level text tower of its own) with the pairwise sigmoid loss, so the
teacher's deep features carry the captions' semantics. With real weights it is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tessera.config import DualConfig

TEXT_LEN = 64
VOCAB = 259  # bytes + pad (256) + bos (257) + eos (258)
PAD, BOS, EOS = 256, 257, 258


def byte_tokenize(texts: list[str], length: int = TEXT_LEN) -> torch.Tensor:
    """texts -> (B, length) int64: padding, BOS, UTF-8 bytes, EOS. Left-padded: SigLIP's text
    tower pools the *last* position, which is then the EOS of the text, not a pad token."""
    out = np.full((len(texts), length), PAD, dtype=np.int64)
    for i, t in enumerate(texts):
        ids = [BOS, *t.lower().encode("utf-8")[: length - 2], EOS]
        out[i, length - len(ids):] = ids
    return torch.from_numpy(out)


def build_siglip(cfg: DualConfig, image_size: int, batch_size: int = 32):
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

    from tessera.tokenize.dual import siglip_vision_config

    text = SiglipTextConfig(vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
                            num_hidden_layers=2, num_attention_heads=cfg.num_heads, max_position_embeddings=TEXT_LEN,
                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, projection_size=cfg.hidden_size)
    vision = siglip_vision_config(cfg, image_size)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    # SigLIP's bias init (-10) suits batches of 32k; at batch B the loss is balanced at -log(B).
    # Left at -10, a small run spends thousands of steps moving one scalar instead of the towers.
    with torch.no_grad():
        model.logit_bias.fill_(-math.log(max(batch_size, 2)))
    return model


def align_step(model, optimizer, images: torch.Tensor, texts: list[str]) -> float:
    """One sigmoid-loss step; images (B, 3, H, W) in [-1, 1]."""
    model.train()
    out = model(input_ids=byte_tokenize(texts).to(images.device), pixel_values=images, return_loss=True)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return float(out.loss.detach())


@torch.no_grad()
def retrieval_r1(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Image->text R@1: (N, C) x (N, C), pair i matches text i."""
    sims = torch.nn.functional.normalize(image_emb, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).t()
    return float((sims.argmax(dim=1) == torch.arange(len(sims))).float().mean())


@torch.no_grad()
def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    """(N, C) pooled text embeddings of the aligned text tower."""
    out = model.get_text_features(input_ids=byte_tokenize(texts).to(next(model.parameters()).device))
    return out.pooler_output if hasattr(out, "pooler_output") else out


def align_vision_encoder(cfg: DualConfig, image_size: int, batches, steps: int, lr: float, log=print):
    """Train a SiglipModel on (images, texts) batches for `steps`; returns (model, losses).
    `batches` yields (images (B, 3, H, W) in [-1, 1], list[str])."""
    torch.manual_seed(0)
    batches = iter(batches)
    first = next(batches)
    model = build_siglip(cfg, image_size, batch_size=len(first[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    import itertools

    for step, (images, texts) in enumerate(itertools.chain([first], batches)):
        if step >= steps:
            break
        losses.append(align_step(model, optimizer, images, texts))
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"[align] step {step + 1}/{steps} sigmoid loss {losses[-1]:.4f}")
    model.eval()
    return model, losses
