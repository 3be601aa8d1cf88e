"""SAT SwiGLU MLP on the ``"triton"`` backend: custom ops, autograd formula, launcher.

Forward of ``sat_mlp`` (in-step selection, docs/design.md section 2)::

    G, U, s = gate_up_fwd(x)                    one kernel: both projections of all I neurons, fp64 score partials
                                                of act(G) * U per 64 rows in the epilogue (no [T, I] re-read); a
                                                token mask multiplies each row's terms by 0/1 there
    S = select(scores=s)                        torch.topk + sort on the fp32 scores, no host sync
    G_S, U_S, A_S = kept_act_fwd(G, U, S)       compaction of the kept columns, A_S = act(G_S) * U_S
    y = down_fwd(A_S, W_down[:, S])             [T, h], fp32 accumulation (forward="sparse")
    y = down_fwd(A, W_down)                     [T, h]: the same kernel as a dense GEMM over all I neurons, A stored
                                                by the gate/up kernel (forward="dense": exact output, sparse backward)

``gathered_mlp`` (a given ``S``) runs ``gate_up_fwd`` over the rows ``S`` of the weights instead (``[T, k]`` directly,
no scores, no compaction). Saved for backward: ``x``, the weights, ``S``, ``G_S``, ``U_S`` (never a ``[T, I]``
tensor). Backward, only over the kept neurons (``k = |S|``)::

    dG_S, dU_S, A_S = down_bwd(dy, W_down[:, S], G_S, U_S)     dA_S = dy W_down[:, S], SwiGLU backward in the epilogue
    dW_down[:, S] = dy^T A_S                                   compact [h, k], then spread over [h, I] with zeros
    dW_gate[S], dW_up[S] = dG_S^T x, dU_S^T x                  one kernel (x loaded once) into rows S; the others zero
    dx = dG_S W_gate[S] + dU_S W_up[S]                         one kernel, weight rows gathered through S

Every kernel runs over ``pad16(k)`` kept neurons: the compact ``[T, k]`` tensors are views of buffers with zero pad
columns up to a multiple of 16, and ``S`` is padded with -1 entries (see :mod:`.utils`), so no mask on ``k`` breaks
the 16-byte vector loads, ``cp.async`` pipelining and vector stores whatever the omission rate. Everything
accumulates in fp32; there are no atomics (every output element has exactly one writer), so results are
deterministic and the kernels are safe to re-run while autotuning. The kernels are ``torch.library`` custom ops with
fake implementations, so ``torch.compile`` traces the op without a graph break.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ....selection import _norm, omitted_neurons
from ..function import sat_mlp_torch
from .down import down_bwd, down_fwd, down_weight_bwd
from .gate_up import gate_up_fwd, gate_up_input_bwd, gate_up_weight_bwd, kept_act_fwd
from .utils import INTERPRET, as_padded, check_tensors, dot_precision, on_device, padded_empty, padded_index, wide

# Gather the kept columns of w_down into a compact [h, k] copy (one pass over h * I) instead of gathering them inside
# the down GEMMs, where they are the contiguous dimension (2-byte scalar loads). Chosen by that reasoning, not
# measured on a GPU yet: benchmarks/triton_mlp_speed.py times both variants.
COMPACT_W_DOWN = True


def compact_w_down(w_down: Tensor, idx: Tensor, k: int) -> Tensor:
    """``w_down[:, S]`` as ``[h, pad16(k)]`` with zero pad columns, from ``idx`` = :func:`.utils.padded_index` of the
    ``k`` kept indices ``S``."""
    w_s = w_down.index_select(1, idx.clamp(min=0))
    w_s[:, k:] = 0
    return w_s


def _w_down_operand(w_down: Tensor, idx: Tensor, k: int) -> Tuple[Tensor, Optional[Tensor]]:
    """``(w_down operand, index for the in-kernel gather or None)`` of the down GEMMs (``idx``, ``k``: as in
    :func:`compact_w_down`)."""
    if COMPACT_W_DOWN:
        return compact_w_down(w_down, idx, k), None
    return w_down, idx


def kept_positions(indices: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """``(pos, omitted)`` of the sorted kept ``indices [k]`` of ``n`` neurons, without a host sync: int32 ``pos [n]``
    (the position of each neuron in ``indices``, -1 if omitted) and int64 ``omitted [n - k]`` (ascending)."""
    k = indices.numel()
    pos = torch.full((n,), -1, dtype=torch.int32, device=indices.device)
    pos[indices] = torch.arange(k, dtype=torch.int32, device=indices.device)
    return pos, omitted_neurons(indices, n)


def _compact(tensors, k: int) -> Tuple[Tensor, ...]:
    """The ``[T, k]`` views of the kernels' ``[T, pad16(k)]`` outputs (the zero pad columns stay in the buffer)."""
    return tuple(t[:, :k] for t in tensors)


