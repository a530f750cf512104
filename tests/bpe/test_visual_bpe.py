"""The visual BPE against DESIGN.md's contract: hand-worked cases, the literal reference
implementation (`tessera.bpe.reference`) as oracle, and properties."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.bpe import VisualBPE
from tessera.bpe import reference as ref
from tessera.bpe.shards import Corpus, GridSource, LocalShards

D = {"h": 0, "v": 1}


def as_ref(merges):
    return [(a, b, D[d]) for a, b, d in merges]


class CompactingShards(LocalShards):
    """In-process shards with 4-byte tile ids (a fit's own shards take 2-byte ids while the vocabulary
    fits) that drop stale index entries whenever they outnumber half the live pairs (the default waits
    for 65,536 more), so small corpora exercise both storages and `compact`."""

    def __init__(self, corpora, tiles, shape_h, shape_w, max_id):
        super().__init__(corpora, tiles, shape_h, shape_w, max_id=2**20)
        for s in self.shards:
            assert type(s).__name__ == "Shard"
            s.compact_min = 0


def fit_both(grids, K, M, **kw):
    fast = VisualBPE.fit(grids, K, M, **kw)
    args = {k: kw[k] for k in ("alpha", "top_k", "min_frequency", "max_tile") if k in kw}
    slow, shapes, tilings = ref.fit(grids, K, M, **args)
    assert as_ref(fast.merges) == slow
    assert VisualBPE.fit(grids, K, M, shards=CompactingShards, **kw).merges == fast.merges, "compacting the index changes nothing"
    return fast, tilings


# ----------------------------------------------------------------------------- hand-worked


def test_horizontal_then_vertical_merge():
    g = np.array([[0, 1], [0, 1]])
    bpe, _ = fit_both([g, g], 2, 5)
    # F(0,1,h)=4, F(0,0,v)=F(1,1,v)=2 -> (0,1,h) makes id 2 (1x2); then (2,2,v) F=2 makes id 3 (2x2)
    assert bpe.merges == [(0, 1, "h"), (2, 2, "v")]
    assert bpe.shape(2) == (1, 2) and bpe.shape(3) == (2, 2)
    assert bpe.encode(g).tolist() == [3]
    assert bpe.tile_codes(3).tolist() == [[0, 1], [0, 1]]


def test_runs_of_equal_codes_count_overlaps_and_merge_greedily_from_the_left():
    g = np.array([[5, 5, 5]])
    counts = ref.count_pairs([ref.initial_tiling(g)], {5: (1, 1)})
    assert counts[(5, 5, 0)] == 2, "overlapping occurrences are counted"
    bpe, tilings = fit_both([g], 6, 1)
    assert bpe.merges == [(5, 5, "h")]
    assert bpe.encode(g).tolist() == [6, 5]  # (0,1) merge, the third stays
    vertical = np.array([[1], [1], [1], [1], [1]])
    bpe_v = VisualBPE(2, [(1, 1, "v")])
    assert bpe_v.encode(vertical).tolist() == [2, 2, 1]


def test_tiles_of_different_heights_do_not_merge():
    bpe = VisualBPE(2, [(0, 0, "v"), (2, 1, "h")])
    g = np.array([[0, 1], [0, 1]])
    # the 2x1 tile at (0,0) and the 1x1 tile at (0,1) are not adjacent: heights differ
    assert bpe.encode(g).tolist() == [2, 1, 1]
    tiling = np.array([[2, 1], [-1, 1]])
    counts = ref.count_pairs([tiling], {0: (1, 1), 1: (1, 1), 2: (2, 1)})
    assert (2, 1, 0) not in counts and counts[(1, 1, 1)] == 1
    fit, _ = fit_both([np.array([[0, 1], [0, 1]]), np.array([[0, 1], [0, 1]])], 2, 3, min_frequency=1)
    for a, b, d in fit.merges:
        assert not (fit.shape(a)[0] != fit.shape(b)[0] and d == "h")


def test_max_tile_bounds_every_merged_shape():
    grids = [np.zeros((8, 8), dtype=int) for _ in range(3)]
    bpe, _ = fit_both(grids, 1, 50, max_tile=(2, 3))
    assert bpe.merges, "something merged"
    assert all(bpe.shape(t)[0] <= 2 and bpe.shape(t)[1] <= 3 for t in range(bpe.vocab_size))
    assert max(bpe.shape(t)[0] * bpe.shape(t)[1] for t in range(bpe.vocab_size)) >= 4


def test_min_frequency_stops_the_fit():
    g = np.array([[0, 1, 2, 3]])
    assert VisualBPE.fit([g], 4, 10, min_frequency=2).merges == []
    assert len(VisualBPE.fit([g], 4, 10, min_frequency=1).merges) >= 1
    bpe, _ = fit_both([g, g], 4, 10, min_frequency=2)
    assert len(bpe.merges) < 10 and bpe.report["stopped_early"]


def test_alpha_changes_the_choice():
    checker = np.array([[0, 1], [1, 0]])  # 0 and 1 meet in every relative position
    pair = np.array([[2, 2]])  # 2 and 2 only ever meet horizontally
    grids = [checker] * 4 + [pair] * 3
    by_frequency, _ = fit_both(grids, 3, 1, alpha=0.0)
    by_consistency, _ = fit_both(grids, 3, 1, alpha=1.0)
    # alpha=0: F(0,1,h)=4 is the max. alpha=1: P(0,1,h) = 4/4 + 4/16 = 1.25 < P(2,2,h) = 3/4 + 3/3 = 1.75
    assert by_frequency.merges == [(0, 1, "h")]
    assert by_consistency.merges == [(2, 2, "h")]


def test_top_k_limits_the_candidates():
    checker = np.array([[0, 1], [1, 0]])
    pair = np.array([[2, 2]])
    grids = [checker] * 4 + [pair] * 3
    # (2,2,h) has F=3, below the four F=4 pairs: with top_k=4 it is not a candidate at all
    assert VisualBPE.fit(grids, 3, 1, alpha=1.0, top_k=4).merges == [(0, 1, "h")]
    assert VisualBPE.fit(grids, 3, 1, alpha=1.0, top_k=5).merges == [(2, 2, "h")]


def test_ties_break_by_ids_then_h_before_v():
    bpe, _ = fit_both([np.array([[0, 0]]), np.array([[0], [0]])], 1, 1, min_frequency=1)
    assert bpe.merges == [(0, 0, "h")]
    bpe, _ = fit_both([np.array([[1, 0]]), np.array([[0, 1]])], 2, 1, min_frequency=1)
    assert bpe.merges == [(0, 1, "h")]


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        VisualBPE.fit([np.array([[0, 4]])], 4, 3)
    with pytest.raises(ValueError, match="2-D"):
        VisualBPE.fit([np.array([0, 1])], 4, 3)
    with pytest.raises(ValueError, match="existing ids"):
        VisualBPE(2, [(0, 5, "h")])
    bpe = VisualBPE(2, [(0, 1, "h")])
    with pytest.raises(ValueError):
        bpe.decode([2], (2, 2))  # does not cover the grid
    with pytest.raises(ValueError):
        bpe.decode([0, 2], (1, 2))  # the 1x2 tile does not fit at (0, 1)


# ----------------------------------------------------------------------------- properties against the reference


@st.composite
def corpora(draw):
    K = draw(st.integers(1, 5))
    n = draw(st.integers(1, 6))
    grids = []
    for _ in range(n):
        h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        cells = draw(st.lists(st.integers(0, K - 1), min_size=h * w, max_size=h * w))
        grids.append(np.array(cells, dtype=np.int64).reshape(h, w))
    params = {
        "alpha": draw(st.sampled_from([0.0, 0.3, 1.0, 4.0])),
        "top_k": draw(st.sampled_from([1, 3, 32])),
        "min_frequency": draw(st.sampled_from([1, 2, 3])),
        "max_tile": draw(st.sampled_from([(1, 2), (2, 2), (4, 4), (3, 5)])),
    }
    return K, grids, params


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora(), st.integers(0, 40))
def test_fit_equals_the_reference_and_encode_reproduces_the_fit_tiling(data, M):
    K, grids, params = data
    bpe, tilings = fit_both(grids, K, M, **params)
    for g, t in zip(grids, tilings):
        tokens = bpe.encode(g)
        assert tokens.tolist() == t[t >= 0].tolist(), "encode of a training grid == the fit's tiling"
        assert np.array_equal(bpe.decode(tokens, g.shape), g)


@settings(max_examples=100, deadline=None)
@given(corpora(), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_decode_encode_round_trip_on_new_grids(data, M, seed):
    K, grids, params = data
    bpe = VisualBPE.fit(grids, K, M, **params)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        g = rng.integers(0, K, size=(rng.integers(1, 9), rng.integers(1, 9)))
        tokens = bpe.encode(g)
        assert tokens.tolist() == ref.encode(g, as_ref(bpe.merges), K).tolist()
        assert np.array_equal(bpe.decode(tokens, g.shape), g)
        assert np.array_equal(grid_from_anchors(bpe, tokens, g.shape), g), "anchors place the tiles where decode does"
    same = np.stack([rng.integers(0, K, size=(4, 5)) for _ in range(6)])
    assert [t.tolist() for t in bpe.encode_batch(same)] == [bpe.encode(g).tolist() for g in same]


def grid_from_anchors(bpe, tokens, shape) -> np.ndarray:
    """Each tile's codes written at its anchor from `VisualBPE.anchors` (checked against the compiled decode)."""
    grid = np.full(shape, -1)
    for (r, c), t in zip(bpe.anchors(tokens, shape), tokens):
        codes = bpe.tile_codes(int(t))
        assert (grid[r:r + codes.shape[0], c:c + codes.shape[1]] == -1).all()
        grid[r:r + codes.shape[0], c:c + codes.shape[1]] = codes
    return grid


