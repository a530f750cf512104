"""`manifest.json` of a dataset directory: schema version, producing config, files and row counts.

Readers go through `dataset_files` so they only ever see the files a completed job
committed, never a leftover of a killed attempt.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from tessera import storage
from tessera.schema import SCHEMA_VERSION


def parquet_row_count(uri: str) -> int:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_manifest(directory: str, schema: str, producer: str, config: dict, extra: dict | None = None) -> dict:
    """Describe every parquet file under `directory`; returns the manifest."""
    files = storage.list_files(directory, ".parquet")
    entries = [{"file": f.rsplit("/", 1)[-1], "rows": parquet_row_count(f)} for f in files]
    manifest = {
        "schema": schema,
        "schema_version": SCHEMA_VERSION,
        "producer": producer,
        "num_rows": sum(e["rows"] for e in entries),
        "files": entries,
        "config": config,
        **(extra or {}),
    }
    storage.write_json(storage.join(directory, "manifest.json"), manifest)
    return manifest


def dataset_files(directory: str) -> list[str]:
    """The committed parquet files of a dataset directory (raises if it has no manifest)."""
    uri = storage.join(directory, "manifest.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{directory} has no manifest.json: the job that writes it has not completed")
    manifest = storage.read_json(uri)
    return [storage.join(directory, e["file"]) for e in manifest["files"]]
