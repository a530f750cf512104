"""FSDP2 checkpoints through `torch.distributed.checkpoint`: two CPU processes (gloo) train a sharded
model, save, and a fresh sharded pair resumes with identical losses; the driver reads the same
checkpoint into one unsharded model whose saved directory plain `transformers` loads, with the
logits of the sharded model. Embeddings-only training keeps the text rows of the sharded
embeddings bit-identical. (Before: rank 0 saved its own shard and the driver loaded it as if
it were the whole model.)"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_bpe():
    from tessera.bpe.model import VisualBPE

    rng = np.random.default_rng(0)
    grids = [np.repeat(np.repeat(rng.integers(0, 16, (2, 2)), 2, 0), 2, 1).astype(np.int32) for _ in range(64)]
    return VisualBPE.fit(grids, codebook_size=16, num_merges=24)


def batch_for(model, bpe, rank: int):
    """A packed batch that depends only on the rank (not on Python's per-process hash seed)."""
    from tessera.model.packing import collate, pack
    from tests.model.test_model import builder_for, token_row

    b = builder_for(model, bpe)
    seqs = [b.build(token_row(f"r{rank}s{i}", n_images=1 + i % 2, rng=np.random.default_rng([rank, i])), "all")
            for i in range(3)]
    rows, _ = pack(seqs, 128, model.vocab.pad_id)
    return collate(rows)


def sharded_trainer(seed: int, bpe, trainable="all"):
    from tessera.config import StageConfig
    from tessera.model.trainer import StageTrainer, fsdp_wrap
    from tests.model.test_model import make_model

    model = make_model("bpe", bpe, False, seed, "model.visual_positions=1d")
    stage = StageConfig(name="s", steps=6, trainable=trainable, lr=1e-2, warmup_steps=1)
    return StageTrainer(model, stage, 0.1, 1.0, torch.device("cpu"), fsdp_wrap)


def worker(rank: int, world: int, port: int, directory: str, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        bpe = fixed_bpe()
        first = sharded_trainer(0, bpe)
        batch = batch_for(first.model, bpe, rank)
        for _ in range(STEPS):
            first.train_step([batch])
        first.save(directory)  # every rank writes its shards
        eval_batch = batch_for(first.model, bpe, 0)
        with torch.no_grad():
            logits = first.model(**{k: v for k, v in eval_batch.items() if k != "labels"}).logits
        expected = float(first.train_step([batch])["loss"])
        resumed = sharded_trainer(7, bpe)  # other initial weights: everything comes from the checkpoint
        resumed.load(directory)
        got = float(resumed.train_step([batch])["loss"])
        assert resumed.step == first.step == STEPS + 1
        # Being-VL's stage 1 under FSDP2: only the new rows of the sharded embeddings move
        frozen = sharded_trainer(0, bpe, "embeddings")
        text = frozen.model.vocab.text_size
        before = frozen.model.lm.get_input_embeddings().weight.full_tensor().detach().clone()
        frozen.train_step([batch])
        after = frozen.model.lm.get_input_embeddings().weight.full_tensor()
        assert torch.equal(after[:text], before[:text]) and not torch.equal(after[text:], before[text:])
        results[rank] = (expected, got, logits.numpy() if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_fsdp2_save_resume_and_plain_transformers_load(tmp_path):
    from transformers import AutoModelForCausalLM

    from tessera.model.assets import save_model
    from tessera.model.trainer import load_trained_weights
    from tests.model.test_model import make_model

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    checkpoint = str(tmp_path / "ckpt")
    mp.start_processes(worker, args=(2, free_port(), checkpoint, results), nprocs=2, start_method="spawn", join=True)
    for rank in (0, 1):
        expected, got, _ = results[rank]
        assert got == expected, f"rank {rank}: resumed loss {got} != {expected}"
    assert {f for f in os.listdir(checkpoint)} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}

    # the driver: one process, no process group, reads the sharded checkpoint into a whole model
    bpe = fixed_bpe()
    whole = make_model("bpe", bpe, False, 3, "model.visual_positions=1d")
    load_trained_weights(whole, checkpoint)
    save_model(whole.eval(), str(tmp_path / "model"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    eval_batch = batch_for(whole, bpe, 0)
    first_doc = int((eval_batch["doc_ids"][0] == 1).sum())  # packed rows start with document 1
    ids = eval_batch["input_ids"][:, :first_doc]
    with torch.no_grad():
        ours = whole(**{k: v for k, v in eval_batch.items() if k != "labels"}).logits
        torch.testing.assert_close(ours, torch.from_numpy(results[0][2]), atol=1e-5, rtol=1e-5)  # = the sharded model at save
        torch.testing.assert_close(plain(ids).logits, whole(ids).logits, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
