"""GPU-ready code, checked on a CUDA device: the model's stage trainer and the visual tokenizer's trainer
train under bf16 autocast, a CUDA step agrees with the CPU's fp32 step, the trainer's state dict
resumes on the device, and generation runs there. Skipped where there is no CUDA (CI has none); run
on a GPU machine with `python -m pytest -q tests/test_gpu.py`.
"""

import copy

import numpy as np
import pytest
import torch

from tessera.config import StageConfig
from tessera.model.generate import generate_image, generate_text, text_log_prob
from tessera.model.trainer import StageTrainer
from tests.model.test_model import GRID, batch_of, bpe, builder_for, make_model, token_row  # noqa: F401  (bpe is a fixture)
from tests.tokenize.test_tokenizers import cfg_for, images

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def stage(steps=30, lr=1e-2, image_loss_weight=None):
    return StageConfig(name="s", steps=steps, trainable="all", lr=lr, warmup_steps=1, image_loss_weight=image_loss_weight)


@pytest.mark.parametrize("image_loss_weight", [None, 3.0])
def test_a_cuda_step_under_bf16_agrees_with_the_cpu_step_and_training_learns(bpe, image_loss_weight):
    """The same model and batch: the first CUDA step's loss (bf16 autocast) is the CPU's fp32 loss to
    bf16's precision; the weights stay fp32; 30 steps on one batch bring the loss below half."""
    torch.manual_seed(0)
    cpu_model = make_model("bpe", bpe, mot=True)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    _, batch, _ = batch_of(cpu_model, bpe, n=4)
    on_cpu = StageTrainer(cpu_model, stage(image_loss_weight=image_loss_weight), 0.1, 1.0, torch.device("cpu"))
    on_cuda = StageTrainer(cuda_model, stage(image_loss_weight=image_loss_weight), 0.1, 1.0, CUDA)
    first_cpu, first_cuda = on_cpu.train_step([batch]), on_cuda.train_step([batch])
    assert float(first_cuda["loss"]) == pytest.approx(float(first_cpu["loss"]), rel=2e-2)
    assert float(first_cuda["image_loss"]) == pytest.approx(float(first_cpu["image_loss"]), rel=2e-2)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in cuda_model.parameters())
    losses = [float(on_cuda.train_step([batch])["loss"]) for _ in range(29)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * float(first_cuda["loss"]), losses


def test_the_stage_trainer_state_dict_resumes_on_cuda(bpe):
    """Save after 2 CUDA steps, load into a differently initialised model on CUDA: the next step
    gives the same loss and weights as the uninterrupted trainer, to the order of CUDA's float atomics
    (a model that kept its own init, or an optimizer that lost its moments, misses by ~1e-2)."""
    torch.manual_seed(0)
    a = make_model("bpe", bpe, mot=True).to(CUDA)
    ta = StageTrainer(a, stage(), 0.1, 1.0, CUDA)
    _, batch, _ = batch_of(a, bpe)
    for _ in range(2):
        ta.train_step([batch])
    state = ta.state_dict()
    assert all(v.device.type == "cpu" for v in state["model"].values()), "a checkpoint holds CPU tensors"
    b = make_model("bpe", bpe, mot=True, seed=5).to(CUDA)
    tb = StageTrainer(b, ta.stage, 0.1, 1.0, CUDA)
    tb.load_state_dict(state)
    ma, mb = ta.train_step([batch]), tb.train_step([batch])
    assert tb.step == ta.step == 3
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-4)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=n)


def test_generation_and_likelihood_run_on_cuda(bpe):
    """Text and image generation with the KV cache on CUDA under bf16 autocast give valid ids and a
    full grid, and the caption likelihood the best-of-n chooser uses matches the CPU's."""
    torch.manual_seed(0)
    cpu_model = make_model("bpe", bpe, mot=True).eval()
    cuda_model = copy.deepcopy(cpu_model).to(CUDA).eval()
    prefix = builder_for(cpu_model, bpe).image_prefix(token_row("g", n_images=1, rng=np.random.default_rng(0)))
    vocab = cuda_model.vocab
    ids = generate_text(cuda_model, prefix.ids, prefix.codes, max_new_tokens=12, prompt_cells=prefix.cells,
                        temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert 0 < len(ids) <= 12 and all(3 <= i < vocab.text_size for i in ids)
    grid = generate_image(cuda_model, [vocab.bos_id, 5, 6, 7], GRID, bpe=bpe, cfg_scale=3.0, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert grid.shape == GRID and grid.min() >= 0 and grid.max() < bpe.codebook_size
    caption = [5, 6, 7, 8]
    on_cpu = text_log_prob(cpu_model, prefix.ids, caption, prefix.codes, prefix.cells)
    on_cuda = text_log_prob(cuda_model, prefix.ids, caption, prefix.codes, prefix.cells)
    assert np.isfinite(on_cuda) and on_cuda == pytest.approx(on_cpu, rel=2e-2)


def test_the_visual_tokenizer_trains_on_cuda_under_bf16():
    """The VQ tokenizer's trainer (L1 + LPIPS + the GAN after disc_start) on CUDA: the reconstruction
    loss falls as it does on the CPU (test_tokenizers), the codes come back as int64 on the device."""
    from tessera.tokenize.tokenizer import build_tokenizer
    from tessera.tokenize.trainer import TokenizerTrainer

    torch.manual_seed(0)
    cfg = cfg_for("vq")
    model = build_tokenizer(cfg).to(CUDA)
    trainer = TokenizerTrainer(model, cfg, CUDA)
    x = images(8).to(CUDA)
    losses = [trainer.train_step(x) for _ in range(40)]
    assert "loss_gan" in losses[-1] and np.isfinite(losses[-1]["loss"])
    assert losses[-1]["loss_l1"] < 0.7 * losses[0]["loss_l1"], (losses[0]["loss_l1"], losses[-1]["loss_l1"])
    codes = model.eval().encode(x)["pixel"]
    assert codes.device.type == "cuda" and codes.dtype == torch.int64 and codes.shape == (8, 8, 8, 1)


@pytest.mark.parametrize("init", ["mean", "he"])
def test_vocabulary_growth_on_cuda_draws_the_cpus_rows(init):
    """`extend_vocabulary` on a model already on CUDA: the new rows are the ones the CPU draws from
    the same seed (drawn on the CPU), the old rows unchanged, every weight left on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tessera.model.unified import extend_vocabulary

    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    on_cpu = Qwen2ForCausalLM(cfg)
    on_cuda = copy.deepcopy(on_cpu).to(CUDA)
    for lm in (on_cpu, on_cuda):
        assert extend_vocabulary(lm, 80, init, noise=0.02, seed=3) == 50
    for get in ("get_input_embeddings", "get_output_embeddings"):
        a, b = getattr(on_cpu, get)().weight, getattr(on_cuda, get)().weight
        assert b.device.type == "cuda" and b.shape == (80, 32)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
