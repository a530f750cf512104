"""The learning test's task at experiment size: one shape per image, "What colour is the
<shape>?", real VQ codes from a trained tokenizer, the project's sequences, packing, model and
stage trainer in process; held-out accuracy every 50 steps (see tests/model/test_learning.py).

    PYTHONPATH=. python experiments/colour_task.py --tokenizer runs/demo/tokenizer --scenes 5000 --steps 300 --batch 32
"""

import argparse
import tempfile
import time

import numpy as np
import torch

from tessera.bpe.model import VisualBPE
from tessera.config import load_config
from tessera.model.packing import collate, pack
from tessera.model.sequence import SequenceBuilder
from tessera.model.trainer import StageTrainer
from tessera.model.unified import TesseraModel
from tessera.model.vocab import Vocabulary
from tessera.pipelines import shapes
from tessera.tokenize.text import train_text_tokenizer
from tessera.tokenize.tokenizer import load_tokenizer
from tests.model.test_learning import accuracy, scenes, token_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--scenes", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--positions", default="2d", choices=["1d", "2d"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer, tcfg, _ = load_tokenizer(a.tokenizer)
    texts = [f"What colour is the {s}?" for s in shapes.SHAPES] + list(shapes.COLOURS)
    text = train_text_tokenizer([" " + t for t in texts * 10], 300, tempfile.mkdtemp())
    import tests.model.test_learning as learning

    learning.RESOLUTION = tcfg.image_size
    train, held = token_rows(tokenizer, text, scenes(1, a.scenes)), token_rows(tokenizer, text, scenes(2, 96))
    K = tcfg.vq.rvq.codebook_size
    vocab = Vocabulary(len(text), text.bos_token_id, text.eos_token_id, text.pad_token_id, "bpe", K, max_grid=16, time_tokens=4)
    builder = SequenceBuilder(vocab, VisualBPE(K, []))
    mc = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.intermediate_size=128", "model.max_grid=16", "model.time_tokens=4",
                            f"model.visual_positions={a.positions}"]).model
    torch.manual_seed(0)
    model = TesseraModel.create(mc, vocab, seed=0)
    train_and_probe(model, builder, train, held, a.steps, a.batch, a.lr, every=50)


def train_and_probe(model, builder, train: list, held: list, steps: int, batch: int, lr: float, every: int) -> None:
    """One all-parameter stage on random batches of `train`'s rows (answers loss), printing held-out
    and training accuracy (greedy, exact match) every `every` steps."""
    stage = load_config(None, ["train.stages=[{name: all, steps: %d, lr: %g, warmup_steps: 10}]" % (steps, lr)]).train.stages[0]
    trainer = StageTrainer(model, stage, 0.01, 1.0, torch.device("cpu"))
    seqs = [builder.build(r, "answers") for r in train]
    rng, t0 = np.random.default_rng(0), time.time()
    for step in range(1, steps + 1):
        rows, _ = pack([seqs[i] for i in rng.choice(len(seqs), batch, replace=False)], 512, builder.vocab.pad_id)
        m = trainer.train_step([collate(rows)])
        if step % every == 0:
            model.eval()
            print(f"step {step} loss {float(m['loss']):.3f} held-out {accuracy(model, builder, held):.3f} "
                  f"train {accuracy(model, builder, train[:96]):.3f} ({time.time() - t0:.0f} s)", flush=True)
            model.train()


if __name__ == "__main__":
    main()
