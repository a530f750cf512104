"""`tessera ablate --config configs/ablations.yaml`: the seeds' claims as controlled comparisons.

Every arm of a study is the base config plus the arm's overrides, trained through the same
stages (step counts scaled by `ablate.steps_scale`) on the same token shards and evaluated by
the same suite; only what the arm names differs. Upstream stages (prepare, tokenizer,
tokenize) are shared and skipped when complete; an arm that changes the BPE fits its own. Each
(arm, seed) is its own train/eval output, so an interrupted ablation resumes arm by arm.

Writes <ablate.output>/report.json (rows + a markdown table) and ablations.png.
"""

from __future__ import annotations

import os
import time

import numpy as np

from tessera import storage
from tessera.config import TesseraConfig, load_config
from tessera.console import Console
from tessera.jobs.common import logs_dir, parse_args, ray_session

METRICS = ("caption_accuracy", "vqa_accuracy", "pope_accuracy", "pope_f1", "generation_accuracy")


def arm_config(config_path: str | None, base_overrides: list[str], cfg: TesseraConfig, study: str, arm, seed: int) -> TesseraConfig:
    # arms without overrides are the base config: they share one output (trained once per seed)
    out = f"{cfg.resolve(cfg.ablate.output)}/" + (f"{study}/{arm.name}" if arm.set else "base") + f"/seed{seed}"
    overrides = [*base_overrides, *arm.set, f"train.seed={seed}", f"train.output={out}/train",
                 f"train.storage_path={out}/ray_train", f"eval.output={out}/eval"]
    if any(o.startswith("bpe.") for o in arm.set):  # its own BPE, next to its outputs
        overrides += [f"bpe.output={out}/bpe"]
    arm_cfg = load_config(config_path, overrides)
    for stage in arm_cfg.train.stages:
        stage.steps = max(1, int(round(stage.steps * cfg.ablate.steps_scale)))
        stage.warmup_steps = min(stage.warmup_steps, stage.steps)
    return arm_cfg


def table(rows: list[dict]) -> str:
    head = "| study | arm | seeds | " + " | ".join(m.replace("_", " ") for m in METRICS) + " | tokens/image | final loss |"
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for r in rows:
        cells = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if r[m] is not None else "n/a" for m in METRICS]
        lines.append(f"| {r['study']} | {r['arm']} | {r['seeds']} | " + " | ".join(cells)
                     + f" | {r['tokens_per_image']:.1f} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = list(dict.fromkeys(r["study"] for r in rows))
    fig, axes = plt.subplots(1, len(studies), figsize=(4 * len(studies), 3.5), squeeze=False)
    for ax, study in zip(axes[0], studies):
        arms = [r for r in rows if r["study"] == study]
        x = np.arange(len(arms))
        for k, m in enumerate(("caption_accuracy", "vqa_accuracy", "pope_accuracy")):
            ax.bar(x + (k - 1) * 0.25, [a[m] for a in arms], 0.25, yerr=[a[m + "_std"] for a in arms], label=m.split("_")[0])
        ax.set_xticks(x, [a["arm"] for a in arms], rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(study, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ablate(cfg: TesseraConfig, config_path: str | None, base_overrides: list[str]) -> dict:
    from tessera.jobs.eval import evaluate_model
    from tessera.jobs.fit_bpe import fit_bpe
    from tessera.jobs.run import STAGES
    from tessera.jobs.synth import run_synth
    from tessera.jobs.train import train

    if not cfg.ablate.studies:
        raise SystemExit("tessera ablate: ablate.studies is empty; see configs/ablations.yaml")
    t0 = time.perf_counter()
    run_synth(cfg)
    for name, fn, _ in STAGES[:4]:  # prepare, train-tokenizer, tokenize, fit-bpe: shared by every arm
        fn(cfg)
    rows = []
    for study in cfg.ablate.studies:
        for arm in study.arms:
            results = []
            for seed in cfg.ablate.seeds:
                acfg = arm_config(config_path, base_overrides, cfg, study.name, arm, seed)
                print(f"[ablate] {study.name} / {arm.name} / seed {seed}: {' '.join(arm.set) or '(base)'}", flush=True)
                bpe = fit_bpe(acfg)
                tr = train(acfg)
                ev = evaluate_model(acfg)
                results.append((bpe, tr, ev))
            row = {"study": study.name, "arm": arm.name, "overrides": arm.set, "seeds": len(results),
                   "tokens_per_image": float(np.mean([b["tokens_per_image_after"] for b, _, _ in results])),
                   "final_loss": float(np.mean([t["final_loss"] for _, t, _ in results]))}
            for m in METRICS:
                vals = [e["eval"][m] for _, _, e in results if e["eval"][m] is not None]
                row[m] = float(np.mean(vals)) if vals else None
                row[m + "_std"] = float(np.std(vals)) if vals else 0.0
            rows.append(row)
            print(f"[ablate] {study.name} / {arm.name}: " + ", ".join(f"{m} {row[m]:.3f}" for m in METRICS if row[m] is not None))
    out = cfg.resolve(cfg.ablate.output)
    os.makedirs(out, exist_ok=True)
    report = {"job": "ablate", "rows": rows, "markdown": table(rows), "png": plot(rows, os.path.join(out, "ablations.png")),
              "steps_scale": cfg.ablate.steps_scale, "seeds": cfg.ablate.seeds, "wall_time_s": round(time.perf_counter() - t0, 1)}
    storage.write_json(storage.join(out, "report.json"), report)
    return report


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args("ablate", argv, "Run the ablation studies of ablate.studies and tabulate them.")
    with Console(logs_dir(cfg)) as console:
        with console.stage("ablate"), ray_session(cfg.ray):  # the live line follows the "[ablate] study / arm" lines
            report = ablate(cfg, args.config, args.overrides)
        for line in report["markdown"].splitlines():
            console.print(line)
        console.print(f"[tessera] ablate: {cfg.resolve(cfg.ablate.output)}/report.json, {report['png']}")
    return report


if __name__ == "__main__":
    main()
