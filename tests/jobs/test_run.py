"""A miniature `tessera run` end to end: every stage (upstream ones shared with the other tests
and found complete), training through two stages, the eval suite and the run report."""

import json
import re

import pytest

from tests.conftest import TINY, TINY_BPE, TINY_TOKENIZER

E2E_TRAIN = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128",
    "train.cpus_per_worker=1.0", "train.checkpoint_every=100", "train.log_every=20", "train.pack_group=32", "train.t2i_rate=0.2",
    "train.probe_every=75", "train.probe_questions=3",
    "train.output={root}/train-e2e", "train.storage_path={root}/train-e2e-ray",
    "train.stages=[{name: embeddings, steps: 10, trainable: embeddings, lr: 0.01, warmup_steps: 2, batch_size: 4, seq_len: 256,"
    " mixture: {weights: {kind=image_text: 1.0}}}, {name: all, steps: 150, trainable: all, lr: 0.01, warmup_steps: 10,"
    " batch_size: 8, seq_len: 256, loss_mask: answers, mixture: {weights: {kind=image_text: 0.3, task=vqa: 0.7}}}]",
    "eval.model={root}/train-e2e/model", "eval.output={root}/eval-e2e", "eval.num_generate=2", "eval.num_captions=4",
    "eval.sets=[{name: pope, kind: pope, uri: '{root}/synth/heldout/pope.jsonl'}, {name: vqa, kind: vqa, uri: "
    "'{root}/synth/heldout/vqa.jsonl'}, {name: captions, kind: captions, uri: '{root}/synth/heldout/captions.jsonl', limit: 4}]",
]
KEYS = ["eval.caption_accuracy", "eval.vqa_accuracy", "eval.pope_accuracy", "eval.pope_f1", "eval.generation_accuracy",
        "eval.analyser_accuracy", "eval.generation_ceiling", "eval.generation_candidates", "eval.generation_chooser", "eval.generation_accuracy_single", "chance.generation_accuracy", "tokenizer.psnr", "bpe.tokens_per_image_before", "bpe.tokens_per_image_after", "time.total_s",
        "time.train", "time.eval", "time.prepare"]


STAGES = ["synth", "prepare", "train-tokenizer", "tokenize", "fit-bpe", "train", "eval"]


