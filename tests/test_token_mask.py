"""Token masks in the scores: padding (and, opted in, the tokens without loss) must not count.

Ops: ``token_mask=`` on ``sat_mlp``, ``sat_mlp_kept``, ``neuron_scores``, ``sat_lora_mlp``, ``sat_attention``,
``head_scores``: with padding and the mask, the scores are those of the unpadded tokens alone and the kept set is the
same. Models: the forward pre-hook of ``replace_mlp`` / ``replace_attention`` hands the model's ``attention_mask``
(``score_tokens="real"``, the default) or its loss tokens (``"loss"``) to the SAT modules; left and right padding,
fp32 and bf16, PEFT LoRA, activation checkpointing, eval and generation, ``torch.compile`` (``aot_eager``,
``fullgraph=True``). The Triton backend's fused scores: ``tests/token_mask_interpreter_cases.py`` in the interpreter.
"""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import sat_kernels as sk
from sat_kernels.ops.attention import sat_attention_kept
from sat_kernels.ops.mlp import LoRA, dense_mlp, sat_lora_mlp, sat_mlp_kept
from sat_kernels.selection import activation_scores
from sat_kernels.tokens import ModelTokens

from helpers import make_operands, run_interpreter_cases, tiny_model

DTYPES = [torch.float32, torch.bfloat16]
LENGTHS = (7, 12, 3)          # the real tokens of three sequences, padded to 12
PAD_ID = 95


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _pad(rows, side: str, width: int, fill):
    """``(padded [B, width, ...], bool mask [B, width])`` of the sequences ``rows`` (each ``[L_b, ...]``), the padding
    on ``side`` made of ``fill(n)``."""
    padded, mask = [], []
    for r in rows:
        n = width - r.shape[0]
        padded.append(torch.cat([r, fill(n)]) if side == "right" else torch.cat([fill(n), r]))
        m = torch.ones(width, dtype=torch.bool)
        if side == "right":
            m[r.shape[0]:] = False
        else:
            m[:n] = False
        mask.append(m)
    return torch.stack(padded), torch.stack(mask)


def _mlp_case(dtype, side, seed=0):
    """Weights, the real tokens of three sequences ``[N, h]``, and the padded batch ``[3, 12, h]`` with its mask; the
    padding tokens are large, so that they would move the scores if they counted."""
    (_, wg, wu, wd), _ = make_operands(1, 40, 90, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randn(n, 40, generator=gen).to(dtype) for n in LENGTHS]
    x, mask = _pad(rows, side, 12, lambda n: (4 * torch.randn(n, 40, generator=gen)).to(dtype))
    return [w.detach() for w in (wg, wu, wd)], torch.cat(rows), x, mask


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------- ops: MLP

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
def test_neuron_scores_over_the_real_tokens(metric, dtype, side):
    (wg, wu, wd), real, x, mask = _mlp_case(dtype, side)
    masked = sk.neuron_scores(x, wg, wu, wd, metric=metric, token_mask=mask)
    torch.testing.assert_close(masked, sk.neuron_scores(real, wg, wu, wd, metric=metric), **_tol(dtype))
    assert not torch.allclose(sk.neuron_scores(x, wg, wu, wd, metric=metric), masked, rtol=0.05), \
        "the padding must move the unmasked scores, or this test shows nothing"
    as_int = sk.neuron_scores(x, wg, wu, wd, metric=metric, token_mask=mask.long())
    assert torch.equal(as_int, masked), "an integer 0/1 mask (Hugging Face's attention_mask) is the same mask"


@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_sat_mlp_with_padding_is_sat_mlp_on_the_real_tokens(dtype, side, forward):
    """Same kept set as on the unpadded tokens; ``y`` on the real tokens and every weight gradient (with no upstream
    gradient on the padding) equal to the unpadded call's."""
    (wg, wu, wd), real, x, mask = _mlp_case(dtype, side)
    weights = [w.clone().requires_grad_() for w in (wg, wu, wd)]
    y, idx = sk.sat_mlp(x, *weights, 0.5, token_mask=mask, forward=forward, return_indices=True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype) * mask[..., None]
    grads = torch.autograd.grad(y, weights, dy)
    weights_r = [w.clone().requires_grad_() for w in (wg, wu, wd)]
    y_r, idx_r = sk.sat_mlp(real, *weights_r, 0.5, forward=forward, return_indices=True)
    grads_r = torch.autograd.grad(y_r, weights_r, dy[mask])
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(y[mask], y_r, **_tol(dtype))
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g, g_r, **_tol(dtype))
    _, idx_all = sk.sat_mlp(x, wg, wu, wd, 0.5, return_indices=True)
    assert not torch.equal(idx_all, idx), "without the mask the padding changes the kept set"


