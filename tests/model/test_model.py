"""The unified model: interfaces, MoT, packing, generation, save/load (no Ray)."""

import json

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from tessera.bpe.model import VisualBPE
from tessera.config import load_config
from tessera.model.assets import load_model, save_model
from tessera.model.generate import generate_image, generate_text, text_log_prob
from tessera.model.packing import collate, pack, pad
from tessera.model.sequence import BadSample, SequenceBuilder
from tessera.model.unified import TesseraModel
from tessera.model.vocab import Vocabulary

TEXT = 300
GRID = (4, 4)
DEPTH = 2
SIZES = [16, 8]


def model_config(*extra):
    return load_config(None, ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                              "model.intermediate_size=64", "model.depth_head.dim=16", "model.depth_head.heads=2",
                              "model.depth_head.layers=1", *extra]).model


@pytest.fixture(scope="module")
def bpe():
    rng = np.random.default_rng(0)
    grids = [np.repeat(np.repeat(rng.integers(0, 16, (2, 2)), 2, 0), 2, 1).astype(np.int32) for _ in range(64)]
    return VisualBPE.fit(grids, codebook_size=16, num_merges=24)


def vocab_for(interface, bpe=None):
    return Vocabulary(text_size=TEXT, bos_id=1, eos_id=2, pad_id=0, interface=interface,
                      visual_size=bpe.vocab_size if interface == "bpe" else 0, max_grid=8, time_tokens=8)


def make_model(interface, bpe, mot=False, seed=0, *overrides):
    extra = ["model.mot=true", "model.mot_attention=true"] if mot else []
    cfg = model_config(f"model.interface={interface}", "model.codebooks=[pixel, semantic]", *extra, *overrides)
    return TesseraModel.create(cfg, vocab_for(interface, bpe), SIZES, DEPTH, seed=seed)


def token_row(sid, kind="image_text", n_images=1, text_len=5, rng=None, roles=None, timestamps=None):
    """A token-shard row with random codes: image(s) then text(s)."""
    rng = rng or np.random.default_rng(abs(hash(sid)) % 2**32)
    is_image, text_ids, pixel, semantic, shapes = [], [], [], [], []
    for i in range(n_images):
        is_image.append(True)
        text_ids.append([])
        pixel.append(rng.integers(0, 8, GRID[0] * GRID[1] * DEPTH).tolist())  # < both codebook sizes
        semantic.append(rng.integers(0, 8, GRID[0] * GRID[1] * DEPTH).tolist())
        shapes.append([*GRID, DEPTH])
        is_image.append(False)
        text_ids.append(rng.integers(3, TEXT, text_len).tolist())
        pixel.append([]), semantic.append([]), shapes.append([])
    meta = {"roles": roles} if roles else {}
    return {"sample_id": sid, "source": "s", "kind": kind, "is_image": is_image, "text_ids": text_ids, "pixel_codes": pixel,
            "semantic_codes": semantic, "grid_shapes": shapes, "timestamps": timestamps, "curriculum": [], "meta": json.dumps(meta)}


def builder_for(model, bpe):
    return SequenceBuilder(model.vocab, bpe, ("pixel", "semantic"), DEPTH, tuple(SIZES))


def batch_of(model, bpe, n=3, seq_len=128, packed=True):
    b = builder_for(model, bpe)
    seqs = [b.build(token_row(f"s{i}", n_images=1 + i % 2), "all", t2i_rate=0.5) for i in range(n)]
    rows, stats = (pack if packed else pad)(seqs, seq_len, model.vocab.pad_id)
    return seqs, collate(rows), stats


