"""SAT SwiGLU MLP on the ``"torch"`` backend: index_select gathers + ``torch.mm`` (cuBLAS / oneDNN) on compact operands.

Forward (in-step selection, DESIGN.md section 2)::

    G = x W_gate^T, U = x W_up^T          [T, I]   all neurons, once (the scores need them)
    A = act(G) * U, s = score(A)           [T, I], [I] fp32
    S = select(s)                          [k]      sorted, no host sync
    y = A[:, S] W_down[:, S]^T             [T, h]   kept neurons only

Saved for backward: ``x``, ``G[:, S]``, ``U[:, S]`` (never the full ``[T, I]`` activations). Backward runs only over
the kept neurons (6 GEMMs of ``2*T*h*k`` FLOPs) and scatters the compact weight gradients into zero full-size
gradients, so omitted rows of ``W_gate``/``W_up`` and columns of ``W_down`` get exactly zero.

``gathered_mlp`` with a given index set skips the dense gate/up projections: it gathers the kept weight rows first.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def act_fwd(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def act_bwd(grad: torch.Tensor, g: torch.Tensor, act: str) -> torch.Tensor:
    """``grad * act'(g)`` in one fused elementwise kernel."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")


def dense_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              act: str = "silu") -> torch.Tensor:
    """The dense MLP exactly as Hugging Face ``LlamaMLP`` computes it (``F.linear``, autograd)."""
    return F.linear(act_fwd(F.linear(x, w_gate), act) * F.linear(x, w_up), w_down)


def _scatter_rows(full_shape, like: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = like.new_zeros(full_shape)
    return out.index_copy_(0, idx, rows.to(like.dtype))


class SATMLPFunction(torch.autograd.Function):
    """Autograd op of the SAT MLP on 2-D ``x``.

    ``select`` is either a ``LongTensor`` of kept indices (``gathered_mlp``) or a callable ``select(a_full) -> idx``
    that scores the full activations and picks the kept set (``sat_mlp``).
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, select, act: str):
        if isinstance(select, torch.Tensor):
            idx = select
            wg_s = w_gate.index_select(0, idx)                         # [k, h]
            wu_s = w_up.index_select(0, idx)                           # [k, h]
            g_s = torch.mm(x, wg_s.t())                                # [T, k]
            u_s = torch.mm(x, wu_s.t())                                # [T, k]
            a_s = act_fwd(g_s, act).mul_(u_s)                          # [T, k]
        else:
            g = torch.mm(x, w_gate.t())                                # [T, I]
            u = torch.mm(x, w_up.t())                                  # [T, I]
            a = act_fwd(g, act).mul_(u)                                # [T, I]
            idx = select(a)                                            # [k]
            g_s = g.index_select(1, idx)                               # [T, k]
            u_s = u.index_select(1, idx)                               # [T, k]
            a_s = a.index_select(1, idx)                               # [T, k]
            del g, u, a
        wd_s = w_down.index_select(1, idx)                             # [h, k]
        y = torch.mm(a_s, wd_s.t())                                    # [T, h]
        ctx.save_for_backward(x, w_gate, w_up, w_down, idx, g_s, u_s)
        ctx.act = act
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, dy, _didx):
        x, w_gate, w_up, w_down, idx, g_s, u_s = ctx.saved_tensors
        act = ctx.act
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        wd_s = w_down.index_select(1, idx)                             # [h, k]
        da_s = torch.mm(dy, wd_s)                                      # [T, k]
        act_g = act_fwd(g_s, act)                                      # [T, k]
        dx = dwg = dwu = dwd = None
        if need_wd:
            dwd_s = torch.mm(dy.t(), act_g * u_s)                      # [h, k]
            dwd = w_down.new_zeros(w_down.shape).index_copy_(1, idx, dwd_s.to(w_down.dtype))
        dg_s = act_bwd(da_s * u_s, g_s, act)                           # [T, k]
        du_s = da_s.mul_(act_g)                                        # [T, k]
        if need_wg:
            dwg = _scatter_rows(w_gate.shape, w_gate, idx, torch.mm(dg_s.t(), x))   # [I, h]
        if need_wu:
            dwu = _scatter_rows(w_up.shape, w_up, idx, torch.mm(du_s.t(), x))       # [I, h]
        if need_x:
            dx = torch.mm(dg_s, w_gate.index_select(0, idx))           # [T, h]
            dx.addmm_(du_s, w_up.index_select(0, idx))
        return dx, dwg, dwu, dwd, None, None


def sat_mlp_torch(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  select, act: str):
    """Launcher of the torch backend: ``x2`` is ``[T, h]``; returns ``(y [T, h], idx [k])``."""
    return SATMLPFunction.apply(x2, w_gate, w_up, w_down, select, act)