@pytest.fixture(scope="module")
def run_and_console(bpe_fitted, world_root, ray_cluster, tmp_path_factory):
    from tessera.jobs.run import main

    argv = [a for o in [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"] for a in ("--set", o)]
    from tessera.console import redirected

    console = tmp_path_factory.mktemp("console") / "stdout.txt"
    with open(console, "w") as f, redirected(1, f.fileno()):  # stdout a file: a console that is not a terminal, as in CI
        report = main(argv)
    return report, console.read_text()


@pytest.fixture(scope="module")
def run_report(run_and_console):
    return run_and_console[0]


def test_the_console_shows_one_line_per_stage_and_logs_the_rest(run_and_console, world_root):
    """The console contract on the real graph, stdout not a terminal: a final line per stage naming its
    log, a few progress lines, the summary; every line once; Ray's and the stages' detail in the logs."""
    _, console = run_and_console
    lines = [ln for ln in console.splitlines() if ln.strip()]
    assert len(lines) <= 60, console
    assert len(set(lines)) == len(lines), "every line once"
    for stage in STAGES:
        (final,) = [ln for ln in lines if ln.startswith(f"[{stage}] ") and (" done in " in ln or " failed " in ln)]
        assert " done in " in final and final.endswith(f"log {world_root / 'logs' / stage}.log"), final
    assert not any(word in console for word in ("INFO", "WARNING", "Traceback", "pid=", "Running Dataset")), console
    assert "== tessera run: summary ==" in console and "VQA by type:" in console
    assert re.search(r"codebook usage \[[0-9.]+\], \d+ duplicate codes retired \(\d+ active\), the commonest code [0-9.]+ of an image", console)
    train_log = (world_root / "logs" / "train.log").read_text()
    assert "[train] stage 1 'all': mixture" in train_log and "[train] stage 1 'all': mixture" not in console


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


def test_published_sets_score_like_the_built_in_suite(run_report, world_root):
    """The held-out questions again in POPE's and VQA's published layouts (`eval.sets`): same model,
    greedy answers, so the same figures as the shapes world's own suite; the caption set gets CIDEr-D."""
    e = run_report["eval"]
    sets = e["sets"]
    assert sets["pope"]["accuracy"] == pytest.approx(e["pope_accuracy"], abs=1e-4)
    assert sets["pope"]["yes_ratio"] == pytest.approx(e["pope_yes_ratio"], abs=1e-4)
    assert sets["vqa"]["accuracy"] == pytest.approx(e["vqa_accuracy"], abs=1e-4)
    assert sets["captions"]["captions"] == 4 and sets["captions"]["cider"] >= 0.0
    assert all(s["images_unreadable"] == 0 for s in sets.values())
    assert "eval set `pope` (pope)" in (world_root / "report.md").read_text()


def test_a_generator_that_emits_the_true_codes_scores_the_generation_ceiling(run_report, world_root, monkeypatch):
    """`generation_ceiling` is what text -> image scores when every generated code is the visual
    tokenizer's own code of the held-out image: the same decode and analyser, nothing of the model."""
    import numpy as np

    from tessera.config import load_config
    from tessera.jobs.eval import _evaluator
    from tessera.model import evaluate

    argv = [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"]
    cfg = load_config(None, argv)
    ev, held = _evaluator(cfg, cfg.resolve(cfg.eval.model))
    scenes = iter(held.scenes)  # `generation` prompts the held-out captions in order

    def true_codes(model, prompt, grid, **kwargs):  # that caption's own image, through the tokenizer
        scene = next(scenes)
        assert list(prompt) == [model.vocab.bos_id] + ev.encode_text(scene["caption"])
        row = ev.image_row(scene["image"])
        assert tuple(grid) == tuple(row["grid_shapes"][0][:2])
        return np.asarray(row["pixel_codes"][0]).reshape(row["grid_shapes"][0])[..., 0]

    monkeypatch.setattr(evaluate, "generate_image", true_codes)
    ceiling = ev.generation_ceiling()
    gen = ev.generation(len(held.scenes), 3.0, 0.7, 0, 0)
    assert gen["generation_accuracy"] == pytest.approx(ceiling)
    assert next(scenes, None) is None and 0.0 <= ceiling <= 1.0
    assert run_report["eval"]["generation_ceiling"] == pytest.approx(ceiling)
    # chance: each of those images against the next scene's objects, what ignoring the caption scores
    from tessera.pipelines import analyser, shapes

    truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in held.scenes]
    found = [analyser.analyse(pixels) for _, pixels in gen["samples"]]
    assert gen["generation_chance"] == pytest.approx(
        np.mean([analyser.match_score(truths[(i + 1) % len(found)], f) for i, f in enumerate(found)]))
    assert run_report["chance"]["generation_accuracy"] is not None


def test_best_of_n_keeps_the_drawing_under_which_the_model_finds_its_caption_most_likely(run_report, world_root,
                                                                                          monkeypatch):
    """`eval.generation_candidates` n: each caption is drawn n times and the kept image is the candidate
    with the highest `caption_log_prob` (the model's own likelihood of the caption, never the analyser);
    `generation_accuracy_single` is the analyser's mean over all candidates, `..._best_possible` its best.
    The candidates here are the caption's own image (its true codes) and the next scene's, so the two
    differ; with n = 1 the model is never asked."""
    import numpy as np

    from tessera.config import load_config
    from tessera.jobs.eval import _evaluator
    from tessera.model import evaluate
    from tessera.pipelines import analyser, shapes

    argv = [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"]
    cfg = load_config(None, argv)
    ev, held = _evaluator(cfg, cfg.resolve(cfg.eval.model))
    n = len(held.scenes)
    drawn = iter(range(10 ** 6))

    def own_then_next(model, prompt, grid, **kwargs):  # candidate k of caption j: scene j + k's codes
        i = next(drawn)
        row = ev.image_row(held.scenes[(i // 2 + i % 2) % n]["image"])
        return np.asarray(row["pixel_codes"][0]).reshape(row["grid_shapes"][0])[..., 0]

    asked, real_score = [], ev.caption_log_prob

    def spy(pixels, caption):
        asked.append((real_score(pixels, caption), pixels))
        return asked[-1][0]

    monkeypatch.setattr(evaluate, "generate_image", own_then_next)
    monkeypatch.setattr(ev, "caption_log_prob", spy)
    gen = ev.generation(n, 3.0, 0.7, 0, 0, candidates=2)
    assert len(asked) == 2 * n and gen["candidates"] == 2
    truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in held.scenes]
    matches = []
    for j in range(n):
        (s0, p0), (s1, p1) = asked[2 * j], asked[2 * j + 1]
        assert np.isfinite(s0) and np.isfinite(s1) and s0 != s1
        assert np.array_equal(gen["samples"][j][1], p0 if s0 >= s1 else p1)
        matches.append([analyser.match_score(truths[j], analyser.analyse(p)) for p in (p0, p1)])
    assert gen["generation_accuracy_single"] == pytest.approx(np.mean(matches))
    assert gen["generation_accuracy_best_possible"] == pytest.approx(np.mean([max(m) for m in matches]))
    assert gen["generation_accuracy"] == pytest.approx(
        np.mean([m[0] if asked[2 * j][0] >= asked[2 * j + 1][0] else m[1] for j, m in enumerate(matches)]))
    # best of k among the first k candidates: k = 1 is the first drawing's score, k = n the kept one's
    assert gen["generation_accuracy_best_of"] == pytest.approx(
        {1: np.mean([m[0] for m in matches]), 2: gen["generation_accuracy"]})
    asked.clear()
    one = ev.generation(n, 3.0, 0.7, 0, 0)
    assert not asked and one["generation_accuracy_single"] == pytest.approx(one["generation_accuracy"])
    assert run_report["eval"]["generation_candidates"] == 1


def test_the_drawing_chooser_keeps_the_drawing_the_model_finds_most_likely_after_its_caption(run_report, world_root,
                                                                                               monkeypatch):
    """`Evaluator.image_log_prob(pixels, caption)` is log p(the drawing's tokens | <bos> + caption), summed
    over the image span as the model's logits give it (the unconditional branch's <bos> alone for
    caption None), and `generation(chooser="drawing")` keeps the drawing with the highest; the report
    names the chooser, `caption` unless told."""
    import numpy as np
    import torch

    from tessera.config import load_config
    from tessera.jobs.eval import _evaluator
    from tessera.model.packing import collate, pack

    argv = [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"]
    cfg = load_config(None, argv)
    ev, held = _evaluator(cfg, cfg.resolve(cfg.eval.model))
    s = held.scenes[0]
    built, build = [], ev.builder.build
    monkeypatch.setattr(ev.builder, "build", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    for caption in (s["caption"], held.scenes[1]["caption"], None):
        logp = ev.image_log_prob(held.images[s["image"]], caption)
        seq = built[-1]
        text = ev.encode_text(caption) if caption is not None else []
        span = ev.image_row(s["image"])
        span_ids = ev.builder.image_prefix(span).ids[1:]  # the held-out image's own span, as captioning reads it
        assert seq.ids.tolist() == [ev.model.vocab.bos_id, *text, *span_ids, ev.model.vocab.eos_id]
        assert seq.loss.tolist() == [False] * (1 + len(text)) + [True] * len(span_ids) + [False]
        (batch,), _ = pack([seq], len(seq), ev.model.vocab.pad_id)
        with torch.no_grad():
            logits = ev.model(**collate([batch])).logits[0].float()
        at = np.flatnonzero(seq.loss)  # each target predicted from the position before it
        expected = torch.log_softmax(logits[at - 1], -1)[torch.arange(len(at)), torch.from_numpy(seq.ids[at])].sum()
        assert logp == pytest.approx(float(expected), rel=1e-4) and logp < 0

    scores = []
    monkeypatch.setattr(ev, "image_log_prob", lambda pixels, caption: scores.append(float(pixels.mean())) or scores[-1])
    gen = ev.generation(2, 3.0, 0.7, 0, 0, candidates=3, chooser="drawing")
    assert len(scores) == 6 and gen["chooser"] == "drawing"
    assert [np.mean(p) for _, p in gen["samples"]] == pytest.approx([max(scores[:3]), max(scores[3:])])
    with pytest.raises(ValueError, match="chooser"):
        ev.generation(1, 3.0, 0.7, 0, 0, candidates=2, chooser="analyser")
    assert run_report["eval"]["generation_chooser"] == "caption"


def test_trained_model_answers_heldout_questions_in_the_task_vocabulary(run_report, world_root):
    """The miniature run (64 wide, 310 CPU steps on a 24-image world) learns the task's format:
    held-out questions get a valid answer of their type (a colour for a colour question, ...).
    Whether answers are *right* beyond what an image-blind model can reach is not claimed at this
    size: `tests/model/test_learning.py` tests that, in a world where learning fits in a test."""
    e = run_report["eval"]
    assert e["valid_answer_rate"] > 0.6, e
    assert set(run_report["chance"]["uniform_by_type"]) >= {"colour", "shape", "size", "count"}


def test_the_probe_logs_heldout_accuracy_per_type_during_training(run_report, world_root):
    from tessera.jobs.train import read_metrics

    probed = [m for m in read_metrics(str(world_root / "train-e2e" / "metrics.csv")) if m["probe_colour"] is not None]
    assert [int(m["step"]) for m in probed] == [10, 85, 160]  # each stage's end, and every 75 steps of a stage
    assert all(0.0 <= m[f"probe_{t}"] <= 1.0 for m in probed for t in ("colour", "shape", "size", "count", "exists"))


def test_rerun_after_success_skips_every_stage(run_report, world_root):
    from tessera.jobs.run import main

    argv = [a for o in [*TINY, *TINY_TOKENIZER, *TINY_BPE, *E2E_TRAIN, f"run.root={world_root}"] for a in ("--set", o)]
    again = main(argv)
    assert all(s["skipped"] for s in again["stages"].values())
    assert again["eval"] == run_report["eval"]
