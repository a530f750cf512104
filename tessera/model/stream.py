"""One rank's packed rows in data-position order, resumable: the stream owns its `state_dict`.

The data position is (group, row): the next packing group and row this rank has not consumed.
Rank r's groups are r, r + world, r + 2*world, ... (the driver's plan); a group is released once
all its rows (`rows_in_group`) have arrived, and its rows in `row` order, so the stream is a pure
function of the plan whatever order Ray Data delivers blocks in. Ray-free: `batches` is any
callable returning an iterable of column dicts (a Ray dataset shard's `iter_torch_batches`, a
list in tests). The source always starts at the stage's beginning; a loaded position skips what
was consumed, so the stream and the checkpoint it was saved in can never disagree.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

# columns that locate a row in the plan; not model inputs
POSITION_COLUMNS = ("group", "row", "rows_in_group")


class RowStream:
    def __init__(self, batches: Callable[[], Iterable[dict]], micro: int, rank: int, world: int, stage: str = ""):
        self.batches, self.micro, self.rank, self.world, self.stage = batches, micro, rank, world, stage
        self.position: tuple[int, int] = (0, 0)

    def state_dict(self) -> dict:
        """The data position after the last micro-batch handed out."""
        return {"next": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = (int(state["next"][0]), int(state["next"][1]))

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches (`micro` rows, stacked columns) from the current position on; the position moves
        as each one is handed out. Raises when the source runs out (the plan was too small)."""
        g0, r0 = self.position
        rank, world = self.rank, self.world
        expected = g0 if g0 % world == rank else g0 + (rank - g0) % world
        pending: dict[int, list] = {}
        ready: list[dict] = []
        for batch in self.batches():
            for i in range(len(batch["group"])):
                g = int(batch["group"][i])
                if g >= expected:
                    pending.setdefault(g, []).append({k: v[i] for k, v in batch.items()})
            while expected in pending and len(pending[expected]) == int(pending[expected][0]["rows_in_group"]):
                rows = sorted(pending.pop(expected), key=lambda r: int(r["row"]))
                ready += [r for r in rows if expected > g0 or int(r["row"]) >= r0]
                expected += world
            while len(ready) >= self.micro:
                chunk, ready = ready[:self.micro], ready[self.micro:]
                self.position = (int(chunk[-1]["group"]), int(chunk[-1]["row"]) + 1)
                yield {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
        raise RuntimeError(f"stage {self.stage!r}: the data stream ran out before the stage's steps were done; "
                           "raise train.pack_group or check the mixture")


def model_inputs(micro_batch: dict) -> dict:
    """A micro-batch without the columns that only locate rows in the plan."""
    return {k: v for k, v in micro_batch.items() if k not in POSITION_COLUMNS}
