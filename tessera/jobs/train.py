"""`tessera train`: the staged curriculum on Ray Train, with exact resume.

    tokens/*.parquet --driver: index + per-stage mixture plan, cut into packing groups-->
    Ray Data per rank: groups --pack_groups (BPE encode, sequences, packing)--> packed rows
    --> TorchTrainer (DDP / FSDP2) workers: get_dataset_shard(f"rank{r}").iter_torch_batches()

Each stage is one Ray Train run (`RunConfig(storage_path, name=<run>-train-<fingerprint>-<i>-<stage>)`),
started from the previous stage's weights. A checkpoint holds model, optimizer, scheduler,
RNG, stage, step and every rank's data position (next (group, row)); after a worker failure
(`FailureConfig`) or a re-run of the same command, the stage continues from its latest
checkpoint, and because the data stream is a pure function of (config, seed, tokens), the
losses of the resumed steps equal those of an uninterrupted run. Finished stages are skipped.

Outputs: <train.output>/model (the final model, transformers format + tessera.json),
stages/<i>-<name>/model, metrics.csv, loss_curve.png, state.json (for `tessera runs`),
report.json.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import sys
import time

import numpy as np

from tessera import storage
from tessera.config import ConfigError, TesseraConfig, config_from_dict
from tessera.console import Console
from tessera.faults import StepFault, fault_point
from tessera.jobs.common import (JobState, fingerprint, logs_dir, parse_args, preserve_data_order, ray_job_record, ray_session,
                                 resubmit_record, run_ray_train_loop, without_progress_bars)
from tessera.loop import worker_print
from tessera.manifest import dataset_files

PROBE_TYPES = ("colour", "shape", "size", "position", "count", "exists")
GROUPS_PER_BLOCK = 8  # packing groups per Ray Data block (and task)
METRIC_FIELDS = ["step", "stage", "stage_index", "stage_step", "loss", "text_loss", "image_loss", "lr", "grad_norm",
                 "tokens_per_s", "packing_efficiency"] + [f"probe_{t}" for t in PROBE_TYPES]


# ----------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build the Ray-free `StageLoop` over this rank's shard, then hand it to the adapter."""
    import ray.train
    import torch

    from tessera.model.evaluate import run_probe
    from tessera.model.loop import StageLoop
    from tessera.model.stream import RowStream
    from tessera.model.trainer import StageTrainer

    cfg = config_from_dict(config["cfg"])
    tc, i = cfg.train, config["stage_index"]
    stage = tc.stages[i]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, math.ceil(tc.cpus_per_worker)))  # Ray sets OMP_NUM_THREADS=1
    # (seed, stage, rank) through a SeedSequence: distinct streams at any worker count
    torch.manual_seed(int(np.random.SeedSequence([tc.effective_seed(cfg.run.seed), i, rank]).generate_state(1)[0]))
    device = ray.train.torch.get_device()
    model = _initial_model(cfg, config).to(device)
    trainer = StageTrainer(model, stage, tc.weight_decay, tc.grad_clip, device, _parallel_wrapper(tc.strategy, world))
    micro = stage.batch_size // (world * tc.grad_accum)
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    stream = RowStream(lambda: shard.iter_torch_batches(batch_size=micro, dtypes=torch.int64), micro, rank, world, stage.name)
    probe = (lambda: run_probe(model, config["probe"])) if config["probe"] and rank == 0 else None
    loop = StageLoop(trainer, stream, stage.steps, grad_accum=tc.grad_accum, world=world, log_every=tc.log_every,
                     checkpoint_every=tc.checkpoint_every, probe_every=tc.probe_every, probe=probe,
                     offset=config["step_offset"], stage_name=stage.name, stage_index=i)
    total = sum(s.steps for s in tc.stages)
    log = (lambda step: _log_step(config["metrics_csv"], stage, total, step.metrics)) if rank == 0 else None
    fault = StepFault(**config["fault"]) if config["fault"] and rank == 0 else None  # a test hook (tessera.faults)
    after_step = (lambda step: fault(config["step_offset"] + step.step)) if fault else None
    run_ray_train_loop(loop, rank, f"[train] stage {i} {stage.name!r}:", on_log=log, after_step=after_step)