def test_anchors_refuse_tokens_that_do_not_tile_the_grid():
    bpe = VisualBPE(3, [(0, 1, "h"), (3, 3, "v")])  # id 3: 1x2, id 4: 2x2
    tokens = [4, 3, 3, 2, 2, 2, 2]
    assert bpe.anchors(tokens, (3, 4)).tolist() == [[0, 0], [0, 2], [1, 2], [2, 0], [2, 1], [2, 2], [2, 3]]
    assert np.array_equal(grid_from_anchors(bpe, tokens, (3, 4)), bpe.decode(tokens, (3, 4)))
    with pytest.raises(ValueError, match="does not fit"):
        bpe.anchors([2, 2, 4], (2, 3))
    with pytest.raises(ValueError, match="overlaps"):
        bpe.anchors([0, 4, 2, 3], (2, 4))  # the 1x2 at (1, 0) meets the 2x2 anchored at (0, 1)
    with pytest.raises(ValueError, match="more tiles"):
        bpe.anchors([0, 0, 0], (1, 2))


def test_constrained_decoding_always_fills_the_grid():
    rng = np.random.default_rng(0)
    grids = [np.repeat(np.repeat(rng.integers(0, 4, size=(4, 4)), 2, 0), 2, 1) for _ in range(20)]
    bpe = VisualBPE.fit(grids, 4, 60, max_tile=(4, 4))
    assert max(bpe.shape(t) for t in range(bpe.vocab_size)) > (1, 1)
    for trial in range(50):
        H, W = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        state = bpe.start_decoding((H, W))
        tokens = []
        while not state.done:
            mask = state.valid_mask()
            assert mask[: bpe.codebook_size].all(), "a 1x1 code always fits"
            choices = np.flatnonzero(mask)
            # every allowed tile really fits, every refused one really does not
            r, c = state.next_cell()
            for t in range(bpe.vocab_size):
                h, w = bpe.shape(t)
                fits = r + h <= H and c + w <= W and not state.occupied[r:r + h, c:c + w].any()
                assert mask[t] == fits
            tok = int(rng.choice(choices))
            tokens.append(tok)
            state.push(tok)
        assert bpe.decode(tokens, (H, W)).shape == (H, W)
        assert bpe.valid_next(tokens[:-1], (H, W))[tokens[-1]]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    grids = [rng.integers(0, 6, size=(5, 5)) for _ in range(30)]
    bpe = VisualBPE.fit(grids, 6, 25, alpha=0.5)
    path = bpe.save(str(tmp_path / "bpe"))
    data = json.loads(open(path).read())
    assert data["codebook_size"] == 6 and len(data["merges"]) == len(bpe.merges) and data["hash"] == bpe.hash
    loaded = VisualBPE.load(str(tmp_path / "bpe"))
    assert loaded.merges == bpe.merges and loaded.hash == bpe.hash
    for g in grids:
        assert np.array_equal(loaded.encode(g), bpe.encode(g))
    data["format"] = "something-else"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a visual BPE file"):
        VisualBPE.load(str(tmp_path / "bad.json"))


