"""The continuous visual interface (Kelix's question, the discrete-vs-continuous ablation): the raw
code tokens, one per grid cell and the targets as for raw codes, whose input embeddings are a
projector over the tokenizer encoder's feature of the cell instead of the codes' rows."""

import json

import numpy as np
import pytest
import torch

from tessera.config import ConfigError, load_config
from tessera.model.assets import load_model, save_model
from tessera.model.generate import generate_image, generate_text
from tessera.model.packing import collate, pack, pad
from tessera.model.sequence import BadSample, SequenceBuilder, feature_bits
from tessera.model.unified import TesseraModel, features_from_bits
from tessera.model.vocab import Vocabulary

TEXT, GRID, DIM, CODES = 300, (4, 4), 6, 16


def make_model(seed=0):
    cfg = load_config(None, ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                             "model.intermediate_size=64", "model.interface=continuous", "tokenize.features=true"]).model
    vocab = Vocabulary(text_size=TEXT, bos_id=1, eos_id=2, pad_id=0, interface="continuous", visual_size=CODES, max_grid=8,
                       time_tokens=8)
    return TesseraModel.create(cfg, vocab, [], DIM, seed=seed)


def token_row(sid, features=None, rng=None):
    """An image-caption token row carrying the image's (4, 4) codes and (4, 4, DIM) features."""
    rng = rng or np.random.default_rng(abs(hash(sid)) % 2**32)
    feats = rng.normal(size=GRID[0] * GRID[1] * DIM).astype(np.float32) if features is None else features
    return {"sample_id": sid, "source": "s", "kind": "image_text", "is_image": [True, False],
            "text_ids": [[], rng.integers(3, TEXT, 5).tolist()], "pixel_codes": [rng.integers(0, CODES, GRID[0] * GRID[1]).tolist(), []],
            "semantic_codes": [[], []], "grid_shapes": [[*GRID, 1], []], "pixel_features": [feats.tolist(), []],
            "timestamps": None, "curriculum": [], "meta": "{}"}


def builder(model):
    return SequenceBuilder(model.vocab, None, ("pixel",), DIM)


def test_features_travel_as_bits_losslessly():
    x = np.array([[0.0, -0.0, 1.5, -2.25e-30, 3.4e38, -1e-45]], np.float32)
    bits = feature_bits(x)
    assert bits.dtype == np.int64 and bits.min() >= 0  # survives every "-1 = no code -> 0" clamp
    back = features_from_bits(torch.from_numpy(bits)).numpy()
    assert back.tobytes() == x.tobytes()  # bit-exact, signs and subnormals included


def test_the_codes_are_the_targets_and_the_features_the_inputs():
    """The same token stream and targets as raw codes; only the input embedding of a code token
    differs: its cell's feature through the projector, never the code's own row."""
    torch.manual_seed(0)
    model = make_model()
    b = builder(model)
    row = token_row("x")
    seq = b.build(row, "all")
    first = int(np.flatnonzero(seq.ids == model.vocab.image_start)[0]) + 3  # after <|image_start|> <h> <w>
    n = GRID[0] * GRID[1]
    assert np.array_equal(seq.ids[first:first + n], np.asarray(row["pixel_codes"][0]) + model.vocab.visual_base)
    assert seq.loss[first:first + n].all(), "the codes are targets (loss mask all), as for raw codes"
    out = model(**collate(pack([b.build(token_row(f"s{i}"), "all", t2i_rate=0.5) for i in range(4)], 128, 0)[0]))
    assert torch.isfinite(out.loss) and int(out.num_targets) > int(out.num_text_targets), "image targets in the loss"
    out.loss.backward()
    assert model.feature_proj.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        base = model(**collate(pad([seq], 64, 0)[0]))
        other_codes = dict(row, pixel_codes=[((np.asarray(row["pixel_codes"][0]) + 1) % CODES).tolist(), []])
        other_feats = dict(row, pixel_features=[(np.asarray(row["pixel_features"][0]) * -1).tolist(), []])
        oc = model(**collate(pad([b.build(other_codes, "all")], 64, 0)[0]))
        of = model(**collate(pad([b.build(other_feats, "all")], 64, 0)[0]))
    assert torch.equal(base.logits, oc.logits), "a code token's input is its feature, not the code's row"
    assert not torch.equal(base.loss, oc.loss), "but the codes are what the model is scored on"
    end = first + n + 1
    assert torch.equal(base.logits[0, :first], of.logits[0, :first]) and not torch.allclose(base.logits[0, end:], of.logits[0, end:])


