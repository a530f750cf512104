"""Token-shard rows -> model sequences: interleaved text and images in order, loss masks, CFG dropout.

A sequence is `<bos> position_1 ... position_n <eos>` where a text position is its text ids
and an image position is

    bpe:  [<|frame|> <t=k>] <|image_start|> <h=H> <w=W> tile_1 ... tile_m <|image_end|>
    rvq:  [<|frame|> <t=k>] <|image_start|> <h=H> <w=W> <|cell|> x H*W <|image_end|>   (+ codes per cell)
    continuous: [<|frame|> <t=k>] <|image_start|> <h=H> <w=W> <v=code> x H*W <|image_end|>
                the raw codes (depth 0 of the pixel codebook) as targets, each position's input
                embedding the encoder's pre-quantisation feature of its cell (+ feature bits)

(the frame marker and time token only for video frames). Image-caption pairs are shown
image-first (captioning) or, at rate `t2i_rate`, caption-first (generation); a caption-first
pair drops its caption at rate `cfg_text_dropout`, which teaches the unconditional branch
classifier-free guidance needs. Both draws are a pure function of (seed, sample_id, epoch).

`loss` marks which tokens are targets (predicted from the previous token):
    all      every token after <bos>
    text     text ids and <eos>
    image    the image spans
    answers  assistant turns (documents with `roles`), else the sample's last position; + <eos>

An assistant turn ends with `<eos>` (like a chat model's end-of-turn), so a generated answer stops.

Independent turns: a document whose meta says `"turns": "independent"` (questions about one
image that do not depend on each other, as the shapes world's VQA) numbers its
(user, assistant) pairs 1, 2, ... in `turns`; everything before the first user turn is the
shared prefix (turn 0). With the per-turn mask of `tessera.model.unified.packed_attention_mask` each
turn attends only to the prefix and to itself, and its positions continue from the prefix as if
it were the only question: training sees exactly what single-turn evaluation sees, and no
answer can be copied from another turn, while one image still carries all its answers.

The continuous interface carries each cell's float32 feature vector in `codes` as its bit
pattern (uint32 in int64, so the int code path -- packing, KV-cache decoding, probe prompts --
moves it losslessly and every "no code = -1 -> 0" becomes +0.0); `feature_bits` /
`tessera.model.unified.features_from_bits` convert.

Visual tokens carry their 2-D place: `cells[t]` is the (row, column) of the anchor cell of
token t's tile (bpe) or of its cell (rvq), -1 for every other token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from tessera.model.vocab import Vocabulary


class BadSample(ValueError):
    """A token row the model cannot take (out-of-vocabulary id, bad grid). Names the sample."""


@dataclass
class Sequence:
    sample_id: str
    ids: np.ndarray
    """(n,) int64 token ids."""
    loss: np.ndarray
    """(n,) bool: token i is a target."""
    codes: np.ndarray | None = None
    """(n, C, D) int64 codes at <|cell|> positions (rvq interface; continuous: (n, 1, dim) feature
    bits), -1 elsewhere."""
    positions: np.ndarray | None = None
    """(n,) int64 position ids; None = 0..n-1."""
    turns: np.ndarray | None = None
    """(n,) int64: 0 = shared prefix, k >= 1 = the k-th independent turn; None = all 0."""
    cells: np.ndarray | None = None
    """(n, 2) int64 (row, column) of visual tokens' anchor cells, -1 elsewhere; None = no image."""

    def __len__(self) -> int:
        return len(self.ids)

    def field(self, name: str) -> np.ndarray:
        """`positions`, `turns` or `cells` with their defaults filled in."""
        value = getattr(self, name)
        if value is not None:
            return value
        n = len(self.ids)
        return {"positions": lambda: np.arange(n, dtype=np.int64), "turns": lambda: np.zeros(n, np.int64),
                "cells": lambda: np.full((n, 2), -1, np.int64)}[name]()


def feature_bits(features: np.ndarray) -> np.ndarray:
    """float32 features (..., dim) -> their bit patterns as non-negative int64 (see the module doc)."""
    return np.ascontiguousarray(features, dtype=np.float32).view(np.uint32).astype(np.int64)


