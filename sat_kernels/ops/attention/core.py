"""Masks and the attention core of SAT attention: ``softmax(q k^T * scale + mask) v`` on ``[B, n, T, d]`` views whose
keys and values have as many heads as the queries, forward and backward.

Two implementations (:func:`core_kind`): torch's fused CPU flash-attention kernels (forward saves the log-sum-exp,
backward rebuilds the probabilities from it), or explicit matmul + softmax (any device; the backward recomputes the
softmax). Both compute what Hugging Face's attention computes, also for query rows without an allowed key (left
padding): 0 with boolean / -inf masks, equal weights on every key with eager attention's ``finfo.min`` masks
(:func:`_flash_bias`). A batch or sequence of length 0 gives empty results without calling a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import AttentionSpec, acc_dtype

# The fused CPU flash-attention kernel (forward + backward) handles these dtypes; others use the explicit path.
_FLASH_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def is_float_mask(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and mask.dtype != torch.bool


def core_kind(q: torch.Tensor, mask: Optional[torch.Tensor], spec: AttentionSpec) -> str:
    """``"flash"``: torch's fused CPU flash-attention forward/backward (2.6x faster than the explicit path for
    B 4, 5 heads, T 512, d 64, fp32, 2 threads, torch 2.13); ``"math"``: explicit matmul + softmax (any device; also
    a float mask together with ``causal``: a row without an allowed key then weighs only the keys up to its query,
    which :func:`_no_key_dk` does not cover)."""
    if spec.causal and is_float_mask(mask):
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
    if not is_float_mask(mask):
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
    acc = acc_dtype(q.dtype)
    q_nk = q.to(acc).masked_fill(~no_key, 0.0)                                           # [B, n, T, d]
    d_nk = torch.matmul(q_nk.transpose(-1, -2), do.to(acc))                              # [B, n, d, d]
    v_c = v.to(acc) - v.to(acc).mean(-2, keepdim=True)                                   # [B, n, S, d]
    return torch.matmul(v_c, d_nk.transpose(-1, -2)).mul_(scale / v.shape[-2])          # [B, n, S, d]


def math_probs(q, k, mask, spec: AttentionSpec) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` (causal: upper triangle -inf) in the accumulation dtype, ``[B, n, T, S]``,
    as eager attention computes it; a row with no finite score (-inf or boolean mask) is 0."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc_dtype(q.dtype)).mul_(spec.scale)
    if mask is not None:
        s = s + additive_mask(mask, s.dtype)
    if spec.causal:
        n_q, n_k = s.shape[-2:]
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu_(n_k - n_q + 1), float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)      # dense_attention differentiates it


def core_fwd(q, k, v, mask, spec: AttentionSpec):
    """Attention of ``[B, n, T, d]`` views (k, v with as many heads as q); returns ``(o, lse)``, o like q's layout;
    ``lse`` ``[B, n, T]`` is the fused kernel's log-sum-exp (its backward rebuilds the probabilities from it), ``None``
    on the explicit path, whose backward recomputes the softmax."""
    if q.numel() == 0:      # B or T is 0: the fused CPU kernel dies of SIGFPE at T = 0 (torch 2.13)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=acc_dtype(q.dtype))
    if core_kind(q, mask, spec) == "flash":
        bias, no_key = _flash_bias(mask, acc_dtype(q.dtype))
        q_s = q if no_key is None else q.masked_fill(no_key, 0.0)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_s, k, v, 0.0, spec.causal, attn_mask=bias, scale=spec.scale)
    return torch.matmul(math_probs(q, k, mask, spec).to(q.dtype), v), None


def core_bwd(do, q, k, v, o, lse, mask, spec: AttentionSpec):
    """``(dq, dk, dv)`` of :func:`core_fwd` from its saved ``o`` and ``lse``."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = acc_dtype(q.dtype)
    if core_kind(q, mask, spec) == "flash":
        bias, no_key = _flash_bias(mask, acc)
        q_s = q if no_key is None else q.masked_fill(no_key, 0.0)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q_s, k, v, o, lse, 0.0, spec.causal, attn_mask=bias, scale=spec.scale)
        if no_key is not None:
            dk = (dk.to(acc) + _no_key_dk(q, do, v, no_key, spec.scale)).to(dk.dtype)
        return dq, dk, dv
    p = math_probs(q, k, mask, spec)                                                      # [B, n, T, S]
    dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2)).to(acc)
    delta = (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)
    ds = (p * (dp - delta)).mul_(spec.scale).to(q.dtype)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv
