"""Benchmark `tessera train`: tokens/s through Ray Train (Ray Data packing -> TorchTrainer) against
a plain PyTorch loop on the same model, stage and packed rows in this process; the packing
efficiency (non-padding share); and 1 vs 2 Ray Train workers, in one run.

Needs the demo's tokens and BPE (`make demo`, or any run root):

    .venv/bin/python benchmarks/bench_train.py [--root runs/demo] [--steps 30]

Each Ray Train figure is the mean of its logged tokens/s after the first 3 steps (start-up and
the first packing groups excluded); the plain loop times the same steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def overrides(root: str, out: str, steps: int, workers: int, cpus: float) -> list[str]:
    return [f"run.root={root}", f"train.output={out}", f"train.storage_path={out}/ray", f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus}", "train.log_every=1", f"train.checkpoint_every={steps}",
            f"train.stages=[{{name: bench, steps: {steps}, trainable: all, lr: 0.001, batch_size: 8, seq_len: 512,"
            " mixture: {weights: {kind=image_text: 0.5, task=vqa: 0.5}}}]"]


def plain_loop(cfg, steps: int) -> tuple[float, float]:
    """The same stage in-process: plan -> groups -> packed rows -> StageTrainer."""
    from tessera.manifest import dataset_files
    from tessera.model.assets import load_assets
    from tessera.model.rows import BuildSpec, build_group
    from tessera.model.mixture import build_index, stage_plan
    from tessera.model.packing import collate
    from tessera.model.trainer import StageTrainer
    from tessera.model.unified import TesseraModel

    torch.set_num_threads(2)
    mc, tc = cfg.model, cfg.train
    stage = tc.stages[0]
    assets = load_assets(mc, cfg.resolve)
    vocab = assets.vocabulary(mc)
    index = build_index(dataset_files(os.path.join(cfg.run.root, "tokens", "tokens")), 120.0)
    plan = stage_plan(index, stage.mixture.weights, 4000, cfg.run.seed, 0)
    spec = BuildSpec(tuple(vocab.to_dict().items()), os.path.abspath(cfg.resolve(mc.bpe)), ("pixel",), 1, (), "pixel", 0,
                     stage.seq_len, stage.loss_mask, cfg.run.seed, 0, tc.t2i_rate, tc.cfg_text_dropout)
    rows, real, total = [], 0, 0
    for g in range(0, len(plan), tc.pack_group):
        grp = plan[g:g + tc.pack_group]
        packed, _ = build_group(spec, [index.files[s] for s, _ in grp], [index.rows[s] for s, _ in grp], [e for _, e in grp], g // tc.pack_group)
        rows += packed
        if len(rows) >= (steps + 1) * stage.batch_size:
            break
    model = TesseraModel.create(mc, vocab, seed=cfg.run.seed)
    trainer = StageTrainer(model, stage, tc.weight_decay, tc.grad_clip, torch.device("cpu"))
    t0 = None
    for s in range(steps + 1):
        batch = collate(rows[s * stage.batch_size:(s + 1) * stage.batch_size])
        trainer.train_step([batch])
        if s == 0:
            t0 = time.perf_counter()
            continue
        real += int((batch["doc_ids"] > 0).sum())
        total += batch["doc_ids"].numel()
    return real / (time.perf_counter() - t0), real / total


def ray_train(cfg) -> tuple[float, float, float]:
    from tessera.jobs.train import read_metrics, train

    t = time.perf_counter()
    report = train(cfg)
    wall = time.perf_counter() - t
    metrics = [m for m in read_metrics(report["metrics_csv"]) if m["stage_step"] > 3]
    return float(np.mean([m["tokens_per_s"] for m in metrics])), float(np.mean([m["packing_efficiency"] for m in metrics])), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/demo")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    root = os.path.abspath(args.root)

    import ray

    from tessera.config import load_config

    with tempfile.TemporaryDirectory() as work:
        cfg1 = load_config("configs/demo.yaml", overrides(root, f"{work}/w1", args.steps, 1, 1.5))
        plain, plain_eff = plain_loop(cfg1, args.steps)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False)
        one, eff1, wall1 = ray_train(cfg1)
        cfg2 = load_config("configs/demo.yaml", overrides(root, f"{work}/w2", args.steps, 2, 0.75))
        two, eff2, wall2 = ray_train(cfg2)
        ray.shutdown()
    print(f"# bench_train: {args.steps} steps of 8 x 512-token packed rows, demo model, 2-core CPU")
    print(f"plain PyTorch loop (same rows, in process): {plain:8.0f} tokens/s   packing efficiency {plain_eff:.3f}")
    print(f"Ray Train, 1 worker (Ray Data packing):    {one:8.0f} tokens/s   packing efficiency {eff1:.3f}   wall {wall1:.0f}s")
    print(f"Ray Train / plain loop: {one / plain:.2f}x")
    print(f"Ray Train, 2 workers (DDP, gloo):           {two:8.0f} tokens/s   packing efficiency {eff2:.3f}   wall {wall2:.0f}s")
    print(f"2 workers / 1 worker: {two / one:.2f}x")


if __name__ == "__main__":
    main()
