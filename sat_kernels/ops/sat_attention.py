"""SAT attention-head omission on the ``"torch"`` backend (Llama / Mistral / Qwen2 / Qwen3 / Gemma attention).

Forward (in-step selection, DESIGN.md section 2), token-major layouts ``[B, T, heads, d]``::

    Q = x W_q^T (+b_q), K = x W_k^T, V = x W_v^T      all H query / G key-value heads, once (the scores need them)
    Q, K = rope(norm(Q)), rope(norm(K))                optional per-head RMSNorm (Qwen3), RoPE from (cos, sin)
    O, lse = attention(Q, K, V)                        [B, T, H, d], [B, H, T]: every head (fused CPU kernel)
    s = score(O) per unit, S = select(s)               unit = a query head, or a KV group (its rep query heads)
    y = O[:, :, S] W_o[:, S]^T (+b_o)                  [B, T, h]: kept heads only

Saved for backward: ``x``, the kept heads' ``Q``, ``O``, ``lse`` (fused kernel) and the ``K``, ``V`` of their groups
(post-RoPE), plus the pre-norm projections of those heads when there is a q/k norm: never a tensor over all heads. The
backward is written out and runs only over kept heads: the ``o_proj`` gradients, the attention backward (torch's own
fused CPU flash-attention backward from the saved ``O``/``lse``, or an explicit softmax backward), RoPE, norm and the
q/k/v projection gradients of the kept heads' rows. The compact weight gradients are scattered into zero full-size
ones, so omitted heads' rows of ``W_q`` (and of ``W_k``/``W_v`` when no head of a group is kept) and columns of ``W_o``
get exactly zero.

Writing the backward out beats re-entering autograd for the kept heads (forward of everything under no-grad, then a
second differentiable forward of the kept heads with gathered weights), which repeats the kept heads' q/k/v
projections and attention. Forward+backward time relative to the dense Hugging Face ``LlamaAttention`` (sdpa) at
SmolLM2-135M attention shapes (h 576, 9 query / 3 KV heads, d 64), random weights, B 4, fp32, omission 0.5, median of
7 interleaved ratios, 1 thread of a shared 2-core x86-64 machine (load average 5-7), torch 2.13.0+cpu: T 512 0.70x
written out vs 0.90x re-entering autograd; T 1024 0.67x vs 0.82x.

``gathered_attention`` with a given head set computes only the kept heads' projections and attention.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_scores, default_sync_group
from ..selection import METRICS, STRATEGIES, check_choice, check_omission_rate, draw_uniform, num_kept, select_neurons
from . import _autocast_operands, check_indices

UNITS = ("head", "group")
# Default unit of selection for grouped-query attention: "head" (see sat_attention's docstring for the measurement).
DEFAULT_UNIT = "head"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The fused CPU flash-attention kernel (forward + backward) handles these dtypes; others use the explicit path.
_FLASH_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


class AttentionSpec(NamedTuple):
    """Static description of one attention call (hashable, not a tensor)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    norm_eps: float
    return_kv: bool = False
    group_units: bool = False      # the kept heads form whole KV groups (unit="group")


# --------------------------------------------------------------------------------------------------- elementwise parts

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of token-major ``t`` ``[B, T, n, d]``; ``cos``/``sin`` ``[B or 1, T, 1, d]``."""
    return t * cos + _rotate_half(t) * sin


def _rope_bwd(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`_rope`: ``rotate_half`` is ``R``, its transpose is ``-R``."""
    return g * cos - _rotate_half(g * sin)


def _rms_norm(u: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm as Hugging Face ``Qwen3RMSNorm`` computes it (fp32 statistics, fp64 for fp64 input)."""
    u_acc = u.to(_acc_dtype(u.dtype))
    n = u_acc * torch.rsqrt(u_acc.pow(2).mean(-1, keepdim=True) + eps)
    return w * n.to(u.dtype)


def _rms_norm_bwd(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, eps: float, need_w: bool):
    """Gradients of :func:`_rms_norm` w.r.t. ``u`` and (summed over all leading dims) ``w``."""
    acc = _acc_dtype(u.dtype)
    u_acc = u.to(acc)
    rstd = torch.rsqrt(u_acc.pow(2).mean(-1, keepdim=True) + eps)
    n = u_acc * rstd
    dw = (g.to(acc) * n.to(u.dtype).to(acc)).reshape(-1, u.shape[-1]).sum(0).to(w.dtype) if need_w else None
    dn = g.to(acc) * w.to(acc)
    du = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return du.to(u.dtype), dw


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Rows of ``W_q`` (or columns of ``W_o``) of the heads ``heads``: ``[len(heads) * d]``."""
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1)