@pytest.mark.parametrize("interface", ["bpe", "rvq"])
@pytest.mark.parametrize("mot", [False, True])
def test_forward_backward(interface, mot, bpe):
    model = make_model(interface, bpe, mot)
    _, batch, _ = batch_of(model, bpe)
    out = model(**batch)  # transformers' contract: forward(..., labels) -> CausalLMOutputWithPast with the loss
    assert isinstance(out, CausalLMOutputWithPast) and out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.num_text_targets > 0 and out.num_targets > out.num_text_targets
    assert int(out.num_targets) == int((batch["labels"] != -100).sum())
    unlabelled = model(**{k: v for k, v in batch.items() if k not in ("labels", "target_codes")})
    assert unlabelled.loss is None and torch.equal(unlabelled.logits, out.logits)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["lm.model.embed_tokens.weight"].abs().sum() > 0
    if interface == "rvq":
        assert grads["code_embed.proj.weight"].abs().sum() > 0
        assert all(grads[f"depth_heads.{c}.classifiers.{d}.weight"].abs().sum() > 0 for c in range(2) for d in range(DEPTH))
    if mot:
        assert grads["lm.model.layers.0.visual_mlp.up_proj.weight"].abs().sum() > 0
        assert grads["lm.model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
        assert grads["lm.model.layers.0.self_attn.visual_q_proj.weight"].abs().sum() > 0


def test_rvq_depth_loss_is_masked_not_indexed_and_unchanged(bpe):
    """The depth heads' loss runs on every position under a mask (no data-dependent shape, no host
    sync) and equals the loss over only the `<|cell|>` targets, picked out by indexing."""
    from tessera.model.rvq_heads import depth_loss

    torch.manual_seed(0)
    model = make_model("rvq", bpe, mot=False)
    _, batch, _ = batch_of(model, bpe)
    out = model(**batch)
    labels, codes = batch["labels"], batch["target_codes"]
    cells = (labels != -100) & (labels == model.vocab.cell)
    assert cells.sum() > 0
    h, tc = out.last_hidden_state[cells], codes[cells]
    indexed = sum(depth_loss(head(h, tc[:, c]), tc[:, c]) for c, head in enumerate(model.depth_heads)) / len(model.depth_heads) * len(h)
    ce = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.loss, (ce + indexed) / out.num_targets, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interface", ["bpe", "rvq"])
def test_packed_logits_equal_unpacked(interface, bpe):
    model = make_model(interface, bpe, mot=True).eval()
    seqs, batch, stats = batch_of(model, bpe, n=4, seq_len=256)
    assert stats["rows"] == 1 and stats["sequences"] == 4
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes")).logits
        start = 0
        for s in seqs:
            rows, _ = pad([s], len(s), model.vocab.pad_id)
            alone = collate(rows)
            logits = model(alone["input_ids"], alone["position_ids"], alone["doc_ids"], alone.get("codes")).logits
            torch.testing.assert_close(packed[0, start:start + len(s)], logits[0], atol=1e-5, rtol=1e-5)
            start += len(s)
    # no target crosses a document boundary
    docs, targets = batch["doc_ids"][0], batch["labels"][0]
    for t in range(len(docs) - 1):
        if docs[t] != docs[t + 1]:
            assert targets[t] == -100


@pytest.mark.parametrize("init", ["mean", "he"])
def test_vocabulary_extension_keeps_old_rows(init, bpe):
    from tessera.model.unified import build_base_lm

    cfg = model_config(f"model.init={init}")
    base = build_base_lm(cfg, TEXT, seed=0)
    old_in = base.get_input_embeddings().weight.detach().clone()
    old_out = base.get_output_embeddings().weight.detach().clone()
    model = TesseraModel.create(cfg, vocab_for("bpe", bpe), seed=0)
    new_in, new_out = model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight
    assert new_in.shape[0] == model.vocab.size > TEXT
    assert torch.equal(new_in[:TEXT], old_in) and torch.equal(new_out[:TEXT], old_out)
    rows = new_in[TEXT:].detach()
    if init == "mean":
        assert torch.allclose(rows.mean(0), old_in.mean(0), atol=0.01)
        assert 0.01 < float(rows.std()) < 0.03  # the configured noise, 0.02
    else:
        assert float(rows.std()) == pytest.approx((2 / rows.shape[1]) ** 0.5, rel=0.1)


@pytest.mark.parametrize("expert", ["visual", "text"])
def test_mot_routes_positions_to_their_expert(expert, bpe):
    model = make_model("bpe", bpe, mot=True).eval()
    _, batch, _ = batch_of(model, bpe, n=2)
    visual = model.visual_mask(batch["input_ids"])
    real = batch["doc_ids"] > 0
    with torch.no_grad():
        before = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"]).logits
        # the last layer's FFN comes after all attention: only its own positions can change
        layer = model.lm.model.layers[-1]
        (layer.visual_mlp if expert == "visual" else layer.mlp).down_proj.weight.add_(0.5)
        after = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"]).logits
    changed = (before - after).abs().amax(-1) > 1e-6
    routed = visual if expert == "visual" else ~visual
    assert changed[routed & real].all()
    assert not changed[~routed & real].any()


def test_mot_visual_expert_starts_as_copy_of_the_base_layer(bpe):
    from tessera.model.mot import MoTDecoderLayer, visual_expert_parameters

    base = make_model("bpe", bpe, mot=False)
    model = make_model("bpe", bpe, mot=True)
    base_state = base.state_dict()
    for name, p in model.state_dict().items():  # the text expert keeps the base layer's names and weights
        if name in base_state:
            assert torch.equal(p, base_state[name]), name
    visual = dict(visual_expert_parameters(model))
    assert visual and all(".visual_" in n for n in visual)
    for i, layer in enumerate(model.lm.model.layers):
        assert isinstance(layer, MoTDecoderLayer)
        for n, p in layer.visual_mlp.named_parameters():
            text = dict(layer.mlp.named_parameters())[n]
            assert torch.equal(p, text) and p.data_ptr() != text.data_ptr()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(layer.self_attn, f"visual_{proj}").weight, getattr(layer.self_attn, proj).weight)
    assert set(model.state_dict()) - set(base_state) == set(k for k in model.state_dict() if ".visual_" in k)


