import torch

from tessera.config import load_config
from tessera.tokenize.align import align_vision_encoder, build_siglip
from tessera.tokenize.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from tessera.tokenize.trainer import TokenizerTrainer

TINY = ["tokenizer.image_size=32", "tokenizer.vq.channels=16", "tokenizer.vq.rvq.codebook_size=32",
        "tokenizer.dual.hidden_size=32", "tokenizer.dual.num_heads=2", "tokenizer.dual.num_layers=3", "tokenizer.dual.pixel_layer=1",
        "tokenizer.dual.shortcut_layer=0", "tokenizer.dual.semantic_layer=3", "tokenizer.dual.decoder_channels=16",
        "tokenizer.dual.pixel_rvq.codebook_size=32", "tokenizer.dual.semantic_rvq.codebook_size=32",
        "tokenizer.losses.lpips_weight=0.5", "tokenizer.losses.disc_start=10", "tokenizer.train.warmup_steps=2",
        "tokenizer.train.steps=40"]


def cfg_for(preset):
    return load_config(None, [f"tokenizer.preset={preset}", *TINY]).tokenizer


def images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1  # flat colours with a square: learnable quickly
    x = base.expand(n, 3, 32, 32).clone()
    x[:, :, 8:20, 8:20] = -x[:, :, 8:20, 8:20]
    return x


def test_encode_decode_shapes_for_both_presets():
    x = images(4)
    vq = build_tokenizer(cfg_for("vq")).eval()
    codes = vq.encode(x)
    assert set(codes) == {"pixel"} and codes["pixel"].shape == (4, 8, 8, 1) and codes["pixel"].dtype == torch.int64
    assert vq.decode(codes["pixel"]).shape == (4, 3, 32, 32)
    dual = build_tokenizer(cfg_for("dual")).eval()
    codes = dual.encode(x)
    assert codes["pixel"].shape == (4, 4, 4, 4) and codes["semantic"].shape == (4, 4, 4, 4)
    out = dual.decode(codes["pixel"])
    assert out.shape == (4, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_save_load_gives_bit_identical_codes(tmp_path):
    for preset in ("vq", "dual"):
        cfg = cfg_for(preset)
        model = build_tokenizer(cfg)
        trainer = TokenizerTrainer(model, cfg, torch.device("cpu"))
        for _ in range(3):
            trainer.train_step(images(8))
        model.eval()
        save_tokenizer(model, cfg, str(tmp_path / preset))
        loaded, loaded_cfg, meta = load_tokenizer(str(tmp_path / preset))
        assert loaded_cfg.preset == preset and meta["weights_sha256"]
        x = images(6, seed=3)
        a, b = model.encode(x), loaded.encode(x)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(model.encode(x)["pixel"], a["pixel"]), "deterministic given weights"


def test_training_steps_lower_the_loss_and_the_teacher_never_changes():
    for preset in ("vq", "dual"):
        torch.manual_seed(0)
        cfg = cfg_for(preset)
        model = build_tokenizer(cfg)
        trainer = TokenizerTrainer(model, cfg, torch.device("cpu"))
        x = images(8)
        teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()} if preset == "dual" else None
        losses = [trainer.train_step(x) for _ in range(40)]
        first, last = losses[0]["loss_l1"], losses[-1]["loss_l1"]
        assert last < 0.7 * first, (preset, first, last)
        assert "loss_gan" in losses[-1], "the discriminator started after disc_start"
        if teacher is not None:
            assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
            assert losses[-1]["loss_semantic_mse"] < losses[0]["loss_semantic_mse"]


