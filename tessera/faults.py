"""Fault injection for tests, armed by one environment variable and never by the run's config.

`TESSERA_FAULT=<point>` makes the process die at that point: jobs call
`fault_point("prepare:after_samples")` where a crash is most damaging (after some outputs are
written, before they are committed), and the process exits with `os._exit`, like a killed driver:
no cleanup handlers, no flushing. Hooks that need arguments take them as a query string,
`TESSERA_FAULT="train:step?at=5&mode=hang"`; the driver reads them here and hands them to the
workers it starts (whose environment may not be the driver's).

On a cluster the variable travels in the job's runtime env:
`ray job submit --runtime-env-json '{"env_vars": {"TESSERA_FAULT": "train:step?at=2&mode=hang"}}' ...`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional
from urllib.parse import parse_qsl

from tessera import storage
from tessera.loop import worker_print

FAULT_EXIT_CODE = 86
ENV = "TESSERA_FAULT"


def armed(point: str) -> Optional[dict]:
    """The arguments of the fault armed at `point` ({} when it has none), or None when not armed."""
    name, _, query = os.environ.get(ENV, "").partition("?")
    return dict(parse_qsl(query)) if name == point else None


def fault_point(name: str) -> None:
    if armed(name) is not None:
        print(f"[tessera] injected fault at {name}: exiting", flush=True)
        os._exit(FAULT_EXIT_CODE)


def fault_when(name: str, condition, poll_s: float = 0.05) -> None:
    """If `TESSERA_FAULT` names this point, die as soon as `condition()` is true, from a
    background thread, so the crash lands in the middle of whatever the job is doing."""
    if armed(name) is None:
        return
    import threading

    def watch():
        while not condition():
            time.sleep(poll_s)
        fault_point(name)

    threading.Thread(target=watch, daemon=True).start()


@dataclass(frozen=True)
class StepFault:
    """`train:step?at=N&mode=exit|hang`: once per run (a marker file under the run's output), right
    after global step N and its checkpoint, the training worker of rank 0 kills its process (`exit`:
    Ray Train's FailureConfig restarts it) or blocks like a stuck job until the job is stopped (`hang`)."""

    at: int
    mode: Literal["exit", "hang"]
    marker: str

    @classmethod
    def from_env(cls, output_dir: str) -> Optional["StepFault"]:
        args = armed("train:step")
        if args is None:
            return None
        mode = args.get("mode", "exit")
        if mode not in ("exit", "hang") or not args.get("at", "").isdigit():
            raise ValueError(f"{ENV}: expected train:step?at=<step>[&mode=exit|hang], got {os.environ[ENV]!r}")
        return cls(int(args["at"]), mode, storage.join(output_dir, f"fault-{args['at']}.marker"))

    def __call__(self, global_step: int) -> None:
        if global_step != self.at or storage.exists(self.marker):
            return
        storage.write_bytes(self.marker, b"")
        if self.mode == "hang":
            worker_print(f"[train] fault hook: blocking after global step {global_step} until stopped")
            while True:
                time.sleep(1)
        worker_print(f"[train] fault hook: killing worker after global step {global_step}")
        os._exit(1)


def actor_fault_marker(output_dir: str) -> str:
    """`tokenize:actor`: the first tokenizer actor batch kills its actor once per run (Ray restarts it and
    retries the batch). Returns the marker path the actors get, or "" when not armed."""
    return os.path.join(output_dir, "fault-actor.marker") if armed("tokenize:actor") is not None else ""
