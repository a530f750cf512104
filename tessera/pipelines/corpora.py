"""Public corpora as they are published -> interleaved samples (or rejects). Pure functions, testable
without Ray; `readers.py` feeds them each format's native Ray Data reader.

    img2dataset    {shard}.tar ({key}.jpg|png|webp, {key}.txt, {key}.json) + {shard}.parquet, whose rows
                   with `status` != "success" (never written to the tar) become `download_failed` rejects
    llava          [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}] (JSON array or
                   JSONL); `<image>` marks where each image goes (LLaVA prepends it to the first human
                   turn when absent); images under `image_folder`; no `image` = a text-only conversation
    mint1t         webdataset: {key}.json ({"texts": [...], "images": [...]}, aligned, null where the other
                   is set) and the document's images as members of the same sample ({key}.{i}.jpg ...)
    obelics        parquet rows: `texts`, `images` (URLs, null at text positions), `metadata`,
                   `general_metadata` (JSON strings); every image downloaded (`download.Downloader`)
    video2dataset  webdataset: {key}.mp4 (or webm, mkv, mov) + {key}.txt + {key}.json
    video_csv      CSV rows `path, caption[, start, end]` (WebVid / InternVid style), paths relative to
                   the manifest

Every function maps a pyarrow batch to `samples.NORMALIZED_SCHEMA`; one bad row is one reject.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re

import pyarrow as pa

from tessera import storage
from tessera.config import PrepareConfig, SourceConfig
from tessera.pipelines import documents, images, video
from tessera.pipelines.download import Downloader
from tessera.pipelines.images import Rejected
from tessera.pipelines.samples import (_as_text, _column, _guarded, build_sample, check_texts, clip_sample, reject_row,
                                       to_table, webdataset_batch)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _content_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _json_member(value, what: str) -> dict:
    return documents.json_object(_as_text(value), what)


# ----------------------------------------------------------------------------- img2dataset


def img2dataset_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of the shards' tars: img2dataset writes only successful downloads there; a sample whose
    `.json` says otherwise is refused all the same."""
    table = webdataset_batch(batch, source, cfg)
    rows = table.to_pylist()
    for row in rows:
        meta = json.loads(row["meta"])
        status = meta.get("status")
        if row["reject_reason"] is None and status not in (None, "success"):
            row.update(reject_row(source.name, "image_text", meta["key"], "download_failed",
                                  f"status {status!r}: {meta.get('error_message')}"))
    return to_table(rows)


