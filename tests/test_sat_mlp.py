"""The SAT MLP ops on the torch backend against the fp64 masked-dense reference."""
import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.reference import reference_indices, reference_mlp, reference_sat_mlp

from helpers import assert_matches_reference, check_zero_tokens, fp64_copies, make_operands, out_and_grads

SHAPES = [(1, 8, 5), (63, 97, 123), (97, 64, 431), (130, 123, 63)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RATES = [0.25, 0.5, 0.9]


def _id(shape):
    return "T{}-h{}-I{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rate", RATES, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_sat_mlp_matches_reference(shape, rate, dtype):
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, rate, return_indices=True)
    assert idx.dtype == torch.int64 and idx.numel() == sk.num_kept(shape[2], rate)
    assert torch.equal(idx, torch.unique(idx)), "indices must be sorted and unique"
    ours = assert_matches_reference(lambda *o: sk.sat_mlp(*o, rate), operands, dy, idx)
    # exact zeros outside the kept set, non-zero inside
    omitted = torch.ones(shape[2], dtype=torch.bool)
    omitted[idx] = False
    _, _, dwg, dwu, dwd = ours
    assert (dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all()
    assert (dwg[idx].abs().sum(1) > 0).all() and (dwd[:, idx].abs().sum(0) > 0).all()


@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_id)
def test_selection_is_the_reference_topk_in_fp64(shape, metric):
    operands, dy = make_operands(*shape, torch.float64)
    _, idx = sk.sat_mlp(*operands, 0.5, metric=metric, return_indices=True)
    assert torch.equal(idx, reference_indices(*operands, 0.5, metric=metric))
    y = sk.sat_mlp(*operands, 0.5, metric=metric)
    torch.testing.assert_close(y, reference_sat_mlp(*operands, 0.5, metric=metric), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
def test_activations(act, dtype):
    operands, dy = make_operands(63, 97, 123, dtype)
    _, idx = sk.sat_mlp(*operands, 0.5, act=act, return_indices=True)
    assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, act=act), operands, dy, idx, act=act)
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, act=act), operands, dy, idx, act=act)


@pytest.mark.parametrize("lead", [(3, 21), (2, 3, 7), (5,)], ids=lambda s: "x".join(map(str, s)))
def test_leading_dims(lead):
    operands, dy = make_operands(None, 40, 90, torch.float64, lead=lead)
    y, idx = sk.sat_mlp(*operands, 0.5, return_indices=True)
    assert y.shape == operands[0].shape
    assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5), operands, dy, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("k", [1, 2, 122, 123])
def test_gathered_mlp_matches_reference(k, dtype):
    operands, dy = make_operands(63, 97, 123, dtype, seed=k)
    idx = torch.sort(torch.randperm(123, generator=torch.Generator().manual_seed(k))[:k]).values
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx), operands, dy, idx)


def test_rate_zero_is_dense_autograd():
    operands, dy = make_operands(33, 40, 70, torch.float64)
    y, idx = sk.sat_mlp(*operands, 0.0, return_indices=True)
    assert torch.equal(idx, torch.arange(70))
    assert "SATMLP" not in type(y.grad_fn).__name__
    assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.0), operands, dy, None)


def test_tiny_rate_keeping_everything_is_dense():
    operands, _ = make_operands(9, 8, 4, torch.float64)
    y = sk.sat_mlp(*operands, 0.1)   # round(0.9 * 4) = 4 = I
    torch.testing.assert_close(y, reference_mlp(*operands))


def test_only_kept_activations_are_saved():
    """The autograd graph holds x, the weights and the kept pre-activations (neuron-major [k, T]): never a [T, I]
    tensor."""
    T, h, inter = 256, 32, 512
    operands, _ = make_operands(T, h, inter, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sk.sat_mlp(*operands, 0.75)
    k = sk.num_kept(inter, 0.75)
    assert (T, inter) not in saved and (inter, T) not in saved
    assert saved.count((k, T)) == 2, saved


def test_frozen_weights_get_no_grad():
    operands, dy = make_operands(20, 16, 30, torch.float64)
    x, wg, wu, wd = operands
    wg.requires_grad_(False)
    wd.requires_grad_(False)
    y = sk.sat_mlp(x, wg, wu, wd, 0.5)
    y.backward(dy)
    assert wg.grad is None and wd.grad is None and wu.grad is not None and x.grad is not None


def test_x_without_grad():
    operands, dy = make_operands(20, 16, 30, torch.float64)
    x = operands[0].detach()
    y = sk.sat_mlp(x, *operands[1:], 0.5)
    y.backward(dy)
    assert all(w.grad is not None for w in operands[1:])


def test_autocast_follows_f_linear():
    operands, _ = make_operands(31, 24, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx = sk.sat_mlp(*operands, 0.5, return_indices=True)
        y_plain = reference_mlp(*operands, idx)
    assert y.dtype == y_plain.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in operands)


def test_neuron_scores():
    operands, _ = make_operands(50, 24, 40, torch.float64)
    x, wg, wu, wd = (t.detach() for t in operands)
    a = torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())
    s = sk.neuron_scores(x, wg, wu, wd)
    assert s.dtype == torch.float32 and s.shape == (40,)
    torch.testing.assert_close(s, a.norm(dim=0).float())
    torch.testing.assert_close(sk.neuron_scores(x, wg, wu, wd, metric="l1"), a.abs().sum(0).float())
    torch.testing.assert_close(sk.neuron_scores(x, wg, wu, wd, metric="contrib"),
                               (a.norm(dim=0) * wd.norm(dim=0)).float())


