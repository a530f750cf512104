"""`Timer`: named wall-clock phases, shared by the jobs (which announce each phase on the console)
and the library loops (which add up thousands of short phases quietly, e.g. the BPE fit's
choose / apply / reduce per merge)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class Timer:
    """`with timer("normalize"): ...` announces the phase and records its seconds;
    `with timer.phase("apply"): ...` adds to the phase's total without a word. `timer.seconds`
    maps name -> s."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        print(f"[tessera] {name} ...", flush=True)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            print(f"[tessera] {name} done in {self.seconds[name]:.1f}s", flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)
