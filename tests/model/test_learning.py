"""Does the whole system learn to see? A miniature world where it must: one shape per image,
asked its colour. Real visual tokens (a vq tokenizer trained here by the project's
`TokenizerTrainer`, 16x16 codes of 64-pixel images as in the demo: coarser codes lose the
colour of small shapes), a real byte-level BPE text tokenizer, the project's sequence builder,
packing, model and stage trainer, in process (no Ray). Held-out accuracy must beat, by a wide margin, what any model
that ignores the image can reach (the best constant answer), and the same model with the image
tokens swapped for another image's must fall back to that level."""

import json

import numpy as np
import pytest
import torch

from tessera.bpe.model import VisualBPE
from tessera.config import load_config
from tessera.model.generate import generate_text
from tessera.model.packing import collate, pack
from tessera.model.sequence import SequenceBuilder
from tessera.model.trainer import StageTrainer
from tessera.model.unified import TesseraModel
from tessera.model.vocab import Vocabulary
from tessera.pipelines import shapes
from tessera.tokenize.text import encode_segments, train_text_tokenizer
from tessera.tokenize.tokenizer import build_tokenizer
from tessera.tokenize.trainer import TokenizerTrainer

STEPS, BATCH = 200, 32
SEQ_LEN = 288  # one ~275-token sequence a row: a 512 row would hold one and ~47 % padding
RESOLUTION = 64


def scenes(seed: int, n: int) -> list:
    return [shapes.sample_scene(np.random.default_rng([seed, i]), num_objects=1) for i in range(n)]


def pixels(scene_list) -> torch.Tensor:
    imgs = np.stack([shapes.render_scene(s, RESOLUTION) for s in scene_list])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_visual_tokenizer(steps: int = 300):
    cfg = load_config(None, [f"tokenizer.image_size={RESOLUTION}", "tokenizer.vq.channels=16", "tokenizer.vq.num_down=2",
                             "tokenizer.vq.rvq.codebook_size=128", "tokenizer.vq.rvq.decay=0.95",  # as the demo: codes keep colour
                             "tokenizer.losses.lpips_weight=0.0",
                             "tokenizer.train.warmup_steps=5"]).tokenizer
    torch.manual_seed(0)
    model = build_tokenizer(cfg)
    trainer = TokenizerTrainer(model, cfg, torch.device("cpu"))
    x = pixels([shapes.sample_scene(np.random.default_rng([7, i])) for i in range(1000)])
    for step in range(steps):
        trainer.train_step(x[torch.randint(len(x), (16,), generator=torch.Generator().manual_seed(step))])
    return model.eval(), cfg


def token_rows(tokenizer, text, scene_list):
    with torch.no_grad():
        codes = torch.cat([tokenizer.encode(x)["pixel"] for x in pixels(scene_list).split(256)]).numpy()  # (N, h, w, D)
    rows = []
    for i, (s, g) in enumerate(zip(scene_list, codes)):
        obj = s.objects[0]
        q, a = encode_segments(text, [f"What colour is the {obj.shape}?", obj.colour])
        rows.append({"sample_id": f"s{i}", "kind": "web", "is_image": [True, False, False], "text_ids": [[], q, a],
                     "pixel_codes": [g.reshape(-1).tolist(), [], []], "semantic_codes": [[], [], []],
                     "grid_shapes": [list(g.shape), [], []], "timestamps": None,
                     "meta": json.dumps({"roles": [None, "user", "assistant"]}), "answer": a, "colour": obj.colour})
    return rows


def accuracy(model, builder, rows, image_from=None) -> float:
    """Greedy answers; `image_from`: a row whose image replaces every row's image (the ablation)."""
    hits = []
    for r in rows:
        shown = {**r, "pixel_codes": [image_from["pixel_codes"][0], [], []]} if image_from else r
        prompt = builder.extend_text(builder.image_prefix(shown), r["text_ids"][1])
        out = generate_text(model, prompt.ids, None, max_new_tokens=len(r["answer"]) + 1, prompt_cells=prompt.cells)
        hits.append(out == r["answer"])
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    torch.set_num_threads(2)
    tokenizer, tcfg = train_visual_tokenizer()
    texts = [f"What colour is the {s}?" for s in shapes.SHAPES] + list(shapes.COLOURS)
    text = train_text_tokenizer([" " + t for t in texts * 10], 300, str(tmp_path_factory.mktemp("text")))
    train = token_rows(tokenizer, text, scenes(1, 3000))
    heldout = token_rows(tokenizer, text, scenes(2, 96))
    K = tcfg.vq.rvq.codebook_size
    vocab = Vocabulary(len(text), text.bos_token_id, text.eos_token_id, text.pad_token_id, "bpe", K, max_grid=16, time_tokens=4)
    builder = SequenceBuilder(vocab, VisualBPE(K, []))  # raw VQ codes, one token per cell
    mc = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.intermediate_size=128", "model.max_grid=16", "model.time_tokens=4"]).model
    torch.manual_seed(0)
    model = TesseraModel.create(mc, vocab, seed=0)
    stage = load_config(None, ["train.stages=[{name: all, steps: %d, lr: 0.003, warmup_steps: 10, min_lr_ratio: 0.1}]" % STEPS]).train.stages[0]
    trainer = StageTrainer(model, stage, 0.01, 1.0, torch.device("cpu"))
    seqs = [builder.build(r, "answers") for r in train]
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        rows, stats = pack([seqs[i] for i in rng.choice(len(seqs), BATCH, replace=False)], SEQ_LEN, vocab.pad_id)
        assert stats["truncated"] == 0
        trainer.train_step([collate(rows)])
    model.eval()
    counts = {c: sum(r["colour"] == c for r in heldout) for c in shapes.COLOURS}
    return model, builder, train, heldout, max(counts.values()) / len(heldout)


def test_the_model_learns_the_colour_of_the_shape_it_sees(learned):
    model, builder, _, heldout, best_constant = learned
    acc = accuracy(model, builder, heldout)
    chance = 1 / len(shapes.COLOURS)
    print(f"held-out colour accuracy {acc:.3f} (uniform chance {chance:.3f}, best constant answer {best_constant:.3f})")
    assert acc >= max(0.6, best_constant + 0.3), f"held-out accuracy {acc:.3f} vs best image-blind {best_constant:.3f}"


def test_without_its_image_the_model_falls_to_chance(learned):
    model, builder, train, heldout, best_constant = learned
    ablated = np.mean([accuracy(model, builder, heldout, image_from=train[k]) for k in range(3)])
    print(f"image-ablated accuracy {ablated:.3f} (best constant answer {best_constant:.3f})")
    assert ablated <= best_constant + 0.1, f"{ablated:.3f}: the answers do not depend on the image"
