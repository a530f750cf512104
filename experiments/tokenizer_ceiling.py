"""The most text -> image can score with a visual tokenizer: the analyser on held-out images after
their round trip through it (`Evaluator.generation_ceiling`, what `tessera eval` reports as
`eval.generation_ceiling`), for several trained tokenizers side by side, no model needed; with
`--breakdown`, also which attribute the round trip loses (colour-only and shape-only recall, the match by
object size: `generation_sweep.py`'s breakdown for a model, so the two compare).

    PYTHONPATH=. python experiments/tokenizer_ceiling.py runs/demo/synth/heldout runs/demo/tokenizer [more tokenizer dirs] [--breakdown]
"""

import json
import sys

import torch

from generation_sweep import misses
from tessera.model.evaluate import HeldOut, generation_ceiling, round_trip_objects
from tessera.pipelines import shapes
from tessera.tokenize.tokenizer import load_tokenizer


def breakdown(tokenizer, held: HeldOut) -> dict:
    """What the round trip loses (`round_trip_objects`, as `generation_ceiling` with the bpe interface),
    by attribute and object size."""
    truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in held.scenes]
    return {k: round(v, 3) for k, v in misses(truths, round_trip_objects(tokenizer, held)).items()}


def main() -> None:
    torch.set_num_threads(2)
    args = [a for a in sys.argv[1:] if a != "--breakdown"]
    heldout_dir, tokenizers = args[0], args[1:]
    for path in tokenizers:
        tokenizer, tcfg, _ = load_tokenizer(path, "cpu")
        held = HeldOut.load(heldout_dir, tcfg.image_size)
        report = json.load(open(f"{path}/report.json"))
        print(json.dumps({"tokenizer": path, "steps": report.get("steps"), "psnr": round(report["metrics"]["psnr"], 2),
                          "train_s": report["seconds"]["train"], "generation_ceiling": round(generation_ceiling(tokenizer, held), 3),
                          **(breakdown(tokenizer, held) if "--breakdown" in sys.argv else {})}), flush=True)


if __name__ == "__main__":
    main()
