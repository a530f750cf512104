"""`tessera ablate`: arms as runs under the ablation's output, killed halfway and continued with the
finished arm-seeds kept, `--arms` choosing a subset, and the table with the seeds' spread."""

import json
import os
import subprocess
import sys

import pytest

from tessera.config import ConfigError
from tests.conftest import TINY, TINY_BPE, TINY_TOKENIZER, TINY_TRAIN, tiny_config

STUDIES = ("ablate.studies=[{name: tokens, question: 'raw codes or BPE?', arms: [{name: raw, set: ['bpe.num_merges=0']},"
           " {name: bpe, set: []}]}, {name: merges, arms: [{name: none, set: ['bpe.num_merges=0']}, {name: forty, set: []}]}]")
# one short stage (one Ray Train run per arm-seed), halved by steps_scale
ARM = [*TINY_TOKENIZER, *TINY_BPE, *TINY_TRAIN, "train.checkpoint_every=10", "eval.num_generate=0", "ablate.seeds=[0, 1]",
       "train.stages=[{name: all, steps: 4, trainable: all, lr: 0.005, warmup_steps: 1, batch_size: 2, seq_len: 256,"
       " loss_mask: answers, mixture: {weights: {kind=image_text: 0.5, task=vqa: 0.5}}}]", "ablate.steps_scale=0.5", STUDIES]


