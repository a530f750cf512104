"""Ray Data readers, one per source kind: the only module of `pipelines/` that imports Ray.

Each returns a Dataset of normalised rows (`samples.NORMALIZED_SCHEMA`): the native Ray
reader for the format, then the pure per-batch function of `samples` in `map_batches`.
"""

from __future__ import annotations

import ray
import ray.data

from tessera.config import PrepareConfig, SourceConfig
from tessera.pipelines import samples
from tessera.pipelines.sources import SourceError, hf_dataset, source_files

__all__ = ["SourceError", "read_raw", "read_source"]


def read_raw(source: SourceConfig, uri: str) -> ray.data.Dataset:
    """The source's rows as the format's native Ray reader yields them."""
    files = source_files(source, uri)  # raises SourceError before any Ray work
    if source.kind == "webdataset":
        # decoder=None: keep raw bytes, so a corrupt image is a reject row, not a failed read task
        return ray.data.read_webdataset(files, decoder=None)
    if source.kind == "video":  # every container decord reads, and any other file becomes a reject
        return ray.data.read_binary_files(files, include_paths=True)
    if source.kind == "web":
        return ray.data.read_text(files, include_paths=True)
    ds = hf_dataset(source, uri)
    if not source.id_key:
        ds = ds.add_column("__row_index__", [str(i) for i in range(len(ds))])
    return ray.data.from_huggingface(ds)


def read_source(source: SourceConfig, uri: str, cfg: PrepareConfig) -> ray.data.Dataset:
    return read_raw(source, uri).map_batches(
        samples.BATCH_FUNCTIONS[source.kind],
        fn_kwargs={"source": source, "cfg": cfg},
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_cpus=cfg.num_cpus_per_task,
    )
