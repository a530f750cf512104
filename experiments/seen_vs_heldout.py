"""Accuracy per question type on *training* scenes' own questions against the held-out scenes, for one
model: a type right on the scenes it trained on and wrong on new ones is memorised, not learnt.
Existence probes are split by their answer ("yes" / "no").

    PYTHONPATH=. python experiments/seen_vs_heldout.py runs/demo [--model runs/demo/train/model] [--scenes 60]

Training questions are the first `--scenes` VQA conversations `tessera synth` wrote (one question per
turn, as `experiments/answer_stage.py` probes them); both sets go through `tessera eval`'s evaluator.
"""

import argparse
import collections
import json
import os

import torch

from experiments.answer_stage import training_questions
from tessera.config import load_config
from tessera.jobs.eval import _evaluator
from tessera.model.evaluate import normalise


def accuracy(ev, questions: list[dict]) -> dict[str, str]:
    right, asked = collections.Counter(), collections.Counter()
    for q in questions:
        key = q["type"] + (f" {q['answer']}" if q["type"] == "exists" else "")
        asked[key] += 1
        right[key] += ev.predict(q) == normalise(q["answer"])
    return {k: f"{right[k] / asked[k]:.2f} ({right[k]}/{asked[k]})" for k in sorted(asked)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--model", default="", help="model directory (default: the run's train/model)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--scenes", type=int, default=60)
    args = ap.parse_args()
    cfg = load_config(args.config, [f"run.root={args.root}"])
    model = cfg.resolve(args.model or cfg.eval.model)
    ev, held = _evaluator(cfg, model)
    torch.set_num_threads(1)
    seen = training_questions(os.path.join(cfg.resolve(cfg.synth.output), "instruct"), args.scenes, ev.image_size)
    ev.add_images(seen.images)
    print(json.dumps({"model": model, "training_scenes": accuracy(ev, seen.questions),
                      "heldout": accuracy(ev, held.questions)}))


if __name__ == "__main__":
    main()
