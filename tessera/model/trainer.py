"""One training stage without Ray: which parameters learn, AdamW, warm-up + cosine, accumulation,
clipping, bf16 autocast on GPU, and an exact state dict (model, optimizer, scheduler, RNG).

`trainable` modes (DESIGN.md "Training curriculum"):
    embeddings   only the new vocabulary rows of the input and output embeddings (and the visual
                 interface: 2-D row/column embeddings, the rvq code embedding and depth heads). The old rows get their gradient
                 zeroed and no weight decay, so with a fresh AdamW they stay bit-identical.
    new          the same plus the MoT visual experts: every part the base LM did not have
    layers [..]  those decoder layers, plus the embeddings and the rvq interface
    all          everything
"""

from __future__ import annotations

import copy
import math
import os
import random

import numpy as np
import torch
from torch import nn

from tessera.config import StageConfig, TrainableLayers
from tessera.model.mot import visual_expert_parameters
from tessera.model.unified import TesseraModel


def _embedding_params(model: TesseraModel) -> list[nn.Parameter]:
    params = [model.lm.get_input_embeddings().weight]
    out = model.lm.get_output_embeddings().weight
    if out is not params[0]:
        params.append(out)
    return params


def _interface_params(model: TesseraModel) -> list[nn.Parameter]:
    mods = [getattr(model, n) for n in ("code_embed", "depth_heads", "feature_proj", "grid_rows", "grid_cols", "next_rows", "next_cols", "grid_encoder") if hasattr(model, n)]
    return [p for m in mods for p in m.parameters()]


def select_trainable(model: TesseraModel, trainable) -> bool:
    """Set requires_grad for a stage. Returns whether the old (text) rows of the embeddings must stay
    frozen inside trainable embedding matrices (modes `embeddings` and `new`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    guard_old_rows = False
    if trainable == "all":
        chosen = list(model.parameters())
    else:
        chosen = _embedding_params(model) + _interface_params(model)
        if isinstance(trainable, TrainableLayers):
            n = len(model.decoder_layers())
            bad = [i for i in trainable.layers if not -n <= i < n]
            if bad:
                raise ValueError(f"trainable layers {bad} do not exist (the model has {n} decoder layers)")
            for i in trainable.layers:
                chosen += list(model.decoder_layers()[i].parameters())
        elif trainable in ("embeddings", "new"):
            guard_old_rows = True
            if trainable == "new":
                chosen += [p for _, p in visual_expert_parameters(model)]
        else:
            raise ValueError(f"unknown trainable mode {trainable!r}")
    for p in chosen:
        p.requires_grad_(True)
    return guard_old_rows


def zero_rows_below(grad: torch.Tensor, rows: int) -> None:
    """In place: zero the gradient of rows [0, rows) of an embedding matrix, whole or an FSDP2 row shard
    (a DTensor sharded on dim 0: only the local rows whose global index is below `rows`)."""
    from torch.distributed.tensor import DTensor

    if isinstance(grad, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = grad.to_local()
        _, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
        local[: max(0, min(rows - offset[0], local.shape[0]))] = 0
    else:
        grad[:rows] = 0


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def fsdp_wrap(model: TesseraModel) -> TesseraModel:
    """FSDP2: shard every decoder layer, then the rest (embeddings, head, interface) as the root unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.decoder_layers():
        fully_shard(layer)
    return fully_shard(model)


def load_trained_weights(model: TesseraModel, directory: str) -> TesseraModel:
    """The model weights of a `StageTrainer.save` checkpoint into one whole (unsharded) model, in a single
    process without a process group (the driver after a stage): DCP reshards whatever layout saved it."""
    legacy = _legacy_state(directory)
    if legacy is not None:
        model.load_state_dict(legacy["model"])
        return model
    state = {"model": model.state_dict()}
    _dcp_load(state, directory)
    model.load_state_dict(state["model"])
    return model


