"""The bpe interface's grid encoder: it rebuilds the code grid from tiles, reads images the model is
given, never the ones it writes, starts as a no-op, and saves/loads with the model."""

import numpy as np
import pytest
import torch

from tessera.model.assets import load_model, save_model
from tessera.model.grid_encoder import GridEncoder
from tessera.model.packing import collate, pack
from tessera.model.sequence import SequenceBuilder
from tessera.model.unified import TesseraModel
from tests.model.test_model import GRID, bpe, model_config, token_row, vocab_for  # noqa: F401 (fixture)


def grid_model(bpe, layers=3, seed=0):  # 3 layers of 3x3: every cell of the 4x4 test grids sees every other
    cfg = model_config("model.interface=bpe", f"model.grid_encoder.layers={layers}", "model.grid_encoder.dim=8")
    vocab = vocab_for("bpe", bpe)
    tiles = GridEncoder.tiles_from_bpe(bpe, vocab.visual_size) if layers else None
    model = TesseraModel.create(cfg, vocab, seed=seed, tile_codes=tiles)
    if layers:  # past the zero start, as after training
        torch.nn.init.normal_(model.grid_encoder.out.weight, std=0.5)
    return model


def batch(model, bpe, rows, loss_mask="all", t2i_rate=0.0):
    b = SequenceBuilder(model.vocab, bpe, ("pixel",), 1, ())
    packed, _ = pack([b.build(r, loss_mask, t2i_rate=t2i_rate) for r in rows], 256, model.vocab.pad_id)
    return collate(packed)


def test_tiles_rebuild_the_code_grid(bpe):
    """The grid the encoder convolves is the image's code grid, whatever tiles the BPE merged."""
    enc = GridEncoder(GridEncoder.tiles_from_bpe(bpe, bpe.vocab_size), hidden=4, dim=4, layers=1)
    assert enc.codebook_size == bpe.codebook_size
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = np.repeat(np.repeat(rng.integers(0, 16, (2, 2)), 2, 0), 2, 1).astype(np.int32)
        tiles = bpe.encode(g)
        assert len(tiles) < g.size  # merged tiles, not one per cell
        anchors = torch.as_tensor(bpe.anchors(tiles, g.shape), dtype=torch.int64)
        codes = enc.tile_codes[torch.as_tensor(tiles, dtype=torch.int64)]
        rebuilt = torch.full((8, 8), -1, dtype=torch.int64)
        for (r, c), block in zip(anchors.tolist(), codes):
            for i, j in zip(*torch.nonzero(block >= 0, as_tuple=True)):
                rebuilt[r + i, c + j] = block[i, j]
        assert torch.equal(rebuilt[:4, :4], torch.as_tensor(g, dtype=torch.int64))


def test_starts_as_a_no_op(bpe):
    """`out` starts at zero: the same logits as the model without the encoder, from the same seed."""
    cfg = model_config("model.interface=bpe", "model.grid_encoder.layers=2", "model.grid_encoder.dim=8")
    vocab = vocab_for("bpe", bpe)
    with_enc = TesseraModel.create(cfg, vocab, seed=3, tile_codes=GridEncoder.tiles_from_bpe(bpe, vocab.visual_size))
    without = grid_model(bpe, layers=0, seed=3)
    b = batch(without, bpe, [token_row(f"s{i}", n_images=2) for i in range(3)])
    with torch.no_grad():
        assert torch.equal(with_enc(**b).logits, without(**b).logits)


def _image_tokens(model, ids):
    return ((ids >= model.vocab.visual_base) & (ids < model.vocab.visual_base + model.vocab.visual_size)).nonzero(as_tuple=True)


def test_a_read_image_is_seen_whole(bpe):
    """Changing the image's last codes changes what its first tile's position computes: each tile
    sees its neighbours' codes (and the grid encoder is what gives it that: a causal LM would not)."""
    model = grid_model(bpe).eval()
    row = token_row("a", n_images=1)
    b = batch(model, bpe, [row], loss_mask="text")  # image-first caption, loss on the text: the image is read
    other = dict(row, pixel_codes=[list(row["pixel_codes"][0]), []])
    other["pixel_codes"][0][-2:] = [(c + 5) % 8 for c in other["pixel_codes"][0][-2:]]  # the bottom-right cell (depth 1)
    b2 = batch(model, bpe, [other], loss_mask="text")
    first = _image_tokens(model, b["input_ids"])[1][0]
    with torch.no_grad():
        h1, h2 = model(**b).logits[0, first], model(**b2).logits[0, first]
    assert not torch.allclose(h1, h2)
    read, _ = model.read_images(b["input_ids"], b["labels"])
    assert read[_image_tokens(model, b["input_ids"])].all()


