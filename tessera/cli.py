"""The `tessera` command: `tessera <verb> --config X.yaml [--set key=value ...]`.

Only dispatches: each verb is `tessera.jobs.<verb>.main(argv)`, also runnable as
`python -m tessera.jobs.<verb>` (which is what `ray job submit` runs).
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "synth": "write the built-in shapes world in real source formats",
    "prepare": "sources -> interleaved sample parquet shards (Ray Data)",
    "train-tokenizer": "train the visual tokenizer (vq / dual) on Ray Train",
    "tokenize": "samples -> token shards (visual tokenizer in an actor pool, text tokenizer)",
    "fit-bpe": "fit the 2-D visual BPE on token shards",
    "train": "train the unified model through the staged curriculum (Ray Train)",
    "eval": "evaluate a trained model on the held-out shapes world",
    "ablate": "the seeds' claims as ablation studies (configs/ablations.yaml)",
    "runs": "list training runs: state, stage, step, latest checkpoint",
    "resume": "re-submit a training run to a Ray cluster; it continues from its latest checkpoint",
    "run": "the whole graph, skipping complete stages",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: tessera <verb> --config X.yaml [--set key=value ...]\n\nverbs:")
        for verb, text in VERBS.items():
            print(f"  {verb:<16} {text}")
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"tessera: unknown verb {verb!r}; expected one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    importlib.import_module(f"tessera.jobs.{verb.replace('-', '_')}").main(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
