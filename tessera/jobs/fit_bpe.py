"""`tessera fit-bpe`: fit the 2-D visual BPE on the image code grids of token shards.

    tokens/*.parquet --(codebook, depth) grids--> train / held-out split --> VisualBPE.fit (shards on Ray actors)
    -> merges.json, report.json, frequent_tiles.png (tiles rendered through the tokenizer decoder)

Checkpoints every `bpe.checkpoint_every` merges in `_work/`; a re-run resumes there.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time

import numpy as np

from tessera import storage
from tessera.config import TesseraConfig
from tessera.console import Console
from tessera.jobs.common import JobState, fingerprint, logs_dir, parse_args, ray_session
from tessera.manifest import dataset_files
from tessera.tokenize.images import is_heldout


def load_grids(tokens_dir: str, codebook: str, depth: int, heldout_every: int) -> tuple[list, list, dict]:
    """-> (train grids, held-out grids, tokens manifest); grids are 2-D int32 arrays."""
    import ray.data

    manifest = storage.read_json(storage.join(tokens_dir, "manifest.json"))
    ds = ray.data.read_parquet(dataset_files(tokens_dir)).select_columns(["sample_id", "is_image", f"{codebook}_codes", "grid_shapes"])
    train, held = [], []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for sid, flags, codes, shapes in zip(*(batch.column(c).to_pylist() for c in batch.column_names)):
            for is_img, c, shape in zip(flags, codes, shapes):
                if not is_img:
                    continue
                if not c:
                    raise ValueError(f"sample {sid}: no {codebook} codes (was the tokenizer the dual one?)")
                if depth >= shape[2]:
                    raise ValueError(f"bpe.depth={depth} but the grids have depth {shape[2]}")
                grid = np.asarray(c, np.int32).reshape(shape)[..., depth]
                (held if is_heldout(sid, heldout_every) else train).append(grid)
    return train, held, manifest


def render_tiles(bpe, tokenizer_dir: str, usage: collections.Counter, n: int, path: str) -> str | None:
    """The n most used merged tiles, decoded to pixels by the tokenizer's decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from tessera.tokenize.tokenizer import load_tokenizer

    top = [t for t, _ in usage.most_common() if t >= bpe.codebook_size][:n]
    if not top or not os.path.exists(os.path.join(tokenizer_dir, "config.json")):
        return None
    model, _, _ = load_tokenizer(tokenizer_dir)
    cols = min(8, len(top))
    rows = (len(top) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, t in zip(axes.ravel(), top):
        codes = torch.as_tensor(bpe.tile_codes(t), dtype=torch.long)[None, :, :, None]  # (1, h, w, 1)
        img = model.decode(codes)[0].permute(1, 2, 0).numpy()
        ax.imshow(((img + 1) * 127.5).clip(0, 255).astype(np.uint8), interpolation="nearest")
        h, w = bpe.shape(t)
        ax.set_title(f"#{t} {h}x{w} n={usage[t]}", fontsize=7)
    fig.suptitle("most frequent visual BPE tiles (decoded)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fit_bpe(cfg: TesseraConfig) -> dict:
    from tessera.bpe import VisualBPE
    from tessera.bpe.distributed import RayShards
    from tessera.bpe.shards import LocalShards
    from tessera.tokenize.tokenizer import codebooks, read_config

    bc = cfg.bpe
    out = os.path.abspath(cfg.resolve(bc.output))
    tokens_dir = storage.join(cfg.resolve(bc.tokens), "tokens")
    inputs = storage.read_json(storage.join(tokens_dir, "manifest.json"))
    state = JobState(out, fingerprint(dataclasses.asdict(bc), inputs["files"], inputs["tokenizer"]["hash"]))
    if state.is_complete():
        print(f"[tessera] fit-bpe: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    state.begin()
    t0 = time.perf_counter()
    train, held, manifest = load_grids(tokens_dir, bc.codebook, bc.depth, bc.heldout_every)
    if not train:
        raise ValueError(f"no image grids in {tokens_dir}")
    geometry = codebooks(read_config(manifest["tokenizer"]["path"])[0])
    if bc.codebook not in geometry:
        raise ValueError(f"bpe.codebook={bc.codebook!r}: the visual tokenizer writes only {sorted(geometry)}")
    K = geometry[bc.codebook][0]
    load_s = time.perf_counter() - t0

    bpe = VisualBPE.fit(train, K, bc.num_merges, alpha=bc.alpha, top_k=bc.top_k, min_frequency=bc.min_frequency,
                        max_tile=tuple(bc.max_tile), num_shards=bc.num_workers,
                        shards=RayShards if bc.num_workers > 1 else LocalShards, checkpoint_dir=os.path.join(state.work, "ckpt"),
                        checkpoint_every=bc.checkpoint_every, progress=True)
    merges_path = bpe.save(out)
    report = {
        "job": "fit-bpe", "codebook_size": K, "codebook": bc.codebook, "depth": bc.depth,
        "merges_requested": bc.num_merges, "merges_done": len(bpe.merges), "vocab_size": bpe.vocab_size, "hash": bpe.hash,
        **_statistics(bpe, train, held, cfg, out), "fit": bpe.report, "merges": merges_path, "config": cfg.to_dict()}
    report["seconds"] = {"load": round(load_s, 3), "fit": bpe.report["wall_s"], "encode": report.pop("encode_s")}
    report["wall_time_s"] = round(time.perf_counter() - t0, 3)
    state.finish(report)
    return report


def _statistics(bpe, train: list, held: list, cfg: TesseraConfig, out: str) -> dict:
    """Tokens per image before / after on both splits, vocabulary usage, tile shapes, the tiles PNG."""
    bc, K = cfg.bpe, bpe.codebook_size
    t = time.perf_counter()
    train_tokens = bpe.encode_batch(train)
    held_tokens = bpe.encode_batch(held)
    usage = collections.Counter(int(t) for seq in train_tokens for t in seq)
    held_usage = collections.Counter(int(t) for seq in held_tokens for t in seq)
    encode_s = time.perf_counter() - t
    cells = lambda gs: sum(g.size for g in gs)  # noqa: E731
    shapes_vocab = collections.Counter(f"{h}x{w}" for h, w in zip(bpe.shape_h[K:], bpe.shape_w[K:]))
    shapes_used = collections.Counter()
    for tok_id, n in usage.items():
        shapes_used[f"{bpe.shape_h[tok_id]}x{bpe.shape_w[tok_id]}"] += n
    new_ids = bpe.vocab_size - K
    png = render_tiles(bpe, os.path.abspath(cfg.resolve(bc.tokenizer)), usage, bc.png_tiles,
                       os.path.join(out, "frequent_tiles.png")) if bc.tokenizer != "none" else None
    return {
        "grids": {"train": len(train), "heldout": len(held)},
        "tokens_per_image_before": round(cells(train) / len(train), 2),
        "tokens_per_image_after": round(sum(len(s) for s in train_tokens) / len(train), 2),
        "heldout_tokens_per_image_before": round(cells(held) / max(len(held), 1), 2),
        "heldout_tokens_per_image_after": round(sum(len(s) for s in held_tokens) / max(len(held), 1), 2),
        "compression_ratio": round(cells(train) / max(sum(len(s) for s in train_tokens), 1), 4),
        "vocabulary_usage_heldout": round(sum(1 for t in held_usage if t >= K) / max(new_ids, 1), 4),
        "vocabulary_usage_train": round(sum(1 for t in usage if t >= K) / max(new_ids, 1), 4),
        "tile_shapes_vocab": dict(sorted(shapes_vocab.items())), "tile_shapes_used": dict(sorted(shapes_used.items())),
        "png": png, "encode_s": round(encode_s, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("fit-bpe", argv, "Fit the 2-D visual BPE on token shards.")
    with Console(logs_dir(cfg)) as console:
        with console.stage("fit-bpe") as line, ray_session(cfg.ray):
            report = fit_bpe(cfg)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        console.print(f"[tessera] fit-bpe: {report['merges_done']} merges; tokens per image {report['tokens_per_image_before']} "
                      f"-> {report['tokens_per_image_after']} (held-out {report['heldout_tokens_per_image_before']} -> "
                      f"{report['heldout_tokens_per_image_after']}); held-out vocabulary usage "
                      f"{report['vocabulary_usage_heldout']:.1%}")
        console.print(f"[tessera] merges: {report['merges']}  tiles: {report['png']}")
        console.print(f"[tessera] report: {cfg.resolve(cfg.bpe.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
