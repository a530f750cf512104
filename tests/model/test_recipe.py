"""The training recipe's defects (the learning issue), each pinned by a test (no Ray):
independent turns, per-stage caption-first rate, shuffled packed rows, one token form per word,
and the 2-D place of visual tokens."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from tessera.model.rows import BuildSpec, build_group
from tessera.model.packing import collate, pack
from tessera.model.unified import IGNORE
from tests.model.test_model import DEPTH, GRID, SIZES, bpe, builder_for, make_model, token_row  # noqa: F401  (bpe: fixture)


def vqa_row(sid, n_turns=3, rng=None):
    """An image and `n_turns` independent (question, answer) turns, as synth's VQA documents."""
    rng = rng or np.random.default_rng(1)
    row = token_row(sid, kind="web", n_images=1, text_len=4, rng=rng)
    roles = [None]
    for _ in range(n_turns):
        row["is_image"] += [False, False]
        row["text_ids"] += [rng.integers(3, 300, 5).tolist(), rng.integers(3, 300, 1).tolist()]
        for k in ("pixel_codes", "semantic_codes", "grid_shapes"):
            row[k] += [[], []]
        roles += ["user", "assistant"]
    # drop the caption token_row added after the image: image, then the turns
    for k in ("is_image", "text_ids", "pixel_codes", "semantic_codes", "grid_shapes"):
        del row[k][1]
    row["meta"] = json.dumps({"roles": roles, "task": "vqa", "turns": "independent"})
    return row


def single_turn(row, k):
    """The same image with only turn k (what evaluation asks)."""
    one = {**row, "sample_id": row["sample_id"] + f"-t{k}"}
    keep = [0, 1 + 2 * k, 2 + 2 * k]
    for key in ("is_image", "text_ids", "pixel_codes", "semantic_codes", "grid_shapes"):
        one[key] = [row[key][i] for i in keep]
    one["meta"] = json.dumps({"roles": [None, "user", "assistant"], "task": "vqa"})
    return one


def test_independent_turns_see_only_the_image_and_their_own_question(bpe):
    """Defect 2: turns about one image used to see each other's answers. Now every answer's
    logits in the multi-turn training row equal those of the single-turn prompt evaluation uses."""
    torch.manual_seed(0)
    for interface in ("bpe", "rvq"):
        model = make_model(interface, bpe).eval()
        b = builder_for(model, bpe)
        row = vqa_row("q")
        multi = b.build(row, "answers")
        assert multi.turns is not None and set(multi.turns.tolist()) == {0, 1, 2, 3}
        rows, _ = pack([multi], 256, model.vocab.pad_id)
        with torch.no_grad():
            logits_multi = model(**{k: v for k, v in collate(rows).items() if k not in ("labels", "target_codes")}).logits
        for k in range(3):
            alone = b.build(single_turn(row, k), "answers")
            assert alone.turns is None
            r1, _ = pack([alone], 256, model.vocab.pad_id)
            with torch.no_grad():
                logits_alone = model(**{kk: v for kk, v in collate(r1).items() if kk not in ("labels", "target_codes")}).logits
            at_multi = np.flatnonzero(multi.turns == k + 1)
            at_alone = np.arange(len(alone) - len(at_multi), len(alone))  # the turn is the single sequence's tail
            torch.testing.assert_close(logits_multi[0, at_multi], logits_alone[0, at_alone], atol=1e-5, rtol=1e-5)
        # every answer is a target; no target is predicted across two turns
        t = rows[0]["labels"]
        answer_targets = [int(i) for i in np.flatnonzero(t != IGNORE)]
        assert len(answer_targets) == 3 * 2  # one answer token + <eos> per turn
        assert all(multi.turns[i] == multi.turns[i + 1] for i in answer_targets)


