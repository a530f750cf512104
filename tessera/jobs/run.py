"""`tessera run`: the whole job graph in order, skipping stages whose outputs are complete.

Stages share one Ray session. Each stage decides for itself whether its outputs are
complete (its report carries a fingerprint of its config and inputs), so a re-run after
success only checks, and a run interrupted anywhere resumes at the interrupted stage.
"""

from __future__ import annotations

import os
import sys
import time

from tessera import storage
from tessera.console import Console
from tessera.jobs.common import logs_dir, parse_args, preflight, ray_session, resubmit_record
from tessera.jobs.eval import evaluate_model, figure, generation_summary, has_shapes_suite, set_summary
from tessera.jobs.fit_bpe import fit_bpe
from tessera.jobs.prepare import prepare
from tessera.jobs.synth import run_synth
from tessera.jobs.tokenize import tokenize
from tessera.jobs.train import train
from tessera.jobs.train_tokenizer import train_tokenizer
from tessera.pipelines.sources import check_sources

# (stage, function, config section holding its output location)
STAGES = [
    ("prepare", prepare, "prepare"),
    ("train-tokenizer", train_tokenizer, "tokenizer"),
    ("tokenize", tokenize, "tokenize"),
    ("fit-bpe", fit_bpe, "bpe"),
    ("train", train, "train"),
    ("eval", evaluate_model, "eval"),
]


# how the report names a best-of-n chooser (`EvalConfig.generation_chooser`); a report written before the
# choice existed has none and kept by the caption's likelihood
CHOOSER_WORDS = {"caption": "the model's caption likelihood", None: "the model's caption likelihood",
                 "drawing": "the model's likelihood of the drawing"}


def build_report(cfg, stages: dict, reports: dict, total_s: float) -> dict:
    """The run's report: stable, documented keys (README "Report keys") plus each stage's report path."""
    prep, tok, toks, bpe, tr, ev = (reports[n] for n, _, _ in STAGES)
    return {
        "run": cfg.run.name,
        "stages": stages,
        "time": {"total_s": round(total_s, 3), **{k: v["seconds"] for k, v in stages.items()}},
        "prepare": {"samples": prep["rows_out"], "rejects": prep["rejects"], "rejects_by_reason": prep["rejects_by_reason"]},
        "tokenizer": {k: tok["metrics"][k] for k in ("psnr", "ssim", "lpips", "pixel_usage")},
        "tokenize": {"rows": toks["rows_out"], "images": toks["images"], "text_tokens": toks["text_tokens"]},
        "bpe": {"tokens_per_image_before": bpe["tokens_per_image_before"], "tokens_per_image_after": bpe["tokens_per_image_after"],
                "merges": bpe["merges_done"], "vocabulary_usage_heldout": bpe["vocabulary_usage_heldout"]},
        "train": {"steps": tr["steps"], "final_loss": tr["final_loss"], "mean_tokens_per_s": tr["mean_tokens_per_s"],
                  "mean_packing_efficiency": tr["mean_packing_efficiency"], "interface": tr["interface"], "mot": tr["mot"],
                  "stages": [{k: s.get(k) for k in ("name", "start_step", "steps", "seconds")} for s in tr["stages"]]},
        "eval": ev["eval"],
        "chance": ev["chance"],
        "pngs": {"reconstructions": tok["pngs"]["reconstructions"], "bpe_tiles": bpe["png"], "loss_curve": tr["loss_curve"],
                 "generated": ev["generated_png"]},
        "examples": ev["examples"],
        "reports": {name: storage.join(cfg.resolve(getattr(cfg, section).output), "report.json") for name, _, section in STAGES},
    }


