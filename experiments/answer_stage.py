"""The demo's answer stage in process, on a finished run's real tokens: probe accuracy per question
type on held-out scenes *and* on training scenes every `--every` steps, so a curve says whether the
model under-fits (both low) or memorises (training high, held-out low).

Rows are the train job's own (`stage_plan` + `build_group`: same mixture, packing, loss mask and
shuffle); the model starts from `--init` (e.g. the run's stage-1 model) or fresh. Chance per type:
colour .17, shape .25, size .50, position .11, count .33 (README "Learning").

    PYTHONPATH=. python experiments/answer_stage.py runs/demo --init runs/demo/train/stages/1-layers/model \
        [--steps 560] [--lr 3e-3] [--mix demo|vqa] [--types shape,colour [--types-rate 0.5]] [--save DIR] [--set model.KEY=VALUE ...]

`--types` keeps only those question types in every training VQA conversation (the others' turns are
dropped), to tell whether a type fails to learn on its own or only beside the others.
"""

import argparse
import json
import os
import re
import time

import numpy as np
import torch
from PIL import Image

from tessera.config import load_config
from tessera.jobs.train import _load_data, _plan
from tessera.model.assets import load_model, save_model
from tessera.model.evaluate import Evaluator, HeldOut, run_probe
from tessera.model.mixture import stage_plan
from tessera.model.packing import collate
from tessera.model import rows as rows_module
from tessera.model.rows import BuildSpec, _builder, build_group, keep_questions, reduced
from tessera.model.stream import model_inputs
from tessera.model.trainer import StageTrainer
from tessera.model.unified import TesseraModel
from tessera.tokenize.tokenizer import load_tokenizer

MIXTURES = {"demo": {"kind=image_text": 0.4, "task=vqa": 0.6}, "vqa": {"task=vqa": 1.0},
            "captions": {"kind=image_text": 1.0}}
TYPES = [("colour", r"^What colour"), ("shape", r"^What shape"), ("size", r"^What size"), ("position", r"^Where"),
         ("count", r"^How many"), ("exists", r"^Is there")]
VQA_TYPES = ("colour", "shape", "size", "position", "count")


def question_type(question: str) -> str:
    """The shapes world's question type of a question's text (one of `TYPES`)."""
    return next(t for t, p in TYPES if re.match(p, question))


def training_questions(instruct_dir: str, scenes: int, resolution: int) -> HeldOut:
    """The first `scenes` training VQA scenes (the LLaVA conversations `tessera synth` writes) as a
    held-out-shaped set (one question per turn)."""
    questions, images = [], {}
    with open(os.path.join(instruct_dir, "llava_vqa.json")) as f:
        rows = json.load(f)[:scenes]
    for r in rows:
        path = os.path.join(instruct_dir, r["image"])
        images[path] = np.asarray(Image.open(path).convert("RGB").resize((resolution, resolution)))
        turns = [t["value"].replace("<image>", "").strip() for t in r["conversations"]]
        for q, a in zip(turns[0::2], turns[1::2]):
            questions.append({"image": path, "type": question_type(q), "question": q, "answer": a})
    return HeldOut([], questions, images)


def training_captions(wds_dir: str, n: int, resolution: int) -> HeldOut:
    """The first `n` training image-text pairs (img2dataset shard 00000 that `tessera synth` writes, whose
    `.json` carries the scene) as a held-out-shaped set, to score text -> image on captions the model trained on."""
    import io
    import tarfile

    scenes, images = [], {}
    with tarfile.open(os.path.join(wds_dir, "00000.tar")) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".json") or len(scenes) >= n:
                continue
            meta = json.loads(tar.extractfile(member).read())
            if meta.get("status") != "success" or not meta.get("scene"):
                continue
            jpg = tar.extractfile(member.name[:-5] + ".jpg").read()
            images[meta["key"]] = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB").resize((resolution, resolution)))
            scenes.append({"image": meta["key"], "caption": meta["caption"], "scene": meta["scene"]})
    return HeldOut(scenes, [], images)


