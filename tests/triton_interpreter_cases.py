"""The Triton backend in the Triton interpreter (CPU, fp32/fp16) against the fp64 masked-dense reference.

Not collected by ``pytest tests`` (the file name does not start with ``test_``): ``tests/test_triton.py`` runs it in a
subprocess with ``TRITON_INTERPRET=1``, which triton reads when it is first imported, so the rest of the suite never
sees the interpreter. Run it alone with ``TRITON_INTERPRET=1 python -m pytest -q tests/triton_interpreter_cases.py``.
The interpreter runs each program in numpy with one 16x16x16 tile config, so shapes stay tiny (T <= 70, h <= 48,
I <= 100) yet cross several tiles in every dimension, none a multiple of 16. bf16 is never tested here: the
interpreter computes it wrongly.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run through tests/test_triton.py",
                allow_module_level=True)

import sat_kernels as sk
from sat_kernels.ops.reference import reference_indices, reference_mlp
from sat_kernels.ops.mlp.triton import launcher as triton_sat_mlp

from helpers import (assert_matches_reference, check_zero_tokens, fp64_copies, make_operands,
                     out_and_grads, rel_rms)

DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 8, 5), (37, 40, 70), (70, 33, 100), (63, 48, 97)]


def _id(shape):
    return "T{}-h{}-I{}".format(*shape)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _triton_sat(rate, **kw):
    return lambda *o: sk.sat_mlp(*o, rate, backend="triton", **kw)


def _check_zeros(grads, idx, inter):
    """Exact zeros in the omitted rows of dW_gate/dW_up and columns of dW_down; non-zero in the kept ones."""
    _, _, dwg, dwu, dwd = grads
    omitted = torch.ones(inter, dtype=torch.bool)
    omitted[idx] = False
    assert (dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all()
    assert (dwg[idx].abs().sum(1) > 0).all() and (dwu[idx].abs().sum(1) > 0).all()
    assert (dwd[:, idx].abs().sum(0) > 0).all()


def test_backend_is_available_under_the_interpreter():
    assert "triton" in sk.available_backends() and "triton" not in sk.unavailable_backends()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_sat_mlp_matches_reference(shape, rate, dtype):
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, rate, backend="triton", return_indices=True)
    assert idx.dtype == torch.int64 and idx.numel() == sk.num_kept(shape[2], rate)
    assert torch.equal(idx, torch.unique(idx)), "indices must be sorted and unique"
    ours = assert_matches_reference(_triton_sat(rate), operands, dy, idx)
    _check_zeros(ours, idx, shape[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_id)
def test_dense_forward_matches_reference(shape, dtype):
    """forward="dense": the dense output from the plain down GEMM, the torch backend's sparse gradients."""
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, 0.5, backend="triton", forward="dense", return_indices=True)
    ours = assert_matches_reference(_triton_sat(0.5, forward="dense"), operands, dy, idx, forward="dense")
    _check_zeros(ours, idx, shape[2])
    y_dense = reference_mlp(*fp64_copies(operands))
    assert rel_rms(ours[0], y_dense) < 4 * torch.finfo(dtype).eps * shape[2] ** 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("k", [1, 2, 47, 69, 70])
def test_gathered_mlp_matches_reference(k, dtype):
    """k = 1 and k = I included; the gate/up kernel computes only the kept weight rows."""
    operands, dy = make_operands(37, 40, 70, dtype, seed=k)
    idx = torch.sort(torch.randperm(70, generator=torch.Generator().manual_seed(k))[:k]).values
    ours = assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, backend="triton"), operands, dy, idx)
    _check_zeros(ours, idx, 70)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_activations(act, dtype):
    operands, dy = make_operands(63, 48, 97, dtype, seed=5)
    _, idx = sk.sat_mlp(*operands, 0.5, act=act, backend="triton", return_indices=True)
    assert_matches_reference(_triton_sat(0.5, act=act), operands, dy, idx, act=act)
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, act=act, backend="triton"), operands, dy, idx,
                             act=act)


