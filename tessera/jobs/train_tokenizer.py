"""`tessera train-tokenizer`: train the visual tokenizer on the images of prepared samples (Ray Train).

    samples/*.parquet --Ray Data: one row per image (held-out split removed)--> TorchTrainer (DDP)
    [dual: align the ViT first, SigLIP sigmoid loss on image-text pairs, on the driver]
    [vq: retire duplicate codes, measured on the first training images, on the driver]
    -> <output>/model.safetensors + config.json, report.json, reconstructions.png, codebook_usage.png

Re-running the same command resumes from the latest Ray Train checkpoint (same
`RunConfig(storage_path, name)`); a complete output (report.json with this config's
fingerprint) is skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from tessera import storage
from tessera.config import TesseraConfig, config_from_dict
from tessera.console import Console
from tessera.faults import fault_point
from tessera.jobs.common import (JobState, fingerprint, logs_dir, parse_args, preserve_data_order, ray_session,
                                 run_ray_train_loop, without_progress_bars)
from tessera.loop import worker_print
from tessera.manifest import dataset_files


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the Ray-free `TokenizerLoop` over this worker's shard, run by the shared adapter."""
    import ray.train
    import torch

    from tessera.tokenize.images import to_tensor
    from tessera.tokenize.tokenizer import build_tokenizer
    from tessera.tokenize.trainer import ImageStream, TokenizerLoop, TokenizerTrainer

    cfg = config_from_dict({"tokenizer": config["tokenizer"]}).tokenizer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(np.random.SeedSequence([config["seed"], rank]).generate_state(1)[0]))  # no collision across runs
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
    torch.set_num_threads(max(1, math.ceil(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    model = build_tokenizer(cfg).to(device)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else model
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.train.batch_size // world
    # the shard's order is fixed (materialised dataset), so (epoch, batch) names the next batch exactly
    stream = ImageStream(lambda epoch: (to_tensor(b["image"]) for b in shard.iter_torch_batches(
        batch_size=per_worker, drop_last=True, dtypes=torch.uint8)))
    loop = TokenizerLoop(TokenizerTrainer(model, cfg, device), stream, cfg.train.steps, log_every=config["log_every"],
                         checkpoint_every=cfg.train.checkpoint_every, images_per_step=cfg.train.batch_size)
    log = (lambda step: worker_print(f"[train-tokenizer] step {step.step}/{cfg.train.steps} loss {step.metrics['loss']:.4f} "
                                     f"({step.metrics['images_per_s']} img/s)")) if rank == 0 else None
    run_ray_train_loop(loop, rank, "[train-tokenizer]", on_log=log)


def _image_dataset(files: list[str], image_size: int, split: str, seed: int):
    """The split's images, one row each, in the seeded order of `order_key`: the same images and seed
    give the same stream whatever order the sample files hold their rows in, so one config and seed
    train one tokenizer (the samples' row order varies between two `prepare` runs)."""
    import ray

    # the keys are uniform over int64, so even boundaries balance the partitions and spare the sort its
    # sampling pass (and its default of 200 partitions, whose tasks cost more than a small corpus' sort)
    partitions = max(int(ray.cluster_resources().get("CPU", 1)), len(files), 1)
    boundaries = [int(b) for b in np.linspace(-2.0 ** 63, 2.0 ** 63, partitions + 1)[1:-1]]
    return _exploded(files, image_size, split, seed).sort("order", boundaries=boundaries or None)


def _exploded(files: list[str], image_size: int, split: str, seed: int):
    """The sample files' images of `split`, one row each, in no particular order (see `explode_images`)."""
    import ray.data

    from tessera.tokenize.images import explode_images

    return ray.data.read_parquet(files).map_batches(
        explode_images, fn_kwargs={"image_size": image_size, "split": split, "seed": seed},
        batch_format="pyarrow", num_cpus=0.5)


def _first_heldout_images(files: list[str], image_size: int, n: int) -> tuple[list[dict], bool]:
    """The held-out split's n images first in order seed 0 (not the run's: every seed is measured on the
    same images), in one pass and without a sort; (rows, True). A tiny corpus may have no sample in
    the held-out split: then the training split's n first, (rows, False), and the report says so."""
    rows = _first_images(files, image_size, "all", 0, n)
    held = [r for r in rows if r["heldout"]]
    return (held or rows)[:n], bool(held)


def _first_images(files: list[str], image_size: int, split: str, seed: int, n: int) -> list[dict]:
    """Up to n first images of each of the held-out and training parts of `split`, as rows with a "heldout"
    column, sorted by their order under `seed`: one pass, no sort (`tessera.tokenize.images.first_in_order`)."""
    from tessera.tokenize.images import first_in_order

    rows = _exploded(files, image_size, split, seed).map_batches(first_in_order, fn_kwargs={"n": n}, batch_format="numpy",
                                                                num_cpus=0.5).take_all()
    return sorted(rows, key=lambda r: r["order"])


ALIGN_BATCH = 32
"""Image-text pairs per SigLIP alignment step (fewer when the corpus has fewer)."""


def _align(cfg: TesseraConfig, files: list[str], out: str) -> str:
    """SigLIP sigmoid-loss alignment of the dual ViT on image-text pairs; returns the vision weights dir."""
    import torch

    from tessera.tokenize.align import align_vision_encoder
    from tessera.tokenize.images import to_tensor

    tc = cfg.tokenizer
    target = os.path.join(out, "align")
    if os.path.exists(os.path.join(target, "vision", "config.json")):
        return os.path.join(target, "vision")
    ds = _image_dataset(files, tc.image_size, "train", cfg.run.seed).filter(lambda r: r["caption"] != "").materialize()
    pairs = ds.count()
    if pairs < 2:  # the sigmoid loss contrasts pairs within a batch
        raise ValueError(f"tokenizer.preset dual: aligning the ViT needs >= 2 captioned images, the samples have {pairs}; "
                         "give real SigLIP weights (tokenizer.dual.siglip_path) or image-text pairs")
    batch_size = min(ALIGN_BATCH, pairs)  # with drop_last, a batch larger than the corpus would yield nothing, forever

    def batches():
        epoch = 0
        while True:
            for b in ds.random_shuffle(seed=cfg.run.seed + epoch).iter_batches(batch_size=batch_size, drop_last=True):
                yield to_tensor(b["image"]), list(b["caption"])
            epoch += 1

    torch.manual_seed(cfg.run.seed)
    model, losses = align_vision_encoder(tc.dual, tc.image_size, batches(), tc.dual.align_steps, tc.dual.align_lr)
    model.save_pretrained(os.path.join(target, "siglip"))
    model.vision_model.save_pretrained(os.path.join(target, "vision"))
    storage.write_json(os.path.join(target, "losses.json"), losses)
    return os.path.join(target, "vision")


def _plots(out: str, images, recs, ev: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(8, len(images))
    to_img = lambda t: ((t.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)  # noqa: E731
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)  # n may be 1: a small corpus
    for i in range(n):
        for row, src in enumerate((images, recs)):
            axes[row, i].imshow(to_img(src[i]))
            axes[row, i].axis("off")
    axes[0, 0].set_title("original", fontsize=8, loc="left")
    axes[1, 0].set_title(f"reconstruction (PSNR {ev['psnr']:.1f} dB)", fontsize=8, loc="left")
    rec_png = os.path.join(out, "reconstructions.png")
    fig.tight_layout()
    fig.savefig(rec_png, dpi=100)
    plt.close(fig)
    usage_keys = [k for k in ev if k.endswith("_usage")]
    fig, axes = plt.subplots(1, len(usage_keys), figsize=(4 * len(usage_keys), 3), squeeze=False)
    for ax, key in zip(axes[0], usage_keys):
        ax.bar(range(len(ev[key])), ev[key])
        ax.set_ylim(0, 1)
        ax.set_xlabel("RVQ depth")
        ax.set_ylabel("fraction of codes used")
        ax.set_title(key.replace("_usage", " codebook"))
    usage_png = os.path.join(out, "codebook_usage.png")
    fig.tight_layout()
    fig.savefig(usage_png, dpi=100)
    plt.close(fig)
    return {"reconstructions": rec_png, "codebook_usage": usage_png}


def train_tokenizer(cfg: TesseraConfig) -> dict:
    """Run (or resume, or skip) tokenizer training; returns its report. Ray must be initialised."""
    from tessera.tokenize.tokenizer import build_tokenizer, save_tokenizer

    tc = cfg.tokenizer
    out = os.path.abspath(cfg.resolve(tc.output))
    samples_dir = storage.join(cfg.resolve(cfg.prepare.output), "samples")
    files = dataset_files(samples_dir)
    # complete = same tokenizer config trained on the same committed sample files
    inputs = storage.read_json(storage.join(samples_dir, "manifest.json"))["files"]
    state = JobState(out, fingerprint(cfg.section_fingerprint("tokenizer", "run"), inputs))
    if state.is_complete():
        print(f"[tessera] train-tokenizer: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    preserve_data_order()  # the sort's partitions reach the workers in key order, not as their tasks finish
    t0 = time.perf_counter()
    seconds = {}
    tok_cfg = dataclasses.asdict(tc)
    if tc.preset == "dual" and not tc.dual.siglip_path:
        t = time.perf_counter()
        tok_cfg["dual"]["siglip_path"] = _align(cfg, files, out)
        seconds["align"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    if tc.preset == "oracle":  # no weights to learn: the analyser reads the scene (tessera.tokenize.oracle)
        run_cfg, steps, final_metrics = tc, 0, {}
        model = build_tokenizer(run_cfg).eval()
    else:
        run_cfg, model, steps, final_metrics = _fit(cfg, tok_cfg, files, out)
    seconds["train"] = round(time.perf_counter() - t, 2)
    fault_point("train-tokenizer:after_fit")
    merge = _merge_duplicate_codes(model, tc, files, cfg.run.seed) if tc.preset == "vq" and tc.vq.merge_tolerance > 0 else None
    weights_hash = save_tokenizer(model, run_cfg, out, {"trained_steps": steps})

    t = time.perf_counter()
    ev, images, truly_heldout, pngs = _heldout_evaluation(model, tc, files, out)
    seconds["eval"] = round(time.perf_counter() - t, 2)
    h, w = model.grid_shape(tc.image_size)
    report = {
        "job": "train-tokenizer", "preset": tc.preset, "steps": steps, "grid": [h, w],
        "heldout_images": len(images), "heldout_is_disjoint": truly_heldout, "tokenizer": {"path": out, "hash": weights_hash},
        "metrics": ev, "merged_codes": merge, "final_train_metrics": final_metrics, "seconds": seconds,
        "wall_time_s": round(time.perf_counter() - t0, 2), "pngs": pngs, "config": cfg.to_dict(),
    }
    state.finish(report)
    return report


MERGE_IMAGES = 256
"""Training images whose encoder features measure the quantisation error and code usage for the merge."""


def _merge_duplicate_codes(model, tc, files: list[str], seed: int) -> dict:
    """Retire the trained codebook's near-duplicate codes (`ResidualVQ.merge_duplicates`), measured on the
    first `MERGE_IMAGES` training images in the run's order (never the held-out ones the report scores).
    Deterministic: a resumed job re-merges the same checkpoint the same way."""
    import torch

    from tessera.tokenize.images import to_tensor

    rows = _first_images(files, tc.image_size, "train", seed, MERGE_IMAGES)[:MERGE_IMAGES]
    if not rows:
        return {"images": 0, "depths": []}
    images = to_tensor(np.stack([r["image"] for r in rows]))
    with torch.no_grad():
        features = model.encode(images, features=True)["features"]
    depths = model.quantizer.merge_duplicates(features, tc.vq.merge_tolerance)
    return {"images": len(rows), "tolerance": tc.vq.merge_tolerance, "depths": depths}


def _heldout_evaluation(model, tc, files: list[str], out: str):
    """Held-out PSNR / SSIM / LPIPS, codebook statistics (+ retrieval for dual, fidelity for the oracle) and the PNGs."""
    from tessera.tokenize.images import to_tensor
    from tessera.tokenize.trainer import evaluate

    held_rows, truly_heldout = _first_heldout_images(files, tc.image_size, tc.train.heldout_images)
    held = {k: np.stack([r[k] for r in held_rows]) if k == "image" else np.array([r[k] for r in held_rows], dtype=object)
            for k in ("image", "caption")}
    images = to_tensor(held["image"])
    ev = evaluate(model, images)
    recs = ev.pop("reconstructions")
    if tc.preset == "dual":
        ev["semantic_retrieval_r1"], ev["retrieval_chance"] = _retrieval(model, held, out)
    if tc.preset == "oracle":
        ev["scene_match"] = _oracle_fidelity(model, images, held["caption"])
    return ev, images, truly_heldout, _plots(out, images, recs, ev)


def _fit(cfg: TesseraConfig, tok_cfg: dict, files: list[str], out: str):
    """Train the tokenizer's weights on Ray Train (resuming from its last checkpoint) ->
    (its config, the trained model in eval mode, steps, the last reported metrics)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tessera.tokenize.tokenizer import build_tokenizer

    tc = cfg.tokenizer
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"tokenizer": tok_cfg, "seed": cfg.run.seed, "log_every": 25, "cpus_per_worker": tc.train.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=tc.train.num_workers, use_gpu=tc.train.use_gpu,
                                     resources_per_worker={"CPU": tc.train.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.run.name}-tokenizer", storage_path=os.path.join(out, "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=tc.train.max_failures)),
        # decoded once and cached in the object store: small corpora then cost no decode per epoch
        datasets={"train": without_progress_bars(_image_dataset(files, tc.image_size, "train", cfg.run.seed).select_columns(["image"]).materialize())},
    )
    result = trainer.fit()

    run_cfg = config_from_dict({"tokenizer": tok_cfg}).tokenizer
    model = build_tokenizer(run_cfg)
    with result.checkpoint.as_directory() as d:
        train_state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(train_state["model"])
    return run_cfg, model.eval(), train_state["step"], result.metrics


def _oracle_fidelity(model, images, captions) -> float:
    """Share of held-out captioned images whose oracle codes name exactly the caption's objects
    (the oracle is only as true as the analyser that reads the pixels)."""
    from tessera.pipelines.shapes import parse_caption

    keep = [i for i, c in enumerate(captions) if c and parse_caption(c)]
    if not keep:
        return float("nan")
    grids = model.encode(images[keep])["pixel"][..., 0].numpy()
    return float(np.mean([set(model.objects(g)) == set(parse_caption(captions[i])) for g, i in zip(grids, keep)]))


def _retrieval(model, held: dict, out: str) -> tuple[float, float]:
    """Image->text R@1 of the semantic branch on held-out captioned images."""
    import torch
    from transformers import SiglipModel

    from tessera.tokenize.align import retrieval_r1, text_embeddings
    from tessera.tokenize.images import to_tensor

    keep = [i for i, c in enumerate(held["caption"]) if c]
    if len(keep) < 2 or not os.path.exists(os.path.join(out, "align", "siglip")):
        return float("nan"), float("nan")
    siglip = SiglipModel.from_pretrained(os.path.join(out, "align", "siglip")).eval()
    images = to_tensor(held["image"][keep])
    with torch.no_grad():
        codes = model.encode(images)["semantic"]
        img = model.semantic_embedding(codes)
        txt = text_embeddings(siglip, [held["caption"][i] for i in keep])
    return retrieval_r1(img, txt), 1.0 / len(keep)


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("train-tokenizer", argv, "Train the visual tokenizer (vq or dual preset) on Ray Train.")
    with Console(logs_dir(cfg)) as console:
        with console.stage("train-tokenizer") as line, ray_session(cfg.ray):
            report = train_tokenizer(cfg)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        m = report["metrics"]
        console.print(f"[tessera] tokenizer ({report['preset']}): held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, "
                      f"LPIPS {m['lpips']:.3f}, pixel codebook usage {m['pixel_usage']}")
        for depth, merged in enumerate((report.get("merged_codes") or {}).get("depths", [])):
            console.print(f"[tessera] depth {depth}: {merged['retired']} duplicate codes retired, {merged['active']} left "
                          f"(closer than {report['merged_codes']['tolerance']} x the RMS quantisation error {merged['scale']:.4f})")
        console.print(f"[tessera] reconstructions: {report['pngs']['reconstructions']}")
        console.print(f"[tessera] report: {cfg.resolve(cfg.tokenizer.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
