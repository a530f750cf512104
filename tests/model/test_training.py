"""Stage training without Ray: trainable modes, schedules, mixtures, exact state round trip."""

import numpy as np
import pytest
import torch

from tessera.config import StageConfig, TrainableLayers
from tessera.model.mixture import SampleIndex, stage_plan
from tessera.model.trainer import StageTrainer, lr_lambda
from tests.model.test_model import batch_of, bpe, make_model  # noqa: F401  (bpe is a fixture)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_steps(model, bpe, trainable, steps=2):
    stage = StageConfig(name="s", steps=steps, trainable=trainable, lr=1e-2, warmup_steps=1)
    trainer = StageTrainer(model, stage, weight_decay=0.1, grad_clip=1.0, device=torch.device("cpu"))
    for _ in range(steps):
        _, batch, _ = batch_of(model, bpe)
        trainer.train_step([batch])
    return trainer


@pytest.mark.parametrize("trainable", ["embeddings", TrainableLayers([1]), "all"])
@pytest.mark.parametrize("interface", ["bpe", "rvq"])
def test_trainable_mode_changes_exactly_its_parameters(trainable, interface, bpe):
    model = make_model(interface, bpe)
    before = snapshot(model)
    run_steps(model, bpe, trainable)
    after = snapshot(model)
    old = model.vocab.text_size
    embeddings = ("lm.model.embed_tokens.weight", "lm.lm_head.weight")
    for name, b in before.items():
        a = after[name]
        interface_part = name.startswith(("code_embed.", "depth_heads.", "grid_rows.", "grid_cols."))
        if trainable == "all":
            assert not torch.equal(a, b), f"{name} did not train in mode all"
        elif name in embeddings:
            assert not torch.equal(a[old:], b[old:]), f"new rows of {name} did not train"
            if trainable == "embeddings":
                assert torch.equal(a[:old], b[:old]), f"old rows of {name} changed in mode embeddings"
        elif interface_part:
            assert not torch.equal(a, b), f"{name} (rvq interface) did not train"
        elif isinstance(trainable, TrainableLayers) and name.startswith("lm.model.layers.1."):
            assert not torch.equal(a, b), f"{name} did not train"
        else:
            assert torch.equal(a, b), f"{name} changed but mode {trainable} does not name it"


def test_new_mode_trains_new_rows_and_visual_experts_only(bpe):
    model = make_model("bpe", bpe, mot=True)
    before = snapshot(model)
    run_steps(model, bpe, "new")
    after = snapshot(model)
    old = model.vocab.text_size
    for name, b in before.items():
        if ".visual_" in name or name.startswith(("grid_rows.", "grid_cols.")):  # MoT experts, 2-D positions
            assert not torch.equal(after[name], b), name
        elif name in ("lm.model.embed_tokens.weight", "lm.lm_head.weight"):
            assert torch.equal(after[name][:old], b[:old]) and not torch.equal(after[name][old:], b[old:])
        else:
            assert torch.equal(after[name], b), name


def test_unknown_layer_is_refused(bpe):
    with pytest.raises(ValueError, match="do not exist"):
        run_steps(make_model("bpe", bpe), bpe, TrainableLayers([7]))


def test_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda(warmup=5, total=50, min_ratio=0.1)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1.0) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(5, 60))


def test_state_dict_round_trip_continues_identically(bpe):
    torch.manual_seed(0)
    a = make_model("bpe", bpe, mot=True)
    ta = run_steps(a, bpe, "all", steps=2)
    state = ta.state_dict()
    b = make_model("bpe", bpe, mot=True, seed=5)  # different init: everything must come from the state
    tb = StageTrainer(b, ta.stage, 0.1, 1.0, torch.device("cpu"))
    tb.load_state_dict(state)
    _, batch, _ = batch_of(a, bpe)
    ma, mb = ta.train_step([batch]), tb.train_step([batch])
    assert float(ma["loss"]) == float(mb["loss"]) and tb.step == ta.step == 3
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def record_gradients(trainer: StageTrainer, grads: dict, name: str) -> None:
    """Keep a copy of every trainable parameter's gradient in `grads[name]` as the optimizer steps."""
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        grads[name] = [None if p.grad is None else p.grad.clone() for p in trainer.params]
        return step(*args, **kwargs)
    trainer.optimizer.step = record