def test_mask_edge_cases_on_the_mlp():
    """An all-True mask keeps the unmasked set; rate 0 stays the dense MLP bitwise; sat_mlp_kept takes the mask."""
    (wg, wu, wd), _, x, mask = _mlp_case(torch.float32, "right")
    full = torch.ones_like(mask)
    _, idx = sk.sat_mlp(x, wg, wu, wd, 0.5, return_indices=True)
    _, idx_full = sk.sat_mlp(x, wg, wu, wd, 0.5, token_mask=full, return_indices=True)
    assert torch.equal(idx, idx_full)
    assert torch.equal(sk.sat_mlp(x, wg, wu, wd, 0.0, token_mask=mask), dense_mlp(x, wg, wu, wd))
    _, idx_k = sat_mlp_kept(x, wg, wu, wd, 45, token_mask=mask, return_indices=True)
    _, idx_r = sk.sat_mlp(x, wg, wu, wd, 0.5, token_mask=mask, return_indices=True)
    assert torch.equal(idx_k, idx_r)


@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dt)
def test_activation_scores_in_every_layout(dtype, metric):
    """Token-major ``[T, I]``, neuron-major ``[I, T]`` and the transposed view of a token-major tensor (the torch
    backend's fp32 layout on CPU), eager and compiled: the scores of the masked-in rows."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 90, generator=gen).to(dtype)
    mask = torch.rand(300, generator=gen) < 0.6
    ref = activation_scores(a[mask].double(), metric).float()
    tol = dict(rtol=1e-5, atol=1e-5)
    for a_in, dim in ((a, 1), (a.t().contiguous(), 0), (a.t(), 0)):
        torch.testing.assert_close(activation_scores(a_in, metric, neuron_dim=dim, token_mask=mask), ref, **tol)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, m: activation_scores(t, metric, neuron_dim=0, token_mask=m),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a.t().contiguous(), mask), ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_lora_mlp_with_padding(dtype):
    """sat_lora_mlp (the PEFT path): the kept set of the unpadded tokens, and their output."""
    (wg, wu, wd), real, x, mask = _mlp_case(dtype, "left", seed=4)
    gen = torch.Generator().manual_seed(9)
    adapters = tuple(LoRA(torch.randn(4, fan_in, generator=gen) / 4, torch.randn(fan_out, 4, generator=gen) / 4, 2.0)
                     for fan_in, fan_out in ((40, 90), (40, 90), (90, 40)))
    k = sk.num_kept(90, 0.5)
    y, idx = sat_lora_mlp(x, wg, wu, wd, adapters, k, token_mask=mask, return_indices=True)
    y_r, idx_r = sat_lora_mlp(real, wg, wu, wd, adapters, k, return_indices=True)
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(y[mask], y_r, **_tol(dtype))
    _, idx_all = sat_lora_mlp(x, wg, wu, wd, adapters, k, return_indices=True)
    assert not torch.equal(idx_all, idx)


# ---------------------------------------------------------------------------------------------------- ops: attention

def _rope(positions, d):
    """Hugging Face-style RoPE tables ``[B, T, d]`` for integer ``positions`` ``[B, T]``."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions[..., None].double() * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _attention_case(side, dtype, seed=0):
    """Weights (H 6, G 2, d 8, h 40), the three sequences alone and the padded batch: the padding is masked out of
    every real query's keys (left; padding queries attend to the padding keys, so that their outputs are not 0) or
    comes after them (right, causal); the real tokens get the positions they have alone."""
    gen = torch.Generator().manual_seed(seed)
    h, H, G, d = 40, 6, 2, 8
    w = [(torch.randn(n, h, generator=gen) / h ** 0.5).to(dtype) for n in (H * d, G * d, G * d)]
    w_o = (torch.randn(h, H * d, generator=gen) / (H * d) ** 0.5).to(dtype)
    rows = [torch.randn(n, h, generator=gen).to(dtype) for n in LENGTHS]
    x, mask = _pad(rows, side, 12, lambda n: (4 * torch.randn(n, h, generator=gen)).to(dtype))
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = _rope(pos, d)
    attn_mask = (mask[:, None, None, :] | (~mask[:, None, :, None] & ~mask[:, None, None, :])) if side == "left" \
        else None
    kwargs = dict(num_heads=H, num_kv_heads=G, cos=cos.to(dtype), sin=sin.to(dtype), attention_mask=attn_mask)
    alone = []
    for r in rows:
        c, s = _rope(torch.arange(r.shape[0])[None], d)
        alone.append((r[None], dict(num_heads=H, num_kv_heads=G, cos=c.to(dtype), sin=s.to(dtype))))
    return (*w, w_o), x, mask, kwargs, alone