def test_cfg_dropout_rate_observed(bpe):
    model = make_model("bpe", bpe)
    b = builder_for(model, bpe)
    n, t2i, dropped = 2000, 0, 0
    for i in range(n):
        seq = b.build(token_row(f"c{i}", rng=np.random.default_rng(i)), "all", seed=3, t2i_rate=0.5, cfg_text_dropout=0.2)
        text_first = seq.ids[1] < TEXT
        has_text = (seq.ids[1:-1] < TEXT).any()
        t2i += text_first or not has_text
        dropped += not has_text
    assert abs(t2i / n - 0.5) < 0.04
    assert abs(dropped / t2i - 0.2) < 0.04


def test_loss_masks(bpe):
    model = make_model("bpe", bpe)
    b = builder_for(model, bpe)
    row = token_row("qa", kind="web", n_images=1, roles=None)
    # image, question, answer
    row["is_image"].append(False), row["text_ids"].append([5, 6]), row["pixel_codes"].append([])
    row["semantic_codes"].append([]), row["grid_shapes"].append([])
    row["meta"] = json.dumps({"roles": [None, "user", "assistant"]})
    seq = b.build(row, "answers")
    assert list(seq.ids[-3:]) == [5, 6, model.vocab.eos_id] and seq.loss[-3:].all()
    assert seq.loss.sum() == 3
    img = b.build(row, "image")
    assert all(model.vocab.is_visual(int(t)) or t in (model.vocab.image_end,) or t >= model.vocab.image_start
               for t in img.ids[img.loss])
    assert not b.build(row, "text").loss[(b.build(row, "text").ids >= TEXT)].any()


