"""SAT SwiGLU MLP with LoRA adapters (PEFT semantics) on a frozen base, on the ``"torch"`` backend.

Each projection ``P`` of ``gate``, ``up``, ``down`` computes ``W_P x + s_P B_P A_P drop_P(x)`` (the adapter term is
optional per projection; ``A_P`` is ``[r, in]``, ``B_P`` is ``[out, r]``). SAT scores and selects from the adapted
activations and runs the down projection, base and adapter, over the kept neurons (docs/design.md section 2, "LoRA")::

    Zg = drop_g(x) A_g^T                          [T, r]
    G  = x W_g^T + s_g Zg B_g^T                   [T, I]   all neurons, once (the scores need them); U likewise
    A  = act(G) * U, S = select(score(A))         [T, I], [k]   (G, U, A kept neuron-major, [I, T], as in
                                                                 :mod:`sat_kernels.ops.mlp.function`)
    D  = drop_d(A)                                [T, I]   the mask is drawn over every neuron, as PEFT draws it
    Zd = D[:, S] A_d[:, S]^T                      [T, r]
    y  = A[:, S] W_d[:, S]^T + s_d Zd B_d^T       [T, h]   forward="sparse" (the paper's mode)
    y  = A W_d^T + s_d (D A_d^T) B_d^T            [T, h]   forward="dense" (the exact output); same backward

Backward, over the kept neurons only (``m``: the dropout scale of ``D``, 0 or ``1/(1-p)``)::

    dZd = s_d dy B_d;  dB_d = s_d dy^T Zd;  dA_d[:, S] = dZd^T D[:, S]            (columns outside S: zero)
    dA_S = dy W_d[:, S] + m_S * (dZd A_d[:, S]);  dG_S, dU_S = SwiGLU backward
    dZg = s_g dG_S B_g[S];  dB_g[S] = s_g dG_S^T Zg;  dA_g = dZg^T drop_g(x)        (rows of B_g outside S: zero)
    dx  = dG_S W_g[S] + dU_S W_u[S] + (dZg A_g + dZu A_u through the dropouts of x)

Frozen base weights get no gradient GEMM (a base weight that requires grad gets the SAT gradient of
:mod:`sat_kernels.ops.mlp.function`). Saved for backward: ``G[:, S]``, ``U[:, S]`` (neuron-major), the ``[T, r]``
adapter activations, the dropped inputs of the gate/up adapters (``x`` itself without dropout), ``m[:, S]`` with
dropout on the down adapter, and ``x`` only when a base weight needs a gradient.

FLOPs per ``T*h*I`` (forward + backward; the adapter GEMMs, ``O(T*r*(h + I))``, are left out): the dense LoRA MLP
on a frozen base runs 3 GEMMs forward and 3 backward (``dx`` only): 12. SAT with ``rho = k/I``: forward
``4 + 2*rho``, backward ``6*rho`` (``dA_S`` and the two ``dx`` GEMMs): ``4 + 8*rho``; with ``forward="dense"``
``6 + 6*rho``. The selection, gathers and dropout mask are elementwise (``O(T*I)``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ...distributed import default_sync_group
from .function import TorchIndexOps as ops, act_bwd, act_fwd
from ..common import check_token_mask
from .interface import check_kept_call, mlp_selector


class LoRA(NamedTuple):
    """The active LoRA adapter of one projection: ``s * B (A drop(x))``.

    Attributes:
        a: ``lora_A`` weight ``[r, in]``.
        b: ``lora_B`` weight ``[out, r]``.
        scaling: ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA: PEFT's ``scaling``).
        dropout: the dropout module applied to the adapter's input (PEFT's ``lora_dropout``), ``None`` for none.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _adapted_t(x: torch.Tensor, w: torch.Tensor, xd: Optional[torch.Tensor], a: Optional[torch.Tensor],
               b: Optional[torch.Tensor], s: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``((x W^T + s (xd A^T) B^T)^T, xd A^T)``: the adapted projection neuron-major ``[out, T]`` and the adapter's
    ``[T, r]`` activation, as PEFT computes them (the adapter in its own dtype, the sum cast back)."""
    out = torch.mm(w, x.t())                                           # [out, T]
    if a is None:
        return out, None
    z = torch.mm(xd, a.t())                                            # [T, r]
    return (out + torch.mm(b, z.t()) * s).to(out.dtype), z


def _adapter_bwd(dout_s: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor,
                 s: float, idx: torch.Tensor, n: int, need_xd: bool, need_a: bool, need_b: bool):
    """Gradients of the gate/up adapter from ``dout_s`` ``[k, T]`` (the kept outputs, neuron-major):
    ``(dxd, dA, dB)``."""
    dout = dout_s.to(b.dtype)
    db = ops.scatter_rows(torch.mm(dout, z) * s, idx, n) if need_b else None                # [n, r]
    dz = torch.mm(dout.t(), ops.gather_rows(b, idx)) * s                                    # [T, r]
    da = torch.mm(dz.t(), xd) if need_a else None                                           # [r, h]
    dxd = torch.mm(dz, a) if need_xd else None                                              # [T, h]
    return dxd, da, db


# The tensor inputs of SATLoRAMLPFunction, in order; gradients are routed by these names.
_INPUTS = ("x", "xg", "xu", "w_gate", "w_up", "w_down", "a_g", "b_g", "a_u", "b_u", "a_d", "b_d")


class SATLoRAMLPFunction(torch.autograd.Function):
    """Autograd op of the SAT MLP with LoRA adapters on 2-D ``x`` (see the module docstring).

    Inputs: the tensors named in ``_INPUTS``, then ``scaling``, ``noise``, ``select``, ``act``, ``forward``.
    ``xg``/``xu``: the dropped inputs of the gate/up adapters (``None`` without an adapter); ``a_*``/``b_*``: the
    adapter weights or ``None``; ``noise``: ``None`` or a callable returning the down adapter's dropout scale for a
    shape (drawn like PEFT's dropout module, over ``[T, I]``); ``select``: a
    :class:`~sat_kernels.ops.selector.Selector` of the neuron-major ``A^T`` ``[I, T]``.
    """

    @staticmethod
    def forward(ctx, x, xg, xu, w_gate, w_up, w_down, a_g, b_g, a_u, b_u, a_d, b_d, scaling, noise, select,
                act: str, forward: str):
        s_g, s_u, s_d = scaling
        g, z_g = _adapted_t(x, w_gate, xg, a_g, b_g, s_g)              # [I, T], [T, r]
        u, z_u = _adapted_t(x, w_up, xu, a_u, b_u, s_u)                # [I, T], [T, r]
        a = act_fwd(g, act).mul_(u)                                    # [I, T]
        idx = select(a).indices                                        # [k]
        g_s, u_s = ops.gather_rows(g, idx), ops.gather_rows(u, idx)    # [k, T]
        del g, u
        if forward == "dense":
            y = torch.mm(a.t(), w_down.t())                            # [T, h]
        else:
            a_s = ops.gather_rows(a, idx)                              # [k, T]
            y = torch.mm(a_s.t(), ops.gather_cols(w_down, idx).t())   # [T, h]
        m_s = z_d = None
        if a_d is not None:
            m = noise(a.t().shape, a.device) if noise is not None else None             # [T, I], PEFT's layout
            if m is not None:
                m_s = ops.gather_cols(m, idx).t()                                        # [k, T]
            if forward == "dense":
                d = a if m is None else a * m.t()                                        # [I, T]
                z_d = torch.mm(d.t().to(a_d.dtype), a_d.t())                             # [T, r]
            else:
                d_s = a_s if m_s is None else a_s * m_s                                  # [k, T]
                z_d = torch.mm(d_s.t().to(a_d.dtype), ops.gather_cols(a_d, idx).t())     # [T, r]
            y = (y + torch.mm(z_d, b_d.t()) * s_d).to(y.dtype)
        need = dict(zip(_INPUTS, ctx.needs_input_grad))
        ctx.save_for_backward(x if need["w_gate"] or need["w_up"] else None, xg if need["a_g"] else None,
                              xu if need["a_u"] else None, w_gate, w_up, w_down, a_g, b_g, a_u, b_u, a_d, b_d, idx,
                              g_s, u_s, m_s, z_g, z_u, z_d)
        ctx.scaling, ctx.act = scaling, act
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, dy, _didx):
        (x, xg, xu, w_gate, w_up, w_down, a_g, b_g, a_u, b_u, a_d, b_d, idx, g_s, u_s, m_s, z_g, z_u,
         z_d) = ctx.saved_tensors
        s_g, s_u, s_d = ctx.scaling
        act, need = ctx.act, dict(zip(_INPUTS, ctx.needs_input_grad))
        inter = w_gate.shape[0]
        dy = dy.contiguous()
        grads = {}                                                     # input name -> gradient
        da_s = torch.mm(ops.gather_cols(w_down, idx).t(), dy.t())     # [k, T]
        act_g = act_fwd(g_s, act)                                      # [k, T]
        a_s = act_g * u_s                                              # [k, T]
        if need["w_down"]:
            grads["w_down"] = ops.scatter_cols(torch.mm(dy.t(), a_s.t()), idx, inter)                 # [h, I]
        if a_d is not None:
            dyl = dy.to(b_d.dtype)
            if need["b_d"]:
                grads["b_d"] = torch.mm(dyl.t(), z_d) * s_d                                           # [h, r]
            dz_d = torch.mm(dyl, b_d) * s_d                                                            # [T, r]
            if need["a_d"]:
                d_s = a_s if m_s is None else a_s * m_s                                                # [k, T]
                grads["a_d"] = ops.scatter_cols(torch.mm(dz_d.t(), d_s.t().to(a_d.dtype)), idx, inter)  # [r, I]
            dd_s = torch.mm(ops.gather_cols(a_d, idx).t(), dz_d.t())                                   # [k, T]
            da_s += (dd_s if m_s is None else dd_s * m_s).to(da_s.dtype)
        dg_s = act_bwd(da_s * u_s, g_s, act)                           # [k, T]
        du_s = da_s.mul_(act_g)                                        # [k, T]
        if need["x"]:
            grads["x"] = torch.mm(dg_s.t(), ops.gather_rows(w_gate, idx))                             # [T, h]
            grads["x"].addmm_(du_s.t(), ops.gather_rows(w_up, idx))
        if need["w_gate"]:
            grads["w_gate"] = ops.scatter_rows(torch.mm(dg_s, x), idx, inter)                         # [I, h]
        if need["w_up"]:
            grads["w_up"] = ops.scatter_rows(torch.mm(du_s, x), idx, inter)                           # [I, h]
        for p, dout, xd, a_p, b_p, z, s in (("g", dg_s, xg, a_g, b_g, z_g, s_g), ("u", du_s, xu, a_u, b_u, z_u, s_u)):
            if a_p is not None:
                grads[f"x{p}"], grads[f"a_{p}"], grads[f"b_{p}"] = _adapter_bwd(
                    dout, xd, a_p, b_p, z, s, idx, inter, need[f"x{p}"], need[f"a_{p}"], need[f"b_{p}"])
        return tuple(grads.get(name) for name in _INPUTS) + (None,) * 5   # scaling, noise, select, act, forward


def _operand(term: Optional[LoRA], field: str):
    return None if term is None else getattr(term, field)


def _check_adapters(adapters, hidden: int, inter: int, device: torch.device) -> None:
    """Shapes ``A [r, in]``, ``B [out, r]``, device and dtype of each adapter, errors naming the projection."""
    shapes = {"gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    for (name, (fan_in, fan_out)), term in zip(shapes.items(), adapters):
        if term is None:
            continue
        r = term.a.shape[0]
        if term.a.dim() != 2 or tuple(term.a.shape) != (r, fan_in) or tuple(term.b.shape) != (fan_out, r):
            raise ValueError(f"the {name} adapter must have A [r, {fan_in}] and B [{fan_out}, r], got "
                             f"{tuple(term.a.shape)} and {tuple(term.b.shape)}")
        if term.a.device != device or term.b.device != device:
            raise ValueError(f"the {name} adapter must be on {device} (the device of x)")
        if term.a.dtype != term.b.dtype or not term.a.is_floating_point():
            raise TypeError(f"the {name} adapter's A and B must share one float dtype, got {term.a.dtype} and "
                            f"{term.b.dtype}")


def _down_noise(down: Optional[LoRA]):
    """``noise(shape, device)``: the scale PEFT's dropout multiplies the down adapter's input by, or ``None``."""
    if down is None or down.dropout is None:
        return None
    drop, drop_dtype = down.dropout, down.a.dtype

    def noise(shape, device):
        return drop(torch.ones(shape, dtype=drop_dtype, device=device))
    return noise


def lora_backward_reason(backward: str) -> str:
    """Why the SAT MLP on LoRA projections refuses ``backward`` (every mode but ``"sparse"``), for error messages."""
    if backward == "exact_input":
        return ("the base weights are frozen, so it would skip no weight gradient and save nothing over the dense "
                "backward")
    return "the LoRA op implements the sparse backward only"


def sat_lora_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 adapters: Tuple[Optional[LoRA], Optional[LoRA], Optional[LoRA]], k: int, *,
                 metric: str = "l2", strategy: str = "topk", act: str = "silu", sync_selection=False,
                 forward: str = "sparse", return_indices: bool = False, stats: Optional[dict] = None,
                 backward: str = "sparse", token_mask: Optional[torch.Tensor] = None, hold=None):
    """SAT SwiGLU MLP whose projections carry LoRA adapters, keeping ``k`` neurons, differentiable w.r.t. ``x``, the
    adapters and the base.

    Args:
        x: ``[..., h]``; w_gate, w_up ``[I, h]``, w_down ``[h, I]``: the base weights, of ``x``'s dtype.
        adapters: ``(gate, up, down)``, each a :class:`LoRA` or ``None``. Adapter weights may have another dtype
            (PEFT keeps them in fp32 on a bf16 base): the adapter runs in it and the sum is cast back, as in PEFT.
        k: kept neurons, an int in ``[1, I]`` (``num_kept(I, omission_rate)``), as in
            :func:`sat_kernels.ops.mlp.interface.sat_mlp_kept`.
        metric, strategy, act, sync_selection, forward, return_indices, stats, token_mask: as in
            :func:`sat_kernels.sat_mlp`.
            ``"contrib"`` weighs the scores by the column norms of the adapted down weight ``W_d + s_d B_d A_d``.
        backward: ``"sparse"`` only. ``"exact_input"`` (:func:`sat_kernels.sat_mlp`) is refused: on a frozen base it
            would skip no base weight gradient, so it would cost the dense ``dx`` and save nothing; so is
            ``"dense_tokens"``, which this op does not implement.
        hold: as in :func:`sat_kernels.ops.mlp.interface.sat_mlp_kept`.

    Returns:
        ``y`` of shape ``[..., h]``, or ``(y, indices)``.

    Example:
        >>> k = num_kept(w_g.shape[0], 0.5)
        >>> y = sat_lora_mlp(x, w_g, w_u, w_d, (LoRA(a_g, b_g, 2.0), None, LoRA(a_d, b_d, 2.0)), k)
    """
    inter, hidden = check_kept_call(x, w_gate, w_up, w_down, k, metric=metric, strategy=strategy, act=act,
                                    forward=forward, backward=backward)
    if backward != "sparse":
        raise ValueError(f"sat_lora_mlp: backward={backward!r} is not supported on LoRA MLPs: "
                         f"{lora_backward_reason(backward)}; use backward='sparse'")
    if strategy == "priority":
        raise ValueError("sat_lora_mlp: strategy='priority' is not supported on LoRA MLPs (the weighted kept neurons "
                         "exist on the plain MLP only); use 'topk', 'sample' or 'random'")
    _check_adapters(adapters, hidden, inter, x.device)
    mask = check_token_mask(token_mask, x)
    gate, up, down = adapters
    w_eff = w_down
    if metric == "contrib" and down is not None:
        with torch.no_grad():
            w_eff = w_down + (torch.mm(down.b, down.a) * down.scaling).to(w_down.dtype)
    select = mlp_selector(k, metric=metric, strategy=strategy, generator=None,
                          group=default_sync_group(sync_selection), w_down=w_eff, stats=stats, token_mask=mask,
                          hold=hold)
    x2 = x.reshape(-1, hidden)
    # the adapters' input dropout, as PEFT applies it: on x cast to the adapter's dtype, through autograd
    xg, xu = ((None if t is None else t.dropout(x2.to(t.a.dtype)) if t.dropout is not None else x2.to(t.a.dtype))
              for t in (gate, up))
    operands = [x2, xg, xu, w_gate, w_up, w_down] + [_operand(t, f) for t in adapters for f in ("a", "b")]
    device_type = x.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    if autocast:   # like F.linear under autocast: every GEMM in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        operands = [None if t is None else t.to(dtype) for t in operands]
    scaling = tuple(1.0 if t is None else float(t.scaling) for t in adapters)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        y2, idx = SATLoRAMLPFunction.apply(*operands, scaling, _down_noise(down), select, act, forward)
    y = y2.reshape(*x.shape[:-1], hidden)
    return (y, idx) if return_indices else y