@pytest.mark.parametrize("unit", ["head", "group"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_head_scores_over_the_real_tokens(metric, dtype, side, unit):
    """head_scores with padding and the mask = the scores of the three sequences alone, combined (l2: the root of the
    summed squares, l1: the sum); sat_attention keeps the units those scores rank first."""
    weights, x, mask, kwargs, alone = _attention_case(side, dtype)
    masked = sk.head_scores(x, *weights, metric=metric, unit=unit, token_mask=mask, **kwargs)
    parts = torch.stack([sk.head_scores(r, *weights, metric=metric, unit=unit, **kw).double() for r, kw in alone])
    expected = (parts.sum(0) if metric == "l1" else parts.pow(2).sum(0).sqrt()).float()
    torch.testing.assert_close(masked, expected, **_tol(dtype))
    assert not torch.allclose(sk.head_scores(x, *weights, metric=metric, unit=unit, **kwargs), masked, rtol=0.05)
    k = sk.num_kept(6 if unit == "head" else 2, 0.5)
    _, heads = sk.sat_attention(x, *weights, 0.5, metric=metric, unit=unit, token_mask=mask, return_indices=True,
                                **kwargs)
    units = sk.select_neurons(masked, k)
    want = units if unit == "head" else (units[:, None] * 3 + torch.arange(3)).reshape(-1)
    assert torch.equal(heads, want)


def test_sat_attention_mask_forms_and_gradients():
    """An integer mask is the bool mask; only the kept heads' rows of w_q get gradient."""
    weights, x, mask, kwargs, _ = _attention_case("right", torch.float32, seed=2)
    leaves = [w.clone().requires_grad_() for w in weights]
    y, heads, _, _ = sat_attention_kept(x, *leaves, 3, token_mask=mask.long(), **kwargs)
    y2, heads2, _, _ = sat_attention_kept(x, *weights, 3, token_mask=mask, **kwargs)
    assert torch.equal(heads, heads2) and torch.equal(y, y2)
    y.backward(torch.randn_like(y) * mask[..., None])
    omitted = torch.ones(6, dtype=torch.bool)
    omitted[heads] = False
    grad = leaves[0].grad.view(6, 8, 40)
    assert not grad[omitted].any() and grad[~omitted].any()


# --------------------------------------------------------------------------------------------------- bad arguments

def test_bad_token_masks_are_refused():
    (wg, wu, wd), _, x, mask = _mlp_case(torch.float32, "right")
    weights, xa, _, kwargs, _ = _attention_case("right", torch.float32)
    adapters = (None, None, None)
    calls = {
        "sat_mlp": lambda m: sk.sat_mlp(x, wg, wu, wd, 0.5, token_mask=m),
        "sat_mlp_kept": lambda m: sat_mlp_kept(x, wg, wu, wd, 40, token_mask=m),
        "neuron_scores": lambda m: sk.neuron_scores(x, wg, wu, wd, token_mask=m),
        "sat_lora_mlp": lambda m: sat_lora_mlp(x, wg, wu, wd, adapters, 40, token_mask=m),
        "sat_attention": lambda m: sk.sat_attention(xa, *weights, 0.5, token_mask=m, **kwargs),
        "head_scores": lambda m: sk.head_scores(xa, *weights, token_mask=m, **kwargs),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"token_mask must be a bool or integer tensor .*got torch.float32"):
            call(mask.float())
        with pytest.raises(TypeError, match=r"token_mask must be None or a bool/integer tensor of shape \[3, 12\]"):
            call(mask.tolist())
        with pytest.raises(ValueError, match=r"token_mask must have shape \[3, 12\] \(x.shape\[:-1\].*got \[36\]"):
            call(mask.reshape(-1))
        with pytest.raises(ValueError, match=r"token_mask must be on cpu \(the device of x\), got meta"):
            call(torch.ones(3, 12, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="score_tokens must be one of"):
        sk.replace_mlp(tiny_model(), 0.5, score_tokens="padding")
    with pytest.raises(ValueError, match="score_tokens must be one of"):
        sk.replace_attention(tiny_model(), 0.5, score_tokens=None)


# -------------------------------------------------------------------------------------------------------- models

def _batch(side, seed=0, vocab=90):
    """Three token sequences (lengths 7, 12, 3) padded to 12 with ``PAD_ID``; their attention mask and position ids
    (counted over the real tokens, as generation computes them for left padding)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]
    ids, mask = _pad(rows, side, 12, lambda n: torch.full((n,), PAD_ID))
    return rows, ids, mask.long(), (mask.long().cumsum(1) - 1).clamp(min=0)


def _scores_of_call(model, call, kind="mlp"):
    """Each SAT module's scores (of ``kind``) in the training forward + backward ``call()``."""
    modules = [m for _, m in sk.sat_modules(model, kind)]
    for m in modules:
        m._keep_scores = True
    out = call()
    (out.loss if out.loss is not None else out.logits.float().pow(2).mean()).backward()
    return [m._last_stats["scores"] for m in modules]


@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_patched_model_scores_the_real_tokens(dtype, side, kind):
    """A padded batch through the patched model (default score_tokens="real", exact forward): every layer's scores
    are those of the sequences run alone without padding, combined; the kept sets the same. With score_tokens="all"
    the padding moves them (but the head scores of left padding: under sdpa's boolean mask a left-padding query has
    no key to attend, and its attention output is 0)."""
    model = tiny_model().to(dtype).train()
    patch = sk.replace_mlp if kind == "mlp" else sk.replace_attention
    patch(model, 0.5)
    rows, ids, am, pos = _batch(side)
    padded = torch.stack(_scores_of_call(model, lambda: model(input_ids=ids, attention_mask=am, position_ids=pos),
                                         kind))
    parts = torch.stack([torch.stack(_scores_of_call(model, lambda: model(input_ids=r[None]), kind)).double()
                         for r in rows])
    alone = parts.pow(2).sum(0).sqrt().float()
    torch.testing.assert_close(padded, alone, **_tol(dtype))
    k = sk.num_kept(padded.shape[1], 0.5)
    for p, a in zip(padded, alone):
        assert torch.equal(sk.select_neurons(p, k), sk.select_neurons(a, k))
    patch(model, 0.5, score_tokens="all")
    unmasked = torch.stack(_scores_of_call(model, lambda: model(input_ids=ids, attention_mask=am, position_ids=pos),
                                           kind))
    if kind == "mlp" or side == "right":
        assert not torch.allclose(unmasked, padded, rtol=0.05)


def _mlp_inputs(model):
    """Forward hooks that record each SAT MLP's input ``x``; returns (inputs, handles)."""
    inputs, handles = [], []
    for _, m in sk.sat_modules(model, "mlp"):
        handles.append(m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())))
    return inputs, handles


def _reference_scores(model, xs, token_mask):
    return [sk.neuron_scores(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, token_mask=token_mask)
            for x, (_, m) in zip(xs, sk.sat_modules(model, "mlp"))]


def _check_against_inputs(model, call, token_mask):
    """The scores of ``call()`` equal :func:`sk.neuron_scores` of each MLP's recorded input over ``token_mask``."""
    xs, handles = _mlp_inputs(model)
    try:
        got = _scores_of_call(model, call)
    finally:
        for h in handles:
            h.remove()
    for g, r in zip(got, _reference_scores(model, xs, token_mask)):
        torch.testing.assert_close(g, r)


def test_loss_tokens_opt_in():
    """score_tokens="loss": the real tokens whose next-token label is not -100 (prompt and padding left out), also
    with labels given positionally; without labels the real tokens; shift_labels as they are."""
    model = sk.replace_mlp(tiny_model().train(), 0.5, score_tokens="loss")
    _, ids, am, _ = _batch("right", seed=1)
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :2] = -100                                                   # the prompts: 2 tokens each
    loss_tokens = torch.cat([labels[:, 1:] != -100, torch.zeros(3, 1, dtype=torch.bool)], 1) & (am != 0)
    assert loss_tokens.any(1).all() and (loss_tokens != (am != 0)).any()
    _check_against_inputs(model, lambda: model(input_ids=ids, attention_mask=am, labels=labels), loss_tokens)
    _check_against_inputs(model, lambda: model(ids, am, None, None, None, labels), loss_tokens)
    _check_against_inputs(model, lambda: model(input_ids=ids, attention_mask=am), am != 0)
    shift = torch.full_like(labels, -100)
    shift[:, 2] = 7
    _check_against_inputs(model, lambda: model(input_ids=ids, attention_mask=am, labels=labels, shift_labels=shift),
                          shift != -100)


