"""`tessera train` on Ray Train: stages, exact resume after a killed worker and a killed driver."""

import os

import pytest
import torch

from tessera.jobs.train import read_metrics
from tests.conftest import TINY_BPE, TINY_TOKENIZER, TINY_TRAIN, tiny_config


def train_config(world_root, name, *extra):
    return tiny_config(world_root, *TINY_TOKENIZER, *TINY_BPE, *TINY_TRAIN, f"train.output={{root}}/{name}",
                       f"train.storage_path={{root}}/{name}-ray", *extra)


@pytest.fixture(scope="module")
def uninterrupted(bpe_fitted, world_root, ray_cluster):
    from tessera.jobs.train import train

    cfg = train_config(world_root, "train-clean")
    return cfg, train(cfg)


def losses(cfg):
    return [(m["step"], m["stage"], m["loss"]) for m in read_metrics(os.path.join(cfg.resolve(cfg.train.output), "metrics.csv"))]


def test_stages_run_in_order_and_outputs_load(uninterrupted):
    from tessera.jobs.train import train
    from tessera.model.assets import load_model, read_info

    cfg, report = uninterrupted
    rows = losses(cfg)
    assert [s for s, _, _ in rows] == list(range(1, 8))
    assert [st for _, st, _ in rows] == ["embeddings"] * 3 + ["all"] * 4  # the transition is at the configured step
    assert report["steps"] == 7 and [s["start_step"] for s in report["stages"]] == [0, 3]
    assert all(torch.isfinite(torch.tensor(loss)) for _, _, loss in rows)
    assert os.path.getsize(report["loss_curve"]) > 1000
    model = load_model(report["model"])
    info = read_info(report["model"])
    assert info["bpe"]["hash"] == report["identities"]["bpe"]["hash"] and info["stage"] == "all"
    # stage 1 trained only the new rows: the text rows of its model equal a fresh model's
    from tessera.model.unified import TesseraModel

    stage0 = load_model(os.path.join(cfg.resolve(cfg.train.output), "stages", "0-embeddings", "model"))
    fresh = TesseraModel.create(cfg.model, stage0.vocab, seed=cfg.run.seed)
    old = stage0.vocab.text_size
    for get in ("get_input_embeddings", "get_output_embeddings"):
        a, b = getattr(stage0.lm, get)().weight, getattr(fresh.lm, get)().weight
        assert torch.equal(a[:old], b[:old]) and not torch.equal(a[old:], b[old:])
    assert model.vocab.size == stage0.vocab.size
    assert train(cfg)["skipped"] is True


def test_a_questions_stage_plans_enough_rows_for_its_steps(bpe_fitted, world_root):
    """A `questions` stage keeps only some turns of each conversation, so its rows are far shorter than
    the index's lengths say. Its plan is scaled by the shrink measured on the first packing group:
    every rank's groups still build the rows the stage's steps take, and only matching turns are trained."""
    from tessera.config import ConfigError
    from tessera.jobs.train import _load_data, _plan, stage_groups, stage_spec
    from tessera.model.rows import build_group
    from tessera.model.unified import IGNORE
    from tessera.pipelines.shapes import SHAPES

    cfg = train_config(world_root, "train-questions", "train.num_workers=2",
                       "train.stages=[{name: shape, steps: 12, batch_size: 4, seq_len: 256, loss_mask: answers,"
                       " questions: '^What shape', mixture: {weights: {task=vqa: 1.0}}}]")
    run = _plan(cfg)
    _load_data(run)
    spec = stage_spec(cfg, 0, run.spec_kwargs)
    plan, groups, per_rank = stage_groups(cfg, run.index, 0, spec)
    built = [build_group(spec, [run.index.files[s] for s, _ in grp], [run.index.rows[s] for s, _ in grp], [e for _, e in grp], g)[0]
             for g, grp in enumerate(groups)]
    for rank in range(2):
        assert sum(len(b) for g, b in enumerate(built) if g % 2 == rank) >= 12 * 4 // 2, f"rank {rank} would run dry"
    answers = {w for rows in built for r in rows for w in run.assets.text_tokenizer.decode(
        [int(t) for t in r["labels"] if t != IGNORE and t != run.vocab.eos_id]).split()}
    assert answers and answers <= set(SHAPES), answers
    # a pattern no question matches fails before any training, naming the stage's key
    nothing = train_config(world_root, "train-questions", "train.stages=[{name: shape, steps: 12, batch_size: 4, seq_len: 256,"
                           " loss_mask: answers, questions: '^How tall', mixture: {weights: {task=vqa: 1.0}}}]")
    with pytest.raises(ConfigError, match=r"train\.stages\[shape\]\.questions"):
        stage_groups(nothing, run.index, 0, stage_spec(nothing, 0, run.spec_kwargs))


