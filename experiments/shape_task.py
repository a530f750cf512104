"""Can a small LM read shape from a tokenizer's codes? One object per image, "What shape is in the
image?", real VQ codes, the project's sequences, packing, model (optionally with its grid encoder)
and stage trainer in process; held-out and training accuracy every 100 steps (the learning test's
set-up, asked shape instead of colour; chance 0.25).

    PYTHONPATH=. python experiments/shape_task.py --tokenizer runs/plain-grid/tokenizer --backgrounds plain [--grid-encoder 3]
    PYTHONPATH=. python experiments/shape_task.py --tokenizer runs/snap0/tokenizer --backgrounds plain --snap-grid 16
    PYTHONPATH=. python experiments/shape_task.py --tokenizer runs/snap0/tokenizer --backgrounds plain --snap-grid 16 --bpe runs/snap0/bpe

`--objects any` draws 1-3 objects and asks the demo's question about one of them, by its place.
`--bpe DIR` reads the images as that run's visual-BPE tiles (as the demo's LM does) instead of one token per code.
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


def shape_question(scene: shapes.Scene, index: int) -> tuple[str, str]:
    """(question, answer): one object alone -> QUESTION; in a scene of 1-3 -> the demo's own shape
    question about a random object ("What shape is at the top left?"), so the place must be found."""
    if len(scene.objects) == 1 and index < 0:
        return QUESTION, scene.objects[0].shape
    obj = scene.objects[np.random.default_rng(index).integers(len(scene.objects))]
    q = next(q for q in shapes.object_questions(scene, obj) if q["type"] == "shape")
    return q["question"], q["answer"]


def shape_rows(tok, text, image_size: int, seed: int, n: int, backgrounds: str, snap_grid: int = 0,
               objects: int | None = 1) -> list[dict]:
    """`objects` 1: one object, QUESTION; None: 1-3 objects, the place-named question."""
    scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), objects, backgrounds, snap_grid) for i in range(n)]
    x = torch.from_numpy(np.stack([shapes.render_scene(s, image_size) for s in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        codes = torch.cat([tok.encode(b)["pixel"] for b in x.split(256)]).numpy()  # (n, h, w, D)
    rows = []
    for i, (s, g) in enumerate(zip(scenes, codes)):
        q, a = encode_segments(text, list(shape_question(s, -1 if objects == 1 else seed * n + i)))
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
    ap.add_argument("--objects", default="1", choices=["1", "any"],
                    help="any: 1-3 objects and the demo's question naming a place ('What shape is at the top left?')")
    ap.add_argument("--set", action="append", default=[], help="model overrides, e.g. model.hidden_size=128")
    ap.add_argument("--bpe", default="", help="a fit-bpe output directory: read images as its tiles")
    ap.add_argument("--grid-encoder", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok, tcfg, _ = load_tokenizer(a.tokenizer)
    objects = 1 if a.objects == "1" else None
    places = [f"What shape is at the {p}?" for p in shapes.POSITIONS] + ["What shape is in the center?"]
    text = train_text_tokenizer([" " + t for t in [QUESTION, *places, *shapes.SHAPES] * 10], 300, tempfile.mkdtemp())
    train = shape_rows(tok, text, tcfg.image_size, 1, 3000, a.backgrounds, a.snap_grid, objects)
    held = shape_rows(tok, text, tcfg.image_size, 2, 96, a.backgrounds, a.snap_grid, objects)
    K = tcfg.vq.rvq.codebook_size
    bpe = VisualBPE.load(a.bpe) if a.bpe else VisualBPE(K, [])  # without --bpe: raw codes, one token per cell
    vocab = Vocabulary(len(text), text.bos_token_id, text.eos_token_id, text.pad_token_id, "bpe", bpe.vocab_size,
                       max_grid=16, time_tokens=4)
    builder = SequenceBuilder(vocab, bpe)
    mc = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.intermediate_size=128", "model.max_grid=16", "model.time_tokens=4",
                            f"model.grid_encoder.layers={a.grid_encoder}", *a.set]).model
    torch.manual_seed(0)
    model = TesseraModel.create(mc, vocab, seed=0, tile_codes=GridEncoder.tiles_from_bpe(bpe, K) if a.grid_encoder else None)
    train_and_probe(model, builder, train, held, a.steps, a.batch, 0.003, every=100)

if __name__ == "__main__":
    main()
