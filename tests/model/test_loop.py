"""The Ray-free training loops own their state: a loop built afresh and given a saved loop's
`state_dict` and `position_state_dict` takes exactly the steps the saved one would have taken next,
on the same rows (what the Ray Train worker relies on when it restores a checkpoint)."""

import copy

import torch

from tessera.config import StageConfig, load_config
from tessera.model.loop import StageLoop
from tessera.model.packing import pack
from tessera.model.stream import RowStream
from tessera.model.trainer import StageTrainer
from tessera.tokenize.tokenizer import build_tokenizer
from tessera.tokenize.trainer import ImageStream, TokenizerLoop, TokenizerTrainer
from tests.model.test_model import bpe, builder_for, make_model, token_row  # noqa: F401  (bpe is a fixture)
from tests.tokenize.test_tokenizers import TINY as TINY_TOKENIZER
from tests.tokenize.test_tokenizers import images


def row_source(model, bpe, groups=6, per_group=4, seq_len=96):
    """Packed rows with their data position columns, as `tessera.model.rows.pack_groups` emits them (one rank)."""
    builder = builder_for(model, bpe)
    rows = []
    for g in range(groups):
        seqs = [builder.build(token_row(f"g{g}s{i}", n_images=1 + i % 2), "all") for i in range(per_group)]
        packed, _ = pack(seqs, seq_len, model.vocab.pad_id)
        rows += [{"group": torch.tensor(g), "row": torch.tensor(r), "rows_in_group": torch.tensor(len(packed)),
                  **{k: torch.as_tensor(v) for k, v in p.items()}} for r, p in enumerate(packed)]
    return lambda: ({k: v.unsqueeze(0) for k, v in r.items()} for r in rows)


def stage_loop(seed, bpe, source, steps=6):
    torch.manual_seed(seed)
    model = make_model("bpe", bpe, False, seed)
    stage = StageConfig(name="s", steps=steps, trainable="all", lr=1e-2, warmup_steps=1, batch_size=2)
    trainer = StageTrainer(model, stage, weight_decay=0.1, grad_clip=1.0, device=torch.device("cpu"))
    return StageLoop(trainer, RowStream(source, 2, 0, 1, "s"), steps, log_every=1, checkpoint_every=3)


def test_stage_loop_resumed_from_its_state_dicts_takes_the_same_steps(bpe):
    source = row_source(make_model("bpe", bpe), bpe)
    losses = {}
    for step in stage_loop(0, bpe, source):
        losses[step.step] = step.metrics["loss"]
        assert step.checkpoint == (step.step in (3, 6))
    whole = stage_loop(0, bpe, source)
    it = iter(whole)
    for _ in range(3):
        next(it)
    saved = copy.deepcopy(whole.state_dict()), whole.position_state_dict()
    assert saved[1]["next"][0] >= 1, "three steps of two rows each reach past the first group"
    resumed = stage_loop(1, bpe, source)  # other initial weights and RNG: everything must come from the state
    resumed.load_state_dict(*saved)
    again = {s.step: s.metrics["loss"] for s in resumed}
    assert list(again) == [4, 5, 6]
    assert all(again[k] == losses[k] for k in again), (again, losses)


def tokenizer_loop(seed, batches, steps=7):
    torch.manual_seed(seed)
    cfg = load_config(None, ["tokenizer.preset=vq", *TINY_TOKENIZER]).tokenizer
    trainer = TokenizerTrainer(build_tokenizer(cfg), cfg, torch.device("cpu"))
    return TokenizerLoop(trainer, ImageStream(lambda epoch: iter(batches)), steps, log_every=1, checkpoint_every=4,
                         images_per_step=2)


def test_tokenizer_loop_resumes_weights_and_data_position_across_epochs():
    x = images(6)
    batches = [x[0:2], x[2:4], x[4:6]]  # three batches an epoch: step 4 is epoch 1's first batch
    losses = {s.step: s.metrics["loss"] for s in tokenizer_loop(0, batches)}
    assert list(losses) == list(range(1, 8))
    whole = tokenizer_loop(0, batches)
    it = iter(whole)
    for _ in range(4):
        next(it)
    saved = copy.deepcopy(whole.state_dict()), whole.position_state_dict()
    assert saved[1] == {"next": [1, 1]}
    resumed = tokenizer_loop(1, batches)
    resumed.load_state_dict(*saved)
    again = {s.step: s.metrics["loss"] for s in resumed}
    assert list(again) == [5, 6, 7] and all(again[k] == losses[k] for k in again), (again, losses)
    skipped = ImageStream(lambda epoch: iter(batches))
    skipped.load_state_dict({"next": [1, 2]})
    assert torch.equal(next(iter(skipped)), batches[2])


def test_a_checkpoint_from_before_dcp_still_resumes(bpe, tmp_path):
    """Runs started by an older Tessera wrote rank 0's whole `state.pt`; after an upgrade they resume from it."""
    from tessera.model.trainer import load_trained_weights

    source = row_source(make_model("bpe", bpe), bpe)
    whole = stage_loop(0, bpe, source)
    it = iter(whole)
    for _ in range(3):
        next(it)
    torch.save(whole.state_dict(), tmp_path / "state.pt")  # the old layout
    position = whole.position_state_dict()
    expected = next(it).metrics["loss"]
    resumed = stage_loop(1, bpe, source)
    resumed.trainer.load(str(tmp_path))
    resumed.stream.load_state_dict(position)
    step = next(iter(resumed))
    assert step.step == 4 and step.metrics["loss"] == expected
    model = make_model("bpe", bpe, False, 9)
    load_trained_weights(model, str(tmp_path))
    saved = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