@pytest.mark.parametrize("image_loss_weight", [None, 2.0])
def test_gradient_accumulation_matches_one_big_batch(bpe, image_loss_weight):
    """Accumulation decides the gradient; compare it before the optimizer step. (Adam's first step is
    about lr * sign(grad), so a parameter whose gradient is ~0 can flip sign on float noise: comparing
    parameters after the step fails on one element in a thousand on some CPUs.) With an image loss
    weight each modality's mean is over the whole step's targets, so the halves still equal the whole."""
    a, b = make_model("bpe", bpe), make_model("bpe", bpe)
    stage = StageConfig(name="s", steps=3, trainable="all", lr=1e-2, warmup_steps=1, image_loss_weight=image_loss_weight)
    ta = StageTrainer(a, stage, 0.0, 0.0, torch.device("cpu"))
    tb = StageTrainer(b, stage, 0.0, 0.0, torch.device("cpu"))
    grads = {}
    record_gradients(ta, grads, "whole")
    record_gradients(tb, grads, "halves")
    _, b1, _ = batch_of(a, bpe, n=2, seq_len=96, packed=False)
    whole = ta.train_step([b1])
    halves = tb.train_step([{k: v[:1] for k, v in b1.items()}, {k: v[1:] for k, v in b1.items()}])
    assert float(whole["loss"]) == pytest.approx(float(halves["loss"]), rel=1e-5)
    assert len(grads["whole"]) == len(grads["halves"]) > 0
    assert sum(g is not None for g in grads["whole"]) > 0
    for g, h in zip(grads["whole"], grads["halves"]):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("interface", ["bpe", "rvq"])
def test_image_loss_weight_adds_the_two_modalities_means(interface, bpe):
    """`image_loss_weight: w` trains on mean(text targets) + w * mean(image targets): its gradient is
    the text-only loss's plus w times the image-only loss's (each the model's own `loss` with the other
    modality's labels ignored), where the default weighs every target alike."""
    model = make_model(interface, bpe)
    _, batch, _ = batch_of(model, bpe, n=2, seq_len=96, packed=False)
    labels = batch["labels"]
    is_image = labels >= model.vocab.text_size
    assert is_image.any() and ((labels != -100) & ~is_image).any(), "the batch must hold both modalities"

    def gradient(labels):
        model.zero_grad(set_to_none=True)
        model(**{**batch, "labels": labels}).loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    text_only = gradient(labels.masked_fill(is_image, -100))
    image_only = gradient(labels.masked_fill(~is_image, -100))
    model.zero_grad(set_to_none=True)

    stage = StageConfig(name="s", steps=1, trainable="all", lr=1e-2, warmup_steps=1, image_loss_weight=3.0)
    trainer, grads = StageTrainer(model, stage, 0.0, 0.0, torch.device("cpu")), {}
    assert trainer.params == list(model.parameters())
    record_gradients(trainer, grads, "weighted")
    trainer.train_step([batch])
    for g, t, i in zip(grads["weighted"], text_only, image_only):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(t), t + 3.0 * i, atol=1e-6, rtol=1e-4)


def test_mixture_proportions_and_curriculum_order():
    rng = np.random.default_rng(0)
    n = 300
    kinds = rng.choice(["image_text", "video", "web"], size=n, p=[0.6, 0.1, 0.3])
    diff = rng.choice(["easy", "medium", "hard"], size=n)
    index = SampleIndex([f"s{i:04d}" for i in range(n)], ["f"] * n, list(range(n)),
                        [frozenset({f"kind={k}", f"difficulty={d}"}) for k, d in zip(kinds, diff)], np.full(n, 20), np.ones(n, np.int64), 72.0)
    weights = {"kind=image_text": 0.5, "kind=video": 0.3, "kind=web": 0.2}
    plan = stage_plan(index, weights, 4000, seed=1, stage=0)
    got = {k: np.mean([f"kind={k}" in index.tags[s] for s, _ in plan]) for k in ("image_text", "video", "web")}
    assert got == pytest.approx({"image_text": 0.5, "video": 0.3, "web": 0.2}, abs=0.03)
    # video has ~30 samples drawn ~1200 times: every sample of the bucket comes once per epoch
    video = [(s, e) for s, e in plan if "kind=video" in index.tags[s]]
    first_epoch = [s for s, e in video if e == 0]
    assert len(first_epoch) == len(set(first_epoch)) == int((kinds == "video").sum())
    assert stage_plan(index, weights, 4000, seed=1, stage=0) == plan
    assert stage_plan(index, weights, 4000, seed=1, stage=1) != plan
    ordered = stage_plan(index, weights, 600, seed=1, stage=0, order="curriculum")
    ranks = [index.difficulty(s) for s, _ in ordered]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 2
    with pytest.raises(ValueError, match="match no sample"):
        stage_plan(index, {"task=vqa": 1.0}, 10, seed=1, stage=0)