@torch.library.custom_op("sat_kernels::triton_gate_up_scores", mutates_args=())
def _gate_up_scores_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, act: str,
                       metric: Optional[str], store_a: bool,
                       token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(G [T, I], U [T, I], A [T, I], scores [I] fp32)``; ``A`` is empty unless ``store_a``, ``scores`` when
    ``metric`` is ``None``. ``token_mask``: ``None`` or a bool ``[T]``, the tokens the scores cover."""
    mask = token_mask.to(torch.uint8).contiguous() if token_mask is not None else None
    with on_device(x):
        g, u, a, part = gate_up_fwd(x, w_gate, w_up, act, score=metric, store_a=store_a, token_mask=mask)
    a = a if store_a else x.new_empty(0)
    if metric is None:
        return g, u, a, x.new_empty(0, dtype=torch.float32)
    scores = part.sum(0)
    if metric != "l1":
        scores = scores.sqrt_()
    scores = scores.float()
    if metric == "contrib":
        scores = scores * _norm(w_down, 2)
    return g, u, a, scores


@_gate_up_scores_op.register_fake
def _(x, w_gate, w_up, w_down, act, metric, store_a, token_mask=None):
    T, inter = x.shape[0], w_gate.shape[0]
    return (padded_empty(x, T, inter), padded_empty(x, T, inter),
            padded_empty(x, T, inter) if store_a else x.new_empty(0),
            x.new_empty(inter if metric else 0, dtype=torch.float32))


@torch.library.custom_op("sat_kernels::triton_kept_act", mutates_args=())
def _kept_act_op(g: Tensor, u: Tensor, indices: Tensor, act: str, store_a: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(G_S, U_S, A_S)`` ``[T, k]`` from the full ``[T, I]`` pre-activations (``A_S`` empty unless ``store_a``)."""
    with on_device(g):
        g_s, u_s, a_s = kept_act_fwd(g, u, padded_index(indices), act, store_a=store_a)
    g_s, u_s = _compact((g_s, u_s), indices.numel())
    return g_s, u_s, _compact((a_s,), indices.numel())[0] if store_a else a_s


@_kept_act_op.register_fake
def _(g, u, indices, act, store_a):
    T, k = g.shape[0], indices.shape[0]
    return padded_empty(g, T, k), padded_empty(g, T, k), padded_empty(g, T, k) if store_a else g.new_empty(0)


@torch.library.custom_op("sat_kernels::triton_gate_up_kept", mutates_args=())
def _gate_up_kept_op(x: Tensor, w_gate: Tensor, w_up: Tensor, indices: Tensor,
                     act: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(G_S, U_S, A_S)`` ``[T, k]`` computed over the kept weight rows only (``gathered_mlp``)."""
    with on_device(x):
        g_s, u_s, a_s, _ = gate_up_fwd(x, w_gate, w_up, act, idx=padded_index(indices), store_a=True)
    return _compact((g_s, u_s, a_s), indices.numel())


@_gate_up_kept_op.register_fake
def _(x, w_gate, w_up, indices, act):
    return tuple(padded_empty(x, x.shape[0], indices.shape[0]) for _ in range(3))


@torch.library.custom_op("sat_kernels::triton_kept_mlp", mutates_args=())
def _kept_mlp_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, indices: Tensor, g_s: Tensor,
                 u_s: Tensor, a: Tensor, act: str, dense_forward: bool) -> Tensor:
    """``y = A_S W_down[:, S]^T`` (``a`` is ``A_S [T, k]``), or with ``dense_forward`` ``y = A W_down^T`` (``a`` is
    the full ``A [T, I]``); differentiable w.r.t. ``x`` and the weights (``G_S``, ``U_S``, ``a`` are the detached
    activations of ``x``; the backward takes the whole chain through the kept neurons)."""
    with on_device(x):
        if dense_forward:
            return down_fwd(a, w_down, None)
        return down_fwd(wide(as_padded(a)), *_w_down_operand(w_down, padded_index(indices), indices.numel()))


@_kept_mlp_op.register_fake
def _(x, w_gate, w_up, w_down, indices, g_s, u_s, a, act, dense_forward):
    return x.new_empty(x.shape[0], w_down.shape[0])


@torch.library.custom_op("sat_kernels::triton_kept_mlp_bwd", mutates_args=())
def _kept_mlp_bwd_op(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, indices: Tensor,
                     g_s: Tensor, u_s: Tensor, act: str, need_x: bool, need_w_gate_up: bool,
                     need_w_down: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW_gate, dW_up, dW_down)``; a gradient that is not needed comes back empty (``[0]``)."""
    inter = w_gate.shape[0]
    none = dy.new_empty(0)
    idx = padded_index(indices)
    g_s, u_s = wide(as_padded(g_s)), wide(as_padded(u_s))
    with on_device(dy):
        pos, omitted = kept_positions(indices, inter)
        dg_s, du_s, a_s = down_bwd(dy, *_w_down_operand(w_down, idx, indices.numel()), g_s, u_s, act)
        dwd = down_weight_bwd(dy, a_s, pos) if need_w_down else none
        del a_s
        dwg, dwu = gate_up_weight_bwd(dg_s, du_s, x, idx, omitted, inter) if need_w_gate_up else (none, none)
        dx = gate_up_input_bwd(dg_s, du_s, w_gate, w_up, idx) if need_x else none
    return dx, dwg, dwu, dwd


@_kept_mlp_bwd_op.register_fake
def _(dy, x, w_gate, w_up, w_down, indices, g_s, u_s, act, need_x, need_w_gate_up, need_w_down):
    none = dy.new_empty(0)
    return (x.new_empty(x.shape) if need_x else none,
            w_gate.new_empty(w_gate.shape) if need_w_gate_up else none,
            w_up.new_empty(w_up.shape) if need_w_gate_up else none,
            w_down.new_empty(w_down.shape) if need_w_down else none)


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, indices, g_s, u_s, _a, act, _dense_forward = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down, indices, g_s, u_s)
    ctx.act = act


