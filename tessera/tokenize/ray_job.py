"""The Ray side of `tessera tokenize`: the actor-pool class (the only Ray-aware module of tokenize/)."""

from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa

from tessera.tokenize import tokens
from tessera.tokenize.tokens import ImageEncoder


class TokenizeActor:
    """`map_batches` callable class: the tokenizer is loaded once per actor, in `__init__`.

    With `whole_rows` (CPU actors) one call does the whole row: PNG decode, visual tokenizer and text
    tokenizer (`tokens.decode_stage` -> `ImageEncoder.encode_batch` -> `tokens.text_stage`), so a row
    crosses no process boundary and no CPU task competes with the actors for the cores. Without it
    (GPU actors) the actor only runs the model and the CPU stages run as tasks around it."""

    def __init__(self, tokenizer_dir: str, image_size: int, chunk: int, device: str = "auto", fault_marker: str = "",
                 whole_rows: dict | None = None, features: bool = False):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = ImageEncoder(tokenizer_dir, image_size, chunk, device, features)
        self.image_size, self.whole_rows = image_size, whole_rows
        self.fault_marker = fault_marker
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.last_end = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        idle = 0.0 if self.last_end is None else start - self.last_end
        if self.fault_marker and not os.path.exists(self.fault_marker):
            open(self.fault_marker, "w").close()
            os._exit(1)  # a worker killed mid-run (test hook)
        if self.whole_rows is not None:
            batch = tokens.decode_stage(batch, self.image_size)
        out = self.encoder.encode_batch(batch)
        busy = time.perf_counter() - start
        n = out.num_rows
        out = out.append_column("busy_s", pa.array([busy / max(n, 1)] * n)) \
                 .append_column("idle_s", pa.array([idle / max(n, 1)] * n)) \
                 .append_column("actor", pa.array([self.name] * n))
        if self.whole_rows is not None:
            out = tokens.text_stage(out, **self.whole_rows)
        self.last_end = time.perf_counter()
        return out
