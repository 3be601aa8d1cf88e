"""The autograd op of SAT attention-head omission (Llama / Mistral / Qwen2 / Qwen3 / Gemma attention), and the dense
path it falls back to when every unit is kept.

Forward (in-step selection, docs/design.md section 2), token-major layouts ``[B, T, heads, d]``::

    Q = x W_q^T (+b_q), K = x W_k^T, V = x W_v^T      all H query / G key-value heads, once (the scores need them)
    Q, K = rope(norm(Q)), rope(norm(K))                optional per-head RMSNorm (Qwen3), RoPE from (cos, sin)
    O, lse = attention(Q, K, V)                        [B, T, H, d], [B, H, T]: every head (fused CPU kernel)
    s = score(O) per unit, S = select(s)               unit = a query head, or a KV group (its rep query heads)
    y = O[:, :, S] W_o[:, S]^T (+b_o)                  [B, T, h]: kept heads only (forward="sparse", the paper's)
    y = O W_o^T (+b_o)                                 [B, T, h]: every head (forward="dense", the exact output)

Saved for backward: ``x``, the kept heads' ``Q``, ``O``, ``lse`` (fused kernel) and the ``K``, ``V`` of their groups
(post-RoPE), plus the pre-norm projections of those heads when there is a q/k norm: never a tensor over all heads. The
backward is written out and runs only over kept heads: the ``o_proj`` gradients, the attention backward (torch's own
fused CPU flash-attention backward from the saved ``O``/``lse``, or an explicit softmax backward), RoPE, norm and the
q/k/v projection gradients of the kept heads' rows. The compact weight gradients are scattered into zero full-size
ones, so omitted heads' rows of ``W_q`` (and of ``W_k``/``W_v`` when no head of a group is kept) and columns of ``W_o``
get exactly zero.

The backward is written out rather than re-entering autograd for the kept heads (a forward of everything under
no-grad, then a second differentiable forward of the kept heads with gathered weights), which would repeat the kept
heads' q/k/v projections and attention (measured: docs/benchmarks.md, "Attention: SAT vs dense on CPU").

The exact-forward mode (``forward="dense"``, docs/design.md section 2) changes only ``y``: its backward, saved tensors
and gradients are the sparse mode's at the same kept heads (the gradient is taken at the dense model's loss). Its
forward adds the ``o_proj`` columns of the omitted heads: ``2 T h (H - k) d`` FLOPs.

With a given head set (``gathered_attention``) the op computes only the kept heads' projections and attention.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .checks import Operands
from .core import additive_mask, core_bwd, core_fwd, is_float_mask, math_probs
from .layout import AttentionSpec, groups_of, head_rows, project, scatter_cols, sum_heads_into_groups, take_cols, \
    take_heads
from .rope_norm import prep_qk, rms_norm_bwd, rope_bwd


class SATAttentionFunction(torch.autograd.Function):
    """Autograd op of SAT attention on ``x`` ``[B, T, h]``.

    Inputs: the fields of :class:`~.checks.Operands` in their order (``x``, the weights, the optional biases and
    norm weights, ``cos``, ``sin``, ``attention_mask``), then ``select`` and ``spec``. The backward returns the
    gradients by field name, so no gradient can reach the wrong input. ``select`` is either a ``LongTensor`` of kept
    query heads (``gathered_attention``) or a :class:`~sat_kernels.ops.selector.Selector` that scores the attention
    output of all heads ``o`` ``[B, H, T, d]`` per unit and picks the kept units (``sat_attention``; with
    ``spec.group_units`` a unit is a KV group and its heads are kept). Outputs
    ``(y [B, T, h], heads [k], scores, K, V)``: ``scores`` (fp32 per unit) empty for given heads; ``K``/``V``
    (``[B, G, T, d]``, post-RoPE, all groups) only with ``spec.return_kv`` (to fill a KV cache), else empty. With
    ``spec.forward == "dense"`` (a selector only) ``y`` is ``o_proj`` over every head, the exact dense output; the
    saved tensors and the backward are those of the kept heads all the same.

    The scores are an output, not written into a dict by ``select``, so that the caller can compute selection
    statistics from them: under ``torch.compile`` a side effect inside an autograd.Function's forward makes dynamo
    return every intermediate of the forward, and those that alias another (saved views such as ``o_flat``)
    cannot be returned, which fails the compilation (torch 2.13).
    """

    @staticmethod
    def forward(ctx, *args):
        operands, select, spec = Operands(*args[:-2]), args[-2], args[-1]
        x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask = operands
        B, T, hidden = x.shape
        x2 = x.reshape(B * T, hidden)
        if cos is not None:
            cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)      # [B or 1, T, 1, d]
        operands = operands._replace(x=x2, cos=cos, sin=sin)
        y = k_all = v_all = None
        if isinstance(select, torch.Tensor):
            kept, scores = _given_heads_fwd(operands, select, spec, B, T), x.new_empty(0, dtype=torch.float32)
        else:
            kept, scores, y, k_all, v_all = _selected_heads_fwd(operands, select, spec, B, T)
        kq, d = kept.heads.numel(), spec.head_dim
        o_flat = kept.o_s.reshape(B * T, kq * d)
        if y is None:
            y = F.linear(o_flat, take_cols(w_o, kept.heads, d), b_o)                   # [B*T, h]: kept heads only
        ctx.save_for_backward(x2, w_q, w_k, w_v, w_o, b_q, b_k, b_v, qn_w, kn_w, cos, sin, mask, kept.heads,
                              kept.groups, kept.head_group, kept.q_s, kept.k_g, kept.v_g, o_flat, kept.lse_s,
                              kept.q_raw_s if qn_w is not None else None, kept.k_raw_g if kn_w is not None else None)
        ctx.spec, ctx.shape, ctx.has_b_o = spec, (B, T, hidden), b_o is not None
        empty = x.new_empty(0)
        if spec.return_kv and k_all is not None:
            kv = (k_all.transpose(1, 2), v_all.transpose(1, 2))
        else:
            kv = (empty, empty.clone())
        ctx.mark_non_differentiable(kept.heads, scores, *kv)
        return y.view(B, T, hidden), kept.heads, scores, kv[0], kv[1]

    @staticmethod
    def backward(ctx, dy, _dheads, _dscores, _dk, _dv):
        (x2, w_q, w_k, w_v, w_o, b_q, b_k, b_v, qn_w, kn_w, cos, sin, mask, heads, groups, head_group, q_s, k_g, v_g,
         o_flat, lse_s, q_raw_s, k_raw_g) = ctx.saved_tensors
        spec = ctx.spec
        B, T, hidden = ctx.shape
        kq, kg, d = heads.numel(), groups.numel(), spec.head_dim
        need = dict(zip(Operands._fields, ctx.needs_input_grad))
        grads = {}                                                     # Operands field -> gradient
        dy2 = dy.reshape(B * T, hidden)
        if need["w_o"]:
            grads["w_o"] = scatter_cols(torch.mm(dy2.t(), o_flat).to(w_o.dtype), heads, spec.num_heads, d)
        if ctx.has_b_o and need["b_o"]:
            grads["b_o"] = dy2.sum(0).to(w_o.dtype)
        if any(need[name] for name in _BEFORE_O_PROJ):
            do = torch.mm(dy2, take_cols(w_o, heads, d)).view(B, T, kq, d)
            dq, dk, dv = _core_bwd(do, q_s, k_g, v_g, o_flat, lse_s, mask, head_group, kg, spec)
            if cos is not None:
                dq, dk = rope_bwd(dq, cos, sin), rope_bwd(dk, cos, sin)
            if qn_w is not None:
                dq, grads["q_norm_weight"] = rms_norm_bwd(dq, q_raw_s, qn_w, spec.norm_eps, need["q_norm_weight"])
            if kn_w is not None:
                dk, grads["k_norm_weight"] = rms_norm_bwd(dk, k_raw_g, kn_w, spec.norm_eps, need["k_norm_weight"])
            dq2, dk2, dv2 = dq.reshape(B * T, kq * d), dk.reshape(B * T, kg * d), dv.reshape(B * T, kg * d)
            rows_q = head_rows(heads, d)
            rows_kv = head_rows(groups, d) if kg < spec.num_kv_heads else None
            for p, w, g2, rows in (("q", w_q, dq2, rows_q), ("k", w_k, dk2, rows_kv), ("v", w_v, dv2, rows_kv)):
                if need[f"w_{p}"]:
                    gw = torch.mm(g2.t(), x2).to(w.dtype)
                    grads[f"w_{p}"] = gw if rows is None else w.new_zeros(w.shape).index_copy_(0, rows, gw)
                if need[f"b_{p}"]:
                    gb = g2.sum(0).to(w.dtype)
                    grads[f"b_{p}"] = gb if rows is None else w.new_zeros(w.shape[0]).index_copy_(0, rows, gb)
            if need["x"]:
                dx = torch.mm(dq2, w_q.index_select(0, rows_q))
                dx.addmm_(dk2, w_k if rows_kv is None else w_k.index_select(0, rows_kv))
                dx.addmm_(dv2, w_v if rows_kv is None else w_v.index_select(0, rows_kv))
                grads["x"] = dx.view(B, T, hidden)
        return tuple(grads.get(name) for name in Operands._fields) + (None, None)   # select, spec


class _Kept(NamedTuple):
    """The kept heads of one forward and what the backward needs of them (token-major ``[B, T, n, d]``)."""
    heads: torch.Tensor          # [kq] kept query heads, sorted
    groups: torch.Tensor         # [kg] their KV groups (see layout.groups_of)
    head_group: torch.Tensor     # [kq] position of each head's group in ``groups``
    q_s: torch.Tensor            # [B, T, kq, d] post-norm/RoPE queries
    k_g: torch.Tensor            # [B, T, kg, d] post-norm/RoPE keys of the groups
    v_g: torch.Tensor            # [B, T, kg, d]
    o_s: torch.Tensor            # [B, T, kq, d] attention outputs
    lse_s: Optional[torch.Tensor]    # [B, kq, T] log-sum-exp of the fused kernel, or None
    q_raw_s: Optional[torch.Tensor]  # pre-norm projections (with a q/k norm), else None
    k_raw_g: Optional[torch.Tensor]


def _given_heads_fwd(ops: Operands, heads: torch.Tensor, spec: AttentionSpec, B: int, T: int) -> _Kept:
    """The forward of the given heads only (``gathered_attention``): their projections and attention."""
    d, G = spec.head_dim, spec.num_kv_heads
    groups, head_group = groups_of(heads, spec)
    kq, kg = heads.numel(), groups.numel()
    kv_rows = head_rows(groups, d) if kg < G else None
    q_raw = project(ops.x, ops.w_q, ops.b_q, head_rows(heads, d)).view(B, T, kq, d)
    k_raw = project(ops.x, ops.w_k, ops.b_k, kv_rows).view(B, T, kg, d)
    v_g = project(ops.x, ops.w_v, ops.b_v, kv_rows).view(B, T, kg, d)
    q_s = prep_qk(q_raw, ops.q_norm_weight, ops.cos, ops.sin, spec.norm_eps)                  # [B, T, kq, d]
    k_g = prep_qk(k_raw, ops.k_norm_weight, ops.cos, ops.sin, spec.norm_eps)                  # [B, T, kg, d]
    o_s, lse_s = core_fwd(q_s.transpose(1, 2), take_heads(k_g, head_group).transpose(1, 2),
                          take_heads(v_g, head_group).transpose(1, 2), ops.attention_mask, spec)
    return _Kept(heads, groups, head_group, q_s, k_g, v_g, o_s.transpose(1, 2), lse_s, q_raw, k_raw)


def _selected_heads_fwd(ops: Operands, select, spec: AttentionSpec, B: int, T: int):
    """The forward of every head, the selection and the kept heads' share: ``(kept, scores, y or None, K, V)``;
    ``y`` ``[B*T, h]`` over every head with ``spec.forward == "dense"``, else ``None``."""
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rep = H // G
    q_raw = F.linear(ops.x, ops.w_q, ops.b_q).view(B, T, H, d)
    k_raw = F.linear(ops.x, ops.w_k, ops.b_k).view(B, T, G, d)
    v_all = F.linear(ops.x, ops.w_v, ops.b_v).view(B, T, G, d)
    q = prep_qk(q_raw, ops.q_norm_weight, ops.cos, ops.sin, spec.norm_eps)                    # [B, T, H, d]
    k_all = prep_qk(k_raw, ops.k_norm_weight, ops.cos, ops.sin, spec.norm_eps)                # [B, T, G, d]
    group_of = torch.arange(H, device=q.device) // rep
    k_e = take_heads(k_all, group_of) if rep > 1 else k_all
    v_e = take_heads(v_all, group_of) if rep > 1 else v_all
    o, lse = core_fwd(q.transpose(1, 2), k_e.transpose(1, 2), v_e.transpose(1, 2), ops.attention_mask, spec)
    del k_e, v_e
    units, scores, _ = select(o)                                                   # [k units], [n_units]
    heads = (units[:, None] * rep + torch.arange(rep, device=q.device)).reshape(-1) if spec.group_units else units
    groups, head_group = groups_of(heads, spec)
    y = None
    if spec.forward == "dense":                                                    # o_proj over all heads
        y = F.linear(o.transpose(1, 2).reshape(B * T, H * d), ops.w_o, ops.b_o)  # [B*T, h]
    some = groups.numel() < G
    kept = _Kept(heads, groups, head_group, take_heads(q, heads),
                 take_heads(k_all, groups) if some else k_all, take_heads(v_all, groups) if some else v_all,
                 take_heads(o.transpose(1, 2), heads), lse.index_select(1, heads) if lse is not None else None,
                 take_heads(q_raw, heads) if ops.q_norm_weight is not None else None,
                 (take_heads(k_raw, groups) if some else k_raw) if ops.k_norm_weight is not None else None)
    return kept, scores, y, k_all, v_all


# The inputs whose gradients flow through the attention core (all but o_proj's).
_BEFORE_O_PROJ = ("x", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "q_norm_weight", "k_norm_weight")


def _core_bwd(do, q_s, k_g, v_g, o_flat, lse_s, mask, head_group, kg: int, spec: AttentionSpec):
    """Attention-core backward of the ``kq`` kept heads from ``do`` ``[B, T, kq, d]``: ``(dq [B, T, kq, d],
    dk, dv [B, T, kg, d])``, the key/value gradients of a group summed over its kept heads."""
    k_e, v_e = take_heads(k_g, head_group), take_heads(v_g, head_group)
    dq, dk_e, dv_e = core_bwd(do.transpose(1, 2), q_s.transpose(1, 2), k_e.transpose(1, 2), v_e.transpose(1, 2),
                               o_flat.view(do.shape).transpose(1, 2), lse_s, mask, spec)
    del k_e, v_e
    dq, dk_e, dv_e = dq.transpose(1, 2), dk_e.transpose(1, 2), dv_e.transpose(1, 2)       # [B, T, n, d]
    if spec.num_heads == spec.num_kv_heads:    # multi-head attention: one group per kept head, no reduction
        return dq, dk_e, dv_e
    return dq, sum_heads_into_groups(dk_e, head_group, kg), sum_heads_into_groups(dv_e, head_group, kg)


def sat_attention_torch(operands: Operands, select, spec: AttentionSpec):
    """Launcher of the torch backend; returns ``(y [B, T, h], heads [k], scores, K, V)`` (see
    :class:`SATAttentionFunction`)."""
    return SATAttentionFunction.apply(*operands, select, spec)


def dense_attention(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask,
                    spec: AttentionSpec) -> torch.Tensor:
    """The dense attention as Hugging Face's ``sdpa`` attention computes it (``F.linear``, RMSNorm, RoPE,
    ``F.scaled_dot_product_attention``; with a float mask, its ``eager`` attention), differentiated by autograd."""
    B, T, _ = x.shape
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if cos is not None:
        cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)
    q = prep_qk(F.linear(x, w_q, b_q).view(B, T, H, d), qn_w, cos, sin, spec.norm_eps).transpose(1, 2)
    k = prep_qk(F.linear(x, w_k, b_k).view(B, T, G, d), kn_w, cos, sin, spec.norm_eps).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(B, T, G, d).transpose(1, 2)
    if H != G:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    if is_float_mask(mask):   # F.scaled_dot_product_attention's fused CPU backward: see core._flash_bias
        o = torch.matmul(math_probs(q, k, mask, spec).to(q.dtype), v)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype), is_causal=spec.causal,
                                           scale=spec.scale)
    return F.linear(o.transpose(1, 2).reshape(B, T, H * d), w_o, b_o)
