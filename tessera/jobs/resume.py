"""`tessera resume RUN`: re-submit a training run's recorded entrypoint to a Ray cluster through the
job submission API. The job then continues from the run's latest checkpoint (same stage, step
and data position), because re-running the same command is how a Tessera run resumes. The
Ray dashboard lists jobs but cannot restart them; this is the way back in.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from tessera import storage


def resume_entrypoint(state: dict) -> str:
    """The recorded command, run from the directory it was first run in (relative paths keep meaning)."""
    args = list(state["entrypoint"])
    if args and os.path.isabs(args[0]) and not os.path.exists(args[0]):
        args[0] = "python"  # recorded on another machine: the cluster's own interpreter
    command = " ".join(shlex.quote(a) for a in args)
    return f"cd {shlex.quote(state['cwd'])} && {command}" if state.get("cwd") else command


def submit(client, entrypoint: str, metadata: dict | None = None, wait_s: float = 120.0) -> str:
    """submit_job, retrying while a freshly started head has no job agent yet."""
    import time

    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, metadata=metadata or {})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="tessera resume", description="Re-submit a run to a Ray cluster (it resumes).")
    ap.add_argument("run", help="run name (a directory under --root) or a run root path")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--output", default="", help="the run's train.output when not <run root>/train")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray job submission address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    args = ap.parse_args(argv)
    run_root = args.run if os.path.isdir(args.run) else os.path.join(args.root, args.run)
    state_path = os.path.join(args.output or os.path.join(run_root, "train"), "state.json")
    if not os.path.isfile(state_path):
        print(f"tessera resume: no training state at {state_path} (has this run started training?)", file=sys.stderr)
        raise SystemExit(2)
    state = storage.read_json(state_path)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = resume_entrypoint(state)
    job_id = submit(client, entrypoint, {"tessera_run": state.get("run", ""), "resume": "true"})
    print(f"[tessera] resume: submitted {job_id} to {args.address}: {entrypoint}")
    if args.wait:
        import asyncio

        async def follow():
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="")

        asyncio.run(follow())
        print(f"[tessera] resume: {job_id} {client.get_job_status(job_id)}")
    return job_id


if __name__ == "__main__":
    main()