def test_turns_are_independent_only_when_the_sample_says_so(bpe):
    model = make_model("bpe", bpe)
    row = vqa_row("q")
    row["meta"] = json.dumps({"roles": json.loads(row["meta"])["roles"]})  # a real multi-turn chat: turns build on each other
    assert builder_for(model, bpe).build(row, "answers").turns is None


def spec_for(model, bpe, tmp_path, t2i_rate=0.0, stage=0, seed=0):
    path = str(tmp_path / "merges.json")
    bpe.save(path)
    return BuildSpec(tuple(model.vocab.to_dict().items()), path, ("pixel", "semantic"), DEPTH, tuple(SIZES), "pixel", 0,
                     seq_len=64, loss_mask="answers", seed=seed, stage=stage, t2i_rate=t2i_rate, cfg_text_dropout=0.0)


def write_rows(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_stage_without_caption_first_pairs_has_no_image_targets(bpe, tmp_path):
    """Defect 3: under `answers`, caption-first pairs put their image tokens under the loss
    (55 % of the demo's stage-3 targets). A stage's own `t2i_rate: 0` removes them."""
    from tessera.config import load_config

    model = make_model("bpe", bpe)
    path = write_rows(tmp_path, [token_row(f"c{i}") for i in range(24)])
    image_share = {}
    for rate in (0.0, 1.0):
        rows, _ = build_group(spec_for(model, bpe, tmp_path, t2i_rate=rate), [path] * 24, list(range(24)), [0] * 24)
        t = np.concatenate([r["labels"] for r in rows])
        t = t[t != IGNORE]
        image_share[rate] = float((t >= model.vocab.text_size).mean())
    assert image_share[0.0] == 0.0 and image_share[1.0] > 0.5
    tc = load_config("configs/demo.yaml").train
    assert [tc.t2i_rate_of(s) for s in tc.stages][-1] == 0.0, "the demo's answer stage trains understanding only"
    assert tc.t2i_rate_of(tc.stages[0]) == tc.t2i_rate


def test_packed_rows_are_shuffled_within_a_group_deterministically(bpe, tmp_path):
    """Defect 4: rows came in first-fit-decreasing order (long VQA rows first), so a step held
    similar rows. They are now a seeded permutation of the packed rows: mixed, and the same on resume."""
    model = make_model("bpe", bpe)
    rng = np.random.default_rng(0)
    rows_in = [token_row(f"c{i}", text_len=int(rng.integers(2, 30))) for i in range(40)]
    path = write_rows(tmp_path, rows_in)
    args = ([path] * 40, list(range(40)), [0] * 40)
    spec = spec_for(model, bpe, tmp_path, t2i_rate=0.5)
    a, _ = build_group(spec, *args, group=3)
    b, _ = build_group(spec, *args, group=3)
    c, _ = build_group(spec, *args, group=4)
    fill = lambda rows: [int((r["doc_ids"] > 0).sum()) for r in rows]  # noqa: E731
    assert [r["input_ids"].tolist() for r in a] == [r["input_ids"].tolist() for r in b], "same group -> same order"
    assert fill(a) != sorted(fill(a), reverse=True), "rows must not come longest-first"
    assert sorted(map(tuple, (r["input_ids"] for r in a))) == sorted(map(tuple, (r["input_ids"] for r in c)))
    assert [r["input_ids"].tolist() for r in a] != [r["input_ids"].tolist() for r in c], "each group its own order"


def test_an_answer_word_is_the_same_token_as_in_a_caption(tmp_path):
    """Defect 5: answers were encoded bare (`red`) and captions had ` red`, so captions could not
    teach answer tokens. Every text segment now has one canonical form."""
    from tessera.tokenize.text import encode_segments, train_text_tokenizer

    captions = [f"A {s} {c} circle at the top left." for s in ("small", "large") for c in ("red", "blue", "green")] * 20
    tok = train_text_tokenizer([" " + c for c in captions], 300, str(tmp_path / "tok"))
    caption, answer, question = encode_segments(tok, ["A small red circle at the top left.", "red", "What colour is it?"])
    assert len(answer) == 1 and answer[0] in caption
    assert tok.decode(answer).strip() == "red"
    assert encode_segments(tok, []) == []


def test_visual_tokens_carry_their_anchor_cells(bpe):
    """2-D positions: each BPE tile carries the (row, column) of its anchor, the same cells that
    `VisualBPE.decode` fills; rvq cells carry their own cell; text carries none."""
    for interface in ("bpe", "rvq"):
        model = make_model(interface, bpe)
        seq = builder_for(model, bpe).build(token_row("x"), "all")
        visual = model.visual_mask(torch.from_numpy(seq.ids)).numpy()
        assert (seq.cells[visual] >= 0).all() and (seq.cells[~visual] == -1).all()
        grid = np.zeros(GRID, int)
        if interface == "bpe":
            for (r, c), tok in zip(seq.cells[visual], seq.ids[visual] - model.vocab.visual_base):
                h, w = bpe.shape(int(tok))
                assert (grid[r:r + h, c:c + w] == 0).all()
                grid[r:r + h, c:c + w] += 1
        else:
            for r, c in seq.cells[visual]:
                grid[r, c] += 1
        assert (grid == 1).all(), "the anchors' tiles cover the grid exactly once"
        # and the model reads them: moving the tiles' cells changes the logits
        rows, _ = pack([seq], 64, model.vocab.pad_id)
        batch = collate(rows)
        moved = {**batch, "cells": torch.where(batch["cells"] >= 0, (batch["cells"] + 1) % GRID[0], batch["cells"])}
        with torch.no_grad():
            a = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes"), cells=batch["cells"]).logits
            b = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes"), cells=moved["cells"]).logits
        assert not torch.allclose(a, b)


def conversation(sid, turns, tok, rng):
    """`vqa_row` with real question/answer text: `turns` is [(question, answer), ...]."""
    from tessera.tokenize.text import encode_segments

    row = vqa_row(sid, len(turns), rng)
    for k, (q, a) in enumerate(turns):
        row["text_ids"][1 + 2 * k], row["text_ids"][2 + 2 * k] = encode_segments(tok, [q, a])
    return row


def trained_tokenizer(tmp_path, texts, vocab_size):
    """A text tokenizer trained on `texts` -> (tokenizer, its directory: a BuildSpec's `text_tokenizer`)."""
    from tessera.tokenize.text import train_text_tokenizer

    tok_dir = str(tmp_path / "text_tokenizer")
    return train_text_tokenizer(texts, vocab_size, tok_dir), tok_dir


def test_a_questions_stage_trains_only_the_turns_it_names(bpe, tmp_path):
    """A curriculum phase on one kind of question (the demo's `shape` stage): under a stage's
    `questions` pattern a conversation keeps only the turns whose question it finds, each with its
    own answer; a conversation with none is left out; a caption passes unchanged."""
    from tessera.model.rows import keep_questions
    words = ["red", "blue", "circle", "square", "small", "large"]
    texts = [f" What {k} is the object at the top? {w}" for k in ("colour", "shape", "size") for w in words] * 10
    tok, tok_dir = trained_tokenizer(tmp_path, texts, 280)
    rng = np.random.default_rng(0)
    mixed = conversation("m", [("What colour is it?", "red"), ("What shape is it?", "circle"),
                               ("What size is it?", "small"), ("What shape is at the top?", "square")], tok, rng)
    no_shape = conversation("n", [("What colour is it?", "blue")], tok, rng)
    caption = token_row("c", text_len=4, rng=rng)

    kept = keep_questions(mixed, r"^What shape", tok.decode)
    assert json.loads(kept["meta"])["roles"] == [None, "user", "assistant", "user", "assistant"]
    assert [tok.decode(t).strip() for t in kept["text_ids"][1:]] == ["What shape is it?", "circle", "What shape is at the top?", "square"]
    assert kept["pixel_codes"][0] == mixed["pixel_codes"][0] and kept["is_image"] == [True, False, False, False, False]
    assert keep_questions(no_shape, r"^What shape", tok.decode) is None
    assert keep_questions(caption, r"^What shape", tok.decode) is caption

    model = make_model("bpe", bpe)
    path = write_rows(tmp_path, [mixed, no_shape])
    spec = dataclasses.replace(spec_for(model, bpe, tmp_path), seq_len=256, questions=r"^What shape", text_tokenizer=tok_dir)
    rows, _ = build_group(spec, [path] * 2, [0, 1], [0] * 2)
    targets = np.concatenate([r["labels"] for r in rows])
    answers = tok.decode([int(t) for t in targets[(targets != IGNORE) & (targets != model.vocab.eos_id)]]).split()
    assert sorted(answers) == ["circle", "square"], "only the shape turns' answers are targets"
    whole, _ = build_group(dataclasses.replace(spec, questions=None), [path] * 2, [0, 1], [0] * 2)
    targets = np.concatenate([r["labels"] for r in whole])
    assert sorted(tok.decode([int(t) for t in targets[(targets != IGNORE) & (targets != model.vocab.eos_id)]]).split()) == \
        sorted(["red", "circle", "small", "square", "blue"])


def test_a_questions_pattern_that_is_not_a_regular_expression_is_a_config_error():
    import pytest

    from tessera.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"questions"):
        load_config("configs/demo.yaml", ["train.stages=[{name: x, steps: 1, questions: '^What (shape'}]"])


