"""What every job shares: argument parsing, joining or starting Ray, and the commit protocol.

Commit protocol (exactly-once outputs without Ray Data checkpointing): a job works in
`<output>/_work/`, marks each finished step there (`<step>.done`, holding the config
fingerprint), writes its final tables, then their `manifest.json` files, and last of all
`report.json`. `report.json` with the current fingerprint means "complete": a re-run
does nothing. Without it, finished steps are kept and unfinished ones are cleared and
redone, so a run killed anywhere completes on the next try with no row lost or
duplicated. Final tables are cleared before they are written, so a half-written table
from a killed attempt never survives.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from typing import Callable, Iterator

from tessera import storage
from tessera.config import ConfigError, RayConfig, TesseraConfig, load_config
from tessera.faults import ENV as FAULT_ENV
from tessera.loop import worker_print


def logs_dir(cfg: TesseraConfig) -> str:
    """Where the console writes each stage's full log (`tessera.console`): `<run.root>/logs`."""
    return storage.join(cfg.run.root, "logs")


def preflight(verb: str, *checks: Callable[[], None], say: Callable[[str], None] | None = None) -> None:
    """Checks that need no Ray and write nothing (a source's location, ...): a failed one is reported
    like a config error, in one line (to stderr, or `say`) with exit status 2, before any work."""
    try:
        for check in checks:
            check()
    except ConfigError as e:
        (say or (lambda text: print(text, file=sys.stderr)))(f"tessera {verb}: {e}")
        raise SystemExit(2) from e


