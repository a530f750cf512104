"""The contract between a Ray-free training loop and the Ray Train worker that runs it.

A loop (`tessera.model.loop.StageLoop`, `tessera.tokenize.trainer.TokenizerLoop`) owns a trainer
and a resumable data stream and yields one `LoopStep` per optimizer step. Its state is two
`state_dict`s: `state_dict()` (model, optimizers, schedule, RNG, step) and
`position_state_dict()` (this rank's data position). `save_checkpoint(directory, rank)` /
`load_checkpoint(directory, rank)` put both in a checkpoint directory; every rank calls them (the
stage trainer writes through `torch.distributed.checkpoint`, a collective under FSDP2), and each
rank's data position is its own `position_rank<r>.json` beside the trainer's files. The worker
(`tessera.jobs.common.run_ray_train_loop`) restores from the checkpoint Ray Train recorded and
reports what the loop yields; nothing else about training lives in the Ray layer.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass


@dataclass
class LoopStep:
    step: int
    """The loop's step just taken (1-based)."""
    metrics: dict | None
    """The step's metrics when it is a logging or checkpoint step, else None."""
    checkpoint: bool
    """A checkpoint is due after this step."""


class TrainerStreamLoop:
    """What every loop shares: a trainer and a stream, each owning its `state_dict`. A subclass adds
    `save_checkpoint(directory, rank)` / `load_checkpoint(directory, rank)` (how its trainer writes
    files; every rank calls them) and `__iter__` (one `LoopStep` per optimizer step)."""

    trainer: object
    stream: object

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def position(self) -> tuple[int, int]:
        return self.stream.position

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def position_state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict, position: dict) -> None:
        self.trainer.load_state_dict(state)
        self.stream.load_state_dict(position)


def write_position(directory: str, rank: int, position: dict, step: int) -> None:
    with open(os.path.join(directory, f"position_rank{rank}.json"), "w") as f:
        json.dump({**position, "step": step}, f)


def read_position(directory: str, rank: int) -> dict:
    with open(os.path.join(directory, f"position_rank{rank}.json")) as f:
        return json.load(f)


def worker_print(message: str) -> None:
    """One console line from a Ray Train worker, exactly once. Ray Train patches `print` on its workers
    to log through the root logger *and* echo to a redirected stdout, which printed every line twice
    in a submitted job's log; the process's own stdout is what Ray forwards to the driver."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()
