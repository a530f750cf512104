"""Samples -> token rows, as pure functions over pyarrow batches (testable without Ray).

    decode_stage  (CPU)   PNG bytes -> raw uint8 arrays of the tokenizer's input size
    ImageEncoder  (model) arrays -> code grids, in fixed chunks so results never depend on batching
    text_stage    (CPU)   texts -> text token ids, and the final token-shard row
Per-row errors become `reject_reason`/`reject_detail`, as in `prepare`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tessera.schema import REJECT_SCHEMA, token_schema
from tessera.tokenize.images import decode_rgb

DECODED_COLUMNS = ["sample_id", "source", "kind", "texts", "timestamps", "curriculum", "meta"]


def decode_stage(batch: pa.Table, image_size: int) -> pa.Table:
    """Adds `arrays: list<binary>` (raw (S, S, 3) uint8 per image position, null at text positions)."""
    rows = []
    for row in batch.select(DECODED_COLUMNS + ["images"]).to_pylist():
        out = {k: row[k] for k in DECODED_COLUMNS}
        try:
            out["arrays"] = [None if png is None else decode_rgb(png, image_size).tobytes() for png in row["images"]]
            out["reject_reason"], out["reject_detail"] = None, None
        except Exception as e:  # an image the tokenizer cannot take
            out["arrays"] = []
            out["reject_reason"], out["reject_detail"] = "untokenizable_image", f"{type(e).__name__}: {e}"[:500]
        rows.append(out)
    return pa.Table.from_pylist(rows)


class ImageEncoder:
    """Holds a loaded visual tokenizer; encodes uint8 images in fixed-size, padded chunks."""

    def __init__(self, tokenizer_dir: str, image_size: int, chunk: int, device: str = "cpu", features: bool = False):
        from tessera.tokenize.tokenizer import load_tokenizer

        self.model, self.cfg, _ = load_tokenizer(tokenizer_dir, device)
        if features and self.cfg.preset != "vq":
            raise ValueError(f"tokenize.features: the {self.cfg.preset} tokenizer has no pre-quantisation features "
                             "(only the vq preset)")
        self.device = torch.device(device)
        self.size = image_size
        self.chunk = chunk
        self.features = features

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S, 3) uint8 -> {"pixel": (N, h, w, D) int32[, "semantic": ...][, "features": (N, h, w, dim) float32]}."""
        out: dict[str, list] = {}
        for i in range(0, len(images), self.chunk):
            part = images[i:i + self.chunk]
            n = len(part)
            if n < self.chunk:  # pad: every forward pass has the same shape
                part = np.concatenate([part, np.zeros((self.chunk - n, *part.shape[1:]), np.uint8)])
            x = torch.as_tensor(part, device=self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                codes = self.model.encode(x, features=True) if self.features else self.model.encode(x)
            for k, v in codes.items():
                dtype = torch.float32 if k == "features" else torch.int32
                out.setdefault(k, []).append(v[:n].to(dtype).cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def encode_batch(self, batch: pa.Table) -> pa.Table:
        """Decoded rows -> rows with `pixel_codes`/`semantic_codes`/`grid_shapes` per position."""
        rows = batch.to_pylist()
        owners, arrays = [], []
        for r, row in enumerate(rows):
            if row["reject_reason"] is None:
                for p, a in enumerate(row["arrays"]):
                    if a is not None:
                        owners.append((r, p))
                        arrays.append(np.frombuffer(a, np.uint8).reshape(self.size, self.size, 3))
        codes = self.encode(np.stack(arrays)) if arrays else {}
        for row in rows:
            n = len(row["arrays"])
            row["pixel_codes"], row["semantic_codes"], row["grid_shapes"] = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
            if self.features:
                row["pixel_features"] = [[] for _ in range(n)]
        for i, (r, p) in enumerate(owners):
            grid = codes["pixel"][i]
            rows[r]["pixel_codes"][p] = grid.ravel().tolist()
            rows[r]["grid_shapes"][p] = list(grid.shape)
            if "semantic" in codes:
                rows[r]["semantic_codes"][p] = codes["semantic"][i].ravel().tolist()
            if self.features:
                rows[r]["pixel_features"][p] = codes["features"][i].ravel().tolist()
        for row in rows:
            del row["arrays"]
        return pa.Table.from_pylist(rows)


_TEXT_TOKENIZERS: dict = {}


def text_stage(batch: pa.Table, text_tokenizer: str, tokenizer_hash: str, text_tokenizer_hash: str) -> pa.Table:
    """Encoded rows -> TOKEN_SCHEMA columns + reject columns (text ids at text positions)."""
    from tessera.tokenize.text import encode_segments, load_text_tokenizer

    if text_tokenizer not in _TEXT_TOKENIZERS:  # once per worker process
        _TEXT_TOKENIZERS[text_tokenizer] = load_text_tokenizer(text_tokenizer)
    tok = _TEXT_TOKENIZERS[text_tokenizer]
    features = "pixel_features" in batch.column_names
    out = []
    for row in batch.to_pylist():
        texts = row["texts"] if row["reject_reason"] is None else []
        ids = encode_segments(tok, [t for t in texts if t is not None])
        it = iter(ids)
        out.append({
            "sample_id": row["sample_id"], "source": row["source"], "kind": row["kind"],
            "is_image": [t is None for t in texts],
            "text_ids": [next(it) if t is not None else [] for t in texts],
            "pixel_codes": row["pixel_codes"] if texts else [], "semantic_codes": row["semantic_codes"] if texts else [],
            "grid_shapes": row["grid_shapes"] if texts else [], "timestamps": row["timestamps"],
            "curriculum": row["curriculum"], "meta": row["meta"], "tokenizer_hash": tokenizer_hash,
            "text_tokenizer_hash": text_tokenizer_hash, "reject_reason": row["reject_reason"], "reject_detail": row["reject_detail"],
            "busy_s": row.get("busy_s", 0.0), "idle_s": row.get("idle_s", 0.0), "actor": row.get("actor", ""),
            **({"pixel_features": row["pixel_features"] if texts else []} if features else {}),
        })
    extra = [pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string()), pa.field("busy_s", pa.float64()),
             pa.field("idle_s", pa.float64()), pa.field("actor", pa.string())]
    return pa.Table.from_pylist(out, schema=pa.schema(list(token_schema(features)) + extra))


def split_tokens(batch: pa.Table) -> pa.Table:
    """The good rows in the token schema (with `pixel_features` when the batch carries them)."""
    schema = token_schema("pixel_features" in batch.column_names)
    ok = pa.array([r is None for r in batch.column("reject_reason").to_pylist()])
    return batch.filter(ok).select(schema.names).cast(schema)


def split_rejects(batch: pa.Table) -> pa.Table:
    rows = [{"sample_id": s, "source": src, "stage": "tokenize", "reason": r, "detail": d or ""}
            for s, src, r, d in zip(*(batch.column(c).to_pylist() for c in ("sample_id", "source", "reject_reason", "reject_detail")))
            if r is not None]
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def grid_of(row: dict, position: int, codebook: str = "pixel") -> np.ndarray:
    """(H, W, D) int32 code grid of an image position of a token row."""
    return np.asarray(row[f"{codebook}_codes"][position], np.int32).reshape(row["grid_shapes"][position])


def block_statistics(batch: pa.Table) -> pa.Table:
    """One encoded block -> one row holding its counts as JSON (rows, images, text tokens, image codes,
    rejects by reason, per actor: rows, images, busy and idle seconds), so a report never needs the rows."""
    import json

    stats = {"rows": 0, "images": 0, "text_tokens": 0, "image_codes": 0, "rejects_by_reason": {}, "actors": {}}
    cols = {c: batch.column(c).to_pylist() for c in ("is_image", "text_ids", "pixel_codes", "reject_reason", "busy_s", "idle_s", "actor")}
    for is_image, text_ids, codes, reason, busy, idle, actor in zip(*cols.values()):
        stats["rows"] += 1
        a = stats["actors"].setdefault(actor or "none", {"rows": 0, "images": 0, "busy_s": 0.0, "idle_s": 0.0})
        a["rows"] += 1
        a["busy_s"] += busy or 0.0
        a["idle_s"] += idle or 0.0
        if reason is not None:
            stats["rejects_by_reason"][reason] = stats["rejects_by_reason"].get(reason, 0) + 1
            continue
        images = sum(is_image)
        stats["images"] += images
        a["images"] += images
        stats["text_tokens"] += sum(len(ids) for ids in text_ids)
        stats["image_codes"] += sum(len(c) for c in codes)
    return pa.table({"stats": [json.dumps(stats)]})


def merge_statistics(blocks) -> dict:
    """Sum `block_statistics` rows (JSON strings) into one dict of the same shape."""
    import json

    total = {"rows": 0, "images": 0, "text_tokens": 0, "image_codes": 0, "rejects_by_reason": {}, "actors": {}}
    for raw in blocks:
        s = json.loads(raw)
        for k in ("rows", "images", "text_tokens", "image_codes"):
            total[k] += s[k]
        for reason, n in s["rejects_by_reason"].items():
            total["rejects_by_reason"][reason] = total["rejects_by_reason"].get(reason, 0) + n
        for actor, a in s["actors"].items():
            t = total["actors"].setdefault(actor, {"rows": 0, "images": 0, "busy_s": 0.0, "idle_s": 0.0})
            for k in t:
                t[k] += a[k]
    return total
