"""`tessera fit-bpe` on the tiny world's token shards."""

import json
import os

import numpy as np
import pyarrow.parquet as pq

from tessera.bpe import VisualBPE
from tessera.manifest import dataset_files
from tessera.tokenize.tokens import grid_of
from tests.conftest import TINY_BPE, TINY_TOKENIZER, tiny_config


def test_fit_bpe_job(tokenized, world_root, ray_cluster):
    from tessera.jobs.fit_bpe import fit_bpe

    cfg = tiny_config(world_root, *TINY_TOKENIZER, *TINY_BPE)
    report = fit_bpe(cfg)
    assert report["merges_done"] > 0 and report["codebook_size"] == 32
    assert report["tokens_per_image_before"] == 64.0
    assert report["tokens_per_image_after"] < report["tokens_per_image_before"]
    assert 0 <= report["vocabulary_usage_heldout"] <= 1 and report["grids"]["heldout"] > 0
    assert sum(report["tile_shapes_vocab"].values()) == report["merges_done"]
    assert report["fit"]["num_shards"] == 2 and report["fit"]["index_bytes_per_input_token"] > 0
    assert os.path.getsize(report["png"]) > 1000
    bpe = VisualBPE.load(report["merges"])
    assert bpe.hash == report["hash"]
    # the same merges as an in-process fit of the same grids
    grids = [grid_of(r, p)[..., 0] for f in dataset_files(str(world_root / "tokens" / "tokens"))
             for r in pq.read_table(f).to_pylist() for p, im in enumerate(r["is_image"]) if im]
    for g in grids:
        assert np.array_equal(bpe.decode(bpe.encode(g), g.shape), g)
    assert fit_bpe(cfg)["skipped"] is True
    assert json.loads((world_root / "bpe" / "merges.json").read_text())["codebook_size"] == 32
