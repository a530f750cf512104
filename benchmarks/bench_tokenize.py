"""Benchmark `tessera tokenize`: the pipeline's images/s against a plain script doing the same work on
the same samples in this process, then 1 and 2 actors and a 2-node local cluster, in one run.

Needs a prepared demo run with a trained tokenizer (`make demo`, or any run root):

    .venv/bin/python benchmarks/bench_tokenize.py [--root runs/demo] [--repeat 8] [--json FILE]

The plain script reads the same parquet samples, decodes the PNGs, runs the same visual tokenizer (in the
same fixed chunks) and the same text tokenizer, and writes parquet: `tokens.decode_stage` ->
`ImageEncoder.encode_batch` -> `tokens.text_stage`, one process, torch on every core. The pipeline's
figure is its whole encode step (read, decode, tokenizer actors, text, write). Also printed: the
tokenizer's forward alone on one thread (what one actor's model calls could reach). `--repeat` tiles
the prepared samples under new ids so start-up is amortised. Tokens are checked byte-identical
between the plain script and every pipeline configuration.
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

KEY = ["sample_id", "text_ids", "pixel_codes", "grid_shapes"]


def tiled_samples(root: str, work: str, repeat: int) -> tuple[str, pa.Table]:
    """The prepared samples `repeat` times under new ids, as a dataset directory with a manifest."""
    from tessera.manifest import dataset_files, write_manifest

    table = pa.concat_tables([pq.read_table(f) for f in dataset_files(os.path.join(root, "prepare", "samples"))])
    samples = os.path.join(work, "prepare", "samples")
    os.makedirs(samples)
    for i in range(repeat):  # same content under new ids
        ids = pa.array([f"{s}-{i}" for s in table.column("sample_id").to_pylist()])
        pq.write_table(table.set_column(0, "sample_id", ids), os.path.join(samples, f"part-{i}.parquet"))
    write_manifest(samples, "sample", "benchmark", {})
    return samples, table


def plain_script(samples: str, tok_dir: str, text_dir: str, image_size: int, chunk: int, batch_size: int, out: str) -> tuple[float, dict]:
    """The same work as the pipeline, in this process: -> (seconds, tokens by sample id)."""
    import torch

    from tessera.manifest import dataset_files
    from tessera.tokenize import tokens

    torch.set_num_threads(os.cpu_count())
    enc = tokens.ImageEncoder(tok_dir, image_size, chunk)
    text = {"text_tokenizer": text_dir, "tokenizer_hash": "", "text_tokenizer_hash": ""}
    t = time.perf_counter()
    results = []
    for f in dataset_files(samples):
        table = pq.read_table(f)
        for s in range(0, table.num_rows, batch_size):
            results.append(tokens.text_stage(enc.encode_batch(tokens.decode_stage(table.slice(s, batch_size), image_size)), **text))
    result = pa.concat_tables(results)
    pq.write_table(result, out)
    seconds = time.perf_counter() - t
    return seconds, keyed(result)


def keyed(table: pa.Table) -> dict:
    return {r["sample_id"]: (r["text_ids"], r["pixel_codes"], r["grid_shapes"]) for r in table.select(KEY).to_pylist()}


def tokenizer_forward(table: pa.Table, repeat: int, tok_dir: str, image_size: int, chunk: int) -> float:
    """images/s of the tokenizer's forward alone, one thread, decoded images in memory."""
    import torch

    from tessera.tokenize.images import decode_rgb
    from tessera.tokenize.tokens import ImageEncoder

    torch.set_num_threads(1)
    images = np.stack([decode_rgb(p, image_size) for _ in range(repeat) for row in table.column("images").to_pylist() for p in row if p])
    enc = ImageEncoder(tok_dir, image_size, chunk)
    enc.encode(images[:32])
    t = time.perf_counter()
    enc.encode(images)
    return len(images) / (time.perf_counter() - t)