def test_checkpoint_resume_equals_an_uninterrupted_fit(tmp_path):
    rng = np.random.default_rng(2)
    grids = [np.repeat(rng.integers(0, 8, size=(4, 8)), 2, 0) for _ in range(40)]
    full = VisualBPE.fit(grids, 8, 40, alpha=0.5)
    ckpt = str(tmp_path / "ckpt")
    partial = VisualBPE.fit(grids, 8, 40, alpha=0.5, checkpoint_dir=ckpt, checkpoint_every=7, stop_after=17)
    assert len(partial.merges) == 17
    resumed = VisualBPE.fit(grids, 8, 40, alpha=0.5, checkpoint_dir=ckpt, checkpoint_every=7)
    assert resumed.report["resumed_from"] == 14, "the latest checkpoint (every 7 merges) before the stop"
    assert resumed.merges == full.merges
    # a checkpoint of other parameters is not used
    other = VisualBPE.fit(grids, 8, 40, alpha=0.0, checkpoint_dir=ckpt, checkpoint_every=7)
    assert other.report["resumed_from"] == 0


def test_compacting_the_position_index_keeps_the_merges_and_drops_stale_entries():
    rng = np.random.default_rng(5)
    grids = [np.repeat(rng.integers(0, 6, size=(6, 12)), 2, 0) for _ in range(60)]
    plain = VisualBPE.fit(grids, 6, 80, alpha=0.3)
    compacting = VisualBPE.fit(grids, 6, 80, alpha=0.3, shards=CompactingShards)
    assert compacting.merges == plain.merges and compacting.report["output_tokens"] == plain.report["output_tokens"]
    assert plain.report["index"]["compactions"] == 0 and compacting.report["index"]["compactions"] > 0
    assert compacting.report["index"]["entries_final"] < plain.report["index"]["entries_final"]


