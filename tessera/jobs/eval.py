"""`tessera eval`: understanding, generation and perplexity of a trained model on the held-out
shapes world (see `tessera.model.evaluate`). Writes <eval.output>/report.json and
generated.png (a grid of generated images with their prompts)."""

from __future__ import annotations

import os
import time

import torch

from tessera import storage
from tessera.config import TesseraConfig
from tessera.console import Console
from tessera.jobs.common import JobState, fingerprint, logs_dir, parse_args


def heldout_rows(ev, held, limit: int = 48) -> list[dict]:
    """Held-out (image, caption) pairs as token rows, for perplexity."""
    rows = []
    for s in held.scenes[:limit]:
        img = ev.image_row(s["image"])
        rows.append({**img, "sample_id": s["id"], "kind": "image_text", "is_image": [True, False],
                     "text_ids": [[], ev.encode_text(s["caption"])], "pixel_codes": img["pixel_codes"] + [[]],
                     "semantic_codes": (img["semantic_codes"] + [[]]) if img["semantic_codes"] else [[], []],
                     "grid_shapes": img["grid_shapes"] + [[]], "timestamps": None, "meta": "{}",
                     **({"pixel_features": img["pixel_features"] + [[]]} if "pixel_features" in img else {})})
    return rows


def chance_levels(questions: list[dict]) -> dict:
    """Per question type: uniform chance over the valid answers, and the majority answer's share
    on this held-out set (the best a model that ignores the image can do)."""
    from collections import Counter

    from tessera.model.evaluate import CHANCE

    by_type: dict[str, Counter] = {}
    for q in questions:
        by_type.setdefault(q["type"], Counter())[q["answer"]] += 1
    majority = {t: round(c.most_common(1)[0][1] / sum(c.values()), 4) for t, c in sorted(by_type.items())}
    vqa_types = [t for t in majority if t != "exists"]
    return {"uniform_by_type": {t: round(CHANCE[t], 4) for t in majority}, "majority_by_type": majority,
            "vqa_uniform": round(float(sum(CHANCE[t] for t in vqa_types) / max(1, len(vqa_types))), 4)}


