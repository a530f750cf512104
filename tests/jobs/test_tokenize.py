"""`tessera tokenize` end to end on the tiny world: round trip, 1 vs 2 actors and nodes, killed workers, rejects."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tessera.manifest import dataset_files, write_manifest
from tessera.schema import TOKEN_SCHEMA
from tessera.tokenize.images import decode_rgb, to_tensor
from tessera.tokenize.tokenizer import load_tokenizer
from tessera.tokenize.tokens import grid_of
from tests.conftest import TINY_TOKENIZER, tiny_config


def read(directory):
    files = dataset_files(str(directory))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def token_map(root):
    t = read(os.path.join(root, "tokens", "tokens"))
    return {r["sample_id"]: (r["text_ids"], r["pixel_codes"], r["grid_shapes"]) for r in t.to_pylist()}


def linked_root(tmp_path, world_root, *names):
    root = tmp_path / "run"
    root.mkdir()
    for n in names:
        os.symlink(world_root / n, root / n)
    return root


def test_token_shards_round_trip_to_the_images(tokenized, world_root):
    cfg, report = tokenized
    tokens = read(world_root / "tokens" / "tokens")
    assert tokens.schema.equals(TOKEN_SCHEMA, check_metadata=False)
    samples = {r["sample_id"]: r for f in dataset_files(str(world_root / "prepare" / "samples")) for r in pq.read_table(f).to_pylist()}
    assert set(tokens.column("sample_id").to_pylist()) == set(samples)
    model, _, _ = load_tokenizer(str(world_root / "tokenizer"))
    checked, flipped = 0, 0
    for row in tokens.to_pylist():
        sample = samples[row["sample_id"]]
        assert row["is_image"] == [im is not None for im in sample["images"]], "interleaving kept"
        assert row["timestamps"] == sample["timestamps"], "video timestamps kept"
        for p, is_img in enumerate(row["is_image"]):
            if not is_img:
                assert row["text_ids"][p] and not row["pixel_codes"][p]
                continue
            grid = torch.as_tensor(grid_of(row, p)).long()[None]
            assert grid.shape == (1, 8, 8, 1)
            original = to_tensor(decode_rgb(sample["images"][p], 32)[None])
            enc = model.encode(original, features=True)
            direct = enc["pixel"].long()
            # The actor encodes images in batches, this test one at a time: float sums differ in the last bits,
            # so a position whose two nearest codes are all but tied may flip (seen once in a CI run: the decoded
            # images differed by ~1e-3). A flipped code must be such a tie; any other difference is a wrong code.
            differ = int((grid != direct).sum())
            assert differ <= 1, f"{differ} of 64 codes differ from the tokenizer's own encode"
            if differ:
                book, z = model.quantizer.codebooks[0], enc["features"][0]
                at = (grid != direct)[0, ..., 0]
                d_shard = ((z[at] - book[grid[0, ..., 0][at]]) ** 2).sum(-1)
                d_direct = ((z[at] - book[direct[0, ..., 0][at]]) ** 2).sum(-1)
                assert torch.allclose(d_shard, d_direct, rtol=1e-4, atol=1e-5), "a flipped code that is not a near-tie"
            flipped += differ
            checked += 1
    assert checked == report["images"] > 0
    assert flipped <= max(1, checked // 20), f"{flipped} near-tie flips over {checked} images"
    assert report["image_codes"] == 64 * report["images"] and report["text_tokens"] > 0


def test_manifest_pins_both_tokenizers(tokenized, world_root):
    manifest = json.loads((world_root / "tokens" / "tokens" / "manifest.json").read_text())
    tok_meta = json.loads((world_root / "tokenizer" / "config.json").read_text())
    assert manifest["tokenizer"]["hash"] == tok_meta["weights_sha256"]
    assert manifest["text_tokenizer"]["hash"] and os.path.exists(os.path.join(manifest["text_tokenizer"]["path"], "tokenizer.json"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(manifest["text_tokenizer"]["path"])
    assert len(tok) == 400


def test_second_run_is_a_noop(tokenized):
    from tessera.jobs.tokenize import tokenize

    cfg, _ = tokenized
    assert tokenize(cfg)["skipped"] is True


def _run(root, ray_address, *extra, fault=None):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    env.pop("TESSERA_FAULT", None)
    if fault:
        env["TESSERA_FAULT"] = fault
    from tests.conftest import TINY

    args = [sys.executable, "-m", "tessera.jobs.tokenize", *[a for o in TINY + TINY_TOKENIZER + list(extra) for a in ("--set", o)],
            "--set", f"run.root={root}", "--set", f"tokenize.text_tokenizer={root}/text_tokenizer"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_actors_and_a_killed_worker_give_the_same_tokens(tokenized, world_root, ray_cluster, tmp_path):
    root = linked_root(tmp_path, world_root, "synth", "prepare", "tokenizer")
    os.symlink(world_root / "tokens" / "text_tokenizer", root / "text_tokenizer")
    marker = root / "tokens" / "fault-actor.marker"
    code, out = _run(root, ray_cluster, "tokenize.num_actors=2", fault="tokenize:actor")
    assert code == 0, out
    assert marker.exists(), "the fault hook killed an actor process"
    assert token_map(root) == token_map(world_root), "every sample exactly once, identical tokens"


TWO_NODES = r"""
import sys, ray
from ray.cluster_utils import Cluster
from tessera.jobs.tokenize import tokenize
from tests.conftest import tiny_config, TINY_TOKENIZER
# two logical CPUs per node: an actor pool spread over both nodes must leave a whole CPU for Ray Data's file listing
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 * 1024**2})
cluster.add_node(num_cpus=2, object_store_memory=300 * 1024**2)
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
tokenize(tiny_config(sys.argv[1], *TINY_TOKENIZER, f"tokenize.text_tokenizer={sys.argv[1]}/text_tokenizer", "tokenize.num_actors=2"))
ray.shutdown(); cluster.shutdown()
"""


def test_two_nodes_give_the_same_tokens(tokenized, world_root, tmp_path):
    root = linked_root(tmp_path, world_root, "synth", "prepare", "tokenizer")
    os.symlink(world_root / "tokens" / "text_tokenizer", root / "text_tokenizer")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(root)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert token_map(root) == token_map(world_root)


def test_untokenizable_images_are_rejected_and_counted(tokenized, world_root, ray_cluster, tmp_path):
    from tessera.jobs.tokenize import tokenize

    root = linked_root(tmp_path, world_root, "synth", "tokenizer")
    samples = tmp_path / "run" / "prepare" / "samples"
    samples.mkdir(parents=True)
    files = dataset_files(str(world_root / "prepare" / "samples"))
    table = pq.read_table(files[0])
    bad = table.slice(0, 1).to_pylist()[0]
    bad.update(sample_id="bad-image-row", images=[b"\x89PNG broken", None], texts=[None, "a caption"])
    pq.write_table(table, samples / "a.parquet")
    pq.write_table(pa.Table.from_pylist([bad], schema=table.schema), samples / "b.parquet")
    write_manifest(str(samples), "sample", "test", {})
    cfg = tiny_config(root, *TINY_TOKENIZER, f"tokenize.text_tokenizer={world_root}/tokens/text_tokenizer")
    report = tokenize(cfg)
    assert report["rejects_by_reason"] == {"untokenizable_image": 1}
    assert report["rows_out"] == table.num_rows and report["rows_in"] == table.num_rows + 1
    rejects = read(root / "tokens" / "rejects").to_pylist()
    assert rejects[0]["sample_id"] == "bad-image-row" and rejects[0]["stage"] == "tokenize"


def test_an_actor_pool_holding_every_cpu_is_refused_before_work(tokenized, world_root, ray_cluster, tmp_path):
    from tessera.jobs.tokenize import tokenize

    root = linked_root(tmp_path, world_root, "synth", "prepare", "tokenizer")
    cfg = tiny_config(root, *TINY_TOKENIZER, "tokenize.num_actors=2", "tokenize.cpus_per_actor=1.0")
    with pytest.raises(ValueError, match="tokenize.num_actors x tokenize.cpus_per_actor"):
        tokenize(cfg)
    assert not (root / "tokens").exists()


def test_killed_driver_then_rerun_gives_every_sample_once(tokenized, world_root, ray_cluster, tmp_path):
    root = linked_root(tmp_path, world_root, "synth", "prepare", "tokenizer")
    os.symlink(world_root / "tokens" / "text_tokenizer", root / "text_tokenizer")
    code, out = _run(root, ray_cluster, fault="tokenize:after_tokens")  # tokens written, nothing committed
    assert code == 86, out
    assert not (root / "tokens" / "report.json").exists()
    from tessera.jobs.tokenize import tokenize  # the rerun in this process: its Ray workers are warm

    report = tokenize(tiny_config(root, *TINY_TOKENIZER, f"tokenize.text_tokenizer={root}/text_tokenizer"))
    assert report["rows_out"] > 0, report
    assert token_map(root) == token_map(world_root)


def test_report_counts_come_from_per_block_sums_not_rows_on_the_driver(tokenized):
    """The driver sums one small dict per block (`block_statistics`): the same counts as reading every row,
    and what it holds does not grow with the rows (the code path; memory is measured in benchmarks)."""
    import inspect

    from tessera.jobs import tokenize as job
    from tessera.tokenize.tokens import block_statistics, merge_statistics

    rows = [{"is_image": [True, False], "text_ids": [[], [5, 6, 7]], "pixel_codes": [[1] * 4, []], "reject_reason": None,
             "busy_s": 0.5, "idle_s": 0.1, "actor": "a"},
            {"is_image": [True], "text_ids": [[]], "pixel_codes": [[2] * 4], "reject_reason": None,
             "busy_s": 0.25, "idle_s": 0.0, "actor": "b"},
            {"is_image": [False], "text_ids": [[]], "pixel_codes": [[]], "reject_reason": "untokenizable_image",
             "busy_s": 0.0, "idle_s": 0.0, "actor": "a"}]
    blocks = [block_statistics(pa.Table.from_pylist(rows[:2])), block_statistics(pa.Table.from_pylist(rows[2:]))]
    total = merge_statistics(b.column("stats")[0].as_py() for b in blocks)
    assert total["rows"] == 3 and total["images"] == 2 and total["text_tokens"] == 3 and total["image_codes"] == 8
    assert total["rejects_by_reason"] == {"untokenizable_image": 1}
    assert total["actors"]["a"] == {"rows": 2, "images": 1, "busy_s": 0.5, "idle_s": 0.1}
    source = inspect.getsource(job)
    assert "to_pylist()" not in inspect.getsource(job._commit) and "block_statistics" in source
    cfg, report = tokenized
    shards = read(os.path.join(cfg.resolve(cfg.tokenize.output), "tokens"))
    assert report["rows_out"] == shards.num_rows
    assert report["images"] == sum(sum(r) for r in shards.column("is_image").to_pylist())
    assert report["text_tokens"] == sum(len(ids) for row in shards.column("text_ids").to_pylist() for ids in row)


def test_whole_row_actors_and_the_staged_gpu_path_give_the_same_rows(tokenized, world_root):
    """CPU actors decode and text-tokenize their own rows; GPU actors get decoded rows from CPU tasks and
    hand theirs to a text task: the same token rows either way (Ray-free: the actor class is called directly)."""
    from tessera.tokenize import tokens
    from tessera.tokenize.ray_job import TokenizeActor

    cfg, report = tokenized
    tok_dir = str(world_root / "tokenizer")
    text = {"text_tokenizer": str(world_root / "tokens" / "text_tokenizer"), "tokenizer_hash": "t", "text_tokenizer_hash": "x"}
    batch = read(world_root / "prepare" / "samples").slice(0, 12)
    whole = TokenizeActor(tok_dir, 32, 4, "cpu", whole_rows=text)(batch)
    staged = tokens.text_stage(TokenizeActor(tok_dir, 32, 4, "cpu")(tokens.decode_stage(batch, 32)), **text)
    drop = ["busy_s", "idle_s", "actor"]  # timings and the actor's name
    assert whole.drop_columns(drop).to_pylist() == staged.drop_columns(drop).to_pylist()
    assert sum(len(c) for r in whole.column("pixel_codes").to_pylist() for c in r) > 0
