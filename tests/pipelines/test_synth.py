import json
import os

import numpy as np

from tessera.pipelines import shapes
from tests.conftest import tiny_config


def test_world_is_written_in_real_formats(world_root):
    import datasets
    import decord
    import webdataset as wds

    synth = world_root / "synth"
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["counts"]["heldout"] == 6

    rows = list(wds.WebDataset(sorted(str(p) for p in (synth / "wds").glob("*.tar")), shardshuffle=False))
    good = [r for r in rows if r["__key__"].startswith("img-")]
    assert len(good) == 12
    caption = good[0]["txt"].decode()
    scene = json.loads(good[0]["json"])["scene"]
    assert shapes.parse_caption(caption) == [shapes.ShapeObject(**o) for o in scene["objects"]]

    hf = datasets.load_from_disk(str(synth / "hf"))
    assert {"id", "image", "caption", "scene"} <= set(hf.column_names)
    assert sum(c is not None for c in hf["caption"]) == len(hf) - 1  # one injected missing caption

    reader = decord.VideoReader(str(synth / "video" / "clip-0000.mp4"))
    assert len(reader) == 16 and reader[0].shape == (32, 32, 3)
    from tessera.pipelines import subtitles

    for name in ("clip-0000.srt", "clip-0001.vtt"):
        subs = subtitles.parse((synth / "video" / name).read_bytes(), name)
        assert len(subs) == 3 and [s["start"] for s in subs] == sorted(s["start"] for s in subs)
        assert shapes.parse_caption(subs[0]["text"]), "the first subtitle is a caption of the scene"

    docs = [json.loads(line) for line in (synth / "web" / "docs-00000.jsonl").read_text().splitlines() if line.startswith('{"id": "doc')]
    assert len(docs) == 5
    for doc in docs:
        assert len(doc["texts"]) == len(doc["images"])
        for ref in doc["images"]:
            if ref and not ref.startswith("data:"):
                assert (synth / "web" / ref).exists()

    qs = [json.loads(line) for line in (synth / "heldout" / "questions.jsonl").read_text().splitlines()]
    assert {q["type"] for q in qs} >= {"colour", "shape", "size", "count", "exists"}
    assert all((synth / "heldout" / q["image"]).exists() for q in qs)
    # the same questions in the published layouts `eval.sets` reads
    from tessera.model import eval_sets

    pope = eval_sets.load_items("pope", str(synth / "heldout" / "pope.jsonl"))
    vqa = eval_sets.load_items("vqa", str(synth / "heldout" / "vqa.jsonl"))
    assert len(pope) == sum(q["type"] == "exists" for q in qs) and len(pope) + len(vqa) == len(qs)
    assert {p["label"] for p in pope} <= {"yes", "no"} and set(pope[0]) == {"question_id", "image", "text", "label"}
    assert len(eval_sets.load_items("captions", str(synth / "heldout" / "captions.jsonl"))) == 6

    import pyarrow.parquet as pq

    table = pq.read_table(synth / "wds" / "00000.parquet").to_pylist()
    assert {r["status"] for r in table} == {"success", "failed_to_download"}, "img2dataset's per-shard table"
    assert (synth / "wds" / "00000_stats.json").exists()
    llava = json.loads((synth / "instruct" / "llava_vqa.json").read_text())
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n") and llava[0]["conversations"][1]["from"] == "gpt"


def test_world_is_deterministic_and_a_rerun_is_a_noop(tmp_path, world_root):
    from tessera.jobs.synth import run_synth

    again = run_synth(tiny_config(tmp_path))
    assert again["skipped"] is False
    a, b = world_root / "synth", tmp_path / "synth"
    for rel in ["heldout/questions.jsonl", "heldout/scenes.jsonl", "video/clip-0001.vtt", "web/docs-00000.jsonl",
                "heldout/pope.jsonl", "instruct/llava_vqa.json"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for name in os.listdir(a / "heldout" / "images"):
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(a / "heldout" / "images" / name)), np.asarray(Image.open(b / "heldout" / "images" / name)))
    mtime = (b / "manifest.json").stat().st_mtime
    assert run_synth(tiny_config(tmp_path))["skipped"] is True
    assert (b / "manifest.json").stat().st_mtime == mtime


def test_the_snap_grid_reaches_every_written_scene(tmp_path):
    """`synth.snap_grid` is part of each scene (its dict in scenes.jsonl), so the images on disk are
    what `render_scene` draws from that dict: the oracle tokenizer and the analyser see the same world."""
    from PIL import Image

    from tessera.config import load_config
    from tessera.pipelines import synth

    cfg = load_config(None, ["synth.resolution=32", "synth.num_heldout=4", "synth.snap_grid=8", "synth.backgrounds=plain"]).synth
    synth.write_heldout(str(tmp_path), cfg, 0)
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert [r["scene"]["snap_grid"] for r in rows] == [8] * 4
    for r in rows:
        drawn = shapes.render_scene(shapes.Scene.from_dict(r["scene"]), 32)
        assert np.array_equal(np.asarray(Image.open(tmp_path / r["image"])), drawn)


def test_more_existence_probes_leave_the_scenes_and_the_other_questions_as_they_were(tmp_path):
    """`synth.existence_probes: every_object` only adds turns: the images (so the visual tokenizer, the
    tokens and the BPE) and every question `one` asks are unchanged, and the held-out set is untouched."""
    from tessera.config import load_config
    from tessera.pipelines import synth

    def world(probes):
        out = tmp_path / probes
        cfg = load_config(None, ["synth.resolution=32", "synth.num_instruct=12", "synth.num_heldout=4",
                                 f"synth.existence_probes={probes}"]).synth
        synth.write_instructions(str(out / "instruct"), cfg, 0)
        synth.write_heldout(str(out / "heldout"), cfg, 0)
        return out, json.loads((out / "instruct" / "llava_vqa.json").read_text())

    (one_dir, one), (every_dir, every) = world("one"), world("every_object")

    def turns(record):
        c = [t["value"].replace("<image>\n", "") for t in record["conversations"]]
        return set(zip(c[0::2], c[1::2]))

    added = 0
    for a, b in zip(one, every, strict=True):
        assert (one_dir / "instruct" / a["image"]).read_bytes() == (every_dir / "instruct" / b["image"]).read_bytes()
        assert turns(a) <= turns(b)  # equal only when the scene's one object was already asked about
        extra = turns(b) - turns(a)
        assert all(q.startswith("Is there a ") for q, _ in extra)
        added += len(extra)
    assert added >= len(one)
    for name in ("questions.jsonl", "scenes.jsonl"):
        assert (one_dir / "heldout" / name).read_text() == (every_dir / "heldout" / name).read_text()