@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_id)
def test_selection_is_the_fp64_topk(shape, metric):
    """fp32 kernels pick exactly the top-k of the fp64 scores (no near-ties at these seeds)."""
    operands, _ = make_operands(*shape, torch.float32)
    _, idx = sk.sat_mlp(*operands, 0.5, metric=metric, backend="triton", return_indices=True)
    assert torch.equal(idx, reference_indices(*fp64_copies(operands), 0.5, metric=metric))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_fused_scores_equal_neuron_scores(dtype, metric, act):
    """The scores accumulated in the gate/up epilogue are sk.neuron_scores: equal within fp32 rounding in fp32; in
    fp16 (where the two round A to fp16 from different intermediates) at most 2x as far from the fp64 scores."""
    x, wg, wu, wd = (t.detach() for t in make_operands(70, 33, 100, dtype, seed=2)[0])
    _, _, _, fused = torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, act, metric, False)
    assert fused.dtype == torch.float32 and fused.shape == (100,)
    plain = sk.neuron_scores(x, wg, wu, wd, metric=metric, act=act)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, rtol=2e-6, atol=0)
    else:
        exact = sk.neuron_scores(x.double(), wg.double(), wu.double(), wd.double(), metric=metric, act=act)
        assert rel_rms(fused, exact) <= 2 * rel_rms(plain, exact) + 1e-4


@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_scores_do_not_depend_on_the_tile_config(monkeypatch, dtype, metric):
    """Which config wins autotuning varies between runs and ranks; the kept set must not. The score partials cover a
    fixed number of rows whatever the tile (BM 16, 32, 64 here), so each config alone gives bitwise the same scores.

    The interpreter runs ``tl.dot`` on the host's BLAS, whose summation order can change with the tile's shape (on
    some CPUs OpenBLAS rounds a [16, 16] and a [32, 32] product of the same rows differently), which would say nothing
    about the kernel. So ``x``, ``W_gate`` and ``W_up`` hold multiples of 1/4 in [-1/2, 1/2]: every product and every
    partial sum of the projections is exact, and what remains to differ is the kernel's own reduction of the
    scores."""
    from triton import Config

    from sat_kernels.ops.mlp.triton import gate_up

    kern = gate_up._gate_up_fwd_kernel
    small, = kern.configs
    configs = [small] + [Config({**small.kwargs, "BM": bm, "BN": bn}, num_warps=1, num_stages=1)
                         for bm, bn in ((32, 32), (64, 16))]
    gen = torch.Generator().manual_seed(7)
    x, wg, wu = (torch.randint(-2, 3, shape, generator=gen).to(dtype) / 4 for shape in ((70, 33), (100, 33), (100, 33)))
    wd = make_operands(70, 33, 100, dtype, seed=7)[0][3].detach()
    scores = []
    for config in configs:
        monkeypatch.setattr(kern, "configs", [config])
        monkeypatch.setattr(kern, "cache", {})
        scores.append(torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", metric, False)[3])
    assert all(torch.equal(scores[0], s) for s in scores[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_w_down_gathered_in_kernel(monkeypatch, dtype):
    """The in-kernel gather of w_down's kept columns (the alternative to compacting them) computes the same."""
    operands, dy = make_operands(70, 33, 100, dtype, seed=4)
    idx = torch.sort(torch.randperm(100, generator=torch.Generator().manual_seed(4))[:41]).values
    compact = out_and_grads(lambda *o: sk.gathered_mlp(*o, idx, backend="triton"), operands, dy)
    monkeypatch.setattr(triton_sat_mlp, "COMPACT_W_DOWN", False)
    gathered = assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, backend="triton"), operands, dy, idx)
    for a, b in zip(compact, gathered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(3, 21), (2, 3, 7)], ids=lambda s: "x".join(map(str, s)))
def test_leading_dims(lead):
    operands, dy = make_operands(None, 40, 90, torch.float32, lead=lead)
    y, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
    assert y.shape == operands[0].shape
    assert_matches_reference(_triton_sat(0.5), operands, dy, idx)


def test_random_strategy_picks_what_the_torch_backend_picks():
    operands, dy = make_operands(37, 40, 70, torch.float32)
    picks = {b: sk.sat_mlp(*operands, 0.5, strategy="random", backend=b, return_indices=True,
                           generator=torch.Generator().manual_seed(11)) for b in ("torch", "triton")}
    assert torch.equal(picks["torch"][1], picks["triton"][1])
    torch.testing.assert_close(picks["triton"][0], picks["torch"][0], rtol=1e-5, atol=1e-5)


