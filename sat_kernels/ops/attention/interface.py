"""SAT attention-head omission: the public functions (``sat_attention``, ``gathered_attention``, ``head_scores``),
the unit scores and the selection; the autograd Function (the ``"torch"`` backend) is in :mod:`.function`.

``sat_attention`` computes q, k, v and the attention of every head, scores each selection unit (a query head, or a
KV group) over all tokens of the batch, keeps the top units and runs the whole backward over the kept heads only;
``o_proj`` runs over the kept heads (``forward="sparse"``) or over every head (``forward="dense"``, the exact output).
:mod:`.function` tells the forward/backward story and its cost.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...distributed import default_sync_group
from ...selection import ATTENTION_STRATEGIES, FORWARD_MODES, METRICS, check_choice, check_omission_rate, num_kept, \
    selection_stats
from ..common import autocast_operands, check_indices, check_token_mask
from ..selector import Selection, Selector, reused_stats
from .checks import Operands, check_attention_backend, check_attention_inputs, check_head_counts
from .core import core_fwd
from .function import dense_attention, sat_attention_torch
from .layout import AttentionSpec, acc_dtype, take_heads
from .rope_norm import prep_qk

UNITS = ("head", "group")
# Default unit of selection for grouped-query attention: "head" (see sat_attention's docstring for the measurement).
DEFAULT_UNIT = "head"


def unit_scores(o: torch.Tensor, w_o: torch.Tensor, metric: str, unit: str, num_kv_heads: int,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 score per selection unit from the attention output ``o`` ``[B, H, T, d]`` (any strides).

    A unit's output is the concatenation of its heads' outputs (one head, or the ``H / G`` heads of a KV group):
    ``"l2"`` its Frobenius norm over all tokens, ``"l1"`` the sum of its absolute values, ``"contrib"`` its norm times
    the Frobenius norm of the unit's columns of ``w_o``. With a bool ``token_mask`` ``[B, T]`` the sums run over its
    tokens only (each token's terms times 0/1, as :func:`sat_kernels.selection.activation_scores`).
    """
    acc = acc_dtype(o.dtype)
    H, d = o.shape[1], o.shape[3]
    terms = o.abs() if metric == "l1" else o * o                                                    # [B, H, T, d]
    if token_mask is not None:
        terms.mul_(token_mask.to(terms.dtype)[:, None, :, None])
    per_head = terms.sum(dim=(0, 2, 3), dtype=acc)                                                  # [H]
    per_unit = per_head.view(num_kv_heads, -1).sum(1) if unit == "group" else per_head
    if metric == "l1":
        return per_unit.float()
    s = per_unit.sqrt()
    if metric == "contrib":
        w_sq = (w_o * w_o).sum(0, dtype=acc).view(H, d).sum(1)
        s = s * (w_sq.view(num_kv_heads, -1).sum(1) if unit == "group" else w_sq).sqrt()
    return s.float()


def _run(ops: Operands, select, spec: AttentionSpec):
    cast, autocast_device = autocast_operands(list(ops[:11]))     # the weights, biases and norm weights
    ops = Operands(*cast, *ops[11:])                              # cos, sin, mask: constants, as they are
    if autocast_device is None:
        return sat_attention_torch(ops, select, spec)
    with torch.autocast(autocast_device, enabled=False):
        return sat_attention_torch(ops, select, spec)


def sat_attention_impl(x, w_q, w_k, w_v, w_o, omission_rate, *, num_heads, num_kv_heads=None, unit=DEFAULT_UNIT,
                       **kwargs):
    """:func:`sat_attention_kept` keeping ``num_kept(n_units, omission_rate)`` units (``n_units``: ``num_heads`` for
    ``unit="head"``, ``num_kv_heads`` for ``"group"``); the other arguments as there."""
    H, G = check_head_counts(num_heads, num_kv_heads)
    check_choice(unit, UNITS, "unit")
    k = num_kept(H if unit == "head" else G, check_omission_rate(omission_rate))
    return sat_attention_kept(x, w_q, w_k, w_v, w_o, k, num_heads=H, num_kv_heads=G, unit=unit, **kwargs)


