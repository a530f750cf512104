"""Text -> image of a trained model under several sampling settings, over several sampling seeds: tells
whether a low `eval.generation_accuracy` is the model or the sampler. For each (guidance scale,
temperature) it prints the analyser's match (`Evaluator.generation`: colour and shape of every caption
object), its caption-shuffled chance, and what the misses are made of: the share of caption objects
whose colour alone, or shape alone, is drawn, the match by object size, and the objects found per image.

    PYTHONPATH=. python experiments/generation_sweep.py runs/d15 runs/d15/gen-only-model \
        [--captions 48] [--seeds 2] [--settings 3:0.7,1:0.7,5:0.7,3:1.0] [--set KEY=VALUE ...]
"""

import argparse
import json
import time

import numpy as np
import torch

from tessera.config import load_config
from tessera.jobs.eval import _evaluator
from tessera.pipelines import analyser, shapes


def attribute_recall(truth: list, found: list, attribute: str) -> float:
    """Share of the true objects whose `attribute` (colour | shape) is among the found objects' (each
    found object used once), the one-attribute analogue of `analyser.match_score`."""
    if not truth:
        return 1.0
    pool = [getattr(o, attribute) for o in found]
    hits = 0
    for o in truth:
        if getattr(o, attribute) in pool:
            pool.remove(getattr(o, attribute))
            hits += 1
    return hits / len(truth)


def recall_by_size(truths: list, founds: list) -> dict[str, float]:
    """Share of the true objects of each size whose colour and shape are drawn (`match_score`'s rule,
    the found objects pooled per image), to tell whether large objects, drawn across many tiles, fail
    more often than small ones."""
    hits, totals = {}, {}
    for truth, found in zip(truths, founds):
        pool = [(o.colour, o.shape) for o in found]
        for o in truth:
            totals[o.size] = totals.get(o.size, 0) + 1
            if (o.colour, o.shape) in pool:
                pool.remove((o.colour, o.shape))
                hits[o.size] = hits.get(o.size, 0) + 1
    return {size: hits.get(size, 0) / n for size, n in sorted(totals.items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("model")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--captions", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--settings", default="3:0.7,1:0.7,5:0.7,3:1.0", help="comma-separated guidance:temperature pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    cfg = load_config(a.config, [f"run.root={a.root}"] + a.set)
    ev, held = _evaluator(cfg, a.model)
    torch.set_num_threads(a.threads)
    truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in held.scenes[:a.captions]]
    for setting in a.settings.split(","):
        scale, temperature = (float(x) for x in setting.split(":"))
        t0, runs = time.time(), []
        for seed in range(a.seeds):
            g = ev.generation(a.captions, scale, temperature, 0, seed)
            found = [analyser.analyse(pixels) for _, pixels in g["samples"]]
            runs.append({"accuracy": g["generation_accuracy"], "chance": g["generation_chance"],
                         "colour": np.mean([attribute_recall(t, f, "colour") for t, f in zip(truths, found)]),
                         "shape": np.mean([attribute_recall(t, f, "shape") for t, f in zip(truths, found)]),
                         "objects": np.mean([len(f) for f in found]),
                         **{f"{size}_objects": r for size, r in recall_by_size(truths, found).items()}})
        mean = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in runs[0]}
        print(json.dumps({"model": a.model, "cfg_scale": scale, "temperature": temperature, "captions": a.captions,
                          "seeds": a.seeds, "accuracy_by_seed": [round(r["accuracy"], 3) for r in runs], **mean,
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
