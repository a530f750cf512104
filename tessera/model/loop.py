"""One stage's training loop without Ray: a `StageTrainer` stepped over a `RowStream`.

    for step in StageLoop(trainer, stream, ...):   # one optimizer step per item
        step.metrics      # the step's metrics at logging/checkpoint steps, else None
        step.checkpoint   # True when a checkpoint is due (every `checkpoint_every`, and the last step)

`state_dict()` is the trainer's (model, optimizer, scheduler, RNG, step: the same on every
rank); `position_state_dict()` is this rank's data position. A loop built afresh and given both
continues exactly where the saved one stopped. The Ray Train worker (`tessera.jobs.common.
run_ray_train_loop`) is only the adapter (the contract: `tessera.loop`) that restores them from the checkpoint Ray Train
recorded and reports what the loop yields.
"""

from __future__ import annotations

import time
from typing import Callable

from tessera.loop import LoopStep, TrainerStreamLoop, read_position, write_position
from tessera.model.stream import RowStream, model_inputs
from tessera.model.trainer import StageTrainer


class StageLoop(TrainerStreamLoop):
    def __init__(self, trainer: StageTrainer, stream: RowStream, steps: int, *, grad_accum: int = 1, world: int = 1,
                 log_every: int = 10, checkpoint_every: int = 50, probe_every: int = 0,
                 probe: Callable[[], dict] | None = None, offset: int = 0, stage_name: str = "", stage_index: int = 0):
        """`probe()` -> accuracy per question type (rank 0 only), every `probe_every` steps and at the end;
        `offset`: global steps before this stage (metrics carry both)."""
        self.trainer, self.stream, self.steps = trainer, stream, steps
        self.grad_accum, self.world = grad_accum, world
        self.log_every, self.checkpoint_every, self.probe_every, self.probe = log_every, checkpoint_every, probe_every, probe
        self.offset, self.stage_name, self.stage_index = offset, stage_name, stage_index

    def save_checkpoint(self, directory: str, rank: int) -> None:
        """Every rank: its trainer shards (DCP) and its data position."""
        self.trainer.save(directory)
        write_position(directory, rank, self.stream.state_dict(), self.trainer.step)

    def load_checkpoint(self, directory: str, rank: int) -> None:
        self.trainer.load(directory)
        self.stream.load_state_dict(read_position(directory, rank))

    def __iter__(self):
        rows = iter(self.stream)
        t_last, tokens_since = time.perf_counter(), 0
        while self.trainer.step < self.steps:
            micro_batches = [next(rows) for _ in range(self.grad_accum)]
            m = self.trainer.train_step([model_inputs(b) for b in micro_batches])
            step = self.trainer.step
            tokens_since = tokens_since + m["tokens"] * self.world  # a device tensor: read only when logged
            save = step % self.checkpoint_every == 0 or step == self.steps
            probe = self.probe is not None and (step == self.steps or (self.probe_every > 0 and step % self.probe_every == 0))
            metrics = None
            if step % self.log_every == 0 or save or step == 1 or probe:
                now = time.perf_counter()
                real = sum(int((b["doc_ids"] > 0).sum()) for b in micro_batches)
                metrics = {"step": self.offset + step, "stage": self.stage_name, "stage_index": self.stage_index,
                           "stage_step": step, "loss": round(float(m["loss"]), 6), "text_loss": round(float(m["text_loss"]), 6),
                           "image_loss": round(float(m["image_loss"]), 6), "lr": m["lr"],
                           "grad_norm": round(float(m["grad_norm"]), 4),
                           "tokens_per_s": round(float(tokens_since) / max(now - t_last, 1e-9), 1),
                           "packing_efficiency": round(real / sum(b["doc_ids"].numel() for b in micro_batches), 4)}
                if probe:
                    metrics.update({f"probe_{t}": round(a, 4) for t, a in self.probe().items()})
                    now = time.perf_counter()  # the probe's time is not training time
                t_last, tokens_since = now, 0
            yield LoopStep(step, metrics, save)
