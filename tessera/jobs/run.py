"""`tessera run`: the whole job graph in order, skipping stages whose outputs are complete.

Stages share one Ray session. Each stage decides for itself whether its outputs are
complete (its report carries the config fingerprint), so a re-run after success only
checks, and a run interrupted anywhere resumes at the interrupted stage.
"""

from __future__ import annotations

import time

from tessera import storage
from tessera.jobs.common import parse_args, ray_session
from tessera.jobs.prepare import prepare
from tessera.jobs.synth import run_synth
from tessera.jobs.train_tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("run", argv, "Run the whole graph: synth -> prepare (-> later stages as they exist).")
    t0 = time.perf_counter()
    stages: dict = {}
    synth_result = run_synth(cfg)
    stages["synth"] = {"seconds": synth_result["seconds"], "skipped": synth_result["skipped"]}
    with ray_session(cfg.ray):
        t = time.perf_counter()
        prep = prepare(cfg)
        stages["prepare"] = {"seconds": round(time.perf_counter() - t, 3), "skipped": prep.get("skipped", False),
                             "rows_out": prep["rows_out"], "rejects": prep["rejects"], "rejects_by_reason": prep["rejects_by_reason"]}
        t = time.perf_counter()
        tok = train_tokenizer(cfg)
        stages["train-tokenizer"] = {"seconds": round(time.perf_counter() - t, 3), "skipped": tok.get("skipped", False)}
    report = {
        "run": cfg.run.name,
        "stages": stages,
        "time": {"total_s": round(time.perf_counter() - t0, 3), **{k: v["seconds"] for k, v in stages.items()}},
        "tokenizer": {"psnr": tok["metrics"]["psnr"], "ssim": tok["metrics"]["ssim"], "lpips": tok["metrics"]["lpips"],
                      "pixel_usage": tok["metrics"]["pixel_usage"]},
        "reports": {"prepare": storage.join(cfg.resolve(cfg.prepare.output), "report.json"),
                    "train-tokenizer": storage.join(cfg.resolve(cfg.tokenizer.output), "report.json")},
    }
    report_uri = storage.join(cfg.run.root, "report.json")
    storage.write_json(report_uri, report)
    print("\n== tessera run: summary ==")
    for name, s in stages.items():
        print(f"  {name:<16} {'skipped (complete)' if s['skipped'] else 'ran'} in {s['seconds']:.1f}s")
    print(f"  samples: {stages['prepare']['rows_out']}   rejects: {stages['prepare']['rejects']} {stages['prepare']['rejects_by_reason']}")
    print(f"  tokenizer: held-out PSNR {tok['metrics']['psnr']:.2f} dB, SSIM {tok['metrics']['ssim']:.3f}, "
          f"codebook usage {tok['metrics']['pixel_usage']}")
    print(f"  reconstructions: {tok['pngs']['reconstructions']}")
    print(f"  synth world:    {synth_result['output']}")
    print(f"  prepare report: {report['reports']['prepare']}")
    print(f"  run report:     {report_uri}")
    return report


if __name__ == "__main__":
    main()