def evaluate_model(cfg: TesseraConfig) -> dict:
    """Run (or skip) the held-out suite on `eval.model`; returns its report."""
    from tessera.model.assets import read_info

    ec = cfg.eval
    out = os.path.abspath(cfg.resolve(ec.output))
    model_dir = cfg.resolve(ec.model)
    info = read_info(model_dir)
    state = JobState(out, fingerprint(cfg.section_fingerprint("eval", "run"), info.get("bpe"), info.get("tokenizer"),
                                      info.get("global_step"), os.path.getmtime(os.path.join(model_dir, "tessera.json"))))
    if state.is_complete():
        print(f"[tessera] eval: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    t0 = time.perf_counter()
    ev, held = _evaluator(cfg, model_dir)
    if held is not None:
        results, seconds = _run_suite(ev, held, ec, out)
    else:  # no shapes world: only the published sets
        results, seconds = {"eval": {}, "chance": {}, "counts": {}, "examples": {}, "generated_png": None}, {}
    t = time.perf_counter()
    results["eval"]["sets"] = {s.name: score_set(ev, s, cfg) for s in ec.sets}
    seconds["sets"] = round(time.perf_counter() - t, 2)
    report = {"job": "eval", "model": os.path.abspath(model_dir), **results, "seconds": seconds,
              "wall_time_s": round(time.perf_counter() - t0, 2)}
    state.finish(report)
    return report


def _evaluator(cfg: TesseraConfig, model_dir: str):
    """The trained model with everything it was trained with (tokenizers, BPE), over the held-out set."""
    from tessera.model.assets import load_assets, load_model
    from tessera.model.evaluate import Evaluator, HeldOut
    from tessera.model.sequence import SequenceBuilder
    from tessera.tokenize.tokenizer import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_model(model_dir, device)
    mc = model.cfg
    assets = load_assets(mc, cfg.resolve)
    tokenizer, tcfg, _ = load_tokenizer(cfg.resolve(mc.tokenizer), device)
    sizes, depth = assets.rvq_geometry(mc)
    builder = SequenceBuilder(model.vocab, assets.bpe, tuple(mc.codebooks), depth, tuple(sizes), cfg.bpe.codebook, cfg.bpe.depth)
    heldout_dir = cfg.resolve(cfg.eval.heldout)
    held = HeldOut.load(heldout_dir, tcfg.image_size) if storage.exists(storage.join(heldout_dir, "scenes.jsonl")) else None
    return Evaluator(model, builder, assets.text_tokenizer, tokenizer, held, device, image_size=tcfg.image_size,
                     question_first=mc.question_first), held


def score_set(ev, spec, cfg: TesseraConfig) -> dict:
    """One published held-out set (`eval.sets`): its images read and normalised as `prepare` does, the
    model asked each question (or for a caption), the answers scored by `tessera.model.eval_sets`.
    Images that cannot be read are counted (`images_unreadable`), not scored."""
    import dataclasses

    from tessera.model import eval_sets
    from tessera.pipelines.images import Rejected, decode_image

    uri = cfg.resolve(spec.uri)
    folder = cfg.resolve(spec.image_folder) if spec.image_folder else uri.rsplit("/", 1)[0]
    rows = eval_sets.load_items(spec.kind, uri)[: spec.limit or None]
    image_cfg = dataclasses.replace(cfg.prepare.image, resolution=ev.image_size)
    loaded, unreadable = {}, 0
    for name in dict.fromkeys(r["image"] for r in rows):
        try:
            loaded[f"{spec.name}/{name}"] = decode_image(storage.read_bytes(storage.join(folder, name)), image_cfg)
        except (Rejected, OSError, FileNotFoundError):
            unreadable += 1
    ev.add_images(loaded)
    rows = [r for r in rows if f"{spec.name}/{r['image']}" in loaded]
    if spec.kind == "captions":
        preds = [ev.answer(f"{spec.name}/{r['image']}", None, 48) for r in rows]
        result = eval_sets.caption_scores(preds, [eval_sets.captions_of(r) for r in rows])
    else:
        preds = [ev.answer(f"{spec.name}/{r['image']}", eval_sets.question_of(spec.kind, r), 8) for r in rows]
        if spec.kind == "pope":
            result = eval_sets.pope_scores(preds, [r["label"] for r in rows])
        else:
            accs = [eval_sets.vqa_accuracy(p, eval_sets.answers_of(r)) for p, r in zip(preds, rows)]
            result = {"accuracy": sum(accs) / max(1, len(accs)), "questions": len(accs)}
    examples = [{"image": r["image"], "asked": eval_sets.question_of(spec.kind, r) if spec.kind != "captions" else None,
                 "answered": p} for r, p in zip(rows[:6], preds[:6])]
    return {"kind": spec.kind, "uri": uri, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
            "images_unreadable": unreadable, "examples": examples}


def _run_suite(ev, held, ec, out: str) -> tuple[dict, dict]:
    """Captions, questions (VQA + POPE), text -> image, perplexity; with chance levels and examples."""
    from tessera.model.evaluate import plot_generations

    seconds, t = {}, time.perf_counter()
    captions = ev.captions(ec.num_captions or None)
    seconds["captions"], t = round(time.perf_counter() - t, 2), time.perf_counter()
    questions = ev.questions(ec.num_questions or None)
    seconds["questions"], t = round(time.perf_counter() - t, 2), time.perf_counter()
    analyser_accuracy, ceiling = ev.analyser_accuracy(), ev.generation_ceiling()
    generates = ec.num_generate and ev.model.vocab.interface != "continuous"  # a generated code has no encoder feature to read
    gen = ev.generation(ec.num_generate, ec.cfg_scale, ec.temperature, ec.top_k, ec.seed, ec.generation_candidates,
                        ec.generation_chooser) \
        if generates else {"generation_accuracy": None, "generation_chance": None, "generated": 0, "samples": [],
                           "candidates": ec.generation_candidates, "chooser": ec.generation_chooser,
                           "generation_accuracy_single": None}
    seconds["generation"] = round(time.perf_counter() - t, 2)
    png = plot_generations(gen.pop("samples"), os.path.join(out, "generated.png")) if gen["generated"] else None
    ppl = ev.perplexity(heldout_rows(ev, held), 1024)
    n_yes = sum(q["answer"] == "yes" for q in held.questions if q["type"] == "exists")
    n_exists = sum(q["type"] == "exists" for q in held.questions)
    q = questions
    return {
        "eval": {"caption_accuracy": captions["caption_accuracy"], "vqa_accuracy": q["vqa_accuracy"],
                 "pope_accuracy": q["pope_accuracy"], "pope_f1": q["pope_f1"], "pope_precision": q["pope_precision"],
                 "pope_recall": q["pope_recall"], "pope_yes_ratio": q["pope_yes_ratio"],
                 "generation_accuracy": gen["generation_accuracy"], "analyser_accuracy": analyser_accuracy,
                 "generation_ceiling": ceiling, "generation_candidates": gen["candidates"],
                 "generation_chooser": gen["chooser"],
                 "generation_accuracy_single": gen["generation_accuracy_single"],
                 # string keys, as JSON writes them: the report in memory equals the one read back
                 "generation_accuracy_best_of": {str(k): v for k, v in gen["generation_accuracy_best_of"].items()}
                 if gen.get("generation_accuracy_best_of") else None,
                 "vqa_by_type": q["vqa_by_type"], "valid_answer_rate": q["valid_answer_rate"], **ppl},
        "chance": {"pope_accuracy": max(n_yes, n_exists - n_yes) / max(1, n_exists), **chance_levels(held.questions),
                   "generation_accuracy": gen["generation_chance"]},
        "counts": {"captions": captions["captions"], "questions": q["questions"], "generated": gen["generated"]},
        "examples": {"captions": captions["caption_examples"], "questions": q["question_examples"]},
        "generated_png": png,
    }, seconds


def has_shapes_suite(e: dict) -> bool:
    """Whether an eval report's figures include the shapes world's own suite (a run on the user's
    own corpora has only its published sets)."""
    return "caption_accuracy" in e


def set_summary(s: dict) -> str:
    """One line of a published set's figures."""
    if s["kind"] == "pope":
        return (f"accuracy {s['accuracy']:.3f} precision {s['precision']:.3f} recall {s['recall']:.3f} F1 {s['f1']:.3f} "
                f"yes-ratio {s['yes_ratio']:.2f} ({s['questions']} questions)")
    if s["kind"] == "vqa":
        return f"VQA accuracy {s['accuracy']:.3f} ({s['questions']} questions)"
    return f"CIDEr-D {s['cider']:.3f} BLEU-4 {s['bleu4']:.3f} ({s['captions']} images)"


def figure(v) -> str:
    """A report figure for people: three decimals, `n/a` for a figure not measured."""
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def generation_summary(report: dict) -> str:
    """Text -> image for people: the score, best-of-n with one sample's score beside it, its chance and
    the tokenizer's ceiling ("0.700 best of 8, one sample 0.620 (chance 0.066, at most 0.868)")."""
    e = report["eval"]
    n = e.get("generation_candidates") or 1
    best_of = f" best of {n}, one sample {figure(e.get('generation_accuracy_single'))}" if n > 1 else ""
    return (f"{figure(e['generation_accuracy'])}{best_of} (chance {figure(report['chance'].get('generation_accuracy'))}, "
            f"at most {figure(e.get('generation_ceiling'))})")


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("eval", argv, "Evaluate a trained model on the held-out shapes world.")
    with Console(logs_dir(cfg)) as console:
        with console.stage("eval") as line:
            report = evaluate_model(cfg)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        e = report["eval"]
        if has_shapes_suite(e):
            console.print(f"[tessera] eval: captions {e['caption_accuracy']:.3f}  VQA {e['vqa_accuracy']:.3f}  POPE acc "
                          f"{e['pope_accuracy']:.3f} F1 {e['pope_f1']:.3f} yes-ratio {e['pope_yes_ratio']:.2f}  generation "
                          f"{generation_summary(report)} (analyser {e['analyser_accuracy']:.3f})")
            chance = report["chance"]["uniform_by_type"]
            console.print("[tessera] eval VQA by type (uniform chance): "
                          + ", ".join(f"{t} {a:.2f} ({chance.get(t, 0):.2f})" for t, a in e["vqa_by_type"].items()))
        for name, s in e.get("sets", {}).items():
            console.print(f"[tessera] eval set {name} ({s['kind']}): " + set_summary(s))
        console.print(f"[tessera] eval report: {cfg.resolve(cfg.eval.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
