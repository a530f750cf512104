"""`tessera runs`: the training runs under a directory or URI and where each stands.

For each run (`<run root>/train/state.json` and the run's `metrics.csv`, read through
`tessera.storage`, so `s3://`/`gs://` run roots are listed too): stage, step / total, last loss,
the last checkpoint Ray Train *recorded* (its `checkpoint_manager_snapshot.json`, which is what a
resume restores, never the newest checkpoint folder: one written just before a stop may be
unrecorded), and, for a run started by `ray job submit`, the submission id and the job's status as
Ray reports it (a stopped driver never gets to update its own state).
"""

from __future__ import annotations

import argparse
import os

from tessera import storage

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def recorded_checkpoint(ray_train_run: str | None) -> dict | None:
    """The latest checkpoint Ray Train recorded for a stage's run: {path, step, stage_step}, or None.
    Read through Ray Train's own API (`Result.from_path` over the run's storage filesystem), which
    restores exactly what a resume would: the checkpoint manager's snapshot, never a newer folder."""
    if not ray_train_run or not storage.exists(storage.join(ray_train_run, SNAPSHOT)):
        return None
    import logging

    from ray.train import Result

    fs, path = storage.resolve(ray_train_run)
    train_log = logging.getLogger("ray.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # from_path announces the snapshot it found, for every run listed
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except Exception:  # noqa: BLE001 - a snapshot being rewritten: no claim rather than a wrong one
        return None
    finally:
        train_log.setLevel(level)
    if result.checkpoint is None:
        return None
    metrics = next((m for c, m in result.best_checkpoints or [] if c.path == result.checkpoint.path), {}) or {}
    return {"path": storage.with_scheme(result.checkpoint.path, ray_train_run), "step": metrics.get("step"),
            "stage_step": metrics.get("stage_step")}


def ray_status(ray_record: dict | None, address: str | None = None) -> str | None:
    """The submitted job's status as Ray reports it ('RUNNING', 'STOPPED', ...); 'unreachable' when the
    cluster does not answer; None for a run that was not submitted as a job."""
    record = ray_record or {}
    if not record.get("submission_id"):
        return None
    address = record.get("dashboard") or address
    if not address:
        return "unknown"
    try:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(address).get_job_status(record["submission_id"]).value)
    except Exception:  # noqa: BLE001 - a gone cluster is a status, not a crash of the listing
        return "unreachable"


def describe(output: str, address: str | None = None, ask_ray: bool = True) -> dict:
    """Where the run whose `train.output` is `output` stands."""
    from tessera.jobs.train import read_metrics

    state = storage.read_json(storage.join(output, "state.json"))
    metrics = read_metrics(storage.join(output, "metrics.csv"))
    ray_record = state.get("ray") or {}
    status = state.get("status")
    job_status = ray_status(ray_record, address) if ask_ray else None
    if status == "running" and job_status in ("STOPPED", "FAILED", "SUCCEEDED"):
        status = job_status.lower()  # the driver ended without recording it (`ray job stop`, a killed head)
    stages = state.get("stages") or []
    return {"run": state.get("run"), "path": output, "status": status, "stage": state.get("stage"),
            "stage_index": state.get("stage_index"), "stages": len(stages),
            "step": int(metrics[-1]["step"]) if metrics else 0, "steps_total": state.get("steps_total"),
            "loss": metrics[-1]["loss"] if metrics else None,
            "checkpoint": recorded_checkpoint(state.get("ray_train_run")),
            "submission_id": ray_record.get("submission_id"), "ray_status": job_status, "state": state}


def list_runs(root: str, address: str | None = None, ask_ray: bool = True) -> list[dict]:
    """Every run under `root`: `root` itself, its sub-directories, and theirs (a run root's `train/`)."""
    root = storage.absolute(root)
    candidates = [root, *storage.list_dirs(root)]
    candidates += [sub for d in candidates[1:] for sub in storage.list_dirs(d)]
    return [describe(d, address, ask_ray) for d in candidates if storage.exists(storage.join(d, "state.json"))]


def format_run(r: dict) -> str:
    ckpt = r["checkpoint"]
    stage = f"{r['stage'] or '-'} ({(r['stage_index'] or 0) + 1}/{r['stages']})" if r["stage"] else "-"
    loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
    job = f"{r['submission_id']} {r['ray_status']}" if r["submission_id"] else "not a Ray job"
    return (f"{r['run'] or '?':<16} {r['status'] or '?':<9} stage {stage:<16} step {r['step']}/{r['steps_total'] or '?':<6} "
            f"loss {loss:<8} recorded checkpoint "
            f"{'step ' + str(ckpt['step']) + ' ' + ckpt['path'] if ckpt else 'none (stage starts over)'} | job {job} | {r['path']}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="tessera runs", description="List training runs and where they stand.")
    ap.add_argument("--root", default="runs", help="directory or URI holding run roots (default: runs)")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="Ray dashboard address for job status when a run did not record one")
    args = ap.parse_args(argv)
    runs = list_runs(args.root, args.address)
    if not runs:
        print(f"no training runs under {args.root}")
    for r in runs:
        print(format_run(r))
    return runs


if __name__ == "__main__":
    main()
