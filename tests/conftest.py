"""Shared fixtures: one small Ray per session, one tiny shapes world, one prepared run.

Environment first: no usage stats, no hub, no token auth (subprocess drivers join the
session's cluster), and a short no-progress timeout so a deadlocked pipeline fails fast.
"""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train runs start and end faster: the controller polls its workers every 0.5 s (default 2 s; a
# tiny run waits on several polls), and no preemption watcher or metrics actors are started per run
# (each is one more Ray worker process on two cores). Subprocess drivers and `ray start` clusters inherit these.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")

import pytest  # noqa: E402

from tessera.config import load_config  # noqa: E402

# A world small enough for seconds, with every fault injected.
TINY = [
    "synth.resolution=32",
    "synth.num_image_text=24",
    "synth.samples_per_shard=8",
    "synth.num_videos=3",
    "synth.video_seconds=2.0",
    "synth.num_documents=5",
    "synth.num_instruct=64",
    "synth.num_heldout=6",
    "synth.inject_faults=true",
    "prepare.image.resolution=32",
    "prepare.rows_per_shard=16",
    "prepare.batch_size=8",
    "ray.num_cpus=2",
]


def tiny_config(root, *extra):
    return load_config(None, [f"run.root={root}", *TINY, *extra])


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1024 * 1024 * 1024,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def world_root(tmp_path_factory):
    """A run root whose synth/ holds the tiny world (shared read-only by tests)."""
    from tessera.jobs.synth import run_synth

    root = tmp_path_factory.mktemp("world")
    run_synth(tiny_config(root))
    return root


@pytest.fixture(scope="session")
def prepared(world_root, ray_cluster):
    """(config, report) of one uninterrupted prepare run on the tiny world."""
    from tessera.jobs.prepare import prepare

    cfg = tiny_config(world_root)
    return cfg, prepare(cfg)


# A tiny vq tokenizer, trained in-process (no Ray Train) for the tokenize/BPE tests.
TINY_TOKENIZER = ["tokenizer.image_size=32", "tokenizer.vq.channels=16", "tokenizer.vq.rvq.codebook_size=32",
                  "tokenizer.losses.lpips_weight=0.0", "tokenizer.train.warmup_steps=2", "tokenizer.train.steps=30",
                  "tokenizer.train.batch_size=16", "tokenizer.train.heldout_images=8", "tokenizer.train.checkpoint_every=30",
                  "tokenize.text_vocab_size=400", "tokenize.batch_size=8", "tokenize.encode_batch=4", "tokenize.rows_per_shard=16",
                  "tokenize.cpus_per_actor=0.5"]


def train_tiny_tokenizer(cfg, directory):
    import glob

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from tessera.tokenize.images import decode_rgb, to_tensor
    from tessera.tokenize.tokenizer import build_tokenizer, save_tokenizer
    from tessera.tokenize.trainer import TokenizerTrainer

    torch.manual_seed(0)
    pngs = [p for f in sorted(glob.glob(f"{cfg.run.root}/prepare/samples/*.parquet"))
            for row in pq.read_table(f).column("images").to_pylist() for p in row if p]
    x = to_tensor(np.stack([decode_rgb(p, 32) for p in pngs]))
    model = build_tokenizer(cfg.tokenizer)
    trainer = TokenizerTrainer(model, cfg.tokenizer, torch.device("cpu"))
    for step in range(cfg.tokenizer.train.steps):
        trainer.train_step(x[torch.randint(len(x), (16,), generator=torch.Generator().manual_seed(step))])
    save_tokenizer(model.eval(), cfg.tokenizer, directory)


@pytest.fixture(scope="session")
def tokenized(prepared, world_root):
    """(config, report) of one tokenize run on the tiny world with a tiny tokenizer (trained by
    the train-tokenizer job, so a `tessera run` with the same config finds it complete)."""
    from tessera.jobs.tokenize import tokenize
    from tessera.jobs.train_tokenizer import train_tokenizer

    cfg = tiny_config(world_root, *TINY_TOKENIZER)
    train_tokenizer(cfg)
    return cfg, tokenize(cfg)


TINY_BPE = ["bpe.num_merges=40", "bpe.checkpoint_every=10", "bpe.heldout_every=3", "bpe.num_workers=2", "bpe.png_tiles=8"]


@pytest.fixture(scope="session")
def bpe_fitted(tokenized, world_root, ray_cluster):
    """(config, report) of fit-bpe on the tiny world's tokens."""
    from tessera.jobs.fit_bpe import fit_bpe

    cfg = tiny_config(world_root, *TINY_TOKENIZER, *TINY_BPE)
    return cfg, fit_bpe(cfg)


# A tiny unified model and two short stages: enough to cross a stage boundary and resume inside each.
TINY_TRAIN = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=64",
    "train.cpus_per_worker=0.5", "train.checkpoint_every=2", "train.log_every=1", "train.pack_group=8",
    "train.stages=[{name: embeddings, steps: 3, trainable: embeddings, lr: 0.01, warmup_steps: 1, batch_size: 2, seq_len: 256,"
    " mixture: {weights: {kind=image_text: 1.0}}}, {name: all, steps: 4, trainable: all, lr: 0.005, warmup_steps: 1,"
    " batch_size: 2, seq_len: 256, loss_mask: answers, mixture: {weights: {kind=image_text: 0.5, task=vqa: 0.3, kind=video: 0.2},"
    " order: curriculum}}]",
]


BUCKET = "tessera-runs"


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server (moto) on 127.0.0.1 for the session, started before the session's Ray: the AWS_*
    variables that point at it are in the environment every Ray worker and subprocess driver inherits."""
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                      access_key="test", secret_key="test", region="us-east-1").create_dir(BUCKET)
    try:
        yield port
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server):
    """A fresh `s3://` run root of this test on the session's S3 server."""
    import uuid

    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
