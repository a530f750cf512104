"""Text -> image of a trained model under several sampling settings, over several sampling seeds: tells
whether a low `eval.generation_accuracy` is the model or the sampler. For each (guidance scale,
temperature) it prints the analyser's match (`Evaluator.generation`: colour and shape of every caption
object), its caption-shuffled chance, and what the misses are made of: the share of caption objects
whose colour alone, or shape alone, is drawn, the match by object size, and the objects found per image.

    PYTHONPATH=. python experiments/generation_sweep.py runs/d15 runs/d15/gen-only-model \
        [--captions 48] [--seeds 2] [--settings 3:0.7,1:0.7,5:0.7,3:1.0] [--candidates N] [--set KEY=VALUE ...]
        [--png OUT.png [--png-count 16]]

`--candidates N`: best-of-N, the model keeping the drawing `--chooser` picks (`caption`: the one under which
it finds the caption most likely; `drawing`: the one it finds most likely after the caption;
`Evaluator.generation`); `single` is then one sample's score over all N candidates, `best_possible` a
perfect chooser's, and `best_of_K` what the model's choice among the first K drawings scores (K = 1, 2,
4, ..., N: one run gives the whole best-of-K curve).

`--png` draws the first setting's first-seed images beside their captions (`evaluate.plot_generations`).
"""

import argparse
import json
import time

import numpy as np
import torch

from tessera.config import load_config
from tessera.jobs.eval import _evaluator
from tessera.model.evaluate import plot_generations
from tessera.pipelines import analyser, shapes


def misses(truths: list[list], founds: list[list]) -> dict[str, float]:
    """What a set of drawn images gets right of their scenes' objects: the share whose colour alone, or
    shape alone, is found (`analyser.match_score` with one attribute), and the colour-and-shape match of
    the large and of the small objects (`analyser.matched` grouped by size), to tell whether objects drawn
    across many tiles fail more often."""
    hits = {}
    for truth, found in zip(truths, founds):
        for o, hit in zip(truth, analyser.matched(truth, found)):
            hits.setdefault(o.size, []).append(hit)
    return {"colour": float(np.mean([analyser.match_score(t, f, key=lambda o: o.colour) for t, f in zip(truths, founds)])),
            "shape": float(np.mean([analyser.match_score(t, f, key=lambda o: o.shape) for t, f in zip(truths, founds)])),
            **{f"{size}_objects": float(np.mean(h)) for size, h in sorted(hits.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("model")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--captions", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--settings", default="3:0.7,1:0.7,5:0.7,3:1.0", help="comma-separated guidance:temperature pairs")
    ap.add_argument("--candidates", type=int, default=1, help="best-of-N, kept by --chooser")
    ap.add_argument("--chooser", default="caption", help="eval.generation_chooser: caption | drawing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--png", default="", help="draw the first setting's first-seed samples here")
    ap.add_argument("--png-count", type=int, default=16)
    a = ap.parse_args()
    cfg = load_config(a.config, [f"run.root={a.root}"] + a.set)
    ev, held = _evaluator(cfg, a.model)
    torch.set_num_threads(a.threads)
    truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in held.scenes[:a.captions]]
    for setting in a.settings.split(","):
        scale, temperature = (float(x) for x in setting.split(":"))
        t0, runs = time.time(), []
        for seed in range(a.seeds):
            g = ev.generation(a.captions, scale, temperature, 0, seed, a.candidates, a.chooser)
            if a.png and not runs and setting == a.settings.split(",")[0]:
                print(plot_generations(g["samples"][:a.png_count], a.png), flush=True)
            runs.append({"accuracy": g["generation_accuracy"], "chance": g["generation_chance"],
                         "single": g["generation_accuracy_single"], "best_possible": g["generation_accuracy_best_possible"],
                         **misses(truths, g["found"]), "objects": np.mean([len(f) for f in g["found"]])})
            runs[-1].update({f"best_of_{k}": v for k, v in g["generation_accuracy_best_of"].items()})
        mean = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in runs[0]}
        print(json.dumps({"model": a.model, "cfg_scale": scale, "temperature": temperature, "captions": a.captions,
                          "candidates": a.candidates, "chooser": a.chooser, "seeds": a.seeds, "accuracy_by_seed": [round(r["accuracy"], 3) for r in runs], **mean,
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
