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


def test_killed_worker_is_recovered_and_losses_match(uninterrupted, world_root):
    """The rank-0 worker dies after step 5 (inside stage 2, one step past a checkpoint):
    FailureConfig restarts it, it resumes from step 4, and every step's loss equals the clean run's."""
    from tessera.jobs.train import train

    cfg = train_config(world_root, "train-worker-kill", "train.fault_step=5", "train.max_failures=1")
    report = train(cfg)
    assert report["steps"] == 7
    assert os.path.exists(os.path.join(cfg.resolve(cfg.train.output), "fault-5.marker"))
    assert losses(cfg) == losses(uninterrupted[0])


def test_killed_driver_then_rerun_resumes_exactly(uninterrupted, world_root):
    """No retries: the run fails at step 3 (stage 1, checkpoint at 2). Re-running the same
    command continues from step 2 with the same data position; losses equal the clean run's."""
    from tessera.jobs.train import train

    cfg = train_config(world_root, "train-driver-kill", "train.fault_step=3", "train.max_failures=0")
    with pytest.raises(Exception):
        train(cfg)
    state = os.path.join(cfg.resolve(cfg.train.output), "state.json")
    import json

    assert json.load(open(state))["status"] == "failed"
    report = train(cfg)
    assert report["steps"] == 7
    assert losses(cfg) == losses(uninterrupted[0])
    assert json.load(open(state))["status"] == "complete"