def sample_rng(seed: int, sample_id: str, epoch: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{sample_id}:{epoch}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SequenceBuilder:
    def __init__(self, vocab: Vocabulary, bpe=None, codebooks: tuple[str, ...] = ("pixel",), depth: int = 1,
                 codebook_sizes: tuple[int, ...] = (), bpe_codebook: str = "pixel", bpe_depth: int = 0):
        if vocab.interface == "bpe" and bpe is None:
            raise ValueError("the bpe interface needs a fitted VisualBPE")
        self.vocab, self.bpe = vocab, bpe
        self.codebooks, self.depth, self.codebook_sizes = tuple(codebooks), depth, tuple(codebook_sizes)
        self.bpe_codebook, self.bpe_depth = bpe_codebook, bpe_depth

    # ------------------------------------------------------------------ pieces

    def text_ids(self, ids, sample_id: str) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab.text_size):
            raise BadSample(f"sample {sample_id}: text id {int(arr.max() if arr.max() >= self.vocab.text_size else arr.min())} "
                            f"outside the text vocabulary of {self.vocab.text_size} ids")
        return arr

    def grid(self, row: dict, position: int, codebook: str) -> np.ndarray:
        shape = [int(s) for s in row["grid_shapes"][position]]
        flat = np.asarray(row[f"{codebook}_codes"][position], dtype=np.int64)
        if len(shape) != 3 or flat.size != int(np.prod(shape)):
            raise BadSample(f"sample {row['sample_id']}: image at position {position} has {flat.size} {codebook} codes "
                            f"but grid shape {shape}")
        return flat.reshape(shape)

    def image_header(self, h: int, w: int) -> list[int]:
        return [self.vocab.image_start, self.vocab.height_token(h), self.vocab.width_token(w)]

    def image_span(self, row: dict, position: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """ids (m,), codes (m, C, D) | None and cells (m, 2) of one image, start and end tokens included."""
        sid = row["sample_id"]
        if self.vocab.interface == "bpe":
            grid = self.grid(row, position, self.bpe_codebook)[:, :, self.bpe_depth]
            if grid.min() < 0 or grid.max() >= self.bpe.codebook_size:
                raise BadSample(f"sample {sid}: code {int(grid.max())} outside the BPE's codebook of {self.bpe.codebook_size}")
            H, W = grid.shape
            tiles = self.bpe.encode(grid.astype(np.int32))
            ids = np.concatenate([self.image_header(H, W), tiles.astype(np.int64) + self.vocab.visual_base,
                                  [self.vocab.image_end]]).astype(np.int64)
            return ids, None, _with_markers(self.bpe.anchors(tiles, (H, W)))
        if self.vocab.interface == "continuous":
            return self.feature_span(row, position)
        grids = [self.grid(row, position, c) for c in self.codebooks]
        H, W, D = grids[0].shape
        if D < self.depth:
            raise BadSample(f"sample {sid}: grid depth {D} < the model's RVQ depth {self.depth}")
        cells = np.stack([g[:, :, : self.depth].reshape(H * W, self.depth) for g in grids], axis=1)  # (HW, C, D)
        for c, k in enumerate(self.codebook_sizes):
            if cells[:, c].min() < 0 or cells[:, c].max() >= k:
                raise BadSample(f"sample {sid}: {self.codebooks[c]} code outside the codebook of {k}")
        ids = np.concatenate([self.image_header(H, W), np.full(H * W, self.vocab.cell), [self.vocab.image_end]]).astype(np.int64)
        codes = np.full((len(ids), len(self.codebooks), self.depth), -1, dtype=np.int64)
        codes[3:3 + H * W] = cells
        rc = np.stack(np.divmod(np.arange(H * W, dtype=np.int64), W), axis=1)
        return ids, codes, _with_markers(rc)

    def feature_span(self, row: dict, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Continuous interface: ids (m,) (the image's raw code tokens), feature bits (m, 1, dim) and
        cells (m, 2) of one image."""
        sid = row["sample_id"]
        H, W = (int(s) for s in row["grid_shapes"][position][:2])
        flat = np.asarray((row.get("pixel_features") or [[]] * (position + 1))[position], dtype=np.float32)
        if flat.size == 0 or flat.size % (H * W):
            raise BadSample(f"sample {sid}: image at position {position} has {flat.size} feature values for a {H}x{W} grid "
                            "(the continuous interface needs token shards written with tokenize.features: true)")
        if not np.isfinite(flat).all():
            raise BadSample(f"sample {sid}: non-finite encoder feature at image position {position}")
        codes = self.grid(row, position, "pixel")[:, :, 0].reshape(-1)  # the targets: what the features quantise to
        if codes.min() < 0 or codes.max() >= self.vocab.visual_size:  # `grid` checked their count against the shape
            raise BadSample(f"sample {sid}: image at position {position} has pixel codes outside 0..{self.vocab.visual_size - 1}")
        ids = np.concatenate([self.image_header(H, W), codes + self.vocab.visual_base, [self.vocab.image_end]]).astype(np.int64)
        bits = np.full((len(ids), 1, flat.size // (H * W)), -1, dtype=np.int64)
        bits[3:3 + H * W, 0] = feature_bits(flat.reshape(H * W, -1))
        rc = np.stack(np.divmod(np.arange(H * W, dtype=np.int64), W), axis=1)
        return ids, bits, _with_markers(rc)

    # ------------------------------------------------------------------ whole samples

    def build(self, row: dict, loss_mask: str = "all", seed: int = 0, epoch: int = 0, t2i_rate: float = 0.0,
              cfg_text_dropout: float = 0.0) -> Sequence:
        sid = row["sample_id"]
        is_image = list(row["is_image"])
        order = list(range(len(is_image)))
        drop = set()
        rng = sample_rng(seed, sid, epoch)
        if row["kind"] == "image_text" and len(order) == 2:
            image_pos, text_pos = (0, 1) if is_image[0] else (1, 0)
            if rng.random() < t2i_rate:
                order = [text_pos, image_pos]
                if rng.random() < cfg_text_dropout:
                    drop.add(text_pos)
            else:
                order = [image_pos, text_pos]
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        roles = meta.get("roles")
        independent = bool(roles) and meta.get("turns") == "independent"
        timestamps = row.get("timestamps")
        kept = [p for p in order if p not in drop]
        answer_positions = ({p for p in kept if roles[p] == "assistant"} if roles else {kept[-1]})

        n_codebooks = self.vocab.code_slots(len(self.codebooks))
        parts: list[tuple[np.ndarray, bool, np.ndarray | None, np.ndarray | None, int]] = [
            (np.array([self.vocab.bos_id]), False, None, None, 0)]  # (ids, target, codes, cells, turn)
        turn = 0
        for p in kept:
            if independent and roles[p] == "user":
                turn += 1
            codes = cells = None
            if is_image[p]:
                prefix = []
                if timestamps is not None and p < len(timestamps) and timestamps[p] is not None and row["kind"] == "video":
                    prefix = [self.vocab.frame, self.vocab.time_token(float(timestamps[p]))]
                ids, codes, cells = self.image_span(row, p)
                ids = np.concatenate([np.asarray(prefix, dtype=np.int64), ids])
                cells = np.concatenate([np.full((len(prefix), 2), -1, np.int64), cells])
                if codes is not None:
                    codes = np.concatenate([np.full((len(prefix),) + codes.shape[1:], -1, np.int64), codes])
                target = loss_mask in ("all", "image") or (loss_mask == "answers" and p in answer_positions)
            else:
                ids = self.text_ids(row["text_ids"][p], sid)
                target = loss_mask in ("all", "text") or (loss_mask == "answers" and p in answer_positions)
            if roles and roles[p] == "assistant":  # a turn ends with <eos>, so answers know when to stop
                ids = np.concatenate([ids, [self.vocab.eos_id]])
                if cells is not None:
                    cells = np.concatenate([cells, [[-1, -1]]])
            parts.append((ids, target, codes, cells, turn))
        if not (roles and kept and roles[kept[-1]] == "assistant"):
            parts.append((np.array([self.vocab.eos_id]), loss_mask != "image", None, None, turn))
        return self._assemble(sid, parts, n_codebooks)

    def _assemble(self, sid: str, parts: list, n_codebooks: int) -> Sequence:
        """Concatenate (ids, target, codes, cells, turn) parts; turn k > 0 restarts its positions
        where the shared prefix (turn 0) ends."""
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        loss = np.concatenate([np.full(len(p[0]), p[1]) for p in parts]).astype(bool)
        turns = np.concatenate([np.full(len(p[0]), p[4], np.int64) for p in parts])
        has_image = any(p[3] is not None for p in parts)
        cells = np.concatenate([p[3] if p[3] is not None else np.full((len(p[0]), 2), -1, np.int64) for p in parts]) if has_image else None
        codes = None
        code_shape = next((p[2].shape[1:] for p in parts if p[2] is not None), (n_codebooks, self.depth))
        if n_codebooks:
            codes = np.concatenate([p[2] if p[2] is not None else np.full((len(p[0]),) + code_shape, -1, np.int64)
                                    for p in parts])
        positions = None
        if turns.any():
            shared = int((turns == 0).sum())
            if (turns[:shared] != 0).any():
                raise BadSample(f"sample {sid}: shared content after the first independent turn")
            positions = np.arange(len(ids), dtype=np.int64)
            for k in np.unique(turns[turns > 0]):
                at = np.flatnonzero(turns == k)
                positions[at] = shared + np.arange(len(at))
        return Sequence(sid, ids, loss, codes, positions, turns if turns.any() else None, cells)

    # ------------------------------------------------------------------ prompts (generation / eval)

    def image_prefix(self, row: dict, position: int = 0) -> Sequence:
        """<bos> + one image: the prompt for captioning / questions."""
        ids, codes, cells = self.image_span(row, position)
        ids = np.concatenate([[self.vocab.bos_id], ids]).astype(np.int64)
        if codes is not None:
            codes = np.concatenate([np.full((1,) + codes.shape[1:], -1, np.int64), codes])
        cells = np.concatenate([[[-1, -1]], cells])
        return Sequence(row["sample_id"], ids, np.zeros(len(ids), bool), codes, cells=cells)

    def question_prefix(self, row: dict, text_ids, position: int = 0) -> Sequence:
        """<bos> + a question + one image: the prompt of a question the model reads before its image
        (`ModelConfig.question_first`), as `build` lays out such a sample up to its answer."""
        ids, codes, cells = self.image_span(row, position)
        text = np.asarray(text_ids, dtype=np.int64)
        head = np.concatenate([[self.vocab.bos_id], text]).astype(np.int64)
        if codes is not None:
            codes = np.concatenate([np.full((len(head),) + codes.shape[1:], -1, np.int64), codes])
        cells = np.concatenate([np.full((len(head), 2), -1, np.int64), cells])
        ids = np.concatenate([head, ids]).astype(np.int64)
        return Sequence(row["sample_id"], ids, np.zeros(len(ids), bool), codes, cells=cells)

    def extend_text(self, seq: Sequence, text_ids) -> Sequence:
        ids = np.asarray(text_ids, dtype=np.int64)
        codes = None
        if seq.codes is not None:
            codes = np.concatenate([seq.codes, np.full((len(ids),) + seq.codes.shape[1:], -1, np.int64)])
        cells = None if seq.cells is None else np.concatenate([seq.cells, np.full((len(ids), 2), -1, np.int64)])
        return Sequence(seq.sample_id, np.concatenate([seq.ids, ids]), np.zeros(len(seq.ids) + len(ids), bool), codes,
                        cells=cells)


def _with_markers(anchors: np.ndarray) -> np.ndarray:
    """(m, 2) anchors of an image's visual tokens -> (m + 4, 2) with -1 rows for
    <|image_start|> <h=> <w=> before and <|image_end|> after."""
    return np.concatenate([np.full((3, 2), -1, np.int64), anchors.astype(np.int64), [[-1, -1]]])
