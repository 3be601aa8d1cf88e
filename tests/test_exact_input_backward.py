"""backward="exact_input": the exact forward, the dense MLP's input gradient, weight gradients of the kept neurons
only (zero rows of W_gate/W_up, zero columns of W_down elsewhere), on the torch backend; against the fp64 references,
through replace_mlp and the training CLI, and every refusal."""
import copy

import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.mlp import LoRA, sat_lora_mlp, sat_mlp_kept
from sat_kernels.ops.reference import reference_mlp
from sat_kernels.selection import priority_weights

from helpers import NAMES, assert_cli_refused, assert_matches_reference, fp64_copies, make_operands, out_and_grads, \
    parse_train_cli, rel_rms, tiny_model

SHAPES = [(1, 8, 5), (1, 7, 13), (63, 97, 123), (97, 64, 431), (130, 123, 63)]   # T = 1, odd h, I not a multiple of 8
EXACT = dict(forward="dense", backward="exact_input")


def _id(shape):
    return "T{}-h{}-I{}".format(*shape)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _omitted(inter, idx):
    omitted = torch.ones(inter, dtype=torch.bool)
    omitted[idx] = False
    return omitted


def _dense_grads(operands, dy, act="silu"):
    """y and the gradients of the dense MLP, in fp64."""
    return out_and_grads(lambda *o: reference_mlp(*o, act=act), fp64_copies(operands), dy.double())


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rate", [0.5, 0.9], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_fp64_exact_output_and_input_gradient_kept_weight_gradients(shape, rate, act):
    operands, dy = make_operands(*shape, torch.float64)
    y, *grads = out_and_grads(lambda *o: sk.sat_mlp(*o, rate, act=act, **EXACT), operands, dy)
    _, idx = sk.sat_mlp(*operands, rate, act=act, **EXACT, return_indices=True)
    assert idx.numel() == sk.num_kept(shape[2], rate)
    dense_y, dense_dx, *dense_dw = _dense_grads(operands, dy, act)
    torch.testing.assert_close(y, dense_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], dense_dx, rtol=1e-12, atol=1e-12, msg="dx is the dense MLP's")
    omitted = _omitted(shape[2], idx)
    dwg, dwu, dwd = grads[1:]
    pairs = (("dw_gate", dwg, dense_dw[0]), ("dw_up", dwu, dense_dw[1]), ("dw_down", dwd.t(), dense_dw[2].t()))
    for name, g, d in pairs:   # neuron i: row i of dW_gate, dW_up, column i of dW_down
        torch.testing.assert_close(g[idx], d[idx], rtol=1e-12, atol=1e-12, msg=f"{name}: kept neurons")
        assert (g[omitted] == 0).all(), f"{name}: omitted neurons get exactly zero"
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, act=act, **EXACT), fp64_copies(operands), dy)
    for name, o, r in zip(NAMES, [y, *grads], ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=_id)
def test_weight_gradients_are_the_sparse_backwards_and_dx_is_not(shape):
    """A kept neuron's weight gradient depends on its own dA row only, so it is the sparse backward's; dx is not."""
    operands, dy = make_operands(*shape, torch.float64)
    _, dx, *dw = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy)
    _, dx_sparse, *dw_sparse = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, forward="dense"), operands, dy)
    for name, g, s in zip(NAMES[2:], dw, dw_sparse):
        torch.testing.assert_close(g, s, rtol=1e-12, atol=1e-12, msg=name)
    assert rel_rms(dx_sparse, dx) > 1e-3, "the sparse backward's dx leaves the omitted neurons out"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_low_precision_against_the_fp64_reference(shape, dtype):
    """fp32 runs token-major on CPU, 16-bit neuron-major (function.neuron_major): both layouts."""
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, 0.5, **EXACT, return_indices=True)
    _, idx_sparse = sk.sat_mlp(*operands, 0.5, forward="dense", return_indices=True)
    assert torch.equal(idx, idx_sparse), "the backward mode does not change the selection"
    _, _, dwg, dwu, dwd = assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy, idx,
                                                   **EXACT)
    omitted = _omitted(shape[2], idx)
    assert (dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all()


def test_saves_the_full_pre_activations_only():
    """The backward needs G and U of every neuron: two [I, T] tensors are saved (instead of the kept [k, T] rows),
    and nothing else of that size."""
    T, h, inter = 256, 32, 512
    for dtype in (torch.float32, torch.bfloat16):
        operands, _ = make_operands(T, h, inter, dtype)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            sk.sat_mlp(*operands, 0.75, **EXACT)
        assert saved.count((inter, T)) == 2 and (T, inter) not in saved, saved
        assert (sk.num_kept(inter, 0.75), T) not in saved, saved


def test_without_dx_the_weight_gradients_are_unchanged():
    operands, dy = make_operands(40, 24, 70, torch.float64)
    ref = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy)
    x = operands[0].detach()
    y = sk.sat_mlp(x, *operands[1:], 0.5, **EXACT)
    grads = torch.autograd.grad(y, operands[1:], dy)
    for name, g, r in zip(NAMES[2:], grads, ref[2:]):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)


