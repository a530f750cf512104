"""Benchmark the visual BPE, each figure against a baseline measured in the same run.

1. fit: the compiled incremental fit vs the naive full-recount reference (tessera/bpe/reference.py)
   on 2k grids of 16x16, 500 merges (the reference is timed on its first --naive-merges merges,
   and the fast fit on the same merges, so the ratio compares like with like);
2. scale: 8192 merges over 100k (`--grids`) 32x32 grids, codebook 8192, structured synthetic corpus
   (regions of repeated codes plus noise, Zipf-distributed codes), each shard making its own part
   (`GridSource`; the `build` phase includes making them): wall time, peak memory, and its split
   between build, count, choose, apply and reduce;
3. encode: grids/s/core at 32x32 with that vocabulary, against the reference encoder;
4. the distributed fit's merges (Ray actors) against the 1-worker fit's on a 20k-grid subset
   (`merges_equal_one_worker`).
Peak memory is each process's peak RSS (the driver and every shard actor) and their sum (`peak_rss_sum_gb`).

    .venv/bin/python benchmarks/bench_bpe.py [--grids 100000] [--big-merges 8192] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tessera.bpe import VisualBPE  # noqa: E402
from tessera.bpe import reference as ref  # noqa: E402
from tessera.bpe.distributed import RayShards  # noqa: E402
from tessera.bpe.shards import Corpus, GridSource, LocalShards  # noqa: E402


def structured_corpus(n: int, side: int, K: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """(n, side, side) int32, grids start..start+n-1 of the corpus `seed`: random rectangles of Zipf
    codes with repeated 2x2 motifs, 10% noise. Grid i depends only on (seed, i), so a shard can make
    its own part of the corpus and any split gives the same grids."""
    grids = np.empty((n, side, side), dtype=np.int32)
    for i in range(n):
        rng = np.random.default_rng([seed, start + i])
        zipf = lambda size: np.minimum(rng.zipf(1.3, size=size) - 1, K - 1)  # noqa: E731
        g = np.empty((side, side), dtype=np.int32)
        g[:] = zipf(1)[0]
        for _ in range(rng.integers(3, 8)):
            r0, c0 = rng.integers(0, side, size=2)
            h, w = rng.integers(2, side // 2 + 1, size=2)
            motif = zipf((2, 2))
            region = np.tile(motif, (side // 2 + 1, side // 2 + 1))[:h, :w]
            g[r0:r0 + h, c0:c0 + w] = region[: side - r0, : side - c0]
        noise = rng.random((side, side)) < 0.10
        g[noise] = zipf(int(noise.sum()))
        grids[i] = g
    return grids


def bench_vs_naive(args) -> dict:
    grids = structured_corpus(2000, 16, 1024, seed=1)
    t = time.perf_counter()
    fast_all = VisualBPE.fit(list(grids), 1024, 500)
    fast_500 = time.perf_counter() - t
    t = time.perf_counter()
    fast_few = VisualBPE.fit(list(grids), 1024, args.naive_merges)
    fast_few_s = time.perf_counter() - t
    t = time.perf_counter()
    naive_merges, _, _ = ref.fit(list(grids), 1024, args.naive_merges)
    naive_s = time.perf_counter() - t
    assert naive_merges == [(a, b, "hv".index(d)) for a, b, d in fast_few.merges], "same merges as the reference"
    return {"grids": 2000, "side": 16, "merges": len(fast_all.merges), "fast_fit_s": round(fast_500, 3),
            "naive_merges_timed": args.naive_merges, "naive_s": round(naive_s, 3), "fast_same_merges_s": round(fast_few_s, 4),
            "speedup_same_merges": round(naive_s / fast_few_s, 1),
            "naive_500_extrapolated_s": round(naive_s / args.naive_merges * 500, 1),
            "speedup_500_vs_extrapolated_naive": round(naive_s / args.naive_merges * 500 / fast_500, 1)}


def shard_grids(start: int, stop: int, seed: int = 2) -> Corpus:
    """What one shard makes for itself: grids start..stop-1 of the scale corpus."""
    return Corpus.from_array(structured_corpus(stop - start, 32, 8192, seed=seed, start=start), 8192)


def bench_scale(args) -> tuple[dict, VisualBPE]:
    """The scale fit. Each shard makes its own grids (`GridSource`, in its Ray actor with > 1 workers):
    the driver never holds the corpus, as a shard reading its own token files would not."""
    bounds = np.linspace(0, args.big_grids, args.workers + 1).astype(int)
    sources = [GridSource(shard_grids, (int(a), int(b)), f"structured-2-{a}-{b}", int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    bpe = VisualBPE.fit_sources(sources, 8192, args.big_merges, shards=RayShards if args.workers > 1 else LocalShards, progress=True)
    wall = time.perf_counter() - t
    r = bpe.report
    out = {"grids": args.big_grids, "side": 32, "codebook": 8192, "merges_requested": args.big_merges,
           "merges_done": r["merges_done"], "workers": args.workers, "wall_s": round(wall, 1),
           "grid_making_s": r["grid_load_s"], "fit_s_without_grid_making": round(wall - r["grid_load_s"], 1),
           "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "shard_peak_rss_mb": r["shard_peak_rss_mb"],
           "peak_rss_sum_gb": r["peak_rss_sum_gb"], "rss_before_fit_mb": round(rss0, 1), "index": r["index"],
           "pairs_in_table": r["pairs_in_table"], "index_bytes_per_input_token": r["index_bytes_per_input_token"],
           "compression_ratio": r["compression_ratio"], "tokens_per_image_before": 1024,
           "tokens_per_image_after": round(r["output_tokens"] / args.big_grids, 1)}
    return out, bpe


def same_merges_as_one_worker(workers: int, n: int = 20_000, merges: int = 500) -> dict:
    """The distributed fit (Ray actors, `workers` shards, at least 2) against the 1-worker fit on a subset."""
    subset = list(structured_corpus(n, 32, 8192, seed=2))
    one = VisualBPE.fit(subset, 8192, merges)
    many = VisualBPE.fit(subset, 8192, merges, num_shards=max(2, workers), shards=RayShards)
    return {"grids": len(subset), "merges": merges, "workers": max(2, workers), "equal": one.merges == many.merges}


def bench_encode(bpe: VisualBPE) -> dict:
    sample = structured_corpus(4000, 32, 8192, seed=2)
    bpe.encode_batch(sample[:100])  # warm-up
    t = time.perf_counter()
    bpe.encode_batch(sample)
    fast_s = time.perf_counter() - t
    few = sample[:3]
    merges = [(a, b, "hv".index(d)) for a, b, d in bpe.merges]
    t = time.perf_counter()
    for g in few:
        ref.encode(g, merges, bpe.codebook_size)
    ref_s = time.perf_counter() - t
    fast_rate = len(sample) / fast_s
    ref_rate = len(few) / ref_s
    return {"grids": len(sample), "vocab": bpe.vocab_size, "grids_per_s_per_core": round(fast_rate, 1),
            "reference_grids_per_s": round(ref_rate, 3), "speedup_vs_reference": round(fast_rate / ref_rate, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", "--big-grids", dest="big_grids", type=int, default=100_000, help="grids of 32x32 for the scale fit")
    ap.add_argument("--big-merges", type=int, default=8192)
    ap.add_argument("--naive-merges", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="shards of the scale fit (> 1: one Ray actor each)")
    ap.add_argument("--json", default="", help="also write the figures to this file (one JSON object)")
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    naive = bench_vs_naive(args)
    print(f"fit vs naive recount (2k x 16x16): fast 500 merges {naive['fast_fit_s']}s; naive {naive['naive_merges_timed']} merges "
          f"{naive['naive_s']}s vs fast {naive['fast_same_merges_s']}s -> {naive['speedup_same_merges']}x "
          f"(500 merges, extrapolated naive: {naive['speedup_500_vs_extrapolated_naive']}x)", flush=True)
    scale, bpe = bench_scale(args)
    print(f"scale: {scale['merges_done']} merges over {scale['grids']} 32x32 grids (K=8192) in {scale['wall_s']}s "
          f"({scale['fit_s_without_grid_making']}s without making the synthetic grids); "
          f"split {scale['seconds']}; peak RSS driver {scale['peak_rss_mb']} MB, shards {scale['shard_peak_rss_mb']} MB, "
          f"sum {scale['peak_rss_sum_gb']} GB; index {scale['index']}; {scale['index_bytes_per_input_token']} B/token; "
          f"tokens/image 1024 -> {scale['tokens_per_image_after']}", flush=True)
    enc = bench_encode(bpe)
    print(f"encode: {enc['grids_per_s_per_core']} grids/s/core at 32x32, vocab {enc['vocab']} "
          f"({enc['speedup_vs_reference']}x the reference encoder)")
    same = same_merges_as_one_worker(args.workers)
    print(f"merges of {same['workers']} Ray shards == 1 worker on {same['grids']} grids, {same['merges']} merges: {same['equal']}")
    result = {"bench": "bpe", "cores": os.cpu_count(), "fit_s": scale["wall_s"], "peak_rss_sum_gb": scale["peak_rss_sum_gb"],
              "merges_equal_one_worker": same["equal"], "fit_vs_naive": naive, "scale": scale, "encode": enc,
              "same_merges": same, "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
