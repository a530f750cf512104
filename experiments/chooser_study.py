"""Which drawing to keep: best-of-N choosers compared on the same drawings.

Each held-out caption is drawn N times (`generate_image`, the eval's sampler and seeds). Every drawing is
scored by the analyser against its scene (the figure, never shown to a chooser) and by the model itself:

- `caption`: log p(caption | drawing), what `eval.generation_chooser: caption` keeps (`caption_log_prob`);
- `contrastive`: log p(caption | drawing) - log sum over {caption + K other captions} p(. | drawing), the
  model used as a classifier that must pick the prompt's caption out of K others (other held-out
  captions, text only). A drawing that makes every caption likely (a blob of colours) scores low;
- `self_shape`, `self_colour`, `self_exists` and their sum `self_check`: the model answering the held-out
  VQA's questions about each object of the caption on its own drawing (`self_check`), the log-prob of the
  caption's answer; `self_check+caption` adds the caption's log-prob;
- `drawing`, `drawing_prior`: log p(drawing | caption) and log p(drawing) (`Evaluator.image_log_prob`), how
  likely the model finds the re-encoded drawing's tokens with and without its caption; `drawing` is what
  `eval.generation_chooser: drawing` keeps; `drawing+caption` adds the caption's log-prob.

For each chooser it prints what it keeps among each caption's first k drawings, k = 1, 2, 4, ..., N, beside
one sample's mean and a perfect chooser's, over `--seeds` sampling seeds; `--save FILE.npz` keeps every
drawing's scores for re-analysis. Each (sampling seed, caption) has its own generator, so the drawings do
not depend on `--shard I/N` (captions I, I + N, ...: one process per shard, `--combine` prints the union).

    PYTHONPATH=. python experiments/chooser_study.py runs/demo-t2i runs/demo-t2i/train/model \
        --config configs/demo-t2i.yaml [--captions 48] [--candidates 16] [--distractors 8] [--seeds 2] \
        [--shard 0/4 --save s0.npz]
    PYTHONPATH=. python experiments/chooser_study.py --combine s0.npz s1.npz s2.npz s3.npz
"""

import argparse
import json
import time

import numpy as np
import torch

from tessera.config import load_config
from tessera.jobs.eval import _evaluator
from tessera.model.evaluate import best_of_sizes
from tessera.model.generate import decode_pixels, generate_image, text_log_prob
from tessera.pipelines import analyser, shapes


def chosen(scores: np.ndarray, matches: np.ndarray, k: int) -> float:
    """scores, matches (captions, N) -> the mean match of the highest-scoring drawing among the first k."""
    return float(np.mean(matches[np.arange(len(matches)), np.argmax(scores[:, :k], axis=1)]))


CHECKS = ("shape", "colour", "exists")


def self_check(ev, row: dict, caption: str) -> dict[str, float]:
    """The model asked about its own drawing (`row`: it encoded, `Evaluator.encode_image`): for each object the
    caption names, log p(its shape | "What shape is at <its place>?"), log p(its colour | "What colour is the
    <shape> at <its place>?") and log p(yes | "Is there a <colour> <shape> in the image?"), summed over the
    objects per question type (the held-out VQA's own questions, asked after the drawing as the VQA asks them)."""
    objects = shapes.parse_caption(caption)
    scene = shapes.Scene(tuple(objects), (0, 0, 0), (0, 0, 0), False, 0)
    out = {name: 0.0 for name in CHECKS}
    for o in objects:
        asked = {q["type"]: q for q in shapes.object_questions(scene, o)}
        asked["exists"] = shapes.existence_question(o.colour, o.shape, True)
        for kind in out:
            prefix = ev.row_prompt(row, asked[kind]["question"])
            out[kind] += text_log_prob(ev.model, prefix.ids, ev.encode_text(asked[kind]["answer"]), prefix.codes, prefix.cells)
    return out


def choosers(own: np.ndarray, others: np.ndarray, checks: np.ndarray | None = None,
             image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """own (captions, N), others (captions, N, K) log-probs, checks (captions, N, len(CHECKS)) the
    self-check's log-probs, image (captions, N, 2) log p(drawing | caption) and log p(drawing) -> each
    chooser's score (captions, N)."""
    both = np.concatenate([own[..., None], others], axis=-1)
    top = both.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(both - top).sum(-1, keepdims=True)))[..., 0]
    out = {"caption": own, "contrastive": own - lse}
    if checks is not None:
        out.update({f"self_{name}": checks[..., i] for i, name in enumerate(CHECKS)})
        out["self_check"] = checks.sum(-1)
        out["self_check+caption"] = checks.sum(-1) + own
    if image is not None:
        out["drawing"], out["drawing_prior"] = image[..., 0], image[..., 1]
        out["drawing+caption"] = image[..., 0] + own
    return out