def parse_args(verb: str, argv: list[str] | None, description: str) -> tuple[TesseraConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=f"tessera {verb}", description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set prepare.rows_per_shard=128 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"tessera {verb}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    if submission().get("runtime_env", {}).get("working_dir") and "://" not in cfg.run.root and not os.path.isabs(cfg.run.root):
        print(f"[tessera] warning: run.root {cfg.run.root!r} is relative and this job runs in Ray's temporary copy of "
              f"the uploaded working dir ({os.getcwd()}): outputs land there, on this node only. On a cluster give "
              "--set run.root=<an absolute shared path or a URI every node sees>.", file=sys.stderr, flush=True)
    return cfg, args


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Join `cfg.address` or `RAY_ADDRESS` if set, else start an embedded local Ray.
    A Ray already initialised in this process (tests, `tessera run`) is reused and left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a new embedded Ray, never some other cluster found on this machine
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",  # never expose the embedded dashboard beyond this machine
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()




def run_ray_train_loop(loop, rank: int, prefix: str, on_log=None, after_step=None) -> None:
    """The whole Ray Train side of a Ray-free loop (`tessera.loop`): restore the loop from the checkpoint
    Ray Train recorded (trainer state and this rank's data position both inside that one checkpoint, so
    they can never disagree), then report every step the loop yields, with a checkpoint when one is due
    (every rank writes its part into its own directory; Ray Train merges them into one checkpoint).
    `on_log(step)` runs on logged steps, `after_step(step)` after every step (fault hooks); `prefix`
    starts the console line of a resume."""
    import logging
    import tempfile

    import ray.train

    # Ray Train logs every checkpoint it creates, and every report as a `TrainingReport(...)` repr (through a
    # logger named by its file, not under "ray.train"); the loop's own lines say the same once
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray: its reports are logged, nothing breaks
        pass
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            loop.load_checkpoint(d, rank)
        if rank == 0:
            worker_print(f"{prefix} resumed at step {loop.step}, data position {loop.position}")
    for step in loop:
        if step.metrics is not None and on_log is not None:
            on_log(step)
        if step.checkpoint:
            with tempfile.TemporaryDirectory() as tmp:
                loop.save_checkpoint(tmp, rank)
                ray.train.report(step.metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif step.metrics is not None:
            ray.train.report(step.metrics)
        if after_step is not None:
            after_step(step)


def preserve_data_order() -> None:
    """Ray Data in this driver yields rows in input order from here on, in `materialize()` and in the
    Ray Train shards (whose default ingest options copy the current context). A trainer's outcome
    depends on the order it sees: without this, blocks come in task-completion order and two runs of
    one config and seed train on different streams (the tokenizer's codebook restarts amplify that)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True


def without_progress_bars(dataset):
    """A dataset a Ray Train worker reads with its own context: no progress bar redrawn into the job log
    at every step (the loop's `[train]` lines say how far it is)."""
    dataset.context.enable_progress_bars = False
    return dataset


# runtime_env keys a resubmission can carry over (the uploaded working_dir / py_modules are temporary
# `gcs://` packages of the original submission: a resubmission uploads the checkout again)
RESUBMITTABLE_ENV = ("env_vars", "pip", "uv", "conda", "image_uri", "container", "excludes")


def submission() -> dict:
    """What Ray's job supervisor told this driver (`RAY_JOB_CONFIG_JSON_ENV_VAR`): the submission id,
    metadata and runtime env of the `ray job submit` that started it; {} when not a submitted job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        job = json.loads(raw)
    except ValueError:
        return {}
    metadata = job.get("metadata") or {}
    return {"submission_id": metadata.get("job_submission_id"), "metadata": metadata, "runtime_env": job.get("runtime_env") or {}}


def resubmit_record(module: str, argv: list[str]) -> dict:
    """What `tessera resume` needs to submit this command again, on this cluster or another: the
    module and arguments, the runtime env (minus the temporary uploaded packages), whether it ran from
    an uploaded working dir (then the resubmission uploads one again) or else the directory it ran in."""
    job = submission()
    env = job.get("runtime_env", {})
    uploaded = bool(env.get("working_dir"))
    return {"command": ["python", "-m", module, *argv], "working_dir": uploaded, "cwd": None if uploaded else os.getcwd(),
            "runtime_env": _without_fault_hooks({k: v for k, v in env.items() if k in RESUBMITTABLE_ENV})}


def _without_fault_hooks(runtime_env: dict) -> dict:
    """A test's fault hook (`TESSERA_FAULT` in env_vars) fires in the job it was given to, not in every resubmission."""
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items() if k != FAULT_ENV}
    return {k: v for k, v in runtime_env.items() if k != "env_vars"} | ({"env_vars": env_vars} if env_vars else {})


def ray_job_record() -> dict:
    """The Ray job this driver runs as: submission id (when submitted) and the dashboard address that
    reports its status (for `tessera runs` / `tessera resume`)."""
    import ray

    record = {"submission_id": submission().get("submission_id")}
    try:
        record["job_id"] = ray.get_runtime_context().get_job_id()
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        record["dashboard"] = (url if "://" in url else f"http://{url}") if url else None
    except Exception:  # noqa: BLE001 - best effort: a run without it is still listed, just without Ray's status
        pass
    return record


def fingerprint(*parts) -> str:
    """Stable short hash of JSON-able parts (config sections, input file lists, upstream hashes):
    a job's outputs are complete only for the fingerprint they were made with."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class JobState:
    """Step markers and completion of one job's output directory (see module docstring)."""

    def __init__(self, output: str, fingerprint: str):
        self.output = output
        self.fingerprint = fingerprint
        self.work = storage.join(output, "_work")

    @property
    def report_uri(self) -> str:
        return storage.join(self.output, "report.json")

    def is_complete(self) -> bool:
        if not storage.exists(self.report_uri):
            return False
        try:
            return storage.read_json(self.report_uri).get("fingerprint") == self.fingerprint
        except ValueError:
            return False

    def begin(self) -> None:
        """Start or resume: drop a stale report, and work from a different config."""
        if storage.exists(self.report_uri):
            storage.remove_tree(self.report_uri)  # outputs of another config: not complete any more
        marker = storage.join(self.work, "fingerprint.json")
        if storage.exists(marker) and storage.read_json(marker).get("fingerprint") != self.fingerprint:
            storage.remove_tree(self.work)
        storage.write_json(marker, {"fingerprint": self.fingerprint})

    def step_done(self, step: str) -> bool:
        return storage.exists(storage.join(self.work, f"{step}.done"))

    def step_info(self, step: str) -> dict:
        return storage.read_json(storage.join(self.work, f"{step}.done"))

    def mark_done(self, step: str, info: dict | None = None) -> None:
        storage.write_json(storage.join(self.work, f"{step}.done"), info or {})

    def step_dir(self, step: str, fresh: bool) -> str:
        """Directory of a step's intermediate output; `fresh` clears leftovers of a killed attempt."""
        uri = storage.join(self.work, step)
        if fresh:
            storage.remove_tree(uri)
        return uri

    def finish(self, report: dict) -> None:
        storage.write_json(self.report_uri, {**report, "fingerprint": self.fingerprint})
        storage.remove_tree(self.work)
