"""Packing sequences into fixed-length rows with per-document attention.

A packed row of length L holds several sequences back to back; `doc_ids` numbers them
(1, 2, ...; 0 = padding), `position_ids` restart at 0 in each (or follow the sequence's own,
for independent turns), `turn_ids` carry its turns and `cells` the (row, column) of its visual
tokens, so with the mask of `tessera.model.unified.packed_attention_mask` every sequence sees exactly
what it would see alone.
`labels[t]` is the token at t+1 when that token is a target of the same document, else -100:
no loss ever crosses a document boundary.

Packing is first-fit decreasing within one call (one packing group of the train job), a pure
function of the sequences in order: the basis of exact data-position resume.
"""

from __future__ import annotations

import numpy as np

from tessera.model.sequence import Sequence
from tessera.model.unified import IGNORE

ROW_FIELDS = ("input_ids", "position_ids", "doc_ids", "turn_ids", "cells", "labels")


def _empty_row(seq_len: int, pad_id: int, code_shape: tuple[int, ...] | None) -> dict:
    row = {
        "input_ids": np.full(seq_len, pad_id, np.int64),
        "position_ids": np.zeros(seq_len, np.int64),
        "doc_ids": np.zeros(seq_len, np.int64),
        "turn_ids": np.zeros(seq_len, np.int64),
        "cells": np.full((seq_len, 2), -1, np.int64),
        "labels": np.full(seq_len, IGNORE, np.int64),
    }
    if code_shape is not None:
        row["codes"] = np.zeros((seq_len,) + code_shape, np.int64)
        row["target_codes"] = np.zeros((seq_len,) + code_shape, np.int64)
    return row


def _place(row: dict, seq: Sequence, start: int, doc: int) -> None:
    n = len(seq)
    sl = slice(start, start + n)
    row["input_ids"][sl] = seq.ids
    row["position_ids"][sl] = seq.field("positions")
    row["doc_ids"][sl] = doc
    turns = seq.field("turns")
    row["turn_ids"][sl] = turns
    row["cells"][sl] = seq.field("cells")
    # a turn's first token is not predicted from the end of another turn (it cannot see it)
    crosses = (turns[:-1] != turns[1:]) & (turns[:-1] != 0)
    tgt = np.where(seq.loss[1:] & ~crosses, seq.ids[1:], IGNORE)
    row["labels"][start:start + n - 1] = tgt
    if "codes" in row and seq.codes is not None:
        codes = np.maximum(seq.codes, 0)  # -1 (no code) -> 0; only <|cell|> positions read codes
        row["codes"][sl] = codes
        row["target_codes"][start:start + n - 1] = codes[1:]


def truncate(seq: Sequence, seq_len: int) -> Sequence:
    if len(seq) <= seq_len:
        return seq
    cut = lambda a: None if a is None else a[:seq_len]  # noqa: E731
    return Sequence(seq.sample_id, seq.ids[:seq_len], seq.loss[:seq_len], cut(seq.codes), cut(seq.positions),
                    cut(seq.turns), cut(seq.cells))


def first_fit(lengths, seq_len: int) -> list[int]:
    """Row of each sequence by first-fit decreasing: longest first, each into the first row with
    room (lengths capped at seq_len). A pure function of the lengths in order; within a row the
    sequences keep their original order."""
    capped = [min(int(n), seq_len) for n in lengths]
    order = sorted(range(len(capped)), key=lambda i: (-capped[i], i))
    free: list[int] = []
    rows = [0] * len(capped)
    for i in order:
        n = capped[i]
        for r, room in enumerate(free):
            if n <= room:
                free[r] -= n
                rows[i] = r
                break
        else:
            free.append(seq_len - n)
            rows[i] = len(free) - 1
    return rows


def pack(sequences: list[Sequence], seq_len: int, pad_id: int) -> tuple[list[dict], dict]:
    """First-fit-decreasing packing (see `first_fit`) -> (rows, stats). Sequences longer than seq_len are truncated."""
    code_shape = next((s.codes.shape[1:] for s in sequences if s.codes is not None), None)
    stats = {"sequences": len(sequences), "truncated": sum(len(s) > seq_len for s in sequences), "tokens": 0}
    assignment = first_fit([len(s) for s in sequences], seq_len)
    rows = [_empty_row(seq_len, pad_id, code_shape) for _ in range(max(assignment, default=-1) + 1)]
    used, docs = [0] * len(rows), [0] * len(rows)
    for seq, r in zip(sequences, assignment):
        seq = truncate(seq, seq_len)
        docs[r] += 1
        _place(rows[r], seq, used[r], docs[r])
        used[r] += len(seq)
        stats["tokens"] += len(seq)
    stats["rows"] = len(rows)
    stats["efficiency"] = stats["tokens"] / max(1, len(rows) * seq_len)
    return rows, stats


def pad(sequences: list[Sequence], seq_len: int, pad_id: int) -> tuple[list[dict], dict]:
    """One sequence per row (the baseline packing is measured against)."""
    rows, stats = [], {"sequences": len(sequences), "truncated": 0, "tokens": 0}
    code_shape = next((s.codes.shape[1:] for s in sequences if s.codes is not None), None)
    for seq in sequences:
        if len(seq) > seq_len:
            stats["truncated"] += 1
            seq = truncate(seq, seq_len)
        row = _empty_row(seq_len, pad_id, code_shape)
        _place(row, seq, 0, 1)
        rows.append(row)
        stats["tokens"] += len(seq)
    stats["rows"] = len(rows)
    stats["efficiency"] = stats["tokens"] / max(1, len(rows) * seq_len)
    return rows, stats


def collate(rows: list[dict]):
    """Rows of numpy arrays -> a dict of (B, L, ...) torch tensors."""
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
