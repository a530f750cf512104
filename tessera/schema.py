"""Versioned pyarrow schemas: the data contracts between jobs.

Every writer validates its table against these (`validate`), and every dataset
directory's `manifest.json` records `SCHEMA_VERSION`. Bump the version on any
change a reader could notice.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SCHEMA_VERSION = "1.0"

KINDS = ("image_text", "video", "web")

# Interleaved sample (OBELICS-style). `texts` and `images` are aligned: at each position
# exactly one of the two is non-null. `timestamps` (seconds) is aligned too and only set
# for video samples. `curriculum` holds `key=value` tags such as `difficulty=easy`.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("timestamps", pa.list_(pa.float64()), nullable=True),
        pa.field("meta", pa.string(), nullable=False),
        pa.field("curriculum", pa.list_(pa.string()), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
    ],
    metadata={"tessera.schema": "sample", "tessera.schema_version": SCHEMA_VERSION},
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
    metadata={"tessera.schema": "reject", "tessera.schema_version": SCHEMA_VERSION},
)

# Token shard: one row per sample, positions aligned as in the sample. At a text position
# `text_ids` holds the text tokenizer's ids and the code lists are empty; at an image position
# `pixel_codes` (and `semantic_codes` for the dual tokenizer) hold the flattened [H, W, D] grid
# whose shape is `grid_shapes`. The tokenizer identities are repeated per row for self-description.
# With `tokenize.features` the table also has `pixel_features` (see `token_schema`).
TOKEN_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("is_image", pa.list_(pa.bool_()), nullable=False),
        pa.field("text_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("pixel_codes", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("semantic_codes", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("grid_shapes", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("timestamps", pa.list_(pa.float64()), nullable=True),
        pa.field("curriculum", pa.list_(pa.string()), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
        pa.field("tokenizer_hash", pa.string(), nullable=False),
        pa.field("text_tokenizer_hash", pa.string(), nullable=False),
    ],
    metadata={"tessera.schema": "token", "tessera.schema_version": SCHEMA_VERSION},
)

FEATURES_FIELD = pa.field("pixel_features", pa.list_(pa.list_(pa.float32())), nullable=False)
"""At an image position the tokenizer encoder's pre-quantisation features, flattened (h, w, dim)
float32 (the `continuous` model interface reads them); empty at text positions."""


def token_schema(features: bool = False) -> pa.Schema:
    """TOKEN_SCHEMA, plus `pixel_features` when the tokenize job stores the continuous features."""
    return TOKEN_SCHEMA.append(FEATURES_FIELD) if features else TOKEN_SCHEMA


# Stable reject reasons. Reports count by these; tests assert them.
REASONS = (
    "empty_file",
    "corrupt_image",
    "image_too_large",
    "image_too_small",
    "bad_aspect_ratio",
    "missing_caption",
    "text_too_short",
    "text_too_long",
    "video_undecodable",
    "malformed_document",
    "unsafe_path",
    "missing_file",
    "missing_image",
    "unsupported_format",
    "download_failed",
    "http_404",
    "timeout",
    "not_an_image",
    "duplicate",
    "untokenizable_image",
    "internal_error",
)


class SchemaError(ValueError):
    pass


def sample_id(source: str, key: str) -> str:
    """Stable id of a sample: hash of its source name and its key within that source."""
    return hashlib.sha1(f"{source}\x00{key}".encode()).hexdigest()[:20]


def validate(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Check column names and types and nullability; return the table cast to `schema`
    (with its metadata). Raises SchemaError naming the first mismatch."""
    names = table.schema.names
    expected = schema.names
    if names != expected:
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in expected]
        raise SchemaError(f"columns differ from {schema.metadata[b'tessera.schema'].decode()} schema: missing {missing}, unexpected {extra}")
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type and not (pa.types.is_null(col.type) and f.nullable):
            raise SchemaError(f"column {f.name!r} has type {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise SchemaError(f"column {f.name!r} has {col.null_count} nulls but is not nullable")
    return table.cast(schema)


def check_sample_row(row: dict) -> None:
    """Row-level invariants beyond types: aligned lists with exactly one non-null per position."""
    texts, images = row["texts"], row["images"]
    if len(texts) != len(images):
        raise SchemaError(f"sample {row['sample_id']}: texts ({len(texts)}) and images ({len(images)}) not aligned")
    for i, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None):
            raise SchemaError(f"sample {row['sample_id']}: position {i} must hold exactly one of text or image")
    ts = row.get("timestamps")
    if ts is not None and len(ts) != len(texts):
        raise SchemaError(f"sample {row['sample_id']}: timestamps ({len(ts)}) not aligned with positions ({len(texts)})")
    if row["kind"] not in KINDS:
        raise SchemaError(f"sample {row['sample_id']}: kind {row['kind']!r} not in {KINDS}")


def validated(fn, schema: pa.Schema):
    """Wrap a batch function so every table it returns is checked against `schema` (writers use this)."""

    def wrapped(batch, **kwargs):
        return validate(fn(batch, **kwargs), schema)

    return wrapped