def test_non_contiguous_operands():
    operands, dy = make_operands(37, 40, 70, torch.float32)
    x, wg, wu, wd = operands
    wd_t = wd.detach().t().contiguous().requires_grad_()   # [I, h]; wd_t.t() is a non-contiguous [h, I] view
    ops = [x, wg, wu, wd_t]
    _, idx = sk.sat_mlp(x, wg, wu, wd_t.t(), 0.5, backend="triton", return_indices=True)
    ours = out_and_grads(lambda a, b, c, d: sk.sat_mlp(a, b, c, d.t(), 0.5, backend="triton"), ops, dy)
    ref = out_and_grads(lambda a, b, c, d: reference_mlp(a, b, c, d.t(), idx), fp64_copies(ops), dy.double())
    for o, r in zip(ours, ref):
        assert rel_rms(o, r) < 1e-5


def test_only_kept_activations_are_saved():
    T, h, inter = 64, 16, 96
    operands, _ = make_operands(T, h, inter, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sk.sat_mlp(*operands, 0.75, backend="triton")
    k = sk.num_kept(inter, 0.75)
    assert (T, inter) not in saved and (inter, T) not in saved
    assert saved.count((T, k)) == 2, saved


def test_frozen_weights_and_x_without_grad():
    operands, dy = make_operands(20, 16, 30, torch.float32)
    x, wg, wu, wd = operands
    wg.requires_grad_(False)
    wd.requires_grad_(False)
    sk.sat_mlp(x, wg, wu, wd, 0.5, backend="triton").backward(dy)
    assert wg.grad is None and wd.grad is None and wu.grad is not None and x.grad is not None
    operands, dy = make_operands(20, 16, 30, torch.float32)
    x, weights = operands[0].detach(), operands[1:]
    y, idx = sk.sat_mlp(x, *weights, 0.5, backend="triton", return_indices=True)
    y.backward(dy)
    ref = fp64_copies(weights)
    reference_mlp(x.double(), *ref, idx).backward(dy.double())
    for w, r in zip(weights, ref):
        assert rel_rms(w.grad, r.grad) < 1e-5


def test_checkpoint_recompute_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    operands, dy = make_operands(37, 40, 70, torch.float32)
    fn = _triton_sat(0.5, strategy="random")
    torch.manual_seed(0)
    plain = out_and_grads(fn, operands, dy)
    torch.manual_seed(0)
    ckpt = out_and_grads(lambda *o: checkpoint(fn, *o, use_reentrant=False), operands, dy)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_follows_f_linear():
    """Under torch.autocast the fp32 operands are cast like F.linear's: fp16 kernels, fp32 leaf gradients."""
    operands, dy = make_operands(37, 40, 70, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        y, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
        y_plain = reference_mlp(*operands, idx)
    assert y.dtype == y_plain.dtype == torch.float16
    half = [t.detach().half().requires_grad_() for t in operands]
    y_half = sk.gathered_mlp(*half, idx, backend="triton")
    torch.testing.assert_close(y, y_half, rtol=0, atol=0)
    y.backward(dy.half())
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in operands)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=_dt)
def test_unsupported_dtypes_are_refused(dtype):
    operands, _ = make_operands(8, 16, 20, dtype)
    with pytest.raises(TypeError, match=r"TRITON_INTERPRET=1 supports float32 and float16 only"):
        sk.sat_mlp(*operands, 0.5, backend="triton")
    with pytest.raises(TypeError, match=str(dtype)):
        sk.gathered_mlp(*operands, torch.arange(3), backend="triton")


