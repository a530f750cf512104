"""The most text -> image can score with a visual tokenizer: the analyser on held-out images after
their round trip through it (`Evaluator.generation_ceiling`, what `tessera eval` reports as
`eval.generation_ceiling`), for several trained tokenizers side by side, no model needed.

    PYTHONPATH=. python experiments/tokenizer_ceiling.py runs/demo/synth/heldout runs/demo/tokenizer [more tokenizer dirs]
"""

import json
import sys

import torch

from tessera.model.evaluate import HeldOut, generation_ceiling
from tessera.tokenize.tokenizer import load_tokenizer


def main() -> None:
    torch.set_num_threads(2)
    heldout_dir, tokenizers = sys.argv[1], sys.argv[2:]
    for path in tokenizers:
        tokenizer, tcfg, _ = load_tokenizer(path, "cpu")
        held = HeldOut.load(heldout_dir, tcfg.image_size)
        report = json.load(open(f"{path}/report.json"))
        print(json.dumps({"tokenizer": path, "steps": report.get("steps"), "psnr": round(report["metrics"]["psnr"], 2),
                          "train_s": report["seconds"]["train"], "generation_ceiling": round(generation_ceiling(tokenizer, held), 3)}), flush=True)


if __name__ == "__main__":
    main()