def test_out_of_vocabulary_names_the_sample(bpe):
    model = make_model("bpe", bpe)
    row = token_row("broken-sample")
    row["text_ids"][1] = [5, TEXT + 7]
    with pytest.raises(BadSample, match="broken-sample"):
        builder_for(model, bpe).build(row)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        model(torch.tensor([[1, model.vocab.size + 3]]))


def test_video_frames_carry_time_tokens(bpe):
    model = make_model("bpe", bpe)
    row = token_row("v", kind="video", n_images=2, timestamps=[0.0, None, 1.0, None])
    seq = builder_for(model, bpe).build(row)
    frames = np.flatnonzero(seq.ids == model.vocab.frame)
    assert len(frames) == 2
    assert [int(seq.ids[f + 1]) for f in frames] == [model.vocab.time_token(0.0), model.vocab.time_token(1.0)]


@pytest.mark.parametrize("interface", ["bpe", "rvq"])
def test_constrained_generation_always_decodes_to_a_full_grid(interface, bpe):
    model = make_model(interface, bpe, mot=True).eval()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        codes = generate_image(model, [1, 10, 11], (3, 5), bpe=bpe, cfg_scale=2.0, temperature=1.5, generator=g)
        if interface == "bpe":
            assert codes.shape == (3, 5) and codes.min() >= 0 and codes.max() < bpe.codebook_size
        else:
            assert codes.shape == (3, 5, 2, DEPTH)
            assert all(codes[..., c, :].max() < k for c, k in enumerate(SIZES))


def test_guidance_keeps_to_what_the_conditional_branch_finds_plausible():
    """A memorised caption: the conditional branch is sure of token 0; the unconditional one rules out
    token 3 more firmly than the conditional does. Plain `u + s * (c - u)` would pick token 3 (the
    tail lifted by guidance); guidance over the plausible set keeps token 0, and with two plausible
    tokens it still moves toward the one the caption favours."""
    from tessera.model.rvq_heads import guided

    cond = torch.tensor([[0.0, -6.0, -8.0, -15.0]])
    uncond = torch.tensor([[-1.0, -1.0, -1.0, -40.0]])
    plain = uncond + 3.0 * (cond - uncond)
    assert int(plain.argmax()) == 3
    out = guided(cond, uncond, 3.0)
    assert int(out.argmax()) == 0 and torch.isinf(out[0, 1:]).all()
    both = guided(torch.tensor([[0.0, -0.5, -9.0]]), torch.tensor([[-0.5, 0.0, -1.0]]), 2.0)
    assert torch.isfinite(both[0, :2]).all() and torch.isinf(both[0, 2])
    assert both[0, 0] - both[0, 1] > 1.0, "guidance widens the caption's preference (0.5 -> 1.5)"


@pytest.mark.parametrize("interface,next_cell", [("bpe", False), ("rvq", False), ("bpe", True), ("rvq", True)])
def test_kv_cache_generation_equals_full_recompute(interface, next_cell, bpe):
    model = make_model(interface, bpe, True, 0, f"model.next_cell={str(next_cell).lower()}").eval()
    b = builder_for(model, bpe)
    prompt = b.image_prefix(token_row("p"))
    with_cache = generate_text(model, prompt.ids, prompt.codes, max_new_tokens=12, use_cache=True)
    without = generate_text(model, prompt.ids, prompt.codes, max_new_tokens=12, use_cache=False)
    assert with_cache == without and len(with_cache) > 0
    a = generate_image(model, [1, 10], (2, 3), bpe=bpe, temperature=0, use_cache=True)
    c = generate_image(model, [1, 10], (2, 3), bpe=bpe, temperature=0, use_cache=False)
    assert np.array_equal(a, c)


