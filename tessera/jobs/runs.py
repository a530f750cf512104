"""`tessera runs`: the training runs under a runs directory, with state, stage, step and latest
checkpoint (read from each run's train/state.json, metrics.csv and Ray Train storage)."""

from __future__ import annotations

import argparse
import os

from tessera import storage


def latest_checkpoint(ray_train_run: str | None) -> str | None:
    if not ray_train_run or not os.path.isdir(ray_train_run):
        return None
    ckpts = sorted(d for d in os.listdir(ray_train_run) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(ray_train_run, d)))
    return os.path.join(ray_train_run, ckpts[-1]) if ckpts else None


def list_runs(root: str) -> list[dict]:
    from tessera.jobs.train import read_metrics

    runs = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not os.path.isdir(os.path.join(root, name)):
            continue
        for sub in sorted(os.listdir(os.path.join(root, name))):
            path = os.path.join(root, name, sub, "state.json")
            if not os.path.isfile(path):
                continue
            state = storage.read_json(path)
            metrics = read_metrics(os.path.join(root, name, sub, "metrics.csv"))
            runs.append({"run": state.get("run", name), "path": os.path.join(root, name, sub), "status": state.get("status"),
                         "stage": state.get("stage"), "step": int(metrics[-1]["step"]) if metrics else 0,
                         "checkpoint": latest_checkpoint(state.get("ray_train_run")), "entrypoint": state.get("entrypoint")})
    return runs


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="tessera runs", description="List training runs and where they stand.")
    ap.add_argument("--root", default="runs", help="directory holding run roots (default: runs)")
    args = ap.parse_args(argv)
    runs = list_runs(args.root)
    if not runs:
        print(f"no training runs under {args.root}")
    for r in runs:
        print(f"{r['run']:<20} {r['status'] or '?':<9} stage {r['stage'] or '-':<12} step {r['step']:<6} "
              f"{r['checkpoint'] or 'no checkpoint'}  ({r['path']})")
    return runs


if __name__ == "__main__":
    main()