def _generated_grids(seed: int, start: int, stop: int) -> Corpus:
    """Grids start..stop-1 of a corpus where grid i depends only on (seed, i): what a shard makes itself."""
    return Corpus.from_array(np.stack([np.random.default_rng([seed, i]).integers(0, 5, size=(4, 6)) for i in range(start, stop)]), 5)


def test_grid_sources_load_where_the_shard_lives_and_give_the_merges_of_the_whole_corpus(ray_cluster):
    from tessera.bpe.distributed import RayShards

    whole = [np.random.default_rng([9, i]).integers(0, 5, size=(4, 6)) for i in range(90)]
    sources = [GridSource(_generated_grids, (9, a, b), f"gen-9-{a}-{b}", b - a) for a, b in ((0, 40), (40, 90))]
    expected = VisualBPE.fit(whole, 5, 50)
    for backend in (LocalShards, RayShards):
        bpe = VisualBPE.fit_sources(sources, 5, 50, shards=backend)
        assert bpe.merges == expected.merges
        assert bpe.report["num_grids"] == 90 and bpe.report["num_shards"] == 2 and bpe.report["grid_load_s"] >= 0
    bad = [GridSource(_generated_grids, (9, 0, 10), "gen", 10)]
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        VisualBPE.fit_sources(bad, 4, 5)


def test_distributed_fit_equals_single_worker(ray_cluster):
    """Shards in Ray actors or in this process, one or several: the same merges."""
    from tessera.bpe.distributed import RayShards

    rng = np.random.default_rng(3)
    grids = [np.repeat(rng.integers(0, 6, size=(3, 6)), 2, 0) for _ in range(50)] + [rng.integers(0, 6, size=(5, 3)) for _ in range(10)]
    one = VisualBPE.fit(grids, 6, 60, alpha=0.7)
    two = VisualBPE.fit(grids, 6, 60, alpha=0.7, num_shards=2, shards=RayShards)
    three = VisualBPE.fit(grids, 6, 60, alpha=0.7, num_shards=3, shards=RayShards)
    local_three = VisualBPE.fit(grids, 6, 60, alpha=0.7, num_shards=3)
    assert one.merges == two.merges == three.merges == local_three.merges
    assert two.report["num_shards"] == 2 and one.report["output_tokens"] == two.report["output_tokens"]
    assert set(two.report["seconds"]) >= {"build", "count", "choose", "apply", "reduce"}
    # peak memory per process: the driver and each shard actor, and their sum
    assert len(three.report["shard_peak_rss_mb"]) == 3 and min(three.report["shard_peak_rss_mb"]) > 0
    assert three.report["peak_rss_sum_gb"] * 1024 >= three.report["peak_rss_mb"] + sum(three.report["shard_peak_rss_mb"]) - 1
    assert one.report["shard_peak_rss_mb"] == [] and one.report["peak_rss_sum_gb"] * 1024 >= one.report["peak_rss_mb"] - 1
