"""`tessera train-tokenizer` end to end on the tiny prepared world (Ray Train, 1 CPU worker)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq

from tessera.tokenize.tokenizer import load_tokenizer
from tests.conftest import TINY, tiny_config
from tests.tokenize.test_tokenizers import TINY as TINY_TOKENIZER

JOB = [*TINY_TOKENIZER, "tokenizer.train.steps=12", "tokenizer.train.checkpoint_every=6", "tokenizer.train.batch_size=8",
       "tokenizer.train.cpus_per_worker=1.0", "tokenizer.train.heldout_images=8"]


def _prepared_images(root):
    """Every image of the prepared samples (the tiny world may hold no held-out one), (N, 3, H, W)."""
    from tessera.tokenize.images import explode_images, to_tensor

    tables = [pq.read_table(f) for f in sorted((root / "prepare" / "samples").glob("*.parquet"))]
    return to_tensor(np.concatenate([explode_images(t, 32, "all")["image"] for t in tables]))


def _run(root, ray_address, fault=None):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    env.pop("TESSERA_FAULT", None)
    if fault:
        env["TESSERA_FAULT"] = fault
    args = [sys.executable, "-m", "tessera.jobs.train_tokenizer", *[a for o in TINY + JOB for a in ("--set", o)], "--set", f"run.root={root}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_train_tokenizer_job_writes_a_loadable_tokenizer_resumes_and_repeats(prepared, world_root, ray_cluster, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")
    os.symlink(world_root / "prepare", root / "prepare")
    code, out = _run(root, ray_cluster, fault="train-tokenizer:after_fit")
    assert code == 86, out
    assert not (root / "tokenizer" / "report.json").exists()
    code, out = _run(root, ray_cluster)  # the same command again: resumes from the last checkpoint
    assert code == 0, out
    assert "[train-tokenizer] done in" in out and str(root / "logs" / "train-tokenizer.log") in out
    detail = (root / "logs" / "train-tokenizer.log").read_text().rsplit("==== train-tokenizer ", 1)[-1]  # this attempt's part
    assert "resumed at step 12" in detail
    # on the console it may show only inside the stage's live line ("[train-tokenizer] 30s · resumed ..."),
    # which quotes the latest detail on a slow host, never as a line of its own
    assert not [line for line in out.splitlines() if "resumed at step 12" in line and " · " not in line], out
    report = json.loads((root / "tokenizer" / "report.json").read_text())
    assert report["steps"] == 12 and report["grid"] == [8, 8]
    m = report["metrics"]
    assert {"psnr", "ssim", "lpips", "pixel_usage", "pixel_perplexity", "pixel_restarts"} <= set(m)
    assert 0 < m["psnr"] < 100 and len(m["pixel_usage"]) == 1
    for png in report["pngs"].values():
        assert os.path.getsize(png) > 1000
    assert 0 < m["pixel_codes_per_image"] <= 64 and 1 / 64 <= m["pixel_top_code_share"] <= 1
    model, cfg, meta = load_tokenizer(str(root / "tokenizer"))
    assert cfg.preset == "vq" and meta["weights_sha256"] == report["tokenizer"]["hash"]
    # duplicate codes were retired on training images, and the saved tokenizer never writes them
    merged = report["merged_codes"]
    assert merged["images"] > 0 and merged["tolerance"] == cfg.vq.merge_tolerance > 0
    assert merged["depths"][0]["active"] == int(model.quantizer.active[0].sum()) == cfg.vq.rvq.codebook_size - merged["depths"][0]["retired"]
    assert f"{merged['depths'][0]['retired']} duplicate codes retired" in out
    images = _prepared_images(root)
    written = model.encode(images)["pixel"][..., 0].unique()
    assert bool(model.quantizer.active[0][written].all())
    # complete: a third run does nothing
    code, out = _run(root, ray_cluster)
    assert code == 0 and "nothing to do" in out, out
    # the same config and seed in a fresh root, uninterrupted, train the very same weights, even from
    # sample files that hold their rows (and list their files) in the opposite order, as two `prepare`
    # runs may: the tokenizer meets its images in a seeded order of their ids
    again = tmp_path / "again"
    again.mkdir()
    os.symlink(world_root / "synth", again / "synth")
    shutil.copytree(world_root / "prepare", again / "prepare", symlinks=True)
    samples = again / "prepare" / "samples"
    for f in samples.glob("*.parquet"):
        table = pq.read_table(f)
        assert table.num_rows > 1
        pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), f)
    manifest = json.loads((samples / "manifest.json").read_text())
    manifest["files"].reverse()
    (samples / "manifest.json").write_text(json.dumps(manifest))
    from tessera.jobs.train_tokenizer import train_tokenizer  # in this process: its Ray workers are warm

    train_tokenizer(tiny_config(again, *JOB))
    assert json.loads((again / "tokenizer" / "report.json").read_text())["tokenizer"]["hash"] == report["tokenizer"]["hash"]


def test_oracle_preset_writes_a_weightless_tokenizer_with_its_fidelity(prepared, world_root, ray_cluster, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")
    os.symlink(world_root / "prepare", root / "prepare")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    env.pop("TESSERA_FAULT", None)
    sets = [*TINY, "tokenizer.preset=oracle", "tokenizer.image_size=32", "tokenizer.train.heldout_images=8", f"run.root={root}"]
    proc = subprocess.run([sys.executable, "-m", "tessera.jobs.train_tokenizer", *[a for o in sets for a in ("--set", o)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((root / "tokenizer" / "report.json").read_text())
    assert report["preset"] == "oracle" and report["steps"] == 0 and report["grid"] == [3, 3]
    match = report["metrics"]["scene_match"]  # nan when no held-out image of the tiny world has a caption
    assert (match != match or 0.0 <= match <= 1.0) and report["metrics"]["pixel_usage"][0] > 0
    model, cfg, _ = load_tokenizer(str(root / "tokenizer"))
    assert cfg.preset == "oracle" and not list(model.parameters())