def test_frozen_weights_get_no_gradient():
    operands, dy = make_operands(20, 16, 30, torch.float64)
    x, wg, wu, wd = operands
    wg.requires_grad_(False)
    wd.requires_grad_(False)
    sk.sat_mlp(x, wg, wu, wd, 0.5, **EXACT).backward(dy)
    assert wg.grad is None and wd.grad is None and wu.grad is not None
    torch.testing.assert_close(x.grad, _dense_grads(operands, dy)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_priority_weights_scale_the_weight_gradients_not_dx(act):
    operands, dy = make_operands(24, 16, 40, torch.float64, seed=1)
    ours = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, strategy="priority", act=act, **EXACT,
                                               generator=torch.Generator().manual_seed(7)), operands, dy)
    _, idx = sk.sat_mlp(*operands, 0.5, strategy="priority", act=act, generator=torch.Generator().manual_seed(7),
                        return_indices=True)
    weights = priority_weights(sk.neuron_scores(*operands, act=act),
                               torch.rand(40, generator=torch.Generator().manual_seed(7)), idx)
    assert (weights > 1).any(), "some kept neurons are sampled below the threshold"
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, act=act, weights=weights, **EXACT),
                        fp64_copies(operands), dy)
    for name, o, r in zip(NAMES, ours, ref):
        assert rel_rms(o, r) < 1e-12, name
    dense = _dense_grads(operands, dy, act)
    torch.testing.assert_close(ours[1], dense[1], rtol=1e-12, atol=1e-12, msg="dx is the dense one")
    torch.testing.assert_close(ours[2][idx], dense[2][idx] * weights.double()[:, None], rtol=1e-12, atol=1e-12)


def test_leading_dims_autocast_rate_zero_and_empty_batches():
    operands, dy = make_operands(None, 24, 50, torch.float64, lead=(3, 7))
    ours = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy)
    torch.testing.assert_close(ours[1], _dense_grads(operands, dy)[1], rtol=1e-12, atol=1e-12)
    assert ours[0].shape == (3, 7, 24)
    operands, _ = make_operands(31, 24, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sk.sat_mlp(*operands, 0.5, **EXACT)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in operands)
    operands, dy = make_operands(9, 8, 20, torch.float64)
    torch.testing.assert_close(sk.sat_mlp(*operands, 0.0, **EXACT), reference_mlp(*operands))
    for lead in ((0,), (2, 0)):
        operands, dy = make_operands(None, 16, 30, torch.float32, lead=lead)
        y, *grads = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy)
        assert y.shape == lead + (16,)
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, operands)), lead


def test_auto_and_torch_backends_agree():
    operands, dy = make_operands(33, 16, 45, torch.float32)
    auto = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, backend="auto", **EXACT), operands, dy)
    torch_ = out_and_grads(lambda *o: sat_mlp_kept(*o, sk.num_kept(45, 0.5), backend="torch", **EXACT), operands, dy)
    for name, a, t in zip(NAMES, auto, torch_):
        assert torch.equal(a, t), name


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_op_equals_eager(fresh_dynamo):
    operands, dy = make_operands(40, 24, 70, torch.float32)
    fn = torch.compile(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), backend="aot_eager", fullgraph=True)
    compiled = out_and_grads(fn, operands, dy)
    eager = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, **EXACT), operands, dy)
    for name, c, e in zip(NAMES, compiled, eager):
        torch.testing.assert_close(c, e, msg=name)


def test_compiled_model_equals_eager(fresh_dynamo):
    model = sk.replace_mlp(tiny_model("llama"), 0.5, backward="exact_input")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step, rate in enumerate([0.5, 0.25]):
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
        sk.set_omission_rate(model, rate)
        sk.set_omission_rate(eager, rate)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        eager_loss = eager(input_ids=ids, labels=ids).loss
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
            p.grad = q.grad = None


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_replace_mlp_gives_the_dense_gradient_to_everything_but_omitted_mlp_weights():
    """With every MLP exact in its input gradient, every activation gradient of the model is the dense one: the
    attention, norm and embedding gradients equal the dense model's, and each MLP weight's rows (W_gate, W_up) or
    columns (W_down) are the dense ones where kept and zero where omitted. The sparse backward changes them all."""
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    dense = tiny_model("llama").double().train()
    model = sk.replace_mlp(copy.deepcopy(dense), 0.5, backward="exact_input")
    mlps = [m for _, m in sk.sat_modules(model, "mlp")]
    assert all(m.backward_mode == "exact_input" and "backward='exact_input'" in repr(m) for m in mlps)
    dense_loss, dense_grads = _loss_and_grads(dense, ids)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-12, atol=0)
    k = sk.num_kept(136, 0.5)
    for name, g in grads.items():
        d = dense_grads[name]
        if ".mlp." not in name:
            torch.testing.assert_close(g, d, rtol=1e-9, atol=1e-12, msg=name)
            continue
        rows, dense_rows = (g.t(), d.t()) if "down_proj" in name else (g, d)
        kept = rows.abs().sum(1) > 0
        assert int(kept.sum()) == k, name
        torch.testing.assert_close(rows[kept], dense_rows[kept], rtol=1e-9, atol=1e-12, msg=name)
    sk.replace_mlp(model, 0.5)   # again: the default backward="sparse"
    assert all(m.backward_mode == "sparse" for m in mlps)
    model.zero_grad()
    _, sparse_grads = _loss_and_grads(model, ids)
    assert rel_rms(sparse_grads["model.embed_tokens.weight"], dense_grads["model.embed_tokens.weight"]) > 1e-3