def test_runs_lists_the_run_with_stage_step_and_checkpoint(uninterrupted, world_root):
    from tessera.jobs.runs import list_runs

    runs = {r["path"]: r for r in list_runs(str(world_root.parent), ask_ray=False)}
    clean = runs[str(world_root / "train-clean")]
    assert clean["status"] == "complete" and clean["stage"] == "all" and clean["step"] == clean["steps_total"] == 7
    assert clean["checkpoint"]["step"] == 7 and os.path.isdir(clean["checkpoint"]["path"])
    assert clean["loss"] == losses(uninterrupted[0])[-1][2] and clean["submission_id"] is None
    record = clean["state"]["resubmit"]
    assert record["command"][:3] == ["python", "-m", "tessera.jobs.train"] and record["working_dir"] is False


def test_killed_worker_is_recovered_and_losses_match_on_an_object_store(uninterrupted, world_root, s3_root, monkeypatch):
    """`train.output` and Ray Train's storage on S3 (the session's moto server on 127.0.0.1): the rank-0
    worker dies after step 5 (inside stage 2, one step past a checkpoint), FailureConfig restarts it from
    the checkpoint Ray Train recorded on S3, and every step's loss equals the local clean run's; the
    model loads from S3, `tessera runs` lists the run there, and the same command finds it complete."""
    from tessera import storage
    from tessera.jobs.runs import list_runs
    from tessera.jobs.train import train
    from tessera.model.assets import load_model

    monkeypatch.setenv("TESSERA_FAULT", "train:step?at=5")  # read by the driver, handed to the rank-0 worker
    out = f"{s3_root}/run/train"
    cfg = train_config(world_root, "unused", f"train.output={out}", f"train.storage_path={s3_root}/run/ray_train",
                       "train.max_failures=1")
    report = train(cfg)
    assert report["steps"] == 7
    assert storage.exists(f"{out}/fault-5.marker") and storage.exists(f"{out}/loss_curve.png")
    assert losses(cfg) == losses(uninterrupted[0])
    (listed,) = list_runs(f"{s3_root}/run", ask_ray=False)
    assert listed["status"] == "complete" and listed["step"] == 7 and listed["checkpoint"]["path"].startswith("s3://")
    assert load_model(f"{out}/model").vocab.size == load_model(uninterrupted[1]["model"]).vocab.size
    assert train(cfg)["skipped"] is True


def _kill_session(gcs_port: int) -> None:
    """Kill the processes of the head started on `gcs_port` (and their children), not any other
    Ray on this machine: `ray stop` would also stop the test session's own Ray."""
    import re
    import signal

    procs, parent = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            procs[int(pid)] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    sessions = {m.group(0) for cmd in procs.values() if f"--gcs_server_port={gcs_port}" in cmd
                for m in [re.search(r"session_[0-9_-]+", cmd)] if m}
    victims = {pid for pid, cmd in procs.items() if any(s in cmd for s in sessions) and pid != os.getpid()}
    grown = True
    while grown:
        grown = False
        for pid, pp in parent.items():
            if pp in victims and pid not in victims:
                victims.add(pid)
                grown = True
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def head_node(tmp_path):
    """A real `ray start --head` cluster (token auth off, its own ports), killed afterwards."""
    import socket
    import subprocess
    import sys

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    gcs, dash, agent, agent_grpc, metrics = (free_port() for _ in range(5))
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # `python` = this env's
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        _kill_session(gcs)


