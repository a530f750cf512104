"""Benchmark `tessera tokenize`: pipeline images/s against a bare loop calling the same
tokenizer on the same images in this process, and 1 -> 2 actor scaling, in one run.

Needs a prepared demo run with a trained tokenizer (`make demo`, or any run root):

    .venv/bin/python benchmarks/bench_tokenize.py [--root runs/demo] [--repeat 4]

`--repeat` tiles the prepared samples so the pipeline runs long enough to amortise start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/demo")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    root = os.path.abspath(args.root)

    import ray
    import torch

    from tessera.config import load_config
    from tessera.jobs.tokenize import tokenize
    from tessera.manifest import dataset_files, write_manifest
    from tessera.tokenize.images import decode_rgb
    from tessera.tokenize.tokens import ImageEncoder

    files = dataset_files(os.path.join(root, "prepare", "samples"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    with tempfile.TemporaryDirectory() as work:
        samples = os.path.join(work, "prepare", "samples")
        os.makedirs(samples)
        for i in range(args.repeat):  # same content under new ids
            ids = pa.array([f"{s}-{i}" for s in table.column("sample_id").to_pylist()])
            pq.write_table(table.set_column(0, "sample_id", ids), os.path.join(samples, f"part-{i}.parquet"))
        write_manifest(samples, "sample", "benchmark", {})
        image_size = json.load(open(os.path.join(root, "tokenizer", "config.json")))["tokenizer"]["image_size"]

        # ---- bare loop: the same encoder, same chunks, same images, one process
        torch.set_num_threads(1)  # one core, like one actor
        images = np.stack([decode_rgb(p, image_size) for _ in range(args.repeat)
                           for row in table.column("images").to_pylist() for p in row if p])
        enc = ImageEncoder(os.path.join(root, "tokenizer"), image_size, 16)
        enc.encode(images[:32])
        t = time.perf_counter()
        enc.encode(images)
        bare_s = time.perf_counter() - t
        bare = len(images) / bare_s

        results = {}
        for actors in (1, 2):
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=1024**3)
            cfg = load_config(None, [f"run.root={work}", f"tokenize.tokenizer={root}/tokenizer",
                                     f"tokenize.text_tokenizer={root}/tokens/text_tokenizer", f"tokenize.num_actors={actors}",
                                     "tokenize.cpus_per_actor=0.5", f"tokenize.output={work}/tokens-{actors}"])
            report = tokenize(cfg)
            ray.shutdown()
            results[actors] = {"images": report["images"], "encode_s": report["seconds"]["encode"],
                               "images_per_s": report["images_per_s"], "per_actor": report["images_per_s_per_actor"],
                               "actor_wait_fraction": report["actor_wait_fraction"]}
    print(f"\ntokenize benchmark ({os.cpu_count()} cores, {len(images)} images of {image_size}px)")
    print(f"{'what':<36}{'images/s':>10}")
    print(f"{'bare loop (1 process, 1 thread)':<36}{bare:>10.1f}")
    for a, r in results.items():
        print(f"{f'pipeline, {a} actor(s)':<36}{r['images_per_s']:>10.1f}   actor wait {r['actor_wait_fraction']:.0%}")
    one, two = results[1]["images_per_s"], results[2]["images_per_s"]
    print(json.dumps({"bench": "tokenize", "cores": os.cpu_count(), "images": len(images), "bare_loop_images_per_s": round(bare, 1),
                      "pipeline": results, "pipeline_1_actor_over_bare": round(one / bare, 3),
                      "pipeline_2_actors_over_bare": round(two / bare, 3), "scaling_1_to_2_actors": round(two / one, 3),
                      "note": "pipeline time is the whole encode step: read, PNG decode, tokenizer, text tokenizer, parquet write"}))


if __name__ == "__main__":
    main()
