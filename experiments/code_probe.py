"""How much do a visual tokenizer's codes say about the object? A linear probe on the bag of
codes of one-object scenes (3000 train / 300 held-out), per attribute.

    python experiments/code_probe.py runs/demo/tokenizer [varied|plain]
"""

import sys

import numpy as np
import torch

from tessera.pipelines import shapes
from tessera.tokenize.tokenizer import load_tokenizer


def main(tokenizer_dir: str, backgrounds: str = "varied") -> None:
    tok, tcfg, _ = load_tokenizer(tokenizer_dir)
    K = tcfg.vq.rvq.codebook_size

    def codes(seed, n):
        scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), 1, backgrounds) for i in range(n)]
        x = torch.from_numpy(np.stack([shapes.render_scene(s, tcfg.image_size) for s in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.no_grad():
            grids = torch.cat([tok.encode(b)["pixel"][..., 0] for b in x.split(256)]).numpy()
        bags = torch.tensor(np.stack([np.bincount(g.ravel(), minlength=K) for g in grids]), dtype=torch.float32)
        return scenes, bags, grids.shape[1:]

    train, x_train, grid = codes(1, 3000)
    test, x_test, _ = codes(2, 300)
    torch.manual_seed(0)
    for attr in ("colour", "shape", "size"):
        labels = sorted({getattr(s.objects[0], attr) for s in train})
        y = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in train])
        y_test = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in test])
        probe = torch.nn.Linear(K, len(labels))
        opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(500):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_train), y).backward()
            opt.step()
        with torch.no_grad():
            acc = float((probe(x_test).argmax(1) == y_test).float().mean())
        print(f"{attr:<7} bag-of-codes linear probe, held-out accuracy {acc:.3f} (chance {1 / len(labels):.3f})")
    print(f"grid {grid}, codebook {K}")


if __name__ == "__main__":
    main(*sys.argv[1:])
