"""RoPE and the per-head RMSNorm of q and k (Qwen3), forward and the backward the attention op writes out.

Token-major operands ``[B, T, n, d]``; ``cos``/``sin`` ``[B or 1, T, 1, d]`` (Hugging Face ``position_embeddings``
with a head axis). The norm computes its statistics in fp32 (fp64 for fp64 input), as ``Qwen3RMSNorm`` does.
"""
from __future__ import annotations

import torch

from .layout import acc_dtype


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of token-major ``t`` ``[B, T, n, d]``; ``cos``/``sin`` ``[B or 1, T, 1, d]``."""
    return t * cos + _rotate_half(t) * sin


def rope_bwd(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`rope`: ``rotate_half`` is ``R``, its transpose is ``-R``."""
    return g * cos - _rotate_half(g * sin)


def rms_norm(u: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm as Hugging Face ``Qwen3RMSNorm`` computes it (fp32 statistics, fp64 for fp64 input)."""
    u_acc = u.to(acc_dtype(u.dtype))
    n = u_acc * torch.rsqrt(u_acc.pow(2).mean(-1, keepdim=True) + eps)
    return w * n.to(u.dtype)


def rms_norm_bwd(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, eps: float, need_w: bool):
    """Gradients of :func:`rms_norm` w.r.t. ``u`` and (summed over all leading dims) ``w``."""
    acc = acc_dtype(u.dtype)
    u_acc = u.to(acc)
    rstd = torch.rsqrt(u_acc.pow(2).mean(-1, keepdim=True) + eps)
    n = u_acc * rstd
    dw = (g.to(acc) * n.to(u.dtype).to(acc)).reshape(-1, u.shape[-1]).sum(0).to(w.dtype) if need_w else None
    dn = g.to(acc) * w.to(acc)
    du = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return du.to(u.dtype), dw


def prep_qk(raw: torch.Tensor, norm_w, cos, sin, eps: float) -> torch.Tensor:
    """q or k as attention takes them: the projection ``raw``, RMS-normed (``norm_w`` given), then rotated."""
    t = rms_norm(raw, norm_w, eps) if norm_w is not None else raw
    return rope(t, cos, sin) if cos is not None else t
