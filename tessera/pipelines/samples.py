"""Raw source rows -> interleaved samples (or rejects). Pure functions, testable without Ray.

Each `*_batch` function maps a pyarrow batch of one reader's rows to a table with
`NORMALIZED_SCHEMA`: the sample columns plus `reject_reason`/`reject_detail`, which are
set (and the content left empty) for rows that cannot be used. Errors are caught per
row, so one bad row never fails a block; an unexpected exception becomes
`internal_error` with its type and message rather than a lost row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import traceback
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera import storage
from tessera.config import PrepareConfig, SourceConfig
from tessera.pipelines import documents, images, subtitles, video
from tessera.pipelines.images import Rejected
from tessera.schema import SAMPLE_SCHEMA, sample_id

NORMALIZED_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA) + [pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string())],
    metadata={"tessera.schema": "normalized"},
)


# ----------------------------------------------------------------------------- sample assembly


def _content_hash(kind: str, texts: list, arrays: list) -> str:
    h = hashlib.sha256(kind.encode())
    for t, a in zip(texts, arrays):
        if t is not None:
            h.update(b"T" + t.encode())
        else:
            h.update(b"I" + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def curriculum_tags(kind: str, texts: list, n_images: int, meta: dict, cfg: PrepareConfig) -> list[str]:
    """`key=value` tags used by training-stage mixtures. `difficulty` is easy/medium/hard."""
    c = cfg.curriculum
    words = sum(len(t.split()) for t in texts if t)
    n_objects = len(meta.get("scene", {}).get("objects", [])) if isinstance(meta.get("scene"), dict) else 0
    if kind == "image_text":
        if (n_objects and n_objects <= c.easy_max_objects) or words <= c.easy_max_words:
            difficulty = "easy"
        elif words >= c.hard_min_words or n_objects >= 3:
            difficulty = "hard"
        else:
            difficulty = "medium"
    else:
        difficulty = "hard" if n_images >= 3 or words >= c.hard_min_words else "medium"
    tags = [f"difficulty={difficulty}", f"kind={kind}", f"images={n_images}"]
    if n_objects:
        tags.append(f"objects={n_objects}")
    if isinstance(meta.get("task"), str):
        tags.append(f"task={meta['task']}")
    return tags


def check_texts(texts: list[str], cfg: PrepareConfig, what: str) -> None:
    total = sum(len(t.strip()) for t in texts)
    if total < cfg.text.min_chars:
        raise Rejected("text_too_short", f"{what} has {total} characters < min_chars {cfg.text.min_chars}")
    if total > cfg.text.max_chars:
        raise Rejected("text_too_long", f"{what} has {total} characters > max_chars {cfg.text.max_chars}")


def build_sample(source: str, kind: str, key: str, positions: list[tuple[str, Any]], meta: dict,
                 cfg: PrepareConfig, timestamps: list[float] | None = None) -> dict:
    """positions: [("text", str) | ("image", uint8 (R, R, 3))] in order -> a sample row."""
    texts = [v if k == "text" else None for k, v in positions]
    arrays = [v if k == "image" else None for k, v in positions]
    return {
        "sample_id": sample_id(source, key),
        "source": source,
        "kind": kind,
        "texts": texts,
        "images": [images.encode_png(a) if a is not None else None for a in arrays],
        "timestamps": timestamps,
        "meta": json.dumps(meta, sort_keys=True),
        "curriculum": curriculum_tags(kind, [t for t in texts if t], sum(a is not None for a in arrays), meta, cfg),
        "content_hash": _content_hash(kind, texts, arrays),
        "reject_reason": None,
        "reject_detail": None,
    }


def reject_row(source: str, kind: str, key: str, reason: str, detail: str) -> dict:
    return {
        "sample_id": sample_id(source, key), "source": source, "kind": kind, "texts": [], "images": [],
        "timestamps": None, "meta": json.dumps({"key": key}), "curriculum": [], "content_hash": "",
        "reject_reason": reason, "reject_detail": detail[:2000],
    }


def _guarded(source: str, kind: str, key: str, fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Rejected as r:
        return reject_row(source, kind, key, r.reason, r.detail)
    except Exception as e:  # never lose a row to an unexpected error: record it
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return reject_row(source, kind, key, "internal_error", tb)


def to_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=NORMALIZED_SCHEMA)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _missing(value: Any) -> bool:
    # Ray's webdataset reader fills a field absent from some samples with NaN, not None.
    return value is None or (isinstance(value, float) and value != value)


def _column(batch: pa.Table, name: str) -> list:
    if name not in batch.column_names:
        return [None] * batch.num_rows
    return [None if _missing(v) else v for v in batch.column(name).to_pylist()]


# ----------------------------------------------------------------------------- per source kind


WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def webdataset_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `ray.data.read_webdataset(decoder=None)`: `__key__` plus one bytes column per extension."""
    keys = _column(batch, "__key__")
    caps = _column(batch, source.caption_key)
    sidecars = _column(batch, "json") if source.caption_key != "json" else caps
    # the configured key first, then the image extensions shards commonly hold (a .png among .jpg keys);
    # raw columns, so a member that is present but empty stays `empty_file`, not `missing_image`
    image_keys = [source.image_key, *[k for k in WDS_IMAGE_KEYS if k != source.image_key]]
    present = {k: _column(batch, k) for k in batch.column_names if not k.startswith("__")}
    imgs = [next((present[k][i] for k in image_keys if k in present and present[k][i] is not None), None)
            for i in range(batch.num_rows)]
    members = [sorted(k for k, values in present.items() if values[i] is not None) for i in range(batch.num_rows)]

    def one(key, img, cap, sidecar, found):
        if img is None:
            raise Rejected("missing_image", f"no image member for key {key}: members {found}, expected one of {image_keys}")
        meta: dict = {"key": key}
        if sidecar is not None:
            try:
                extra = json.loads(_as_text(sidecar))
                meta.update(extra if isinstance(extra, dict) else {"json": extra})
            except json.JSONDecodeError:
                meta["json_error"] = "unparseable sidecar"
        text = _as_text(cap)
        if source.caption_key == "json" and text is not None:
            text = meta.get("caption")
        if text is None or not text.strip():
            raise Rejected("missing_caption", f"no '{source.caption_key}' caption for key {key}")
        check_texts([text], cfg, "caption")
        arr = images.decode_image(img, cfg.image)
        return build_sample(source.name, "image_text", key, [("image", arr), ("text", text.strip())], meta, cfg)

    return to_table(_guarded(source.name, "image_text", str(k), lambda k=k, i=i, c=c, s=s, m=m: one(k, i, c, s, m))
                    for k, i, c, s, m in zip(keys, imgs, caps, sidecars, members))


