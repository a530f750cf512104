"""Held-out evaluation of a trained unified model on the shapes world (no Ray).

Understanding: captions generated from held-out images are parsed (`shapes.parse_caption`) and
scored per attribute; questions are answered greedily (one turn each, stopping at the
end-of-turn `<eos>`), exact match after normalisation; existence (POPE) probes give accuracy,
precision, recall, F1 and the yes-ratio. Generation: held-out captions -> images with CFG and
valid-tile constraints -> pixels -> `analyser`; beside it the analyser's own accuracy on the real
held-out images and on their round trip through the visual tokenizer (the most generation can
score with these codes). Perplexity per modality on held-out token rows.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from tessera.config import GENERATION_CHOOSERS
from tessera.model.generate import decode_pixels, generate_image, generate_text, text_log_prob
from tessera.model.sequence import SequenceBuilder
from tessera.model.unified import TesseraModel
from tessera.pipelines import analyser, shapes
from tessera.tokenize.text import encode_segments
from tessera.tokenize.tokenizer import tokenizer_device

ATTRIBUTES = ("shape", "colour", "size", "position")
# uniform chance per question type (the yes/no probes are balanced)
CHANCE = {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES), "size": 1 / len(shapes.SIZES),
          "position": 1 / len(shapes.POSITIONS), "count": 1 / 3, "exists": 0.5}
# valid answers per question type: a model that learned the task answers inside these
ANSWERS = {"colour": set(shapes.COLOURS), "shape": set(shapes.SHAPES), "size": set(shapes.SIZES),
           "position": set(shapes.POSITIONS), "count": set(shapes.NUMBER_WORDS[1:]), "exists": {"yes", "no"}}


@dataclass
class HeldOut:
    scenes: list[dict]
    """{"id", "image", "caption", "scene"} per held-out scene (scenes.jsonl)."""
    questions: list[dict]
    images: dict
    """image path -> uint8 (R, R, 3)."""

    @staticmethod
    def load(directory: str, resolution: int) -> "HeldOut":
        from PIL import Image

        def read(name):
            with open(os.path.join(directory, name)) as f:
                return [json.loads(line) for line in f if line.strip()]

        scenes, questions = read("scenes.jsonl"), read("questions.jsonl")
        images = {}
        for s in scenes:
            img = Image.open(os.path.join(directory, s["image"])).convert("RGB")
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
            images[s["image"]] = np.asarray(img)
        return HeldOut(scenes, questions, images)


def caption_score(truth: list[shapes.ShapeObject], predicted: list[shapes.ShapeObject]) -> float:
    """Matched attributes / (4 * max(#true, #predicted)): objects pair up by position first, then
    by shape and colour, so extra or missing objects cost their attributes."""
    if not truth and not predicted:
        return 1.0
    pool = list(predicted)
    matched = 0
    for o in truth:
        if not pool:
            break
        best = max(pool, key=lambda p: (p.position == o.position, p.shape == o.shape, p.colour == o.colour, p.size == o.size))
        matched += sum(getattr(best, a) == getattr(o, a) for a in ATTRIBUTES)
        pool.remove(best)
    return matched / (len(ATTRIBUTES) * max(len(truth), len(predicted)))


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (R, R, 3) -> float (1, 3, R, R) in [-1, 1], what the visual tokenizer encodes."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)


@torch.no_grad()
def generation_ceiling(tokenizer, heldout: HeldOut, interface: str = "bpe", bpe_depth: int = 0) -> float:
    """The analyser on the held-out images passed through the visual tokenizer (encode -> the codes
    a generator emits -> decode): the same pixels `Evaluator.generation` scores for a generator that
    gets every code right, so the most text -> image can score with these codes. `interface` bpe
    decodes the pixel codes' depth `bpe_depth`, rvq every depth."""
    found = round_trip_objects(tokenizer, heldout, interface, bpe_depth)
    return float(np.mean([analyser.match_score(list(shapes.Scene.from_dict(s["scene"]).objects), f)
                          for s, f in zip(heldout.scenes, found)]))


@torch.no_grad()
def round_trip_objects(tokenizer, heldout: HeldOut, interface: str = "bpe", bpe_depth: int = 0) -> list[list[shapes.ShapeObject]]:
    """The analyser's objects in each held-out image after encode -> the codes a generator emits -> decode
    (`generation_ceiling`'s round trip), one list per scene."""
    found = []
    device = tokenizer_device(tokenizer)
    for s in heldout.scenes:
        grid = tokenizer.encode(image_tensor(heldout.images[s["image"]]).to(device))["pixel"][0].cpu().numpy()  # (H, W, D)
        codes = grid[..., bpe_depth] if interface == "bpe" else grid[:, :, None, :]  # (H, W) | (H, W, 1, D)
        found.append(analyser.analyse(decode_pixels(tokenizer, codes, interface)))
    return found


def normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".?!").split())