def _groups_of(heads: torch.Tensor, spec: AttentionSpec):
    """The KV groups whose keys and values the kept query heads ``heads`` (sorted) are computed with (sorted), and per
    head the position of its group among them.

    Their number depends only on ``len(heads)``, never on which heads were kept, and finding them needs no host
    synchronisation (``torch.unique``, used before, has a data-dependent size: a sync on GPU and a graph break under
    ``torch.compile``). With ``group_units`` the heads form ``len(heads) / rep`` whole groups. Otherwise the first
    ``min(G, len(heads))`` groups are every group that holds a kept head, then the lowest-numbered others, whose k/v
    gradients come out exactly zero: with at least G kept heads (SmolLM2: 3 groups, omission <= 2/3) that is all groups.
    """
    G = spec.num_kv_heads
    rep, kq = spec.num_heads // G, heads.numel()
    if rep == 1:
        return heads, torch.arange(kq, device=heads.device)
    of_head = torch.div(heads, rep, rounding_mode="floor")
    kg = kq // rep if spec.group_units else min(G, kq)
    if kg == G:
        return torch.arange(G, device=heads.device), of_head
    touched = torch.zeros(G, device=heads.device).index_fill_(0, of_head, 1.0)                      # [G]
    groups = torch.sort(torch.argsort(touched, descending=True, stable=True)[:kg]).values           # [kg]
    position = torch.zeros(G, dtype=torch.long, device=heads.device).index_copy_(
        0, groups, torch.arange(kg, device=heads.device))
    return groups, position[of_head]


def _take_heads(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Heads ``idx`` of a token-major ``t`` ``[B, T, n, d]``: ``[B, T, len(idx), d]``, contiguous.

    A column gather on the ``[B*T, n*d]`` view: ``index_select`` along dim 2 of the 4-D tensor takes 60 ms on CPU for
    ``[4, 512, 9, 64]`` fp32, the 2-D column gather 0.25 ms (torch 2.13, 2 threads).
    """
    B, T, n, d = t.shape
    return t.reshape(B * T, n * d).index_select(1, _head_rows(idx, d)).view(B, T, idx.numel(), d)


def _sum_heads_into_groups(t: torch.Tensor, head_group: torch.Tensor, kg: int) -> torch.Tensor:
    """``[B, T, kq, d]`` per-head gradients summed into their groups: ``[B, T, kg, d]``.

    One batched matmul with the 0/1 ``[kg, kq]`` membership matrix (0.3 ms for ``[4, 512, 5, 64]`` fp32 on CPU):
    ``index_add_`` issues one strided add per head, each a parallel region, and measured from 0.09 to 73 ms between
    runs on the shared 2-core machine (torch 2.13).
    """
    member = (head_group[None, :] == torch.arange(kg, device=t.device)[:, None]).to(t.dtype)     # [kg, kq]
    return torch.matmul(member, t)


def _project(x2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rows: Optional[torch.Tensor]):
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    return F.linear(x2, w, b)


# ----------------------------------------------------------------------------------------------------- attention core

def _is_float_mask(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and mask.dtype != torch.bool


def _core_kind(q: torch.Tensor, mask: Optional[torch.Tensor], spec: AttentionSpec) -> str:
    """``"flash"``: torch's fused CPU flash-attention forward/backward (2.6x faster than the explicit path for
    B 4, 5 heads, T 512, d 64, fp32, 2 threads, torch 2.13); ``"math"``: explicit matmul + softmax (any device; also
    a float mask together with ``causal``: a row without an allowed key then weighs only the keys up to its query,
    which :func:`_no_key_dk` does not cover)."""
    if spec.causal and _is_float_mask(mask):
        return "math"
    return "flash" if q.device.type == "cpu" and q.dtype in _FLASH_CPU_DTYPES else "math"


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = attend) as an additive one (0 / -inf) in ``dtype``; a float mask cast to ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _flash_bias(mask: Optional[torch.Tensor], dtype: torch.dtype):
    """The additive mask for the fused kernel, in the accumulation dtype ``dtype`` (fp32 for bf16 operands, so a
    ``finfo(float32).min`` mask does not become -inf), and the query rows without an allowed key under a float mask
    (``[B or 1, 1, T, 1]`` bool; ``None`` without a float mask).

    The fused backward rebuilds the probabilities as ``exp(score + mask - lse)`` from the forward's log-sum-exp. With
    Hugging Face's eager masks that broke on a left-padded query, whose row is ``finfo.min`` everywhere: eager attention
    computes ``score + finfo.min == finfo.min`` for every key there, so equal weights ``1/S``, but the log-sum-exp
    ``finfo.min + log S`` rounds to ``finfo.min`` and the backward took every weight as 1 (gradients up to S times too
    large). So a float mask is shifted per query row by its largest finite value (the softmax is the same, the
    log-sum-exp stays representable), and a row holding one value ``c`` with ``c + 1 == c`` (no score can change it)
    gets its query zeroed by the caller: all its scores 0, weights ``1/S`` as eager's, with the forward's
    log-sum-exp exact. A -inf or boolean row with no allowed key outputs 0.
    """
    if not _is_float_mask(mask):
        return additive_mask(mask, dtype), None
    m = mask.to(dtype)
    hi, lo = m.amax(-1, keepdim=True), m.amin(-1, keepdim=True)                    # [B or 1, 1, T, 1]
    finite = hi > float("-inf")
    no_key = finite & (hi == lo) & (hi + 1 == hi)
    return m - torch.where(finite, hi, torch.zeros_like(hi)), no_key


def _no_key_dk(q, do, v, no_key, scale: float) -> torch.Tensor:
    """The key gradient from the query rows without an allowed key, which the fused backward misses (it saw their
    queries as 0). Such a row ``i`` has weights ``1/S`` and output ``mean(v)``, so autograd's
    ``sum_i ds_ij q_i = (scale / S) D (v_j - mean(v))`` with ``D = sum_i q_i do_i^T``: ``[d, d]`` per head, two
    ``T x d x d`` products instead of the ``T x S x d`` ones of an explicit backward."""
    acc = _acc_dtype(q.dtype)
    q_nk = q.to(acc).masked_fill(~no_key, 0.0)                                           # [B, n, T, d]
    d_nk = torch.matmul(q_nk.transpose(-1, -2), do.to(acc))                              # [B, n, d, d]
    v_c = v.to(acc) - v.to(acc).mean(-2, keepdim=True)                                   # [B, n, S, d]
    return torch.matmul(v_c, d_nk.transpose(-1, -2)).mul_(scale / v.shape[-2])          # [B, n, S, d]


def _math_probs(q, k, mask, spec: AttentionSpec) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` (causal: upper triangle -inf) in the accumulation dtype, ``[B, n, T, S]``,
    as eager attention computes it; a row with no finite score (-inf or boolean mask) is 0."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(_acc_dtype(q.dtype)).mul_(spec.scale)
    if mask is not None:
        s = s + additive_mask(mask, s.dtype)
    if spec.causal:
        t, l = s.shape[-2:]
        s = s.masked_fill(torch.ones(t, l, dtype=torch.bool, device=s.device).triu_(l - t + 1), float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)      # dense_attention differentiates it


def _core_fwd(q, k, v, mask, spec: AttentionSpec):
    """Attention of ``[B, n, T, d]`` views (k, v with as many heads as q); returns ``(o, lse)``, o like q's layout;
    ``lse`` ``[B, n, T]`` is the fused kernel's log-sum-exp (its backward rebuilds the probabilities from it), ``None``
    on the explicit path, whose backward recomputes the softmax."""
    if q.numel() == 0:      # B or T is 0: the fused CPU kernel dies of SIGFPE at T = 0 (torch 2.13)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    if _core_kind(q, mask, spec) == "flash":
        bias, no_key = _flash_bias(mask, _acc_dtype(q.dtype))
        q_s = q if no_key is None else q.masked_fill(no_key, 0.0)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_s, k, v, 0.0, spec.causal, attn_mask=bias, scale=spec.scale)
    return torch.matmul(_math_probs(q, k, mask, spec).to(q.dtype), v), None


def _core_bwd(do, q, k, v, o, lse, mask, spec: AttentionSpec):
    """``(dq, dk, dv)`` of :func:`_core_fwd` from its saved ``o`` and ``lse``."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = _acc_dtype(q.dtype)
    if _core_kind(q, mask, spec) == "flash":
        bias, no_key = _flash_bias(mask, acc)
        q_s = q if no_key is None else q.masked_fill(no_key, 0.0)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q_s, k, v, o, lse, 0.0, spec.causal, attn_mask=bias, scale=spec.scale)
        if no_key is not None:
            dk = (dk.to(acc) + _no_key_dk(q, do, v, no_key, spec.scale)).to(dk.dtype)
        return dq, dk, dv
    p = _math_probs(q, k, mask, spec)                                                      # [B, n, T, S]
    dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2)).to(acc)
    delta = (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)
    ds = (p * (dp - delta)).mul_(spec.scale).to(q.dtype)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