def test_no_mask_leaks_into_the_next_forward():
    """A forward without attention_mask after one with: every token scores (the hook forgets the old mask); a
    positional attention_mask is read too; revert removes the hook."""
    model = sk.replace_mlp(tiny_model().train(), 0.5)
    _, ids, am, _ = _batch("right")
    hook = next(h for h in model._forward_pre_hooks.values() if isinstance(h, ModelTokens))
    _check_against_inputs(model, lambda: model(ids, am), am != 0)
    assert torch.equal(hook.real, am != 0)
    _check_against_inputs(model, lambda: model(input_ids=ids), None)
    assert hook.real is None and hook.loss is None
    sk.revert(model)
    assert not any(isinstance(h, ModelTokens) for m in model.modules() for h in m._forward_pre_hooks.values())


def test_eval_generation_and_kv_cache_are_unaffected():
    """eval() and generation (left padding, KV cache) give exactly the unpatched model's results; a training-mode
    forward continuing a KV cache (MLP patched) scores the current tokens: the last columns of the mask."""
    plain = tiny_model().eval()
    model = sk.replace_attention(sk.replace_mlp(copy.deepcopy(plain), 0.5), 0.5).eval()
    _, ids, am, pos = _batch("left")
    assert torch.equal(model(input_ids=ids, attention_mask=am, position_ids=pos).logits,
                       plain(input_ids=ids, attention_mask=am, position_ids=pos).logits)
    gen = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
    assert torch.equal(model.generate(ids, **gen), plain.generate(ids, **gen))
    model.train()
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **gen), plain.generate(ids, **gen))
    mlp_only = sk.replace_mlp(copy.deepcopy(plain), 0.5).train()
    with torch.no_grad():
        past = mlp_only(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
    step = torch.randint(0, 90, (3, 2), generator=torch.Generator().manual_seed(4))
    am2 = torch.cat([am, torch.tensor([[1, 0], [1, 1], [0, 1]])], 1)
    _check_against_inputs(mlp_only, lambda: mlp_only(input_ids=step, attention_mask=am2, cache=past),
                          am2[:, -2:] != 0)


def test_shape_mismatch_is_an_error():
    model = sk.replace_mlp(tiny_model().train(), 0.5)
    _, ids, am, _ = _batch("right")
    model(input_ids=ids, attention_mask=am)
    mlp = model.model.layers[0].mlp
    with pytest.raises(ValueError, match=r"SATMLP: score_tokens='real' needs the model's \[B, T\] token mask to match "
                                         r"the module's tokens \[2, 5\].*\[3, 12\].*score_tokens='all'"):
        mlp(torch.randn(2, 5, 48))
    mlp.score_tokens = "all"
    mlp(torch.randn(2, 5, 48))
    with pytest.raises(ValueError, match=r"score_tokens must be one of \['real', 'loss', 'all'\], got 'none'"):
        mlp.score_tokens = "none"


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_with_the_same_tokens(reentrant):
    """The backward's recompute (after the model's forward returned) scores the same tokens: the gradients equal
    those without checkpointing, and those of score_tokens="all" differ."""
    base = sk.replace_attention(sk.replace_mlp(tiny_model().train(), 0.5), 0.5)
    _, ids, am, pos = _batch("left")
    labels = ids.masked_fill(am == 0, -100)

    def grads(model):
        model.zero_grad()
        model(input_ids=ids, attention_mask=am, position_ids=pos, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(base)
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for a, b in zip(grads(ckpt), plain):
        torch.testing.assert_close(a, b)
    sk.replace_mlp(base, 0.5, score_tokens="all")
    assert any(not torch.equal(a == 0, b == 0) for a, b in zip(grads(base), plain))


@pytest.mark.parametrize("order", ["sat_then_peft", "peft_then_sat"])
def test_peft_lora_model(order):
    """PEFT LoRA on the MLP projections, patched before or after get_peft_model: with score_tokens="real" what the
    padding tokens are does not matter; with "all" it does."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    if order == "sat_then_peft":
        model = peft.get_peft_model(sk.replace_mlp(tiny_model(), 0.5), config)
    else:
        model = sk.replace_mlp(peft.get_peft_model(tiny_model(), config), 0.5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    _, ids, am, _ = _batch("right")
    other = ids.masked_fill(am == 0, 3)                                     # the same batch, other padding tokens
    first = _scores_of_call(model, lambda: model(input_ids=ids, attention_mask=am))
    second = _scores_of_call(model, lambda: model(input_ids=other, attention_mask=am))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    for _, m in sk.sat_modules(model, "mlp"):
        m.score_tokens = "all"
    third = _scores_of_call(model, lambda: model(input_ids=ids, attention_mask=am))
    fourth = _scores_of_call(model, lambda: model(input_ids=other, attention_mask=am))
    assert any(not torch.allclose(a, b) for a, b in zip(third, fourth))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("entry", ["model", "wrapper"])
def test_torch_compile_fullgraph(fresh_dynamo, entry):
    """torch.compile (aot_eager, fullgraph=True) of the patched model (the pre-hook then runs as a small graph of its
    own) or of a function that calls it (the hook traced inline): losses and gradients equal eager's for batches with
    right and left padding, then without a mask (no leak under compile either)."""
    model = sk.replace_attention(sk.replace_mlp(tiny_model().train(), 0.5), 0.5)
    eager = copy.deepcopy(model)
    if entry == "model":
        compiled = torch.compile(model, backend=aot_eager, fullgraph=True)
    else:
        compiled = torch.compile(lambda **kw: model(**kw), backend=aot_eager, fullgraph=True)
    batches = []
    for side, seed in (("right", 0), ("left", 1)):
        _, ids, am, pos = _batch(side, seed)
        batches.append(dict(input_ids=ids, attention_mask=am, position_ids=pos, labels=ids.masked_fill(am == 0, -100)))
    batches.append(dict(input_ids=batches[0]["input_ids"], labels=batches[0]["input_ids"]))
    for batch in batches:
        model.zero_grad()
        eager.zero_grad()
        loss = compiled(**batch).loss
        loss.backward()
        eager_loss = eager(**batch).loss
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_in_the_interpreter():
    """tests/token_mask_interpreter_cases.py under TRITON_INTERPRET=1 in a child process."""
    run_interpreter_cases(Path(__file__).with_name("token_mask_interpreter_cases.py"), timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_masked_gate_up_kernel_compiles_for_sm90():
    """Static (an sm_90a cubin, no GPU): the gate/up kernel with the token mask compiles, bf16 and fp32, first config,
    with the unmasked scoring variant's 16-byte cp.async loads and stores and no more spill."""
    import os

    spec = importlib.util.spec_from_file_location(
        "triton_static_check", Path(__file__).parent.parent / "benchmarks" / "triton_static_check.py")
    static = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(static)
    if not os.path.exists(static.CUOBJDUMP) or static.utils.INTERPRET:
        pytest.skip("needs triton's cuobjdump and no TRITON_INTERPRET")
    for dtype in ("bf16", "fp32"):
        variants = {label: (kernel, pointers, consts, configs[0])
                    for label, kernel, pointers, consts, configs in static.kernels(dtype)}
        rows = {}
        for label in ("gate_up_fwd scores", "gate_up_fwd scores, token mask"):
            kernel, pointers, consts, config = variants[label]
            constexprs = dict(consts, **config.kwargs)
            signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.fn.arg_names)
                     if signature[n] != "constexpr"}
            rows[label] = static.compile_sm90(kernel.fn, signature, constexprs, attrs, config.num_warps,
                                              config.num_stages)
        plain, masked = rows["gate_up_fwd scores"], rows["gate_up_fwd scores, token mask"]
        assert (masked["cp_async16"], masked["st16"]) == (plain["cp_async16"], plain["st16"]), (dtype, plain, masked)
        assert masked["stack"] <= plain["stack"], (dtype, plain, masked)
