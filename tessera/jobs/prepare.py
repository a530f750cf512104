"""`tessera prepare`: every configured source -> interleaved sample shards + rejects (Ray Data).

    sources --read--> map_batches(normalise per row) --> _work/normalized/*.parquet
    normalized.(sample_id, content_hash) --groupby on the cluster--> _work/duplicates (hash -> smallest id, which survives)
    normalized --per-block counts--> rows per source and fate (the driver sums small dicts)
    normalized --split--> samples/*.parquet, rejects/*.parquet --> manifests --> report.json

Steps are resumable and the outputs exactly-once (see `tessera.jobs.common`).
"""

from __future__ import annotations

import collections
import dataclasses
import json

from tessera import storage
from tessera.config import TesseraConfig
from tessera.console import Console
from tessera.faults import fault_point, fault_when
from tessera.jobs.common import JobState, fingerprint, logs_dir, parse_args, preflight, ray_session
from tessera.manifest import write_manifest
from tessera.pipelines import samples
from tessera.pipelines.sources import check_sources, resolved
from tessera.schema import REJECT_SCHEMA, SAMPLE_SCHEMA, validated
from tessera.timing import Timer


def _input_listing(cfg: TesseraConfig) -> list:
    """Names and sizes of every input file: a changed input invalidates completed outputs."""
    listing = []
    for s in cfg.prepare.sources:
        uri = cfg.resolve(s.uri)
        files = storage.list_files(uri, "", recursive=True) or ([uri] if storage.exists(uri) else [])  # a directory, or one file
        listing.append([s.name, [(f.rsplit("/", 1)[-1], storage.file_size(f)) for f in files]])
    return listing


def input_fingerprint(cfg: TesseraConfig) -> str:
    return fingerprint(cfg.section_fingerprint("prepare"), _input_listing(cfg))


