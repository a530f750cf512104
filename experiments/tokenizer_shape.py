"""Which tokenizer recipe keeps shape in its codes? Train a VQ tokenizer variant in process (the
project's `TokenizerTrainer`, the demo's tokenizer config plus `--set` overrides) on 4000 shapes-world
scenes, then report its held-out PSNR and a CNN probe over its codes of one-object scenes (3000 train,
300 held-out; shape 300 steps, colour and size 150, batches of 64).

    PYTHONPATH=. python experiments/tokenizer_shape.py demo
    PYTHONPATH=. python experiments/tokenizer_shape.py plain --backgrounds plain
    PYTHONPATH=. python experiments/tokenizer_shape.py long4x --steps 1200 --batch 32
    PYTHONPATH=. python experiments/tokenizer_shape.py k1024 --set tokenizer.vq.rvq.codebook_size=1024
    PYTHONPATH=. python experiments/tokenizer_shape.py big --radius small=0.3 --radius large=0.42
    PYTHONPATH=. python experiments/tokenizer_shape.py snap --backgrounds plain --snap-grid 16

Shape is also reported by object size (`shape_small`, `shape_large`: the same probe's held-out
accuracy on the small and on the large objects), since a small object spans only 2-3 codes; and
the demo's visual BPE (1024 merges) fitted on the training scenes' codes gives the held-out tokens
an image and the codes of an empty flat image (`tokens_per_image`, `codes_in_empty_image`).
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

from tessera.bpe.model import VisualBPE
from tessera.config import load_config
from tessera.pipelines import shapes
from tessera.tokenize.tokenizer import build_tokenizer
from tessera.tokenize.trainer import TokenizerTrainer, psnr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tag")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--backgrounds", default="varied", choices=list(shapes.BACKGROUNDS))
    ap.add_argument("--snap-grid", type=int, default=0, help="objects move by whole blocks of this lattice")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--radius", action="append", default=[], help="size=share of a cell, e.g. small=0.3")
    a = ap.parse_args()
    for item in a.radius:
        size, value = item.split("=")
        shapes.OBJECT_RADIUS[size] = float(value)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config("configs/demo.yaml", a.set).tokenizer
    cfg.train.steps = a.steps
    res = cfg.image_size

    def render(seed, n, num_objects=None):
        scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), num_objects, a.backgrounds, a.snap_grid) for i in range(n)]
        x = np.stack([shapes.render_scene(s, res) for s in scenes])
        return scenes, torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    _, pool = render(7, 4000)
    model = build_tokenizer(cfg)
    trainer = TokenizerTrainer(model, cfg, torch.device("cpu"))
    t0 = time.time()
    for _ in range(a.steps):
        trainer.train_step(pool[torch.randint(0, len(pool), (a.batch,))])
    train_s = time.time() - t0
    model.eval()
    _, held = render(9, 64)
    K = cfg.vq.rvq.codebook_size

    @torch.no_grad()
    def grid_codes(x):  # images (N, 3, H, W) -> first-depth code grids (N, h, w), in batches of 256
        return torch.cat([model.encode(b)["pixel"][..., 0] for b in x.split(256)]).long()

    def codes_of(seed, n):
        scenes, x = render(seed, n, 1)
        return scenes, grid_codes(x)

    with torch.no_grad():
        held_all = model.encode(held)["pixel"]
        rec = model.decode(held_all)
    # The visual BPE on these codes (the demo's 1024 merges, fitted on the 4000 training scenes):
    # held-out tokens an image, and how many codes a flat, empty image gets.
    held_codes = held_all[..., 0].numpy()
    empty = torch.stack([torch.full((3, res, res), level / 127.5 - 1) for level in shapes.BACKGROUND_LEVELS])
    empty_codes = grid_codes(empty).numpy()
    bpe_pool = grid_codes(pool).numpy()
    bpe = VisualBPE.fit(list(bpe_pool), K, 1024)

    train, g_train = codes_of(1, 3000)
    test, g_test = codes_of(2, 300)
    out = {"tag": a.tag, "psnr": round(float(psnr(held, rec).mean()), 2), "train_s": round(train_s), "grid": list(g_train.shape[1:]),
           "tokens_per_image": round(float(np.mean([len(t) for t in bpe.encode_batch(held_codes)])), 1),
           "codes_in_empty_image": round(float(np.mean([len(np.unique(g)) for g in empty_codes])), 1)}
    for attr in ("shape", "colour", "size"):
        labels = sorted({getattr(s.objects[0], attr) for s in train})
        y = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in train])
        y_test = torch.tensor([labels.index(getattr(s.objects[0], attr)) for s in test])
        torch.manual_seed(0)
        emb = nn.Embedding(K, 32)
        conv = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.GELU())
        head = nn.Linear(64, len(labels))
        opt = torch.optim.AdamW([*emb.parameters(), *conv.parameters(), *head.parameters()], 3e-3)
        f = lambda g: head(conv(emb(g).permute(0, 3, 1, 2)).amax((2, 3)))
        for _ in range(300 if attr == "shape" else 150):
            idx = torch.randint(0, len(train), (64,))
            opt.zero_grad()
            nn.functional.cross_entropy(f(g_train[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            hit = (f(g_test).argmax(1) == y_test).float()
            out[attr] = round(float(hit.mean()), 3)
            if attr == "shape":
                for size in shapes.SIZES:
                    mask = torch.tensor([s.objects[0].size == size for s in test])
                    out[f"shape_{size}"] = round(float(hit[mask].mean()), 3)
    print(out, flush=True)


if __name__ == "__main__":
    main()