def _initial_model(cfg: TesseraConfig, config: dict):
    """The previous stage's model, or a fresh one (from the run's seed) for the first stage."""
    from tessera.model.assets import load_model
    from tessera.model.unified import TesseraModel
    from tessera.model.vocab import Vocabulary

    if config["init_model"]:
        return load_model(config["init_model"])
    return TesseraModel.create(cfg.model, Vocabulary.from_dict(config["vocabulary"]), config["codebook_sizes"],
                               config["depth"], seed=cfg.train.effective_seed(cfg.run.seed), tile_codes=config.get("tile_codes"))


def _parallel_wrapper(strategy: str, world: int):
    """module -> its data-parallel form: none for one worker, FSDP2 per decoder layer, or DDP."""
    import ray.train.torch

    from tessera.model.trainer import fsdp_wrap

    def wrap(module):
        if world == 1:
            return module
        if strategy == "fsdp":
            return fsdp_wrap(module)
        return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})
    return wrap


def _log_step(metrics_csv: str, stage, total_steps: int, metrics: dict) -> None:
    """Rank 0: one metrics.csv row and one log line per logged step (its last `a/b` is the whole run's,
    so the console's estimate of the time left covers every stage)."""
    _append_csv(metrics_csv, metrics)
    probed = " ".join(f"{k[6:]} {v:.2f}" for k, v in metrics.items() if k.startswith("probe_"))
    worker_print(f"[train] {stage.name} step {metrics['stage_step']}/{stage.steps} (global {metrics['step']}/{total_steps}) "
                 f"loss {metrics['loss']:.4f} text {metrics['text_loss']:.3f} image {metrics['image_loss']:.3f} "
                 f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s" + (f" | probe {probed}" if probed else ""))


def _append_csv(uri: str, row: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, restval="")
    if not storage.exists(uri):
        w.writeheader()
    w.writerow(row)
    storage.append_text(uri, buf.getvalue())


def read_metrics(uri: str) -> list[dict]:
    """The metrics log, one row per logged step (a step re-done after a resume keeps its last entry)."""
    if not storage.exists(uri):
        return []
    by_step: dict[int, dict] = {}
    for r in csv.DictReader(io.StringIO(storage.read_text(uri))):
        by_step[int(r["step"])] = {k: (r[k] if k == "stage" else float(r[k]) if r.get(k) else None) for k in METRIC_FIELDS}
    return [by_step[k] for k in sorted(by_step)]


# ----------------------------------------------------------------------------- driver


def _stage_datasets(cfg: TesseraConfig, index, stage_index: int, spec_kwargs: dict):
    """One Ray Dataset per rank: that rank's packing groups, always from the stage's beginning.

    A resumed worker skips to the data position stored in the checkpoint Ray Train restored
    (`RowStream.load_state_dict`); the driver never guesses it from checkpoint folders, because the newest folder may
    be one Ray Train never recorded (a stop or crash right after the report), and a stream that
    started past the restored position would run dry."""
    import ray.data

    from tessera.model.rows import pack_groups

    world = cfg.train.num_workers
    spec = stage_spec(cfg, stage_index, spec_kwargs)
    plan, groups, per_rank = stage_groups(cfg, index, stage_index, spec)
    stats = _plan_statistics(index, plan, spec, groups[:2])
    preserve_data_order()  # the stream order is part of the data position
    datasets = {}
    for r in range(world):
        items = [{"group": g, "files": [index.files[s] for s, _ in grp], "rows": [index.rows[s] for s, _ in grp],
                  "epochs": [e for _, e in grp]} for g, grp in enumerate(groups) if g % world == r]
        # Packed ahead of training (materialised in the object store): packing tasks running beside
        # the steps would take CPU from the worker's torch threads on a small machine. Whole CPUs and
        # blocks of several groups: fractional tasks make Ray start (and then reap) worker processes
        # beyond its pool of one per CPU; on 2 cores the same 26 groups took 37 s that way, 4.8 s this way.
        blocks = max(1, math.ceil(len(items) / GROUPS_PER_BLOCK))
        datasets[f"rank{r}"] = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            pack_groups, fn_kwargs={"spec": spec}, batch_size=None, num_cpus=1).materialize()
        without_progress_bars(datasets[f"rank{r}"])
    return datasets, {"plan_samples": len(plan), "groups": len(groups), "estimated_rows_per_rank": per_rank, **stats}


