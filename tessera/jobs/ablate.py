"""`tessera ablate --config configs/ablations.yaml [--arms study/arm,...]`: the seeds' claims as
controlled comparisons.

    shared upstream (synth, prepare, tokenizer, tokens, BPE; skipped when complete)
      └─ for each selected (study, arm), for each seed:
           arm config = base config + the arm's overrides + train.seed
           [its own tokenizer / tokens / BPE when the arm changes them] -> train -> eval
           -> <ablate.output>/<arm dir>/seed<s>/result.json          (an arm-seed is done when this exists)
      └─ rows (mean, min, max over seeds) -> report.json, report.md, ablations.png

Every arm of a study is the base config plus the arm's overrides, trained through the same stages
(step counts scaled by `ablate.steps_scale`) on the same samples and evaluated by the same suite;
only what the arm names differs. Each (arm, seed) is a run of its own under the ablation's output,
so an ablation killed halfway continues with its finished arm-seeds kept, and an unfinished one
resumes from its last checkpoint (train and eval skip what is complete). Arms without overrides
are the base config: every study shares one output for them.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time

import numpy as np

from tessera import storage
from tessera.config import ConfigError, TesseraConfig, load_config, read_config_file
from tessera.console import Console
from tessera.faults import fault_point
from tessera.jobs.common import logs_dir, parse_args, ray_session

VQA_TYPES = ("colour", "shape", "size", "position", "count")
# (key in a result, column title); vqa_<type> come from the eval's vqa_by_type
METRICS = [("vqa_accuracy", "VQA"), *[(f"vqa_{t}", t) for t in VQA_TYPES], ("pope_accuracy", "POPE acc"),
           ("pope_f1", "POPE F1"), ("pope_yes_ratio", "POPE yes"), ("caption_accuracy", "captions"),
           ("generation_accuracy", "t→i")]
COSTS = [("tokens_per_image", "tokens/image"), ("train_tokens_per_s", "train tok/s"), ("wall_time_s", "wall s / seed"),
         ("final_loss", "final loss")]
# overrides under these sections change the visual tokens: the arm gets its own outputs from there down
UPSTREAM = {"tokenizer": ("tokenizer", "tokenize", "bpe"), "tokenize": ("tokenize", "bpe"), "bpe": ("bpe",)}


def select_arms(cfg: TesseraConfig, wanted: list[str]) -> list[tuple]:
    """[(study, arm)] in config order; `wanted`: `study/arm` or `arm` names (empty = all).
    A name that matches nothing is a config error, raised before any work."""
    pairs = [(s, a) for s in cfg.ablate.studies for a in s.arms]
    if not wanted:
        return pairs
    chosen = [(s, a) for s, a in pairs if f"{s.name}/{a.name}" in wanted or a.name in wanted]
    known = {f"{s.name}/{a.name}" for s, a in pairs} | {a.name for _, a in pairs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError("--arms", f"no arm named {', '.join(unknown)}; arms: {', '.join(f'{s.name}/{a.name}' for s, a in pairs)}")
    return chosen


def arm_dir(cfg: TesseraConfig, study, arm) -> str:
    """Where an arm's seeds live. Arms with the same overrides are one arm trained once (every arm
    without overrides is `base`; `bpe.num_merges=0` in two studies lives under the first one)."""
    root = cfg.resolve(cfg.ablate.output)
    if not arm.set:
        return f"{root}/base"
    first_study, first_arm = next((s, a) for s in cfg.ablate.studies for a in s.arms if a.set == arm.set)
    return f"{root}/{first_study.name}/{first_arm.name}"


def arm_config(config_path: str | None, base_overrides: list[str], cfg: TesseraConfig, study, arm, seed: int,
               snapshot: dict | None = None) -> TesseraConfig:
    """The base config plus the arm's overrides, its seed and its own output locations. `snapshot`:
    the config file as the ablation read it at its start (so editing the file mid-ablation changes
    no arm it has yet to run); None reads `config_path` now."""
    home = arm_dir(cfg, study, arm)
    out = f"{home}/seed{seed}"
    overrides = [*base_overrides, *arm.set, f"train.seed={seed}", f"train.output={out}/train",
                 f"train.storage_path={out}/ray_train", f"eval.output={out}/eval", f"eval.model={out}/train/model"]
    sections = {o.split(".", 1)[0] for o in arm.set}
    own = sorted({s for section in sections for s in UPSTREAM.get(section, ())})
    overrides += [f"{s}.output={home}/{s}" for s in own]  # shared by the arm's seeds: only train.seed differs
    arm_cfg = load_config(config_path, overrides, snapshot=snapshot)
    for stage in arm_cfg.train.stages:
        stage.steps = max(1, int(round(stage.steps * cfg.ablate.steps_scale)))
        stage.warmup_steps = min(stage.warmup_steps, stage.steps)
    return arm_cfg


def reproduce(config_path: str | None, base_overrides: list[str], study, arm) -> str:
    """The command that reruns this row (its finished seeds are read back, not retrained)."""
    parts = ["tessera", "ablate"] + (["--config", config_path] if config_path else [])
    parts += [a for o in base_overrides for a in ("--set", o)] + ["--arms", f"{study.name}/{arm.name}"]
    return shlex.join(parts)


def run_arm_seed(acfg: TesseraConfig) -> dict:
    """Train and evaluate one (arm, seed), building the arm's own upstream first when it has one;
    every stage skips what is complete. Returns the figures the table reads."""
    from tessera.jobs.eval import evaluate_model
    from tessera.jobs.run import STAGES
    from tessera.jobs.train import train

    t0 = time.perf_counter()
    upstream = {name: fn(acfg) for name, fn, _ in STAGES[:4]}  # shared outputs: complete, skipped
    tr = train(acfg)
    ev = evaluate_model(acfg)
    e = ev["eval"]
    result = {"tokens_per_image": upstream["fit-bpe"]["tokens_per_image_after"],
              "train_tokens_per_s": tr["mean_tokens_per_s"], "final_loss": tr["final_loss"],
              "train_wall_time_s": tr["wall_time_s"], "eval_wall_time_s": ev["wall_time_s"],
              "wall_time_s": round(tr["wall_time_s"] + ev["wall_time_s"], 1), "seconds_here": round(time.perf_counter() - t0, 1),
              "chance": ev.get("chance") or None}
    for key, _ in METRICS:
        kind, _, qtype = key.partition("_")
        result[key] = e.get("vqa_by_type", {}).get(qtype) if kind == "vqa" and qtype in VQA_TYPES else e.get(key)
    return result


def summarize(study, arm, results: list[dict], command: str) -> dict:
    """One table row: per figure the mean, min and max over the seeds (None where no seed has it)."""
    row = {"study": study.name, "question": study.question, "arm": arm.name, "overrides": arm.set,
           "seeds": [r["seed"] for r in results], "command": command, "per_seed": results}
    for key, _ in METRICS + COSTS:
        vals = [r[key] for r in results if r.get(key) is not None]
        row[key] = float(np.mean(vals)) if vals else None
        row[key + "_min"] = float(min(vals)) if vals else None
        row[key + "_max"] = float(max(vals)) if vals else None
    return row


def _cell(row: dict, key: str, digits: int = 2) -> str:
    if row[key] is None:
        return "n/a"
    lo, hi = row[key + "_min"], row[key + "_max"]
    spread = f" ({lo:.{digits}f}–{hi:.{digits}f})" if len(row["seeds"]) > 1 else ""
    return f"{row[key]:.{digits}f}{spread}"


def chance_line(chance: dict | None) -> str:
    if not chance:
        return ""
    types = ", ".join(f"{t} {chance['uniform_by_type'][t]:.2f}" for t in VQA_TYPES if t in chance.get("uniform_by_type", {}))
    return f"Uniform chance: VQA {chance['vqa_uniform']:.2f} ({types}), POPE 0.50."


def table(rows: list[dict]) -> str:
    """Markdown: mean (min–max over seeds) per figure, then the costs and the command."""
    head = ["study", "arm", "seeds", *[t for _, t in METRICS], *[t for _, t in COSTS], "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["study"], r["arm"], ",".join(map(str, r["seeds"])), *[_cell(r, k) for k, _ in METRICS],
                 _cell(r, "tokens_per_image", 1), _cell(r, "train_tokens_per_s", 0), _cell(r, "wall_time_s", 0),
                 _cell(r, "final_loss", 3), f"`{r['command']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, chance: dict | None = None) -> str:
    """One panel per study: VQA, POPE accuracy, captions and text→image per arm, bars at the mean,
    error bars from the seeds' min to max, VQA's uniform chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [("vqa_accuracy", "VQA"), ("pope_accuracy", "POPE"), ("caption_accuracy", "captions"), ("generation_accuracy", "t→i")]
    studies = list(dict.fromkeys(r["study"] for r in rows))
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 3.6), squeeze=False)
    width = 0.8 / len(shown)
    for ax, study in zip(axes[0], studies):
        arms = [r for r in rows if r["study"] == study]
        x = np.arange(len(arms))
        for k, (m, label) in enumerate(shown):
            mean = [a[m] if a[m] is not None else 0.0 for a in arms]
            err = [[(a[m] - a[m + "_min"]) if a[m] is not None else 0 for a in arms],
                   [(a[m + "_max"] - a[m]) if a[m] is not None else 0 for a in arms]]
            ax.bar(x + (k - (len(shown) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=label)
        if chance and chance.get("vqa_uniform") is not None:
            ax.axhline(chance["vqa_uniform"], ls="--", lw=0.8, color="grey")
        ax.set_xticks(x, [a["arm"] for a in arms], rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(study, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ablate(cfg: TesseraConfig, config_path: str | None, base_overrides: list[str], wanted: list[str], say=print,
           report_only: bool = False) -> dict:
    """`report_only`: train nothing; tabulate the arm-seeds finished so far (an arm with none is left
    out), e.g. while the ablation still runs."""
    selected = select_arms(cfg, wanted)
    snapshot = read_config_file(config_path)  # every arm-seed is built from the file as it is now
    t0 = time.perf_counter()
    if not report_only:
        build_shared_upstream(cfg)
    rows = []
    for study, arm in selected:
        results = arm_results(cfg, config_path, base_overrides, study, arm, snapshot, report_only, say)
        if results:
            row = summarize(study, arm, results, reproduce(config_path, base_overrides, study, arm))
            rows.append(row)
            say(f"[ablate] {study.name} / {arm.name}: VQA {_cell(row, 'vqa_accuracy')}, POPE {_cell(row, 'pope_accuracy')}, "
                f"{_cell(row, 'tokens_per_image', 1)} tokens/image")
    return write_report(cfg, rows, selected, time.perf_counter() - t0)


def build_shared_upstream(cfg: TesseraConfig) -> None:
    """synth (shapes world), prepare, train-tokenizer, tokenize, fit-bpe: shared by every arm that
    does not change them; each skips itself when complete."""
    from tessera.jobs.run import STAGES, uses_shapes_world
    from tessera.jobs.synth import run_synth

    if uses_shapes_world(cfg):
        run_synth(cfg)
    for _, fn, _ in STAGES[:4]:
        fn(cfg)


def arm_results(cfg: TesseraConfig, config_path: str | None, base_overrides: list[str], study, arm, snapshot: dict,
                report_only: bool, say) -> list[dict]:
    """Each seed's result of one arm: kept when finished, else trained and evaluated (or, with
    `report_only`, left out)."""
    results = []
    for seed in study.seeds or cfg.ablate.seeds:
        done_uri = storage.join(arm_dir(cfg, study, arm), f"seed{seed}", "result.json")
        label = f"{study.name} / {arm.name} / seed {seed}"
        if storage.exists(done_uri):
            result = storage.read_json(done_uri)
            if "chance" not in result:  # kept by an older tessera: the arm's eval report has it
                ev_uri = storage.join(arm_dir(cfg, study, arm), f"seed{seed}", "eval", "report.json")
                result["chance"] = storage.read_json(ev_uri).get("chance") if storage.exists(ev_uri) else None
            say(f"[ablate] {label}: complete, kept")
        elif report_only:
            say(f"[ablate] {label}: not finished, left out of the report")
            continue
        else:
            say(f"[ablate] {label}: {' '.join(arm.set) or '(the base config)'}")
            result = {"seed": seed, **run_arm_seed(arm_config(config_path, base_overrides, cfg, study, arm, seed, snapshot))}
            storage.write_json(done_uri, result)
            fault_point("ablate:after_arm")
        results.append(result)
    return results


def write_report(cfg: TesseraConfig, rows: list[dict], selected: list[tuple], seconds: float) -> dict:
    """report.json, report.md (the table) and ablations.png under `ablate.output`; returns the report."""
    chance = next((r["chance"] for row in rows for r in row["per_seed"] if r.get("chance")), None)  # one held-out set
    out = cfg.resolve(cfg.ablate.output)
    markdown = table(rows)
    png = storage.join(out, "ablations.png") if rows else None  # --report-only before any arm-seed finished: no plot
    if png:
        with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes paths; the output may be a URI
            storage.write_bytes(png, open(plot(rows, os.path.join(tmp, "ablations.png"), chance), "rb").read())
    report = {"job": "ablate", "rows": rows, "markdown": markdown, "png": png, "chance": chance,
              "steps_scale": cfg.ablate.steps_scale, "seeds": cfg.ablate.seeds, "arms": [f"{s.name}/{a.name}" for s, a in selected],
              "wall_time_s": round(seconds, 1)}
    storage.write_json(storage.join(out, "report.json"), report)
    chosen = {s.name for s, _ in selected}
    questions = "\n".join(f"- **{s.name}**: {s.question}" for s in cfg.ablate.studies if s.question and s.name in chosen)
    storage.write_bytes(storage.join(out, "report.md"), (
        f"# Ablations\n\n{questions}\n\nHeld-out figures, mean (min–max) over seeds {cfg.ablate.seeds} (a study's own "
        f"`seeds` where it has them: the row's seeds column); every arm "
        f"trains the base stages × {cfg.ablate.steps_scale} steps. {chance_line(chance)}\n\n{markdown}\n\n"
        + ("![ablations](ablations.png)\n" if png else "")).encode())
    return report


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import sys

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--arms", default="", help="comma-separated `study/arm` or `arm` names (default: every arm)")
    pre.add_argument("--report-only", action="store_true",
                     help="train nothing: tabulate the arm-seeds finished so far (the seeds column says which)")
    known, rest = pre.parse_known_args(argv if argv is not None else sys.argv[1:])
    cfg, args = parse_args("ablate", rest, "Run the ablation studies of ablate.studies (--arms study/arm,... for a "
                                           "subset) and tabulate them with their seeds' spread.")
    wanted = [w.strip() for w in known.arms.split(",") if w.strip()]
    if not cfg.ablate.studies:
        print("tessera ablate: ablate.studies is empty; see configs/ablations.yaml", file=sys.stderr)
        raise SystemExit(2)
    try:
        select_arms(cfg, wanted)
    except ConfigError as e:
        print(f"tessera ablate: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    with Console(logs_dir(cfg)) as console:
        with console.stage("ablate"), ray_session(cfg.ray):  # the live line follows the "[ablate] study / arm" lines
            report = ablate(cfg, args.config, args.overrides, wanted, report_only=known.report_only)
        for line in report["markdown"].splitlines():
            console.print(line)
        console.print(f"[tessera] ablate: {cfg.resolve(cfg.ablate.output)}/report.md, {report['png']}")
    return report


if __name__ == "__main__":
    main()
