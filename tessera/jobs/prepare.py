"""`tessera prepare`: every configured source -> interleaved sample shards + rejects (Ray Data).

    sources --read--> map_batches(normalise per row) --> _work/normalized/*.parquet
    normalized.(sample_id, content_hash) --> duplicate losers (smallest id survives)
    normalized --split--> samples/*.parquet, rejects/*.parquet --> manifests --> report.json

Steps are resumable and the outputs exactly-once (see `tessera.jobs.common`).
"""

from __future__ import annotations

import collections
import dataclasses

from tessera import storage
from tessera.config import TesseraConfig
from tessera.faults import fault_point, fault_when
from tessera.jobs.common import JobState, fingerprint, parse_args, ray_session
from tessera.timing import Timer
from tessera.manifest import write_manifest
from tessera.pipelines import samples
from tessera.schema import REJECT_SCHEMA, SAMPLE_SCHEMA, validated


def _input_listing(cfg: TesseraConfig) -> list:
    """Names and sizes of every input file: a changed input invalidates completed outputs."""
    listing = []
    for s in cfg.prepare.sources:
        uri = cfg.resolve(s.uri)
        files = storage.list_files(uri, "", recursive=True)
        listing.append([s.name, [(f.rsplit("/", 1)[-1], storage.file_size(f)) for f in files]])
    return listing


def input_fingerprint(cfg: TesseraConfig) -> str:
    return fingerprint(cfg.section_fingerprint("prepare"), _input_listing(cfg))


def prepare(cfg: TesseraConfig) -> dict:
    """Run (or resume, or skip) the prepare job; returns its report. Ray must be initialised."""
    pc = cfg.prepare
    out = cfg.resolve(pc.output)
    state = JobState(out, input_fingerprint(cfg))
    if state.is_complete():
        print(f"[tessera] prepare: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    timer = Timer()
    normalized = _normalize(cfg, state, timer)
    cols, losers = _dedup(normalized, pc.dedup, timer)
    outputs = _write(normalized, out, pc, losers, timer)
    config = dataclasses.asdict(pc)  # manifests, then the report (the completion mark)
    m_samples = write_manifest(outputs["samples"], "sample", "tessera prepare", config)
    m_rejects = write_manifest(outputs["rejects"], "reject", "tessera prepare", config)
    normalize_s = state.step_info("normalize")["seconds"]
    report = {"job": "prepare", "rows_in": len(cols["sample_id"]), "rows_out": m_samples["num_rows"], "rejects": m_rejects["num_rows"],
              **_reject_counts(cols, losers), "seconds": {"normalize": normalize_s, **timer.seconds},
              "wall_time_s": round(normalize_s + timer.total, 3),
              "throughput_rows_per_s": round(len(cols["sample_id"]) / max(normalize_s, 1e-9), 2),
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
            datasets = [read_source(s, cfg.resolve(s.uri), pc) for s in pc.sources]
            ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            ds.write_parquet(target, min_rows_per_file=pc.rows_per_shard)
        state.mark_done("normalize", {"seconds": timer.seconds["normalize"]})
        fault_point("prepare:after_normalize")
    return normalized


def _dedup(normalized: str, dedup: bool, timer: Timer) -> tuple[dict, dict]:
    """The small columns of every row (id, source, content hash, reject reason) and the duplicate losers
    (the smallest sample id of a content hash survives)."""
    import ray.data

    with timer("dedup"):
        small = ray.data.read_parquet(normalized).select_columns(["sample_id", "source", "content_hash", "reject_reason"])
        cols = {k: [] for k in ("sample_id", "source", "content_hash", "reject_reason")}
        for batch in small.iter_batches(batch_format="pyarrow", batch_size=None):
            for k in cols:
                cols[k] += batch.column(k).to_pylist()
        return cols, samples.duplicate_losers(cols["sample_id"], cols["content_hash"]) if dedup else {}


def _write(normalized: str, out: str, pc, losers: dict, timer: Timer) -> dict:
    """Split into the committed samples and rejects tables (cleared first: a killed attempt may have left files)."""
    import ray.data

    outputs = {"samples": storage.join(out, "samples"), "rejects": storage.join(out, "rejects")}
    with timer("write"):
        for d in outputs.values():
            storage.remove_tree(d)
        src = ray.data.read_parquet(normalized)
        src.map_batches(validated(samples.split_samples, SAMPLE_SCHEMA), fn_kwargs={"losers": losers},
                        batch_format="pyarrow", num_cpus=pc.num_cpus_per_task).write_parquet(outputs["samples"], min_rows_per_file=pc.rows_per_shard)
        fault_point("prepare:after_samples")
        src.map_batches(validated(samples.split_rejects, REJECT_SCHEMA), fn_kwargs={"losers": losers},
                        batch_format="pyarrow", num_cpus=pc.num_cpus_per_task).write_parquet(outputs["rejects"], min_rows_per_file=pc.rows_per_shard)
    return outputs


def _reject_counts(cols: dict, losers: dict) -> dict:
    """rejects_by_reason and per_source {rows_in, rows_out, rejects by reason} (duplicates counted as rejects)."""
    per_source: dict = collections.defaultdict(lambda: {"rows_in": 0, "rows_out": 0, "rejects": collections.Counter()})
    for sid, source, reason in zip(cols["sample_id"], cols["source"], cols["reject_reason"]):
        entry = per_source[source]
        entry["rows_in"] += 1
        if reason is not None:
            entry["rejects"][reason] += 1
        elif sid in losers:
            entry["rejects"]["duplicate"] += 1
        else:
            entry["rows_out"] += 1
    by_reason = collections.Counter()
    for entry in per_source.values():
        by_reason.update(entry["rejects"])
    return {"rejects_by_reason": dict(sorted(by_reason.items())),
            "per_source": {k: {**v, "rejects": dict(sorted(v["rejects"].items()))} for k, v in sorted(per_source.items())}}


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("prepare", argv, "Sources -> interleaved sample parquet shards (+ rejects) on Ray Data.")
    with ray_session(cfg.ray):
        report = prepare(cfg)
    print(f"[tessera] prepare: {report['rows_out']} samples, {report['rejects']} rejects {report['rejects_by_reason']}")
    print(f"[tessera] report: {cfg.resolve(cfg.prepare.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