def _dcp_load(state: dict, directory: str) -> None:
    """`dcp.load` in place; without a process group it loads in this process as asked (`no_dist`),
    and torch's warning that it assumes exactly that is dropped here, for this call only."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=directory, no_dist=not _distributed())


def _legacy_state(directory: str) -> dict | None:
    """A checkpoint written before DCP (rank 0's whole `state.pt`, single-worker or DDP runs), so a run
    started by an older Tessera still resumes after an upgrade; None for a DCP checkpoint."""
    path = os.path.join(directory, "state.pt")
    if os.path.exists(os.path.join(directory, ".metadata")) or not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class StageTrainer:
    def __init__(self, model: TesseraModel, stage: StageConfig, weight_decay: float, grad_clip: float,
                 device: torch.device, wrap=None):
        """`wrap(module) -> module`: the data-parallel wrapper (DDP / FSDP2), applied after the stage's
        trainable parameters are chosen and before the optimizer is built (FSDP2 replaces every parameter
        by its sharded DTensor: an optimizer built first would step the unsharded originals)."""
        self.model, self.stage, self.device, self.grad_clip = model, stage, device, grad_clip
        self.guard_old_rows = select_trainable(model, stage.trainable)
        self.wrapped = (wrap or (lambda m: m))(model)  # DDP / FSDP wrap the model's own forward(labels=...)
        params = [p for p in model.parameters() if p.requires_grad]
        embeddings = {id(p) for p in _embedding_params(model)}
        decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
        no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
        self.params = params
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=stage.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage.warmup_steps, stage.steps, stage.min_lr_ratio))
        self.step = 0

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over micro-batches (gradient accumulation): each micro-batch's mean loss is
        weighted by its share of the step's targets. Returns the step's metrics as 0-d tensors on the
        device (loss, text_loss, image_loss, grad_norm, tokens) and the learning rate: nothing here
        waits for the device; a caller reads them (`float`) only on the steps it logs."""
        self.wrapped.train()
        micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        total_targets = sum((b["labels"] != -100).sum() for b in micro_batches).clamp(min=1)
        weighted = self.stage.image_loss_weight is not None
        if weighted:  # each modality's mean over the whole step, so accumulation equals one big batch
            masks = [self.model.target_masks(b["labels"]) for b in micro_batches]
            n_text = sum(text.sum() for _, text, _ in masks).clamp(min=1)
            n_image = sum(image.sum() for _, _, image in masks).clamp(min=1)
        sums = {k: torch.zeros((), device=self.device) for k in ("loss", "text_loss", "image_loss")}
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        for b in micro_batches:
            with self.autocast():
                out = self.wrapped(**b)
            share = out.num_targets / total_targets
            if weighted:
                (out.text_loss_sum / n_text + self.stage.image_loss_weight * out.image_loss_sum / n_image).backward()
            else:
                (out.loss * share).backward()
            for k in sums:
                sums[k] += getattr(out, k).detach().float() * share
            tokens += (b["doc_ids"] > 0).sum()
        if self.guard_old_rows:  # the text rows stay bit-identical: no gradient, and no weight decay (see above)
            for p in _embedding_params(self.model):
                if p.grad is not None:
                    zero_rows_below(p.grad, self.model.vocab.text_size)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return {**sums, "lr": lr, "grad_norm": norm.detach(), "tokens": tokens}

    def state_dict(self) -> dict:
        """A snapshot (copies, not views of the live tensors)."""
        return copy.deepcopy({"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                              "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                              "step": self.step, "rng": rng_state()})

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        set_rng_state(state["rng"])


    # ------------------------------------------------------------------ checkpoints (every rank)

    def _checkpoint_state(self) -> dict:
        """Model and optimizer through `torch.distributed.checkpoint.state_dict` (each rank's FSDP2 shards
        as DTensors, or the whole tensors without FSDP), plus scheduler, step and RNG."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim, "scheduler": self.scheduler.state_dict(), "step": self.step,
                "rng": rng_state()}

    def save(self, directory: str) -> None:
        """Write a checkpoint with `torch.distributed.checkpoint` (DCP): called on every rank (a collective
        under FSDP2), each rank writes its own shards; one `.metadata` describes the whole."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._checkpoint_state(), checkpoint_id=directory, no_dist=not _distributed())

    def load(self, directory: str) -> None:
        """Restore from `save`'s directory, resharding to this run's layout (any world size)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        legacy = _legacy_state(directory)
        if legacy is not None:
            self.load_state_dict(legacy)
            return
        state = self._checkpoint_state()
        _dcp_load(state, directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