def test_a_questions_rate_reduces_that_share_of_conversations_and_keeps_the_rest_whole(bpe, tmp_path):
    """`questions_rate` < 1: a phase dwells on one kind of question without dropping the others. The
    draw is by sample id, so the same conversations are reduced however the rows are grouped."""
    from tessera.config import ConfigError, load_config
    from tessera.model.rows import reduced

    texts = [f" What {k} is it? {w}" for k in ("colour", "shape") for w in ("red", "blue", "circle", "square")] * 10
    tok, tok_dir = trained_tokenizer(tmp_path, texts, 260)
    rng = np.random.default_rng(0)
    convs = [conversation(f"s{i}", [("What colour is it?", "red"), ("What shape is it?", "circle")], tok, rng) for i in range(40)]
    model = make_model("bpe", bpe)
    path = write_rows(tmp_path, convs)
    spec = dataclasses.replace(spec_for(model, bpe, tmp_path), seq_len=512, questions=r"^What shape",
                               questions_rate=0.5, text_tokenizer=tok_dir)

    def answers(spec, rows):
        built, _ = build_group(spec, [path] * len(rows), rows, [0] * len(rows))
        targets = np.concatenate([r["labels"] for r in built])
        return tok.decode([int(t) for t in targets[(targets != IGNORE) & (targets != model.vocab.eos_id)]]).split()

    whole = sum(not reduced(f"s{i}", 0.5) for i in range(40))
    assert 10 <= whole <= 30, "about half the conversations keep every turn"
    got = answers(spec, list(range(40)))
    assert got.count("circle") == 40 and got.count("red") == whole
    assert answers(spec, list(range(20))).count("red") + answers(spec, list(range(20, 40))).count("red") == whole
    assert answers(dataclasses.replace(spec, questions_rate=1.0), list(range(40))).count("red") == 0

    with pytest.raises(ConfigError, match=r"questions_rate"):
        load_config("configs/demo.yaml", ["train.stages=[{name: x, steps: 1, questions: '^What shape', questions_rate: 0}]"])


