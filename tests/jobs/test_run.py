"""A miniature `tessera run` end to end: every stage (upstream ones shared with the other tests
and found complete), training through two stages, the eval suite and the run report."""

import json

import pytest

from tests.conftest import TINY, TINY_BPE, TINY_TOKENIZER

E2E_TRAIN = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128",
    "train.cpus_per_worker=0.5", "train.checkpoint_every=50", "train.log_every=10", "train.pack_group=16",
    "train.output={root}/train-e2e", "train.storage_path={root}/train-e2e-ray",
    "train.stages=[{name: embeddings, steps: 10, trainable: embeddings, lr: 0.01, warmup_steps: 2, batch_size: 4, seq_len: 256,"
    " mixture: {weights: {kind=image_text: 1.0}}}, {name: all, steps: 60, trainable: all, lr: 0.005, warmup_steps: 5,"
    " batch_size: 4, seq_len: 256, loss_mask: answers, mixture: {weights: {kind=image_text: 0.3, task=vqa: 0.7}}}]",
    "eval.model={root}/train-e2e/model", "eval.output={root}/eval-e2e", "eval.num_generate=2", "eval.num_captions=4",
]
KEYS = ["eval.caption_accuracy", "eval.vqa_accuracy", "eval.pope_accuracy", "eval.pope_f1", "eval.generation_accuracy",
        "eval.analyser_accuracy", "tokenizer.psnr", "bpe.tokens_per_image_before", "bpe.tokens_per_image_after", "time.total_s",
        "time.train", "time.eval", "time.prepare"]

# uniform-guess accuracy per question type of the shapes world
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "size": 1 / 2, "position": 1 / 9, "count": 1 / 3}


@pytest.fixture(scope="module")
def run_report(bpe_fitted, world_root, ray_cluster):
    from tessera.jobs.run import main

    argv = [a for o in [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"] for a in ("--set", o)]
    return main(argv)


def test_report_has_the_documented_keys(run_report, world_root):
    for key in KEYS:
        node = run_report
        for part in key.split("."):
            assert part in node, f"report.json lacks {key}"
            node = node[part]
    on_disk = json.loads((world_root / "report.json").read_text())
    assert on_disk["eval"] == run_report["eval"]
    md = (world_root / "report.md").read_text()
    assert "caption attribute accuracy" in md and "loss_curve" in md and "generated" in md
    assert run_report["stages"]["prepare"]["skipped"] and not run_report["stages"]["train"]["skipped"]
    assert 0.0 <= run_report["eval"]["pope_yes_ratio"] <= 1.0


def test_trained_model_beats_chance_on_heldout_questions(run_report, world_root):
    questions = [json.loads(line) for line in (world_root / "synth" / "heldout" / "questions.jsonl").read_text().splitlines()]
    asked = [q for q in questions if q["type"] in CHANCE]
    chance = sum(CHANCE[q["type"]] for q in asked) / len(asked)
    assert run_report["eval"]["vqa_accuracy"] > chance + 0.1, (run_report["eval"], chance)


def test_rerun_after_success_skips_every_stage(run_report, world_root):
    from tessera.jobs.run import main

    argv = [a for o in [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"] for a in ("--set", o)]
    again = main(argv)
    assert all(s["skipped"] for s in again["stages"].values())
    assert again["eval"] == run_report["eval"]
