"""Benchmark `tessera train`: tokens/s through Ray Train (Ray Data packing -> TorchTrainer) against
a plain PyTorch loop on the same model, stage and packed rows in this process; the packing
efficiency (non-padding share); optionally 1 vs 2 Ray Train workers, in one run.

Needs the demo's tokens and BPE (`make demo`, or any run root):

    .venv/bin/python benchmarks/bench_train.py [--root runs/demo] [--steps 30] [--hidden 256 --layers 8]
        [--two-workers] [--json FILE]

Each Ray Train figure is the mean of its logged tokens/s after the first 3 steps (start-up and
the first packing groups excluded; each logged figure covers the steps since the previous report);
the plain loop times the same steps after one warm-up step. `--log-every 1` shows what a report to
Ray Train on every step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def overrides(root: str, out: str, steps: int, workers: int, cpus: float, hidden: int, layers: int, log_every: int) -> list[str]:
    return [f"run.root={root}", f"train.output={out}", f"train.storage_path={out}/ray", f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}", "train.probe_every=0",
            f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.intermediate_size={hidden * 11 // 4}",
            f"train.stages=[{{name: bench, steps: {steps}, trainable: all, lr: 0.001, batch_size: 8, seq_len: 512,"
            " mixture: {weights: {kind=image_text: 0.5, task=vqa: 0.5}}}]"]


def plain_loop(cfg, steps: int) -> tuple[float, float]:
    """The same stage in this process, built by the train job's own planning: the same index, sample plan,
    packing groups and BuildSpec -> packed rows -> the same StageTrainer and model."""
    from tessera.jobs.train import _load_data, _plan
    from tessera.model.mixture import stage_plan
    from tessera.model.packing import collate
    from tessera.model.rows import BuildSpec, build_group
    from tessera.model.stream import model_inputs
    from tessera.model.trainer import StageTrainer
    from tessera.model.unified import TesseraModel

    torch.set_num_threads(2)
    tc = cfg.train
    stage = tc.stages[0]
    run = _plan(cfg)
    _load_data(run)
    seed = tc.effective_seed(cfg.run.seed)
    plan = stage_plan(run.index, stage.mixture.weights, 4000, seed, 0, stage.mixture.order)
    spec = BuildSpec(seq_len=stage.seq_len, loss_mask=stage.loss_mask, seed=seed, stage=0, t2i_rate=tc.t2i_rate_of(stage),
                     cfg_text_dropout=tc.cfg_text_dropout, **run.spec_kwargs)
    rows, real, total = [], 0, 0
    for g in range(0, len(plan), tc.pack_group):
        grp = plan[g:g + tc.pack_group]
        packed, _ = build_group(spec, [run.index.files[s] for s, _ in grp], [run.index.rows[s] for s, _ in grp],
                                [e for _, e in grp], g // tc.pack_group)
        rows += packed
        if len(rows) >= (steps + 1) * stage.batch_size:
            break
    model = TesseraModel.create(cfg.model, run.vocab, run.sizes, run.depth, seed=seed)
    trainer = StageTrainer(model, stage, tc.weight_decay, tc.grad_clip, torch.device("cpu"))
    t0 = None
    for s in range(steps + 1):
        batch = collate(rows[s * stage.batch_size:(s + 1) * stage.batch_size])
        metrics = trainer.train_step([model_inputs(batch)])
        float(metrics["loss"])  # the step is done when its loss is read (as the train loop does on logged steps)
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
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10, help="steps between reports to Ray Train (the demo's: 10)")
    ap.add_argument("--hidden", type=int, default=128, help="model width (the demo's: 128)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the demo's: 4)")
    ap.add_argument("--two-workers", action="store_true", help="also 2 Ray Train workers (DDP, gloo) on the same cores")
    ap.add_argument("--json", default="", help="also write the figures to this file (one JSON object)")
    args = ap.parse_args()
    root = os.path.abspath(args.root)

    import ray

    from tessera.config import load_config

    result = {"bench": "train", "cores": os.cpu_count(), "steps": args.steps, "hidden": args.hidden, "layers": args.layers,
              "log_every": args.log_every,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    with tempfile.TemporaryDirectory() as work:
        cfg1 = load_config("configs/demo.yaml", overrides(root, f"{work}/w1", args.steps, 1, 1.5, args.hidden, args.layers, args.log_every))
        plain, plain_eff = plain_loop(cfg1, args.steps)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False)
        one, eff1, wall1 = ray_train(cfg1)
        result |= {"plain_tokens_per_s": round(plain, 1), "ray_tokens_per_s": round(one, 1), "ray_over_plain": round(one / plain, 3),
                   "packing_efficiency": round(eff1, 4), "ray_wall_s": round(wall1, 1)}
        if args.two_workers:
            cfg2 = load_config("configs/demo.yaml", overrides(root, f"{work}/w2", args.steps, 2, 0.75, args.hidden, args.layers, args.log_every))
            two, eff2, wall2 = ray_train(cfg2)
            result |= {"two_workers_tokens_per_s": round(two, 1), "two_over_one": round(two / one, 3)}
        ray.shutdown()
    print(f"# bench_train: {args.steps} steps of 8 x 512-token packed rows, {args.hidden} wide x {args.layers} layers, "
          f"a report to Ray Train every {args.log_every} steps, {os.cpu_count()}-core CPU")
    print(f"plain PyTorch loop (same rows, in process): {plain:8.0f} tokens/s   packing efficiency {plain_eff:.3f}")
    print(f"Ray Train, 1 worker (rows packed ahead):   {one:8.0f} tokens/s   packing efficiency {eff1:.3f}   wall {wall1:.0f}s")
    print(f"Ray Train / plain loop: {one / plain:.2f}x")
    if args.two_workers:
        print(f"Ray Train, 2 workers (DDP, gloo):          {result['two_workers_tokens_per_s']:8.0f} tokens/s   wall {wall2:.0f}s")
        print(f"2 workers / 1 worker: {result['two_over_one']:.2f}x")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
