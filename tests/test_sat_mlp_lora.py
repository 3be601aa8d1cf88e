"""The SAT MLP with LoRA adapters (torch backend) against the fp64 masked-dense reference with adapters."""
import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.reference import _lora_linear, reference_lora_mlp
from sat_kernels.ops.mlp.lora import LoRA, sat_lora_mlp
from sat_kernels.selection import activation_scores, select_neurons

from helpers import rel_rms

SHAPES = [(37, 23, 61), (64, 48, 136)]
TARGETS = {"all": ("gate", "up", "down"), "gate": ("gate",), "down": ("down",), "up-down": ("up", "down")}


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _operands(T, h, inter, dtype, targets=TARGETS["all"], r=5, adapter_dtype=None, base_grad=False, seed=0):
    """x, the base weights and the adapters' A/B (``None`` where a projection has none), all leaf tensors."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = rand(T, h, scale=1.0).to(dtype).requires_grad_()
    base = [rand(inter, h, scale=h ** -0.5), rand(inter, h, scale=h ** -0.5), rand(h, inter, scale=inter ** -0.5)]
    base = [w.to(dtype).requires_grad_(base_grad) for w in base]
    fans = {"gate": (h, inter), "up": (h, inter), "down": (inter, h)}
    ab = []
    for name, (fan_in, fan_out) in fans.items():
        pair = [rand(r, fan_in, scale=fan_in ** -0.5), rand(fan_out, r, scale=0.5)]
        ab += [t.to(adapter_dtype or dtype).requires_grad_() if name in targets else None for t in pair]
    return x, base, ab


def _adapters(ab, scalings=(2.0, 0.75, 1.5)):
    return tuple(None if ab[2 * i] is None else LoRA(ab[2 * i], ab[2 * i + 1], s) for i, s in enumerate(scalings))


def _outputs(fn, x, base, ab, dy):
    leaves = [t for t in [x, *base, *ab] if t is not None and t.requires_grad]
    y = fn(x, base, ab)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _fp64(ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def _check(x, base, ab, rate, forward="sparse", metric="l2"):
    """Output and every gradient against the fp64 reference at the kept set, within 2x plain PyTorch's error."""
    k = sk.num_kept(base[0].shape[0], rate)
    _, idx = sat_lora_mlp(x, *base, _adapters(ab), k, metric=metric, forward=forward, return_indices=True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x.dtype)

    def ours(x_, base_, ab_):
        return sat_lora_mlp(x_, *base_, _adapters(ab_), k, metric=metric, forward=forward)

    def ref(x_, base_, ab_):
        return reference_lora_mlp(x_, *base_, _adapters(ab_), idx, forward=forward)

    got = _outputs(ours, x, base, ab, dy)
    want = _outputs(ref, _fp64([x])[0], _fp64(base), _fp64(ab), dy.double())
    plain = _outputs(ref, x, base, ab, dy)
    eps = torch.finfo(x.dtype).eps
    for i, (o, r, p) in enumerate(zip(got, want, plain)):
        assert not torch.isnan(o).any(), f"output {i} has NaN"
        err, err_plain = rel_rms(o, r), rel_rms(p, r)
        assert err <= 2 * err_plain + 8 * eps, f"output {i}: rel-RMS error {err:.3e} > 2 x plain {err_plain:.3e}"
    return idx, got


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-h{}-I{}".format(*s))
def test_matches_reference_and_omitted_neurons_get_zero(shape, dtype, forward, target):
    x, base, ab = _operands(*shape, dtype, TARGETS[target])
    idx, grads = _check(x, base, ab, 0.5, forward)
    assert idx.numel() == sk.num_kept(shape[2], 0.5)
    assert all(w.grad is None for w in base), "the frozen base gets no gradient"
    named = dict(zip([n for n, t in zip(("a_g", "b_g", "a_u", "b_u", "a_d", "b_d"), ab) if t is not None],
                     grads[2:]))
    omitted = torch.ones(shape[2], dtype=torch.bool)
    omitted[idx] = False
    for name in ("b_g", "b_u"):
        if name in named:
            assert (named[name][omitted] == 0).all() and (named[name][idx].abs().sum(1) > 0).all(), name
    if "a_d" in named:
        assert (named["a_d"][:, omitted] == 0).all() and (named["a_d"][:, idx].abs().sum(0) > 0).all()


def test_bf16_base_with_fp32_adapters_as_peft_keeps_them():
    x, base, ab = _operands(64, 48, 136, torch.bfloat16, adapter_dtype=torch.float32)
    y = sat_lora_mlp(x, *base, _adapters(ab), 68)
    assert y.dtype == torch.bfloat16
    _, grads = _check(x, base, ab, 0.5)
    assert [g.dtype for g in grads[2:]] == [torch.float32] * 6


@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_a_trainable_base_gets_the_sat_gradient(forward):
    x, base, ab = _operands(37, 23, 61, torch.float64, base_grad=True)
    idx, grads = _check(x, base, ab, 0.5, forward)
    omitted = torch.ones(61, dtype=torch.bool)
    omitted[idx] = False
    dwg, dwu, dwd = grads[2:5]
    assert (dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all()


@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
def test_selection_is_the_topk_of_the_adapted_activations(metric):
    x, base, ab = _operands(64, 48, 136, torch.float64)
    adapters = _adapters(ab)
    _, idx = sat_lora_mlp(x, *base, adapters, 68, metric=metric, return_indices=True)
    with torch.no_grad():
        g, u = (_lora_linear(x, w, t) for w, t in zip(base[:2], adapters[:2]))
        a = torch.nn.functional.silu(g) * u
        down = adapters[2]
        w_eff = base[2] + down.b @ down.a * down.scaling
        want = select_neurons(activation_scores(a, metric, w_eff), sk.num_kept(136, 0.5))
    assert torch.equal(idx, want)
    _check(x, base, ab, 0.5, metric=metric)


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    x, base, ab = _operands(64, 48, 136, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx = sat_lora_mlp(x, *base, _adapters(ab), 68, return_indices=True)
    assert y.dtype == torch.bfloat16
    ref = reference_lora_mlp(*_fp64([x])[:1], *_fp64(base), _adapters(_fp64(ab)), idx)
    assert rel_rms(y, ref) < 2e-2


def test_bad_adapters():
    x, base, ab = _operands(8, 16, 24, torch.float32)
    bad = list(ab)
    bad[1] = torch.randn(24, 4)
    with pytest.raises(ValueError, match=r"the gate adapter must have A \[r, 16\] and B \[24, r\]"):
        sat_lora_mlp(x, *base, _adapters(bad), 12)
    bad = list(ab)
    bad[5] = bad[5].detach().double()
    with pytest.raises(TypeError, match="the down adapter's A and B must share one float dtype"):
        sat_lora_mlp(x, *base, _adapters(bad), 12)
    for k in (0, 25, 0.5):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 24\]"):
            sat_lora_mlp(x, *base, _adapters(ab), k)


def test_stats_of_the_selection():
    x, base, ab = _operands(64, 48, 136, torch.float64)
    stats = {}
    sat_lora_mlp(x, *base, _adapters(ab), 68, stats=stats)
    assert stats["kept"] == 68 and 0.5 < float(stats["kept_mass"]) < 1 and int(stats["nonfinite"]) == 0
