"""SAT SwiGLU MLP on the ``"torch"`` backend: row gathers + ``torch.mm`` (cuBLAS / oneDNN) on compact operands.

Every activation is handled as ``[I, T]`` and, but for fp32/fp64 on CPU (:func:`neuron_major`), stored so: each
gather of kept neurons and each per-neuron reduction then runs along the leading dimension, over contiguous rows.
GEMMs take transposed operands at no cost (oneDNN and cuBLAS read either layout); gathers and scatters do not: on CPU
a column gather ``index_select(1)`` of a 2-byte ``[T, I]`` tensor is 8-12x its row twin (docs/benchmarks.md).

Forward (in-step selection, docs/design.md section 2)::

    G^T = W_gate x^T, U^T = W_up x^T       [I, T]   all neurons, once (the scores need them)
    A^T = act(G^T) * U^T, s = score(A^T)   [I, T], [I] fp32 (row norms)
    S = select(s)                          [k]      sorted, no host sync
    y = A^T[S]^T W_down[:, S]^T            [T, h]   kept neurons only (forward="sparse", the paper's mode)
    y = (A^T)^T W_down^T                   [T, h]   every neuron (forward="dense": the exact output, A exists anyway)

Saved for backward: ``x``, the weights, ``S``, ``G^T[S]``, ``U^T[S]`` (never a full ``[I, T]`` activation). The
backward runs only over the kept neurons (6 GEMMs of ``2*T*h*k`` FLOPs) and scatters the compact weight gradients
into zero full-size gradients, so omitted rows of ``W_gate``/``W_up`` and columns of ``W_down`` get exactly zero.
It is the same in both forward modes: with ``forward="dense"`` the loss is the dense model's and its gradient is
taken through the kept neurons only. FLOPs per ``T*h*I`` (forward + backward): ``4 + 14*rho`` sparse, ``6 + 12*rho``
dense forward, 18 dense.

``backward="exact_input"`` (with ``forward="dense"`` only) keeps the input gradient exact: it saves ``G^T`` and
``U^T`` of every neuron instead of the kept rows, and its backward runs ``dA^T = W_down^T dy^T``, the SwiGLU backward
and ``dx = dG W_gate + dU W_up`` over all ``I`` neurons (full GEMMs, no gathers), then the weight gradients over the
kept rows of ``dG^T``/``dU^T``/``A^T`` only (3 GEMMs of ``2*T*h*k`` FLOPs, scattered into zeros as above). The kept
neurons' weight gradients are those of the sparse backward; ``dx`` is the dense MLP's. FLOPs: ``12 + 6*rho``.

``backward="dense_tokens"`` (with ``forward="dense"`` only) runs the backward of the rows ``D`` of a token mask (the
loss tokens, in supervised fine-tuning) through every neuron and that of the other rows through the kept neurons:
the gradient of the masked-dense MLP whose mask is 1 at ``(t, i)`` when neuron ``i`` is kept or token ``t`` is in
``D``. It saves ``G^T``/``U^T`` of the omitted neurons at the rows ``D`` besides the kept rows, and its backward is the
sparse one plus the omitted neurons over ``D`` only (6 GEMMs of ``2*|D|*h*(I-k)`` FLOPs, their weight gradients
written into the omitted rows / columns): ``6 + 12*rho + 12*(1-rho)*|D|/T`` FLOPs per ``T*h*I``.

``gathered_mlp`` with a given index set skips the dense gate/up projections: it gathers the kept weight rows first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...selection import omitted_neurons, select_neurons

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
    def gather_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:      # w[idx, :]         [k, W] (w's layout)
        if w.stride(0) == 1 and w.stride(1) != 1:     # a token-major activation: the columns of its memory
            return w.t().index_select(1, idx).t()
        return w.index_select(0, idx)

    @staticmethod
    def gather_cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:      # w[:, idx]         [R, k] (any strides)
        if w.element_size() == 2 and w.device.type == "cpu" and w.shape[0] <= 2048:
            # a 2-byte index_select(1) is a scalar loop on CPU: read the rows of the transposed view instead (0.46 vs
            # 1.01 ms for W_down [576, 1536] bf16, 1.16 vs 3.22 ms at [1024, 2816]). Each of those rows touches one
            # cache line and one page per row of w, which stops paying when w is tall: 213 vs 133 ms at
            # [4096, 11008] (EPYC, 1 thread, torch 2.13).
            return w.t().index_select(0, idx).t()
        return w.index_select(1, idx)

    @staticmethod
    def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:   # zeros [n, W], rows at idx
        return rows.new_zeros(n, rows.shape[1]).index_copy_(0, idx, rows)

    @staticmethod
    def scatter_cols(cols: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:   # zeros [R, n], cols at idx
        return cols.new_zeros(cols.shape[0], n).index_copy_(1, idx, cols)

    select_neurons = staticmethod(select_neurons)


def neuron_major(x: torch.Tensor) -> bool:
    """Whether the activations of ``x``'s MLP are stored neuron-major (``[I, T]`` in memory) or token-major (``[T, I]``
    in memory, handled as its transposed ``[I, T]`` view).

    Neuron-major everywhere but for 4- and 8-byte dtypes on CPU: there a column gather of ``[T, I]`` is a vectorized
    copy (0.62 ms for [2048, 1536] fp32 against 3.47 ms in bf16), and oneDNN's fp32 GEMMs that write ``[I, T]`` ran
    1-3% slower than those that write ``[T, I]`` (T 2048 h 576 I 1536 and T 1024 h 1024 I 2816; EPYC, 1 thread,
    torch 2.13), which cost the fp32 op 2-6% over the token-major layout at the Llama-2-7B shape. Compiled graphs are
    neuron-major throughout (a saved activation must not be a view of an intermediate there)."""
    return x.element_size() <= 2 or x.device.type != "cpu" or torch.compiler.is_compiling()


def _in_layout(t: torch.Tensor, neuron_major: bool) -> torch.Tensor:
    """``t`` ``[units, T]`` stored neuron-major or token-major (a gather can return either): the elementwise kernels
    of the backward run 2-3x slower per element on operands of mixed layouts (bf16 SiLU backward, CPU)."""
    return t.contiguous() if neuron_major else t.t().contiguous().t()


def _units_mm(a: torch.Tensor, b: torch.Tensor, neuron_major: bool) -> torch.Tensor:
    """``a @ b`` (``[units, T]``), written neuron-major or token-major (as the transposed view of ``b^T a^T``)."""
    return torch.mm(a, b) if neuron_major else torch.mm(b.t(), a.t()).t()


class SATMLPFunction(torch.autograd.Function):
    """Autograd op of the SAT MLP on 2-D ``x``, over the index operations ``ops`` (e.g. :class:`TorchIndexOps`).

    ``select`` is either a ``LongTensor`` of kept indices (``gathered_mlp``) or a
    :class:`~sat_kernels.ops.selector.Selector` that scores the neuron-major activations ``A^T`` ``[I, T]`` and picks
    the kept set with ``ops.select_neurons`` (``sat_mlp``). Its :class:`~sat_kernels.ops.selector.Selection` may
    carry per-neuron weights ``[k]`` (priority sampling): the kept neurons' activations are scaled by them (in ``y``
    with the sparse forward, and in the gradient). ``forward="dense"`` (only with a selector) computes ``y`` over
    every neuron; the backward is unchanged. ``backward="exact_input"`` (only with a selector and
    ``forward="dense"``) saves the full pre-activations and computes ``dx`` through every neuron; the weight
    gradients stay over the kept neurons (scaled by the priority weights, if any; ``dx`` is exact and is not).
    ``backward="dense_tokens"`` (only with a selector, ``forward="dense"`` and unweighted selections) takes
    ``dense_rows``, the ``LongTensor`` of rows of ``x`` whose backward runs through every neuron.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, select, act: str, ops, forward: str = "sparse",
                backward: str = "sparse", dense_rows=None):
        weight, nm, omit, g_o, u_o = None, neuron_major(x), None, None, None
        if isinstance(select, torch.Tensor):
            idx = select
            g_s = _units_mm(ops.gather_rows(w_gate, idx), x.t(), nm)  # [k, T]
            u_s = _units_mm(ops.gather_rows(w_up, idx), x.t(), nm)    # [k, T]
            a_s = act_fwd(g_s, act).mul_(u_s)                          # [k, T]
            forward = backward = "sparse"
        else:
            g = _units_mm(w_gate, x.t(), nm)                           # [I, T]
            u = _units_mm(w_up, x.t(), nm)                             # [I, T]
            a = act_fwd(g, act).mul_(u)                                # [I, T]
            idx, _, weight = select(a, select_fn=ops.select_neurons)  # [k]; weight [k] fp32 with "priority"
            if backward == "exact_input":
                # dx needs every neuron's G and U; saving them (2 [I, T]) is cheaper than recomputing them from x
                # (two more T*h*I GEMMs in the backward)
                g_s, u_s = g, u                                        # [I, T]
            else:
                g_s, u_s = ops.gather_rows(g, idx), ops.gather_rows(u, idx)   # [k, T]
            if backward == "dense_tokens":
                omit = omitted_neurons(idx, g.shape[0])                # [I-k]
                ctx.dense_count = dense_rows.numel()
                dense_rows = _pad_rows(dense_rows)                     # [|D|] on CPU: padded, see _pad_rows
                g_o, u_o = (_in_layout(ops.gather_cols(ops.gather_rows(t, omit), dense_rows), nm)
                            for t in (g, u))                           # [I-k, |D|]
                g_o[:, ctx.dense_count:] = 0                           # padding: act(0) * 0 = 0, no gradient
                u_o[:, ctx.dense_count:] = 0
            del g, u
            if forward == "dense":
                y = torch.mm(a.t(), w_down.t())                        # [T, h]
            else:
                a_s = ops.gather_rows(a, idx)                          # [k, T]
                if weight is not None:
                    a_s.mul_(weight.to(a_s.dtype)[:, None])
            del a
        if forward != "dense":
            y = torch.mm(a_s.t(), ops.gather_cols(w_down, idx).t())   # [T, h]
        ctx.save_for_backward(x, w_gate, w_up, w_down, idx, g_s, u_s, weight, dense_rows, omit, g_o, u_o)
        ctx.act, ctx.ops, ctx.backward = act, ops, backward
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, dy, _didx):
        x, w_gate, w_up, w_down, idx, g_s, u_s, weight, dense_rows, omit, g_o, u_o = ctx.saved_tensors
        ops = ctx.ops
        dy = dy.contiguous()
        if ctx.backward == "exact_input":
            if ctx.needs_input_grad[0]:
                grads = _exact_input_grads(ctx, dy, x, w_gate, w_up, w_down, idx, g_s, u_s, weight)
                return (*grads, None, None, None, None, None, None)
            # no dx: the kept neurons' weight gradients are all there is, and the sparse backward computes them
            g_s, u_s = ops.gather_rows(g_s, idx), ops.gather_rows(u_s, idx)   # [k, T]
        act, n = ctx.act, w_gate.shape[0]
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        wd_s = ops.gather_cols(w_down, idx)                            # [h, k]
        da_s = _units_mm(wd_s.t(), dy.t(), neuron_major(dy))          # [k, T]
        act_g = act_fwd(g_s, act)                                      # [k, T]
        if weight is not None:                                         # priority: the kept neurons' weights
            weight = weight.to(da_s.dtype)[:, None]
            da_s.mul_(weight)
        dx = dwg = dwu = dwd = None
        if need_wd:
            a_s = act_g * u_s if weight is None else act_g * u_s * weight                            # [k, T]
            dwd = ops.scatter_cols(torch.mm(dy.t(), a_s.t()).to(w_down.dtype), idx, n)                 # [h, I]
        dg_s = act_bwd(da_s * u_s, g_s, act)                           # [k, T]
        du_s = da_s.mul_(act_g)                                        # [k, T]
        if need_wg:
            dwg = ops.scatter_rows(torch.mm(dg_s, x).to(w_gate.dtype), idx, n)                       # [I, h]
        if need_wu:
            dwu = ops.scatter_rows(torch.mm(du_s, x).to(w_up.dtype), idx, n)                         # [I, h]
        if need_x:
            dx = torch.mm(dg_s.t(), ops.gather_rows(w_gate, idx))     # [T, h]
            dx.addmm_(du_s.t(), ops.gather_rows(w_up, idx))
        if ctx.backward == "dense_tokens":
            _add_dense_rows_grads(ctx, dy, x, w_gate, w_up, w_down, dense_rows, omit, g_o, u_o, dx, dwg, dwu, dwd)
        return dx, dwg, dwu, dwd, None, None, None, None, None, None


