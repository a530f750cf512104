import subprocess
import sys

import pytest

from tessera.config import ConfigError, config_from_dict, load_config


def test_defaults_and_demo_config_load():
    cfg = load_config()
    assert cfg.run.root == "runs/demo"
    assert [s.kind for s in cfg.prepare.sources] == ["img2dataset", "hf_dataset", "video", "web", "llava"]
    assert load_config(None, ["run.name=other"]).run.root == "runs/other"  # derived again, not copied from the default
    demo = load_config("configs/demo.yaml")
    assert demo.synth.num_image_text == 1024
    assert demo.resolve(demo.prepare.sources[0].uri) == "runs/demo/synth/wds"


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("prepare.imagee.resolution=3", "prepare.imagee", "unknown key"),
        ("synth.resolution=big", "synth.resolution", "expected int"),
        ("synth.resolution=8", "synth.resolution", "16..1024"),
        ("synth.inject_faults=3", "synth.inject_faults", "expected bool"),
        ("prepare.image.fit=zoom", "prepare.image.fit", "one of 'crop', 'pad', 'stretch'"),
        ("prepare.rows_per_shard=0", "prepare.rows_per_shard", ">= 1"),
        ("prepare.video.target_fps=-1", "prepare.video.target_fps", "> 0"),
        ("ray.num_cpus=1.5", "ray.num_cpus", "expected int or null"),
        ("run.name=a/b", "run.name", "without '/'"),
        # one check class, the key of wherever it sits: the builder adds the section's path
        ("tokenizer.dual.pixel_rvq.depth=0", "tokenizer.dual.pixel_rvq.depth", "1..32"),
        ("tokenizer.vq.rvq.decay=1.5", "tokenizer.vq.rvq.decay", "in (0, 1)"),
        ("train.stages=[{name: a, steps: 0}]", "train.stages[0].steps", ">= 1"),
        ("prepare.text.min_chars=-1", "prepare.text", "min_chars <= max_chars"),
        ("eval.generation_candidates=0", "eval.generation_candidates", ">= 1"),
        ("eval.generation_chooser=analyser", "eval.generation_chooser", "one of ['caption', 'drawing']"),
        # a stage's own checks too: the key once, not the section's path twice
        ("train.stages=[{name: draw, steps: 5, image_loss_weight: -1}]", "train.stages[0].image_loss_weight", ">= 0"),
        ("train.stages=[{name: draw, steps: 5, t2i_rate: 2}]", "train.stages[0].t2i_rate", "[0, 1]"),
        ("train.stages=[{name: a, steps: 5, questions: '('}]", "train.stages[0].questions", "regular expression"),
        ("tokenizer.vq.merge_tolerance=-1", "tokenizer.vq.merge_tolerance", ">= 0"),
    ],
)
def test_bad_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key
    assert expected in str(e.value)


