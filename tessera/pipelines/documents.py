"""Interleaved web documents (OBELICS-style JSON lines).

A document is `{"id", "texts": [str|null], "images": [str|null], ...}` with aligned lists
and exactly one non-null per position. An image is a `data:` URI or a path relative to
the .jsonl file; a path that escapes that directory (`../`, absolute, `~`, a URI
scheme) is refused before anything is opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import posixpath

from tessera import storage
from tessera.pipelines.images import Rejected


def document_key(line: str) -> str:
    """The document's `id`, or a hash of the raw line when it has none (or is not JSON)."""
    try:
        doc = json.loads(line)
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            return doc["id"]
    except json.JSONDecodeError:
        pass
    return "line-" + hashlib.sha1(line.encode()).hexdigest()[:16]


def check_aligned(texts, images) -> None:
    """The OBELICS / MMC4 / MINT-1T convention: two lists of one length, and at each position exactly
    one of a text and an image (null where the other is set). Raises Rejected."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise Rejected("malformed_document", "'texts' and 'images' must both be lists")
    if len(texts) != len(images):
        raise Rejected("malformed_document", f"'texts' ({len(texts)}) and 'images' ({len(images)}) differ in length")
    for i, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None):
            raise Rejected("malformed_document", f"position {i} must hold exactly one of a text or an image")


def json_object(text, what: str = "the document") -> dict:
    """JSON text (str or bytes) -> the object it holds, or Rejected('malformed_document') saying why."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed_document", f"{what} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise Rejected("malformed_document", f"{what} is a JSON {type(doc).__name__}, expected an object")
    return doc


def parse_document(line: str) -> dict:
    """JSON line -> validated dict with aligned `texts`/`images`. Raises Rejected."""
    doc = json_object(line)
    texts, images = doc.get("texts"), doc.get("images")
    check_aligned(texts, images)
    for i, (t, im) in enumerate(zip(texts, images)):
        if t is not None and not isinstance(t, str) or im is not None and not isinstance(im, str):
            raise Rejected("malformed_document", f"position {i}: texts and image references must be strings")
    if not any(im is not None for im in images):
        raise Rejected("malformed_document", "document has no images")
    return doc


def safe_relative_path(ref: str) -> str:
    """Normalised relative path inside the document root, or Rejected('unsafe_path')."""
    if "://" in ref or ref.startswith(("/", "\\", "~")) or (len(ref) > 1 and ref[1] == ":"):
        raise Rejected("unsafe_path", f"image reference {ref!r} is absolute or a URI; only paths relative to the document are allowed")
    norm = posixpath.normpath(ref.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise Rejected("unsafe_path", f"image reference {ref!r} escapes the document root")
    return norm


def load_image_ref(ref: str, root_uri: str) -> bytes:
    """Bytes of an image reference of a document stored under `root_uri`. Raises Rejected."""
    if ref.startswith("data:"):
        try:
            header, payload = ref.split(",", 1)
            if ";base64" not in header:
                raise ValueError("only base64 data URIs are supported")
            return base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error) as e:
            raise Rejected("malformed_document", f"bad data URI: {e}") from e
    rel = safe_relative_path(ref)
    uri = storage.join(root_uri, rel)
    if not storage.exists(uri):
        raise Rejected("missing_file", f"image {ref!r} not found under the document root")
    return storage.read_bytes(uri)