def test_generator_makes_sampling_reproducible():
    operands, _ = make_operands(40, 24, 64, torch.float32)
    picks = [sk.sat_mlp(*operands, 0.5, strategy="sample", generator=torch.Generator().manual_seed(7),
                        return_indices=True)[1] for _ in range(2)]
    assert torch.equal(*picks)
    other = sk.sat_mlp(*operands, 0.5, strategy="sample", generator=torch.Generator().manual_seed(8),
                       return_indices=True)[1]
    assert not torch.equal(picks[0], other)


def test_fp64_grads_agree_with_autograd_of_reference_for_every_strategy():
    operands, dy = make_operands(45, 33, 77, torch.float64)
    for strategy in ("topk", "sample", "random"):
        torch.manual_seed(3)
        _, idx = sk.sat_mlp(*operands, 0.5, strategy=strategy, return_indices=True)
        torch.manual_seed(3)
        ours = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, strategy=strategy), operands, dy)
        ref = out_and_grads(lambda *o: reference_mlp(*o, idx), fp64_copies(operands), dy)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_zero_tokens(dtype):
    check_zero_tokens(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rate", [0.5, 0.9], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_dense_forward_matches_reference(shape, rate, dtype):
    """forward="dense": the output of the dense MLP, the gradients of the masked one at the same kept set."""
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, rate, return_indices=True)
    _, idx_dense = sk.sat_mlp(*operands, rate, forward="dense", return_indices=True)
    assert torch.equal(idx, idx_dense)
    y, *grads = assert_matches_reference(lambda *o: sk.sat_mlp(*o, rate, forward="dense"), operands, dy, idx,
                                         forward="dense")
    _, *sparse_grads = out_and_grads(lambda *o: sk.sat_mlp(*o, rate), operands, dy)
    for name, g, s in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, sparse_grads):
        torch.testing.assert_close(g, s, rtol=0, atol=0, msg=f"{name}: dense forward changed the gradient")
    dense_y = sk.sat_mlp(*operands, 0.0).detach()
    # the same sums as F.linear, in another order (the activations are neuron-major): equal up to rounding
    torch.testing.assert_close(y, dense_y, rtol=0, atol=8 * torch.finfo(dtype).eps * dense_y.abs().max().item())


def test_dense_forward_in_fp64_is_exact():
    operands, dy = make_operands(63, 97, 123, torch.float64)
    _, idx = sk.sat_mlp(*operands, 0.5, return_indices=True)
    ours = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, forward="dense"), operands, dy)
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, forward="dense"), fp64_copies(operands), dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[0], reference_mlp(*operands).detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(ours[0], reference_mlp(*operands, idx).detach()), "the sparse output differs"


def test_dense_forward_saves_only_kept_activations():
    T, h, inter = 256, 32, 512
    operands, _ = make_operands(T, h, inter, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sk.sat_mlp(*operands, 0.75, forward="dense")
    assert (T, inter) not in saved and (inter, T) not in saved
    assert saved.count((sk.num_kept(inter, 0.75), T)) == 2, saved


def test_forward_mode_is_checked():
    operands, _ = make_operands(8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="forward must be one of"):
        sk.sat_mlp(*operands, 0.5, forward="exact")


@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
def test_training_never_validates_indices(monkeypatch, strategy):
    """gathered_mlp(validate=True) costs three host syncs per call on a GPU: a training step of a patched model (any
    strategy, both forward modes, with checkpointing) must not run that validation."""
    from helpers import tiny_model

    import sat_kernels.ops.mlp.interface as ops

    def no_validation(*args, **kwargs):
        raise AssertionError("a training step validated kept indices (host syncs on a GPU)")

    monkeypatch.setattr(ops, "check_indices", no_validation)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    for forward in ("sparse", "dense"):
        model = sk.replace_mlp(tiny_model("llama"), 0.5, strategy=strategy, forward=forward).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if ".mlp." in n)
