"""End to end tests of `tessera prepare` on the tiny shapes world (shared Ray session)."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera import storage
from tessera.manifest import dataset_files
from tessera.pipelines import documents, images
from tessera.schema import REJECT_SCHEMA, SAMPLE_SCHEMA, check_sample_row, sample_id
from tests.conftest import TINY, tiny_config


def read_table(directory):
    files = dataset_files(str(directory))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def outputs(root):
    out = os.path.join(root, "prepare")
    return read_table(os.path.join(out, "samples")), read_table(os.path.join(out, "rejects"))


def test_each_source_kind_end_to_end(prepared):
    cfg, report = prepared
    table, rejects = outputs(cfg.run.root)
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    assert rejects.schema.equals(REJECT_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    by_source = {}
    for row in rows:
        check_sample_row(row)
        by_source.setdefault(row["source"], []).append(row)
        for im in row["images"]:
            if im is not None:
                assert images.decode_png(im).shape == (32, 32, 3)
        assert any(t for t in row["texts"] if t), "every sample has text"
        assert any(t.startswith("difficulty=") for t in row["curriculum"])
    # 12 webdataset pairs + 6 awkward-but-good encodings; 12 HF rows; 3 clips; 5 documents; 64 VQA conversations
    assert {k: len(v) for k, v in by_source.items()} == {"shapes_wds": 18, "shapes_hf": 12, "shapes_video": 3, "shapes_web": 5,
                                                         "shapes_instruct": 64}
    for conv in by_source["shapes_instruct"]:
        meta = json.loads(conv["meta"])
        assert meta["task"] == "vqa" and "task=vqa" in conv["curriculum"]
        assert meta["roles"][0] is None and meta["roles"][1:] == ["user", "assistant"] * ((len(meta["roles"]) - 1) // 2)
    assert len({r["sample_id"] for r in rows}) == len(rows)
    for clip in by_source["shapes_video"]:
        assert clip["kind"] == "video" and clip["timestamps"] == sorted(clip["timestamps"])
        assert sum(im is not None for im in clip["images"]) == 4  # 2 s at 2 fps
        assert clip["texts"][0] is not None, "the first subtitle precedes the first frame"
    for doc in by_source["shapes_web"]:
        assert doc["kind"] == "web" and sum(im is not None for im in doc["images"]) >= 2
    wds_keys = {json.loads(r["meta"])["key"] for r in by_source["shapes_wds"]}
    assert {"ok-palette_png", "ok-cmyk_jpeg", "ok-grey16_png", "ok-exif_rotated_jpeg", "ok-rgba_png", "ok-grey_jpeg"} <= wds_keys
    # the report accounts for every input row
    assert report["rows_in"] == report["rows_out"] + report["rejects"] == len(rows) + rejects.num_rows
    assert report["rows_out"] == len(rows)
    assert sum(v["rows_out"] for v in report["per_source"].values()) == len(rows)
    manifest = json.loads(open(os.path.join(cfg.run.root, "prepare", "samples", "manifest.json")).read())
    assert manifest["schema_version"] == "1.0" and manifest["num_rows"] == len(rows)


def _web_key(prefix, world_root):
    lines = (world_root / "synth" / "web" / "docs-00000.jsonl").read_text().splitlines()
    return documents.document_key(next(line for line in lines if prefix in line))


def test_every_bad_input_lands_in_rejects_with_its_reason(prepared, world_root):
    cfg, report = prepared
    _, rejects = outputs(cfg.run.root)
    got = {r["sample_id"]: r for r in rejects.to_pylist()}
    expected = {
        ("shapes_wds", "bad-empty"): "empty_file",
        ("shapes_wds", "bad-truncated"): "corrupt_image",
        ("shapes_wds", "bad-garbage"): "corrupt_image",
        ("shapes_wds", "bad-nocaption"): "missing_caption",
        ("shapes_wds", "bad-bomb"): "image_too_large",
        ("shapes_wds", "bad-tiny"): "image_too_small",
        ("shapes_wds", "bad-aspect"): "bad_aspect_ratio",
        ("shapes_wds", "bad-shortcaption"): "text_too_short",
        ("shapes_wds", "bad-download"): "download_failed",  # in img2dataset's parquet only, never in the tar
        ("shapes_hf", "bad-nocaption"): "missing_caption",
        ("shapes_hf", "bad-corrupt"): "corrupt_image",
        ("shapes_video", "bad-truncated.mp4"): "video_undecodable",
        ("shapes_video", "bad-nosubs.mp4"): "missing_caption",
        ("shapes_web", _web_key('"bad-escape"', world_root)): "unsafe_path",
        ("shapes_web", _web_key('"bad-absolute"', world_root)): "unsafe_path",
        ("shapes_web", _web_key('"bad-missing"', world_root)): "missing_file",
        ("shapes_web", _web_key('"bad-misaligned"', world_root)): "malformed_document",
        ("shapes_web", _web_key('"bad-json"', world_root)): "malformed_document",
    }
    for (source, key), reason in expected.items():
        sid = sample_id(source, key)
        assert sid in got, f"{source}/{key} missing from rejects"
        assert got[sid]["reason"] == reason, (key, got[sid])
        assert got[sid]["source"] == source and got[sid]["detail"]
    # the exact duplicate: exactly one of the two copies survives, the one with the smaller id
    pair = sorted([sample_id("shapes_wds", "img-000000"), sample_id("shapes_wds", "zz-duplicate")])
    assert got[pair[1]]["reason"] == "duplicate" and pair[0] in got[pair[1]]["detail"]
    assert pair[0] not in got
    assert len(got) == len(expected) + 1
    assert report["rejects_by_reason"]["unsafe_path"] == 2 and report["rejects_by_reason"]["duplicate"] == 1
    assert report["per_source"]["shapes_video"]["rejects"] == {"missing_caption": 1, "video_undecodable": 1}


def test_second_run_is_a_noop(prepared):
    from tessera.jobs.prepare import prepare

    cfg, report = prepared
    files = sorted(storage.list_files(os.path.join(cfg.run.root, "prepare"), recursive=True))
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    again = prepare(cfg)
    assert again["skipped"] is True and again["rows_out"] == report["rows_out"]
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes


def _ids(root):
    table, rejects = outputs(root)
    return sorted(table.column("sample_id").to_pylist()), sorted(rejects.column("sample_id").to_pylist())


def _rerun_in_process(root) -> None:
    """The rerun after a killed driver, in this process (its Ray workers are warm: a new driver would
    start its own); it resumes from what the killed one left, like `tessera prepare` does."""
    from tessera.jobs.prepare import prepare

    report = prepare(tiny_config(root))
    assert report["rows_out"] > 0, report


def _run_prepare(root, ray_address, fault=None, wait=True):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    env.pop("TESSERA_FAULT", None)
    if fault:
        env["TESSERA_FAULT"] = fault
    args = [sys.executable, "-m", "tessera.jobs.prepare", *[a for o in TINY for a in ("--set", o)], "--set", f"run.root={root}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


@pytest.mark.parametrize("fault", ["prepare:during_normalize", "prepare:after_normalize", "prepare:after_samples"])
def test_killed_driver_then_rerun_gives_exactly_the_uninterrupted_output(fault, prepared, world_root, ray_cluster, tmp_path):
    cfg, _ = prepared
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")  # same inputs, fresh outputs
    code, out = _run_prepare(root, ray_cluster, fault=fault)
    assert code == 86, out
    assert not (root / "prepare" / "report.json").exists()
    _rerun_in_process(root)
    assert _ids(root) == _ids(cfg.run.root)


def test_sigkilled_driver_then_rerun(prepared, world_root, ray_cluster, tmp_path):
    cfg, _ = prepared
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")
    proc = _run_prepare(root, ray_cluster, wait=False)
    deadline = time.time() + 120
    work = root / "prepare" / "_work"
    while time.time() < deadline and not (work / "normalized").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _rerun_in_process(root)
    assert _ids(root) == _ids(cfg.run.root)


TWO_NODE_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from tessera.jobs.prepare import prepare
from tests.conftest import tiny_config

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 * 1024**2})
cluster.add_node(num_cpus=1, object_store_memory=300 * 1024**2)
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
report = prepare(tiny_config(sys.argv[1]))
print("REPORT", json.dumps({"rows_out": report["rows_out"], "rejects": report["rejects"]}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_gives_the_same_output_set(prepared, world_root, tmp_path):
    cfg, report = prepared
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", TWO_NODE_SCRIPT, str(root)], env=env, capture_output=True, text=True, timeout=400,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ids(root) == _ids(cfg.run.root)
    a, _ = outputs(root)
    b, _ = outputs(cfg.run.root)
    key = lambda t: {r["sample_id"]: r["content_hash"] for r in t.select(["sample_id", "content_hash"]).to_pylist()}
    assert key(a) == key(b), "same content, not only the same ids"


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.sources=[{name: hf, kind: hf_dataset, uri: '{root}/synth/hf', caption_key: text, image_key: image}]", "columns ['text']"),
        ("prepare.sources=[{name: v, kind: video, uri: '{root}/synth/nowhere'}]", "no video files"),
        ("prepare.sources=[{name: w, kind: webdataset, uri: '{root}/synth/web'}]", "no *.tar files"),
    ],
)
def test_unreadable_sources_fail_before_any_work_in_one_line(override, message, world_root, ray_cluster, tmp_path, capsys):
    """`prepare()` raises before it writes anything; `tessera prepare` says it in one line (naming the source
    and the location) with exit status 2, before Ray is joined or a log is opened: nothing is written."""
    from tessera.jobs.prepare import main, prepare
    from tessera.pipelines.readers import SourceError
    from tests.conftest import TINY, tiny_config

    root = tmp_path / "run"
    root.mkdir()
    os.symlink(world_root / "synth", root / "synth")
    pattern = message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")
    with pytest.raises(SourceError, match=pattern):
        prepare(tiny_config(root, override))
    assert sorted(os.listdir(root)) == ["synth"], "nothing written"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([a for o in [f"run.root={root}", *TINY, override] for a in ("--set", o)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("tessera prepare: config error at 'prepare.sources': source '") and message in line, line
    assert str(root / "synth") in line and out == ""
    assert sorted(os.listdir(root)) == ["synth"], "nothing written, not even a log"


def test_dedup_runs_on_the_cluster_and_the_driver_gets_only_the_duplicates(ray_cluster, tmp_path, monkeypatch):
    """The dedup equals the in-memory reference (`duplicate_losers`: the smallest sample id of a content
    hash survives) and the counts are exact, while the only rows that reach the driver are one small
    dict per block: neither a column of every row nor the duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from tessera.jobs.prepare import _dedup, _reject_counts
    from tessera.pipelines.samples import duplicate_losers, split_rejects
    from tessera.timing import Timer

    n = 600
    rows = {"sample_id": [f"s{i:04d}" for i in range(n)], "source": ["a" if i % 3 else "b" for i in range(n)],
            "content_hash": [f"h{i % 250}" if i % 7 else ("" if i % 2 else None) for i in range(n)],
            "reject_reason": ["too_small" if i % 11 == 0 else None for i in range(n)]}
    os.makedirs(tmp_path / "normalized")
    for part in range(4):
        sl = slice(part * n // 4, (part + 1) * n // 4)
        pq.write_table(pa.table({k: v[sl] for k, v in rows.items()}), tmp_path / "normalized" / f"{part}.parquet")

    delivered = []
    real_iter_rows = ray.data.Dataset.iter_rows

    def counting_iter_rows(self, *a, **kw):
        for row in real_iter_rows(self, *a, **kw):
            delivered.append(row)
            yield row
    monkeypatch.setattr(ray.data.Dataset, "iter_rows", counting_iter_rows)
    for gather in ("iter_batches", "take_all", "to_pandas", "to_arrow_refs"):
        monkeypatch.setattr(ray.data.Dataset, gather, lambda *a, **kw: pytest.fail("a whole dataset pulled to the driver"))
    duplicates, counts = _dedup(str(tmp_path / "normalized"), str(tmp_path / "work"), True, Timer())
    assert len(delivered) <= 4, "one small dict per block reaches the driver"

    expected = {sid: winner for sid, winner in duplicate_losers(rows["sample_id"], rows["content_hash"]).items()
                if rows["reject_reason"][int(sid[1:])] is None}  # a row rejected for its own reason is reported with it
    table = pa.table({**rows, "reject_detail": [None] * n})
    found = split_rejects(table, duplicates).to_pylist()
    assert {r["sample_id"]: r["detail"].removeprefix("same content as ") for r in found if r["reason"] == "duplicate"} == expected
    assert len(expected) > 200
    report = _reject_counts(counts)
    rejected = sum(r is not None for r in rows["reject_reason"])
    assert sum(v["rows_in"] for v in report["per_source"].values()) == n
    assert report["rejects_by_reason"] == {"duplicate": len(expected), "too_small": rejected}
    assert sum(v["rows_out"] for v in report["per_source"].values()) == n - rejected - len(expected)
