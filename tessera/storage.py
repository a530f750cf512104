"""Every input and output location is a URI resolved through `pyarrow.fs`.

A local path for the demo; `s3://`, `gs://` or a shared mount on a cluster, so all
nodes see the same data. Small JSON artifacts are written atomically: to a
temporary name then moved (local) or as one object PUT (object stores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI or local path -> (filesystem, path inside it). Local paths become absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute (so it survives a change of directory); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_local(uri: str) -> bool:
    return isinstance(resolve(uri)[0], pafs.LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def with_scheme(path: str, like: str) -> str:
    """A path as `pyarrow.fs` returns it (no scheme) back in the URI form of `like`
    (`bucket/x` + `s3://bucket` -> `s3://bucket/x`); local paths pass through."""
    if "://" in path or "://" not in like:
        return path
    return f"{like.split('://')[0]}://{path}"


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files directly under (or below, if recursive) `uri` ending in `suffix`, sorted, as URIs/paths
    in the same form as `uri` (so they can be handed to Ray readers)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix) and not info.base_name.startswith((".", "_")):
            out.append(with_scheme(info.path, uri))
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    """Directories directly under `uri`, sorted, in the same form as `uri`."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(join(uri, i.base_name) for i in infos if i.type == pafs.FileType.Directory)


def file_size(uri: str) -> int:
    fs, path = resolve(uri)
    return fs.get_file_info(path).size or 0


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers never see a partial file."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # one object PUT is atomic on object stores
        with fs.open_output_stream(path) as f:
            f.write(data)


def append_text(uri: str, text: str) -> None:
    """Append to a small log file (metrics). Local files are appended in place; object stores have no
    append, so the object is rewritten whole (one PUT: readers see the old or the new log, never half)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_bytes(uri) if exists(uri) else b""
    write_bytes(uri, old + text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def copy_tree(src: str, dst: str) -> None:
    """Replace the directory `dst` by a copy of `src` (any filesystems: local, object store, mixed)."""
    remove_tree(dst)
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextlib.contextmanager
def local_dir(uri: str, write: bool = False) -> Iterator[str]:
    """A local directory standing for `uri`, for libraries that only take paths (`from_pretrained`,
    `save_pretrained`, safetensors): `uri` itself when local; otherwise a temporary copy of it (when it
    exists), uploaded to `uri` on a clean exit when `write`."""
    if is_local(uri):
        if write:
            os.makedirs(resolve(uri)[1], exist_ok=True)
        yield resolve(uri)[1]
        return
    tmp = tempfile.mkdtemp(prefix="tessera-")
    try:
        if exists(uri):
            fs, path = resolve(uri)
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
        if write:
            copy_tree(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