def test_bad_source_entry_names_its_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  sources:\n    - {name: a, kind: webdataset, uri: x}\n    - {name: b, kind: tiff, uri: y}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == "prepare.sources[1].kind"
    path.write_text("prepare:\n  sources:\n    - {name: a, uri: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == "prepare.sources[0].kind" and "required" in str(e.value)
    path.write_text("prepare:\n  sources:\n    - {name: a, kind: web, uri: x}\n    - {name: a, kind: web, uri: y}\n")
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(path)


def test_override_keeps_types():
    cfg = load_config(None, ["prepare.image.max_aspect_ratio=2", "run.seed=7"])
    assert cfg.prepare.image.max_aspect_ratio == 2.0 and isinstance(cfg.prepare.image.max_aspect_ratio, float)
    assert cfg.run.seed == 7


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    root = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.jobs.prepare", "--set", f"run.root={root}", "--set", "prepare.image.fit=zoom"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "prepare.image.fit" in proc.stderr and "'crop'" in proc.stderr
    assert not root.exists(), "no work may start on a bad config"
    missing = subprocess.run([sys.executable, "-m", "tessera.cli", "prepare", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_partial_sections_keep_the_fields_own_defaults():
    cfg = load_config(None, ["tokenizer.dual.pixel_rvq.codebook_size=32"])
    assert cfg.tokenizer.dual.pixel_rvq.codebook_size == 32
    assert cfg.tokenizer.dual.pixel_rvq.depth == 4, "dual's pixel RVQ default depth survives a partial override"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tokenizer.dual.pixel_rvq.depthh=2"])
    assert e.value.key == "tokenizer.dual.pixel_rvq.depthh"


def test_extends_merges_base_config_and_the_shipped_configs_load(tmp_path):
    for name in ("demo", "demo-varied", "being-vl-3stage", "bagel-4stage", "ablations"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.stages and cfg.synth.num_image_text == (512 if name in ("ablations", "demo-varied") else 1024)
    for name, root in (("demo-varied", "runs/demo-varied"), ("ablations", "runs/ablations")):
        cfg = load_config(f"configs/{name}.yaml")
        assert (cfg.synth.backgrounds, cfg.synth.num_instruct, cfg.tokenizer.vq.encoder_norm, cfg.run.root) == ("varied", 768, "group", root), \
            "the previous demo's world, which README 'Learning' and 'Ablations' measured, beside the demo's runs"
    t2i = load_config("configs/demo-t2i.yaml")
    assert (t2i.synth.num_image_text, t2i.tokenizer.train.steps, t2i.model.next_cell, t2i.synth.num_instruct) == (8192, 2400, True, 7680), \
        "the demo's world and recipe with README's text -> image budget on top"
    assert [(s.name, t2i.train.t2i_rate_of(s), s.image_loss_weight) for s in t2i.train.stages][2:] == \
        [("draw", 1.0, 3.0), ("shape", 0.0, None), ("all", 0.5, None)]
    assert (t2i.eval.generation_candidates, load_config("configs/demo.yaml").eval.generation_candidates) == (8, 1)
    assert (t2i.eval.generation_chooser, load_config("configs/demo.yaml").eval.generation_chooser) == ("drawing", "caption")
    # demo-t2i retires duplicate codes (the default); the demo keeps its measured codebook (README item 10)
    assert (t2i.tokenizer.vq.merge_tolerance, load_config("configs/demo.yaml").tokenizer.vq.merge_tolerance) == (1.0, 0.0)
    bagel = load_config("configs/bagel-4stage.yaml")
    assert bagel.model.mot and [s.name for s in bagel.train.stages] == ["alignment", "pretraining", "continued", "sft"]
    assert load_config("configs/being-vl-3stage.yaml").train.stages[1].trainable.layers == [2, 3]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_bad_stage_config_names_the_key():
    with pytest.raises(ConfigError, match=r"train.stages\[0\].trainable"):
        load_config(None, ["train.stages=[{name: a, steps: 3, trainable: everything}]"])
    with pytest.raises(ConfigError, match="mixture.weights"):
        load_config(None, ["train.stages=[{name: a, steps: 3, mixture: {weights: {kind: 1.0}}}]"])
    with pytest.raises(ConfigError, match="train.stages"):
        load_config(None, ["train.stages=[{name: a, steps: 3}, {name: a, steps: 3}]"])


def test_a_stage_mixture_the_user_writes_replaces_the_default():
    """Defect 1 of the learning issue: a partial mixture used to be deep-merged with the default
    `{all: 1.0}`, so every stage also drew from everything."""
    demo = load_config("configs/demo.yaml")
    for stage in demo.train.stages:
        assert "all" not in stage.mixture.weights, f"stage {stage.name} picked up the default 'all' selector"
    assert demo.train.stages[-1].mixture.weights == {"kind=image_text": 0.4, "task=vqa": 0.6}
    cfg = load_config(None, ["train.stages=[{name: a, steps: 3, mixture: {weights: {task=vqa: 1.0}}}]"])
    assert cfg.train.stages[0].mixture.weights == {"task=vqa": 1.0}
    assert cfg.train.stages[0].mixture.order == "random", "the section's other defaults stay"
    assert load_config(None, ["train.stages=[{name: a, steps: 3}]"]).train.stages[0].mixture.weights == {"all": 1.0}


def test_every_consumer_follows_its_producers_output_unless_set():
    """Each job's input is derived from its producer's output in one place (`TesseraConfig.derive_inputs`):
    moving an output moves every reader of it; a location given explicitly is kept."""
    cfg = load_config(None, ["tokenizer.output=/data/vt", "tokenize.output=/data/tok", "bpe.output=/data/bpe",
                             "train.output=/data/train", "synth.output=/data/synth"])
    assert cfg.tokenize.tokenizer == cfg.model.tokenizer == cfg.bpe.tokenizer == "/data/vt"
    assert cfg.bpe.tokens == cfg.train.tokens == "/data/tok"
    assert cfg.model.text_tokenizer == "/data/tok/text_tokenizer" and cfg.model.bpe == "/data/bpe/merges.json"
    assert cfg.eval.model == "/data/train/model" and cfg.eval.heldout == "/data/synth/heldout"
    assert load_config(None, ["tokenize.text_tokenizer=Qwen/Qwen2-0.5B"]).model.text_tokenizer == "Qwen/Qwen2-0.5B"
    kept = load_config(None, ["tokenizer.output=/data/vt", "model.tokenizer=/elsewhere/vt"])
    assert kept.model.tokenizer == "/elsewhere/vt" and kept.tokenize.tokenizer == "/data/vt"
    again = config_from_dict(cfg.to_dict())  # what a Ray worker rebuilds: the same locations
    assert again.model.bpe == cfg.model.bpe and again.eval.model == cfg.eval.model


def test_the_previous_demo_config_does_not_follow_the_current_demo():
    """`demo-varied.yaml` (and `ablations.yaml` on it) reproduce tables measured before the demo snapped
    its objects, lowered the answer stage's lr and added a shape phase; extending `demo.yaml`, they must pin those."""
    varied = load_config("configs/demo-varied.yaml")
    assert varied.synth.snap_grid == 0 and varied.synth.backgrounds == "varied"
    assert [(s.name, s.steps, s.lr, s.questions) for s in varied.train.stages] == [
        ("embeddings", 40, 0.01, None), ("layers", 120, 0.005, None), ("all", 560, 0.003, None)]
    assert load_config("configs/ablations.yaml").train.stages == varied.train.stages
    assert load_config("configs/demo-snap-long.yaml").synth.num_instruct == 3840, "runs/snap0's world"
