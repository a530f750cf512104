"""Public corpora in their published layouts (`tests/pipelines/published.py`) through `tessera prepare`:
every good item a sample with the right interleaving, every bad item a reject with its reason, a second
run a no-op; and the URL download step against a server on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tessera.config import DownloadConfig, load_config
from tessera.manifest import dataset_files
from tessera.pipelines import corpora, subtitles
from tessera.pipelines.download import Downloader
from tessera.pipelines.images import Rejected
from tessera.schema import check_sample_row, sample_id
from tests.conftest import TINY_BPE, TINY_TOKENIZER
from tests.pipelines import published


def layout(value):
    return ["text" if t is not None else "image" for t in value["texts"]]


@pytest.fixture(scope="module")
def server():
    s = published.ImageServer(slow_s=2.5)
    yield s
    s.close()


@pytest.fixture
def local_only(monkeypatch):
    """Fail any connection this process makes outside 127.0.0.1."""
    real = socket.socket.connect

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"test tried to reach {address}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


# ----------------------------------------------------------------------------- pure parts


def test_srt_and_vtt_are_parsed_with_their_markup_and_line_breaks_removed():
    for name, text, colour in (("a.srt", published.SRT, "red"), ("b.vtt", published.VTT, "blue")):
        subs = subtitles.parse(text.encode(), name)
        assert [(s["start"], s["end"], s["text"]) for s in subs] == [
            (0.0, 0.9, f"A {colour} square appears."), (1.0, 2.0, "It slides to the right.")], name
    with pytest.raises(Rejected) as e:
        subtitles.parse(b"this is no subtitle file\nat all\n", "c.srt")
    assert e.value.reason == "malformed_document" and "c.srt" in e.value.detail


def test_llava_image_placeholders_place_the_images():
    load = lambda ref: ref  # noqa: E731 - the reference stands in for the pixels
    record = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Compare <image> and\n<image>\nplease."}, {"from": "gpt", "value": "Same."}]}
    positions, roles = corpora.llava_positions(record, load)
    assert positions == [("text", "Compare"), ("image", "a.jpg"), ("text", "and"), ("image", "b.jpg"), ("text", "please."),
                         ("text", "Same.")]
    assert roles == ["user", None, "user", None, "user", "assistant"]
    no_placeholder = {"image": "a.jpg", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]}
    assert corpora.llava_positions(no_placeholder, load)[0] == [("image", "a.jpg"), ("text", "Colour?"), ("text", "Red.")]
    with pytest.raises(Rejected, match="2 <image> placeholders for 1 images"):
        corpora.llava_positions({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]}, load)
    with pytest.raises(Rejected, match="conversations"):
        corpora.llava_positions({"conversations": [{"from": "robot", "value": "hi"}]}, load)


def test_downloads_are_bounded_retried_cached_and_classified(server, tmp_path, local_only):
    cfg = DownloadConfig(timeout_s=1.0, retries=1, backoff_s=0.01, max_concurrency=4)
    urls = {"ok": f"{server.url}/img/red.jpg", "404": f"{server.url}/missing.jpg", "html": f"{server.url}/page.html",
            "slow": f"{server.url}/slow.jpg", "503": f"{server.url}/flaky.jpg"}
    got = Downloader(cfg, str(tmp_path / "cache")).fetch(list(urls.values()) + [urls["ok"]])
    reasons = {name: got[u].reason for name, u in urls.items()}
    assert reasons == {"ok": None, "404": "http_404", "html": "not_an_image", "slow": "timeout", "503": "download_failed"}
    assert got[urls["ok"]].data == published.image_bytes((200, 30, 30))
    hits = dict(server.hits)
    assert hits["/img/red.jpg"] == 1, "one request per distinct URL"
    assert hits["/missing.jpg"] == 1 and hits["/page.html"] == 1, "no retry on a 404 or a 200"
    assert hits["/slow.jpg"] == cfg.retries + 1 and hits["/flaky.jpg"] == cfg.retries + 1
    again = Downloader(cfg, str(tmp_path / "cache")).fetch(list(urls.values()))
    assert {name: again[u].reason for name, u in urls.items()} == reasons
    assert all(again[urls[n]].cached for n in ("ok", "404", "html"))
    assert server.hits["/img/red.jpg"] == 1 and server.hits["/missing.jpg"] == 1 and server.hits["/page.html"] == 1, \
        "successes and permanent failures come from the cache"
    assert server.hits["/slow.jpg"] == 2 * (cfg.retries + 1), "a timeout is transient: tried again next run"
    server.hits.clear()


# ----------------------------------------------------------------------------- through prepare on Ray


def corpora_config(tmp, base_url):
    expected = {"img2dataset": published.img2dataset(tmp / "laion"), "mint1t": published.mint1t(tmp / "mint"),
                "obelics": published.obelics(tmp / "obelics", base_url), "video2dataset": published.video2dataset(tmp / "v2d"),
                "video_csv": published.video_csv(tmp / "webvid"), "srt": published.subtitled_videos(tmp / "subbed"),
                "hf_parquet": published.hf_parquet(tmp / "hfpq")}
    folder, expected["llava"] = published.llava(tmp / "llava")
    sources = [
        {"name": "laion", "kind": "img2dataset", "uri": str(tmp / "laion")},
        {"name": "llava", "kind": "llava", "uri": str(tmp / "llava"), "image_folder": folder},
        {"name": "mint", "kind": "mint1t", "uri": str(tmp / "mint")},
        {"name": "obelics", "kind": "obelics", "uri": str(tmp / "obelics")},
        {"name": "v2d", "kind": "video2dataset", "uri": str(tmp / "v2d")},
        {"name": "webvid", "kind": "video_csv", "uri": str(tmp / "webvid" / "manifest.csv")},
        {"name": "subbed", "kind": "video", "uri": str(tmp / "subbed")},
        {"name": "hfpq", "kind": "hf_dataset", "uri": str(tmp / "hfpq"), "image_key": "image", "caption_key": "text"},
    ]
    bench = published.eval_sets(tmp / "bench")
    config = {"run": {"name": "mine", "root": str(tmp / "run")}, "ray": {"num_cpus": 2},
              "prepare": {"sources": sources, "image": {"resolution": 32, "min_side": 16}, "batch_size": 4,
                          "video": {"target_fps": 2.0, "max_frames": 4},
                          "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.01}},
              "eval": {"num_generate": 0, "sets": [
                  {"name": "pope", "kind": "pope", "uri": str(tmp / "bench" / "coco_pope_random.json"), "image_folder": bench},
                  {"name": "vqav2", "kind": "vqa", "uri": str(tmp / "bench" / "vqav2_val.jsonl"), "image_folder": bench},
                  {"name": "coco", "kind": "captions", "uri": str(tmp / "bench" / "captions_val.jsonl"), "image_folder": bench}]}}
    path = tmp / "corpora.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, expected


# the rest of the graph at the size of a test: a tiny tokenizer, BPE and model
TINY_GRAPH = [*TINY_TOKENIZER, *TINY_BPE, "tokenizer.train.steps=12", "tokenizer.train.checkpoint_every=12",
              "tokenizer.train.heldout_images=4", "tokenizer.train.batch_size=8",
              "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
              "model.intermediate_size=64", "train.cpus_per_worker=0.5", "train.checkpoint_every=10", "train.pack_group=8",
              "train.stages=[{name: all, steps: 4, trainable: all, lr: 0.005, warmup_steps: 1, batch_size: 2, seq_len: 256}]"]


@pytest.fixture(scope="module")
def corpora_run(tmp_path_factory, ray_cluster, server):
    """A user with only these corpora runs the whole graph (`tessera run`) on them, after a first
    `tessera prepare` was killed in the middle of normalising (and downloading)."""
    from tessera import storage
    from tessera.jobs.run import main

    tmp = tmp_path_factory.mktemp("corpora")
    path, expected = corpora_config(tmp, server.url)
    cfg = load_config(path, TINY_GRAPH)
    server.hits.clear()
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, TESSERA_FAULT="prepare:during_normalize")
    killed = subprocess.run([sys.executable, "-m", "tessera.jobs.prepare", "--config", str(path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 86, killed.stdout + killed.stderr
    assert not os.path.exists(os.path.join(cfg.run.root, "prepare", "report.json"))
    run_report = main(["--config", str(path), *[a for o in TINY_GRAPH for a in ("--set", o)]])
    hits = dict(server.hits)
    server.hits.clear()
    out = os.path.join(cfg.run.root, "prepare")
    tables = [pa.concat_tables([pq.read_table(f) for f in dataset_files(os.path.join(out, d))]).to_pylist()
              for d in ("samples", "rejects")]
    return cfg, storage.read_json(os.path.join(out, "report.json")), expected, tables, hits, run_report


def fates(corpora_run, source):
    """{sample_id: (None, row) for a sample | (reason, detail) for a reject} of one source."""
    _, _, _, (rows, rejects), _, _ = corpora_run
    out = {r["sample_id"]: (None, r) for r in rows if r["source"] == source}
    out.update({r["sample_id"]: (r["reason"], r["detail"]) for r in rejects if r["source"] == source})
    return out


def test_img2dataset_shards_and_their_failed_rows(corpora_run):
    got = fates(corpora_run, "laion")
    expected = corpora_run[2]["img2dataset"]
    assert set(got) == {sample_id("laion", k) for k in expected}, "every row of the parquet is a sample or a reject"
    for key, reason in expected.items():
        fate, value = got[sample_id("laion", key)]
        assert fate == reason, (key, value)
        if reason is None:
            check_sample_row(value)
            assert layout(value) == ["image", "text"] and json.loads(value["meta"])["status"] == "success"
    assert "failed_to_download" in got[sample_id("laion", "000000002")][1]


def test_llava_conversations_become_role_tagged_documents(corpora_run):
    got = fates(corpora_run, "llava")
    expected = corpora_run[2]["llava"]
    broken = [sid for sid in got if sid not in {sample_id("llava", k) for k in expected}]
    assert len(broken) == 1 and got[broken[0]][0] == "malformed_document", "the truncated JSONL line is a reject"
    for key, (reason, n_images) in expected.items():
        fate, value = got[sample_id("llava", key)]
        assert fate == reason, (key, value)
        if reason is None:
            check_sample_row(value)
            meta = json.loads(value["meta"])
            assert sum(i is not None for i in value["images"]) == n_images
            assert [r for r in meta["roles"] if r] == ["user", "assistant"] * (len([r for r in meta["roles"] if r]) // 2)
    first = got[sample_id("llava", "000000000009")][1]
    assert layout(first) == ["image", "text", "text", "text", "text"] and first["texts"][1] == "What colour is the square?"
    assert "../../etc/passwd.jpg" in got[sample_id("llava", "escape")][1]


def test_mint1t_documents_keep_their_interleaving(corpora_run):
    got = fates(corpora_run, "mint")
    expected = corpora_run[2]["mint1t"]
    assert set(got) == {sample_id("mint", k) for k in expected}
    for key, (reason, order) in expected.items():
        fate, value = got[sample_id("mint", key)]
        assert fate == reason, (key, value)
        if reason is None:
            check_sample_row(value)
            assert layout(value) == order


def test_obelics_documents_download_their_images(corpora_run):
    got = fates(corpora_run, "obelics")
    expected = corpora_run[2]["obelics"]
    assert len(got) == len(expected)
    by_layout = sorted(((fate or "", layout(v) if fate is None else []) for fate, v in got.values()))
    assert by_layout == sorted((r or "", o or []) for r, o in expected)

def test_the_killed_prepare_resumed_to_every_item_exactly_once(corpora_run):
    """The first `tessera prepare` died in the middle of normalising; after the run that resumed it,
    no item is lost (every source's items are checked above) and none is written twice."""
    _, report, _, (rows, rejects), _, _ = corpora_run
    ids = [r["sample_id"] for r in rows] + [r["sample_id"] for r in rejects]
    assert len(ids) == len(set(ids)), "an item written twice (or both a sample and a reject)"
    assert report["rows_out"] == len(rows) and report["rejects"] == len(rejects)


def test_a_killed_run_resumes_without_downloading_again(corpora_run):
    """Across the killed `prepare` and the run that resumed it, every URL that succeeded (and every
    permanent failure) was requested once: the resumed run read them from the cache. A timeout is
    transient: at most retries + 1 = 2 requests per run."""
    hits = corpora_run[4]
    for path in ("/img/red.jpg", "/img/blue.png", "/img/green.jpg", "/missing.jpg", "/page.html"):
        assert hits[path] == 1, (path, hits)
    assert 2 <= hits["/slow.jpg"] <= 4, hits


def test_video2dataset_csv_and_subtitle_files(corpora_run):
    got = fates(corpora_run, "v2d")
    for key, reason in corpora_run[2]["video2dataset"].items():
        fate, value = got[sample_id("v2d", key)]
        assert fate == reason, (key, value)
        if reason is None:
            assert value["kind"] == "video" and value["texts"][0] == "a square slides to the right"
            assert value["timestamps"] == sorted(value["timestamps"])
    got = fates(corpora_run, "webvid")
    assert len(got) == len(corpora_run[2]["video_csv"])
    samples = {json.loads(v["meta"])["start"]: v for fate, v in got.values() if fate is None}
    assert sorted(samples) == [0.0, 1.0]
    assert [t for t in samples[1.0]["timestamps"]] == [1.0, 1.0, 1.5], "the clip's frames start at its window"
    assert sorted(fate for fate, _ in got.values() if fate) == ["missing_file", "unsafe_path", "video_undecodable"]
    got = fates(corpora_run, "subbed")
    for name, reason in corpora_run[2]["srt"].items():
        fate, value = got[sample_id("subbed", name)]
        assert fate == reason, (name, value)
        if reason is None:
            texts = [t for t in value["texts"] if t]
            assert texts == [f"A {'red' if name == 'a.mp4' else 'blue'} square appears.", "It slides to the right."]


def test_hf_parquet_with_image_structs(corpora_run):
    got = fates(corpora_run, "hfpq")
    assert len(got) == corpora_run[2]["hf_parquet"] and all(fate is None for fate, _ in got.values())
    assert sorted(v["texts"][1] for _, v in got.values()) == ["a blue square, from the hub", "a red square, from the hub"]


def test_report_counts_every_row_and_a_second_run_is_a_noop(corpora_run, server):
    from tessera.jobs.prepare import prepare

    cfg, report, _, (rows, rejects), _, _ = corpora_run
    assert report["rows_out"] == len(rows) and report["rejects"] == len(rejects)
    assert report["rows_out"] + report["rejects"] == report["rows_in"]
    for reason in ("download_failed", "http_404", "timeout", "not_an_image", "unsafe_path", "missing_file"):
        assert report["rejects_by_reason"].get(reason), reason
    again = prepare(cfg)
    assert again["skipped"] is True and not server.hits, "a complete run neither reads nor downloads again"


def test_the_whole_graph_runs_on_published_corpora_only(corpora_run):
    """Nothing of the shapes world is synthesised, the tokenizer and the BPE learn from these images,
    and eval scores the published held-out sets (`eval.sets`) and only them."""
    cfg, _, _, _, _, report = corpora_run
    assert not os.path.exists(cfg.resolve(cfg.synth.output)), "no source refers to the shapes world: nothing synthesised"
    assert "synth" not in report["stages"]
    assert report["prepare"]["samples"] >= 10 and report["tokenize"]["images"] >= 10 and report["bpe"]["merges"] > 0
    sets = report["eval"]["sets"]
    assert sets["pope"]["questions"] == 9 and 0.0 <= sets["pope"]["yes_ratio"] <= 1.0
    assert sets["vqav2"]["questions"] == 3 and sets["coco"]["captions"] == 3
    assert all(s["images_unreadable"] == 0 and s["examples"] for s in sets.values())
    assert "caption_accuracy" not in report["eval"], "the shapes world's checks run only when its held-out set exists"
    on_disk = json.loads(open(os.path.join(cfg.run.root, "eval", "report.json")).read())
    assert on_disk["eval"]["sets"].keys() == {"pope", "vqav2", "coco"}
    assert "eval set `vqav2` (vqa)" in open(os.path.join(cfg.run.root, "report.md")).read()


@pytest.mark.parametrize("source, message", [
    ({"kind": "llava", "uri": "{tmp}/none.json", "image_folder": "{tmp}"}, "is not a .json / .jsonl file nor a directory"),
    ({"kind": "llava", "uri": "{tmp}/a.json", "image_folder": "{tmp}/no-images"}, "image_folder"),
    ({"kind": "obelics", "uri": "{tmp}"}, "no *.parquet files under"),
    ({"kind": "video_csv", "uri": "{tmp}/missing.csv"}, "is not a .csv manifest"),
    ({"kind": "img2dataset", "uri": "{tmp}/empty"}, "no *.tar files under"),
])
def test_an_unreadable_published_source_fails_before_any_work_naming_it(tmp_path, source, message):
    from tessera.config import ConfigError, SourceConfig
    from tessera.pipelines.sources import check_sources

    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "empty").mkdir()
    spec = {k: v.replace("{tmp}", str(tmp_path)) for k, v in source.items()}
    with pytest.raises(ConfigError) as e:
        check_sources([SourceConfig(name="mine", **spec)], lambda u: u)
    assert "source 'mine'" in str(e.value) and message in str(e.value), str(e.value)