def stage_spec(cfg: TesseraConfig, stage_index: int, spec_kwargs: dict):
    """The `BuildSpec` a stage's packing tasks build its rows with."""
    from tessera.model.rows import BuildSpec

    tc, stage = cfg.train, cfg.train.stages[stage_index]
    return BuildSpec(seq_len=stage.seq_len, loss_mask=stage.loss_mask, seed=tc.effective_seed(cfg.run.seed),
                     stage=stage_index, t2i_rate=tc.t2i_rate_of(stage), cfg_text_dropout=tc.cfg_text_dropout,
                     questions=stage.questions, questions_rate=stage.questions_rate, **spec_kwargs)


def stage_groups(cfg: TesseraConfig, index, stage_index: int, spec) -> tuple[list, list, list]:
    """(plan, packing groups, estimated rows per rank): the stage's sample plan, drawn long enough that
    every rank gets its `steps * batch_size / world` rows with slack (estimated by packing the index's
    lengths), cut into groups of `pack_group` samples (group g goes to rank g % world)."""
    from tessera.model.mixture import estimate_rows, stage_plan

    tc, stage = cfg.train, cfg.train.stages[stage_index]
    world = tc.num_workers
    rows_per_rank = stage.steps * stage.batch_size // world
    mean_len = float(np.mean(np.minimum(index.lengths, stage.seq_len)))
    n = int(rows_per_rank * world * stage.seq_len / mean_len * 1.3) + 2 * world * tc.pack_group
    shrink = None  # rows built / rows estimated: 1 unless the stage keeps only some questions (`_questions_shrink`)
    while True:
        plan = stage_plan(index, stage.mixture.weights, n, tc.effective_seed(cfg.run.seed), stage_index, stage.mixture.order)
        groups = [plan[g:g + tc.pack_group] for g in range(0, len(plan), tc.pack_group)]
        est = [estimate_rows(index.lengths[[s for s, _ in grp]], stage.seq_len) for grp in groups]
        if shrink is None:
            shrink = 1.0 if stage.questions is None else _questions_shrink(stage, index, spec, groups[0], est[0])
        per_rank = [sum(e for g, e in enumerate(est) if g % world == r) * shrink for r in range(world)]
        if min(per_rank) >= rows_per_rank * 1.2 + tc.pack_group:
            return plan, groups, [int(p) for p in per_rank]
        n *= 2


@functools.lru_cache(maxsize=4)
def _built_group(spec, files: tuple, rows: tuple, epochs: tuple, g: int) -> tuple:
    """One packing group's rows, built once on the driver: a `questions` stage measures its first group
    (`_questions_shrink`) and the statistics read it again (`_plan_statistics`)."""
    from tessera.model.rows import build_group

    return tuple(build_group(spec, list(files), list(rows), list(epochs), g)[0])


def _group_rows(spec, index, group: list, g: int) -> tuple:
    return _built_group(spec, tuple(index.files[s] for s, _ in group), tuple(index.rows[s] for s, _ in group),
                        tuple(e for _, e in group), g)


def _questions_shrink(stage, index, spec, group: list, estimated: int) -> float:
    """A `questions` stage keeps only some turns, so its rows are shorter than the index's lengths say by a
    factor they cannot know: measured as built / estimated rows of one packing group. A pattern that keeps
    nothing there is a config error."""
    built = _group_rows(spec, index, group, 0)
    if not built:
        raise ConfigError(f"train.stages[{stage.name}].questions",
                          f"{stage.questions!r} finds no question in the stage's first {len(group)} samples")
    return len(built) / max(1, estimated)


def _plan_statistics(index, plan: list, spec, first_groups: list) -> dict:
    """What a stage will see: the resolved mixture's draws by kind/task, distinct samples, epochs,
    and (from its first packing groups) the share of loss targets that are image tokens."""
    from collections import Counter

    from tessera.model.unified import IGNORE

    tags = Counter(t for s, _ in plan for t in index.tags[s] if t.startswith(("kind=", "task=")))
    image_targets = targets = 0
    for g, grp in enumerate(first_groups):
        for r in _group_rows(spec, index, grp, g):
            t = r["labels"][r["labels"] != IGNORE]
            targets += len(t)
            image_targets += int((t >= dict(spec.vocabulary)["text_size"]).sum())
    return {"draws_by_tag": {k: round(v / len(plan), 4) for k, v in sorted(tags.items())},
            "distinct_samples": len({s for s, _ in plan}), "epochs": 1 + max(e for _, e in plan),
            "image_target_share": round(image_targets / max(1, targets), 4)}


