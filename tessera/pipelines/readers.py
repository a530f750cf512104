"""Ray Data readers, one per source kind: the only module of `pipelines/` that imports Ray.

Each returns a Dataset of normalised rows (`samples.NORMALIZED_SCHEMA`): the native Ray
reader for the format, then the pure per-batch function of `samples` in `map_batches`.
"""

from __future__ import annotations

import ray
import ray.data

from tessera import storage
from tessera.config import PrepareConfig, SourceConfig
from tessera.pipelines import samples, video


class SourceError(ValueError):
    """A configured source cannot be read at all (missing directory, no files)."""


def _files(source: SourceConfig, uri: str, suffix: str) -> list[str]:
    files = storage.list_files(uri, suffix, recursive=source.kind == "video")
    if not files:
        raise SourceError(f"source '{source.name}' ({source.kind}): no *{suffix} files under {uri}")
    return files


def read_raw(source: SourceConfig, uri: str) -> ray.data.Dataset:
    """The source's rows as the format's native Ray reader yields them."""
    if source.kind == "webdataset":
        # decoder=None: keep raw bytes, so a corrupt image is a reject row, not a failed read task
        return ray.data.read_webdataset(_files(source, uri, ".tar"), decoder=None)
    if source.kind == "video":
        files = video.source_files(uri)  # every container decord reads, and any other file becomes a reject
        if not files:
            raise SourceError(f"source '{source.name}' (video): no video files under {uri}")
        return ray.data.read_binary_files(files, include_paths=True)
    if source.kind == "web":
        return ray.data.read_text(_files(source, uri, ".jsonl"), include_paths=True)
    if source.kind == "hf_dataset":
        import datasets

        if not storage.exists(uri):
            raise SourceError(f"source '{source.name}' (hf_dataset): {uri} does not exist")
        ds = datasets.load_from_disk(uri)
        if not source.id_key:
            ds = ds.add_column("__row_index__", [str(i) for i in range(len(ds))])
        missing = [c for c in (source.image_key, source.caption_key, source.id_key) if c and c not in ds.column_names]
        if missing:
            raise SourceError(f"source '{source.name}' (hf_dataset): columns {missing} not in {ds.column_names}")
        return ray.data.from_huggingface(ds)
    raise SourceError(f"unknown source kind {source.kind!r}")


def read_source(source: SourceConfig, uri: str, cfg: PrepareConfig) -> ray.data.Dataset:
    return read_raw(source, uri).map_batches(
        samples.BATCH_FUNCTIONS[source.kind],
        fn_kwargs={"source": source, "cfg": cfg},
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_cpus=cfg.num_cpus_per_task,
    )
