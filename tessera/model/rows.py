"""Token shards -> packed training rows, one packing group at a time (no Ray here; the train job
runs `pack_groups` inside Ray Data).

A stage's plan (see `tessera.model.mixture`) is cut into groups of `pack_group` samples; each
group is built into sequences and packed on its own, so a data position is (group, row) and a
resumed stage rebuilds exactly the rows it had not consumed yet. First-fit decreasing leaves
a group's rows sorted by length (and so by task: long VQA rows first, short captions last), so
the rows are shuffled by a permutation seeded by (seed, stage, group): every step mixes tasks,
and the order is still a pure function of the plan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from tessera.model.packing import pack
from tessera.model.sequence import SequenceBuilder
from tessera.model.vocab import Vocabulary


@dataclass(frozen=True)
class BuildSpec:
    """Everything a data worker needs to turn sample references into packed rows (picklable)."""

    vocabulary: tuple
    """Vocabulary.to_dict() items."""
    bpe_path: str
    codebooks: tuple[str, ...]
    depth: int
    codebook_sizes: tuple[int, ...]
    bpe_codebook: str
    bpe_depth: int
    seq_len: int
    loss_mask: str
    seed: int
    stage: int
    t2i_rate: float
    cfg_text_dropout: float
    questions: str | None = None
    """The stage's `questions` pattern (`StageConfig.questions`); None keeps every turn."""
    questions_rate: float = 1.0
    """Share of conversations (drawn by sample id) that `questions` reduces (`StageConfig.questions_rate`)."""
    text_tokenizer: str | None = None
    """The text tokenizer's directory: `questions` is matched against decoded question text."""
    question_first: str | None = None
    """The model's `question_first` pattern: matching turns become samples of their own, question before image."""


@functools.lru_cache(maxsize=4)
def _builder(spec: BuildSpec) -> SequenceBuilder:
    from tessera.bpe.model import VisualBPE

    vocab = Vocabulary.from_dict(dict(spec.vocabulary))
    bpe = VisualBPE.load(spec.bpe_path) if vocab.interface == "bpe" else None
    return SequenceBuilder(vocab, bpe, spec.codebooks, spec.depth, spec.codebook_sizes, spec.bpe_codebook, spec.bpe_depth)


@functools.lru_cache(maxsize=8)
def _shard(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def read_row(path: str, row: int) -> dict:
    t = _shard(path).slice(row, 1).to_pylist()
    return t[0]


@functools.lru_cache(maxsize=2)
def _text_decoder(path: str):
    from tessera.tokenize.text import load_text_tokenizer

    return load_text_tokenizer(path).decode


def reduced(sample_id: str, rate: float) -> bool:
    """Whether a `questions` stage reduces this sample's conversation: a draw seeded by its id alone, so the
    same samples are reduced on every rank, epoch and resume."""
    if rate >= 1.0:
        return True
    return np.random.default_rng(int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16)).random() < rate


_POSITION_COLUMNS = ("is_image", "text_ids", "pixel_codes", "semantic_codes", "grid_shapes")


def _positions(row: dict, order: list[int], meta: dict, **fields) -> dict:
    """`row` with only the positions `order` names, in that order: every per-position column, the
    timestamps when there is one per position, and `meta`'s roles (`fields` overrides, e.g. `sample_id`)."""
    roles = meta["roles"]
    out = {**row, **{k: [row[k][j] for j in order] for k in _POSITION_COLUMNS}, **fields,
           "meta": json.dumps({**meta, "roles": [roles[j] for j in order]})}
    if row.get("timestamps") is not None and len(row["timestamps"]) == len(roles):
        out["timestamps"] = [row["timestamps"][j] for j in order]
    return out


def keep_questions(row: dict, pattern: str, decode) -> dict | None:
    """A conversation of independent turns with only the (user, assistant) pairs whose question
    (`decode(text_ids)`) `pattern` finds; None when no question matches. Any other row is returned
    unchanged: the stage's mixture, not this filter, decides which kinds of samples it sees."""
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    roles = meta.get("roles")
    if not roles or meta.get("turns") != "independent":
        return row
    keep = [True] * len(roles)
    found = re.compile(pattern)
    for i, role in enumerate(roles):
        if role == "user":  # a question stays or goes, and the answer after it (if any) with it
            keep[i] = found.search(decode(row["text_ids"][i]).strip()) is not None
            if i + 1 < len(roles) and roles[i + 1] == "assistant":
                keep[i + 1] = keep[i]
    if not any(k and role == "user" for k, role in zip(keep, roles)):
        return None
    return _positions(row, [j for j, kept in enumerate(keep) if kept], meta)