def _probe_items(cfg: TesseraConfig, builder, assets) -> list[dict]:
    """Held-out probe prompts (see `Evaluator.probe_items`), built once on the driver; none without the
    shapes world's held-out set (a run on the user's own corpora)."""
    from tessera import storage
    from tessera.model.evaluate import Evaluator, HeldOut
    from tessera.tokenize.tokenizer import load_tokenizer

    if not storage.exists(storage.join(cfg.resolve(cfg.eval.heldout), "scenes.jsonl")):
        return []
    tokenizer, tcfg, _ = load_tokenizer(cfg.resolve(cfg.model.tokenizer), "cpu")
    held = HeldOut.load(cfg.resolve(cfg.eval.heldout), tcfg.image_size)
    return Evaluator(None, builder, assets.text_tokenizer, tokenizer, held,
                     question_first=cfg.model.question_first).probe_items(cfg.train.probe_questions)


def _image_tokens(index, builder, n: int = 32) -> float:
    from tessera.model.rows import read_row

    counts = []
    for s in range(min(len(index), 4 * n)):
        row = read_row(index.files[s], index.rows[s])
        for p, is_img in enumerate(row["is_image"]):
            if is_img:
                counts.append(len(builder.image_span(row, p)[0]) - 4)  # minus start, <h=>, <w=>, end
        if len(counts) >= n:
            break
    return float(np.mean(counts)) if counts else 0.0