def report(arrays: dict, meta: dict) -> None:
    """arrays {matches_S, own_S, others_S} per sampling seed S -> one JSON line per seed and their mean."""
    seeds = sorted(int(k.split("_")[1]) for k in arrays if k.startswith("matches_"))
    n = arrays[f"matches_{seeds[0]}"].shape[1]
    sizes = best_of_sizes(n)
    rows = []
    for seed in seeds:
        matches = arrays[f"matches_{seed}"]
        row = {"seed": seed, "captions": len(matches), "single": round(float(matches.mean()), 4),
               "best_possible": round(float(matches.max(1).mean()), 4)}
        for name, score in choosers(arrays[f"own_{seed}"], arrays[f"others_{seed}"], arrays.get(f"checks_{seed}"),
                                    arrays.get(f"image_{seed}")).items():
            row[name] = {k: round(chosen(score, matches, k), 4) for k in sizes}
        print(json.dumps(row), flush=True)
        rows.append(row)
    mean = {**meta, "seeds": len(seeds), "candidates": n,
            **{k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("single", "best_possible")}}
    for name in [k for k in rows[0] if isinstance(rows[0][k], dict)]:
        mean[name] = {k: round(float(np.mean([r[name][k] for r in rows])), 4) for k in sizes}
    print(json.dumps(mean), flush=True)


def combine(files: list[str]) -> None:
    parts = [np.load(f, allow_pickle=True) for f in files]
    meta = json.loads(str(parts[0]["meta"]))
    arrays = {}
    for key in parts[0].files:
        if key == "meta" or key.startswith("captions"):
            continue
        order = np.argsort(np.concatenate([p["captions"] for p in parts]))
        arrays[key] = np.concatenate([p[key] for p in parts])[order]
    report(arrays, meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?")
    ap.add_argument("model", nargs="?")
    ap.add_argument("--config", default="configs/demo-t2i.yaml")
    ap.add_argument("--captions", type=int, default=48)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--distractors", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard", default="0/1", help="I/N: captions I, I + N, ...")
    ap.add_argument("--save", default="")
    ap.add_argument("--combine", nargs="+", default=[], help="print the union of these --save files")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    if a.combine:
        return combine(a.combine)
    cfg = load_config(a.config, [f"run.root={a.root}"] + a.set)
    ev, held = _evaluator(cfg, a.model)
    torch.set_num_threads(a.threads)
    part, parts = (int(x) for x in a.shard.split("/"))
    indices = list(range(min(a.captions, len(held.scenes))))[part::parts]
    pool = [s["caption"] for s in held.scenes]
    first = ev.image_row(held.scenes[0]["image"])
    grid = tuple(first["grid_shapes"][0][:2])
    meta = {"model": a.model, "distractors": a.distractors, "cfg_scale": a.scale, "temperature": a.temperature}
    arrays, t0 = {}, time.time()
    for seed in range(a.seeds):
        matches = np.zeros((len(indices), a.candidates))
        own = np.zeros((len(indices), a.candidates))
        others = np.zeros((len(indices), a.candidates, a.distractors))
        checks = np.zeros((len(indices), a.candidates, len(CHECKS)))
        image = np.zeros((len(indices), a.candidates, 2))
        for row, i in enumerate(indices):
            s = held.scenes[i]
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            truth = list(shapes.Scene.from_dict(s["scene"]).objects)
            distractors = [c for c in pool[i + 1:] + pool[:i] if c != s["caption"]][:a.distractors]  # the scenes after i, wrapping
            prompt = [ev.model.vocab.bos_id] + ev.encode_text(s["caption"])
            texts = [ev.encode_text(c) for c in [s["caption"], *distractors]]
            for n in range(a.candidates):
                codes = generate_image(ev.model, prompt, grid, bpe=ev.builder.bpe, cfg_scale=a.scale,
                                       temperature=a.temperature, top_k=0, generator=g)
                pixels = decode_pixels(ev.tokenizer, codes, ev.model.vocab.interface)
                matches[row, n] = analyser.match_score(truth, analyser.analyse(pixels))
                drawing = ev.encode_image(pixels, "candidate")  # once: every score reads these tokens
                prefix = ev.builder.image_prefix(drawing)
                logps = [text_log_prob(ev.model, prefix.ids, t, prefix.codes, prefix.cells) for t in texts]
                own[row, n], others[row, n] = logps[0], logps[1:]
                check = self_check(ev, drawing, s["caption"])
                checks[row, n] = [check[name] for name in CHECKS]
                image[row, n] = ev.row_image_log_prob(drawing, s["caption"]), ev.row_image_log_prob(drawing, None)
        arrays.update({f"matches_{seed}": matches, f"own_{seed}": own, f"others_{seed}": others, f"checks_{seed}": checks,
                       f"image_{seed}": image})
    print(f"# {len(indices)} captions x {a.candidates} drawings x {a.seeds} seeds in {time.time() - t0:.0f} s", flush=True)
    report(arrays, meta)
    if a.save:
        np.savez(a.save, captions=np.array(indices), meta=json.dumps(meta), **arrays)


if __name__ == "__main__":
    main()