# ------------------------------------------------------------------------------------------------ the autograd Function

def _prep_qk(raw: torch.Tensor, norm_w, cos, sin, eps: float) -> torch.Tensor:
    t = _rms_norm(raw, norm_w, eps) if norm_w is not None else raw
    return _rope(t, cos, sin) if cos is not None else t


class SATAttentionFunction(torch.autograd.Function):
    """Autograd op of SAT attention on ``x`` ``[B, T, h]``.

    ``select`` is either a ``LongTensor`` of kept query heads (``gathered_attention``) or a callable
    ``select(o) -> heads`` that scores the attention output of all heads ``o`` ``[B, H, T, d]`` and picks the kept
    heads (``sat_attention``). Outputs ``(y [B, T, h], heads [k], K, V)``; ``K``/``V`` (``[B, G, T, d]``, post-RoPE, all
    groups) only with ``spec.return_kv`` (to fill a KV cache), else empty.
    """

    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask, select,
                spec: AttentionSpec):
        B, T, hidden = x.shape
        H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        rep = H // G
        x2 = x.reshape(B * T, hidden)
        if cos is not None:
            cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)      # [B or 1, T, 1, d]
        k_all = v_all = None
        if isinstance(select, torch.Tensor):
            heads = select
            groups, head_group = _groups_of(heads, spec)
            kq, kg = heads.numel(), groups.numel()
            q_raw = _project(x2, w_q, b_q, _head_rows(heads, d)).view(B, T, kq, d)
            k_raw = _project(x2, w_k, b_k, _head_rows(groups, d) if kg < G else None).view(B, T, kg, d)
            v_g = _project(x2, w_v, b_v, _head_rows(groups, d) if kg < G else None).view(B, T, kg, d)
            q_s = _prep_qk(q_raw, qn_w, cos, sin, spec.norm_eps)                        # [B, T, kq, d]
            k_g = _prep_qk(k_raw, kn_w, cos, sin, spec.norm_eps)                        # [B, T, kg, d]
            o_s, lse_s = _core_fwd(q_s.transpose(1, 2), _take_heads(k_g, head_group).transpose(1, 2),
                                   _take_heads(v_g, head_group).transpose(1, 2), mask, spec)
            o_s = o_s.transpose(1, 2)                                                   # [B, T, kq, d]
            q_raw_s, k_raw_g = q_raw, k_raw
        else:
            q_raw = F.linear(x2, w_q, b_q).view(B, T, H, d)
            k_raw = F.linear(x2, w_k, b_k).view(B, T, G, d)
            v_all = F.linear(x2, w_v, b_v).view(B, T, G, d)
            q = _prep_qk(q_raw, qn_w, cos, sin, spec.norm_eps)                          # [B, T, H, d]
            k_all = _prep_qk(k_raw, kn_w, cos, sin, spec.norm_eps)                      # [B, T, G, d]
            group_of = torch.arange(H, device=x.device) // rep
            k_e = _take_heads(k_all, group_of) if rep > 1 else k_all
            v_e = _take_heads(v_all, group_of) if rep > 1 else v_all
            o, lse = _core_fwd(q.transpose(1, 2), k_e.transpose(1, 2), v_e.transpose(1, 2), mask, spec)
            del k_e, v_e
            heads = select(o)                                                           # [kq]
            groups, head_group = _groups_of(heads, spec)
            kq, kg = heads.numel(), groups.numel()
            o_s = _take_heads(o.transpose(1, 2), heads)                                 # [B, T, kq, d]
            lse_s = lse.index_select(1, heads) if lse is not None else None             # [B, kq, T]
            del o, lse
            q_s = _take_heads(q, heads)
            k_g = _take_heads(k_all, groups) if kg < G else k_all
            v_g = _take_heads(v_all, groups) if kg < G else v_all
            q_raw_s = _take_heads(q_raw, heads) if qn_w is not None else None
            k_raw_g = (_take_heads(k_raw, groups) if kg < G else k_raw) if kn_w is not None else None
            del q, q_raw, k_raw
        o_flat = o_s.reshape(B * T, kq * d)
        y = F.linear(o_flat, w_o.index_select(1, _head_rows(heads, d)), b_o)           # [B*T, h]
        ctx.save_for_backward(x2, w_q, w_k, w_v, w_o, b_q, b_k, b_v, qn_w, kn_w, cos, sin, mask, heads, groups,
                              head_group, q_s, k_g, v_g, o_flat, lse_s,
                              q_raw_s if qn_w is not None else None, k_raw_g if kn_w is not None else None)
        ctx.spec, ctx.shape, ctx.has_b_o = spec, (B, T, hidden), b_o is not None
        empty = x.new_empty(0)
        if spec.return_kv and k_all is not None:
            kv = (k_all.transpose(1, 2), v_all.transpose(1, 2))
        else:
            kv = (empty, empty.clone())
        ctx.mark_non_differentiable(heads, *kv)
        return y.view(B, T, hidden), heads, kv[0], kv[1]

    @staticmethod
    def backward(ctx, dy, _dheads, _dk, _dv):
        (x2, w_q, w_k, w_v, w_o, b_q, b_k, b_v, qn_w, kn_w, cos, sin, mask, heads, groups, head_group, q_s, k_g, v_g,
         o_flat, lse_s, q_raw_s, k_raw_g) = ctx.saved_tensors
        spec = ctx.spec
        B, T, hidden = ctx.shape
        H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        kq, kg = heads.numel(), groups.numel()
        need = ctx.needs_input_grad
        grads = [None] * 16
        dy2 = dy.reshape(B * T, hidden)
        cols = _head_rows(heads, d)
        # o_proj
        if need[4]:
            grads[4] = w_o.new_zeros(w_o.shape).index_copy_(1, cols, torch.mm(dy2.t(), o_flat).to(w_o.dtype))
        if ctx.has_b_o and need[8]:
            grads[8] = dy2.sum(0).to(w_o.dtype)
        if not any(need[i] for i in (0, 1, 2, 3, 5, 6, 7, 9, 10)):
            return tuple(grads)
        do = torch.mm(dy2, w_o.index_select(1, cols)).view(B, T, kq, d)
        # attention core, kept heads only
        k_e, v_e = _take_heads(k_g, head_group), _take_heads(v_g, head_group)
        dq, dk_e, dv_e = _core_bwd(do.transpose(1, 2), q_s.transpose(1, 2), k_e.transpose(1, 2),
                                   v_e.transpose(1, 2), o_flat.view(B, T, kq, d).transpose(1, 2), lse_s, mask, spec)
        del k_e, v_e, do
        dq, dk_e, dv_e = dq.transpose(1, 2), dk_e.transpose(1, 2), dv_e.transpose(1, 2)   # [B, T, n, d]
        if H == G:        # multi-head attention: one group per kept head, no reduction
            dk, dv = dk_e, dv_e
        else:
            dk, dv = _sum_heads_into_groups(dk_e, head_group, kg), _sum_heads_into_groups(dv_e, head_group, kg)
        if cos is not None:
            dq, dk = _rope_bwd(dq, cos, sin), _rope_bwd(dk, cos, sin)
        if qn_w is not None:
            dq, grads[9] = _rms_norm_bwd(dq, q_raw_s, qn_w, spec.norm_eps, need[9])
        if kn_w is not None:
            dk, grads[10] = _rms_norm_bwd(dk, k_raw_g, kn_w, spec.norm_eps, need[10])
        dq2, dk2, dv2 = dq.reshape(B * T, kq * d), dk.reshape(B * T, kg * d), dv.reshape(B * T, kg * d)
        rows_q = _head_rows(heads, d)
        rows_kv = _head_rows(groups, d) if kg < G else None
        for i, (w, g2, rows) in enumerate(((w_q, dq2, rows_q), (w_k, dk2, rows_kv), (w_v, dv2, rows_kv)), start=1):
            if need[i]:
                gw = torch.mm(g2.t(), x2).to(w.dtype)
                grads[i] = gw if rows is None else w.new_zeros(w.shape).index_copy_(0, rows, gw)
            if need[i + 4]:
                gb = g2.sum(0).to(w.dtype)
                grads[i + 4] = gb if rows is None else w.new_zeros(w.shape[0]).index_copy_(0, rows, gb)
        if need[0]:
            dx = torch.mm(dq2, w_q.index_select(0, rows_q))
            dx.addmm_(dk2, w_k if rows_kv is None else w_k.index_select(0, rows_kv))
            dx.addmm_(dv2, w_v if rows_kv is None else w_v.index_select(0, rows_kv))
            grads[0] = dx.view(B, T, hidden)
        return tuple(grads)