def sat_attention_kept(x, w_q, w_k, w_v, w_o, k, *, num_heads, num_kv_heads=None, cos=None, sin=None,
                       attention_mask=None, causal=True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                       q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, metric="l2", strategy="topk",
                       unit=DEFAULT_UNIT, generator=None, backend="auto", sync_selection=False, forward="sparse",
                       return_kv=False, stats=None, token_mask=None, hold=None):
    """:func:`sat_attention` keeping ``k`` units (an int in ``[1, n_units]``) instead of an omission rate, returning
    ``(y, heads, K, V)``: ``K``/``V`` ``[B, G, T, d]`` (post-RoPE keys and values of all groups, for a KV cache) with
    ``return_kv``, else ``None``. ``heads`` is ``None`` when every unit is kept (the dense computation runs then).
    ``hold``: a :class:`~sat_kernels.ops.selector.SelectionHold` whose selection of ``k`` units is reused instead of
    selecting (filled by the first call given it): :func:`sat_kernels.hold_selection`.

    :class:`sat_kernels.SATAttention` calls this with the ``k`` of its rate, computed when the rate is set: under
    ``torch.compile`` the graph then depends on the int ``k`` alone (one compilation per distinct ``k``), where a
    float rate read in the forward would recompile for every new rate and be traced as a symbolic float.
    """
    ops, spec = check_attention_inputs(
        x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, ATTENTION_STRATEGIES, "strategy")
    check_choice(unit, UNITS, "unit")
    check_choice(forward, FORWARD_MODES, "forward")
    mask = check_token_mask(token_mask, x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_attention_backend(backend)
    group = default_sync_group(sync_selection)
    H, G = spec.num_heads, spec.num_kv_heads
    n_units = H if unit == "head" else G
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_units:
        raise ValueError(f"k must be an int in [1, {n_units}] (the {unit}s), got {k!r}")
    if k == n_units:
        return dense_attention(*ops, spec), None, None, None
    rep = H // G
    w_o = ops.w_o
    select = Selector(k, metric=metric, strategy=strategy, generator=generator, group=group, token_mask=mask,
                      score=lambda o: unit_scores(o, w_o, metric, unit, G, token_mask=mask), hold=hold,
                      fill_hold=False)
    spec = spec._replace(return_kv=bool(return_kv), group_units=unit == "group", forward=forward)
    y, heads, scores, k_all, v_all = _run(ops, select, spec)
    units = heads if unit == "head" else heads[::rep] // rep   # the kept heads, or the groups of every rep-th one
    if stats is not None:
        kept = selection_stats(scores, units, keep_scores="scores" in stats)
        stats.update(reused_stats(kept, keep_scores="scores" in stats) if select.reused else kept)
    if hold is not None and not select.reused:
        hold.store(Selection(units, scores), {})
    return y, heads, (k_all if return_kv else None), (v_all if return_kv else None)


def sat_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                  omission_rate: float, *, num_heads: int, num_kv_heads: Optional[int] = None,
                  cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                  b_q=None, b_k=None, b_v=None, b_o=None, q_norm_weight=None, k_norm_weight=None,
                  norm_eps: float = 1e-6, metric: str = "l2", strategy: str = "topk", unit: str = DEFAULT_UNIT,
                  generator: Optional[torch.Generator] = None, backend: str = "auto", return_indices: bool = False,
                  sync_selection=False, forward: str = "sparse", stats: Optional[dict] = None,
                  token_mask: Optional[torch.Tensor] = None):
    """SAT self-attention with in-step head selection, differentiable w.r.t. ``x``, the four projection weights,
    the biases and the q/k norm weights.

    Computes q, k, v and the attention of all heads once (the scores need them), scores every unit over all tokens of
    the batch (``metric``), keeps ``k = num_kept(n_units, omission_rate)`` units (``strategy``) and runs the whole
    backward over the kept heads only: their rows of ``w_q`` (and of ``w_k``/``w_v`` for a group with no kept head)
    and columns of ``w_o`` get exactly zero gradient. With ``forward="sparse"`` (the paper's mode) ``o_proj`` runs over
    the kept heads too and omitted heads contribute nothing to ``y``; with ``forward="dense"`` ``y`` is the exact
    dense output (``o_proj`` over every head, whose outputs are computed anyway) and only the gradient is sparse: the
    same gradient as ``"sparse"`` at the same kept heads, taken at the dense model's loss, with the same saved tensors.
    When every unit is kept (``omission_rate`` 0, or a rate too small to drop one unit) this is the dense attention.

    Unit of selection (grouped-query attention): ``"head"`` (default) selects query heads, and a KV group's
    ``k_proj``/``v_proj`` rows get gradient when any of its heads is kept; ``"group"`` selects whole KV groups and also
    skips the k/v backward of omitted groups, at a coarser grain (why ``"head"`` is the default: docs/benchmarks.md,
    "Unit of selection").

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
        forward: ``"sparse"`` (default) or ``"dense"`` (exact forward output, sparse backward). The dense output
            costs the ``o_proj`` columns of the omitted heads in the forward, ``2 * B*T * h * (H - k) * d`` FLOPs.
        stats: a dict that receives the statistics of this call's selection, without a host sync, as in
            :func:`sat_kernels.sat_mlp` but over units: ``kept`` (``k`` units, an int), ``kept_mass`` (share of the
            finite unit-score mass kept, fp32 0-dim tensor) and ``nonfinite`` (NaN/inf unit scores, which rank lowest
            and are omitted; int64 0-dim tensor). Left unchanged when every unit is kept (nothing is scored then).
        token_mask: the tokens the unit scores are summed over: ``None`` (default: every token), or a bool or integer
            ``[B, T]`` tensor on ``x``'s device, True / nonzero for the tokens that count (e.g. the 2-D
            ``attention_mask`` of a padded batch). It only changes which units are kept: every token still goes
            through the attention (``attention_mask`` is what masks keys).

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
        strategy=strategy, unit=unit, generator=generator, backend=backend, sync_selection=sync_selection,
        forward=forward, stats=stats, token_mask=token_mask)
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
        heads = check_indices(heads, spec.num_heads, x.device, units="heads")
    elif not isinstance(heads, torch.Tensor):
        raise TypeError(f"heads must be a torch.Tensor of integers, got {type(heads).__name__}")
    return _run(ops, heads.long(), spec)[0]


@torch.no_grad()
def head_scores(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *,
                num_heads: int, num_kv_heads: Optional[int] = None, cos=None, sin=None, attention_mask=None,
                causal: bool = True, scale=None, b_q=None, b_k=None, b_v=None, b_o=None, q_norm_weight=None,
                k_norm_weight=None, norm_eps: float = 1e-6, metric: str = "l2", unit: str = DEFAULT_UNIT,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 importance of every unit (``[H]`` for ``unit="head"``, ``[G]`` for ``"group"``) over all tokens of ``x``
    (not differentiable), or over the tokens of ``token_mask`` (as in :func:`sat_attention`). See :func:`unit_scores`
    for the metrics."""
    ops, spec = check_attention_inputs(
        x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, cos=cos, sin=sin,
        attention_mask=attention_mask, causal=causal, scale=scale, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    check_choice(metric, METRICS, "metric")
    check_choice(unit, UNITS, "unit")
    mask = check_token_mask(token_mask, x)
    B, T, _ = x.shape
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos_, sin_ = (cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)) if cos is not None else (None, None)
    q = prep_qk(F.linear(x, w_q, b_q).view(B, T, H, d), q_norm_weight, cos_, sin_, spec.norm_eps)
    k = prep_qk(F.linear(x, w_k, b_k).view(B, T, G, d), k_norm_weight, cos_, sin_, spec.norm_eps)
    v = F.linear(x, w_v, b_v).view(B, T, G, d)
    group_of = torch.arange(H, device=x.device) // (H // G)
    o, _ = core_fwd(q.transpose(1, 2), take_heads(k, group_of).transpose(1, 2),
                     take_heads(v, group_of).transpose(1, 2), attention_mask, spec)
    return unit_scores(o, w_o, metric, unit, G, token_mask=mask)