def wait_job(client, job_id, timeout=900):
    import time

    from ray.job_submission import JobStatus

    t = time.time()
    while time.time() - t < timeout:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status, client.get_job_logs(job_id)
        time.sleep(2)
    raise TimeoutError(job_id)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_OVERRIDES = [*TINY_TOKENIZER, *TINY_BPE, *TINY_TRAIN, "train.output={root}/train-job", "train.storage_path={root}/train-job-ray",
                 "eval.model={root}/train-job/model", "eval.output={root}/eval-job", "eval.num_generate=2",
                 "eval.num_captions=4", "eval.num_questions=8"]


def readme_submit(dashboard, verb, overrides, wait=True, fault=""):
    """The README's command exactly, run from the checkout with RAY_ADDRESS set:
    `ray job submit --working-dir . -- python -m tessera.jobs.<verb> --set ...` (a `fault` hook goes in
    the job's runtime env, as `tessera.faults` says). Returns (submission id, output)."""
    import json
    import re
    import subprocess
    import sys

    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", *([] if wait else ["--no-wait"]),
           *(["--runtime-env-json", json.dumps({"env_vars": {"TESSERA_FAULT": fault}})] if fault else []),
           "--working-dir", ".", "--", "python", "-m", f"tessera.jobs.{verb}", *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, RAY_ADDRESS=dashboard), capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    found = re.search(r"raysubmit_[A-Za-z0-9]+", out)
    assert found, out[-3000:]
    return found.group(0), out


def wait_until(condition, what, timeout=300):
    import time

    t = time.time()
    while not condition():
        if time.time() - t > timeout:
            raise TimeoutError(what)
        time.sleep(0.5)


def recorded_step(output):
    from tessera.jobs.runs import recorded_checkpoint
    from tessera import storage

    path = os.path.join(output, "state.json")
    if not os.path.exists(path):
        return None
    ckpt = recorded_checkpoint(storage.read_json(path).get("ray_train_run"))
    return ckpt and ckpt["step"]


def stop_and_check(client, job, output, step, stage):
    """`ray job stop`, then `tessera runs` shows what Ray says, the stage, and the last *recorded* checkpoint."""
    import subprocess
    import sys

    from ray.job_submission import JobStatus

    from tessera.jobs.runs import list_runs

    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "stop", "--address", client._address, job],
                   check=True, capture_output=True, timeout=120)
    assert wait_job(client, job)[0] == JobStatus.STOPPED
    (run,) = [r for r in list_runs(os.path.dirname(output)) if r["path"] == output]
    assert run["status"] == "stopped" and run["ray_status"] == "STOPPED" and run["submission_id"] == job
    assert run["stage"] == stage and run["checkpoint"]["step"] == step and run["steps_total"] == 7
    return run


def plant_unrecorded_checkpoint(recorded: str) -> str:
    """What a stop between a checkpoint's upload and Ray Train recording it leaves: a newer checkpoint
    folder the snapshot does not list (here one whose data position is further on, so trusting it
    would change every later loss)."""
    import json
    import shutil
    import time

    planted = os.path.join(os.path.dirname(recorded), "checkpoint_" + time.strftime("%Y-%m-%d_%H-%M-%S") + ".999999")
    shutil.copytree(recorded, planted)
    path = os.path.join(planted, "position_rank0.json")
    position = json.load(open(path))
    json.dump({"next": [position["next"][0] + 1, 0], "step": position["step"] + 1}, open(path, "w"))
    return planted


