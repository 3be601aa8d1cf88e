"""Plain masked-dense PyTorch references of the SAT MLP and SAT attention, for tests and benchmarks.

Every backend must compute these functions (within dtype tolerance). The MLP reference multiplies the intermediate
activations by a 0/1 mask over neurons, so autograd gives exactly zero gradient to omitted rows of ``W_gate``/``W_up``
and columns of ``W_down``; the attention reference does the same with the heads' outputs before ``o_proj``. Call them
on fp64 copies of the operands to get the ground truth.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..selection import activation_scores, num_kept, select_neurons


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return g * torch.sigmoid(g)
    if act == "gelu_tanh":
        c = (2.0 / torch.pi) ** 0.5
        return 0.5 * g * (1.0 + torch.tanh(c * (g + 0.044715 * g ** 3)))
    raise ValueError(f"act must be 'silu' or 'gelu_tanh', got {act!r}")


def _masked_gradient(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` itself in value (exactly: ``m*t + (1-m)*t`` with ``m`` 0/1), with gradient only where ``mask`` is 1."""
    return t * mask + (t * (1 - mask)).detach()


def _weight_gradient_scaled(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` itself in value (exactly: ``w + (w*scale - w*scale)``), with gradient ``scale * grad``."""
    ws = w * scale
    return w.detach() + (ws - ws.detach())


def reference_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  indices: Optional[torch.Tensor] = None, *, act: str = "silu", forward: str = "sparse",
                  weights: Optional[torch.Tensor] = None, backward: str = "sparse",
                  dense_token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = W_down (m * act(W_gate x) * (W_up x))`` with ``m`` the 0/1 mask of ``indices`` (all ones if ``None``).

    ``forward="dense"`` (the exact-forward mode): ``y`` is the unmasked output, and the gradient is that of the masked
    one: the activations and the columns of ``W_down`` pass their value everywhere and their gradient only at kept
    neurons. ``weights`` ``[k]`` (``strategy="priority"``): ``m`` holds them at ``indices`` instead of ones.

    ``backward="exact_input"`` (with ``forward="dense"``): ``y`` and every gradient of the dense MLP, but the
    gradients of the weights themselves multiplied by ``m`` (rows of ``W_gate``/``W_up``, columns of ``W_down``), so
    ``dx`` is the dense one and the omitted neurons' weight gradients are zero.

    ``backward="dense_tokens"`` (with ``forward="dense"``): ``y`` of the dense MLP, and the gradient of the masked
    one whose mask is 1 at token ``t`` and neuron ``i`` when ``i`` is kept or ``dense_token_mask[t]`` (bool, shape
    ``x.shape[:-1]``) is True: ``y = (m * a) W_down^T + ((1 - m) * a) W_down^T``, the second term without gradient.
    """
    if indices is not None and backward == "dense_tokens":
        if forward != "dense" or weights is not None:
            raise ValueError("backward='dense_tokens' needs forward='dense' and no weights")
        a = _act(F.linear(x, w_gate), act) * F.linear(x, w_up)
        kept = torch.zeros(w_gate.shape[0], dtype=torch.bool, device=a.device)
        kept[indices] = True
        mask = (kept | dense_token_mask[..., None]).to(a.dtype)        # [..., I]
        return F.linear(a * mask, w_down) + F.linear(a * (1 - mask), w_down).detach()
    if indices is not None and backward == "exact_input":
        if forward != "dense":
            raise ValueError("backward='exact_input' needs forward='dense'")
        mask = torch.zeros(w_gate.shape[0], dtype=w_gate.dtype, device=w_gate.device)
        mask[indices] = 1 if weights is None else weights.to(mask.dtype)
        w_gate, w_up = (_weight_gradient_scaled(w, mask[:, None]) for w in (w_gate, w_up))
        w_down = _weight_gradient_scaled(w_down, mask[None, :])
        indices = None
    a = _act(F.linear(x, w_gate), act) * F.linear(x, w_up)
    if indices is not None:
        mask = torch.zeros(w_gate.shape[0], dtype=a.dtype, device=a.device)
        mask[indices] = 1 if weights is None else weights.to(a.dtype)
        if forward == "dense":
            return F.linear(_masked_gradient(a, mask), _masked_gradient(w_down, mask))
        a = a * mask
    return F.linear(a, w_down)


def _lora_linear(inp: torch.Tensor, w: torch.Tensor, adapter) -> torch.Tensor:
    """``inp W^T + s (inp A^T) B^T`` as PEFT computes it: the adapter in its own dtype, the sum cast back."""
    out = F.linear(inp, w)
    if adapter is None:
        return out
    return (out + F.linear(F.linear(inp.to(adapter.a.dtype), adapter.a), adapter.b) * adapter.scaling).to(out.dtype)


def reference_lora_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, adapters,
                       indices: Optional[torch.Tensor] = None, *, act: str = "silu",
                       forward: str = "sparse") -> torch.Tensor:
    """:func:`reference_mlp` with LoRA adapters: each projection computes ``W x + s B (A x)``.

    ``adapters``: ``(gate, up, down)``, each ``None`` or with fields ``a`` ``[r, in]``, ``b`` ``[out, r]``,
    ``scaling`` (:class:`sat_kernels.ops.mlp.lora.LoRA`; dropout is not modelled here). The mask over ``indices``
    applies to the input of the down projection, base and adapter; with ``forward="dense"`` the activations and the
    columns of ``W_down`` and ``A_down`` pass their value everywhere and their gradient only at kept neurons.
    """
    gate, up, down = adapters
    a = _act(_lora_linear(x, w_gate, gate), act) * _lora_linear(x, w_up, up)
    if indices is None:
        return _lora_linear(a, w_down, down)
    mask = torch.zeros(w_gate.shape[0], dtype=a.dtype, device=a.device)
    mask[indices] = 1
    if forward == "dense":
        if down is not None:
            down = down._replace(a=_masked_gradient(down.a, mask.to(down.a.dtype)))
        return _lora_linear(_masked_gradient(a, mask), _masked_gradient(w_down, mask), down)
    return _lora_linear(a * mask, w_down, down)


@torch.no_grad()
def reference_indices(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      omission_rate: float, *, metric: str = "l2", act: str = "silu") -> torch.Tensor:
    """The top-k kept set the SAT MLP must select, from scores computed in the operands' precision."""
    x2 = x.reshape(-1, x.shape[-1])
    a = _act(F.linear(x2, w_gate), act) * F.linear(x2, w_up)
    k = num_kept(w_gate.shape[0], omission_rate)
    return select_neurons(activation_scores(a, metric, w_down), k, strategy="topk")


def reference_sat_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      omission_rate: float, *, metric: str = "l2", act: str = "silu") -> torch.Tensor:
    """SAT MLP with top-k selection, as masked dense: the semantics every backend's ``sat_mlp`` must match."""
    idx = reference_indices(x, w_gate, w_up, w_down, omission_rate, metric=metric, act=act)
    return reference_mlp(x, w_gate, w_up, w_down, idx, act=act)



def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _rms_norm(u: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_acc = u.to(acc)
    return w * (u_acc / torch.sqrt(u_acc.pow(2).mean(-1, keepdim=True) + eps)).to(u.dtype)


def reference_head_outputs(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, *,
                           num_heads: int, num_kv_heads: Optional[int] = None, cos=None, sin=None,
                           attention_mask=None, causal: bool = True, scale=None, b_q=None, b_k=None, b_v=None,
                           q_norm_weight=None, k_norm_weight=None, norm_eps: float = 1e-6) -> torch.Tensor:
    """The attention output of every head, ``[B, H, T, d]``, before ``o_proj``, written out.

    Projections, optional per-head RMSNorm (Qwen3), RoPE, masked softmax (in the operands' dtype for fp64/fp32, in
    fp32 for fp16/bf16, as Hugging Face's eager attention). ``attention_mask``: boolean (True = attend) or additive;
    a query row with no key to attend (False or -inf everywhere) outputs 0. Arguments as in
    :func:`sat_kernels.sat_attention`.
    """
    B, T, _ = x.shape
    H = num_heads
    G = num_kv_heads or H
    d = w_q.shape[0] // H
    q = F.linear(x, w_q, b_q).view(B, T, H, d)
    k = F.linear(x, w_k, b_k).view(B, T, G, d)
    v = F.linear(x, w_v, b_v).view(B, T, G, d).transpose(1, 2)
    if q_norm_weight is not None:
        q = _rms_norm(q, q_norm_weight, norm_eps)
    if k_norm_weight is not None:
        k = _rms_norm(k, k_norm_weight, norm_eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)                                  # [B, H, T, d], [B, G, T, d]
    if cos is not None:
        c, s = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * (d ** -0.5 if scale is None else scale)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        else:
            scores = scores + attention_mask.to(acc)
            allowed = allowed & (attention_mask > float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(~any_key, 0.0).to(x.dtype)
    return torch.matmul(p, v)


def reference_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                        heads: Optional[torch.Tensor] = None, *, b_o=None, **layout) -> torch.Tensor:
    """Attention with the output of every head outside ``heads`` multiplied by 0 before ``o_proj`` (all heads kept if
    ``None``), so autograd gives exactly zero gradient to omitted heads' rows and columns. ``layout``: the keyword
    arguments of :func:`reference_head_outputs`."""
    o = reference_head_outputs(x, w_q, w_k, w_v, **layout)                      # [B, H, T, d]
    B, H, T, d = o.shape
    if heads is not None:
        mask = torch.zeros(H, dtype=o.dtype, device=o.device)
        mask[heads] = 1
        o = o * mask[:, None, None]
    return F.linear(o.transpose(1, 2).reshape(B, T, H * d), w_o, b_o)


@torch.no_grad()
def reference_head_indices(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                           w_o: torch.Tensor, omission_rate: float, *, metric: str = "l2", unit: str = "head",
                           **layout) -> torch.Tensor:
    """The top-k kept query heads SAT attention must select, from unit scores computed in the operands' precision
    (a unit: one head, or the heads of one KV group). ``layout``: as in :func:`reference_head_outputs`."""
    o = reference_head_outputs(x, w_q, w_k, w_v, **layout)                      # [B, H, T, d]
    H, d = o.shape[1], o.shape[3]
    G = layout.get("num_kv_heads") or H
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = (o.abs() if metric == "l1" else o * o).to(acc).sum((0, 2, 3))
    w_sq = w_o.to(acc).pow(2).sum(0).view(H, d).sum(1)
    if unit == "group":
        s, w_sq = s.view(G, -1).sum(1), w_sq.view(G, -1).sum(1)
    if metric != "l1":
        s = s.sqrt()
    if metric == "contrib":
        s = s * w_sq.sqrt()
    kept = select_neurons(s.float(), num_kept(s.numel(), omission_rate), strategy="topk")
    if unit == "group":
        rep = H // G
        kept = (kept[:, None] * rep + torch.arange(rep, device=kept.device)).reshape(-1)
    return kept
