"""Can a small LM read shape from a tokenizer's codes? One object per image, "What shape is in the
image?", real VQ codes, the project's sequences, packing, model (optionally with its grid encoder)
and stage trainer in process; held-out and training accuracy every 100 steps (the learning test's
set-up, asked shape instead of colour; chance 0.25).

    PYTHONPATH=. python experiments/shape_task.py --tokenizer runs/plain-grid/tokenizer --backgrounds plain [--grid-encoder 3]
    PYTHONPATH=. python experiments/shape_task.py --tokenizer runs/snap0/tokenizer --backgrounds plain --snap-grid 16
"""

import argparse
import json
import tempfile

import numpy as np
import torch

from tessera.bpe.model import VisualBPE
from tessera.config import load_config
from tessera.model.grid_encoder import GridEncoder
from tessera.model.sequence import SequenceBuilder
from tessera.model.unified import TesseraModel
from tessera.model.vocab import Vocabulary
from tessera.pipelines import shapes
from tessera.tokenize.text import encode_segments, train_text_tokenizer
from tessera.tokenize.tokenizer import load_tokenizer
from experiments.colour_task import train_and_probe

QUESTION = "What shape is in the image?"


def shape_rows(tok, text, image_size: int, seed: int, n: int, backgrounds: str, snap_grid: int = 0) -> list[dict]:
    scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), 1, backgrounds, snap_grid) for i in range(n)]
    x = torch.from_numpy(np.stack([shapes.render_scene(s, image_size) for s in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        codes = torch.cat([tok.encode(b)["pixel"] for b in x.split(256)]).numpy()  # (n, h, w, D)
    rows = []
    for i, (s, g) in enumerate(zip(scenes, codes)):
        q, a = encode_segments(text, [QUESTION, s.objects[0].shape])
        rows.append({"sample_id": f"s{i}", "kind": "web", "is_image": [True, False, False], "text_ids": [[], q, a],
                     "pixel_codes": [g.reshape(-1).tolist(), [], []], "semantic_codes": [[], [], []],
                     "grid_shapes": [list(g.shape), [], []], "timestamps": None,
                     "meta": json.dumps({"roles": [None, "user", "assistant"]}), "answer": a})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--backgrounds", default="varied", choices=list(shapes.BACKGROUNDS))
    ap.add_argument("--snap-grid", type=int, default=0, help="objects move by whole blocks of this lattice")
    ap.add_argument("--grid-encoder", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok, tcfg, _ = load_tokenizer(a.tokenizer)
    text = train_text_tokenizer([" " + t for t in [QUESTION, *shapes.SHAPES] * 10], 300, tempfile.mkdtemp())
    train = shape_rows(tok, text, tcfg.image_size, 1, 3000, a.backgrounds, a.snap_grid)
    held = shape_rows(tok, text, tcfg.image_size, 2, 96, a.backgrounds, a.snap_grid)
    K = tcfg.vq.rvq.codebook_size
    vocab = Vocabulary(len(text), text.bos_token_id, text.eos_token_id, text.pad_token_id, "bpe", K, max_grid=16, time_tokens=4)
    bpe = VisualBPE(K, [])  # raw codes, one token per cell
    builder = SequenceBuilder(vocab, bpe)
    mc = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.intermediate_size=128", "model.max_grid=16", "model.time_tokens=4",
                            f"model.grid_encoder.layers={a.grid_encoder}"]).model
    torch.manual_seed(0)
    model = TesseraModel.create(mc, vocab, seed=0, tile_codes=GridEncoder.tiles_from_bpe(bpe, K) if a.grid_encoder else None)
    train_and_probe(model, builder, train, held, a.steps, a.batch, 0.003, every=100)

if __name__ == "__main__":
    main()
