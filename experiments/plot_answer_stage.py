"""Curves of `answer_stage.py` runs: held-out (solid) and training-scene (dashed) probe figures against
the step, one colour per run, with the chance line.

    python experiments/plot_answer_stage.py OUT.png LABEL=run.jsonl [LABEL=runs.jsonl@TAG ...] [--metric text_to_image]
        [--line NAME=VALUE ...]

Each jsonl is `answer_stage.py`'s stdout (one JSON object per probe); `@TAG` keeps the lines of one run
from a file that holds several (`docs/demo_runs/answer-stage-arms.jsonl`). `--metric vqa` (default):
the probe's VQA (mean of 5 types) against its uniform chance; `text_to_image`: the analyser's match on
held-out and training captions. `--line` draws a horizontal reference (a chance, a ceiling, a goal).
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHANCE_VQA = 0.27  # mean of the five types' uniform chance (README "Learning")
METRICS = {"vqa": ("heldout_vqa", "train_vqa", "probe VQA (mean of 5 types)"),
           "text_to_image": ("text_to_image", "train_text_to_image", "text -> image (analyser match)")}


def read_run(spec: str) -> list[dict]:
    path, _, tag = spec.partition("@")
    rows = [json.loads(ln) for ln in open(path) if ln.startswith("{")]
    rows = [r for r in rows if "step" in r and (not tag or r.get("tag") == tag)]
    if not rows:
        raise SystemExit(f"no probe lines in {spec}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("png")
    ap.add_argument("runs", nargs="+", help="LABEL=path.jsonl[@tag]")
    ap.add_argument("--metric", default="vqa", choices=sorted(METRICS))
    ap.add_argument("--line", action="append", default=[], help="NAME=VALUE: a horizontal reference line")
    a = ap.parse_args()
    held, train, ylabel = METRICS[a.metric]
    lines = [ln.split("=", 1) for ln in a.line] or ([("chance (0.27)", CHANCE_VQA)] if a.metric == "vqa" else [])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, spec) in enumerate(r.split("=", 1) for r in a.runs):
        rows = read_run(spec)
        steps = [r["step"] for r in rows]
        colour = f"C{i}"
        ax.plot(steps, [r[held] for r in rows], "-o", ms=3, color=colour, label=f"{label} (held-out)")
        ax.plot(steps, [r[train] for r in rows], "--", color=colour, alpha=0.6)
    for k, (name, value) in enumerate(lines):
        ax.axhline(float(value), color="grey", lw=1, ls=[":", "-.", "--"][k % 3], label=name)
    ax.set(xlabel="step", ylabel=ylabel, ylim=(0, 1.02),
           title="from a fresh model: held-out (solid) and training scenes or captions (dashed)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print(a.png)


if __name__ == "__main__":
    main()
