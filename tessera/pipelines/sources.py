"""What a configured source holds, checked before any work: every source's location is listed (and a
Hugging Face dataset's columns read) by the driver before Ray starts or anything is written, so a
source that cannot be read fails like a config error: one line naming the source and the location."""

from __future__ import annotations

from tessera import storage
from tessera.config import ConfigError, SourceConfig
from tessera.pipelines import video

SUFFIXES = {"webdataset": ".tar", "web": ".jsonl"}


class SourceError(ConfigError):
    """A configured source cannot be read at all (missing directory, no files, missing columns)."""

    def __init__(self, source: SourceConfig, message: str):
        super().__init__("prepare.sources", f"source '{source.name}' ({source.kind}): {message}")


def source_files(source: SourceConfig, uri: str) -> list[str]:
    """The input files of a file-based source (every file of a video source, sidecars aside: what is
    not a readable video becomes a reject), or [] for a Hugging Face dataset after checking its columns."""
    if source.kind in SUFFIXES:
        files = storage.list_files(uri, SUFFIXES[source.kind])
        if not files:
            raise SourceError(source, f"no *{SUFFIXES[source.kind]} files under {uri}")
        return files
    if source.kind == "video":
        files = video.source_files(uri)
        if not files:
            raise SourceError(source, f"no video files under {uri}")
        return files
    if source.kind == "hf_dataset":
        hf_dataset(source, uri)
        return []
    raise SourceError(source, f"unknown source kind {source.kind!r}")


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
        source_files(source, resolve(source.uri))