def img2dataset_failures_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of the shards' parquet tables: one reject per row whose `status` is not "success" (the
    successful ones are read from the tars)."""
    keys, statuses, errors = (_column(batch, c) for c in ("key", "status", "error_message"))
    return to_table(reject_row(source.name, "image_text", str(k), "download_failed",
                               f"img2dataset status {s!r}: {e or 'no error message'}")
                    for k, s, e in zip(keys, statuses, errors) if s != "success")


# ----------------------------------------------------------------------------- LLaVA instruction data


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava_records(row: dict) -> list[dict]:
    """flat_map over `read_binary_files(include_paths=True)` of `.json` files: a JSON array -> one row
    per record ({"text": the record as JSON, "path"}); a file that is not an array -> one row that
    `llava_batch` rejects naming the file."""
    path = row["path"]
    try:
        records = json.loads(row["bytes"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [{"text": f"\x00not JSON: {e}", "path": path}]
    if not isinstance(records, list):
        return [{"text": f"\x00a JSON {type(records).__name__}, expected an array of conversations", "path": path}]
    return [{"text": json.dumps(r), "path": path} for r in records]


def llava_positions(record: dict, load_image) -> tuple[list, list]:
    """A LLaVA record -> (positions [("text", str) | ("image", array)], roles aligned with them).
    `load_image(relative path)` -> uint8 (R, R, 3). Raises Rejected."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv or any(
            not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ROLES for t in conv):
        raise Rejected("malformed_document", "'conversations' must be a non-empty list of {\"from\": \"human\"|\"gpt\", \"value\": str}")
    refs = record.get("image")
    refs = [] if refs is None else [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or any(not isinstance(r, str) for r in refs):
        raise Rejected("malformed_document", "'image' must be a path or a list of paths")
    turns = [(ROLES[t["from"]], t["value"]) for t in conv]
    placeholders = sum(v.count("<image>") for _, v in turns)
    if refs and placeholders == 0:  # LLaVA's own preprocessing puts the image first in the first human turn
        first = next((i for i, (r, _) in enumerate(turns) if r == "user"), 0)
        turns[first] = (turns[first][0], "<image>\n" * len(refs) + turns[first][1])
        placeholders = len(refs)
    if placeholders != len(refs):
        raise Rejected("malformed_document", f"{placeholders} <image> placeholders for {len(refs)} images")
    positions, roles, next_image = [], [], iter(refs)
    for role, value in turns:
        pieces = value.split("<image>")
        for j, piece in enumerate(pieces):
            if j > 0:
                positions.append(("image", load_image(next(next_image))))
                roles.append(None)
            if piece.strip():
                positions.append(("text", piece.strip()))
                roles.append(role)
    return positions, roles


def llava_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows {"text": one record as JSON, "path": its file} (JSONL lines or `llava_records`)."""
    lines, paths = _column(batch, "text"), _column(batch, "path")

    def load(ref):
        uri = storage.join(source.image_folder, documents.safe_relative_path(ref))
        if not storage.exists(uri):
            raise Rejected("missing_file", f"image {ref!r} not found under image_folder {source.image_folder}")
        return images.decode_image(storage.read_bytes(uri), cfg.image)

    def parsed(line, path):
        """(the record, or the Rejected it is, and its key): each line is parsed once."""
        if line.startswith("\x00"):
            name = path.rsplit("/", 1)[-1]
            return Rejected("malformed_document", f"{name} is {line[1:]}"), "file:" + name
        try:
            record = _json_member(line, "the record")
        except Rejected as r:
            return r, "record-" + _content_key(line)
        rid = record.get("id")
        return record, str(rid) if rid is not None else "record-" + _content_key(line)

    def one(record, key):
        if isinstance(record, Rejected):
            raise record
        positions, roles = llava_positions(record, load)
        check_texts([v for k, v in positions if k == "text"], cfg, "conversation")
        meta = {"key": key, "roles": roles, "task": record.get("task") if isinstance(record.get("task"), str) else "instruct",
                "image": record.get("image")}
        if record.get("turns") == "independent":  # each (user, assistant) pair stands alone: see model/sequence.py
            meta["turns"] = "independent"
        return build_sample(source.name, "web", key, positions, {k: v for k, v in meta.items() if v is not None}, cfg)

    records = [parsed(ln, p) for ln, p in zip(lines, paths)]
    return to_table(_guarded(source.name, "web", k, lambda r=r, k=k: one(r, k)) for r, k in records)


# ----------------------------------------------------------------------------- interleaved documents


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def mint1t_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `read_webdataset(decoder=None)`: `__key__`, `json` (the document) and one column per
    image member suffix (`0.jpg`, `1.png`, ...). The i-th image of the document is the member its
    `images` entry names (`{key}.{suffix}` or `{suffix}`), else the i-th image member in order."""
    keys, docs = _column(batch, "__key__"), _column(batch, "json")
    image_cols = sorted((c for c in batch.column_names if c.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS), key=_natural)
    members = {c: _column(batch, c) for c in image_cols}

    def one(key, raw, row):
        if raw is None:
            raise Rejected("malformed_document", f"sample {key} has no .json document member")
        doc = _json_member(raw, f"{key}.json")
        texts, refs = doc.get("texts"), doc.get("images")
        documents.check_aligned(texts, refs)
        present = [c for c in image_cols if members[c][row] is not None]
        positions, n = [], 0
        for t, ref in zip(texts, refs):
            if t is not None:
                positions.append(("text", str(t)))
                continue
            name = str(ref).rsplit("/", 1)[-1]
            named = name[len(key) + 1:] if name.startswith(f"{key}.") else name
            member = named if named in present else (present[n] if n < len(present) else None)
            if member is None:
                raise Rejected("missing_file", f"image {n} of {key} ({ref!r}) is not a member of the tar "
                                               f"(image members: {present or 'none'})")
            positions.append(("image", images.decode_image(members[member][row], cfg.image)))
            n += 1
        if n == 0:
            raise Rejected("malformed_document", "document has no images")
        check_texts([v for k, v in positions if k == "text"], cfg, "document text")
        meta = {"key": key, "url": doc.get("url"), "metadata": doc.get("metadata")}
        return build_sample(source.name, "web", key, positions, {k: v for k, v in meta.items() if v is not None}, cfg)

    return to_table(_guarded(source.name, "web", str(k), lambda k=k, d=d, i=i: one(str(k), d, i))
                    for i, (k, d) in enumerate(zip(keys, docs)))


def _metadata(value):
    if value is None:
        return None
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return value


def obelics_key(texts, refs, general_metadata) -> str:
    """A document's key: its page URL and position when `general_metadata` gives them, else its content."""
    gm = _metadata(general_metadata)
    if isinstance(gm, dict) and gm.get("url"):
        return f"{gm['url']}#{_content_key(texts, refs)[:8]}"
    return "doc-" + _content_key(texts, refs)


def obelics_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `read_parquet`: every image URL of the batch is fetched once through the cache; a
    document whose image cannot be had is a reject with that URL's outcome (the first failing URL's
    reason, every failing URL in the detail)."""
    texts_col, refs_col = _column(batch, "texts"), _column(batch, "images")
    metas, generals = _column(batch, "metadata"), _column(batch, "general_metadata")
    urls = [u for refs in refs_col if isinstance(refs, list) for u in refs if isinstance(u, str)]
    downloader = Downloader(cfg.download, cfg.download.cache)
    try:
        fetched = downloader.fetch(urls)
    finally:
        downloader.close()

    def one(key, texts, refs, metadata, general):
        documents.check_aligned(texts, refs)
        failed = [fetched[u] for u in refs if u is not None and fetched[u].data is None]
        if failed:
            raise Rejected(failed[0].reason, "; ".join(f.detail for f in failed))
        positions = [("text", t) if t is not None else ("image", images.decode_image(fetched[u].data, cfg.image))
                     for t, u in zip(texts, refs)]
        if not any(k == "image" for k, _ in positions):
            raise Rejected("malformed_document", "document has no images")
        check_texts([v for k, v in positions if k == "text"], cfg, "document text")
        gm = _metadata(general)
        meta = {"key": key, "url": gm.get("url") if isinstance(gm, dict) else None, "image_urls": [u for u in refs if u],
                "metadata": _metadata(metadata)}
        return build_sample(source.name, "web", key, positions, {k: v for k, v in meta.items() if v is not None}, cfg)

    keys = [obelics_key(t, r, g) for t, r, g in zip(texts_col, refs_col, generals)]
    return to_table(_guarded(source.name, "web", k, lambda k=k, t=t, r=r, m=m, g=g: one(k, t, r, m, g))
                    for k, t, r, m, g in zip(keys, texts_col, refs_col, metas, generals))


# ----------------------------------------------------------------------------- video


VIDEO_MEMBERS = video.VIDEO_EXTENSIONS


def video2dataset_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `read_webdataset(decoder=None)` over video2dataset shards: the clip, its caption (`.txt`)
    and metadata (`.json`); the caption is the clip's text at t = 0, before its first frame."""
    keys, caps, sidecars = _column(batch, "__key__"), _column(batch, "txt"), _column(batch, "json")
    clips = [next((v for v in vs if v is not None), None)
             for vs in zip(*[_column(batch, c) for c in VIDEO_MEMBERS if c in batch.column_names])] or [None] * batch.num_rows

    def one(key, clip, cap, sidecar):
        if clip is None:
            raise Rejected("missing_file", f"sample {key} has no video member (expected one of {', '.join(VIDEO_MEMBERS)})")
        meta = {"key": key}
        if sidecar is not None:
            extra = _json_member(sidecar, f"{key}.json")
            meta.update({k: v for k, v in extra.items() if k in ("url", "caption", "duration", "clips", "status")})
            if extra.get("status") not in (None, "success"):
                raise Rejected("download_failed", f"status {extra.get('status')!r}: {extra.get('error_message')}")
        text = (_as_text(cap) or "").strip()
        if cfg.video.require_text and not text:
            raise Rejected("missing_caption", f"no .txt caption for {key}")
        frames, times = video.decode_clip(clip, cfg.video)
        subs = [{"start": float(times[0]), "end": float(times[-1]), "text": text}] if text else []
        return clip_sample(source.name, key, frames, times, subs, meta, cfg)

    return to_table(_guarded(source.name, "video", str(k), lambda k=k, c=c, t=t, s=s: one(str(k), c, t, s))
                    for k, c, t, s in zip(keys, clips, caps, sidecars))