def sat_attention_torch(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask, select,
                        spec: AttentionSpec):
    """Launcher of the torch backend; returns ``(y [B, T, h], heads [k], K, V)`` (see :class:`SATAttentionFunction`)."""
    return SATAttentionFunction.apply(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask, select,
                                      spec)


# ------------------------------------------------------------------------------------------------ dense and scoring

def dense_attention(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, qn_w, kn_w, cos, sin, mask,
                    spec: AttentionSpec) -> torch.Tensor:
    """The dense attention as Hugging Face's ``sdpa`` attention computes it (``F.linear``, RMSNorm, RoPE,
    ``F.scaled_dot_product_attention``; with a float mask, its ``eager`` attention), differentiated by autograd."""
    B, T, _ = x.shape
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if cos is not None:
        cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)
    q = _prep_qk(F.linear(x, w_q, b_q).view(B, T, H, d), qn_w, cos, sin, spec.norm_eps).transpose(1, 2)
    k = _prep_qk(F.linear(x, w_k, b_k).view(B, T, G, d), kn_w, cos, sin, spec.norm_eps).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(B, T, G, d).transpose(1, 2)
    if H != G:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    if _is_float_mask(mask):   # F.scaled_dot_product_attention's fused CPU backward: see _flash_bias
        o = torch.matmul(_math_probs(q, k, mask, spec).to(q.dtype), v)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype), is_causal=spec.causal,
                                           scale=spec.scale)
    return F.linear(o.transpose(1, 2).reshape(B, T, H * d), w_o, b_o)