@pytest.mark.parametrize("entry", ["sat_mlp", "sat_mlp_dense_forward", "gathered_mlp"])
def test_torch_compile_fullgraph(entry):
    """The kernels are custom ops with fake implementations: one graph, no break, same result as eager."""
    operands, dy = make_operands(37, 40, 70, torch.float32)
    idx = torch.arange(0, 70, 3)
    if entry.startswith("sat_mlp"):
        fn = _triton_sat(0.5, forward="dense" if entry.endswith("dense_forward") else "sparse")
    else:
        fn = lambda *o: sk.gathered_mlp(*o, idx, backend="triton", validate=False)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = out_and_grads(fn, operands, dy)
    for a, b in zip(out_and_grads(compiled, operands, dy), eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and the autograd registration agree with the real kernels."""
    x, wg, wu, wd = (t.detach() for t in make_operands(21, 24, 40, torch.float32)[0])
    idx = torch.arange(1, 40, 3)
    g, u, a, _ = torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", "l2", True)
    g_s, u_s, a_s = torch.ops.sat_kernels.triton_kept_act(g, u, idx, "silu", True)
    g_s2, u_s2, no_a = torch.ops.sat_kernels.triton_kept_act(g, u, idx, "silu", False)
    assert torch.equal(g_s2, g_s) and torch.equal(u_s2, u_s) and no_a.numel() == 0
    leaves = (x.requires_grad_(), wg.requires_grad_(), wu.requires_grad_(), wd.requires_grad_())
    cases = [
        (torch.ops.sat_kernels.triton_gate_up_scores, (x, wg, wu, wd, "silu", "contrib", False)),
        (torch.ops.sat_kernels.triton_gate_up_scores, (x, wg, wu, wd, "gelu_tanh", "l1", True)),
        (torch.ops.sat_kernels.triton_kept_act, (g, u, idx, "silu", True)),
        (torch.ops.sat_kernels.triton_kept_act, (g, u, idx, "gelu_tanh", False)),
        (torch.ops.sat_kernels.triton_gate_up_kept, (x, wg, wu, idx, "gelu_tanh")),
        (torch.ops.sat_kernels.triton_kept_mlp, (*leaves, idx, g_s, u_s, a_s, "silu", False)),
        (torch.ops.sat_kernels.triton_kept_mlp, (*leaves, idx, g_s, u_s, a, "silu", True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_empty_batch():
    operands, dy = make_operands(0, 16, 30, torch.float32)
    for fn in (_triton_sat(0.5), lambda *o: sk.gathered_mlp(*o, torch.arange(0, 30, 2), backend="triton")):
        y, dx, dwg, dwu, dwd = out_and_grads(fn, operands, dy)
        assert y.shape == (0, 16) and dx.shape == (0, 16)
        assert not dwg.any() and not dwu.any() and not dwd.any()


def test_autotuning_with_several_configs(monkeypatch):
    """The autotune path (on GPU: the first call at each shape) with two tile configs per kernel, timed by a stand-in
    that runs each trial and makes the later, larger-tile config win: the trials must leave no trace in the result."""
    from triton import Config

    from sat_kernels.ops.mlp.triton import down, gate_up

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        fake_bench.calls += 1
        return [1.0 / fake_bench.calls] * len(quantiles)

    fake_bench.calls = 0
    kernels = [gate_up._gate_up_fwd_kernel, gate_up._gate_up_weight_bwd_kernel, gate_up._gate_up_input_bwd_kernel,
               down._down_fwd_kernel, down._down_bwd_kernel, down._down_weight_bwd_kernel]
    for kern in kernels:
        small, = kern.configs
        big = Config({**small.kwargs, "BM": 32, "BN": 32}, num_warps=1, num_stages=1)
        monkeypatch.setattr(kern, "configs", [small, big])
        monkeypatch.setattr(kern, "cache", {})
        monkeypatch.setattr(kern, "_do_bench", fake_bench)
    operands, dy = make_operands(70, 33, 100, torch.float32, seed=6)
    x, wg, wu, wd = (t.detach() for t in operands)
    _, _, _, fused = torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", "l2", False)
    assert gate_up._gate_up_fwd_kernel.best_config.kwargs["BM"] == 32
    torch.testing.assert_close(fused, sk.neuron_scores(x, wg, wu, wd), rtol=2e-6, atol=0)
    _, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
    assert_matches_reference(_triton_sat(0.5), operands, dy, idx)
    assert all(kern.best_config.kwargs["BM"] == 32 for kern in kernels)


def test_patched_llama_trains_like_the_torch_backend():
    """replace_mlp(backend="triton") on a tiny random Llama: loss and every MLP gradient match the torch backend."""
    from helpers import tiny_model

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        model = sk.replace_mlp(tiny_model("llama", intermediate_size=72), 0.5, backend=backend).train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if ".mlp." in n}
        results[backend] = (loss.detach(), grads)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert len(results["triton"][1]) == 6
    for name, grad in results["triton"][1].items():
        ref = results["torch"][1][name]
        assert torch.equal(grad == 0, ref == 0), f"{name}: different omitted rows/columns"
        assert rel_rms(grad, ref) < 1e-4, name


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_zero_tokens(dtype):
    check_zero_tokens(dtype, backend="triton")
