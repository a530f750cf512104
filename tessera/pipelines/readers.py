"""Ray Data readers, one per source kind: the only module of `pipelines/` that imports Ray.

Each returns a Dataset of normalised rows (`samples.NORMALIZED_SCHEMA`): the native Ray reader for
the format (`read_webdataset`, `read_parquet`, `read_csv`, `read_text`, `read_binary_files`,
`from_huggingface`), then the pure per-batch function of `samples` / `corpora` in `map_batches`.
"""

from __future__ import annotations

import ray
import ray.data

from tessera import storage
from tessera.config import PrepareConfig, SourceConfig
from tessera.pipelines import corpora, samples
from tessera.pipelines.sources import SourceError, hf_dataset, is_parquet_dataset, source_files

__all__ = ["SourceError", "read_raw", "read_source"]

BATCH_FUNCTIONS = {**samples.BATCH_FUNCTIONS, **corpora.BATCH_FUNCTIONS}


def read_raw(source: SourceConfig, uri: str) -> list[tuple[ray.data.Dataset, object]]:
    """The source's rows as the format's native Ray readers yield them, each with the batch function
    that normalises them (img2dataset has two: its tars and the failed rows of its parquet tables)."""
    files = source_files(source, uri)  # raises SourceError before any Ray work
    fn = BATCH_FUNCTIONS[source.kind]
    if source.kind in ("webdataset", "img2dataset", "mint1t", "video2dataset"):
        # decoder=None: keep raw bytes, so a corrupt image is a reject row, not a failed read task
        parts = [(ray.data.read_webdataset(files, decoder=None), fn)]
        if source.kind == "img2dataset" and (tables := storage.list_files(uri, ".parquet")):
            parts.append((ray.data.read_parquet(tables).select_columns(["key", "status", "error_message"]),
                          corpora.img2dataset_failures_batch))
        return parts
    if source.kind == "video":  # every container decord reads, and any other file becomes a reject
        return [(ray.data.read_binary_files(files, include_paths=True), fn)]
    if source.kind == "web":
        return [(ray.data.read_text(files, include_paths=True), fn)]
    if source.kind == "llava":
        parts = []
        if lines := [f for f in files if f.endswith(".jsonl")]:
            parts.append((ray.data.read_text(lines, include_paths=True), fn))
        if arrays := [f for f in files if f.endswith(".json")]:
            parts.append((ray.data.read_binary_files(arrays, include_paths=True).flat_map(corpora.llava_records), fn))
        return parts
    if source.kind == "obelics":
        return [(ray.data.read_parquet(files), fn)]
    if source.kind == "video_csv":
        return [(ray.data.read_csv(files), fn)]
    if is_parquet_dataset(uri):  # hf_dataset as parquet files with an Image() struct column
        return [(ray.data.read_parquet(files), fn)]
    ds = hf_dataset(source, uri)
    if not source.id_key:
        ds = ds.add_column("__row_index__", [str(i) for i in range(len(ds))])
    return [(ray.data.from_huggingface(ds), fn)]


def read_source(source: SourceConfig, uri: str, cfg: PrepareConfig) -> ray.data.Dataset:
    datasets = [raw.map_batches(fn, fn_kwargs={"source": source, "cfg": cfg}, batch_format="pyarrow",
                                batch_size=cfg.batch_size, num_cpus=cfg.num_cpus_per_task)
                for raw, fn in read_raw(source, uri)]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
