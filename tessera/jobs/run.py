"""`tessera run`: the whole job graph in order, skipping stages whose outputs are complete.

Stages share one Ray session. Each stage decides for itself whether its outputs are
complete (its report carries a fingerprint of its config and inputs), so a re-run after
success only checks, and a run interrupted anywhere resumes at the interrupted stage.
"""

from __future__ import annotations

import time

from tessera import storage
from tessera.jobs.common import parse_args, ray_session
from tessera.jobs.fit_bpe import fit_bpe
from tessera.jobs.prepare import prepare
from tessera.jobs.synth import run_synth
from tessera.jobs.tokenize import tokenize
from tessera.jobs.train_tokenizer import train_tokenizer

# (stage, function, config section holding its output location)
STAGES = [
    ("prepare", prepare, "prepare"),
    ("train-tokenizer", train_tokenizer, "tokenizer"),
    ("tokenize", tokenize, "tokenize"),
    ("fit-bpe", fit_bpe, "bpe"),
]


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("run", argv, "Run the whole graph: synth -> prepare -> train-tokenizer -> tokenize -> fit-bpe.")
    t0 = time.perf_counter()
    synth_result = run_synth(cfg)
    stages: dict = {"synth": {"seconds": synth_result["seconds"], "skipped": synth_result["skipped"]}}
    reports: dict = {}
    with ray_session(cfg.ray):
        for name, fn, section in STAGES:
            t = time.perf_counter()
            reports[name] = fn(cfg)
            stages[name] = {"seconds": round(time.perf_counter() - t, 3), "skipped": reports[name].get("skipped", False)}
    prep, tok, toks, bpe = (reports[n] for n, _, _ in STAGES)
    report = {
        "run": cfg.run.name,
        "stages": stages,
        "time": {"total_s": round(time.perf_counter() - t0, 3), **{k: v["seconds"] for k, v in stages.items()}},
        "prepare": {"samples": prep["rows_out"], "rejects": prep["rejects"], "rejects_by_reason": prep["rejects_by_reason"]},
        "tokenizer": {k: tok["metrics"][k] for k in ("psnr", "ssim", "lpips", "pixel_usage")},
        "tokenize": {"rows": toks["rows_out"], "images": toks["images"], "text_tokens": toks["text_tokens"]},
        "bpe": {"tokens_per_image_before": bpe["tokens_per_image_before"], "tokens_per_image_after": bpe["tokens_per_image_after"],
                "merges": bpe["merges_done"], "vocabulary_usage_heldout": bpe["vocabulary_usage_heldout"]},
        "reports": {name: storage.join(cfg.resolve(getattr(cfg, section).output), "report.json") for name, _, section in STAGES},
    }
    report_uri = storage.join(cfg.run.root, "report.json")
    storage.write_json(report_uri, report)
    print("\n== tessera run: summary ==")
    for name, s in stages.items():
        print(f"  {name:<16} {'skipped (complete)' if s['skipped'] else 'ran'} in {s['seconds']:.1f}s")
    print(f"  samples: {prep['rows_out']}   rejects: {prep['rejects']} {prep['rejects_by_reason']}")
    print(f"  tokenizer: held-out PSNR {tok['metrics']['psnr']:.2f} dB, SSIM {tok['metrics']['ssim']:.3f}, "
          f"codebook usage {tok['metrics']['pixel_usage']}")
    print(f"  tokens: {toks['rows_out']} rows, {toks['images']} images, {toks['text_tokens']} text tokens")
    print(f"  visual BPE: {bpe['merges_done']} merges, tokens per image {bpe['tokens_per_image_before']} -> {bpe['tokens_per_image_after']}")
    print(f"  reconstructions: {tok['pngs']['reconstructions']}")
    print(f"  BPE tiles:       {bpe['png']}")
    for name, uri in report["reports"].items():
        print(f"  {name + ' report:':<24} {uri}")
    print(f"  run report:              {report_uri}")
    return report


if __name__ == "__main__":
    main()