def unit_scores(o: torch.Tensor, w_o: torch.Tensor, metric: str, unit: str, num_kv_heads: int) -> torch.Tensor:
    """fp32 score per selection unit from the attention output ``o`` ``[B, H, T, d]`` (any strides).

    A unit's output is the concatenation of its heads' outputs (one head, or the ``H / G`` heads of a KV group):
    ``"l2"`` its Frobenius norm over all tokens, ``"l1"`` the sum of its absolute values, ``"contrib"`` its norm times
    the Frobenius norm of the unit's columns of ``w_o``.
    """
    acc = _acc_dtype(o.dtype)
    H, d = o.shape[1], o.shape[3]
    per_head = (o.abs() if metric == "l1" else o * o).sum(dim=(0, 2, 3), dtype=acc)                 # [H]
    per_unit = per_head.view(num_kv_heads, -1).sum(1) if unit == "group" else per_head
    if metric == "l1":
        return per_unit.float()
    s = per_unit.sqrt()
    if metric == "contrib":
        w_sq = (w_o * w_o).sum(0, dtype=acc).view(H, d).sum(1)
        s = s * (w_sq.view(num_kv_heads, -1).sum(1) if unit == "group" else w_sq).sqrt()
    return s.float()


# ------------------------------------------------------------------------------------------------ argument checks