# refusals


def _ops(T=8, h=8, inter=16):
    return make_operands(T, h, inter, torch.float32)[0]


def test_sparse_forward_is_refused():
    match = r"backward='exact_input' needs forward='dense', got forward='sparse'"
    with pytest.raises(ValueError, match=match):
        sk.sat_mlp(*_ops(), 0.5, backward="exact_input")
    with pytest.raises(ValueError, match=match):
        sat_mlp_kept(*_ops(), 8, forward="sparse", backward="exact_input")
    with pytest.raises(ValueError, match=match):
        sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse", backward="exact_input")
    with pytest.raises(ValueError, match=match):
        sk.SATMLP(tiny_model("llama").model.layers[0].mlp, "silu", forward="sparse", backward="exact_input")


def test_unknown_backward_is_refused():
    with pytest.raises(ValueError, match=r"backward must be one of \['sparse', 'exact_input', 'dense_tokens'\], got "
                                         r"'exact'"):
        sk.sat_mlp(*_ops(), 0.5, forward="dense", backward="exact")
    with pytest.raises(ValueError, match="backward must be one of"):
        sk.replace_mlp(tiny_model("llama"), 0.5, backward="dense")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_other_backends_are_refused(backend):
    match = f"backward='exact_input' is implemented by the torch backend only, got backend='{backend}'"
    with pytest.raises(ValueError, match=match):
        sk.sat_mlp(*_ops(), 0.5, backend=backend, **EXACT)
    with pytest.raises(ValueError, match=match):
        sk.replace_mlp(tiny_model("llama"), 0.5, backend=backend, backward="exact_input")


def test_gathered_mlp_is_refused():
    with pytest.raises(ValueError, match=r"gathered_mlp: backward='exact_input' needs the exact forward over every "
                                         r"neuron"):
        sk.gathered_mlp(*_ops(), torch.tensor([1, 5]), backward="exact_input")
    with pytest.raises(ValueError, match="backward must be one of"):
        sk.gathered_mlp(*_ops(), torch.tensor([1, 5]), backward="dense")


def test_lora_mlp_is_refused():
    x, wg, wu, wd = _ops()
    adapters = (LoRA(torch.randn(2, 8), torch.randn(16, 2), 2.0), None, None)
    with pytest.raises(ValueError, match=r"sat_lora_mlp: backward='exact_input' is not supported on LoRA MLPs"):
        sat_lora_mlp(x, wg, wu, wd, adapters, 8, **EXACT)


def test_peft_lora_projections_are_refused():
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"])
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    lora_model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**config))
    match = r"replace_mlp: backward='exact_input' is not supported on MLPs with PEFT adapters"
    with pytest.raises(ValueError, match=match):
        sk.replace_mlp(lora_model, 0.5, backward="exact_input")
    sk.replace_mlp(lora_model, 0.5)
    with pytest.raises(ValueError, match=match):                     # a patched model's settings
        sk.replace_mlp(lora_model, 0.5, backward="exact_input")
    patched_first = peft.get_peft_model(sk.replace_mlp(tiny_model("llama"), 0.5, backward="exact_input"),
                                        peft.LoraConfig(**config))
    with pytest.raises(ValueError, match=r"SATMLP: backward='exact_input' is not supported with PEFT LoRA adapters "
                                         r"\(on gate_proj, up_proj\)"):
        patched_first(input_ids=ids, labels=ids).loss.backward()


# the training CLI


def test_cli_backward_option():
    assert parse_train_cli([]).backward == "sparse"
    cfg = parse_train_cli(["--backward", "exact_input"])
    assert cfg.backward == "exact_input" and cfg.forward == "dense"


@pytest.mark.parametrize("argv, message", [
    (["--backward", "exact"], "invalid choice: 'exact'"),
    (["--backward", "exact_input", "--forward", "sparse"], "--backward exact_input needs --forward dense"),
    (["--backward", "exact_input", "--lora-rank", "4"], "--backward exact_input is not supported with --lora-rank"),
])
def test_cli_refusals(argv, message, capsys):
    assert_cli_refused(argv, message, capsys)
