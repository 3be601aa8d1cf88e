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


def test_scores_in_low_precision_are_fp32():
    a = torch.randn(64, 10, dtype=torch.bfloat16)
    from sat_kernels.selection import activation_scores
    s = activation_scores(a, "l2")
    assert s.dtype == torch.float32
    # squares are rounded to bf16 (relative 2^-9) before the fp32 sum: 2^-10 relative on the norm
    torch.testing.assert_close(s, a.float().norm(dim=0), rtol=2 ** -10, atol=0)


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