def hf_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of a Hugging Face dataset: an image column (struct bytes/path, or bytes) and a caption column."""
    keys = _column(batch, source.id_key) if source.id_key else _column(batch, "__row_index__")
    imgs = _column(batch, source.image_key)
    caps = _column(batch, source.caption_key)
    scenes = _column(batch, "scene")

    def one(key, img, cap, scene):
        meta: dict = {"key": key}
        if scene:
            try:
                meta["scene"] = json.loads(scene)
            except (json.JSONDecodeError, TypeError):
                pass
        if cap is None or not str(cap).strip():
            raise Rejected("missing_caption", f"column '{source.caption_key}' is empty for row {key}")
        check_texts([str(cap)], cfg, "caption")
        data = img.get("bytes") if isinstance(img, dict) else img
        if data is None and isinstance(img, dict) and img.get("path"):
            data = storage.read_bytes(img["path"])
        arr = images.decode_image(data, cfg.image)
        return build_sample(source.name, "image_text", key, [("image", arr), ("text", str(cap).strip())], meta, cfg)

    keys = [str(k) if k is not None else _row_key(i, c) for k, i, c in zip(keys, imgs, caps)]
    return to_table(_guarded(source.name, "image_text", k, lambda k=k, i=i, c=c, s=s: one(k, i, c, s))
                    for k, i, c, s in zip(keys, imgs, caps, scenes))


def _row_key(img, cap) -> str:
    """The key of a parquet row without an id column: a hash of its image and caption."""
    data = img.get("bytes") if isinstance(img, dict) else img
    path = img.get("path") if isinstance(img, dict) else None
    h = hashlib.sha1(data if isinstance(data, bytes) else str(path).encode())
    h.update(str(cap).encode())
    return "row-" + h.hexdigest()[:20]


def video_key(path: str, root: str) -> str:
    """Key of a video file: its path relative to the source root (stable across mounts)."""
    rel = path.split("://")[-1]
    root_path = root.split("://")[-1].rstrip("/")
    if "://" not in root:
        import os

        root_path = os.path.abspath(root_path)
    return rel[len(root_path) + 1:] if rel.startswith(root_path + "/") else rel.rsplit("/", 1)[-1]


def video_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `ray.data.read_binary_files(include_paths=True)` over every file of the source but the
    sidecars (`video.source_files`); subtitles come from the `<stem>.srt`, `.vtt` or `.json` file next
    to each video (`subtitles.parse`)."""
    datas = _column(batch, "bytes")
    paths = _column(batch, "path")

    def one(data, path, key):
        video.check_container(path)
        sidecar_uri = video.subtitle_sidecar(storage.with_scheme(path, source.uri))
        side, subs = {}, []
        if sidecar_uri is not None:
            name = sidecar_uri.rsplit("/", 1)[-1]
            raw = storage.read_bytes(sidecar_uri)
            if name.endswith(".json"):  # parsed once: its subtitles, and the scene the shapes world records
                side = documents.json_object(raw.decode("utf-8-sig", errors="replace"), f"subtitle sidecar {name}")
                subs = subtitles.from_sidecar(side, name)
            else:
                subs = subtitles.parse(raw, name)
        if cfg.video.require_text and not any(str(s.get("text", "")).strip() for s in subs):
            stem = key.rsplit(".", 1)[0]
            raise Rejected("missing_caption", f"no subtitles for {key} (expected {stem}.srt, .vtt or .json beside it)")
        frames, times = video.decode_clip(data, cfg.video)
        meta = {"key": key, "scene": side.get("scene"), "moves": side.get("moves")}
        return clip_sample(source.name, key, frames, times, subs, meta, cfg)

    keys = [video_key(p, source.uri) for p in paths]
    return to_table(_guarded(source.name, "video", k, lambda d=d, p=p, k=k: one(d, p, k)) for d, p, k in zip(datas, paths, keys))


