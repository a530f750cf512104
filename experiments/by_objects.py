"""Held-out accuracy per question type *by the number of objects in the scene*: tells a model that
binds a description to its object from one that answers about a random object.

A question keyed by place ("What colour is the circle at the top left?") is answered by reading the
tile at that place; a question keyed by description ("Where is the large red circle?", "Is there a red
circle in the image?") needs the model to find the object whose tiles match the description. On
one-object scenes both are easy; on three-object scenes a model that cannot bind answers about one of
the three objects (position: about a third right). Chance per type is in README "Learning".

    PYTHONPATH=. python experiments/by_objects.py runs/demo [--model runs/demo/train/model] [--config configs/demo.yaml]

Prints one line per question type: accuracy (right / asked) on scenes of 1, 2 and 3 objects, and for
existence probes whose answer is "no", whether the asked colour (or shape) is in the scene.
"""

import argparse
import collections
import json

import torch

from tessera.config import load_config
from tessera.jobs.eval import _evaluator
from tessera.model.evaluate import normalise
from tessera.pipelines import shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--model", default="", help="model directory (default: the run's train/model)")
    ap.add_argument("--config", default="configs/demo.yaml")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"run.root={args.root}"])
    ev, held = _evaluator(cfg, cfg.resolve(args.model or cfg.eval.model))
    torch.set_num_threads(1)
    scenes = {s["image"]: s["scene"]["objects"] for s in held.scenes}
    right, asked = collections.Counter(), collections.Counter()
    for q in held.questions:
        objects = scenes[q["image"]]
        ok = ev.predict(q) == normalise(q["answer"])  # scored as `tessera eval` scores it
        keys = [(q["type"], len(objects))]
        if q["type"] == "exists":
            (colour, shape), = shapes.existence_pairs([q])
            if q["answer"] == "yes":
                kind = "yes"
            elif any(o["colour"] == colour for o in objects):
                kind = "no, colour present"
            elif any(o["shape"] == shape for o in objects):
                kind = "no, shape present"
            else:
                kind = "no, neither present"
            keys.append((f"exists: {kind}", len(objects)))
        for k in keys:
            right[k] += ok
            asked[k] += 1
    table = {}
    for t in sorted({t for t, _ in asked}):
        table[t] = {n: f"{right[t, n] / asked[t, n]:.2f} ({right[t, n]}/{asked[t, n]})" for n in (1, 2, 3) if asked[t, n]}
        print(f"{t:26s}", "  ".join(f"{n} objects {v}" for n, v in table[t].items()))
    print(json.dumps({"model": args.model or cfg.resolve(cfg.eval.model), "by_objects": table}))


if __name__ == "__main__":
    main()