def _backward(ctx, dy):
    x, w_gate, w_up, w_down, indices, g_s, u_s = ctx.saved_tensors
    need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
    dx, dwg, dwu, dwd = torch.ops.sat_kernels.triton_kept_mlp_bwd(
        dy.contiguous(), x, w_gate, w_up, w_down, indices, g_s, u_s, ctx.act, need_x, need_wg or need_wu, need_wd)
    return (dx if need_x else None, dwg if need_wg else None, dwu if need_wu else None, dwd if need_wd else None,
            None, None, None, None, None, None)


_kept_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def sat_mlp_triton(x2: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, select, act: str,
                   forward: str = "sparse"):
    """Launcher of the triton backend: ``x2`` is ``[T, h]``; returns ``(y [T, h], idx [k])``.

    ``select`` is a sorted int64 index tensor (``gathered_mlp``) or a :class:`~sat_kernels.ops.selector.Selector`,
    which gets the fp32 scores of its ``metric`` over the tokens of its ``token_mask`` fused into the gate/up kernel:
    ``select(scores=s)``.
    ``forward="dense"`` (selector only): ``y`` over every neuron, from the full ``A`` the gate/up kernel then also
    stores.

    fp32 on a GPU with TF32 off (torch's default, ``torch.backends.cuda.matmul.fp32_precision``) runs the torch
    backend: ``tl.dot`` on fp32 without TF32 is FMA code that spills kilobytes per thread (6 KB in the first config
    of ``_down_fwd_kernel``, sm_90a, triton 3.9), where cuBLAS computes the same fp32 GEMMs. With TF32 on, fp32 runs
    these kernels with their own BK = 32 configs.
    """
    check_tensors(x2)
    if x2.dtype == torch.float32 and not INTERPRET and dot_precision(torch.float32) == "ieee":
        return sat_mlp_torch(x2, w_gate, w_up, w_down, select, act, forward)
    x2, w_gate, w_up, w_down = (t.contiguous() for t in (x2, w_gate, w_up, w_down))
    xd, wgd, wud, wdd = (t.detach() for t in (x2, w_gate, w_up, w_down))
    dense_forward = forward == "dense" and not isinstance(select, Tensor)
    if isinstance(select, Tensor):
        idx = select.contiguous()
        g_s, u_s, a = torch.ops.sat_kernels.triton_gate_up_kept(xd, wgd, wud, idx, act)
    else:
        g, u, a_full, scores = torch.ops.sat_kernels.triton_gate_up_scores(xd, wgd, wud, wdd, act, select.metric,
                                                                             dense_forward, select.token_mask)
        idx = select(scores=scores).indices
        g_s, u_s, a_s = torch.ops.sat_kernels.triton_kept_act(g, u, idx, act, not dense_forward)
        a = a_full if dense_forward else a_s
        del g, u, scores, a_full, a_s
    y = torch.ops.sat_kernels.triton_kept_mlp(x2, w_gate, w_up, w_down, idx, g_s, u_s, a, act, dense_forward)
    return y, idx
