"""SAT attention-head omission: the op against the fp64 masked-dense reference, and the model integration."""
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sat_kernels as sk
from sat_kernels.ops.attention import core as attention_core
from sat_kernels.ops.reference import reference_attention, reference_head_indices, reference_head_outputs

from helpers import rel_rms, tiny_model

WEIGHTS = ("x", "w_q", "w_k", "w_v", "w_o")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _rope_tables(T, d, dtype, batch=1, offset=0):
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([torch.outer(pos, inv)] * 2, -1)
    return emb.cos()[None].expand(batch, T, d).to(dtype), emb.sin()[None].expand(batch, T, d).to(dtype)


def make_attention_operands(B, T, h, H, G, d, dtype, *, bias=False, norm=False, rope=True, mask=None, seed=0):
    """Leaf tensors (x, weights, biases, norm weights) requiring grad, the constant layout kwargs and an upstream
    gradient."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    t = dict(x=r(B, T, h), w_q=r(H * d, h, scale=h ** -0.5), w_k=r(G * d, h, scale=h ** -0.5),
             w_v=r(G * d, h, scale=h ** -0.5), w_o=r(h, H * d, scale=(H * d) ** -0.5))
    if bias:
        t.update(b_q=r(H * d, scale=0.3), b_k=r(G * d, scale=0.3), b_v=r(G * d, scale=0.3), b_o=r(h, scale=0.3))
    if norm:
        t.update(q_norm_weight=1 + 0.2 * r(d), k_norm_weight=1 + 0.2 * r(d))
    const = dict(num_heads=H, num_kv_heads=G)
    if rope:
        const["cos"], const["sin"] = _rope_tables(T, d, dtype, batch=B if seed % 2 else 1)
    if mask is not None:
        const["attention_mask"] = mask
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}, const, r(B, T, h).to(dtype)


def _out_and_grads(fn, tensors, dy):
    y = fn(**tensors)
    return [y.detach(), *torch.autograd.grad(y, list(tensors.values()), dy)]


def _strict_ulps(dtype):
    """Headroom of the strict comparisons: none, except in fp64, where the plain reference is the reference."""
    return 8 if dtype == torch.float64 else 0


def _ref(heads, const):
    return lambda **t: reference_attention(heads=heads, **t, **const)


def assert_attention_matches_reference(fn, tensors, const, dy, heads, ulps=8, dense_output=False):
    """``fn`` (y and the gradient of every tensor) against the fp64 masked-dense reference, within 2x the error of
    the plain reference at the operands' dtype (flash-attention's rule) plus ``ulps`` machine epsilons.
    ``dense_output``: ``y`` against the reference with every head (the exact-forward mode), the gradients still at
    ``heads``."""
    ours = _out_and_grads(fn, tensors, dy)
    fp64 = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    const64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in const.items()}
    ref = _out_and_grads(_ref(heads, const64), fp64, dy.double())
    plain = _out_and_grads(_ref(heads, const), {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}, dy)
    if dense_output:
        ref[0] = _ref(None, const64)(**fp64).detach()
        plain[0] = _ref(None, const)(**{k: v.detach() for k, v in tensors.items()})
    eps = torch.finfo(dy.dtype).eps
    for name, o, r, p in zip(["y", *tensors], ours, ref, plain):
        assert o.shape == r.shape and o.dtype == dy.dtype, name
        assert not torch.isnan(o).any(), f"{name} has NaN"
        err, err_plain = rel_rms(o, r), rel_rms(p, r)
        assert err <= 2 * err_plain + ulps * eps, f"{name}: rel-RMS error {err:.3e} > 2 x plain PyTorch {err_plain:.3e}"
    return dict(zip(["y", *tensors], ours))


def _padding_mask(B, T, pad):
    """Boolean [B, 1, T, T] mask: the last ``pad`` keys of batch row 0 are padding (every query keeps a key)."""
    m = torch.ones(B, 1, T, T, dtype=torch.bool)
    m[0, :, :, T - pad:] = False
    return m


# layouts: (B, T, h, H, G, d)
LAYOUTS = {"MHA": (2, 13, 40, 4, 4, 8), "GQA": (2, 97, 36, 6, 2, 6), "MQA": (1, 63, 24, 3, 1, 8)}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal+padding"])
@pytest.mark.parametrize("layout", list(LAYOUTS),
                         ids=lambda k: "{}-B{}-T{}-h{}-H{}-G{}-d{}".format(k, *LAYOUTS[k]))
def test_gathered_attention_matches_reference(layout, masked, dtype):
    B, T, h, H, G, d = LAYOUTS[layout]
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, dtype, bias=layout == "GQA",
                                                 norm=layout != "MHA", mask=_padding_mask(B, T, 5) if masked else None)
    heads = torch.tensor([0, H - 1]) if H > 2 else torch.tensor([1])
    ours = assert_attention_matches_reference(lambda **t: sk.gathered_attention(heads=heads, **t, **const),
                                              tensors, const, dy, heads)
    d_rows = torch.ones(H, dtype=torch.bool)
    d_rows[heads] = False
    assert (ours["w_q"].view(H, d, h)[d_rows] == 0).all() and (ours["w_o"].view(h, H, d)[:, d_rows] == 0).all()
    assert (ours["w_q"].view(H, d, h)[heads].abs().sum((1, 2)) > 0).all()


@pytest.mark.parametrize("core", ["flash", "math"])
@pytest.mark.parametrize("unit", ["head", "group"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
def test_sat_attention_matches_reference(dtype, unit, core, monkeypatch):
    """In-step selection + both attention cores (fused CPU kernel and explicit softmax) against the reference."""
    monkeypatch.setattr(attention_core, "core_kind", lambda *args: core)
    B, T, h, H, G, d = 3, 37, 48, 8, 4, 6
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, dtype, bias=True, norm=True, seed=1,
                                                 mask=_padding_mask(B, T, 4))
    _, heads = sk.sat_attention(**tensors, omission_rate=0.5, unit=unit, return_indices=True, **const)
    assert heads.dtype == torch.int64 and torch.equal(heads, torch.unique(heads))
    assert heads.numel() == (sk.num_kept(H, 0.5) if unit == "head" else sk.num_kept(G, 0.5) * H // G)
    if unit == "group":
        assert torch.equal(heads.view(-1, H // G) % (H // G), torch.arange(H // G).expand(heads.numel() // 2, -1))
    assert_attention_matches_reference(lambda **t: sk.sat_attention(**t, omission_rate=0.5, unit=unit, **const),
                                       tensors, const, dy, heads)


@pytest.mark.parametrize("core", ["flash", "math"])
@pytest.mark.parametrize("unit", ["head", "group"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_dense_forward_output_is_dense_gradients_are_sparse(dtype, unit, core, monkeypatch):
    """``forward="dense"``: ``y`` is the dense attention (``o_proj`` over every head) and every gradient is the sparse
    mode's at the same kept heads, bitwise (the same backward from the same saved tensors), i.e. the masked-dense
    reference's; the saved tensors are the sparse mode's."""
    monkeypatch.setattr(attention_core, "core_kind", lambda *args: core)
    B, T, h, H, G, d = 3, 37, 48, 8, 4, 6
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, dtype, bias=True, norm=True, seed=1,
                                                 mask=_padding_mask(B, T, 4))
    runs = {}
    for forward in ("sparse", "dense"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.shape, t.dtype)) or t, lambda t: t):
            y, heads = sk.sat_attention(**tensors, omission_rate=0.5, unit=unit, forward=forward,
                                        return_indices=True, **const)
        runs[forward] = (heads, saved, torch.autograd.grad(y, list(tensors.values()), dy))
    (heads, saved, sparse_grads), (dense_heads, dense_saved, dense_grads) = runs["sparse"], runs["dense"]
    assert torch.equal(dense_heads, heads) and dense_saved == saved
    for name, a, b in zip(tensors, dense_grads, sparse_grads):
        assert torch.equal(a, b), name
    assert_attention_matches_reference(
        lambda **t: sk.sat_attention(**t, omission_rate=0.5, unit=unit, forward="dense", **const),
        tensors, const, dy, heads, dense_output=True)


@pytest.mark.parametrize("unit", ["head", "group"])
@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
def test_selection_is_the_reference_topk_in_fp64(metric, unit):
    B, T, h, H, G, d = 2, 41, 32, 6, 3, 8
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, torch.float64, norm=True, seed=3)
    plain = {k: v.detach() for k, v in tensors.items()}
    _, heads = sk.sat_attention(**plain, omission_rate=0.5, metric=metric, unit=unit, return_indices=True, **const)
    ref_heads = reference_head_indices(*(plain[k] for k in WEIGHTS), 0.5, metric=metric, unit=unit,
                                       q_norm_weight=plain["q_norm_weight"], k_norm_weight=plain["k_norm_weight"],
                                       **const)
    assert torch.equal(heads, ref_heads)
    scores = sk.head_scores(**plain, metric=metric, unit=unit, **const)
    o = reference_head_outputs(*(plain[k] for k in ("x", "w_q", "w_k", "w_v")), q_norm_weight=plain["q_norm_weight"],
                               k_norm_weight=plain["k_norm_weight"], **const)
    per_unit = o.transpose(0, 1).reshape(G if unit == "group" else H, -1)
    w_o = plain["w_o"].view(h, per_unit.shape[0], -1).transpose(0, 1).reshape(per_unit.shape[0], -1)
    want = {"l2": per_unit.norm(dim=1), "l1": per_unit.abs().sum(1),
            "contrib": per_unit.norm(dim=1) * w_o.norm(dim=1)}[metric]
    torch.testing.assert_close(scores, want.float())


@pytest.mark.parametrize("T", [1, 2, 5, 123])
def test_odd_and_tiny_sequences(T):
    tensors, const, dy = make_attention_operands(2, T, 20, 4, 2, 4, torch.float64, norm=True, seed=T)
    _, heads = sk.sat_attention(**tensors, omission_rate=0.5, return_indices=True, **const)
    assert_attention_matches_reference(lambda **t: sk.sat_attention(**t, omission_rate=0.5, **const),
                                       tensors, const, dy, heads)


def _no_key_mask(kind, padding, T, causal_in_mask=True):
    """``[1, 1, T, T]`` mask, causal unless ``causal_in_mask`` is False, with two padding keys: ``"left"`` (the first
    two query rows have no allowed key), ``"right"`` (every row keeps one) or ``"all"`` (no row has one)."""
    allowed = torch.ones(1, 1, T, T, dtype=torch.bool)
    if causal_in_mask:
        allowed = allowed.tril()
    allowed[..., {"left": slice(0, 2), "right": slice(T - 2, T), "all": slice(0, T)}[padding]] = False
    if kind == "bool":
        return allowed
    fill = torch.finfo(torch.float32).min if kind == "additive-min" else float("-inf")
    return torch.zeros(1, 1, T, T).masked_fill(~allowed, fill)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("core", ["flash", "math", "causal-arg"])
@pytest.mark.parametrize("padding", ["left", "right", "all"])
@pytest.mark.parametrize("mask_kind", ["additive-min", "additive-inf", "bool"])
def test_rows_without_an_allowed_key(mask_kind, padding, core, dtype, monkeypatch):
    """Query rows without an allowed key (left padding): with eager attention's finfo.min mask they weigh every key
    equally and get autograd's gradient of that (the fused backward had rebuilt their probabilities as 1 each, up to
    T times too large); with -inf or boolean masks they output 0. Output and every gradient against the fp64
    reference at the kept heads, on both attention cores, and with ``causal=True`` on top of a padding-only mask."""
    B, T, h, H, G, d = 1, 6, 64, 4, 2, 16
    causal = core == "causal-arg"
    if not causal:
        monkeypatch.setattr(attention_core, "core_kind", lambda *args: core)
    mask = _no_key_mask(mask_kind, padding, T, causal_in_mask=not causal)
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, dtype, mask=mask)
    const["causal"] = causal
    _, heads = sk.sat_attention(**tensors, omission_rate=0.5, return_indices=True, **const)
    assert_attention_matches_reference(lambda **t: sk.sat_attention(**t, omission_rate=0.5, **const),
                                       tensors, const, dy, heads, ulps=_strict_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("padding", ["left", "all"])
@pytest.mark.parametrize("mask_kind", ["additive-min", "additive-inf", "bool"])
def test_rows_without_an_allowed_key_dense_path(mask_kind, padding, dtype):
    """Omission rate 0 runs the dense autograd path; there, too, rows without an allowed key follow eager attention
    (``F.scaled_dot_product_attention``'s fused CPU backward has the same log-sum-exp rounding with finfo.min masks)."""
    tensors, const, dy = make_attention_operands(1, 6, 64, 4, 2, 16, dtype, mask=_no_key_mask(mask_kind, padding, 6))
    const["causal"] = False
    assert_attention_matches_reference(lambda **t: sk.sat_attention(**t, omission_rate=0.0, **const),
                                       tensors, const, dy, None, ulps=_strict_ulps(dtype))


def check_zero_length_inputs():
    """Every attention entry point on an empty batch ``[0, 16, h]`` and an empty sequence ``[2, 0, h]``: the empty
    output, exact zero gradients of every tensor, valid kept heads, zero scores. Runs in a child process (see
    :func:`test_zero_length_inputs`)."""
    import torch.utils.deterministic as det

    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True           # as conftest.py: an unwritten output element reads NaN
    H, G = 4, 2
    for (B, T), dtype, core, mask_kind in itertools.product([(0, 16), (2, 0)], [torch.float32, torch.bfloat16],
                                                            ["flash", "math"], [None, "bool", "additive-min"]):
        attention_core.core_kind = lambda *args, core=core: core
        mask = None if mask_kind is None else _no_key_mask(mask_kind, "left", T).expand(max(B, 1), 1, T, T)
        tensors, const, _ = make_attention_operands(B, T, 64, H, G, 16, dtype, bias=True, norm=True, mask=mask)
        const["causal"] = mask is None
        calls = {"sat": lambda **t: sk.sat_attention(**t, omission_rate=0.5, **const),
                 "sat-group": lambda **t: sk.sat_attention(**t, omission_rate=0.5, unit="group", **const),
                 "dense": lambda **t: sk.sat_attention(**t, omission_rate=0.0, **const),
                 "gathered": lambda **t: sk.gathered_attention(heads=torch.tensor([0, 3]), **t, **const)}
        for name, fn in calls.items():
            where = f"{name} B{B} T{T} {dtype} {core} mask={mask_kind}"
            y = fn(**tensors)
            assert y.shape == (B, T, 64) and y.dtype == dtype, where
            grads = torch.autograd.grad(y, list(tensors.values()), torch.ones_like(y))
            for (n, t), g in zip(tensors.items(), grads):
                assert g.shape == t.shape and g.dtype == dtype and not g.any(), f"{where}: d{n}"
        plain = {k: v.detach() for k, v in tensors.items()}
        _, heads = sk.sat_attention(**plain, omission_rate=0.5, return_indices=True, **const)
        assert heads.numel() == sk.num_kept(H, 0.5) and torch.equal(heads, torch.unique(heads))
        scores = sk.head_scores(**plain, **const)
        assert scores.shape == (H,) and not scores.any()


def test_zero_length_inputs():
    """Zero-length batch or sequence: empty outputs and zero gradients on both attention cores. In a child process:
    the fused CPU flash-attention kernel kills the process with SIGFPE at T = 0 (torch 2.13), which an in-process
    test could not report."""
    proc = subprocess.run([sys.executable, "-c", "import test_attention; test_attention.check_zero_length_inputs()"],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"


def test_rate_zero_and_tiny_rates_are_dense_autograd():
    tensors, const, dy = make_attention_operands(2, 9, 16, 4, 2, 4, torch.float64)
    for rate in (0.0, 0.1):                  # num_kept(4, 0.1) = 4
        y, heads = sk.sat_attention(**tensors, omission_rate=rate, return_indices=True, **const)
        assert torch.equal(heads, torch.arange(4)) and "SATAttention" not in type(y.grad_fn).__name__
        assert_attention_matches_reference(lambda **t: sk.sat_attention(**t, omission_rate=rate, **const),
                                           tensors, const, dy, None)


def test_group_unit_omits_whole_kv_groups():
    B, T, h, H, G, d = 2, 17, 24, 6, 3, 4
    tensors, const, dy = make_attention_operands(B, T, h, H, G, d, torch.float64, bias=True, norm=True)
    y, heads = sk.sat_attention(**tensors, omission_rate=0.6, unit="group", return_indices=True, **const)
    y.backward(dy)
    kept_groups = torch.unique(heads // 2)
    assert kept_groups.numel() == sk.num_kept(G, 0.6) == 1
    omitted = torch.ones(G, dtype=torch.bool)
    omitted[kept_groups] = False
    for name in ("w_k", "w_v"):
        g = tensors[name].grad.view(G, d, h)
        assert (g[omitted] == 0).all() and (g[~omitted].abs().sum((1, 2)) > 0).all(), name
    for name in ("b_k", "b_v"):
        assert (tensors[name].grad.view(G, d)[omitted] == 0).all()


def test_only_kept_heads_are_saved():
    """The autograd graph holds x, the weights and kept-head tensors: never a tensor over all query heads."""
    B, T, h, H, G, d = 2, 64, 24, 8, 8, 4
    tensors, const, _ = make_attention_operands(B, T, h, H, G, d, torch.float32, norm=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sk.sat_attention(**tensors, omission_rate=0.75, **const)
    k = sk.num_kept(H, 0.75)
    assert not [s for s in saved if (H in s and T in s) or s == (B * T, H * d)], saved
    assert (B, T, k, d) in saved and (B, k, T) in saved, saved


def test_frozen_weights_and_x_without_grad():
    tensors, const, dy = make_attention_operands(2, 10, 16, 4, 2, 4, torch.float64, bias=True)
    tensors["w_k"].requires_grad_(False)
    tensors["b_o"].requires_grad_(False)
    x = tensors.pop("x").detach()
    sk.sat_attention(x, **tensors, omission_rate=0.5, **const).backward(dy)
    assert tensors["w_k"].grad is None and tensors["b_o"].grad is None
    assert all(tensors[n].grad is not None for n in ("w_q", "w_v", "w_o", "b_q", "b_k", "b_v"))


def test_generator_and_strategies():
    tensors, const, dy = make_attention_operands(2, 21, 32, 8, 4, 4, torch.float64)
    plain = {k: v.detach() for k, v in tensors.items()}

    def pick(strategy, seed):
        return sk.sat_attention(**plain, omission_rate=0.5, strategy=strategy,
                                generator=torch.Generator().manual_seed(seed), return_indices=True, **const)[1]

    for strategy in ("sample", "random"):
        assert torch.equal(pick(strategy, 7), pick(strategy, 7))
        assert any(not torch.equal(pick(strategy, 7), pick(strategy, s)) for s in range(8, 14))
        torch.manual_seed(3)
        _, heads = sk.sat_attention(**tensors, omission_rate=0.5, strategy=strategy, return_indices=True, **const)
        torch.manual_seed(3)
        assert_attention_matches_reference(
            lambda **t: sk.sat_attention(**t, omission_rate=0.5, strategy=strategy, **const), tensors, const, dy, heads)


def test_autocast_follows_f_linear():
    tensors, const, _ = make_attention_operands(2, 15, 24, 4, 2, 6, torch.float32, norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, heads = sk.sat_attention(**tensors, omission_rate=0.5, return_indices=True, **const)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in tensors.values())
    ref = reference_attention(heads=heads, **{k: v.detach() for k, v in tensors.items()}, **const)
    assert rel_rms(y, ref) < 2e-2



def _sync_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    tensors, const, _ = make_attention_operands(4, 19, 24, 6, 3, 4, torch.float64, seed=4)
    local = {k: (v.detach()[2 * rank:2 * rank + 2] if k == "x" else v.detach()) for k, v in tensors.items()}
    picks = [sk.sat_attention(**local, omission_rate=0.5, unit=unit, strategy=strategy, return_indices=True,
                              sync_selection=sync, **const)[1]
             for unit, strategy, sync in (("head", "topk", None), ("group", "topk", True), ("head", "sample", True),
                                          ("head", "topk", False))]
    torch.save(picks, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_synchronized_selection_uses_the_global_batch(tmp_path):
    """Two gloo ranks with half of the batch each keep the heads of the whole batch (and the same sampled set)."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tensors, const, _ = make_attention_operands(4, 19, 24, 6, 3, 4, torch.float64, seed=4)
    plain = {k: v.detach() for k, v in tensors.items()}
    for i, unit in enumerate(("head", "group")):
        want = sk.sat_attention(**plain, omission_rate=0.5, unit=unit, return_indices=True, **const)[1]
        assert torch.equal(ranks[0][i], want) and torch.equal(ranks[1][i], want), unit
    assert torch.equal(ranks[0][2], ranks[1][2]), "sampling: rank 0's noise is shared"
    local = [sk.sat_attention(**{**plain, "x": plain["x"][2 * r:2 * r + 2]}, omission_rate=0.5, return_indices=True,
                              **const)[1] for r in range(2)]
    assert torch.equal(ranks[0][3], local[0]) and torch.equal(ranks[1][3], local[1]), "sync off: local batch"
    assert not (torch.equal(local[0], ranks[0][0]) and torch.equal(local[1], ranks[0][0])), "data must tell them apart"

# ------------------------------------------------------------------------------------------------ model integration

FAMILIES = [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {}), ("qwen3", {}), ("gemma", {}),
            ("gemma", {"use_bidirectional_attention": True}), ("gemma3", {})]


def _fam_id(p):
    return p[0] + ("-window6" if "sliding_window" in p[1] else "") + ("-bidirectional" if len(p[1]) and
                                                                        "sliding_window" not in p[1] else "")


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _padding(shape=(2, 13), left=False):
    am = torch.ones(shape, dtype=torch.long)
    if left:
        am[1, :3] = 0
    else:
        am[1, -4:] = 0
    return am


def _layout_kwargs(sat: sk.SATAttention):
    kw = dict(num_heads=sat.num_heads, num_kv_heads=sat.num_kv_heads, scale=sat.scale, b_q=sat.q_proj.bias,
              b_k=sat.k_proj.bias, b_v=sat.v_proj.bias, b_o=sat.o_proj.bias, norm_eps=sat.norm_eps)
    if hasattr(sat, "q_norm"):
        q_scale, k_scale = sat.norm_scales()   # Gemma 3: 1 + weight
        kw.update(q_norm_weight=q_scale, k_norm_weight=k_scale)
    return kw


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES, ids=_fam_id)
def test_patched_model_eval_exact_training_matches_reference(family, impl):
    name, overrides = family
    model = tiny_model(name, attn_implementation=impl, **overrides).double().eval()
    ids, am = _ids(), _padding()
    with torch.no_grad():
        dense = model(ids, attention_mask=am).logits
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    originals = [layer.self_attn for layer in model.model.layers]

    # scores over every token, as the reference's (the default covers real tokens only: tests/test_token_mask.py)
    assert sk.replace_attention(model, 0.5, forward="sparse", score_tokens="all") is model
    assert all(isinstance(layer.self_attn, sk.SATAttention) for layer in model.model.layers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=am).logits, dense), "eval() must be exactly the dense model"

    # training, with and without padding (sdpa: a boolean mask, or None and is_causal): the layer-0 SAT attention
    # equals the reference with the reference's top-k heads on the very inputs (mask, RoPE tables) the model passed,
    # and the reference with all heads equals the original module
    model.train()
    sat = model.model.layers[0].self_attn
    seen = {}
    sat.register_forward_hook(lambda m, a, k, out: seen.update(kwargs=k, out=out[0]), with_kwargs=True)
    for attention_mask in (am, None):
        model.zero_grad()
        model(ids, attention_mask=attention_mask, labels=ids, use_cache=False).loss.backward()
        kw = seen["kwargs"]
        x, mask = kw["hidden_states"].detach(), kw["attention_mask"]
        # mistral and gemma3's layer 0: a sliding window of 6 < 13 tokens needs a mask
        assert (mask is None) == (impl == "sdpa" and attention_mask is None and name not in ("mistral", "gemma3"))
        causal = impl == "sdpa" and mask is None and originals[0].is_causal
        cos, sin = kw["position_embeddings"]
        layout = {**_layout_kwargs(sat), "cos": cos, "sin": sin, "attention_mask": mask, "causal": causal}
        weights = [x] + [getattr(sat, p).weight for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        b_o = layout.pop("b_o")
        with torch.no_grad():
            full = reference_attention(*weights, b_o=b_o, **layout)
            dense_out, _ = originals[0](**kw)
            # fp32-level tolerance: Hugging Face's eager softmax and Qwen3's q/k RMSNorm run in fp32 even for fp64
            torch.testing.assert_close(full, dense_out, rtol=1e-6, atol=1e-7)
            heads = reference_head_indices(*weights, 0.5, **layout)
            torch.testing.assert_close(seen["out"], reference_attention(*weights, heads, b_o=b_o, **layout),
                                       rtol=1e-10, atol=1e-10)
        d = sat.head_dim
        kept_rows = sat.q_proj.weight.grad.view(sat.num_heads, d, -1).abs().sum((1, 2)) != 0
        assert torch.equal(kept_rows.nonzero().flatten(), heads)
        assert torch.equal(sat.o_proj.weight.grad.view(-1, sat.num_heads, d).abs().sum((0, 2)) != 0, kept_rows)

    sk.revert(model)
    assert [layer.self_attn for layer in model.model.layers] == originals
    assert all(layer.self_attn.training for layer in model.model.layers)
    assert list(model.state_dict()) == keys
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=am).logits, dense)


def test_patch_before_loading_weights():
    """A model built on the meta device can be patched (q/k norms are not evaluated there), then loaded."""
    import transformers

    from helpers import tiny_config

    source = tiny_model("qwen3")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    sk.replace_attention(model, 0.5)
    assert list(model.state_dict()) == list(source.state_dict())
    model.load_state_dict(source.state_dict(), assign=True)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, sk.SATAttention) and attn.dense_module.k_norm is attn.k_norm
    assert torch.equal(attn.k_norm.weight, source.model.layers[1].self_attn.k_norm.weight)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padding_in_training_is_finite(impl):
    model = sk.replace_attention(tiny_model("llama", attn_implementation=impl), 0.5).train()
    ids, am = _ids(), _padding(left=True)
    labels = ids.masked_fill(am == 0, -100)
    loss = model(ids, attention_mask=am, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


_PARAMETER_NAMES = {"w_q": "q_proj.weight", "w_k": "k_proj.weight", "w_v": "v_proj.weight", "w_o": "o_proj.weight",
                    "b_q": "q_proj.bias", "b_k": "k_proj.bias", "b_v": "v_proj.bias", "b_o": "o_proj.bias",
                    "q_norm_weight": "q_norm.weight", "k_norm_weight": "k_norm.weight"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("left", [True, False], ids=["left-padding", "right-padding"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma", "gemma3"])
def test_patched_model_padding_gradients_match_reference(family, impl, left, dtype):
    """Layer 0 of a tiny patched model on the hidden states, mask and RoPE tables the model passed it (left padding
    leaves query rows without an allowed key: finfo.min rows with eager, all-False rows with sdpa). The original
    module against the fp64 reference with all heads, and the SAT module against it with the kept heads: output and
    every gradient. Gemma 3's norms multiply by ``1 + weight``: the reference takes that multiplier, and the modules
    get ``multiplier - 1`` as their weight (the same gradient)."""
    model = sk.replace_attention(tiny_model(family, attn_implementation=impl).to(dtype), 0.5, forward="sparse").train()
    sat = model.model.layers[0].self_attn
    seen = {}
    sat.register_forward_hook(lambda m, a, k, out: seen.update(kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(_ids(), attention_mask=_padding(left=left), use_cache=False)
    kw = dict(seen["kwargs"])
    x = kw.pop("hidden_states")
    mask = kw["attention_mask"]
    assert (mask.dtype == torch.bool) == (impl == "sdpa")
    no_key = ~mask.any(-1) if impl == "sdpa" else mask.amax(-1) == torch.finfo(dtype).min
    assert no_key.any() == left
    params = dict(sat.named_parameters())
    names = {k: n for k, n in _PARAMETER_NAMES.items() if n in params}
    offset = {k: sat.norm_offset if k.endswith("norm_weight") else 0.0 for k in names}
    tensors = {"x": x.detach().clone().requires_grad_(),
               **{k: (params[n].detach() + offset[k]).requires_grad_() for k, n in names.items()}}
    cos, sin = kw["position_embeddings"]
    const = dict(num_heads=sat.num_heads, num_kv_heads=sat.num_kv_heads, scale=sat.scale, norm_eps=sat.norm_eps,
                 cos=cos, sin=sin, attention_mask=mask, causal=False)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)

    def call(module):
        def fn(x, **t):
            weights = {names[k]: v - offset[k] for k, v in t.items()}
            return torch.func.functional_call(module, weights, args=(), kwargs={**kw, "hidden_states": x})[0]
        return fn

    assert_attention_matches_reference(call(sat.dense_module), tensors, const, dy, None, ulps=0)
    g_q = _out_and_grads(call(sat), tensors, dy)[2]
    heads = (g_q.view(sat.num_heads, -1).abs().sum(1) != 0).nonzero().flatten()
    assert heads.numel() == sk.num_kept(sat.num_heads, 0.5)
    assert_attention_matches_reference(call(sat), tensors, const, dy, heads, ulps=0)


def test_generation_and_cache_are_unchanged():
    model = tiny_model("qwen3").eval()
    prompt = _ids(shape=(2, 5))
    dense = model.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
    patched = model.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(patched, dense)


def _cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]     # transformers 5.24 renamed the field


def test_training_forward_fills_the_cache_like_dense():
    """A training-mode forward (grad mode on: the SAT path) with use_cache fills the cache with all heads'
    keys/values (layer 0 sees the same input as dense; layer 1 the output of a SAT layer, ``forward="sparse"``)."""
    ids = _ids()
    with torch.no_grad():
        dense = _cache(tiny_model("llama").train()(ids, use_cache=True))
    model = sk.replace_attention(tiny_model("llama"), 0.5, forward="sparse").train()
    ours = _cache(model(ids, use_cache=True))
    assert sk.sat_stats(model)["attention"]["summary"]["kept_min"] == 2, "the SAT path ran"
    torch.testing.assert_close(ours.layers[0].keys, dense.layers[0].keys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.layers[0].values, dense.layers[0].values, rtol=1e-6, atol=1e-6)
    assert ours.layers[1].keys.shape == dense.layers[1].keys.shape == (2, 2, 13, 12)
    assert not torch.allclose(ours.layers[1].keys, dense.layers[1].keys), "layer 1 sees a sparse layer 0"
    with pytest.raises(ValueError, match="grad mode on continuing a non-empty KV cache"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(_ids(shape=(2, 1)), past_key_values=ours, use_cache=True)


def test_output_attentions_in_eval_unchanged_and_refused_in_training():
    model = tiny_model("llama", attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids, output_attentions=True).attentions
    sk.replace_attention(model, 0.5)
    with torch.no_grad():
        patched = model(ids, output_attentions=True).attentions
    assert len(patched) == len(dense) == 2 and all(torch.equal(a, b) for a, b in zip(patched, dense))
    model.train()
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)


def test_output_attentions_first_asked_after_patching():
    """Transformers installs its capturing hooks on the first call that asks for attentions: with the model patched
    before that call, the original attention modules still get them (eval), and keep them after revert."""
    model = sk.replace_attention(tiny_model("llama", attn_implementation="eager"), 0.5).eval()
    ids = _ids()
    with torch.no_grad():
        patched = model(ids, output_attentions=True).attentions
        sk.revert(model)
        dense = model(ids, output_attentions=True).attentions
    assert len(patched) == len(dense) == 2 and all(torch.equal(a, b) for a, b in zip(patched, dense))


def test_whole_model_pickling(tmp_path):
    """``torch.save(model)`` of a tiny Llama, patched (MLP and attention) and reverted: the loaded model computes the
    same logits, trains with SAT when patched, and still returns attentions in eval."""
    model = tiny_model("llama", attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    for state in ("patched", "reverted"):
        if state == "patched":
            sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
        else:
            sk.revert(model)
        torch.save(model, tmp_path / f"{state}.pt")
        loaded = torch.load(tmp_path / f"{state}.pt", weights_only=False)
        assert isinstance(loaded.model.layers[0].self_attn, sk.SATAttention) == (state == "patched")
        with torch.no_grad():
            out = loaded(ids, output_attentions=True)
        assert torch.equal(out.logits, dense) and len(out.attentions) == 2, state
        loaded.train()
        loaded(ids, labels=ids).loss.backward()
        grads = [m.q_proj.weight.grad for m in loaded.modules() if isinstance(m, sk.SATAttention)]
        assert len(grads) == (2 if state == "patched" else 0)
        assert all((g.view(4, -1).abs().sum(1) == 0).sum() == 2 for g in grads), "two of four heads omitted"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("strategy,forward", [("topk", "sparse"), ("sample", "sparse"), ("random", "sparse"),
                                              ("topk", "dense"), ("random", "dense")])
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])   # q/k norms: Qwen3's weight, Gemma 3's 1 + weight
def test_gradient_checkpointing_gives_the_same_gradients(family, strategy, forward, reentrant):
    def grads(checkpoint):
        model = sk.replace_attention(tiny_model(family), 0.5, strategy=strategy, forward=forward).train()
        if checkpoint:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids = _ids()
        torch.manual_seed(11)
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma3"])   # Gemma 3: norm offset, sliding-window layer
def test_torch_compile_fullgraph_training(family):
    """``torch.compile(fullgraph=True)`` of a tiny patched model (attention only; tests/test_compile_mlp.py compiles
    replace_mlp) in training mode, forward and backward, across omission-rate changes: no graph break (so no host
    sync in the attention op, its selection statistics included), one compilation per distinct kept-head count
    (4 heads: 0.5 and 0.4 keep 2), the eager gradients and the eager statistics."""
    import torch._dynamo.backends.debugging

    torch._dynamo.reset()
    model = sk.replace_attention(tiny_model(family), 0.5).train()
    graphs = []

    def counting_backend(gm, example_inputs):
        if "q_proj" in gm.code:   # the model's forward (the token masks' pre-hook is a small graph of its own)
            graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    ids = _ids()
    try:
        for step, rate in enumerate((0.5, 0.4, 0.75, 0.0, 0.5)):   # kept heads: 2, 2, 1, 4 (the dense module), 2
            sk.set_omission_rate(model, rate)
            grads, layers = [], []
            for run in (compiled, model):
                model.zero_grad()
                run(ids, labels=ids, use_cache=False).loss.backward()
                grads.append({n: p.grad for n, p in model.named_parameters()})
                layers.append(sk.sat_stats(model)["attention"]["layers"])
            for name in grads[1]:
                torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6,
                                           msg=f"rate {rate}: {name}")
            for name, eager in layers[1].items():
                compiled_layer = layers[0][name]
                assert compiled_layer["kept"] == eager["kept"] == sk.num_kept(4, rate), (rate, name)
                assert compiled_layer["kept_mass"] == pytest.approx(eager["kept_mass"], rel=1e-5), (rate, name)
                assert (compiled_layer["nonfinite"], eager["nonfinite"]) == (0, 0), (rate, name)
                assert eager["nonfinite_total"] == 0 and compiled_layer["units"] == 4, (rate, name)
        assert len(graphs) == 3, f"{len(graphs)} compilations for 3 distinct kept counts"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dense_forward_mode_in_a_model(impl):
    """``replace_attention(forward="dense")``: the training forward gives the dense model's logits (fp32, left
    padding), ``o_proj`` columns of omitted heads still get no gradient, eval is the original module; the setting is
    stored as ``forward_mode`` (``forward`` stays the module's method), shown by ``repr`` and updated by a second
    call."""
    model = tiny_model("llama", attn_implementation=impl).train()
    ids, am = _ids(), _padding(left=True)
    with torch.no_grad():
        dense = model(ids, attention_mask=am).logits
        dense_eval = model.eval()(ids, attention_mask=am).logits
    sk.replace_attention(model, 0.5, forward="dense").train()
    attns = [m for m in model.modules() if isinstance(m, sk.SATAttention)]
    assert all(m.forward_mode == "dense" and callable(m.forward) for m in attns)
    assert "forward='dense'" in repr(attns[0])
    out = model(ids, attention_mask=am, labels=ids)
    torch.testing.assert_close(out.logits, dense)
    out.loss.backward()
    for m in attns:
        kept = m.q_proj.weight.grad.view(m.num_heads, -1).abs().sum(1) != 0
        assert kept.sum() == sk.num_kept(m.num_heads, 0.5)
        assert torch.equal(m.o_proj.weight.grad.view(-1, m.num_heads, m.head_dim).abs().sum((0, 2)) != 0, kept)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, attention_mask=am).logits, dense_eval)
    sk.replace_attention(model, 0.5, forward="sparse")
    assert all(m.forward_mode == "sparse" for m in attns)


def test_set_omission_rate_kinds_and_repatch():
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.5)
    mlps = [m for m in model.modules() if isinstance(m, sk.SATMLP)]
    attns = [m for m in model.modules() if isinstance(m, sk.SATAttention)]
    sk.set_omission_rate(model, 0.25)
    assert all(m.omission_rate == 0.25 for m in mlps + attns)
    sk.set_omission_rate(model, mlp=0.75)
    assert all(m.omission_rate == 0.75 for m in mlps) and all(m.omission_rate == 0.25 for m in attns)
    sk.set_omission_rate(model, 0.5, attention=0.0)
    assert all(m.omission_rate == 0.5 for m in mlps) and all(m.omission_rate == 0.0 for m in attns)
    sk.replace_attention(model, 0.6, unit="group", metric="contrib")
    assert [m.omission_rate for m in attns] == [0.6, 0.6] and all(m.unit == "group" for m in attns)
    assert all(m.omission_rate == 0.5 for m in mlps), "replace_attention must not touch the MLPs"
    sk.replace_mlp(model, 0.3)
    assert all(m.omission_rate == 0.6 for m in attns), "replace_mlp must not touch the attention"
    sk.set_omission_rate(model, 0.0)
    model.train()
    ids = _ids()
    with torch.no_grad():
        at_zero = model(ids).logits
    sk.revert(model)
    assert not any(isinstance(m, (sk.SATMLP, sk.SATAttention)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, at_zero), "rate 0 in training mode is the dense model"


def test_mlp_and_attention_sat_trains_close_to_dense():
    """A tiny Llama, SAT on MLP and attention (LORS from 0.5), against dense: the loss falls and ends close."""
    from test_convergence import STEPS, _bigram_batches

    def train(sat):
        model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=256).train()
        sched = sk.LadderOmissionScheduler(0.5, total_steps=STEPS)
        if sat:
            sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step, ids in enumerate(_bigram_batches(STEPS)):
            if sat:
                sk.set_omission_rate(model, sched.rate(step))
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    dense, sat = train(False), train(True)
    assert sat[-1] < 0.7 * sat[0], f"SAT loss must fall: {sat[0]:.3f} -> {sat[-1]:.3f}"
    # Tolerance 5%: measured 2.252 (SAT) vs 2.271 (dense) after 30 steps, CPU fp32, torch 2.13, transformers 5.24.
    assert sat[-1] <= 1.05 * dense[-1], f"final SAT loss {sat[-1]:.4f} vs dense {dense[-1]:.4f}"


# ------------------------------------------------------------------------------------------------ bad input

def _ops(B=2, T=6, h=8, H=4, G=2, d=2, dtype=torch.float32):
    return [torch.randn(B, T, h, dtype=dtype), torch.randn(H * d, h, dtype=dtype), torch.randn(G * d, h, dtype=dtype),
            torch.randn(G * d, h, dtype=dtype), torch.randn(h, H * d, dtype=dtype)]


@pytest.mark.parametrize("rate,exc", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                      ("0.5", TypeError), (None, TypeError)])
def test_bad_rate(rate, exc):
    with pytest.raises(exc, match="omission_rate"):
        sk.sat_attention(*_ops(), rate, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("kw,exc,match", [
    ({"num_heads": 3, "num_kv_heads": 1}, ValueError, r"w_q must be \[num_heads \* head_dim, h\]"),
    ({"num_heads": 0}, ValueError, "num_heads must be a positive integer"),
    ({"num_heads": 4, "num_kv_heads": 3}, ValueError, "multiple of num_kv_heads"),
    ({"num_heads": 4, "num_kv_heads": 4}, ValueError, r"w_k must be \[num_kv_heads \* head_dim, h\]"),
    ({"num_heads": 2, "num_kv_heads": 2}, ValueError, r"w_k must be \[num_kv_heads \* head_dim, h\] = \(8, 8\)"),
    ({"unit": "layer"}, ValueError, "unit"),
    ({"metric": "max"}, ValueError, "metric"),
    ({"strategy": "best"}, ValueError, "strategy"),
    ({"backend": "jax"}, ValueError, "backend"),
    ({"backend": "triton"}, ValueError, "not available for attention"),
    ({"generator": 3}, TypeError, "generator"),
    ({"forward": "exact"}, ValueError, "forward must be one of"),
    ({"causal": 1}, TypeError, "causal must be a bool"),
    ({"scale": 0.0}, ValueError, "scale must be a positive"),
    ({"norm_eps": -1.0}, ValueError, "norm_eps"),
    ({"cos": torch.randn(1, 6, 2)}, ValueError, "cos and sin must be given together"),
    ({"cos": torch.randn(1, 5, 2), "sin": torch.randn(1, 5, 2)}, ValueError, r"cos must be \[B or 1, T, head_dim\]"),
    ({"attention_mask": torch.ones(2, 1, 6, 7, dtype=torch.bool)}, ValueError, r"attention_mask must be \[B or 1, 1"),
    ({"attention_mask": torch.ones(2, 4, 6, 6, dtype=torch.bool)}, ValueError, "one mask for all heads"),
    ({"attention_mask": torch.ones(2, 1, 6, 6, dtype=torch.long)}, TypeError, "attention_mask must be bool"),
    ({"attention_mask": [[1]]}, TypeError, "attention_mask must be a torch.Tensor"),
    ({"b_q": torch.randn(7)}, ValueError, r"b_q must have shape \(8,\)"),
    ({"q_norm_weight": torch.randn(3)}, ValueError, r"q_norm_weight must have shape \(2,\)"),
    ({"b_o": torch.randn(8, dtype=torch.float64)}, TypeError, "share one dtype"),
])
def test_bad_arguments(kw, exc, match):
    kw = {"num_heads": 4, "num_kv_heads": 2, **kw}
    with pytest.raises(exc, match=match):
        sk.sat_attention(*_ops(), 0.5, **kw)


def test_bad_tensors():
    ops = _ops()
    with pytest.raises(ValueError, match=r"x must be \[B, T, h\]"):
        sk.sat_attention(ops[0][0], *ops[1:], 0.5, num_heads=4, num_kv_heads=2)
    wide = _ops(h=6)
    with pytest.raises(ValueError, match=r"w_o must be \[h, num_heads \* head_dim\] = \(6, 8\)"):
        sk.sat_attention(*wide[:4], wide[4].t(), 0.5, num_heads=4, num_kv_heads=2)
    with pytest.raises(TypeError, match="w_v must be a torch.Tensor"):
        sk.sat_attention(*ops[:3], [[1.0]], ops[4], 0.5, num_heads=4, num_kv_heads=2)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        sk.sat_attention(ops[0].long(), *ops[1:], 0.5, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="one device"):
        sk.sat_attention(*ops[:4], ops[4].to("meta"), 0.5, num_heads=4, num_kv_heads=2)
    odd = _ops(d=3)
    cos = torch.randn(1, 6, 3)
    with pytest.raises(ValueError, match="even head_dim"):
        sk.sat_attention(*odd, 0.5, num_heads=4, num_kv_heads=2, cos=cos, sin=cos)


@pytest.mark.parametrize("heads,exc,match", [
    (torch.tensor([2, 1]), ValueError, "sorted"), (torch.tensor([0, 4]), ValueError, r"in \[0, 4\)"),
    (torch.tensor([], dtype=torch.long), ValueError, "non-empty"), (torch.tensor([0.0]), TypeError, "integer"),
    ([0, 1], TypeError, "torch.Tensor"),
])
def test_bad_heads(heads, exc, match):
    with pytest.raises(exc, match=match):
        sk.gathered_attention(*_ops(), heads, num_heads=4, num_kv_heads=2)


def test_unsupported_models_and_settings_get_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="no supported attention module.*GPT2Attention"):
        sk.replace_attention(gpt2)
    with pytest.raises(ValueError, match="attention_dropout"):
        sk.replace_attention(tiny_model("llama", attention_dropout=0.1))
    with pytest.raises(ValueError, match="attention implementation 'flex_attention'"):
        sk.replace_attention(tiny_model("llama", attn_implementation="flex_attention"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sk.replace_attention("llama")
    with pytest.raises(ValueError, match="model is itself an attention module"):
        sk.replace_attention(tiny_model("llama").model.layers[0].self_attn)
    with pytest.raises(ValueError, match="no SAT attention modules; call replace_attention"):
        sk.set_omission_rate(sk.replace_mlp(tiny_model("llama")), attention=0.5)
    with pytest.raises(ValueError, match="no SAT modules"):
        sk.set_omission_rate(tiny_model("llama"), 0.5)
    with pytest.raises(ValueError, match="give rate"):
        sk.set_omission_rate(sk.replace_mlp(tiny_model("llama")))
    with pytest.raises(ValueError, match="attention must be in"):
        sk.set_omission_rate(sk.replace_attention(tiny_model("llama")), attention=1.0)


def test_gemma3_norm_offset_and_soft_cap():
    """Gemma 3's q/k norms are found with their (1 + w) offset and the query scale with query_pre_attn_scalar; an
    attention logit soft cap (Gemma 2's) is refused by name, before any module is patched."""
    model = sk.replace_attention(tiny_model("gemma3"), 0.5)
    sat = model.model.layers[0].self_attn
    assert sat.norm_offset == 1.0 and sat.scale == 16 ** -0.5
    q_scale, _ = sat.norm_scales()
    assert torch.equal(q_scale, 1 + sat.q_norm.weight)
    assert sk.replace_attention(tiny_model("qwen3"), 0.5).model.layers[0].self_attn.norm_offset == 0.0
    capped = tiny_model("gemma3", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping = 50.0"):
        sk.replace_attention(capped)
    assert not any(isinstance(m, sk.SATAttention) for m in capped.modules()), "a failed call must not patch"


def test_head_count_mismatch_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.head_dim = 8          # 48-wide q_proj: 6 heads of 8, config says 4
    with pytest.raises(ValueError, match="head counts do not match"):
        sk.replace_attention(model)
    assert not any(isinstance(m, sk.SATAttention) for m in model.modules()), "a failed call must not patch"


@pytest.mark.parametrize("kw,exc,match", [({"omission_rate": 1.0}, ValueError, "omission_rate"),
                                          ({"unit": "kv"}, ValueError, "unit"),
                                          ({"metric": "max"}, ValueError, "metric"),
                                          ({"strategy": "greedy"}, ValueError, "strategy"),
                                          ({"backend": "cuda"}, ValueError, "not available"),
                                          ({"forward": "exact"}, ValueError, "forward must be one of")])
def test_replace_attention_bad_arguments(kw, exc, match):
    model = tiny_model("llama")
    with pytest.raises(exc, match=match):
        sk.replace_attention(model, **kw)
    assert not any(isinstance(m, sk.SATAttention) for m in model.modules()), "a failed call must not patch"


def test_training_mode_refusals():
    model = sk.replace_attention(tiny_model("llama"), 0.5).train()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported in training mode"):
        model.model.layers[0].self_attn(torch.randn(1, 4, 48), position_embeddings=(torch.ones(1, 4, 12),) * 2,
                                        attention_mask=None)
    model.config._attn_implementation = "sdpa"
    attn = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="position_embeddings"):
        attn(torch.randn(1, 4, 48), position_embeddings=None, attention_mask=None)
    with pytest.raises(ValueError, match=r"hidden_states must be a \[B, T, h\]"):
        attn(torch.randn(4, 48), position_embeddings=(torch.ones(1, 4, 12),) * 2, attention_mask=None)

    class Adapter(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    attn.v_proj = Adapter(attn.v_proj)
    with pytest.raises(TypeError, match="v_proj must be an nn.Linear"):
        model(_ids())