def split_question_first(row: dict, pattern: str, decode) -> list[dict]:
    """A conversation of independent turns -> the conversation without the turns whose question
    `pattern` finds (left out when none remain), then one sample per such turn that reads
    question, image, answer (`ModelConfig.question_first`), with id `<sample_id>/q<k>` (k = the
    turn's index among all). Any other row -> [row]. The moved turns' answers keep their loss;
    nothing else of the conversation changes."""
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    roles = meta.get("roles")
    if not roles or meta.get("turns") != "independent" or sum(row["is_image"]) != 1:
        return [row]
    found = re.compile(pattern)
    image = row["is_image"].index(True)
    moved, keep = [], [True] * len(roles)
    for i, role in enumerate(roles):
        if role == "user" and i + 1 < len(roles) and roles[i + 1] == "assistant" \
                and found.search(decode(row["text_ids"][i]).strip()):
            moved.append(i)
            keep[i] = keep[i + 1] = False
    if not moved:
        return [row]
    out = []
    rest = [j for j, k in enumerate(keep) if k]
    if any(roles[j] == "user" for j in rest):
        out.append(_positions(row, rest, meta))
    single = {k: v for k, v in meta.items() if k != "turns"}  # one turn: plain causal attention
    out += [_positions(row, [i, image, i + 1], single, sample_id=f"{row['sample_id']}/q{i}") for i in moved]
    return out


def _stage_rows(spec: BuildSpec, files: list[str], rows: list[int], epochs: list[int]):
    """(row, epoch) of each sample the stage trains on: every sample, or under `spec.questions`
    the conversations reduced to the matching turns (those without one left out), or with
    `spec.questions_rate` < 1 that share of them, the others whole; then under
    `spec.question_first` the matching turns moved into samples of their own."""
    for f, r, e in zip(files, rows, epochs):
        row = read_row(f, r)
        if spec.questions is not None and reduced(row["sample_id"], spec.questions_rate):
            row = keep_questions(row, spec.questions, _text_decoder(spec.text_tokenizer))
            if row is None:
                continue
        if spec.question_first:
            for part in split_question_first(row, spec.question_first, _text_decoder(spec.text_tokenizer)):
                yield part, e
            continue
        yield row, e


def build_group(spec: BuildSpec, files: list[str], rows: list[int], epochs: list[int], group: int = 0) -> tuple[list[dict], dict]:
    """Samples of one group -> packed rows (dicts of numpy arrays, in a seeded shuffled order) and packing stats."""
    builder = _builder(spec)
    seqs = [builder.build(row, spec.loss_mask, spec.seed, e, spec.t2i_rate, spec.cfg_text_dropout)
            for row, e in _stage_rows(spec, files, rows, epochs)]
    packed, stats = pack(seqs, spec.seq_len, builder.vocab.pad_id)
    order = np.random.default_rng([spec.seed, spec.stage, group]).permutation(len(packed))
    return [packed[i] for i in order], stats


def pack_groups(batch: dict, spec: BuildSpec) -> dict:
    """Ray Data UDF: a batch of groups (columns group, files, rows, epochs) -> packed rows with
    their data position (group, row) and the group's row count (so a reader can restore the
    order whatever order blocks arrive in)."""
    out: dict[str, list] = {}
    for g, files, rows, epochs in zip(batch["group"], batch["files"], batch["rows"], batch["epochs"]):
        packed, stats = build_group(spec, list(files), [int(r) for r in rows], [int(e) for e in epochs], int(g))
        for i, r in enumerate(packed):
            for k, v in {"group": int(g), "row": i, "rows_in_group": len(packed), **r}.items():
                out.setdefault(k, []).append(v)
    return {k: np.stack(v) if isinstance(v[0], np.ndarray) else np.asarray(v) for k, v in out.items()}
