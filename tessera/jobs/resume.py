"""`tessera resume RUN`: submit a training run's recorded command to a Ray cluster again; the job
continues from the last checkpoint Ray Train recorded (same stage, step and data position), because
re-running the same command is how a Tessera run resumes. The dashboard lists jobs but cannot
restart them; this is the way back in.

What is resubmitted is what the run recorded (`common.resubmit_record`): the module and its
arguments and the runtime env, never a temporary path. A run first submitted with
`--working-dir` is resubmitted with `--working-dir` (default: this directory, the checkout),
so it works after a head restart or on another cluster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from tessera import storage
from tessera.jobs.runs import describe

ACTIVE = ("PENDING", "RUNNING")


def resume_request(state: dict, working_dir: str | None, overrides: list[str], env: list[str] = ()) -> tuple[str, dict]:
    """(entrypoint, runtime_env) that submit the run's recorded command again, plus `--set` overrides and
    `--env NAME=VALUE` variables over the recorded ones."""
    record = state.get("resubmit")
    if record is None:  # recorded by an older Tessera: the driver's argv and directory
        args = ["python", *list(state["entrypoint"])[1:]]
        record = {"command": args, "working_dir": False, "cwd": state.get("cwd"), "runtime_env": {}}
    command = [*record["command"], *[a for o in overrides for a in ("--set", o)]]
    entrypoint = " ".join(shlex.quote(a) for a in command)
    runtime_env = dict(record.get("runtime_env") or {})
    if env:
        runtime_env["env_vars"] = dict(runtime_env.get("env_vars") or {}) | dict(e.split("=", 1) for e in env)
    if record.get("working_dir"):
        runtime_env["working_dir"] = os.path.abspath(working_dir or ".")
    elif record.get("cwd"):
        entrypoint = f"cd {shlex.quote(record['cwd'])} && {entrypoint}"
    return entrypoint, runtime_env


def submit(client, entrypoint: str, metadata: dict | None = None, runtime_env: dict | None = None,
           submission_id: str | None = None, wait_s: float = 120.0) -> str:
    """submit_job, retrying while a freshly started head has no job agent yet."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, metadata=metadata or {}, runtime_env=runtime_env or None,
                                     submission_id=submission_id)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def find_output(run: str, root: str, output: str) -> str:
    """The run's `train.output`: given, or `<run>/train` for a run root (a path/URI or a name under root)."""
    if output:
        return storage.absolute(output)
    run_root = run if storage.exists(storage.join(storage.absolute(run), "train", "state.json")) else storage.join(root, run)
    return storage.join(storage.absolute(run_root), "train")


def resumable_run(output: str, address: str) -> dict:
    """The run at `output` as `runs.describe` sees it, after saying what it resumes from; exits (status 2,
    one line on stderr) when there is nothing to resume or Ray still runs it."""
    if not storage.exists(storage.join(output, "state.json")):
        _refuse(f"no training state at {storage.join(output, 'state.json')} (has this run started training?)")
    where = describe(output, address)
    if where["ray_status"] in ACTIVE:
        _refuse(f"{where['run']} is still {where['ray_status']} as Ray job {where['submission_id']}; "
                f"stop it first (ray job stop {where['submission_id']})")
    if where["state"].get("status") == "complete":
        _refuse(f"{where['run']} is complete ({output}); nothing to resume")
    ckpt = where["checkpoint"]
    print(f"[tessera] resume {where['run']}: stage {where['stage']!r} ({(where['stage_index'] or 0) + 1}/{where['stages']}), "
          + (f"from the recorded checkpoint at global step {ckpt['step']} ({ckpt['path']})" if ckpt
             else "no recorded checkpoint in this stage: it starts over from the previous stage's model")
          + f"; last logged step {where['step']}/{where['steps_total']}", flush=True)
    return where


def _env_var(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def _refuse(message: str) -> None:
    print(f"tessera resume: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="tessera resume", description="Re-submit a run to a Ray cluster (it resumes).")
    ap.add_argument("run", help="run name (a directory under --root) or a run root path / URI")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--output", default="", help="the run's train.output when not <run root>/train")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray job submission address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--working-dir", default=None,
                    help="the checkout to upload when the run was submitted with --working-dir (default: .)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for the resubmitted command (e.g. train.max_failures=3)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", type=_env_var,
                    help="environment variable for the resubmitted job, over the recorded ones (e.g. NCCL_DEBUG=INFO)")
    ap.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    args = ap.parse_args(argv)
    where = resumable_run(find_output(args.run, args.root, args.output), args.address)
    state = where["state"]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint, runtime_env = resume_request(state, args.working_dir, args.overrides, args.env)
    run = where["run"] or "run"
    job_id = submit(client, entrypoint, {"tessera_run": run, "resume_of": str(where["submission_id"] or "")},
                    runtime_env, submission_id=f"tessera-{run}-resume-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"[tessera] resume: submitted {job_id} to {args.address}: {entrypoint}"
          + (f" (working dir {runtime_env['working_dir']})" if "working_dir" in runtime_env else ""), flush=True)
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