def test_a_cell_has_the_scale_of_a_token_embedding_whatever_the_projector_learns():
    """The row/column embeddings added to a cell are never drowned by it: an unbounded projector grew
    to 160x the embeddings' scale in the embeddings-only stage and the trained model ignored the
    image. Here the weights are blown up 100x and the cells' scale does not move."""
    model = make_model()
    feats = torch.randn(256, DIM, generator=torch.Generator().manual_seed(0)) * 3.0
    rms = lambda t: float(t.detach().pow(2).mean().sqrt())  # noqa: E731
    text_rows = model.lm.get_input_embeddings().weight[:TEXT]
    with torch.no_grad():
        cells = model.feature_proj(feats)
        assert rms(cells) == pytest.approx(rms(text_rows), rel=1e-3)
        assert 0.3 < rms(cells) / rms(model.grid_rows.weight) < 3.0
        for p in model.feature_proj.parameters():
            p.mul_(100.0)
        blown = model.feature_proj(feats)
    assert rms(blown) == pytest.approx(rms(text_rows), rel=1e-3)
    # and the cells still differ from each other (the normalisation keeps each feature's direction)
    assert float((blown - blown.mean(0)).norm(dim=-1).mean()) > 0.1 * float(blown.norm(dim=-1).mean())


def test_packed_equals_unpacked_and_cache_equals_recompute():
    model = make_model().eval()
    b = builder(model)
    seqs = [b.build(token_row(f"s{i}"), "all") for i in range(3)]
    rows, stats = pack(seqs, 256, model.vocab.pad_id)
    assert stats["rows"] == 1
    batch = collate(rows)
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["codes"], cells=batch["cells"]).logits
        start = 0
        for s in seqs:
            alone = collate(pad([s], len(s), 0)[0])
            logits = model(alone["input_ids"], alone["position_ids"], alone["doc_ids"], alone["codes"], cells=alone["cells"]).logits
            torch.testing.assert_close(packed[0, start:start + len(s)], logits[0], atol=1e-5, rtol=1e-5)
            start += len(s)
    prompt = b.image_prefix(token_row("p"))
    cached = generate_text(model, prompt.ids, prompt.codes, max_new_tokens=10, prompt_cells=prompt.cells)
    full = generate_text(model, prompt.ids, prompt.codes, max_new_tokens=10, use_cache=False, prompt_cells=prompt.cells)
    assert cached == full and len(cached) > 0
    with pytest.raises(ValueError, match="a generated code does not have"):
        generate_image(model, [1, 10], (2, 2))


def test_save_load_identical_logits(tmp_path):
    model = make_model().eval()
    batch = collate(pad([builder(model).build(token_row("a"), "all")], 64, 0)[0])
    save_model(model, str(tmp_path / "m"))
    assert json.load(open(tmp_path / "m" / "tessera.json"))["depth"] == DIM
    loaded = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_rows_without_features_name_the_sample_and_config_needs_them():
    model = make_model()
    row = token_row("nofeat")
    row["pixel_features"] = [[], []]
    with pytest.raises(BadSample, match="nofeat.*tokenize.features"):
        builder(model).build(row, "all")
    with pytest.raises(ConfigError, match="tokenize.features"):
        load_config(None, ["model.interface=continuous"])
    with pytest.raises(ConfigError, match="vq tokenizer"):
        load_config(None, ["tokenize.features=true", "tokenizer.preset=dual"])


def test_image_encoder_stores_the_features_its_codes_quantise(tmp_path):
    """The tokenize step's features are the encoder output whose nearest codebook entries are the codes."""
    import pyarrow as pa

    from tessera.tokenize.tokenizer import build_tokenizer, save_tokenizer
    from tessera.tokenize.tokens import ImageEncoder

    cfg = load_config(None, ["tokenizer.vq.channels=16", "tokenizer.vq.rvq.dim=8", "tokenizer.vq.rvq.codebook_size=32",
                             "tokenizer.image_size=32"]).tokenizer
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(cfg).eval(), cfg, str(tmp_path / "tok"))
    enc = ImageEncoder(str(tmp_path / "tok"), 32, chunk=4, features=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = enc.encode(images)
    h, w = out["pixel"].shape[1:3]
    assert out["features"].shape == (3, h, w, 8) and out["features"].dtype == np.float32
    q = enc.model.quantizer
    nearest = q.nearest(torch.from_numpy(out["features"]).reshape(-1, 8), q.codebooks[0]).reshape(3, h, w)
    assert np.array_equal(nearest.numpy(), out["pixel"][..., 0])
    rows = pa.Table.from_pylist([{"sample_id": "a", "source": "s", "kind": "image_text", "texts": [None, "hi"],
                                  "timestamps": None, "curriculum": [], "meta": "{}", "reject_reason": None,
                                  "reject_detail": None, "arrays": [images[0].tobytes(), None]}])
    encoded = enc.encode_batch(rows).to_pylist()[0]
    assert len(encoded["pixel_features"][0]) == h * w * 8 and encoded["pixel_features"][1] == []
