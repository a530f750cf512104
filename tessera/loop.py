"""The contract between a Ray-free training loop and the Ray Train worker that runs it.

A loop (`tessera.model.loop.StageLoop`, `tessera.tokenize.train.TokenizerLoop`) owns a trainer
and a resumable data stream and yields one `LoopStep` per optimizer step. Its state is two
`state_dict`s: `state_dict()` (model, optimizers, schedule, RNG, step: the same on every rank,
so rank 0 saves it) and `position_state_dict()` (this rank's data position). The worker
(`tessera.jobs.common.run_ray_train_loop`) restores both from the checkpoint Ray Train recorded
and reports what the loop yields; nothing else about training lives in the Ray layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass
class LoopStep:
    step: int
    """The loop's step just taken (1-based)."""
    metrics: dict | None
    """The step's metrics when it is a logging or checkpoint step, else None."""
    checkpoint: bool
    """A checkpoint is due after this step."""


class ResumableLoop(Protocol):
    step: int
    position: tuple

    def state_dict(self) -> dict: ...

    def position_state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, position: dict) -> None: ...

    def __iter__(self) -> Iterator[LoopStep]: ...