def plot_loss(metrics: list[dict], stages: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.model.evaluate import CHANCE

    probed = [m for m in metrics if m.get("probe_colour") is not None]
    fig, axes = plt.subplots(2 if probed else 1, 1, figsize=(8, 7 if probed else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    steps = [m["step"] for m in metrics]
    for key, style in (("loss", "-"), ("text_loss", "--"), ("image_loss", ":")):
        ax.plot(steps, [m[key] for m in metrics], style, label=key)
    ax.set_ylabel("cross-entropy")
    ax.legend()
    if probed:  # held-out accuracy per question type, chance as a dotted line of the same colour
        pa = axes[1, 0]
        for t, colour in zip(PROBE_TYPES, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            pa.plot([m["step"] for m in probed], [m[f"probe_{t}"] for m in probed], "-o", ms=3, color=colour, label=t)
            pa.axhline(CHANCE[t], color=colour, ls=":", lw=1)
        pa.set_ylim(0, 1.02)
        pa.set_ylabel("held-out probe accuracy\n(dotted: chance)")
        pa.legend(fontsize=7, ncol=3)
    for a in axes[:, 0]:
        for k, s in enumerate(stages):  # names at alternating heights: short stages' names do not overlap
            a.axvline(s["start_step"], color="grey", lw=0.8)
            a.text(s["start_step"], 1 - 0.06 * (k % 2), f" {s['name']}", va="top", fontsize=8, color="grey",
                   transform=a.get_xaxis_transform())
    axes[-1, 0].set_xlabel("global step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path


def _write_state(out: str, **fields) -> None:
    """`<train.output>/state.json`: what `tessera runs` lists and `tessera resume` resubmits (read through
    `tessera.storage`, so a run root on any `pyarrow.fs` URI is visible)."""
    uri = storage.join(out, "state.json")
    state = storage.read_json(uri) if storage.exists(uri) else {}
    state.update(fields, updated=time.time())
    storage.write_json(uri, state)


@dataclasses.dataclass
class _Run:
    """What every stage of one training run shares, derived once on the driver."""

    cfg: TesseraConfig
    out: str
    fingerprint: str
    assets: object
    identities: dict
    vocab: object
    sizes: list
    depth: int
    tokens_dir: str
    storage_path: str
    metrics_csv: str
    index: object = None
    spec_kwargs: dict | None = None
    probe: list | None = None


def train(cfg: TesseraConfig, resubmit: dict | None = None) -> dict:
    """Run (or resume, or skip) the staged training; returns its report. Ray must be initialised.
    `resubmit`: how to submit this command again (`common.resubmit_record`), for `tessera resume`."""
    run = _plan(cfg)
    state = JobState(run.out, run.fingerprint)
    if state.is_complete():
        print(f"[tessera] train: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    t0 = time.perf_counter()
    _load_data(run)
    tc = cfg.train
    _write_state(run.out, run=cfg.run.name, status="running", ray=ray_job_record(),
                 resubmit=resubmit or resubmit_record("tessera.jobs.train", sys.argv[1:]), stages=[s.name for s in tc.stages],
                 steps_total=sum(s.steps for s in tc.stages), storage_path=run.storage_path, fingerprint=run.fingerprint)
    model_dir, offset, stage_reports = "", 0, []
    for i, stage in enumerate(tc.stages):
        if state.step_done(f"stage-{i}"):
            stage_reports.append(state.step_info(f"stage-{i}"))
            print(f"[train] stage {i} {stage.name!r}: complete, skipped")
        else:
            stage_reports.append(_train_stage(run, i, model_dir, offset))
            state.mark_done(f"stage-{i}", stage_reports[-1])
        model_dir, offset = storage.join(run.out, "stages", f"{i}-{stage.name}", "model"), offset + stage.steps
    report = _report(run, model_dir, stage_reports, offset, time.perf_counter() - t0)
    _write_state(run.out, status="complete", stage=tc.stages[-1].name, step=offset, model=report["model"])
    state.finish(report)
    return report


def _plan(cfg: TesseraConfig) -> _Run:
    """Inputs, assets and the fingerprint that decides skip / resume (the failure budget and
    logging cadence are not part of it: changing them continues the same run)."""
    from tessera.model.assets import load_assets

    tc, mc = cfg.train, cfg.model
    out = storage.absolute(cfg.resolve(tc.output))
    tokens_dir = storage.join(cfg.resolve(tc.tokens), "tokens")
    inputs = storage.read_json(storage.join(tokens_dir, "manifest.json"))["files"]
    assets = load_assets(mc, cfg.resolve)
    identities = {"tokenizer": assets.tokenizer_identity, "text_tokenizer": assets.text_identity, "bpe": assets.bpe_identity}
    train_section = {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("max_failures", "log_every")}
    fp = fingerprint(cfg.section_fingerprint("model", "run"), train_section, inputs, identities)
    sizes, depth = assets.rvq_geometry(mc)
    return _Run(cfg, out, fp, assets, identities, assets.vocabulary(mc), sizes, depth, tokens_dir,
                storage.absolute(cfg.resolve(tc.storage_path)), storage.join(out, "metrics.csv"))


def _load_data(run: _Run) -> None:
    """The sample index, what the packing tasks need to build rows, and the held-out probe."""
    from tessera.model.mixture import build_index
    from tessera.model.sequence import SequenceBuilder

    cfg, mc = run.cfg, run.cfg.model
    builder = SequenceBuilder(run.vocab, run.assets.bpe, tuple(mc.codebooks), run.depth, tuple(run.sizes), cfg.bpe.codebook,
                              cfg.bpe.depth)
    run.index = build_index(dataset_files(run.tokens_dir))
    run.index.image_tokens = _image_tokens(run.index, builder)
    run.probe = _probe_items(cfg, builder, run.assets) if cfg.train.probe_every > 0 else []
    run.spec_kwargs = dict(vocabulary=tuple(run.vocab.to_dict().items()), bpe_path=storage.absolute(cfg.resolve(mc.bpe)),
                           codebooks=tuple(mc.codebooks), depth=run.depth, codebook_sizes=tuple(run.sizes),
                           bpe_codebook=cfg.bpe.codebook, bpe_depth=cfg.bpe.depth,
                           text_tokenizer=run.assets.text_identity["path"], question_first=mc.question_first or None)


def _train_stage(run: _Run, i: int, init_model: str, offset: int) -> dict:
    """One stage as one Ray Train run (resuming from its last recorded checkpoint); its final weights are
    saved as `stages/<i>-<name>/model`. Returns the stage's report entry."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, tc = run.cfg, run.cfg.train
    stage, t = tc.stages[i], time.perf_counter()
    run_name = f"{cfg.run.name}-train-{run.fingerprint}-{i}-{stage.name}"
    _write_state(run.out, status="running", stage=stage.name, stage_index=i, ray_train_run=storage.join(run.storage_path, run_name))
    print(f"[train] stage {i} {stage.name!r}: mixture {stage.mixture.weights} ({stage.mixture.order}), "
          f"loss on {stage.loss_mask}, t2i_rate {tc.t2i_rate_of(stage)}, trainable {stage.trainable}"
          + (f", questions {stage.questions!r}" if stage.questions is not None else "")
          + (f" in {stage.questions_rate:.0%} of conversations" if stage.questions is not None and stage.questions_rate < 1 else ""), flush=True)
    datasets, data_info = _stage_datasets(cfg, run.index, i, run.spec_kwargs)
    fault = StepFault.from_env(run.out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stage_index": i, "init_model": init_model, "vocabulary": run.vocab.to_dict(),
                           "codebook_sizes": run.sizes, "depth": run.depth, "tile_codes": run.assets.tile_codes(cfg.model),
                           "step_offset": offset, "metrics_csv": run.metrics_csv,
                           "fault": fault and dataclasses.asdict(fault), "probe": run.probe},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=run.storage_path, checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each rank reads its own deterministic stream
    )
    try:
        result = trainer.fit()
    except Exception as e:
        _write_state(run.out, status="failed", error=str(e)[:2000])
        raise
    fault_point(f"train:after_stage_{i}")
    _save_stage_model(run, init_model, result.checkpoint, storage.join(run.out, "stages", f"{i}-{stage.name}", "model"),
                      {"stage": stage.name, "global_step": offset + stage.steps})
    return {"name": stage.name, "index": i, "start_step": offset, "steps": stage.steps, "seconds": round(time.perf_counter() - t, 2),
            "final_metrics": result.metrics, "data": data_info}


def _save_stage_model(run: _Run, init_model: str, checkpoint, directory: str, extra: dict) -> None:
    """The stage's last checkpoint (every rank's shards, through DCP) -> one whole model directory."""
    from tessera.model.assets import load_model, save_model
    from tessera.model.trainer import load_trained_weights
    from tessera.model.unified import TesseraModel

    cfg = run.cfg
    model = load_model(init_model) if init_model else TesseraModel.create(
        cfg.model, run.vocab, run.sizes, run.depth, seed=cfg.train.effective_seed(cfg.run.seed),
        tile_codes=run.assets.tile_codes(cfg.model))
    with checkpoint.as_directory() as d:
        load_trained_weights(model, d)
    save_model(model, directory, run.identities, extra)


def _report(run: _Run, model_dir: str, stage_reports: list, steps: int, seconds: float) -> dict:
    """Copy the last stage's model to `<output>/model`, draw the loss curve, and summarise the run."""
    final = storage.join(run.out, "model")
    storage.copy_tree(model_dir, final)
    metrics = read_metrics(run.metrics_csv)
    png = plot_loss(metrics, stage_reports, storage.join(run.out, "loss_curve.png"))
    mc = run.cfg.model
    return {
        "job": "train", "model": final, "interface": mc.interface, "mot": mc.mot, "stages": stage_reports,
        "steps": steps, "final_loss": metrics[-1]["loss"] if metrics else None,
        "mean_tokens_per_s": round(float(np.mean([m["tokens_per_s"] for m in metrics if m["stage_step"] > 1] or [0])), 1),
        "mean_packing_efficiency": round(float(np.mean([m["packing_efficiency"] for m in metrics] or [0])), 4),
        "vocabulary": run.vocab.to_dict(), "identities": run.identities, "metrics_csv": run.metrics_csv, "loss_curve": png,
        "wall_time_s": round(seconds, 2), "config": run.cfg.to_dict(),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("train", argv, "Train the unified model through the configured stages (Ray Train).")
    resubmit = resubmit_record("tessera.jobs.train", list(argv if argv is not None else sys.argv[1:]))
    with Console(logs_dir(cfg)) as console:
        with console.stage("train") as line, ray_session(cfg.ray):
            report = train(cfg, resubmit)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        console.print(f"[tessera] train: model {report['model']}; loss curve {report['loss_curve']}; "
                      f"report {cfg.resolve(cfg.train.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