# On CPU oneDNN builds a GEMM kernel for every new shape (0.5-0.65 ms more for a bf16 [768, ~300] x [~300, 576]
# product than for a shape seen before, which took 0.56 ms; EPYC, 1 thread, torch 2.13, another job on the machine),
# and the marked-token count changes from batch to batch: padded to a multiple of this, the six GEMMs over the marked
# tokens reuse a few shapes. With the layout of _in_layout, against the op before both (counts varying within 10% of
# 28%, bf16, T 1024 / 2048, h 576, I 1536): 0.950 / 0.898 of the dense MLP's time against 1.009 / 0.975 at 2 threads,
# 0.890 / 0.810 against 0.892 / 0.847 at 1 thread (benchmarks/results/cpu_speed/avx512_bf16/mlp_dense_tokens_vs_*).
DENSE_ROWS_MULTIPLE = 64


def _pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` padded with row 0 to a multiple of ``DENSE_ROWS_MULTIPLE`` on CPU (the padding's activations and
    gradients are zeroed where they are used), unchanged on other devices."""
    pad = -rows.numel() % DENSE_ROWS_MULTIPLE if rows.device.type == "cpu" else 0
    return torch.cat([rows, rows.new_zeros(pad)]) if pad else rows


def _add_dense_rows_grads(ctx, dy, x, w_gate, w_up, w_down, rows, omit, g, u, dx, dwg, dwu, dwd):
    """Add what ``backward="dense_tokens"`` adds to the sparse backward: the omitted neurons ``omit`` at the rows
    ``rows`` of ``x`` (``g``, ``u``: their pre-activations ``[I-k, |D|]``; the rows from ``ctx.dense_count`` on are
    padding, their ``g`` and ``u`` zero). Their weight gradients are written into the omitted rows of ``dwg``/``dwu``
    and columns of ``dwd`` (zero there so far), their input gradient added to ``dx``'s rows (the gradients that are
    ``None`` are not needed)."""
    act, ops = ctx.act, ctx.ops
    dy_d, x_d = dy.index_select(0, rows), x.index_select(0, rows)    # [|D|, h]
    dy_d[ctx.dense_count:] = 0                                         # padding rows: zero gradients everywhere
    x_d[ctx.dense_count:] = 0
    da = _units_mm(ops.gather_cols(w_down, omit).t(), dy_d.t(), neuron_major(dy))   # [I-k, |D|]
    act_g = act_fwd(g, act)                                            # [I-k, |D|]
    if dwd is not None:
        dwd.index_copy_(1, omit, torch.mm(dy_d.t(), (act_g * u).t()).to(dwd.dtype))
    dg = act_bwd(da * u, g, act)                                       # [I-k, |D|]
    du = da.mul_(act_g)                                                # [I-k, |D|]
    if dwg is not None:
        dwg.index_copy_(0, omit, torch.mm(dg, x_d).to(dwg.dtype))
    if dwu is not None:
        dwu.index_copy_(0, omit, torch.mm(du, x_d).to(dwu.dtype))
    if dx is not None:
        dx_d = torch.mm(dg.t(), ops.gather_rows(w_gate, omit))        # [|D|, h]
        dx.index_add_(0, rows, dx_d.addmm_(du.t(), ops.gather_rows(w_up, omit)))


def _exact_input_grads(ctx, dy, x, w_gate, w_up, w_down, idx, g, u, weight):
    """``(dx, dW_gate, dW_up, dW_down)`` of ``backward="exact_input"``: ``dA``, the SwiGLU backward and ``dx`` over
    every neuron (``g``, ``u``: the full ``[I, T]`` pre-activations, in the layout of :func:`neuron_major`), the
    weight gradients over the kept rows ``idx`` only, scaled by the priority weights ``weight`` ``[k]`` if given."""
    act, ops, n = ctx.act, ctx.ops, w_gate.shape[0]
    _, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
    da = _units_mm(w_down.t(), dy.t(), neuron_major(dy))              # [I, T]
    act_g = act_fwd(g, act)                                            # [I, T]
    dg = act_bwd(da * u, g, act)                                       # [I, T]
    du = da.mul_(act_g)                                                # [I, T]
    dx = torch.mm(dg.t(), w_gate)                                      # [T, h]
    dx.addmm_(du.t(), w_up)
    if weight is not None:                                             # priority: the kept neurons' weights
        weight = weight.to(dg.dtype)[:, None]

    def kept_rows_grad(d, w):                                          # d [I, T] -> zeros [I, h] but kept rows
        d_s = ops.gather_rows(d, idx)                                  # [k, T]
        if weight is not None:
            d_s.mul_(weight)
        return ops.scatter_rows(torch.mm(d_s, x).to(w.dtype), idx, n)

    dwg = kept_rows_grad(dg, w_gate) if need_wg else None             # [I, h]
    dwu = kept_rows_grad(du, w_up) if need_wu else None               # [I, h]
    dwd = None
    if need_wd:
        a_s = ops.gather_rows(act_g, idx).mul_(ops.gather_rows(u, idx))   # [k, T]
        if weight is not None:
            a_s.mul_(weight)
        dwd = ops.scatter_cols(torch.mm(dy.t(), a_s.t()).to(w_down.dtype), idx, n)                     # [h, I]
    return dx, dwg, dwu, dwd


def sat_mlp_torch(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  select, act: str, forward: str = "sparse", backward: str = "sparse", dense_rows=None):
    """Launcher of the torch backend: ``x2`` is ``[T, h]``; returns ``(y [T, h], idx [k])``. ``backward`` and
    ``dense_rows``: the torch backend's own options (``"exact_input"``, ``"dense_tokens"`` with the rows of ``x2``
    whose backward is dense), which the other launchers do not take."""
    return SATMLPFunction.apply(x2, w_gate, w_up, w_down, select, act, TorchIndexOps, forward, backward, dense_rows)
