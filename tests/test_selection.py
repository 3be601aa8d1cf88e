"""Scoring, selection strategies and num_kept."""
import math

import pytest
import torch

import sat_kernels as sk


@pytest.mark.parametrize("n,rate,k", [(11008, 0.5, 5504), (1536, 0.75, 384), (10, 0.25, 8), (3, 0.99, 1),
                                      (7, 0.0, 7), (5, 0.5, 3)])
def test_num_kept(n, rate, k):
    assert sk.num_kept(n, rate) == k


def test_num_kept_multiple_of():
    assert sk.num_kept(11008, 0.5, multiple_of=128) == 5504
    assert sk.num_kept(11008, 0.5, multiple_of=256) == 5632
    assert sk.num_kept(100, 0.01, multiple_of=64) == 100


def _scores(n=257, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.01


@pytest.mark.parametrize("k", [1, 2, 128, 256, 257])
def test_topk_is_sorted_topk(k):
    s = _scores()
    idx = sk.select_neurons(s, k)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert torch.equal(idx, torch.sort(torch.topk(s, k).indices).values)


def test_topk_with_ties_keeps_k_unique():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    idx = sk.select_neurons(s, 3)
    assert idx.numel() == 3 and torch.equal(idx, torch.unique(idx)) and (s[idx] == 2.0).all()


@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_generator_reproducible(strategy):
    s = _scores()
    a = sk.select_neurons(s, 64, strategy=strategy, generator=torch.Generator().manual_seed(1))
    b = sk.select_neurons(s, 64, strategy=strategy, generator=torch.Generator().manual_seed(1))
    c = sk.select_neurons(s, 64, strategy=strategy, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.unique(a))


@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_global_rng_replays(strategy):
    s = _scores()
    torch.manual_seed(5)
    a = sk.select_neurons(s, 64, strategy=strategy)
    torch.manual_seed(5)
    assert torch.equal(a, sk.select_neurons(s, 64, strategy=strategy))


def test_sample_is_proportional_to_score():
    """k=1 Gumbel-max draws neuron i with probability s_i / sum(s): a chi-square test with a fixed seed."""
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    draws = 8000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[sk.select_neurons(s, 1, strategy="sample", generator=gen)] += 1
    assert counts[4] == 0, "a zero score is never sampled"
    expected = draws * s[:4] / s.sum()
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.27, f"chi2 {chi2:.2f} (3 dof, p = 0.001 threshold 16.27), counts {counts.tolist()}"


def test_sample_favours_high_scores_without_replacement():
    s = torch.cat([torch.full((100,), 100.0), torch.full((100,), 1.0)])
    idx = sk.select_neurons(s, 100, strategy="sample", generator=torch.Generator().manual_seed(0))
    assert (idx < 100).sum() > 90


def test_random_is_uniform():
    s = torch.cat([torch.full((50,), 100.0), torch.full((50,), 1.0)])
    gen = torch.Generator().manual_seed(0)
    high = sum(int((sk.select_neurons(s, 50, strategy="random", generator=gen) < 50).sum()) for _ in range(200))
    assert abs(high / (200 * 50) - 0.5) < 0.03


@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scores_of_16_bit_activations_square_in_fp32(dtype, metric):
    """The torch backend squares 16-bit activations in fp32, as the Triton backend's fused scores do: the scores are
    the fp64 norms of the 16-bit values up to fp32 rounding (squares rounded to bf16 are off by up to 2^-9)."""
    from sat_kernels.selection import activation_scores

    a = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    s = activation_scores(a, metric)
    exact = a.double().norm(dim=0) if metric == "l2" else a.double().abs().sum(0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, exact.float(), rtol=4e-6, atol=0)


def test_num_kept_is_what_sat_mlp_keeps():
    for n in (5, 63, 1536):
        for rate in (0.1, 0.5, 0.75):
            x = torch.randn(4, 8)
            w = [torch.randn(n, 8), torch.randn(n, 8), torch.randn(8, n)]
            _, idx = sk.sat_mlp(x, *w, rate, return_indices=True)
            assert idx.numel() == sk.num_kept(n, rate) == max(1, math.floor((1 - rate) * n + 0.5))


@pytest.mark.parametrize("strategy", ["topk", "sample"])
def test_nan_scores_rank_lowest(strategy):
    s = torch.tensor([0.5, float("nan"), 2.0, float("nan"), 1.0])
    idx = sk.select_neurons(s, 3, strategy=strategy, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [0, 2, 4]
    assert sk.select_neurons(s, 4).numel() == 4


def test_nan_ranks_below_a_zero_score_in_sample():
    """"sample" gives a zero score the key -inf; a NaN score still ranks below it, as in the cuda backend's kernel."""
    nan = float("nan")
    for s, want in (([nan, nan, 0.0, 0.0, 1.0, 2.0], [2, 3, 4, 5]), ([0.0, 0.0, 1.0, 2.0, nan, nan], [0, 1, 2, 3])):
        for seed in range(5):
            gen = torch.Generator().manual_seed(seed)
            assert sk.select_neurons(torch.tensor(s), 4, strategy="sample", generator=gen).tolist() == want, (s, seed)


@pytest.mark.parametrize("n", [7, 1000, 11008])
def test_ties_go_to_the_lower_index(n):
    """The kept set of a stable descending sort, as the cuda backend's kernel keeps (-0.0 ties with +0.0)."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (n,), generator=gen).float()
    s[torch.rand(n, generator=gen) < 0.1] = -0.0
    for k in {1, n // 3 + 1, n // 2, n - 1}:
        want = torch.sort(torch.sort(s, descending=True, stable=True).indices[:k]).values
        assert torch.equal(sk.select_neurons(s, k), want), k