def test_a_llava_source_needs_its_image_folder():
    from tessera.config import ConfigError

    with pytest.raises(ConfigError, match="image_folder"):
        load_config(None, ["prepare.sources=[{name: l, kind: llava, uri: /data/llava.json}]"])


def test_llava_rows_of_one_batch_each_become_a_sample_or_a_reject(tmp_path):
    """The batch function alone (no Ray): JSONL lines and a file that is not an array, in one batch."""
    folder, expected = published.llava(tmp_path / "llava")
    source = corpora.SourceConfig(name="llava", kind="llava", uri=str(tmp_path / "llava"), image_folder=folder)
    lines = [json.dumps(r) for r in json.loads((tmp_path / "llava" / "llava_instruct.json").read_text())]
    lines += (tmp_path / "llava" / "sharegpt4v.jsonl").read_text().splitlines()
    lines.append("\x00a JSON object, expected an array of conversations")
    batch = pa.table({"text": lines, "path": ["x/llava_instruct.json"] * (len(lines) - 1) + ["x/odd.json"]})
    rows = corpora.llava_batch(batch, source, corpora.PrepareConfig()).to_pylist()
    by_id = {r["sample_id"]: r for r in rows}
    for key, (reason, n_images) in expected.items():
        row = by_id[sample_id("llava", key)]
        assert row["reject_reason"] == reason, (key, row["reject_detail"])
        assert sum(i is not None for i in row["images"]) == n_images
    assert by_id[sample_id("llava", "file:odd.json")]["reject_detail"] == "odd.json is a JSON object, expected an array of conversations"
    assert sum(r["reject_reason"] == "malformed_document" for r in rows) == 2, "the truncated line and the odd file"
