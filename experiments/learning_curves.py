"""Held-out probe curves of several training runs on one plot, and the budget a log-linear fit of
their tail projects for a target accuracy.

    python experiments/learning_curves.py OUT.png LABEL=runs/x/train/metrics.csv [LABEL=...] [--target 0.9]

Each run's `metrics.csv` (written by `tessera train`) holds `probe_<type>` every
`train.probe_every` steps (30 held-out questions a type). The mean over the five VQA types
(colour, shape, size, position, count) is fitted as a + b * log2(step) on the last half of each
run's probes; the projection is the step where that line reaches the target (or "never" for a
flat or falling tail). A fit on ~10 noisy points is a rough guide, not a promise: it says how
many doublings of the budget a run would need if it kept its recent pace.
"""

from __future__ import annotations

import argparse
import csv
import math

TYPES = ("colour", "shape", "size", "position", "count")
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "size": 1 / 2, "position": 1 / 9, "count": 1 / 3, "exists": 1 / 2}


def probes(path: str) -> list[tuple[int, dict]]:
    out = []
    for r in csv.DictReader(open(path)):
        if r.get("probe_colour"):
            out.append((int(r["step"]), {t: float(r[f"probe_{t}"]) for t in TYPES}))
    return out


def existence(path: str) -> list[tuple[int, float]]:
    """The existence probe (POPE's question, `Is there ...?`), drawn beside the five VQA types."""
    return [(int(r["step"]), float(r["probe_exists"])) for r in csv.DictReader(open(path)) if r.get("probe_exists")]


def projection(points: list[tuple[int, dict]], target: float) -> tuple[float, float, float | None]:
    """(a, b, step at target) of mean = a + b log2(step) over the last half of the probes."""
    tail = points[len(points) // 2:]
    xs = [math.log2(s) for s, _ in tail]
    ys = [sum(p.values()) / len(p) for _, p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    a = my - b * mx
    return a, b, (2 ** ((target - a) / b) if b > 0 else None)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("png")
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.csv")
    ap.add_argument("--target", type=float, default=0.9)
    args = ap.parse_args()
    fig, grid = plt.subplots(2, 4, figsize=(16, 7), sharey=True)
    axes = list(grid.ravel())
    for spec in args.runs:
        label, path = spec.split("=", 1)
        pts = probes(path)
        steps = [s for s, _ in pts]
        for ax, t in zip(axes, TYPES):
            ax.plot(steps, [p[t] for _, p in pts], marker=".", label=label)
        exists = existence(path)
        axes[5].plot([s for s, _ in exists], [v for _, v in exists], marker=".", label=label)
        mean = [sum(p.values()) / len(p) for _, p in pts]
        axes[-1].plot(steps, mean, marker=".", label=label)
        a, b, at = projection(pts, args.target)
        last = steps[-1]
        print(f"{label}: last probe mean {mean[-1]:.3f} at step {last}; tail fit {a:.3f} + {b:.3f} log2(step): "
              + (f"reaches {args.target} at ~{at:,.0f} steps ({at / last:.1f}x this run)" if at else "flat or falling: never"))
    axes[6].set_visible(False)
    for ax, t in zip(axes, TYPES + ("exists",)):
        ax.axhline(CHANCE[t], color="grey", ls=":", lw=1)
        ax.set_title(f"{t} (chance {CHANCE[t]:.2f})", fontsize=9)
        ax.set_xlabel("global step")
    axes[-1].axhline(sum(CHANCE[t] for t in TYPES) / len(TYPES), color="grey", ls=":", lw=1)
    axes[-1].axhline(args.target, color="red", ls="--", lw=1)
    axes[-1].set_title(f"mean of 5 types (goal {args.target})", fontsize=9)
    for ax in grid[:, 0]:
        ax.set_ylabel("held-out probe accuracy")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
