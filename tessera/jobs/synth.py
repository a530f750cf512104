"""`tessera synth`: write the built-in shapes world in real source formats.

Runs on the driver (it is a few seconds of rendering); the output must be a local path
or a shared mount that every node of a cluster sees.
"""

from __future__ import annotations

from tessera import storage
from tessera.config import TesseraConfig
from tessera.console import Console
from tessera.jobs.common import logs_dir, parse_args
from tessera.timing import Timer
from tessera.pipelines import synth


def run_synth(cfg: TesseraConfig) -> dict:
    out = cfg.resolve(cfg.synth.output)
    if not storage.is_local(out):
        raise SystemExit(f"tessera synth: synth.output must be a local path or shared mount, got {out}")
    timer = Timer()
    with timer("synth"):
        manifest = synth.write_world(out, cfg.synth, cfg.run.seed, cfg.section_fingerprint("synth") + f"-{cfg.run.seed}")
    if manifest["skipped"]:
        print(f"[tessera] synth: complete, nothing to do ({out}/manifest.json)")
    return manifest | {"output": out, "seconds": timer.seconds["synth"]}


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("synth", argv, "Write the shapes world (webdataset, HF dataset, MP4 + subtitles, web docs, held-out questions).")
    with Console(logs_dir(cfg)) as console:
        with console.stage("synth") as line:
            result = run_synth(cfg)
            line.note = "complete, nothing to do" if result.get("skipped") else ""
        console.print(f"[tessera] synth: {result['counts']} -> {result['output']}")
    return result


if __name__ == "__main__":
    main()
