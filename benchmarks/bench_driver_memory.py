"""Benchmark the driver's memory in `prepare`'s dedup and report counts as the input grows 10x:
the distributed path (`jobs/prepare._dedup`: a Ray Data groupby on the cluster writes the duplicated
hashes, the counts come back as one small dict per block) against gathering the four small columns
of every row on the driver (what `prepare` did before), in one run.

    .venv/bin/python benchmarks/bench_driver_memory.py [--rows 20000] [--dup-rate 0.05]

The driver's peak Python heap (tracemalloc) is what grows with the data in the gather path; it is
printed for both paths at N and 10 N rows, with the 10N/N growth and the gather/distributed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def write_normalized(directory: str, rows: int, dup_rate: float, files: int = 8) -> None:
    """Rows shaped like `_work/normalized`'s small columns: 2 sources, a share of exact duplicates, a few rejects."""
    os.makedirs(directory)
    per = rows // files
    for f in range(files):
        ids = range(f * per, (f + 1) * per)
        pq.write_table(pa.table({
            "sample_id": [f"{i:012x}" for i in ids],
            "source": ["wds" if i % 2 else "web" for i in ids],
            "content_hash": [f"h{i % int(1 / dup_rate)}" if i % int(1 / dup_rate) == 0 and i else f"u{i:016x}" for i in ids],
            "reject_reason": ["too_small" if i % 97 == 0 else None for i in ids],
        }), os.path.join(directory, f"{f}.parquet"))


def gather_on_driver(normalized: str) -> tuple[dict, int]:
    """The old path: every row's four small columns in driver lists, deduplicated in memory."""
    import ray.data

    from tessera.pipelines.samples import duplicate_losers

    small = ray.data.read_parquet(normalized).select_columns(["sample_id", "source", "content_hash", "reject_reason"])
    cols = {k: [] for k in ("sample_id", "source", "content_hash", "reject_reason")}
    for batch in small.iter_batches(batch_format="pyarrow", batch_size=None):
        for k in cols:
            cols[k] += batch.column(k).to_pylist()
    return duplicate_losers(cols["sample_id"], cols["content_hash"]), len(cols["sample_id"])


def distributed(normalized: str) -> tuple[dict, int]:
    """The new path; the losers are read back from the cluster's duplicates table only to check them
    against the old path, outside the measured section."""
    from tessera.jobs.prepare import _dedup
    from tessera.timing import Timer

    duplicates, counts = _dedup(normalized, normalized + "-work", True, Timer())
    return duplicates, sum(sum(per.values()) for per in counts.values())


def losers_of(normalized: str, duplicates: str) -> dict:
    import pyarrow.dataset as pads

    from tessera.pipelines.samples import duplicate_winners

    winners = duplicate_winners(duplicates)
    t = pads.dataset(normalized).to_table(columns=["sample_id", "content_hash"])
    return {sid: winners[h] for sid, h in zip(t.column("sample_id").to_pylist(), t.column("content_hash").to_pylist())
            if h in winners and winners[h] != sid}


def measure(fn, normalized: str) -> dict:
    tracemalloc.start()
    t = time.perf_counter()
    losers, rows = fn(normalized)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if isinstance(losers, str):
        losers = losers_of(normalized, losers)
    return {"rows": rows, "duplicates": len(losers), "driver_peak_mb": round(peak / 2**20, 2), "seconds": round(seconds, 1),
            "losers_hash": hash(frozenset(losers.items()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dup-rate", type=float, default=0.05)
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = os.path.join(tmp, "warm-up")  # imports and Ray Data's first-use state, outside the measurements
        write_normalized(warm, 800, args.dup_rate)
        measure(gather_on_driver, warm), measure(distributed, warm)
        for scale in (1, 10):
            normalized = os.path.join(tmp, f"x{scale}")
            write_normalized(normalized, args.rows * scale, args.dup_rate)
            gather, dist = measure(gather_on_driver, normalized), measure(distributed, normalized)
            assert gather["losers_hash"] == dist["losers_hash"] and gather["rows"] == dist["rows"], "same duplicates, same rows"
            out[f"x{scale}"] = {"gather_on_driver": gather, "distributed": dist}
            print(f"rows {dist['rows']:>8}: driver peak  gather {gather['driver_peak_mb']:8.2f} MB  distributed "
                  f"{dist['driver_peak_mb']:8.2f} MB  ratio {gather['driver_peak_mb'] / max(dist['driver_peak_mb'], 1e-9):6.1f}x  "
                  f"({dist['duplicates']} duplicates; {gather['seconds']} s vs {dist['seconds']} s)", flush=True)
    growth = {k: round(out["x10"][k]["driver_peak_mb"] / max(out["x1"][k]["driver_peak_mb"], 1e-9), 2)
              for k in ("gather_on_driver", "distributed")}
    print(f"driver peak growth for 10x the rows: gather {growth['gather_on_driver']}x, distributed {growth['distributed']}x "
          f"({args.dup_rate:.0%} of rows are duplicates; the distributed path keeps them on the cluster)")
    print(json.dumps({"results": out, "growth_10x": growth}, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
