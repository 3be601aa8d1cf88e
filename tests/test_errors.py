"""Every bad input gets a clear ValueError/TypeError naming the argument."""
import math

import pytest
import torch

import sat_kernels as sk


def _ops(T=6, h=8, inter=10, dtype=torch.float32):
    return [torch.randn(T, h, dtype=dtype), torch.randn(inter, h, dtype=dtype), torch.randn(inter, h, dtype=dtype),
            torch.randn(h, inter, dtype=dtype)]


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_rate_out_of_range(rate):
    with pytest.raises(ValueError, match="omission_rate"):
        sk.sat_mlp(*_ops(), rate)
    with pytest.raises(ValueError, match="omission_rate"):
        sk.num_kept(10, rate)


@pytest.mark.parametrize("rate", ["0.5", None, True, torch.tensor(0.5)])
def test_rate_wrong_type(rate):
    with pytest.raises(TypeError, match="omission_rate"):
        sk.sat_mlp(*_ops(), rate)


@pytest.mark.parametrize("which,bad,match", [
    (0, torch.randn(6, 7), r"x must be \[\.\.\., h\]"),
    (1, torch.randn(10, 7), r"w_up must have the shape of w_gate"),
    (2, torch.randn(11, 8), r"w_up must have the shape"),
    (3, torch.randn(8, 11), r"w_down must be \[h, I\]"),
    (3, torch.randn(10, 8), r"w_down must be \[h, I\]"),
    (1, torch.randn(10), r"w_gate must be 2-D"),
])
def test_shape_mismatch(which, bad, match):
    ops = _ops()
    ops[which] = bad
    with pytest.raises(ValueError, match=match):
        sk.sat_mlp(*ops, 0.5)


def test_dtypes():
    ops = _ops()
    ops[2] = ops[2].double()
    with pytest.raises(TypeError, match="share one dtype"):
        sk.sat_mlp(*ops, 0.5)
    ops = _ops()
    ops[0] = ops[0].long()
    with pytest.raises(TypeError, match="x must be a float tensor"):
        sk.sat_mlp(*ops, 0.5)
    ops = _ops()
    with pytest.raises(TypeError, match="w_gate must be a torch.Tensor"):
        sk.sat_mlp(ops[0], [[1.0]], ops[2], ops[3], 0.5)


def test_mixed_devices():
    ops = _ops()
    ops[3] = ops[3].to("meta")
    with pytest.raises(ValueError, match="one device"):
        sk.sat_mlp(*ops, 0.5)


@pytest.mark.parametrize("kw,match", [({"metric": "l3"}, "metric"), ({"strategy": "best"}, "strategy"),
                                      ({"act": "relu"}, "act"), ({"backend": "jax"}, "backend"),
                                      ({"generator": 3}, "generator")])
def test_unknown_options(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sk.sat_mlp(*_ops(), 0.5, **kw)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_says_why(backend):
    if backend in sk.available_backends():
        pytest.skip(f"{backend} can run here (CUDA, or TRITON_INTERPRET=1 for triton)")
    assert backend in sk.unavailable_backends()
    with pytest.raises(ValueError, match=f"backend '{backend}' is not available"):
        sk.sat_mlp(*_ops(), 0.5, backend=backend)


@pytest.mark.parametrize("indices,exc,match", [
    (torch.tensor([], dtype=torch.long), ValueError, "non-empty"),
    (torch.tensor([3, 1]), ValueError, "sorted"),
    (torch.tensor([1, 1, 2]), ValueError, "sorted strictly ascending"),
    (torch.tensor([0, 10]), ValueError, r"in \[0, 10\)"),
    (torch.tensor([-1, 2]), ValueError, r"in \[0, 10\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    (torch.arange(11), ValueError, "more than the 10 neurons"),
    ([0, 1], TypeError, "indices must be a torch.Tensor"),
])
def test_bad_indices(indices, exc, match):
    with pytest.raises(exc, match=match):
        sk.gathered_mlp(*_ops(), indices)


@pytest.mark.parametrize("k", [0, 11, -1, 2.0, True])
def test_select_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\]"):
        sk.select_neurons(torch.rand(10), k)


def test_select_bad_scores_and_strategy():
    with pytest.raises(ValueError, match="scores must be a 1-D float tensor"):
        sk.select_neurons(torch.rand(3, 3), 2)
    with pytest.raises(ValueError, match="scores must be a 1-D float tensor"):
        sk.select_neurons(torch.arange(4), 2)
    with pytest.raises(ValueError, match="strategy"):
        sk.select_neurons(torch.rand(4), 2, strategy="top")
    with pytest.raises(TypeError, match="generator"):
        sk.select_neurons(torch.rand(4), 2, strategy="sample", generator="seed")


def test_num_kept_bad_n():
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            sk.num_kept(n, 0.5)