def test_resumed_trainer_continues_with_identical_state():
    cfg = cfg_for("vq")
    torch.manual_seed(0)
    model = build_tokenizer(cfg)
    trainer = TokenizerTrainer(model, cfg, torch.device("cpu"))
    batches = [images(8, seed=s) for s in range(14)]
    for b in batches[:12]:
        trainer.train_step(b)
    state = {k: v for k, v in trainer.state_dict().items()}
    import copy

    state = copy.deepcopy(state)
    torch.manual_seed(123)
    uninterrupted = [trainer.train_step(b) for b in batches[12:]]
    resumed_model = build_tokenizer(cfg)
    resumed = TokenizerTrainer(resumed_model, cfg, torch.device("cpu"))
    resumed.load_state_dict(state)
    assert resumed.step == 12
    torch.manual_seed(123)
    again = [resumed.train_step(b) for b in batches[12:]]
    assert [m["loss"] for m in again] == [m["loss"] for m in uninterrupted]
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_align_lowers_the_sigmoid_loss():
    cfg = cfg_for("dual")
    captions = ["a red square", "a blue circle", "a green triangle", "a yellow diamond"] * 2
    x = images(8)

    def batches():
        while True:
            yield x, captions

    model, losses = align_vision_encoder(cfg.dual, 32, batches(), steps=30, lr=2e-3, log=None)
    assert losses[-1] < losses[0]
    assert type(model).__name__ == type(build_siglip(cfg.dual, 32)).__name__


def test_align_runs_on_a_corpus_smaller_than_one_batch(prepared, tmp_path):
    """The tiny world has 24 captioned images, fewer than an alignment batch of 32: the batches shrink
    to the corpus (with drop_last, full-size batches never came and alignment looped forever)."""
    import json
    import os

    from tessera import storage
    from tessera.jobs.train_tokenizer import ALIGN_BATCH, _align
    from tessera.manifest import dataset_files

    world, _ = prepared
    assert world.synth.num_image_text < ALIGN_BATCH
    cfg = load_config(None, [f"run.root={world.run.root}", "tokenizer.image_size=32", "tokenizer.preset=dual",
                             "tokenizer.dual.hidden_size=16", "tokenizer.dual.num_heads=2", "tokenizer.dual.align_steps=3"])
    files = dataset_files(storage.join(cfg.resolve(cfg.prepare.output), "samples"))
    vision = _align(cfg, files, str(tmp_path))
    assert os.path.exists(os.path.join(vision, "config.json"))
    losses = json.load(open(tmp_path / "align" / "losses.json"))
    assert len(losses) == 3


def test_a_local_encoder_gives_a_patch_one_code_wherever_it_is():
    """`encoder_norm: channel` + `encoder_padding: replicate`: a flat image is one code everywhere
    (nothing tells the border from the middle), and an object leaves the codes beyond the encoder's
    receptive field (40 px with two downsamplings) exactly as in the empty image. The image-wide
    GroupNorm and zero padding change both."""
    def encoder_features(local: bool, x):
        sets = ["tokenizer.vq.encoder_norm=channel", "tokenizer.vq.encoder_padding=replicate"] if local else []
        torch.manual_seed(0)
        vq = build_tokenizer(load_config(None, [*TINY, "tokenizer.image_size=128", *sets]).tokenizer).eval()
        with torch.no_grad():
            return vq.encoder(x), vq.encode(x)["pixel"][..., 0]

    empty = torch.full((1, 3, 128, 128), 0.3)
    scene = empty.clone()
    scene[:, :, 4:20, 4:20] = -0.8  # an object in the top-left corner
    far = (slice(None), slice(None), slice(16, None), slice(16, None))  # grid cells >= 64 px away
    z_empty, codes_empty = encoder_features(True, empty)
    z_scene, codes_scene = encoder_features(True, scene)
    assert torch.allclose(z_empty, z_empty[..., :1, :1].expand_as(z_empty), atol=1e-5)
    assert codes_empty.unique().numel() == 1
    assert torch.allclose(z_scene[far], z_empty[far], atol=1e-5)
    assert torch.equal(codes_scene[:, 16:, 16:], codes_empty[:, 16:, 16:])
    z_empty, _ = encoder_features(False, empty)
    z_scene, _ = encoder_features(False, scene)
    assert not torch.allclose(z_empty, z_empty[..., :1, :1].expand_as(z_empty), atol=1e-3), "zero padding marks the border"
    assert not torch.allclose(z_scene[far], z_empty[far], atol=1e-3), "GroupNorm spreads the object's statistics"