def test_a_killed_ablation_keeps_its_finished_arms_and_arms_selects_a_subset(bpe_fitted, world_root, ray_cluster):
    from tessera.jobs.ablate import ablate, select_arms

    overrides = [f"run.root={world_root}", *TINY, "ablate.output={root}/ablations-test", *ARM]  # the shared world's config
    cfg = tiny_config(world_root, *overrides[1 + len(TINY):])
    out = cfg.resolve(cfg.ablate.output)
    with pytest.raises(ConfigError, match="no arm named nope"):
        select_arms(cfg, ["tokens/raw", "nope"])

    env = dict(os.environ, RAY_ADDRESS=ray_cluster, TESSERA_FAULT="ablate:after_arm")
    killed = subprocess.run([sys.executable, "-m", "tessera.jobs.ablate", *[a for o in overrides for a in ("--set", o)],
                             "--arms", "tokens/raw"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 86, killed.stdout[-3000:] + killed.stderr[-3000:]
    seed0 = os.path.join(out, "tokens", "raw", "seed0", "result.json")
    assert os.path.exists(seed0) and not os.path.exists(os.path.join(out, "tokens", "raw", "seed1"))
    first = os.path.getmtime(seed0)
    metrics0 = os.path.join(out, "tokens", "raw", "seed0", "train", "metrics.csv")
    steps_before = open(metrics0).read()

    log = open(os.path.join(world_root, "logs", "ablate.log")).read().rsplit("==== ablate ", 1)[-1]
    for stage in ("synth", "prepare", "train-tokenizer", "tokenize", "fit-bpe"):  # the shared upstream: nothing rebuilt
        assert f"[tessera] {stage}: complete, nothing to do" in log, (stage, log[-3000:])
    said = []
    # --report-only while it is half done: the finished seed is tabulated, nothing is trained or built
    partial = ablate(cfg, None, overrides, ["tokens/raw", "tokens/bpe"], say=said.append, report_only=True)
    assert [(r["arm"], r["seeds"]) for r in partial["rows"]] == [("raw", [0])], "bpe has no finished seed: left out"
    assert "[ablate] tokens / raw / seed 1: not finished, left out of the report" in said
    assert not os.path.exists(os.path.join(out, "tokens", "raw", "seed1")) and not os.path.exists(os.path.join(out, "base"))
    assert "| tokens | raw | 0 |" in open(os.path.join(out, "report.md")).read()
    report = ablate(cfg, None, overrides, ["raw", "merges/none"], say=said.append)
    assert "[ablate] tokens / raw / seed 0: complete, kept" in said, said
    assert os.path.getmtime(seed0) == first and open(metrics0).read() == steps_before, "the finished arm-seed is not trained again"
    # `merges/none` has the same overrides as `tokens/raw`: one arm, trained once, in two studies' rows
    assert [(r["study"], r["arm"], r["seeds"]) for r in report["rows"]] == [("tokens", "raw", [0, 1]), ("merges", "none", [0, 1])]
    assert not os.path.exists(os.path.join(out, "base")) and not os.path.exists(os.path.join(out, "merges")), "only the chosen arms ran"
    row = report["rows"][0]
    assert row["per_seed"] == report["rows"][1]["per_seed"]
    seeds = row["per_seed"]
    for key in ("vqa_accuracy", "pope_accuracy", "vqa_colour", "train_tokens_per_s", "wall_time_s"):
        vals = [s[key] for s in seeds]
        assert row[key + "_min"] == min(vals) and row[key + "_max"] == max(vals) and row[key] == pytest.approx(sum(vals) / 2), key
    assert seeds[0]["final_loss"] != seeds[1]["final_loss"], "the seeds trained different models"
    assert len(open(metrics0).read().strip().splitlines()) == 1 + 2, "a header and steps_scale x 4 = 2 steps"
    assert seeds[0]["tokens_per_image"] == bpe_fitted[1]["tokens_per_image_before"], "no merges: one token per code cell"
    assert "--arms tokens/raw" in row["command"] and f"run.root={world_root}" in row["command"]
    md = open(os.path.join(out, "report.md")).read()
    assert "raw codes or BPE?" in md and "| tokens | raw | 0,1 |" in md and "ablations.png" in md
    assert os.path.getsize(os.path.join(out, "ablations.png")) > 5000
    # the BPE arm's own fit lives under it, with no merges: the base BPE is untouched
    assert os.path.isdir(os.path.join(out, "tokens", "raw", "bpe"))

    # the continuous arm: its own tokens with the encoder's features, read through a projector; no text -> image.
    # Its study has its own seeds (one), whatever ablate.seeds says (two)
    study = ("ablate.studies=[{name: inputs, seeds: [0], arms: [{name: continuous, set: ['model.interface=continuous', "
             "'tokenize.features=true', 'bpe.num_merges=0']}]}]")
    cont = tiny_config(world_root, *overrides[1 + len(TINY):], study)
    (row,) = ablate(cont, None, overrides + [study], [], say=said.append)["rows"]
    assert cont.ablate.seeds == [0, 1] and row["seeds"] == [0]
    (seed,) = row["per_seed"]
    assert seed["vqa_accuracy"] is not None and seed["caption_accuracy"] is not None and seed["generation_accuracy"] is None
    assert seed["tokens_per_image"] == bpe_fitted[1]["tokens_per_image_before"], "one position per code cell"
    import pyarrow.parquet as pq

    home = os.path.join(out, "inputs", "continuous")
    shard = pq.read_table(next(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(home, "tokenize", "tokens"))
                               for f in fs if f.endswith(".parquet")))
    first = next(r for r in shard.to_pylist() if any(r["is_image"]))
    p = first["is_image"].index(True)
    h, w, _ = first["grid_shapes"][p]
    assert len(first["pixel_features"][p]) == h * w * cont.tokenizer.vq.rvq.dim
    model_info = json.load(open(os.path.join(home, "seed0", "train", "model", "tessera.json")))
    assert model_info["model"]["interface"] == "continuous" and model_info["depth"] == cont.tokenizer.vq.rvq.dim


def test_an_arm_gets_its_own_upstream_only_where_it_changes_the_tokens_and_never_moves_the_data(tmp_path):
    from tessera.config import load_config
    from tessera.jobs.ablate import arm_config

    studies = ("ablate.studies=[{name: ceiling, arms: [{name: oracle, set: ['tokenizer.preset=oracle', 'bpe.num_merges=0']},"
               " {name: mot, set: ['model.mot=true']}, {name: real, set: []}]}]")
    cfg = load_config(None, [f"run.root={tmp_path}", studies, "ablate.steps_scale=0.5"])
    (study,) = cfg.ablate.studies
    oracle, mot, real = (arm_config(None, [f"run.root={tmp_path}", studies], cfg, study, arm, 1) for arm in study.arms)
    home = f"{tmp_path}/ablations/ceiling/oracle"
    assert (oracle.tokenizer.output, oracle.tokenize.output, oracle.bpe.output) == (f"{home}/tokenizer", f"{home}/tokenize", f"{home}/bpe")
    assert oracle.prepare.output == cfg.prepare.output == mot.prepare.output, "the samples are shared"
    assert (mot.tokenizer.output, mot.bpe.output) == (cfg.tokenizer.output, cfg.bpe.output) and mot.model.mot
    assert real.train.output == f"{tmp_path}/ablations/base/seed1/train" and real.eval.model == f"{real.train.output}/model"
    assert [s.steps for s in real.train.stages] == [max(1, round(s.steps * 0.5)) for s in cfg.train.stages]
    with pytest.raises(ConfigError, match=r"studies\[0\].arms\[0\].set.*synth.backgrounds=plain"):
        load_config(None, ["ablate.studies=[{name: world, arms: [{name: plain, set: ['synth.backgrounds=plain']}]}]"])


def test_arms_are_built_from_the_config_file_as_the_ablation_read_it_at_its_start(tmp_path):
    """Editing the config mid-ablation (say, adding a study for the next run) changes no arm-seed
    the running ablation has yet to train."""
    from tessera.config import load_config, read_config_file
    from tessera.jobs.ablate import arm_config

    path = tmp_path / "ablations.yaml"
    path.write_text(f"run: {{root: {tmp_path}}}\nablate:\n  studies:\n    - name: mot\n      arms:\n"
                    "        - {name: mot, set: ['model.mot=true']}\nmodel: {hidden_size: 96}\n")
    snapshot = read_config_file(path)
    cfg = load_config(path)
    (study,) = cfg.ablate.studies
    path.write_text("model: {hidden_size: [not a number\n")  # mid-edit: not even YAML
    acfg = arm_config(str(path), [], cfg, study, study.arms[0], 2, snapshot)
    assert acfg.model.mot and acfg.model.hidden_size == 96 and acfg.train.seed == 2
    with pytest.raises(ConfigError, match="not valid YAML"):
        arm_config(str(path), [], cfg, study, study.arms[0], 2)  # re-reading the file would have failed