def test_every_verb_through_the_readme_command_and_stops_at_any_moment_resume_exactly(uninterrupted, world_root, head_node):
    """On a `ray start --head` cluster, every verb is submitted with the README's `ray job submit
    --working-dir .` (the upstream ones find their outputs complete; fit-bpe, train and eval import the
    compiled BPE core from an upload without it). Training is stopped with `ray job stop` inside stage 1
    and inside stage 2, each time just after a recorded checkpoint, and once more a checkpoint folder
    Ray Train never recorded is left behind; `tessera resume` continues each time, and every logged loss
    equals the uninterrupted run's."""
    import re

    from ray.job_submission import JobStatus, JobSubmissionClient

    from tessera.jobs.resume import main as resume
    from tessera.jobs.runs import list_runs
    from tests.conftest import TINY

    dashboard, _ = head_node
    client = JobSubmissionClient(dashboard)
    overrides = [f"run.root={world_root}", *TINY, *JOB_OVERRIDES]
    # the upstream verbs find their outputs complete, so they are submitted together (each job's start,
    # its upload and driver, is most of its time) and waited for one by one
    upstream = {verb: readme_submit(dashboard, verb, overrides, wait=False)[0]
                for verb in ("synth", "prepare", "train_tokenizer", "tokenize", "fit_bpe")}
    for verb, job in upstream.items():
        status, logs = wait_job(client, job)
        assert status == JobStatus.SUCCEEDED, f"{verb}: {logs[-3000:]}"
        assert "nothing to do" in logs, f"{verb}: {logs[-3000:]}"
    cfg = train_config(world_root, "train-job")
    output = cfg.resolve(cfg.train.output)

    job, _ = readme_submit(dashboard, "train", overrides, wait=False, fault="train:step?at=2&mode=hang")
    wait_until(lambda: recorded_step(output) == 2, "stage 1's step-2 checkpoint recorded")
    stop_and_check(client, job, output, 2, "embeddings")

    job = resume([str(world_root), "--output", output, "--address", dashboard, "--env", "TESSERA_FAULT=train:step?at=5&mode=hang"])
    assert job.startswith("tessera-") and client.get_job_info(job).metadata["tessera_run"] == cfg.run.name
    wait_until(lambda: recorded_step(output) == 5, "stage 2's step-2 checkpoint recorded")
    run = stop_and_check(client, job, output, 5, "all")

    plant_unrecorded_checkpoint(run["checkpoint"]["path"])
    (again,) = [r for r in list_runs(str(world_root)) if r["path"] == output]
    assert again["checkpoint"] == run["checkpoint"], "the unrecorded folder is never reported as the checkpoint"
    job = resume([str(world_root), "--output", output, "--address", dashboard])
    status, logs = wait_job(client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    # after Ray's job-manager preamble, the job's log is the console: the stage's lines and the summary
    console = [ln for ln in logs.split("Running entrypoint for job", 1)[1].splitlines()[1:] if ln.strip()]
    assert 2 <= len(console) <= 6, logs[-3000:]
    assert len(set(console)) == len(console) and not any("pid=" in ln or "INFO" in ln for ln in console), logs[-3000:]
    assert any(ln.startswith("[train] done in ") and ln.endswith(os.path.join(str(world_root), "logs", "train.log")) for ln in console)
    with open(os.path.join(world_root, "logs", "train.log")) as f:
        detail = f.read().rsplit("==== train ", 1)[-1]  # this job's part of the stage's log (each attempt appends)
    assert "stage 0 'embeddings': complete, skipped" in detail and detail.count("'all': resumed at step 2") == 1
    assert re.findall(r"\[train\] all step \d/4", detail) == ["[train] all step 3/4", "[train] all step 4/4"], "each line once"
    assert "TrainingReport(" not in detail and "Running Dataset rank" not in detail, "no report reprs, no progress bars redrawn per step"
    assert losses(cfg) == losses(uninterrupted[0])
    (done,) = [r for r in list_runs(str(world_root)) if r["path"] == output]
    assert done["status"] == "complete" and done["step"] == 7 and done["ray_status"] == "SUCCEEDED"

    job, _ = readme_submit(dashboard, "eval", overrides)
    status, logs = wait_job(client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert os.path.exists(os.path.join(world_root, "eval-job", "report.json"))