def prepare(cfg: TesseraConfig) -> dict:
    """Run (or resume, or skip) the prepare job; returns its report. Ray must be initialised."""
    pc = cfg.prepare
    out = cfg.resolve(pc.output)
    check_sources(pc.sources, cfg.resolve)  # a source that cannot be read fails here, before anything is written
    state = JobState(out, input_fingerprint(cfg))
    if state.is_complete():
        print(f"[tessera] prepare: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    timer = Timer()
    normalized = _normalize(cfg, state, timer)
    duplicates, counts = _dedup(normalized, state.work, pc.dedup, timer)
    outputs = _write(normalized, out, pc, duplicates, timer)
    rows_in = sum(sum(per.values()) for per in counts.values())
    config = dataclasses.asdict(pc)  # manifests, then the report (the completion mark)
    m_samples = write_manifest(outputs["samples"], "sample", "tessera prepare", config)
    m_rejects = write_manifest(outputs["rejects"], "reject", "tessera prepare", config)
    normalize_s = state.step_info("normalize")["seconds"]
    report = {"job": "prepare", "rows_in": rows_in, "rows_out": m_samples["num_rows"], "rejects": m_rejects["num_rows"],
              **_reject_counts(counts), "seconds": {"normalize": normalize_s, **timer.seconds},
              "wall_time_s": round(normalize_s + timer.total, 3),
              "throughput_rows_per_s": round(rows_in / max(normalize_s, 1e-9), 2),
              "outputs": outputs, "config": cfg.to_dict()}
    assert report["rows_out"] + report["rejects"] == report["rows_in"], "every input row is either a sample or a reject"
    state.finish(report)
    return report


def _normalize(cfg: TesseraConfig, state: JobState, timer: Timer) -> str:
    """Read every source, decode / resize / filter per row -> _work/normalized (resumable step)."""
    from tessera.pipelines.readers import read_source

    pc = cfg.prepare
    normalized = storage.join(state.work, "normalized")
    if not state.step_done("normalize"):
        target = state.step_dir("normalized", fresh=True)
        fault_when("prepare:during_normalize", lambda: bool(storage.list_files(target, ".parquet")))
        with timer("normalize"):
            # locations expanded ({root}) once, here: the batch functions see real paths
            pcr = dataclasses.replace(pc, download=dataclasses.replace(pc.download, cache=cfg.resolve(pc.download.cache)))
            datasets = [read_source(resolved(s, cfg.resolve), cfg.resolve(s.uri), pcr) for s in pc.sources]
            ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            ds.write_parquet(target, min_rows_per_file=pc.rows_per_shard)
        state.mark_done("normalize", {"seconds": timer.seconds["normalize"]})
        fault_point("prepare:after_normalize")
    return normalized


def _dedup(normalized: str, work: str, dedup: bool, timer: Timer) -> tuple[str, dict]:
    """-> (the duplicates table's location, or "" without dedup; rows per source and fate). A Ray Data
    groupby on the cluster writes {content hash: smallest sample id} of every duplicated hash (that
    id survives); the counts come back as one small dict per block. The driver never holds a
    column of the rows, nor the duplicates."""
    import ray
    import ray.data
    from ray.data.aggregate import Count, Min

    with timer("dedup"):
        small = ray.data.read_parquet(normalized).select_columns(["sample_id", "source", "content_hash", "reject_reason"])
        duplicates = ""
        if dedup:
            duplicates = storage.join(work, "duplicates")
            storage.remove_tree(duplicates)
            partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
            small.map_batches(samples.hashed_rows, batch_format="pyarrow") \
                 .groupby("content_hash", num_partitions=partitions).aggregate(Count(), Min("sample_id")) \
                 .map_batches(samples.duplicated_groups, batch_format="pyarrow") \
                 .write_parquet(duplicates)
        counts: dict = collections.defaultdict(collections.Counter)
        blocks = small.map_batches(samples.row_statistics, fn_kwargs={"duplicates_dir": duplicates}, batch_format="pyarrow",
                                   batch_size=None)
        for block in blocks.iter_rows():
            for source, per in json.loads(block["counts"]).items():
                counts[source].update(per)
        return duplicates, counts


def _write(normalized: str, out: str, pc, duplicates: str, timer: Timer) -> dict:
    """Split into the committed samples and rejects tables (cleared first: a killed attempt may have left files)."""
    import ray.data

    outputs = {"samples": storage.join(out, "samples"), "rejects": storage.join(out, "rejects")}
    with timer("write"):
        for d in outputs.values():
            storage.remove_tree(d)
        src = ray.data.read_parquet(normalized)
        src.map_batches(validated(samples.split_samples, SAMPLE_SCHEMA), fn_kwargs={"duplicates_dir": duplicates},
                        batch_format="pyarrow", num_cpus=pc.num_cpus_per_task).write_parquet(outputs["samples"], min_rows_per_file=pc.rows_per_shard)
        fault_point("prepare:after_samples")
        src.map_batches(validated(samples.split_rejects, REJECT_SCHEMA), fn_kwargs={"duplicates_dir": duplicates},
                        batch_format="pyarrow", num_cpus=pc.num_cpus_per_task).write_parquet(outputs["rejects"], min_rows_per_file=pc.rows_per_shard)
    return outputs


def _reject_counts(counts: dict) -> dict:
    """rejects_by_reason and per_source {rows_in, rows_out, rejects by reason} (duplicates counted as rejects)
    from the rows per source and fate ("" = kept)."""
    per_source, by_reason = {}, collections.Counter()
    for source, per in sorted(counts.items()):
        rejects = {reason: n for reason, n in sorted(per.items()) if reason}
        by_reason.update(rejects)
        per_source[source] = {"rows_in": sum(per.values()), "rows_out": per.get("", 0), "rejects": rejects}
    return {"rejects_by_reason": dict(sorted(by_reason.items())), "per_source": per_source}


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("prepare", argv, "Sources -> interleaved sample parquet shards (+ rejects) on Ray Data.")
    preflight("prepare", lambda: check_sources(cfg.prepare.sources, cfg.resolve))
    with Console(logs_dir(cfg)) as console:
        with console.stage("prepare") as line, ray_session(cfg.ray):
            report = prepare(cfg)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        console.print(f"[tessera] prepare: {report['rows_out']} samples, {report['rejects']} rejects {report['rejects_by_reason']}")
        console.print(f"[tessera] report: {cfg.resolve(cfg.prepare.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