def write_markdown(report: dict, path: str, ablation: dict | None = None) -> str:
    """report.md: the figures, the PNGs (paths relative to the run root) and the ablation table."""
    root = os.path.dirname(os.path.abspath(path))
    rel = {k: os.path.relpath(v, root) for k, v in report["pngs"].items() if v}
    e, t, b = report["eval"], report["tokenizer"], report["bpe"]
    lines = [f"# Tessera run `{report['run']}`", "", "| figure | value |", "|---|---|"]
    if has_shapes_suite(e):
        lines += [f"| caption attribute accuracy | {figure(e['caption_accuracy'])} |",
                  f"| VQA accuracy | {figure(e['vqa_accuracy'])} |",
                  f"| POPE accuracy / F1 / yes-ratio | {figure(e['pope_accuracy'])} / {figure(e['pope_f1'])} / {figure(e['pope_yes_ratio'])} |",
                  f"| generation accuracy (analyser; caption-shuffled chance) | {figure(e['generation_accuracy'])} "
                  f"({figure(report['chance'].get('generation_accuracy'))}) |",
                  *([f"| generation: best of {e['generation_candidates']} by {CHOOSER_WORDS.get(e.get('generation_chooser'), 'the model')}; one sample | "
                     f"{figure(e['generation_accuracy'])}; {figure(e.get('generation_accuracy_single'))} |"]
                    if (e.get("generation_candidates") or 1) > 1 else []),
                  f"| generation ceiling (analyser on the tokenizer's round trip) | {figure(e.get('generation_ceiling'))} |",
                  f"| analyser accuracy on real held-out images | {figure(e['analyser_accuracy'])} |",
                  f"| perplexity text / image | {figure(e['text_perplexity'])} / {figure(e['image_perplexity'])} |"]
    lines += [f"| eval set `{name}` ({s['kind']}) | {set_summary(s)} |" for name, s in e.get("sets", {}).items()]
    lines += [f"| tokenizer PSNR / SSIM / LPIPS | {figure(t['psnr'])} dB / {figure(t['ssim'])} / {figure(t['lpips'])} |",
              f"| visual BPE tokens per image | {figure(b['tokens_per_image_before'])} -> {figure(b['tokens_per_image_after'])} |",
              f"| training | {report['train']['steps']} steps, final loss {figure(report['train']['final_loss'])}, "
              f"{figure(report['train']['mean_tokens_per_s'])} tokens/s, packing {figure(report['train']['mean_packing_efficiency'])} |",
              f"| wall time | {report['time']['total_s']:.0f} s |", "",
              "VQA by question type: " + ", ".join(f"{k} {v:.2f}" for k, v in e.get("vqa_by_type", {}).items()), "",
              "## Time per stage", "", "| stage | seconds | skipped |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['skipped']} |" for k, v in report["stages"].items()]
    for title, key in (("Reconstructions (top: held-out images, bottom: decoded codes)", "reconstructions"),
                       ("Most frequent visual-BPE tiles", "bpe_tiles"), ("Loss curves (stage boundaries marked)", "loss_curve"),
                       ("Text -> image: generated images and their prompts", "generated")):
        if key in rel:
            lines += ["", f"## {title}", "", f"![{key}]({rel[key]})"]
    lines += ["", "## Examples", ""]
    lines += [f"- caption: truth *{c['truth']}* / generated *{c['generated']}*" for c in report["examples"].get("captions", [])[:4]]
    lines += [f"- {q['question']} truth *{q['truth']}* / answered *{q['predicted']}*" for q in report["examples"].get("questions", [])[:6]]
    for name, s in e.get("sets", {}).items():
        lines += [f"- `{name}`: {x['asked'] or '(caption)'} → *{x['answered']}*" for x in s["examples"][:3]]
    if ablation:
        lines += ["", "## Ablations", "", ablation["markdown"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def uses_shapes_world(cfg) -> bool:
    """Whether a source or an evaluation set reads what `tessera synth` writes: a run on the user's own
    corpora synthesises nothing (and eval finds no shapes-world held-out set, so runs only `eval.sets`)."""
    world = cfg.resolve(cfg.synth.output).rstrip("/") + "/"
    locations = [s.uri for s in cfg.prepare.sources] + [s.uri for s in cfg.eval.sets]
    return any(cfg.resolve(u).startswith(world) for u in locations if u)


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("run", argv, "Run the whole graph: synth -> prepare -> train-tokenizer -> tokenize -> fit-bpe -> train -> eval.")
    resubmit = resubmit_record("tessera.jobs.run", list(argv if argv is not None else sys.argv[1:]))  # resume re-runs the graph
    t0 = time.perf_counter()
    stages: dict = {}
    reports: dict = {}
    with Console(logs_dir(cfg)) as console:
        if uses_shapes_world(cfg):
            with console.stage("synth") as line:
                synth_result = run_synth(cfg)
                line.note = "complete, nothing to do" if synth_result["skipped"] else ""
            stages["synth"] = {"seconds": synth_result["seconds"], "skipped": synth_result["skipped"]}
        preflight("run", lambda: check_sources(cfg.prepare.sources, cfg.resolve), say=console.print)
        with ray_session(cfg.ray):  # Ray's start-up and shutdown lines go to logs/tessera.log
            for name, fn, section in STAGES:
                t = time.perf_counter()
                with console.stage(name) as line:
                    reports[name] = fn(cfg, resubmit) if fn is train else fn(cfg)
                    line.note = "complete, nothing to do" if reports[name].get("skipped") else ""
                stages[name] = {"seconds": round(time.perf_counter() - t, 3), "skipped": reports[name].get("skipped", False)}
        report = build_report(cfg, stages, reports, time.perf_counter() - t0)
        report_uri = storage.join(cfg.run.root, "report.json")
        storage.write_json(report_uri, report)
        ablation_uri = storage.join(cfg.run.root, "ablations", "report.json")
        ablation = storage.read_json(ablation_uri) if storage.exists(ablation_uri) else None
        md = write_markdown(report, storage.join(cfg.run.root, "report.md"), ablation)
        for text in summary_lines(report, reports, report_uri, md):
            console.print(text)
    return report


def _merged_codes(tokenizer_report: dict) -> str:
    """", 70 duplicate codes retired (186 active)" for a tokenizer that merged its codebook, else ""."""
    depths = (tokenizer_report.get("merged_codes") or {}).get("depths") or []
    if not depths:
        return ""
    return (f", {sum(d['retired'] for d in depths)} duplicate codes retired ({'/'.join(str(d['active']) for d in depths)} active), "
            f"the commonest code {tokenizer_report['metrics']['pixel_top_code_share']:.2f} of an image")


def summary_lines(report: dict, reports: dict, report_uri: str, md: str) -> list[str]:
    """The run's summary as the console ends it."""
    prep, tok, toks, bpe = (reports[n] for n in ("prepare", "train-tokenizer", "tokenize", "fit-bpe"))
    e = report["eval"]
    lines = ["", "== tessera run: summary =="]
    lines += [f"  {name:<16} {'skipped (complete)' if s['skipped'] else 'ran'} in {s['seconds']:.1f}s" for name, s in report["stages"].items()]
    lines += [f"  samples: {prep['rows_out']}   rejects: {prep['rejects']} {prep['rejects_by_reason']}",
              f"  tokenizer: held-out PSNR {tok['metrics']['psnr']:.2f} dB, SSIM {tok['metrics']['ssim']:.3f}, "
              f"codebook usage {tok['metrics']['pixel_usage']}{_merged_codes(tok)}",
              f"  tokens: {toks['rows_out']} rows, {toks['images']} images, {toks['text_tokens']} text tokens",
              f"  visual BPE: {bpe['merges_done']} merges, tokens per image {bpe['tokens_per_image_before']} -> {bpe['tokens_per_image_after']}",
              f"  model: {report['train']['steps']} steps, final loss {report['train']['final_loss']}"]
    if has_shapes_suite(e):
        lines += [f"  eval: captions {e['caption_accuracy']:.3f}, VQA {e['vqa_accuracy']:.3f}, POPE acc {e['pope_accuracy']:.3f} "
                  f"F1 {e['pope_f1']:.3f}, generation {generation_summary(report)} "
                  f"(analyser {e['analyser_accuracy']:.3f})",
                  "  VQA by type: " + ", ".join(f"{t} {a:.2f} (chance {report['chance']['uniform_by_type'].get(t, 0):.2f})"
                                                for t, a in e.get("vqa_by_type", {}).items())]
    lines += [f"  eval set {name} ({s['kind']}): {set_summary(s)}" for name, s in e.get("sets", {}).items()]
    lines += [
              f"  reconstructions: {tok['pngs']['reconstructions']}",
              f"  BPE tiles:       {bpe['png']}",
              f"  loss curve:      {report['pngs']['loss_curve']}"]
    lines += [f"  {name + ' report:':<24} {uri}" for name, uri in report["reports"].items()]
    lines += [f"  run report:              {report_uri}", f"  run report (markdown):   {md}"]
    return lines


if __name__ == "__main__":
    main()