def types_pattern(types: set[str]) -> str:
    """The `questions` pattern (`StageConfig.questions`) that finds the questions of these types."""
    return "|".join(p for t, p in TYPES if t in types)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--init", default="", help="model directory to start from (default: a fresh model)")
    ap.add_argument("--steps", type=int, default=560)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mix", default="demo", choices=sorted(MIXTURES))
    ap.add_argument("--types", default="", help="comma-separated question types to keep in training conversations")
    ap.add_argument("--types-rate", type=float, default=1.0,
                    help="share of conversations reduced to --types (seeded by sample id); the rest keep every type")
    ap.add_argument("--every", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.hidden_size=256")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (figures can differ by a few hundredths between thread counts)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--save", default="", help="write the trained model here (an --init for a next phase)")
    ap.add_argument("--loss-mask", default="answers", choices=["answers", "all"])
    ap.add_argument("--t2i-rate", type=float, default=0.0, help="share of captions put before their image")
    ap.add_argument("--generate", type=int, default=0,
                    help="also score text -> image (tessera eval's generation: analyser match) on N held-out and N training captions at each probe")
    ap.add_argument("--grid-encoder", type=int, default=0,
                    help="give the model a grid encoder of N conv layers (model.grid_encoder) before the stage")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, [f"run.root={a.root}"] + a.set)
    run = _plan(cfg)
    _load_data(run)
    stage = load_config(None, ["train.stages=[{name: all, steps: %d, lr: %.10f, warmup_steps: %d, batch_size: %d, "
                               "seq_len: 512, loss_mask: %s}]" % (a.steps, a.lr, a.warmup, a.batch, a.loss_mask)]).train.stages[0]
    if a.types:
        read_row, types = rows_module.read_row, set(a.types.split(","))
        def reduced_row(path, row):
            r = read_row(path, row)
            if not reduced(r["sample_id"], a.types_rate):  # the train job's own draw (`questions_rate`)
                return r
            # the train job's own filter; a conversation with none of these types keeps them all (a sample needs an answer)
            return keep_questions(r, types_pattern(types), run.assets.text_tokenizer.decode) or r
        rows_module.read_row = reduced_row  # build_group reads rows through this module global
    spec = BuildSpec(seq_len=512, loss_mask=a.loss_mask, seed=a.seed, stage=2, t2i_rate=a.t2i_rate, cfg_text_dropout=0.1, **run.spec_kwargs)
    plan = stage_plan(run.index, MIXTURES[a.mix], a.steps * a.batch * 64, a.seed, 2)  # short (oracle) rows pack many samples
    rows = []
    for g in range(0, len(plan), 128):
        grp = plan[g:g + 128]
        rows += build_group(spec, [run.index.files[s] for s, _ in grp], [run.index.rows[s] for s, _ in grp], [e for _, e in grp], g)[0]
        if len(rows) >= a.steps * a.batch:
            break
    tokenizer, tcfg, _ = load_tokenizer(cfg.resolve(cfg.model.tokenizer), "cpu")
    seen = training_questions(os.path.join(cfg.resolve(cfg.synth.output), "instruct"), 60, tcfg.image_size)
    train_items = Evaluator(None, _builder(spec), run.assets.text_tokenizer, tokenizer, seen,
                            question_first=cfg.model.question_first).probe_items(30)
    model = load_model(a.init) if a.init else TesseraModel.create(cfg.model, run.vocab, run.sizes, run.depth, seed=a.seed,
                                                                  tile_codes=run.assets.tile_codes(cfg.model))
    if a.grid_encoder and not hasattr(model, "grid_encoder"):
        model.cfg.grid_encoder.layers = a.grid_encoder
        torch.manual_seed(a.seed)
        model.attach_grid_encoder(run.assets.tile_codes(model.cfg))
    generators = {}
    if a.generate:  # tessera eval's own generation suite, with eval's sampling settings, on held-out and training captions
        held = HeldOut.load(cfg.resolve(cfg.eval.heldout), tcfg.image_size)
        train_caps = training_captions(os.path.join(cfg.resolve(cfg.synth.output), "wds"), a.generate, tcfg.image_size)
        generators = {name: Evaluator(model, _builder(spec), run.assets.text_tokenizer, tokenizer, h)
                      for name, h in (("text_to_image", held), ("train_text_to_image", train_caps))}
    trainer = StageTrainer(model, stage, 0.01, 1.0, torch.device("cpu"))
    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = rows[(step - 1) * a.batch:step * a.batch]
        m = trainer.train_step([model_inputs(collate(batch))])
        if step % a.every == 0 or step == a.steps:
            out = {"tag": a.tag, "step": step, "loss": round(float(m["loss"]), 4), "lr": round(float(m["lr"]), 6),
                   "seconds": round(time.time() - t0, 1)}
            for name, items in (("train", train_items), ("heldout", run.probe)):
                acc = run_probe(model, items)
                out[name] = {k: round(v, 3) for k, v in acc.items()}
                out[f"{name}_vqa"] = round(float(np.mean([acc[t] for t in VQA_TYPES])), 3)
            ec = cfg.eval
            for name, generator in generators.items():
                model.eval()
                gen = generator.generation(a.generate, ec.cfg_scale, ec.temperature, ec.top_k, ec.seed)
                model.train()
                out[name] = round(gen["generation_accuracy"], 3)
            print(json.dumps(out), flush=True)
    if a.save:
        save_model(model, a.save)


if __name__ == "__main__":
    main()
