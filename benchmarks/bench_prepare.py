"""Benchmark `prepare`: image-text samples/s through the Ray Data pipeline against a bare
single-process loop over the same rows, and video decoding frames/s with decord against a
PyAV decode loop on the same files. Everything is measured in this run.

    .venv/bin/python benchmarks/bench_prepare.py [--images 1024] [--videos 12] [--resolution 128]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from tessera.config import load_config  # noqa: E402


def bench_video(files: list[str], repeats: int = 2) -> dict:
    import av
    import decord

    def decord_all(path):
        r = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        return r.get_batch(list(range(len(r)))).asnumpy().shape[0]

    def pyav_all(path):
        n = 0
        with av.open(path) as c:
            c.streams.video[0].thread_count = 1
            for frame in c.decode(video=0):
                frame.to_ndarray(format="rgb24")
                n += 1
        return n

    out = {}
    for name, fn in (("decord", decord_all), ("pyav", pyav_all)):
        fn(files[0])  # warm-up
        best = float("inf")
        frames = 0
        for _ in range(repeats):
            t = time.perf_counter()
            frames = sum(fn(f) for f in files)
            best = min(best, time.perf_counter() - t)
        out[name] = {"frames": frames, "seconds": round(best, 3), "frames_per_s": round(frames / best, 1)}
    return out


def bench_bare_loop(cfg) -> dict:
    """The same per-row work as the pipeline, in one process, no Ray."""
    import pyarrow as pa
    import webdataset as wds

    from tessera.pipelines import samples

    src = cfg.prepare.sources[0]
    rows = []
    for r in wds.WebDataset(sorted(glob.glob(cfg.resolve(src.uri) + "/*.tar")), shardshuffle=False):
        rows.append({"__key__": r["__key__"], "jpg": r.get("jpg"), "txt": r.get("txt"), "json": r.get("json")})
    table = pa.Table.from_pylist(rows)
    t = time.perf_counter()
    out = samples.webdataset_batch(table, src, cfg.prepare)
    seconds = time.perf_counter() - t
    return {"rows": out.num_rows, "seconds": round(seconds, 3), "rows_per_s": round(out.num_rows / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--video-seconds", type=float, default=6.0)
    args = ap.parse_args()

    import ray

    from tessera.jobs.prepare import prepare
    from tessera.jobs.synth import run_synth

    with tempfile.TemporaryDirectory() as root:
        common = [f"run.root={root}", f"synth.resolution={args.resolution}", f"prepare.image.resolution={args.resolution}",
                  f"synth.num_image_text={args.images * 2}", f"synth.samples_per_shard={max(args.images // 8, 1)}",
                  f"synth.num_videos={args.videos}", f"synth.video_seconds={args.video_seconds}", "synth.video_fps=24",
                  "synth.num_documents=0", "synth.num_heldout=0", "synth.inject_faults=false"]
        cfg = load_config(None, common + ["prepare.sources=[{name: wds, kind: webdataset, uri: '{root}/synth/wds'}]"])
        run_synth(cfg)

        bare = bench_bare_loop(cfg)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, object_store_memory=1024**3)
        report = prepare(cfg)
        ray.shutdown()
        pipe_s = report["seconds"]["normalize"]
        pipeline = {"rows": report["rows_in"], "seconds": pipe_s, "rows_per_s": round(report["rows_in"] / pipe_s, 1)}

        videos = sorted(glob.glob(os.path.join(root, "synth", "video", "*.mp4")))
        video = bench_video(videos)

    cores = os.cpu_count()
    print(f"\nprepare benchmark ({cores} cores, {args.resolution}px)")
    print(f"{'what':<34}{'count':>8}{'seconds':>10}{'per second':>12}")
    print(f"{'image-text, bare loop (1 proc)':<34}{bare['rows']:>8}{bare['seconds']:>10.2f}{bare['rows_per_s']:>12.1f}")
    print(f"{'image-text, Ray Data pipeline':<34}{pipeline['rows']:>8}{pipeline['seconds']:>10.2f}{pipeline['rows_per_s']:>12.1f}")
    for name in ("decord", "pyav"):
        v = video[name]
        print(f"{'video frames, ' + name:<34}{v['frames']:>8}{v['seconds']:>10.2f}{v['frames_per_s']:>12.1f}")
    result = {
        "bench": "prepare", "cores": cores, "resolution": args.resolution,
        "image_text_samples_per_s": pipeline["rows_per_s"], "bare_loop_samples_per_s": bare["rows_per_s"],
        "pipeline_over_bare_loop": round(pipeline["rows_per_s"] / bare["rows_per_s"], 3),
        "decord_frames_per_s": video["decord"]["frames_per_s"], "pyav_frames_per_s": video["pyav"]["frames_per_s"],
        "decord_over_pyav": round(video["decord"]["frames_per_s"] / video["pyav"]["frames_per_s"], 3),
        "note": "pipeline time includes Ray Data start-up and the parquet write of the normalize step",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
