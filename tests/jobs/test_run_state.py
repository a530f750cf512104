"""Run state on an object store: `tessera runs` / `tessera resume` read what the train job writes
through `tessera.storage` on an `s3://` run root (a moto S3 server this test starts on 127.0.0.1)."""

import os

import pytest

from tessera import storage


def metrics_row(step, loss):
    return {"step": step, "stage": "all", "stage_index": 1, "stage_step": step - 3, "loss": loss, "text_loss": loss,
            "image_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "packing_efficiency": 0.9}


def test_runs_and_resume_see_a_run_on_an_object_store(s3_root, capsys):
    from tessera.jobs.resume import find_output, resume_request
    from tessera.jobs.runs import list_runs
    from tessera.jobs.runs import main as runs_main
    from tessera.jobs.train import _append_csv, _write_state, read_metrics

    out = storage.join(s3_root, "demo", "train")
    ray_run = storage.join(s3_root, "demo", "ray_train", "demo-train-0123-1-all")
    record = {"command": ["python", "-m", "tessera.jobs.train", "--config", "configs/demo.yaml"], "working_dir": True,
              "cwd": None, "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}
    _write_state(out, run="demo", status="running", stages=["layers", "all"], steps_total=7, resubmit=record,
                 ray={"submission_id": None})
    _write_state(out, stage="all", stage_index=1, ray_train_run=ray_run)  # a second write keeps the first's fields
    for step, loss in ((4, 1.5), (5, 1.25)):
        _append_csv(storage.join(out, "metrics.csv"), metrics_row(step, loss))  # no append on S3: rewritten whole
    assert [(m["step"], m["loss"]) for m in read_metrics(storage.join(out, "metrics.csv"))] == [(4, 1.5), (5, 1.25)]
    recorded = {"version": 0, "checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 4, "stage_step": 1}}
    storage.write_json(storage.join(ray_run, "checkpoint_manager_snapshot.json"), {  # as Ray Train 2.60 writes it
        "ray_version": "2.60.0", "checkpoint_results": [recorded], "checkpoint_report_indices": [1],
        "latest_checkpoint_result": recorded, "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 2, "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []})
    storage.write_bytes(storage.join(ray_run, "checkpoint_a", "state.pt"), b"recorded")
    storage.write_bytes(storage.join(ray_run, "checkpoint_b", "state.pt"), b"newer, never recorded")

    (run,) = list_runs(s3_root, ask_ray=False)
    assert run["path"] == out and run["run"] == "demo" and run["status"] == "running"
    assert (run["stage"], run["stage_index"], run["stages"], run["step"], run["steps_total"], run["loss"]) == ("all", 1, 2, 5, 7, 1.25)
    assert run["checkpoint"] == {"path": storage.join(ray_run, "checkpoint_a"), "step": 4, "stage_step": 1}
    assert [r["path"] for r in list_runs(storage.join(s3_root, "demo"), ask_ray=False)] == [out]
    runs_main(["--root", s3_root])
    printed = capsys.readouterr().out
    assert "step 5/7" in printed and "recorded checkpoint step 4 s3://" in printed and "not a Ray job" in printed

    assert find_output("demo", s3_root, "") == find_output(storage.join(s3_root, "demo"), "runs", "") == out
    entrypoint, env = resume_request(run["state"], "/checkout", ["train.max_failures=3"])
    assert entrypoint == "python -m tessera.jobs.train --config configs/demo.yaml --set train.max_failures=3"
    assert env == {"env_vars": {"HF_HUB_OFFLINE": "1"}, "working_dir": "/checkout"}, "the checkout is uploaded again"
    _, env = resume_request(run["state"], "/checkout", [], ["NCCL_DEBUG=INFO"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", "NCCL_DEBUG": "INFO"}, "--env adds to the recorded variables"


def test_a_fault_hook_is_not_recorded_for_resubmission(monkeypatch):
    """`TESSERA_FAULT` in a job's runtime env fires in that job; `tessera resume` must not carry it on."""
    from tessera.jobs import common

    monkeypatch.setattr(common, "submission", lambda: {"runtime_env": {
        "working_dir": "gcs://_ray_pkg_1.zip", "env_vars": {"TESSERA_FAULT": "train:step?at=2&mode=hang", "A": "1"}}})
    record = common.resubmit_record("tessera.jobs.train", ["--set", "x=1"])
    assert record["runtime_env"] == {"env_vars": {"A": "1"}} and record["working_dir"] is True
    monkeypatch.setattr(common, "submission", lambda: {"runtime_env": {"env_vars": {"TESSERA_FAULT": "x"}}})
    assert common.resubmit_record("tessera.jobs.train", [])["runtime_env"] == {}


def test_fault_hooks_are_armed_by_the_environment_only(monkeypatch, tmp_path):
    from tessera import faults

    monkeypatch.delenv("TESSERA_FAULT", raising=False)
    assert faults.armed("train:step") is None and faults.StepFault.from_env(str(tmp_path)) is None
    monkeypatch.setenv("TESSERA_FAULT", "train:step?at=5&mode=hang")
    assert faults.armed("train:step") == {"at": "5", "mode": "hang"} and faults.armed("prepare:after_samples") is None
    hook = faults.StepFault.from_env(str(tmp_path))
    assert (hook.at, hook.mode, hook.marker) == (5, "hang", str(tmp_path / "fault-5.marker"))
    hook(4)  # not its step: returns, and arms nothing
    assert not os.path.exists(hook.marker)
    monkeypatch.setenv("TESSERA_FAULT", "train:step?at=five")
    with pytest.raises(ValueError, match="at=<step>"):
        faults.StepFault.from_env(str(tmp_path))
