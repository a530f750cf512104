"""Does a trained ablation arm read the image? For each stage's saved model of one arm-seed: the
largest change of the answer's next-token logits when a held-out colour question is asked about
another image (mean over 20 questions, each against the next held-out scene's image), and for the continuous interface the mean cosine between the projector's outputs
of cells with different codes (near 1: the projector collapsed to one vector).

    python experiments/image_dependence.py configs/ablations.yaml /work/runs/demo continuous/continuous 0
"""

import sys

import numpy as np
import torch

from tessera.config import load_config
from tessera.jobs.ablate import arm_config, select_arms
from tessera.jobs.eval import _evaluator
from tessera.model.assets import load_model
from tessera.model.unified import features_from_bits

STAGE_MODELS = ("stages/0-embeddings/model", "stages/1-layers/model", "model")


def answer_logits(model, ev, image: str, question: str) -> torch.Tensor:
    p = ev.prompt(image, question)
    codes = None if p.codes is None else torch.from_numpy(np.asarray(p.codes))[None]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(p.ids))[None], codes=codes,
                    cells=torch.from_numpy(np.asarray(p.cells))[None], position_ids=torch.arange(len(p.ids))[None])
    return out.logits[0, -1]


def projector_cosine(model, ev, images: list[str]) -> float:
    feats, codes = [], []
    for image in images:
        p = ev.prompt(image, None)
        ids = torch.tensor(np.asarray(p.ids))
        at = ids >= model.vocab.visual_base
        feats.append(features_from_bits(torch.from_numpy(np.asarray(p.codes))[at][:, 0]))
        codes.append(ids[at])
    F, C = torch.cat(feats), torch.cat(codes)
    pairs = torch.randint(0, len(F), (2, 4000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        E = model.feature_proj(F)
    cos = torch.nn.functional.cosine_similarity(E[pairs[0]], E[pairs[1]])
    return float(cos[C[pairs[0]] != C[pairs[1]]].mean())


def main(config: str, root: str, arm_name: str, seed: str) -> None:
    overrides = [f"run.root={root}"]
    cfg = load_config(config, overrides)
    (study, arm), = select_arms(cfg, [arm_name])
    acfg = arm_config(config, overrides, cfg, study, arm, int(seed))
    ev, held = _evaluator(acfg, acfg.resolve(acfg.eval.model))
    questions = [q for q in held.questions if q["type"] == "colour"][:20]
    images = [s["image"] for s in held.scenes]
    others = [images[(images.index(q["image"]) + 1) % len(images)] for q in questions]
    base = acfg.resolve(acfg.train.output)
    for stage in STAGE_MODELS:
        model = load_model(f"{base}/{stage}").eval()
        change = np.mean([float((answer_logits(model, ev, q["image"], q["question"])
                                 - answer_logits(model, ev, o, q["question"])).abs().max()) for q, o in zip(questions, others)])
        line = f"{stage}: max |logit change| with another image {change:.2f} (mean of {len(questions)})"
        if model.vocab.interface == "continuous":
            line += f", projector cosine between different codes {projector_cosine(model, ev, [s['image'] for s in held.scenes[:16]]):.3f}"
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])