@pytest.mark.parametrize("interface,next_cell", [("bpe", False), ("rvq", False), ("bpe", True)])
def test_text_log_prob_is_the_models_own_caption_loss(interface, next_cell, bpe):
    """`text_log_prob` (the best-of-n chooser's score) is minus the summed loss the model's forward
    gives a caption shown image-first: the same targets (caption ids and <eos>), read through the KV
    cache instead of one packed row."""
    model = make_model(interface, bpe, False, 0, f"model.next_cell={str(next_cell).lower()}").eval()
    b = builder_for(model, bpe)
    row = token_row("cap", text_len=7)
    seq = b.build(row, "text", t2i_rate=0.0)
    rows, _ = pad([seq], 128, model.vocab.pad_id)
    batch = collate(rows)
    with torch.no_grad():
        out = model(**batch)
    assert int(out.num_targets) == 8  # seven caption ids and <eos>
    prefix = b.image_prefix(row)
    logp = text_log_prob(model, prefix.ids, row["text_ids"][1], prefix.codes, prefix.cells)
    assert logp == pytest.approx(-float(out.loss) * 8, rel=1e-4)
    other = text_log_prob(model, prefix.ids, list(reversed(row["text_ids"][1])), prefix.codes, prefix.cells)
    assert other != pytest.approx(logp)


@pytest.mark.parametrize("interface,mot", [("bpe", False), ("bpe", True), ("rvq", False)])
def test_save_load_identical_logits(interface, mot, bpe, tmp_path):
    model = make_model(interface, bpe, mot).eval()
    _, batch, _ = batch_of(model, bpe)
    info = json.load(open(save_model(model, str(tmp_path / "m"), {"bpe": {"hash": bpe.hash}})))
    assert info["vocabulary"]["visual_size"] == model.vocab.visual_size and info["bpe"]["hash"] == bpe.hash
    loaded = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        a = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes")).logits
        b = loaded(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch.get("codes")).logits
    assert torch.equal(a, b)


