"""What a configured source holds, checked before any work: every source's location is listed (and a
Hugging Face dataset's columns read) by the driver before Ray starts or anything is written, so a
source that cannot be read fails like a config error: one line naming the source and the location."""

from __future__ import annotations

from tessera import storage
from tessera.config import ConfigError, SourceConfig
from tessera.pipelines import video

SUFFIXES = {"webdataset": ".tar", "web": ".jsonl", "img2dataset": ".tar", "mint1t": ".tar", "video2dataset": ".tar",
            "obelics": ".parquet"}


class SourceError(ConfigError):
    """A configured source cannot be read at all (missing directory, no files, missing columns)."""

    def __init__(self, source: SourceConfig, message: str):
        super().__init__("prepare.sources", f"source '{source.name}' ({source.kind}): {message}")


def _file_or_files(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """`uri` itself when it is a file with one of `suffixes`, else the files below it that have one."""
    if any(uri.endswith(s) for s in suffixes) and storage.exists(uri) and not storage.list_dirs(uri):
        return [uri]
    return [f for f in storage.list_files(uri, "", recursive=True) if f.endswith(suffixes)]


def source_files(source: SourceConfig, uri: str) -> list[str]:
    """The input files of a file-based source (every file of a video source, sidecars aside: what is
    not a readable video becomes a reject), or [] for a Hugging Face dataset after checking its columns."""
    if source.kind in SUFFIXES:
        files = storage.list_files(uri, SUFFIXES[source.kind])
        if not files:
            raise SourceError(source, f"no *{SUFFIXES[source.kind]} files under {uri}")
        return files
    if source.kind == "llava":
        files = _file_or_files(uri, (".json", ".jsonl"))
        if not files:
            raise SourceError(source, f"{uri} is not a .json / .jsonl file nor a directory holding them")
        if not storage.list_files(source.image_folder, "", recursive=True):
            raise SourceError(source, f"image_folder {source.image_folder} does not exist or is empty")
        return files
    if source.kind == "video_csv":
        files = _file_or_files(uri, (".csv",))
        if not files:
            raise SourceError(source, f"{uri} is not a .csv manifest nor a directory holding them")
        return files
    if source.kind == "video":
        files = video.source_files(uri)
        if not files:
            raise SourceError(source, f"no video files under {uri}")
        return files
    if source.kind == "hf_dataset":
        return hf_parquet_files(source, uri) if is_parquet_dataset(uri) else (hf_dataset(source, uri), [])[1]
    raise SourceError(source, f"unknown source kind {source.kind!r}")


def is_parquet_dataset(uri: str) -> bool:
    """A directory of parquet files as `datasets` writes them (`to_parquet`, or the Hub's `data/*.parquet`)
    rather than a `save_to_disk` directory (which holds `dataset_info.json` / `state.json` and arrow files)."""
    return not storage.exists(storage.join(uri, "state.json")) and bool(storage.list_files(uri, ".parquet", recursive=True))


def hf_parquet_files(source: SourceConfig, uri: str) -> list[str]:
    """The parquet files of a Hugging Face parquet dataset, with the configured columns checked."""
    import pyarrow.parquet as pq

    files = storage.list_files(uri, ".parquet", recursive=True)
    fs, path = storage.resolve(files[0])
    names = pq.read_schema(path, filesystem=fs).names
    missing = [c for c in (source.image_key, source.caption_key, source.id_key) if c and c not in names]
    if missing:
        raise SourceError(source, f"columns {missing} not in {names} of {files[0]}")
    return files


def hf_dataset(source: SourceConfig, uri: str):
    """The saved Hugging Face dataset of a source, with its configured columns checked."""
    import datasets

    if not storage.exists(uri):
        raise SourceError(source, f"{uri} does not exist")
    try:
        ds = datasets.load_from_disk(uri)
    except (OSError, ValueError) as e:
        raise SourceError(source, f"{uri} is not a dataset saved with save_to_disk ({e})") from e
    missing = [c for c in (source.image_key, source.caption_key, source.id_key) if c and c not in ds.column_names]
    if missing:
        raise SourceError(source, f"columns {missing} not in {ds.column_names} of {uri}")
    return ds


def check_sources(sources: list[SourceConfig], resolve) -> None:
    """Raise `SourceError` for the first source that cannot be read; `resolve` turns a configured uri into a location."""
    for source in sources:
        source_files(resolved(source, resolve), resolve(source.uri))


def resolved(source: SourceConfig, resolve) -> SourceConfig:
    """The source with its locations (`uri`, `image_folder`) expanded."""
    import dataclasses

    return dataclasses.replace(source, uri=resolve(source.uri), image_folder=resolve(source.image_folder) if source.image_folder else "")
