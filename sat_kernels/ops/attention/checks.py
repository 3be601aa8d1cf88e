"""Argument checks of the SAT attention functions: every problem becomes a ``ValueError``/``TypeError`` naming the
argument and what was expected, before any kernel runs (docs/design.md section 2, "Bad input")."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ...selection import check_choice
from ..common import FLOAT_DTYPES
from .layout import AttentionSpec


class Operands(NamedTuple):
    """The checked tensors of one attention call (optional ones ``None``)."""
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


def check_head_counts(num_heads, num_kv_heads=None):
    """``(H, G)``: ``num_heads`` and ``num_kv_heads`` (default ``H``), positive ints, ``H`` a multiple of ``G``."""
    H = _check_int(num_heads, "num_heads")
    G = H if num_kv_heads is None else _check_int(num_kv_heads, "num_kv_heads")
    if H % G:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({G})")
    return H, G


def check_attention_inputs(x, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None, cos=None, sin=None,
                           attention_mask=None, causal=True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                           q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6):
    """Validate the attention operands; returns ``(Operands, AttentionSpec)``."""
    ops = Operands(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm_weight, k_norm_weight, cos, sin, attention_mask)
    _check_types_and_devices(ops)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, h], got shape {tuple(x.shape)}")
    H, G = check_head_counts(num_heads, num_kv_heads)
    d = _check_shapes(ops, H, G)
    _check_mask(attention_mask, x.shape[0], x.shape[1])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (head_dim ** -0.5), got {scale!r}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps >= 0:
        raise ValueError(f"norm_eps must be a non-negative number, got {norm_eps!r}")
    return ops, AttentionSpec(H, G, d, float(scale), causal, float(norm_eps))


def _check_types_and_devices(ops: Operands) -> None:
    """Float tensors of one dtype (``cos``/``sin`` and the mask excepted) on one device."""
    named = {n: getattr(ops, n) for n in ("x", "w_q", "w_k", "w_v", "w_o")}
    optional = {n: getattr(ops, n) for n in ("b_q", "b_k", "b_v", "b_o", "q_norm_weight", "k_norm_weight", "cos",
                                             "sin")}
    for name, t in list(named.items()) + [(n, t) for n, t in optional.items() if t is not None]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor (float64/32/16, bfloat16), got {t.dtype}")
    if (ops.cos is None) != (ops.sin is None):
        raise ValueError("cos and sin must be given together (RoPE) or both be None")
    given = {**named, **{n: t for n, t in optional.items() if t is not None and n not in ("cos", "sin")}}
    dtypes = {n: t.dtype for n, t in given.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"x, the weights and the biases/norm weights must share one dtype, got {dtypes}")
    mask = ops.attention_mask
    tensors = {**given, **({"cos": ops.cos, "sin": ops.sin} if ops.cos is not None else {}),
               **({"attention_mask": mask} if isinstance(mask, torch.Tensor) else {})}
    devices = {n: str(t.device) for n, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_shapes(ops: Operands, H: int, G: int) -> int:
    """The projection, bias, norm and RoPE shapes of ``H`` query / ``G`` KV heads; returns ``head_dim``."""
    B, T, hidden = ops.x.shape
    w_q = ops.w_q
    if w_q.dim() != 2 or w_q.shape[1] != hidden or w_q.shape[0] % H or w_q.shape[0] == 0:
        raise ValueError(f"w_q must be [num_heads * head_dim, h] with h = {hidden} (x.shape[-1]), num_heads = {H} "
                         f"and head_dim >= 1, got shape {tuple(w_q.shape)}")
    d = w_q.shape[0] // H
    for name, w in (("w_k", ops.w_k), ("w_v", ops.w_v)):
        if tuple(w.shape) != (G * d, hidden):
            raise ValueError(f"{name} must be [num_kv_heads * head_dim, h] = {(G * d, hidden)}, got {tuple(w.shape)}")
    if tuple(ops.w_o.shape) != (hidden, H * d):
        raise ValueError(f"w_o must be [h, num_heads * head_dim] = {(hidden, H * d)}, got {tuple(ops.w_o.shape)}")
    for name, n in (("b_q", H * d), ("b_k", G * d), ("b_v", G * d), ("b_o", hidden), ("q_norm_weight", d),
                    ("k_norm_weight", d)):
        b = getattr(ops, name)
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if ops.cos is not None:
        for name, t in (("cos", ops.cos), ("sin", ops.sin)):
            if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, d):
                raise ValueError(f"{name} must be [B or 1, T, head_dim] = [{B} or 1, {T}, {d}] (partial rotary is "
                                 f"not supported), got {tuple(t.shape)}")
        if d % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {d}")
    return d


def _check_mask(attention_mask, B: int, T: int) -> None:
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool (True = attend) or float (additive), got {attention_mask.dtype}")
    if attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != 1 \
            or attention_mask.shape[2:] != (T, T):
        raise ValueError(f"attention_mask must be [B or 1, 1, T, T] = [{B} or 1, 1, {T}, {T}] (one mask for all "
                         f"heads, no KV cache), got {tuple(attention_mask.shape)}")


def check_attention_backend(backend: str) -> None:
    """Raise unless ``backend`` can run attention here (``"auto"``/``"torch"``; the others have no attention kernel)."""
    from ...backends import BACKENDS, unavailable_backends
    check_choice(backend, BACKENDS, "backend")
    if backend not in ("auto", "torch"):
        reason = unavailable_backends().get(backend, "it has no attention kernel in this version")
        raise ValueError(f"backend {backend!r} is not available for attention: {reason}; available: ['torch']")
