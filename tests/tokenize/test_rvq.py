import torch

from tessera.config import RVQConfig
from tessera.tokenize.rvq import ResidualVQ


def test_nearest_is_the_brute_force_argmin():
    torch.manual_seed(0)
    x, cb = torch.randn(500, 16), torch.randn(64, 16)
    brute = torch.cdist(x, cb).argmin(1)
    assert torch.equal(ResidualVQ.nearest(x, cb), brute)


def test_residual_error_falls_with_depth():
    torch.manual_seed(0)
    rvq = ResidualVQ(RVQConfig(dim=8, codebook_size=32, depth=4, kmeans_init=True)).train()
    x = torch.randn(2048, 8)
    _, codes, info = rvq(x)
    norms = info["residual_norms"].tolist()
    assert codes.shape == (2048, 4)
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    rvq.eval()
    q, _, _ = rvq(x)
    assert torch.allclose(rvq.lookup(rvq(x)[1]), q, atol=1e-5)


def test_ema_moves_codes_to_the_mean_of_their_assignments():
    rvq = ResidualVQ(RVQConfig(dim=2, codebook_size=2, depth=1, decay=0.5, kmeans_init=False, dead_threshold=0.0)).train()
    rvq.codebooks[0] = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    rvq.ema_sum[0] = rvq.codebooks[0].clone()
    x = torch.tensor([[1.0, 1.0]] * 8 + [[9.0, 9.0]] * 8)
    for _ in range(30):
        rvq(x)
    assert torch.allclose(rvq.codebooks[0], torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-2)


def test_a_starved_code_is_restarted_from_the_batch():
    torch.manual_seed(0)
    rvq = ResidualVQ(RVQConfig(dim=2, codebook_size=4, depth=1, decay=0.5, kmeans_init=False, dead_threshold=0.1)).train()
    rvq.codebooks[0] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])  # code 3 is never nearest
    rvq.ema_sum[0] = rvq.codebooks[0].clone()
    x = torch.rand(256, 2)
    for _ in range(10):
        rvq(x)
    assert int(rvq.restarts[0]) >= 1
    assert rvq.codebooks[0][3].abs().max() <= 1.5, "the dead code now lies among the data"
    assert rvq.usage(rvq(x)[1])["usage"][0] == 1.0


def _noisy_surfaces(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two flat surfaces with faint noise, (N, 2), and the surface of each."""
    g = torch.Generator().manual_seed(seed)
    which = torch.arange(400) % 2
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    return centres[which] + 0.05 * torch.randn(400, 2, generator=g), which


def test_merge_retires_the_codes_that_split_one_surface_along_its_noise():
    x, which = _noisy_surfaces()
    rvq = ResidualVQ(RVQConfig(dim=2, codebook_size=4, depth=1, kmeans_init=False)).eval()
    # codes 0 and 1 split surface 0 along its noise (k-means' spare codes go to the largest cluster);
    # code 2 is surface 1, code 3 is far from everything (unused, so no evidence to retire it on)
    rvq.codebooks[0] = torch.tensor([[-0.02, 0.0], [0.02, 0.0], [5.0, 0.0], [50.0, 50.0]])
    before = rvq(x)[1][:, 0]
    assert set(before[which == 0].tolist()) == {0, 1}, "the split writes one surface with two codes"
    report = rvq.merge_duplicates(x, tolerance=1.0)
    assert report[0]["retired"] == 1 and report[0]["active"] == 3 and report[0]["scale"] > 0.04
    after = rvq(x)[1][:, 0]
    assert after[which == 0].unique().numel() == 1 and torch.equal(after[which == 1], before[which == 1])
    survivor, retired = int(after[which == 0][0]), 1 - int(after[which == 0][0])
    assert not rvq.active[0, retired] and rvq.active[0, 3]
    assert torch.allclose(rvq.codebooks[0][survivor], x[which == 0].mean(0), atol=0.05), "the survivor is their usage-weighted mean"
    # a retired code still decodes (a model that learnt it may still write it)
    assert torch.equal(rvq.lookup(torch.tensor([[retired]])), rvq.codebooks[0][retired][None])


def test_merge_keeps_codes_further_apart_than_the_quantisation_error():
    x, which = _noisy_surfaces()
    rvq = ResidualVQ(RVQConfig(dim=2, codebook_size=2, depth=1, kmeans_init=False)).eval()
    rvq.codebooks[0] = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    assert rvq.merge_duplicates(x, tolerance=3.0)[0]["retired"] == 0
    assert torch.equal(rvq(x)[1][:, 0], which)
    # with a tolerance past the surfaces' distance everything merges: the tolerance is what decides
    assert rvq.merge_duplicates(x, tolerance=1000.0)[0]["retired"] == 1


def test_merge_is_refused_in_training_mode_and_old_state_dicts_load_with_every_code_active():
    rvq = ResidualVQ(RVQConfig(dim=2, codebook_size=4, depth=2)).train()
    try:
        rvq.merge_duplicates(torch.zeros(4, 2), 1.0)
        raise AssertionError("merging while the EMA still moves the codes must be refused")
    except RuntimeError:
        pass
    state = {k: v for k, v in rvq.state_dict().items() if k != "active"}  # a tokenizer saved before `active`
    fresh = ResidualVQ(RVQConfig(dim=2, codebook_size=4, depth=2))
    fresh.active.fill_(False)
    fresh.load_state_dict(state)
    assert bool(fresh.active.all())
