"""The Ray side of `tessera tokenize`: the actor-pool class (the only Ray-aware module of tokenize/)."""

from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa

from tessera.tokenize.tokens import ImageEncoder


class TokenizeActor:
    """`map_batches` callable class: the tokenizer is loaded once per actor, in `__init__`."""

    def __init__(self, tokenizer_dir: str, image_size: int, chunk: int, device: str = "auto", fault_marker: str = ""):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = ImageEncoder(tokenizer_dir, image_size, chunk, device)
        self.fault_marker = fault_marker
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.last_end = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        idle = 0.0 if self.last_end is None else start - self.last_end
        if self.fault_marker and not os.path.exists(self.fault_marker):
            open(self.fault_marker, "w").close()
            os._exit(1)  # a worker killed mid-run (test hook)
        out = self.encoder.encode_batch(batch)
        busy = time.perf_counter() - start
        self.last_end = time.perf_counter()
        n = out.num_rows
        return out.append_column("busy_s", pa.array([busy / max(n, 1)] * n)) \
                  .append_column("idle_s", pa.array([idle / max(n, 1)] * n)) \
                  .append_column("actor", pa.array([self.name] * n))