def pipeline(work: str, root: str, name: str, actors: int, cpus_per_actor: float, address: str | None = None) -> tuple[dict, dict]:
    import ray

    from tessera.config import load_config
    from tessera.jobs.tokenize import tokenize
    from tessera.manifest import dataset_files

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, object_store_memory=1024**3)
    cfg = load_config(None, [f"run.root={work}", f"tokenize.tokenizer={root}/tokenizer",
                             f"tokenize.text_tokenizer={root}/tokens/text_tokenizer", f"tokenize.num_actors={actors}",
                             f"tokenize.cpus_per_actor={cpus_per_actor}", f"tokenize.output={work}/tokens-{name}"])
    report = tokenize(cfg)
    ray.shutdown()
    out = pa.concat_tables([pq.read_table(f) for f in dataset_files(os.path.join(work, f"tokens-{name}", "tokens"))])
    return {"actors": actors, "cpus_per_actor": cpus_per_actor, "images": report["images"], "encode_s": report["seconds"]["encode"],
            "images_per_s": report["images_per_s"], "actor_wait_fraction": report["actor_wait_fraction"],
            # each actor's images per second of busy time (decode + tokenizers): what the pool does once started
            "per_actor_busy_images_per_s": sorted(report["images_per_s_per_actor"].values())}, keyed(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/demo")
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--no-cluster", action="store_true", help="skip the 2-node local cluster")
    ap.add_argument("--json", default="", help="also write the figures to this file (one JSON object)")
    args = ap.parse_args()
    root = os.path.abspath(args.root)

    from tessera.config import TokenizeConfig

    kc = TokenizeConfig()
    tok_dir, text_dir = os.path.join(root, "tokenizer"), os.path.join(root, "tokens", "text_tokenizer")
    image_size = json.load(open(os.path.join(tok_dir, "config.json")))["tokenizer"]["image_size"]
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as work:
        samples, table = tiled_samples(root, work, args.repeat)
        plain_s, expected = plain_script(samples, tok_dir, text_dir, image_size, kc.encode_batch, kc.batch_size,
                                         os.path.join(work, "plain.parquet"))
        forward = tokenizer_forward(table, args.repeat, tok_dir, image_size, kc.encode_batch)
        runs = {"1 actor": pipeline(work, root, "one", 1, max(1.0, cores - 1.0)),
                "2 actors": pipeline(work, root, "two", 2, (cores - 1.0) / 2)}
        if not args.no_cluster:
            from ray.cluster_utils import Cluster

            # two nodes sharing this machine's cores: one actor each, the head keeps a CPU for reading
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cores, "object_store_memory": 512 * 1024**2})
            cluster.add_node(num_cpus=cores, object_store_memory=512 * 1024**2)
            runs["2 nodes, 2 actors"] = pipeline(work, root, "nodes", 2, cores - 1.0, address=cluster.address)
            cluster.shutdown()
    images = runs["1 actor"][0]["images"]
    plain = images / plain_s
    identical = {name: got == expected for name, (_, got) in runs.items()}
    best = max(r["images_per_s"] for r, _ in runs.values() if r["actors"] <= cores)
    result = {"bench": "tokenize", "cores": cores, "images": images, "image_size": image_size, "repeat": args.repeat,
              "plain_script_images_per_s": round(plain, 1), "tokenizer_forward_1_thread_images_per_s": round(forward, 1),
              "pipeline": {name: r for name, (r, _) in runs.items()},
              "pipeline_over_bare": round(runs["1 actor"][0]["images_per_s"] / plain, 3),
              "pipeline_2_actors_over_bare": round(runs["2 actors"][0]["images_per_s"] / plain, 3),
              "scaling_1_to_2_actors": round(runs["2 actors"][0]["images_per_s"] / runs["1 actor"][0]["images_per_s"], 3),
              "tokens_identical": identical,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    print(f"\n# bench_tokenize: {images} images of {image_size}px ({args.repeat} x the prepared samples), {cores}-core CPU")
    print(f"{'what':<48}{'images/s':>10}")
    print(f"{'plain script (decode + tokenizers + write, 1 process)':<48}{plain:>10.1f}")
    print(f"{'  (tokenizer forward alone, 1 thread)':<48}{forward:>10.1f}")
    for name, (r, _) in runs.items():
        label = f"pipeline, {name} ({r['cpus_per_actor']:g} CPU each)"
        busy = "/".join(f"{b:.0f}" for b in r["per_actor_busy_images_per_s"])
        print(f"{label:<48}{r['images_per_s']:>10.1f}   busy rate per actor {busy}, "
              f"actor wait {r['actor_wait_fraction']:.0%}, tokens identical: {identical[name]}")
    print(f"pipeline (1 actor) / plain script: {result['pipeline_over_bare']:.2f}x; "
          f"2 actors / plain script: {result['pipeline_2_actors_over_bare']:.2f}x; best {best / plain:.2f}x")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