def test_bpe_model_loads_with_plain_transformers(bpe, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("bpe", bpe, False, 0, "model.visual_positions=1d").eval()  # 2-D embeddings are Tessera's own
    save_model(model, str(tmp_path / "m"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.tensor([[1, 20, model.vocab.image_start, model.vocab.height_token(4), model.vocab.visual_base + 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_extent_positions_place_a_tile_by_the_cells_it_covers(bpe, tmp_path):
    """`visual_positions: extent`: a tile's place is the mean row embedding over its rows plus the mean
    column embedding over its columns; a 1x1 tile gets exactly its `2d` embedding; the tile shapes are
    saved with the weights (a loaded model computes the same logits without the BPE)."""
    from tessera.model.grid_encoder import GridEncoder
    from tessera.model.stream import model_inputs

    tiles = GridEncoder.tiles_from_bpe(bpe, bpe.vocab_size)
    cfg = model_config("model.interface=bpe", "model.visual_positions=extent")
    with pytest.raises(ValueError, match="tile_codes"):
        TesseraModel.create(cfg, vocab_for("bpe", bpe), seed=0)
    model = TesseraModel.create(cfg, vocab_for("bpe", bpe), seed=0, tile_codes=tiles).eval()
    with torch.no_grad():
        for emb in (model.grid_rows, model.grid_cols):
            emb.weight.normal_()  # std 0.02 at init: make differences between means visible
    v = model.vocab
    big = max(range(bpe.vocab_size), key=lambda t: bpe.shape(t)[0] * bpe.shape(t)[1])
    h, w = bpe.shape(big)
    assert h * w > 1 and tuple(model.tile_shapes[big].tolist()) == (h, w)
    ids = torch.tensor([[1, v.visual_base + big, v.visual_base + 3, 20]])
    cells = torch.tensor([[[-1, -1], [2, 1], [5, 6], [-1, -1]]])
    with torch.no_grad():
        plain = model.lm.get_input_embeddings()(ids)
        placed = model.embed(ids, None, cells) - plain
    rows, cols = model.grid_rows.weight, model.grid_cols.weight
    torch.testing.assert_close(placed[0, 1], rows[2:2 + h].mean(0) + cols[1:1 + w].mean(0))
    assert bpe.shape(3) == (1, 1)
    torch.testing.assert_close(placed[0, 2], rows[5] + cols[6])
    assert placed[0, 0].abs().max() == 0 and placed[0, 3].abs().max() == 0  # text is not placed

    _, batch, _ = batch_of(model, bpe)
    assert (batch["cells"] >= 0).any()
    save_model(model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**model_inputs(batch)).logits, model(**model_inputs(batch)).logits)
    assert torch.equal(loaded.tile_shapes, model.tile_shapes)


def test_extent_positions_need_the_bpe_interface():
    from tessera.config import ConfigError

    with pytest.raises(ConfigError, match="visual_positions"):
        load_config(None, ["model.interface=rvq", "model.visual_positions=extent"])


@pytest.mark.parametrize("interface", ["bpe", "rvq"])
def test_next_cell_generation_sees_what_training_saw(interface, bpe):
    """`model.next_cell`: position t gets the anchor of token t+1. Training reads it off the row's
    cells; generation, fed one token at a time, passes the next free cell of its tiling. For a
    caption-first pair the two agree cell for cell, and decoding token by token gives the full
    forward's logits at every image position (so the model generates with what it learnt from)."""
    from tessera.model.generate import Decoder
    from tessera.model.unified import next_anchor_cells

    model = make_model(interface, bpe, False, 0, "model.next_cell=true").eval()
    with torch.no_grad():
        for emb in (model.next_rows, model.next_cols):
            emb.weight.normal_()  # std 0.02 at init: make the embedding matter
    seq = builder_for(model, bpe).build(token_row("gen"), "all", t2i_rate=1.0)
    cells = torch.from_numpy(seq.cells).unsqueeze(0)
    nxt = next_anchor_cells(cells)[0].numpy()
    assert np.array_equal(nxt[:-1], seq.cells[1:]) and (nxt[-1] == -1).all()

    v = model.vocab
    first = int(np.flatnonzero(seq.ids == v.image_start)[0]) + 3  # <|image_start|> <h> <w>, then the first visual token
    last = int(np.flatnonzero(seq.ids == v.image_end)[0])
    H, W = GRID
    if interface == "bpe":  # the anchors a tiling gives while it decodes the row's own tiles
        tiling, anchors = bpe.start_decoding(GRID), []
        for t in seq.ids[first:last]:
            anchors.append(tiling.next_cell())
            tiling.push(int(t) - v.visual_base)
        assert tiling.done
    else:
        anchors = [divmod(i, W) for i in range(H * W)]
    assert np.array_equal(np.asarray(anchors), seq.cells[first:last])

    codes = None if seq.codes is None else torch.from_numpy(seq.codes).unsqueeze(0)
    with torch.no_grad():
        full = model(torch.from_numpy(seq.ids).unsqueeze(0), torch.arange(len(seq.ids)).unsqueeze(0),
                     codes=codes, cells=cells).logits[0]
        dec = Decoder(model)
        header_next = np.full((first, 2), -1)
        header_next[-1] = anchors[0]
        _, logits = dec.feed(seq.ids[:first], None if seq.codes is None else seq.codes[:first], seq.cells[:first], header_next)
        torch.testing.assert_close(logits, full[first - 1])
        for k, t in enumerate(range(first, last)):
            following = np.asarray([anchors[k + 1] if k + 1 < len(anchors) else (-1, -1)])
            _, logits = dec.feed(seq.ids[t:t + 1], None if seq.codes is None else seq.codes[t:t + 1],
                                 seq.cells[t:t + 1], following)
            torch.testing.assert_close(logits, full[t])
        plain = model(torch.from_numpy(seq.ids).unsqueeze(0), torch.arange(len(seq.ids)).unsqueeze(0), codes=codes,
                      cells=cells, next_cells=torch.full_like(cells, -1)).logits[0]
    assert not torch.allclose(plain[first - 1:last], full[first - 1:last]), "the next cell changes what is predicted"