def clip_sample(source: str, key: str, frames: np.ndarray, times: np.ndarray, subs: list[dict], meta: dict,
                cfg: PrepareConfig) -> dict:
    """A decoded clip (frames (N, H, W, 3), their times (N,) s) and its subtitles -> a video sample row,
    subtitles placed before the first frame they overlap (`video.interleave`)."""
    positions, stamps = [], []
    for what, t, value in video.interleave(times, subs):
        positions.append(("image", images.normalize_array(frames[value], cfg.image)) if what == "image" else ("text", value))
        stamps.append(round(float(t), 6))
    texts = [v for k, v in positions if k == "text"]
    if texts:
        check_texts(texts, cfg, "subtitles")
    meta = {**meta, "num_frames": int(len(frames))}
    return build_sample(source, "video", key, positions, {k: v for k, v in meta.items() if v is not None}, cfg, timestamps=stamps)


def web_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `ray.data.read_text(include_paths=True)` over .jsonl files: one document per line."""
    lines = _column(batch, "text")
    paths = _column(batch, "path")

    def one(line, path, key):
        doc = documents.parse_document(line)
        root = storage.with_scheme(path.rsplit("/", 1)[0], source.uri)
        positions = []
        for t, ref in zip(doc["texts"], doc["images"]):
            if t is not None:
                positions.append(("text", t))
            else:
                positions.append(("image", images.decode_image(documents.load_image_ref(ref, root), cfg.image)))
        check_texts([v for k, v in positions if k == "text"], cfg, "document text")
        meta = {"key": key, "url": doc.get("url")}
        roles = doc.get("roles")
        if roles is not None:
            if not isinstance(roles, list) or len(roles) != len(positions) or any(
                    (r is None) != (k == "image") or (r is not None and r not in ("user", "assistant")) for r, (k, _) in zip(roles, positions)):
                raise Rejected("malformed_document", "'roles' must align with 'texts': 'user' or 'assistant' at each text, null at each image")
            meta["roles"] = roles
        if isinstance(doc.get("task"), str):
            meta["task"] = doc["task"]
        if doc.get("turns") == "independent" and roles is not None:
            meta["turns"] = "independent"  # each (user, assistant) pair stands alone: see model/sequence.py
        return build_sample(source.name, "web", key, positions, meta, cfg)

    keys = [documents.document_key(line) for line in lines]
    return to_table(_guarded(source.name, "web", k, lambda ln=ln, p=p, k=k: one(ln, p, k)) for ln, p, k in zip(lines, paths, keys))


BATCH_FUNCTIONS = {"webdataset": webdataset_batch, "hf_dataset": hf_batch, "video": video_batch, "web": web_batch}


# ----------------------------------------------------------------------------- dedup and split


def duplicate_losers(sample_ids: list[str], hashes: list[str]) -> dict[str, str]:
    """{loser sample_id: surviving sample_id} for exact duplicates; the smallest id survives,
    so which copy is kept does not depend on read order or cluster size."""
    best: dict[str, str] = {}
    for sid, h in zip(sample_ids, hashes):
        if h and (h not in best or sid < best[h]):
            best[h] = sid
    return {sid: best[h] for sid, h in zip(sample_ids, hashes) if h and best[h] != sid}


def hashed_rows(batch: pa.Table) -> pa.Table:
    """(sample_id, content_hash) of the rows that have a content hash: the input of the dedup groupby."""
    import pyarrow.compute as pc

    has_hash = pc.fill_null(pc.not_equal(batch.column("content_hash"), ""), False)
    return batch.filter(has_hash).select(["sample_id", "content_hash"])


def duplicated_groups(groups: pa.Table) -> pa.Table:
    """Rows of the groupby `content_hash -> count(), min(sample_id)` with more than one member."""
    import pyarrow.compute as pc

    return groups.filter(pc.greater(groups.column("count()"), 1))


def duplicate_winners(duplicates_dir: str) -> dict[str, str]:
    """{content hash: surviving sample id} of the duplicated hashes, from the parquet the dedup groupby
    wrote on the cluster ("" or no files = no duplicates); read once per process and set of files
    (each write names its files anew, so a rewritten table is never served from the cache)."""
    if not duplicates_dir or not storage.exists(duplicates_dir):
        return {}
    return _read_winners(tuple(storage.list_files(duplicates_dir, ".parquet")))


@functools.lru_cache(maxsize=4)
def _read_winners(files: tuple[str, ...]) -> dict[str, str]:
    winners = {}
    for uri in files:
        fs, path = storage.resolve(uri)
        t = pq.read_table(path, filesystem=fs, columns=["content_hash", "min(sample_id)"])
        winners.update(zip(t.column("content_hash").to_pylist(), t.column("min(sample_id)").to_pylist()))
    return winners


def _row_fates(batch: pa.Table, duplicates_dir: str):
    """(sample_id, source, reject reason or None, detail, surviving id if a duplicate loser else None) per row."""
    winners = duplicate_winners(duplicates_dir)
    cols = [batch.column(c).to_pylist() for c in ("sample_id", "source", "reject_reason", "content_hash")]
    details = batch.column("reject_detail").to_pylist() if "reject_detail" in batch.column_names else [None] * batch.num_rows
    for (sid, src, reason, h), detail in zip(zip(*cols), details):
        winner = winners.get(h) if h else None
        yield sid, src, reason, detail, (winner if winner is not None and winner != sid else None)


def row_statistics(batch: pa.Table, duplicates_dir: str = "") -> pa.Table:
    """One row per block: {source: {reject reason, "duplicate" or "" (kept): rows}} as JSON, summed on the driver."""
    counts: dict = {}
    for _, source, reason, _, winner in _row_fates(batch, duplicates_dir):
        per = counts.setdefault(source, {})
        key = reason or ("duplicate" if winner else "")
        per[key] = per.get(key, 0) + 1
    return pa.table({"counts": [json.dumps(counts)]})


def split_samples(batch: pa.Table, duplicates_dir: str = "") -> pa.Table:
    """Keep accepted, non-duplicate rows, in the sample schema."""
    ok = np.array([reason is None and winner is None for _, _, reason, _, winner in _row_fates(batch, duplicates_dir)], dtype=bool)
    return batch.filter(pa.array(ok)).select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA)


def split_rejects(batch: pa.Table, duplicates_dir: str = "", stage: str = "prepare") -> pa.Table:
    """Rejected rows and duplicate losers, in the reject schema."""
    from tessera.schema import REJECT_SCHEMA

    rows = []
    for sid, src, reason, detail, winner in _row_fates(batch, duplicates_dir):
        if reason is not None:
            rows.append({"sample_id": sid, "source": src, "stage": f"{stage}:normalize", "reason": reason, "detail": detail or ""})
        elif winner is not None:
            rows.append({"sample_id": sid, "source": src, "stage": f"{stage}:dedup", "reason": "duplicate",
                         "detail": f"same content as {winner}"})
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)