def best_of_sizes(n: int) -> list[int]:
    """The k of a best-of-n curve: 1, 2, 4, ... below n, and n."""
    return sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})


class Evaluator:
    def __init__(self, model: TesseraModel | None, builder: SequenceBuilder, text_tokenizer, tokenizer, heldout: HeldOut | None,
                 device: torch.device | str = "cpu", image_size: int | None = None, question_first: str = ""):
        """`model` None: only prompts are built (see `probe_items`). `heldout` None: no shapes world;
        only images given to `add_images` (uint8 (image_size, image_size, 3)) can be asked about.
        `question_first`: the model's `ModelConfig.question_first` (questions it reads before the image)."""
        self.question_first = re.compile(question_first) if question_first else None
        self.model = model.eval() if model is not None else None
        self.builder, self.text, self.tokenizer, self.heldout = builder, text_tokenizer, tokenizer, heldout
        self.images = dict(heldout.images) if heldout is not None else {}
        self.image_size = image_size
        self.device = torch.device(device)
        self._rows = {}

    # ------------------------------------------------------------------ inputs

    def image_row(self, image_path: str) -> dict:
        """A token row holding one held-out image, encoded by the visual tokenizer (once per path)."""
        if image_path not in self._rows:
            self._rows[image_path] = self.encode_image(self.images[image_path], image_path)
        return self._rows[image_path]

    def encode_image(self, image: np.ndarray, sample_id: str) -> dict:
        """uint8 (R, R, 3) -> a token row holding it, encoded by the visual tokenizer."""
        img = image_tensor(image)
        continuous = self.builder.vocab.interface == "continuous"  # the encoder's features, not only its codes
        img = img.to(tokenizer_device(self.tokenizer))
        codes = self.tokenizer.encode(img, features=True) if continuous else self.tokenizer.encode(img)
        row = {"sample_id": sample_id, "is_image": [True], "grid_shapes": [], "pixel_codes": [], "semantic_codes": []}
        for name in ("pixel", "semantic"):
            if name in codes:
                grid = codes[name][0].cpu().numpy()
                row[f"{name}_codes"] = [grid.reshape(-1).tolist()]
                row["grid_shapes"] = [list(grid.shape)]
        if continuous:
            row["pixel_features"] = [codes["features"][0].float().cpu().numpy().reshape(-1).tolist()]
        return row

    def add_images(self, images: dict) -> None:
        """{key: uint8 (R, R, 3)} that `answer` may then be asked about (R = the tokenizer's image size)."""
        self.images.update(images)

    def encode_text(self, text: str) -> list[int]:
        """The same canonical segment encoding as the token shards (`encode_segments`)."""
        return encode_segments(self.text, [text])[0]

    def prompt(self, image_path: str, question: str | None):
        """<bos> + the image [+ the question]: what training's first turn looks like; <bos> + the
        question + the image for a question the model reads first (`question_first`)."""
        return self.row_prompt(self.image_row(image_path), question)

    def row_prompt(self, row: dict, question: str | None):
        """`prompt` for an image already encoded as a token row (`encode_image`)."""
        if question and self.question_first is not None and self.question_first.search(question.strip()):
            return self.builder.question_prefix(row, self.encode_text(question))
        prefix = self.builder.image_prefix(row)
        return self.builder.extend_text(prefix, self.encode_text(question)) if question else prefix

    def answer(self, image_path: str, prompt: str | None, max_new_tokens: int) -> str:
        prefix = self.prompt(image_path, prompt)
        ids = generate_text(self.model, prefix.ids, prefix.codes, max_new_tokens=max_new_tokens, prompt_cells=prefix.cells)
        return self.text.decode(ids, skip_special_tokens=True)

    def probe_items(self, per_type: int) -> list[dict]:
        """The first `per_type` held-out questions of each type as ready prompts (plain lists, so a
        training worker needs neither tokenizer): type, ids, cells, codes (an int64 array, or None:
        the continuous interface's run to a few million values, too many for Python ints), answer ids."""
        items, taken = [], {}
        for q in self.heldout.questions:
            if taken.get(q["type"], 0) >= per_type:
                continue
            taken[q["type"]] = taken.get(q["type"], 0) + 1
            p = self.prompt(q["image"], q["question"])
            items.append({"type": q["type"], "ids": p.ids.tolist(), "cells": p.cells.tolist(),
                          "codes": p.codes, "answer": self.encode_text(q["answer"])})
        return items

    # ------------------------------------------------------------------ suites

    def captions(self, limit: int | None = None) -> dict:
        scores, examples = [], []
        for s in self.heldout.scenes[:limit]:
            text = self.answer(s["image"], None, 48)
            truth = list(shapes.Scene.from_dict(s["scene"]).objects)
            scores.append(caption_score(truth, shapes.parse_caption(text)))
            if len(examples) < 8:
                examples.append({"image": s["image"], "truth": s["caption"], "generated": text, "score": round(scores[-1], 3)})
        return {"caption_accuracy": float(np.mean(scores)) if scores else 0.0, "captions": len(scores), "caption_examples": examples}

    def predict(self, q: dict) -> str:
        """The model's normalised answer to one held-out question (compare with `normalise(q["answer"])`)."""
        return normalise(self.answer(q["image"], q["question"], 8))

    def questions(self, limit: int | None = None) -> dict:
        vqa, by_type, pope = [], {}, {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        examples, valid = [], []
        for q in self.heldout.questions[:limit]:
            pred = self.predict(q)
            truth = normalise(q["answer"])
            valid.append(pred in ANSWERS.get(q["type"], {truth}))
            if q["type"] == "exists":
                yes = pred == "yes"
                key = ("t" if yes == (truth == "yes") else "f") + ("p" if yes else "n")
                pope[key] += 1
            else:
                vqa.append(pred == truth)
                by_type.setdefault(q["type"], []).append(pred == truth)
            if len(examples) < 12:
                examples.append({"question": q["question"], "truth": truth, "predicted": pred})
        n_pope = sum(pope.values())
        precision = pope["tp"] / max(1, pope["tp"] + pope["fp"])
        recall = pope["tp"] / max(1, pope["tp"] + pope["fn"])
        return {
            "vqa_accuracy": float(np.mean(vqa)) if vqa else 0.0,
            "vqa_by_type": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_type.items())},
            "valid_answer_rate": float(np.mean(valid)) if valid else 0.0,
            "pope_accuracy": (pope["tp"] + pope["tn"]) / max(1, n_pope),
            "pope_precision": precision, "pope_recall": recall,
            "pope_f1": 2 * precision * recall / max(1e-9, precision + recall),
            "pope_yes_ratio": (pope["tp"] + pope["fp"]) / max(1, n_pope),
            "questions": len(vqa) + n_pope, "question_examples": examples,
        }

    def analyser_accuracy(self) -> float:
        return float(np.mean([analyser.match_score(list(shapes.Scene.from_dict(s["scene"]).objects),
                                                   analyser.analyse(self.heldout.images[s["image"]]))
                              for s in self.heldout.scenes]))

    def generation_ceiling(self) -> float | None:
        """The most text -> image can score with this visual tokenizer (`generation_ceiling`); None for
        the continuous interface (it does not generate)."""
        interface = self.builder.vocab.interface
        if interface == "continuous":
            return None
        return generation_ceiling(self.tokenizer, self.heldout, interface, self.builder.bpe_depth)

    def caption_log_prob(self, pixels: np.ndarray, caption: str) -> float:
        """log p(caption | <bos> + the image) under the model (`generate.text_log_prob`), the image
        uint8 (R, R, 3) encoded by the visual tokenizer as any held-out image is: the model reads the
        picture it drew as it reads a photograph."""
        prefix = self.builder.image_prefix(self.encode_image(pixels, "candidate"))
        return text_log_prob(self.model, prefix.ids, self.encode_text(caption), prefix.codes, prefix.cells)

    def image_log_prob(self, pixels: np.ndarray, caption: str | None) -> float:
        """log p(the image's tokens | <bos> + caption) under the model, summed over its visual tokens (and
        its markers), the image uint8 (R, R, 3) encoded as any held-out image is; `caption` None: the
        unconditional log p(image | <bos>) that classifier-free guidance's second branch learns."""
        return self.row_image_log_prob(self.encode_image(pixels, "candidate"), caption)

    @torch.no_grad()
    def row_image_log_prob(self, image: dict, caption: str | None) -> float:
        """`image_log_prob` for an image already encoded as a token row (`encode_image`)."""
        from tessera.model.packing import collate, pack

        row = {"sample_id": "candidate", "kind": "image_text", "is_image": [False, True], "meta": "",
               "text_ids": [self.encode_text(caption or ""), []], "grid_shapes": [[0, 0, 0], image["grid_shapes"][0]],
               **{f"{name}_codes": [[], image[f"{name}_codes"][0]] for name in ("pixel", "semantic") if image[f"{name}_codes"]}}
        seq = self.builder.build(row, "image", t2i_rate=1.0, cfg_text_dropout=0.0 if caption is not None else 1.0)
        (batch,), _ = pack([seq], len(seq), self.model.vocab.pad_id)
        batch = {k: v.to(self.device) for k, v in collate([batch]).items()}
        return -float(self.model(**batch).image_loss_sum)

    def choice_score(self, pixels: np.ndarray, caption: str, chooser: str) -> float:
        """How much best-of-n wants this drawing of `caption` (the highest is kept): `caption`, the caption's
        log-prob given the drawing (`caption_log_prob`: the model captions its own drawing); `drawing`, the
        drawing's log-prob given the caption (`image_log_prob`: how likely the model finds what it drew)."""
        if chooser == "caption":
            return self.caption_log_prob(pixels, caption)
        if chooser == "drawing":
            return self.image_log_prob(pixels, caption)
        raise ValueError(f"chooser must be one of {list(GENERATION_CHOOSERS)}, got {chooser!r}")

    def generation(self, limit: int, cfg_scale: float, temperature: float, top_k: int, seed: int,
                   candidates: int = 1, chooser: str = "caption") -> dict:
        """Held-out captions -> images -> the analyser's match with their scenes (`generation_accuracy`),
        and the same images against the *next* scene's objects (`generation_chance`): the match a
        generator reaches without following its caption (the score ignores extra objects, so scattered
        coloured blobs score above 0). `found`: the analyser's objects in each generated image.

        `candidates` n > 1: best-of-n. Each caption is drawn n times and the model keeps the image its
        `chooser` scores highest (`choice_score`): `caption`, the one under which it finds the caption most
        likely (it captions its own drawings); `drawing`, the one it finds most likely given the caption.
        The analyser never chooses. Beside the kept images' score: `generation_accuracy_single`, the mean
        score over all n candidates (what one sample scores, on n times the images),
        `generation_accuracy_best_possible`, the best candidate's (what a perfect chooser would keep), and
        `generation_accuracy_best_of` {k: score}: what the same chooser keeps among each caption's first k
        candidates, for k = 1, 2, 4, ... and n, so one run shows what each doubling of the drawings buys."""
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if chooser not in GENERATION_CHOOSERS:
            raise ValueError(f"chooser must be one of {list(GENERATION_CHOOSERS)}, got {chooser!r}")
        g = torch.Generator().manual_seed(seed)
        first = self.image_row(self.heldout.scenes[0]["image"])
        H, W = first["grid_shapes"][0][:2]
        scenes = self.heldout.scenes[:limit]
        truths = [list(shapes.Scene.from_dict(s["scene"]).objects) for s in scenes]
        found, samples, scores, single, best_possible = [], [], [], [], []
        best_of = {k: [] for k in best_of_sizes(candidates)}
        for s, truth in zip(scenes, truths):
            prompt = [self.model.vocab.bos_id] + self.encode_text(s["caption"])
            drawn = []  # (the model's caption log-prob, pixels, the analyser's objects)
            for _ in range(candidates):
                codes = generate_image(self.model, prompt, (H, W), bpe=self.builder.bpe, cfg_scale=cfg_scale,
                                       temperature=temperature, top_k=top_k, generator=g)
                pixels = decode_pixels(self.tokenizer, codes, self.model.vocab.interface)
                score = self.choice_score(pixels, s["caption"], chooser) if candidates > 1 else 0.0
                drawn.append((score, pixels, analyser.analyse(pixels)))
            def chosen(k: int) -> int:  # the first k drawings' best-scored one; the first on ties (and when k = 1)
                return max(range(k), key=lambda i: drawn[i][0])

            kept = chosen(candidates)
            matches = [analyser.match_score(truth, d[2]) for d in drawn]
            for k in best_of:
                best_of[k].append(matches[chosen(k)])
            scores.append(matches[kept])
            single.append(float(np.mean(matches)))
            best_possible.append(max(matches))
            found.append(drawn[kept][2])
            samples.append((s["caption"], drawn[kept][1]))
        n = len(found)
        shuffled = [analyser.match_score(truths[(i + 1) % n], f) for i, f in enumerate(found)]
        return {"generation_accuracy": float(np.mean(scores)) if n else 0.0,
                "generation_chance": float(np.mean(shuffled)) if n > 1 else None, "generated": n, "samples": samples,
                "found": found, "candidates": candidates, "chooser": chooser,
                "generation_accuracy_single": float(np.mean(single)) if n else 0.0,
                "generation_accuracy_best_possible": float(np.mean(best_possible)) if n else 0.0,
                "generation_accuracy_best_of": {k: float(np.mean(v)) if n else 0.0 for k, v in best_of.items()}}

    @torch.no_grad()
    def perplexity(self, rows: list[dict], seq_len: int) -> dict:
        """exp(mean cross-entropy) of text and image targets over token rows (loss mask `all`)."""
        from tessera.model.packing import collate, pack

        seqs = [self.builder.build(r, "all") for r in rows]
        batches, _ = pack(seqs, seq_len, self.model.vocab.pad_id)
        text_sum = image_sum = 0.0
        n_text = n_image = 0
        for b in batches:
            out = self.model(**collate([b]))
            nt, n = int(out.num_text_targets), int(out.num_targets)
            text_sum += float(out.text_loss) * nt
            image_sum += float(out.image_loss) * (n - nt)
            n_text, n_image = n_text + nt, n_image + n - nt
        return {"text_perplexity": float(np.exp(text_sum / max(1, n_text))), "image_perplexity": float(np.exp(image_sum / max(1, n_image)))}


@torch.no_grad()
def run_probe(model: TesseraModel, items: list[dict]) -> dict[str, float]:
    """Greedy answers to probe prompts (see `Evaluator.probe_items`) -> accuracy per question type
    (exact match of the answer's token ids, up to <eos>)."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    for it in items:
        codes = None if it["codes"] is None else np.asarray(it["codes"], np.int64)
        out = generate_text(model, it["ids"], codes, max_new_tokens=len(it["answer"]) + 1,
                            prompt_cells=np.asarray(it["cells"], np.int64))
        hits.setdefault(it["type"], []).append(out == list(it["answer"]))
    model.train(was_training)
    return {t: float(np.mean(v)) for t, v in sorted(hits.items())}


def plot_generations(samples: list[tuple[str, np.ndarray]], path: str, columns: int = 4) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, (len(samples) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (caption, img) in zip(axes.ravel(), samples):
        ax.imshow(img)
        ax.set_title("\n".join(caption[i:i + 34] for i in range(0, len(caption), 34)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