def test_question_first_turns_become_samples_that_read_the_question_before_the_image(bpe, tmp_path):
    """`model.question_first`: a matching turn leaves its conversation for a sample of its own,
    question then image then answer, laid out exactly as evaluation prompts it (`question_prefix`);
    every answer is still a target once, and the other turns keep their shared image."""
    from tessera.model.rows import split_question_first

    texts = [f" {q} {w}" for q in ("What colour is it?", "What shape is it?", "Is there a red circle in the image?")
             for w in ("red", "circle", "yes", "no")] * 10
    tok, tok_dir = trained_tokenizer(tmp_path, texts, 280)
    rng = np.random.default_rng(0)
    conv = conversation("m", [("What colour is it?", "red"), ("Is there a red circle in the image?", "yes"),
                              ("What shape is it?", "circle"), ("Is there a blue square in the image?", "no")], tok, rng)
    only_exists = conversation("e", [("Is there a red circle in the image?", "yes")], tok, rng)
    caption = token_row("c", text_len=4, rng=rng)

    parts = split_question_first(conv, r"^Is there", tok.decode)
    assert [p["sample_id"] for p in parts] == ["m", "m/q3", "m/q7"]
    rest, first, second = parts
    assert json.loads(rest["meta"])["turns"] == "independent"
    assert [tok.decode(t).strip() for t in rest["text_ids"][1:]] == ["What colour is it?", "red", "What shape is it?", "circle"]
    for p, (q, a) in ((first, ("Is there a red circle in the image?", "yes")), (second, ("Is there a blue square in the image?", "no"))):
        meta = json.loads(p["meta"])
        assert meta["roles"] == ["user", None, "assistant"] and "turns" not in meta
        assert p["is_image"] == [False, True, False] and p["pixel_codes"][1] == conv["pixel_codes"][0]
        assert [tok.decode(p["text_ids"][0]).strip(), tok.decode(p["text_ids"][2]).strip()] == [q, a]
    assert [p["sample_id"] for p in split_question_first(only_exists, r"^Is there", tok.decode)] == ["e/q1"]
    assert split_question_first(caption, r"^Is there", tok.decode) == [caption]

    model = make_model("bpe", bpe)
    b = builder_for(model, bpe)
    built = b.build(first, "answers")
    prompt = b.question_prefix(first, first["text_ids"][0], position=1)
    n = len(prompt.ids)
    np.testing.assert_array_equal(built.ids[:n], prompt.ids)
    np.testing.assert_array_equal(built.cells[:n], prompt.cells)
    assert not built.loss[:n].any() and built.loss[n:].all(), "the answer (and its <eos>) is the only target"
    assert (prompt.cells[1 + len(first["text_ids"][0]):] >= 0).any(), "the image's tiles come after the question"

    from tessera.model.evaluate import Evaluator  # what `tessera eval` and the training probe ask
    ev = Evaluator(None, b, tok, None, None, question_first=r"^Is there")
    ev._rows["img"] = {"sample_id": "img", "is_image": [True], **{k: [conv[k][0]] for k in ("grid_shapes", "pixel_codes", "semantic_codes")}}
    np.testing.assert_array_equal(ev.prompt("img", "Is there a red circle in the image?").ids, built.ids[:n])
    image_first = ev.prompt("img", "What colour is it?")  # any other question still follows the image
    np.testing.assert_array_equal(image_first.ids, b.build(single_turn(conv, 0), "answers").ids[:len(image_first.ids)])

    path = write_rows(tmp_path, [conv, only_exists])
    spec = dataclasses.replace(spec_for(model, bpe, tmp_path), seq_len=512, text_tokenizer=tok_dir)

    def answers(spec):
        rows, _ = build_group(spec, [path] * 2, [0, 1], [0] * 2)
        targets = np.concatenate([r["labels"] for r in rows])
        return sorted(tok.decode([int(t) for t in targets[(targets != IGNORE) & (targets != model.vocab.eos_id)]]).split())

    assert answers(dataclasses.replace(spec, question_first=r"^Is there")) == answers(spec) == ["circle", "no", "red", "yes", "yes"]


def test_a_question_first_pattern_that_is_not_a_regular_expression_is_a_config_error():
    from tessera.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"question_first"):
        load_config("configs/demo.yaml", ["model.question_first=^Is (there"])