def manifest_root(uri: str) -> str:
    """The directory a CSV manifest's paths are relative to: the uri itself, or the manifest's folder."""
    return uri if storage.list_dirs(uri) or storage.list_files(uri) else uri.rsplit("/", 1)[0]


def video_csv_batch(batch: pa.Table, source: SourceConfig, cfg: PrepareConfig) -> pa.Table:
    """Rows of `read_csv`: `path`, `caption`, optional `start` / `end` (seconds) of the clip."""
    paths, caps = _column(batch, "path"), _column(batch, "caption")
    starts, ends = _column(batch, "start"), _column(batch, "end")
    root = manifest_root(source.uri)

    def one(path, cap, start, end, key):
        if path is None:
            raise Rejected("malformed_document", "row has no 'path'")
        rel = documents.safe_relative_path(str(path))
        video.check_container(rel)
        uri = storage.join(root, rel)
        if not storage.exists(uri):
            raise Rejected("missing_file", f"video {path!r} not found beside the manifest")
        text = (str(cap) if cap is not None else "").strip()
        if cfg.video.require_text and not text:
            raise Rejected("missing_caption", f"row for {path} has an empty caption")
        t0 = float(start) if start is not None else 0.0
        frames, times = video.decode_clip(storage.read_bytes(uri), cfg.video, t0, float(end) if end is not None else None)
        subs = [{"start": float(times[0]), "end": float(times[-1]), "text": text}] if text else []
        return clip_sample(source.name, key, frames, times, subs, {"key": key, "path": str(path), "start": start, "end": end}, cfg)

    keys = [f"{posixpath.normpath(str(p))}@{s if s is not None else 0}-{e if e is not None else 'end'}"
            for p, s, e in zip(paths, starts, ends)]
    return to_table(_guarded(source.name, "video", k, lambda p=p, c=c, s=s, e=e, k=k: one(p, c, s, e, k))
                    for p, c, s, e, k in zip(paths, caps, starts, ends, keys))


BATCH_FUNCTIONS = {"img2dataset": img2dataset_batch, "llava": llava_batch, "mint1t": mint1t_batch,
                   "obelics": obelics_batch, "video2dataset": video2dataset_batch, "video_csv": video_csv_batch}