class _Operands(NamedTuple):
    x: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_q: Optional[torch.Tensor]
    b_k: Optional[torch.Tensor]
    b_v: Optional[torch.Tensor]
    b_o: Optional[torch.Tensor]
    q_norm_weight: Optional[torch.Tensor]
    k_norm_weight: Optional[torch.Tensor]
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_attention_inputs(x, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None, cos=None, sin=None,
                           attention_mask=None, causal=True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                           q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6):
    """Validate the attention operands; returns ``(_Operands, AttentionSpec)``."""
    named = {"x": x, "w_q": w_q, "w_k": w_k, "w_v": w_v, "w_o": w_o}
    optional = {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": b_o, "q_norm_weight": q_norm_weight,
                "k_norm_weight": k_norm_weight, "cos": cos, "sin": sin}
    for name, t in list(named.items()) + [(n, t) for n, t in optional.items() if t is not None]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor (float64/32/16, bfloat16), got {t.dtype}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (RoPE) or both be None")
    given = {**named, **{n: t for n, t in optional.items() if t is not None and n not in ("cos", "sin")}}
    dtypes = {n: t.dtype for n, t in given.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"x, the weights and the biases/norm weights must share one dtype, got {dtypes}")
    tensors = {**given, **({"cos": cos, "sin": sin} if cos is not None else {}),
               **({"attention_mask": attention_mask} if isinstance(attention_mask, torch.Tensor) else {})}
    devices = {n: str(t.device) for n, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, h], got shape {tuple(x.shape)}")
    B, T, hidden = x.shape
    H = _check_int(num_heads, "num_heads")
    G = H if num_kv_heads is None else _check_int(num_kv_heads, "num_kv_heads")
    if H % G:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({G})")
    if w_q.dim() != 2 or w_q.shape[1] != hidden or w_q.shape[0] % H or w_q.shape[0] == 0:
        raise ValueError(f"w_q must be [num_heads * head_dim, h] with h = {hidden} (x.shape[-1]), num_heads = {H} "
                         f"and head_dim >= 1, got shape {tuple(w_q.shape)}")
    d = w_q.shape[0] // H
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if tuple(w.shape) != (G * d, hidden):
            raise ValueError(f"{name} must be [num_kv_heads * head_dim, h] = {(G * d, hidden)}, got {tuple(w.shape)}")
    if tuple(w_o.shape) != (hidden, H * d):
        raise ValueError(f"w_o must be [h, num_heads * head_dim] = {(hidden, H * d)}, got {tuple(w_o.shape)}")
    for name, b, n in (("b_q", b_q, H * d), ("b_k", b_k, G * d), ("b_v", b_v, G * d), ("b_o", b_o, hidden),
                       ("q_norm_weight", q_norm_weight, d), ("k_norm_weight", k_norm_weight, d)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, d):
                raise ValueError(f"{name} must be [B or 1, T, head_dim] = [{B} or 1, {T}, {d}] (partial rotary is "
                                 f"not supported), got {tuple(t.shape)}")
        if d % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {d}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise TypeError(f"attention_mask must be bool (True = attend) or float (additive), "
                            f"got {attention_mask.dtype}")
        if attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != 1 \
                or attention_mask.shape[2:] != (T, T):
            raise ValueError(f"attention_mask must be [B or 1, 1, T, T] = [{B} or 1, 1, {T}, {T}] (one mask for all "
                             f"heads, no KV cache), got {tuple(attention_mask.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (head_dim ** -0.5), got {scale!r}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps >= 0:
        raise ValueError(f"norm_eps must be a non-negative number, got {norm_eps!r}")
    ops = _Operands(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm_weight, k_norm_weight, cos, sin, attention_mask)
    return ops, AttentionSpec(H, G, d, float(scale), causal, float(norm_eps))


def check_attention_backend(backend: str) -> None:
    """Raise unless ``backend`` can run attention here (``"auto"``/``"torch"``; the others have no attention kernel)."""
    from ..backends import BACKENDS, unavailable_backends
    check_choice(backend, BACKENDS, "backend")
    if backend not in ("auto", "torch"):
        reason = unavailable_backends().get(backend, "it has no attention kernel in this version")
        raise ValueError(f"backend {backend!r} is not available for attention: {reason}; available: ['torch']")


def _run(ops: _Operands, select, spec: AttentionSpec):
    tensors = [ops.x, ops.w_q, ops.w_k, ops.w_v, ops.w_o]
    extra = [t for t in (ops.b_q, ops.b_k, ops.b_v, ops.b_o, ops.q_norm_weight, ops.k_norm_weight) if t is not None]
    cast, autocast_device = _autocast_operands(tensors + extra)
    it = iter(cast[5:])
    opt = [next(it) if t is not None else None
           for t in (ops.b_q, ops.b_k, ops.b_v, ops.b_o, ops.q_norm_weight, ops.k_norm_weight)]
    args = (*cast[:5], *opt, ops.cos, ops.sin, ops.attention_mask, select, spec)
    if autocast_device is None:
        return sat_attention_torch(*args)
    with torch.autocast(autocast_device, enabled=False):
        return sat_attention_torch(*args)


def _structural(ops: _Operands):
    return (ops.b_q, ops.b_k, ops.b_v, ops.b_o, ops.q_norm_weight, ops.k_norm_weight, ops.cos, ops.sin,
            ops.attention_mask)


# ------------------------------------------------------------------------------------------------ public functions

def sat_attention_impl(x, w_q, w_k, w_v, w_o, omission_rate, *, num_heads, num_kv_heads=None, cos=None, sin=None,
                       attention_mask=None, causal=True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                       q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, metric="l2", strategy="topk",
                       unit=DEFAULT_UNIT, generator=None, backend="auto", sync_selection=False, return_kv=False,
                       kept_units=None):
    """:func:`sat_attention` returning ``(y, heads, K, V)``: ``K``/``V`` ``[B, G, T, d]`` (post-RoPE keys and
    values of all groups, for a KV cache) with ``return_kv``, else ``None``. ``heads`` is ``None`` when every unit is
    kept (the dense computation runs then). ``kept_units``: the number of units to keep, given instead of
    ``omission_rate`` (pass ``None`` for it); :class:`~sat_kernels.SATAttention` passes its count, so that a compiled
    forward reads no float rate."""
    ops, spec = check_attention_inputs(
        x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(unit, UNITS, "unit")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_attention_backend(backend)
    group = default_sync_group(sync_selection)
    H, G = spec.num_heads, spec.num_kv_heads
    n_units = H if unit == "head" else G
    if kept_units is None:
        k = num_kept(n_units, check_omission_rate(omission_rate))
    elif omission_rate is not None or isinstance(kept_units, bool) or not isinstance(kept_units, numbers.Integral) \
            or not 1 <= kept_units <= n_units:
        raise ValueError(f"kept_units must be an integer in [1, {n_units}] (the {unit}s), given instead of "
                         f"omission_rate (None), got kept_units={kept_units!r}, omission_rate={omission_rate!r}")
    else:
        k = int(kept_units)
    if k == n_units:
        return dense_attention(*ops[:5], *_structural(ops), spec), None, None, None
    rep = H // G

    def select(o: torch.Tensor) -> torch.Tensor:
        scores = unit_scores(o, ops.w_o, metric, unit, G)
        uniform = draw_uniform(n_units, strategy, scores.device, generator)
        if group is not None:
            scores, uniform = all_reduce_scores(scores, metric, uniform, group)
        kept = select_neurons(scores, k, strategy=strategy, generator=generator, uniform=uniform)
        if unit == "group":
            kept = (kept[:, None] * rep + torch.arange(rep, device=kept.device)).reshape(-1)
        return kept

    y, heads, k_all, v_all = _run(ops, select, spec._replace(return_kv=bool(return_kv), group_units=unit == "group"))
    return y, heads, (k_all if return_kv else None), (v_all if return_kv else None)


def sat_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                  omission_rate: float, *, num_heads: int, num_kv_heads: Optional[int] = None,
                  cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                  b_q=None, b_k=None, b_v=None, b_o=None, q_norm_weight=None, k_norm_weight=None,
                  norm_eps: float = 1e-6, metric: str = "l2", strategy: str = "topk", unit: str = DEFAULT_UNIT,
                  generator: Optional[torch.Generator] = None, backend: str = "auto", return_indices: bool = False,
                  sync_selection=False):
    """SAT self-attention with in-step head selection, differentiable w.r.t. ``x``, the four projection weights,
    the biases and the q/k norm weights.

    Computes q, k, v and the attention of all heads once (the scores need them), scores every unit over all tokens of
    the batch (``metric``), keeps ``k = num_kept(n_units, omission_rate)`` units (``strategy``) and runs ``o_proj`` and
    the whole backward over the kept heads only. Omitted heads contribute nothing to ``y``; their rows of ``w_q``
    (and of ``w_k``/``w_v`` for a group with no kept head) and columns of ``w_o`` get exactly zero gradient. When every
    unit is kept (``omission_rate`` 0, or a rate too small to drop one unit) this is the dense attention.

    Unit of selection (grouped-query attention, ``num_kv_heads < num_heads``): ``"head"`` (default) selects query heads;
    a KV group's ``k_proj``/``v_proj`` rows get gradient when any of its heads is kept. ``"group"`` selects whole KV
    groups (their ``H / G`` query heads together) and also skips the k/v backward of omitted groups. ``"head"`` is the
    default because it omits what was asked at a fine grain: with 3 groups, ``"group"`` can only omit 0, 1/3 or 2/3 of
    the heads (rates 0.25 and 0.5 both give 1/3), and at the same rate ``"head"`` is faster. Per kept head ``"group"``
    is a little cheaper. Measured on SmolLM2-135M-Instruct (GGUF Q4_1 weights dequantized to fp32), 4 x 512 tokens of
    English/Python text, layers 3, 10, 20, 27, forward+backward vs the dense sdpa module, median of 5 interleaved
    ratios per layer, 1 thread of a shared 2-core x86-64 machine, torch 2.13.0+cpu: omission 0.5: ``"head"`` keeps 5
    heads (2 or 3 of the 3 groups touched) 0.74x dense, ``"group"`` keeps 6 heads 0.78x; omission 2/3 (3 heads kept
    by both): ``"head"`` 0.59x (1-3 groups touched), ``"group"`` 0.55x. For multi-head attention
    (``num_kv_heads == num_heads``, Llama-2-7B) the two units are the same.

    Args:
        x: ``[B, T, h]`` hidden states (self-attention, no KV cache).
        w_q: ``[H * d, h]``; w_k, w_v: ``[G * d, h]``; w_o: ``[h, H * d]`` (``nn.Linear`` layout), one dtype/device.
        omission_rate: fraction of units to omit, in ``[0, 1)``.
        num_heads: ``H`` query heads; num_kv_heads: ``G`` key/value heads (default ``H``), ``H % G == 0``.
        cos, sin: RoPE tables ``[B or 1, T, d]`` (Hugging Face ``position_embeddings``; constants, not
            differentiated), or ``None`` for no rotary embedding.
        attention_mask: ``None``, or ``[B or 1, 1, T, T]`` boolean (True = attend) or additive float (constant).
            A query row with no key to attend gives output 0 with a -inf / boolean mask; with Hugging Face's eager
            masks (``finfo.min`` on every key of a left-padded query) it weighs all keys equally, as eager attention
            does, and gets autograd's gradient of that.
        causal: add causal masking (on top of ``attention_mask``). Default ``True``.
        scale: softmax scale, default ``d ** -0.5``.
        b_q, b_k, b_v, b_o: optional biases (Qwen2 has q/k/v biases).
        q_norm_weight, k_norm_weight, norm_eps: optional per-head RMSNorm of q and k before RoPE (Qwen3).
        metric: ``"l2"`` (default, norm of the unit's output over all tokens), ``"l1"``, ``"contrib"`` (l2 times the
            norm of the unit's ``w_o`` columns).
        strategy, generator: as in :func:`sat_kernels.select_neurons`; ``None`` uses the global RNG
            (checkpoint-safe).
        unit: ``"head"`` (default) or ``"group"``.
        backend: ``"auto"`` or ``"torch"``.
        return_indices: also return the kept query heads (sorted int64; all ``H`` when the dense path runs).
        sync_selection: as in :func:`sat_kernels.sat_mlp` (global-batch unit scores across data-parallel ranks).

    Returns:
        ``y`` ``[B, T, h]``, or ``(y, heads)``.

    Example:
        >>> y = sat_attention(x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
        ...                   0.5, num_heads=9, num_kv_heads=3, cos=cos, sin=sin)
    """
    y, heads, _, _ = sat_attention_impl(
        x, w_q, w_k, w_v, w_o, omission_rate, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps, metric=metric,
        strategy=strategy, unit=unit, generator=generator, backend=backend, sync_selection=sync_selection)
    if not return_indices:
        return y
    return y, (heads if heads is not None else torch.arange(num_heads, device=x.device))


def gathered_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                       heads: torch.Tensor, *, num_heads: int, num_kv_heads: Optional[int] = None, cos=None, sin=None,
                       attention_mask=None, causal: bool = True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                       q_norm_weight=None, k_norm_weight=None, norm_eps: float = 1e-6, backend: str = "auto",
                       validate: bool = True) -> torch.Tensor:
    """The attention restricted to the query heads ``heads`` (sorted ascending), forward and backward.

    Only the kept heads' q projections, their groups' k/v projections and their attention are computed; only those
    rows/columns get (non-zero) gradients.

    Args:
        heads: 1-D integer tensor of kept query heads, strictly ascending, in ``[0, num_heads)``, on ``x``'s device.
        validate: check ``heads``' values (a host sync on GPU).
        The others: as in :func:`sat_attention`.
    """
    ops, spec = check_attention_inputs(
        x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    check_attention_backend(backend)
    if validate:
        heads = check_indices(heads, spec.num_heads, x.device)
    elif not isinstance(heads, torch.Tensor):
        raise TypeError(f"heads must be a torch.Tensor of integers, got {type(heads).__name__}")
    return _run(ops, heads.long(), spec)[0]


@torch.no_grad()
def head_scores(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *,
                num_heads: int, num_kv_heads: Optional[int] = None, cos=None, sin=None, attention_mask=None,
                causal: bool = True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None, q_norm_weight=None,
                k_norm_weight=None, norm_eps: float = 1e-6, metric: str = "l2",
                unit: str = DEFAULT_UNIT) -> torch.Tensor:
    """fp32 importance of every unit (``[H]`` for ``unit="head"``, ``[G]`` for ``"group"``) over all tokens of ``x``
    (not differentiable). See :func:`unit_scores` for the metrics."""
    ops, spec = check_attention_inputs(
        x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    check_choice(metric, METRICS, "metric")
    check_choice(unit, UNITS, "unit")
    B, T, _ = x.shape
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos_, sin_ = (cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)) if cos is not None else (None, None)
    q = _prep_qk(F.linear(x, w_q, b_q).view(B, T, H, d), q_norm_weight, cos_, sin_, spec.norm_eps)
    k = _prep_qk(F.linear(x, w_k, b_k).view(B, T, G, d), k_norm_weight, cos_, sin_, spec.norm_eps)
    v = F.linear(x, w_v, b_v).view(B, T, G, d)
    group_of = torch.arange(H, device=x.device) // (H // G)
    o, _ = _core_fwd(q.transpose(1, 2), _take_heads(k, group_of).transpose(1, 2),
                     _take_heads(v, group_of).transpose(1, 2), attention_mask, spec)
    return unit_scores(o, w_o, metric, unit, G)
