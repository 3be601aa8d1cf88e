"""SAT SwiGLU MLP on the ``"torch"`` backend: index_select gathers + ``torch.mm`` (cuBLAS / oneDNN) on compact operands.

Forward (in-step selection, docs/design.md section 2)::

    G = x W_gate^T, U = x W_up^T          [T, I]   all neurons, once (the scores need them)
    A = act(G) * U, s = score(A)           [T, I], [I] fp32
    S = select(s)                          [k]      sorted, no host sync
    y = A[:, S] W_down[:, S]^T             [T, h]   kept neurons only (forward="sparse", the paper's mode)
    y = A W_down^T                         [T, h]   every neuron (forward="dense": the exact output, A exists anyway)

Saved for backward: ``x``, ``G[:, S]``, ``U[:, S]`` (never the full ``[T, I]`` activations). Backward runs only over
the kept neurons (6 GEMMs of ``2*T*h*k`` FLOPs) and scatters the compact weight gradients into zero full-size
gradients, so omitted rows of ``W_gate``/``W_up`` and columns of ``W_down`` get exactly zero. The backward is the same
in both forward modes: with ``forward="dense"`` the loss is the dense model's and its gradient is taken through the kept
neurons only. FLOPs per ``T*h*I`` (forward + backward): ``4 + 14*rho`` sparse, ``6 + 12*rho`` dense forward, 18 dense.

``gathered_mlp`` with a given index set skips the dense gate/up projections: it gathers the kept weight rows first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...selection import select_neurons

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


class TorchIndexOps:
    """The index operations of :class:`SATMLPFunction` on the torch backend: ``index_select`` gathers, ``index_copy_``
    into zeros, ``topk`` + ``sort`` selection. Another backend passes an object with the same five static methods
    (the ``"cuda"`` backend: its kernels, :mod:`sat_kernels.ops.mlp.cuda.launcher`)."""

    @staticmethod
    def gather_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:      # w[idx, :]         [k, W]
        return w.index_select(0, idx)

    @staticmethod
    def gather_cols(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:      # a[:, idx]         [R, k]
        return a.index_select(1, idx)

    @staticmethod
    def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:   # zeros [n, W], rows at idx
        return rows.new_zeros(n, rows.shape[1]).index_copy_(0, idx, rows)

    @staticmethod
    def scatter_cols(cols: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:   # zeros [R, n], cols at idx
        return cols.new_zeros(cols.shape[0], n).index_copy_(1, idx, cols)

    select_neurons = staticmethod(select_neurons)


class SATMLPFunction(torch.autograd.Function):
    """Autograd op of the SAT MLP on 2-D ``x``, over the index operations ``ops`` (e.g. :class:`TorchIndexOps`).

    ``select`` is either a ``LongTensor`` of kept indices (``gathered_mlp``) or a
    :class:`~sat_kernels.ops.selector.Selector` that scores the full activations and picks the kept set with
    ``ops.select_neurons`` (``sat_mlp``). Its :class:`~sat_kernels.ops.selector.Selection` may carry per-neuron
    weights ``[k]`` (priority sampling): the kept neurons' activations are scaled by them (in ``y`` with the sparse
    forward, and in the gradient). ``forward="dense"`` (only with a selector) computes ``y`` over every neuron; the
    backward is unchanged.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, select, act: str, ops, forward: str = "sparse"):
        dense_forward = forward == "dense"
        weight = None
        if isinstance(select, torch.Tensor):
            idx = select
            wg_s = ops.gather_rows(w_gate, idx)                        # [k, h]
            wu_s = ops.gather_rows(w_up, idx)                          # [k, h]
            g_s = torch.mm(x, wg_s.t())                                # [T, k]
            u_s = torch.mm(x, wu_s.t())                                # [T, k]
            a_s = act_fwd(g_s, act).mul_(u_s)                          # [T, k]
        else:
            g = torch.mm(x, w_gate.t())                                # [T, I]
            u = torch.mm(x, w_up.t())                                  # [T, I]
            a = act_fwd(g, act).mul_(u)                                # [T, I]
            idx, _, weight = select(a, select_fn=ops.select_neurons)  # [k]; weight [k] fp32 with "priority"
            g_s = ops.gather_cols(g, idx)                              # [T, k]
            u_s = ops.gather_cols(u, idx)                              # [T, k]
            del g, u
            if dense_forward:
                y = torch.mm(a, w_down.t())                            # [T, h]
            else:
                a_s = ops.gather_cols(a, idx)                          # [T, k]
                if weight is not None:
                    a_s.mul_(weight.to(a_s.dtype))
            del a
        if not dense_forward:
            wd_s = ops.gather_cols(w_down, idx)                        # [h, k]
            y = torch.mm(a_s, wd_s.t())                                # [T, h]
        ctx.save_for_backward(x, w_gate, w_up, w_down, idx, g_s, u_s, weight)
        ctx.act, ctx.ops = act, ops
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, dy, _didx):
        x, w_gate, w_up, w_down, idx, g_s, u_s, weight = ctx.saved_tensors
        act, ops = ctx.act, ctx.ops
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        wd_s = ops.gather_cols(w_down, idx)                            # [h, k]
        da_s = torch.mm(dy, wd_s)                                      # [T, k]
        act_g = act_fwd(g_s, act)                                      # [T, k]
        if weight is not None:                                         # priority: the kept neurons' weights
            weight = weight.to(da_s.dtype)
            da_s.mul_(weight)
        dx = dwg = dwu = dwd = None
        if need_wd:
            a_s = act_g * u_s if weight is None else act_g * u_s * weight                            # [T, k]
            dwd_s = torch.mm(dy.t(), a_s)                              # [h, k]
            dwd = ops.scatter_cols(dwd_s.to(w_down.dtype), idx, w_down.shape[1])
        dg_s = act_bwd(da_s * u_s, g_s, act)                           # [T, k]
        du_s = da_s.mul_(act_g)                                        # [T, k]
        if need_wg:
            dwg = ops.scatter_rows(torch.mm(dg_s.t(), x).to(w_gate.dtype), idx, w_gate.shape[0])   # [I, h]
        if need_wu:
            dwu = ops.scatter_rows(torch.mm(du_s.t(), x).to(w_up.dtype), idx, w_up.shape[0])       # [I, h]
        if need_x:
            dx = torch.mm(dg_s, ops.gather_rows(w_gate, idx))          # [T, h]
            dx.addmm_(du_s, ops.gather_rows(w_up, idx))
        return dx, dwg, dwu, dwd, None, None, None, None


def sat_mlp_torch(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  select, act: str, forward: str = "sparse"):
    """Launcher of the torch backend: ``x2`` is ``[T, h]``; returns ``(y [T, h], idx [k])``."""
    return SATMLPFunction.apply(x2, w_gate, w_up, w_down, select, act, TorchIndexOps, forward)