def test_a_written_image_gets_no_grid_feature(bpe):
    """An image that is a target (caption-first, loss on all) is embedded token by token: the logits at
    its first tile do not depend on its later codes, so the model cannot read what it must predict."""
    model = grid_model(bpe).eval()
    row = token_row("w", n_images=1)
    other = dict(row, pixel_codes=[list(row["pixel_codes"][0]), []])
    other["pixel_codes"][0][-2:] = [(c + 5) % 8 for c in other["pixel_codes"][0][-2:]]
    b, b2 = batch(model, bpe, [row], t2i_rate=1.0), batch(model, bpe, [other], t2i_rate=1.0)
    read, _ = model.read_images(b["input_ids"], b["labels"])
    assert not read.any()
    first = _image_tokens(model, b["input_ids"])[1][0]
    with torch.no_grad():
        assert torch.equal(model(**b).logits[0, first], model(**b2).logits[0, first])


def test_an_image_cut_by_the_call_is_not_read(bpe):
    """During generation the image arrives one token at a time: no call holds it whole, none reads it."""
    model = grid_model(bpe)
    b = batch(model, bpe, [token_row("c", n_images=1)], loss_mask="text")
    end = int((b["input_ids"][0] == model.vocab.image_end).nonzero()[0])
    read, _ = model.read_images(b["input_ids"][:, :end])
    assert not read.any()


def test_save_load_identical_logits(bpe, tmp_path):
    model = grid_model(bpe).eval()
    b = batch(model, bpe, [token_row(f"s{i}", n_images=2) for i in range(2)], loss_mask="text")
    save_model(model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded(**b).logits)
    assert torch.equal(loaded.grid_encoder.tile_codes, model.grid_encoder.tile_codes)


def test_needs_the_bpe_interface():
    from tessera.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="grid_encoder"):
        load_config(None, ["model.interface=rvq", "model.grid_encoder.layers=2"]).check_sections_agree()


def test_a_model_without_the_tiles_table_is_refused(bpe):
    cfg = model_config("model.interface=bpe", "model.grid_encoder.layers=2")
    with pytest.raises(ValueError, match="tile_codes"):
        TesseraModel.create(cfg, vocab_for("bpe", bpe), seed=0)


def test_kernel_one_is_a_bag_of_each_tiles_own_codes(bpe):
    """`kernel: 1` (one layer): a tile's feature is a function of its own base codes alone, the same
    wherever it sits and whatever its neighbours are -- an embedding composed from the tile's codes, shared
    by every tile that holds them; 3x3 kernels read the neighbours too."""
    tiles = GridEncoder.tiles_from_bpe(bpe, bpe.vocab_size)
    for kernel, local in ((1, True), (3, False)):
        torch.manual_seed(0)
        enc = GridEncoder(tiles, hidden=4, dim=4, layers=1, kernel=kernel)
        torch.nn.init.normal_(enc.out.weight)
        single = next(t for t in range(bpe.vocab_size) if bpe.shape(t) == (1, 1))
        big = max(range(bpe.vocab_size), key=lambda t: bpe.shape(t)[0] * bpe.shape(t)[1])
        h, w = bpe.shape(big)
        # the big tile at (0, 0) beside a 1x1 tile (a base code other than the big tile's first), in a second image beside another
        others = [t for t in range(bpe.codebook_size) if t != int(tiles[big][0, 0])][:2]
        toks = torch.tensor([big, others[0], big, others[1]])
        image_of = torch.tensor([0, 0, 1, 1])
        cells = torch.tensor([[0, 0], [0, w], [0, 0], [0, w]])
        with torch.no_grad():
            f = enc(toks, image_of, cells)
            moved = enc(torch.tensor([big, single]), torch.tensor([0, 0]), torch.tensor([[3, 2], [0, 0]]))
        assert torch.allclose(f[0], f[2]) == local, kernel
        if local:
            torch.testing.assert_close(moved[0], f[0])  # the same tile elsewhere: the same feature
