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
