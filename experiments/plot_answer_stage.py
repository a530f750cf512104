"""Curves of `answer_stage.py` runs: held-out VQA (solid) and training-scene VQA (dashed) of the probe
against the step, one colour per run, with the uniform-chance VQA line (0.27).

    python experiments/plot_answer_stage.py OUT.png LABEL=run.jsonl [LABEL=run.jsonl ...]

Each jsonl is `answer_stage.py`'s stdout (one JSON object per probe).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHANCE_VQA = 0.27  # mean of the five types' uniform chance (README "Learning")


def main() -> None:
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, path) in enumerate(runs):
        rows = [json.loads(ln) for ln in open(path) if ln.startswith("{")]
        steps = [r["step"] for r in rows]
        colour = f"C{i}"
        ax.plot(steps, [r["heldout_vqa"] for r in rows], "-o", ms=3, color=colour, label=f"{label} (held-out)")
        ax.plot(steps, [r["train_vqa"] for r in rows], "--", color=colour, alpha=0.6)
    ax.axhline(CHANCE_VQA, color="grey", lw=1, ls=":", label="chance (0.27)")
    ax.set(xlabel="step of the answer stage", ylabel="probe VQA (mean of 5 types)", ylim=(0, 1.02),
           title="answer stage from a fresh model: held-out (solid) and training scenes (dashed)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
