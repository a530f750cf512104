"""How much do a visual tokenizer's codes say about the object? Two probes on the codes of
one-object scenes (3000 train / 300 held-out), per attribute:

    linear  a linear probe on the bag of codes (which codes occur, not where)
    conv    a small CNN over the code grid (code embeddings -> 3 x Conv3x3 -> max-pool): what the
            arrangement of codes around the object adds -- an upper bound of sorts for what the
            model's grid encoder (`model.grid_encoder`) can read from them

    python experiments/code_probe.py runs/demo/tokenizer [varied|plain]

Each figure is also given by the object's size: a small object (radius 0.22 of a cell, ~9 pixels
across a 64-pixel image) spans 2-3 codes of a 16x16 grid, a large one ~4.
"""

import sys

import numpy as np
import torch
from torch import nn

from tessera.pipelines import shapes
from tessera.tokenize.tokenizer import load_tokenizer

ATTRIBUTES = ("colour", "shape", "size")


def scene_codes(tok, image_size: int, seed: int, n: int, backgrounds: str):
    scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), 1, backgrounds) for i in range(n)]
    x = torch.from_numpy(np.stack([shapes.render_scene(s, image_size) for s in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        grids = torch.cat([tok.encode(b)["pixel"][..., 0] for b in x.split(256)]).long()  # (n, h, w)
    return scenes, grids


def linear_probe(K: int, grids: torch.Tensor, y: torch.Tensor, n_labels: int):
    bags = lambda g: torch.stack([torch.bincount(r.ravel(), minlength=K) for r in g]).float()
    probe = nn.Linear(K, n_labels)
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
    x = bags(grids)
    for _ in range(500):
        opt.zero_grad()
        nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    return lambda g: probe(bags(g))


def conv_probe(K: int, grids: torch.Tensor, y: torch.Tensor, n_labels: int, steps: int = 400):
    emb = nn.Embedding(K, 32)
    conv = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.GELU())
    head = nn.Linear(64, n_labels)
    f = lambda g: head(conv(emb(g).permute(0, 3, 1, 2)).amax((2, 3)))
    opt = torch.optim.AdamW([*emb.parameters(), *conv.parameters(), *head.parameters()], 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(grids), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(f(grids[idx]), y[idx]).backward()
        opt.step()
    return f


def main(tokenizer_dir: str, backgrounds: str = "varied") -> None:
    torch.set_num_threads(2)
    tok, tcfg, _ = load_tokenizer(tokenizer_dir)
    K = tcfg.vq.rvq.codebook_size
    train, g_train = scene_codes(tok, tcfg.image_size, 1, 3000, backgrounds)
    test, g_test = scene_codes(tok, tcfg.image_size, 2, 300, backgrounds)
    for attr in ATTRIBUTES:
        labels = sorted({getattr(s.objects[0], attr) for s in train})
        y = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in train])
        y_test = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in test])
        for name, fit in (("linear", linear_probe), ("conv", conv_probe)):
            torch.manual_seed(0)
            f = fit(K, g_train, y, len(labels))
            with torch.no_grad():
                hit = f(g_test).argmax(1) == y_test
            by_size = " ".join(f"{size} {float(hit[m].float().mean()):.3f}" for size in shapes.SIZES
                               if (m := torch.tensor([s.objects[0].size == size for s in test])).any())
            print(f"{attr:<7} {name:<6} probe on the codes, held-out accuracy {float(hit.float().mean()):.3f} "
                  f"(chance {1 / len(labels):.3f}; by object size: {by_size})")
    print(f"grid {tuple(g_train.shape[1:])}, codebook {K}")


if __name__ == "__main__":
    main(*sys.argv[1:])
