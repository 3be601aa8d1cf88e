"""The public SAT MLP ops (``sat_mlp``, ``gathered_mlp``, ``neuron_scores``): argument checks, autocast and backend
dispatch. The autograd Function and the torch backend are in :mod:`.function`, the other backends in ``triton/`` and
``cuda/``."""
from __future__ import annotations

from typing import Optional

import torch

from ...distributed import default_sync_group
from ...selection import BACKWARD_MODES, FORWARD_MODES, METRICS, STRATEGIES, activation_scores, check_choice, \
    check_omission_rate, num_kept
from ..common import FLOAT_DTYPES, autocast_operands, check_indices, check_token_mask
from ..selector import SelectionHold, Selector
from .function import ACTIVATIONS, act_fwd, dense_mlp, sat_mlp_torch


def check_mlp_inputs(x, w_gate, w_up, w_down):
    """Validate the MLP operands; returns ``(I, h)``."""
    named = {"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor (float64/32/16, bfloat16), got {t.dtype}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"x, w_gate, w_up and w_down must share one dtype, got {dtypes}")
    devices = {name: str(t.device) for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"x, w_gate, w_up and w_down must be on one device, got {devices}")
    if w_gate.dim() != 2:
        raise ValueError(f"w_gate must be 2-D [I, h], got shape {tuple(w_gate.shape)}")
    inter, hidden = w_gate.shape
    if tuple(w_up.shape) != (inter, hidden):
        raise ValueError(f"w_up must have the shape of w_gate {(inter, hidden)}, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (hidden, inter):
        raise ValueError(f"w_down must be [h, I] = {(hidden, inter)}, got {tuple(w_down.shape)}")
    if x.dim() < 1 or x.shape[-1] != hidden:
        raise ValueError(f"x must be [..., h] with h = {hidden} (w_gate.shape[1]), got shape {tuple(x.shape)}")
    return inter, hidden


def check_backward(backward: str, forward: str, backend: str = "auto", strategy: Optional[str] = None) -> str:
    """Validate the ``backward`` mode of an MLP op against its ``forward`` mode and ``backend``; returns ``backward``.

    ``"exact_input"`` and ``"dense_tokens"`` need ``forward="dense"`` (with the sparse forward the omitted neurons are
    not in the output, so every gradient through them is zero by definition: ``"sparse"`` computes that) and the
    torch backend: ``"auto"`` runs them there, an explicit ``"triton"`` / ``"cuda"`` is refused. ``"dense_tokens"``
    also refuses ``strategy="priority"`` (when ``strategy`` is given).
    """
    check_choice(backward, BACKWARD_MODES, "backward")
    if backward != "sparse":
        if forward != "dense":
            raise ValueError(f"backward={backward!r} needs forward='dense', got forward={forward!r}: with the sparse "
                             f"forward the omitted neurons are not in the output, so every gradient through them is "
                             f"zero by definition (use backward='sparse')")
        if backend in ("triton", "cuda"):
            raise ValueError(f"backward={backward!r} is implemented by the torch backend only, got "
                             f"backend={backend!r}; use backend='torch' or 'auto'")
    if backward == "dense_tokens" and strategy == "priority":
        raise ValueError("backward='dense_tokens' does not support strategy='priority': its weights scale the kept "
                         "neurons' gradient, which the dense tokens must take unscaled; use 'topk', 'sample' or "
                         "'random'")
    return backward


def check_kept_call(x, w_gate, w_up, w_down, k, *, metric: str, strategy: str, act: str, forward: str,
                    backward: str = "sparse", backend: str = "auto"):
    """Validate the operands and options of an MLP op called with a kept count ``k``; returns ``(I, h)``."""
    inter, hidden = check_mlp_inputs(x, w_gate, w_up, w_down)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= inter:
        raise ValueError(f"k must be an int in [1, {inter}] (the neurons of w_gate), got {k!r}")
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(act, ACTIVATIONS, "act")
    check_choice(forward, FORWARD_MODES, "forward")
    check_backward(backward, forward, backend, strategy)
    return inter, hidden


def _run(launcher, x, w_gate, w_up, w_down, select, act, forward="sparse", backward="sparse", dense_rows=None):
    hidden = w_gate.shape[1]
    (x, w_gate, w_up, w_down), autocast_device = autocast_operands((x, w_gate, w_up, w_down))
    x2 = x.reshape(-1, hidden).contiguous()
    extra = {}                                                       # options of the torch launcher only
    if backward != "sparse":
        extra["backward"] = backward
    if dense_rows is not None:
        extra["dense_rows"] = dense_rows
    if autocast_device is None:
        y2, idx = launcher(x2, w_gate, w_up, w_down, select, act, forward, **extra)
    else:
        with torch.autocast(autocast_device, enabled=False):
            y2, idx = launcher(x2, w_gate, w_up, w_down, select, act, forward, **extra)
    return y2.reshape(*x.shape[:-1], hidden), idx


def sat_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, omission_rate: float,
            *, metric: str = "l2", strategy: str = "topk", generator: Optional[torch.Generator] = None,
            act: str = "silu", backend: str = "auto", return_indices: bool = False, sync_selection=False,
            forward: str = "sparse", backward: str = "sparse", stats: Optional[dict] = None,
            token_mask: Optional[torch.Tensor] = None, dense_token_mask: Optional[torch.Tensor] = None):
    """SAT SwiGLU MLP with in-step neuron selection, differentiable w.r.t. ``x`` and all three weights.

    Computes gate/up for all ``I`` neurons once, scores them (``metric``), keeps ``k = num_kept(I, omission_rate)``
    (``strategy``) and runs the whole backward over the kept neurons only: their rows of ``w_gate``/``w_up`` and
    columns of ``w_down`` get exactly zero gradient. With ``forward="sparse"`` (the paper's mode) the down projection
    runs over the kept neurons too and omitted neurons contribute nothing to ``y``; with ``forward="dense"`` ``y`` is
    the exact dense output (the down projection over all ``I`` neurons) and only the gradient is sparse: the same
    gradient as ``"sparse"`` at the same kept set, taken at the dense model's loss. At ``omission_rate`` 0 (or whenever
    ``k == I``) this is the dense MLP. With ``forward="dense"``, ``backward="exact_input"`` also makes the input
    gradient exact (through every neuron, the dense MLP's ``dx``) and skips only the omitted neurons' weight
    gradients (the same zero rows/columns; the kept ones are those of ``backward="sparse"``). With
    ``forward="dense"``, ``backward="dense_tokens"`` runs the backward of the tokens of ``dense_token_mask`` through
    every neuron (their gradient is the dense MLP's) and that of the others through the kept neurons.

    Args:
        x: ``[..., h]`` activations.
        w_gate, w_up: ``[I, h]`` (``nn.Linear`` layout); w_down: ``[h, I]``. Same dtype and device as ``x``.
        omission_rate: fraction of neurons to omit, in ``[0, 1)``.
        metric: ``"l2"`` (default), ``"l1"`` or ``"contrib"`` (see :func:`neuron_scores`).
        strategy: ``"topk"`` (default), ``"sample"``, ``"random"`` or ``"priority"`` (see :func:`select_neurons`).
            ``"priority"`` (torch backend) also weights each kept neuron by ``max(1, tau / score)``
            (:func:`sat_kernels.selection.priority_weights`) in the backward, and in the forward output with
            ``forward="sparse"``: the omitted neurons' share is then estimated without bias instead of dropped.
        generator: ``torch.Generator`` for ``"sample"``/``"random"``; ``None`` uses the global RNG (checkpoint-safe).
        act: ``"silu"`` (Llama, Mistral, Qwen) or ``"gelu_tanh"`` (Gemma).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :func:`available_backends`).
        return_indices: also return the sorted int64 kept indices ``[k]``.
        sync_selection: select from the scores of the global batch of all data-parallel ranks (one fp32 all-reduce
            of ``I`` floats) so every rank keeps the same neurons: ``True`` (default group), a ``ProcessGroup``,
            ``None`` (auto: on when torch.distributed is initialised with several ranks) or ``False`` (default).
            See :mod:`sat_kernels.distributed`.
        forward: ``"sparse"`` (default) or ``"dense"`` (exact forward output, sparse backward). FLOPs per
            ``T*h*I`` for forward + backward: ``4 + 14*(1 - omission_rate)`` sparse, ``6 + 12*(1 - omission_rate)``
            dense, 18 for the dense MLP.
        backward: ``"sparse"`` (default: the whole backward over the kept neurons, ``dx`` included) or
            ``"exact_input"`` (needs ``forward="dense"``; torch backend, which ``backend="auto"`` picks for it):
            ``dx`` through every neuron, exactly the dense one, weight gradients of the kept neurons only (scaled by
            the priority weights with ``strategy="priority"``, ``dx`` not). It saves the gate/up pre-activations of
            all ``I`` neurons for the backward (``2*T*I`` elements, against ``2*T*k``) and costs
            ``12 + 6*(1 - omission_rate)`` FLOPs per ``T*h*I``: less saving, but the gradient that reaches the
            earlier layers is the dense one. Or ``"dense_tokens"`` (needs ``forward="dense"`` and
            ``dense_token_mask``; torch backend; not with ``strategy="priority"``): the gradient of the masked-dense
            MLP whose mask keeps neuron ``i`` at token ``t`` when ``i`` is kept or ``t`` is in ``dense_token_mask``,
            so the marked tokens (e.g. those whose logits enter the loss) get their dense gradient and every other
            token the sparse one. It saves the omitted neurons' gate/up pre-activations at the marked tokens too and
            costs ``6 + 12*(1 - omission_rate) + 12*omission_rate*D/T`` FLOPs per ``T*h*I`` (``D`` marked tokens of
            ``T``). Finding the marked rows reads the mask on the host (one synchronisation on a GPU); under
            ``torch.compile`` their data-dependent count is refused.
        stats: a dict that receives the statistics of this call's selection, without a host sync (see
            :func:`sat_kernels.sat_stats`): ``kept`` (``k``, an int), ``kept_mass`` (share of the finite score mass
            kept, fp32 0-dim tensor) and ``nonfinite`` (NaN/inf neuron scores, which rank lowest and are omitted;
            int64 0-dim tensor). Left unchanged when every neuron is kept (nothing is scored then).
        token_mask: the tokens the neuron scores are summed over: ``None`` (default: every token of ``x``), or a
            bool or integer tensor of shape ``x.shape[:-1]`` on ``x``'s device, True / nonzero for the tokens that
            count (e.g. the ``[B, T]`` ``attention_mask`` of a padded batch with ``x`` ``[B, T, h]``). The masked
            tokens still go through the MLP (``y`` is computed for every token) and their gradients are those of the
            kept neurons; only the choice of the kept set ignores them: the scores are those of the masked-in tokens
            alone. Every backend supports it.
        dense_token_mask: with ``backward="dense_tokens"`` (and only then), the tokens whose backward runs through
            every neuron: a bool or integer tensor of shape ``x.shape[:-1]`` on ``x``'s device, True / nonzero for
            those tokens.

    Returns:
        ``y`` of shape ``[..., h]``, or ``(y, indices)``.

    Example:
        >>> y, idx = sat_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 0.5,
        ...                  return_indices=True)
    """
    inter, _ = check_mlp_inputs(x, w_gate, w_up, w_down)
    return sat_mlp_kept(x, w_gate, w_up, w_down, num_kept(inter, check_omission_rate(omission_rate)), metric=metric,
                        strategy=strategy, generator=generator, act=act, backend=backend,
                        return_indices=return_indices, sync_selection=sync_selection, forward=forward,
                        backward=backward, stats=stats, token_mask=token_mask, dense_token_mask=dense_token_mask)


def sat_mlp_kept(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, k: int, *,
                 metric: str = "l2", strategy: str = "topk", generator: Optional[torch.Generator] = None,
                 act: str = "silu", backend: str = "auto", return_indices: bool = False, sync_selection=False,
                 forward: str = "sparse", backward: str = "sparse", stats: Optional[dict] = None,
                 token_mask: Optional[torch.Tensor] = None, hold: Optional[SelectionHold] = None,
                 dense_token_mask: Optional[torch.Tensor] = None):
    """:func:`sat_mlp` keeping ``k`` neurons, an int in ``[1, I]``, instead of an omission rate.

    ``hold``: a :class:`~sat_kernels.ops.selector.SelectionHold` whose selection of ``k`` neurons is reused instead of
    selecting (filled by the first call given it): :func:`sat_kernels.hold_selection`.

    :class:`sat_kernels.SATMLP` calls this with the ``k`` of its rate, computed when the rate is set: under
    ``torch.compile`` the graph then depends on the int ``k`` alone (one compilation per distinct ``k``), where a
    float rate read in the forward would recompile for every new rate and be traced as a symbolic float.
    """
    inter, _ = check_kept_call(x, w_gate, w_up, w_down, k, metric=metric, strategy=strategy, act=act,
                               forward=forward, backward=backward, backend=backend)
    mask = check_token_mask(token_mask, x)
    dense = _check_dense_token_mask(dense_token_mask, x, backward)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    from ...backends import resolve_backend
    launcher = resolve_backend("torch" if backward != "sparse" else backend, x)
    group = default_sync_group(sync_selection)
    if k == inter:
        y = dense_mlp(x, w_gate, w_up, w_down, act)
        return (y, torch.arange(inter, device=x.device)) if return_indices else y

    if strategy == "priority" and launcher is not sat_mlp_torch:
        raise ValueError(f"strategy='priority' runs on the torch backend only (it weights the kept neurons), got "
                         f"backend={backend!r}; use backend='torch' (or 'auto')")
    select = mlp_selector(k, metric=metric, strategy=strategy, generator=generator, group=group, w_down=w_down,
                          stats=stats, token_mask=mask, hold=hold)
    dense_rows = None if dense is None else dense.reshape(-1).nonzero().squeeze(1)   # a host sync on a GPU
    y, idx = _run(launcher, x, w_gate, w_up, w_down, select, act, forward, backward, dense_rows)
    return (y, idx) if return_indices else y


def _check_dense_token_mask(dense_token_mask, x: torch.Tensor, backward: str) -> Optional[torch.Tensor]:
    """``dense_token_mask`` as a bool tensor of shape ``x.shape[:-1]`` (``backward="dense_tokens"``, which needs
    it), or ``None`` for the other modes, which take none."""
    if backward != "dense_tokens":
        if dense_token_mask is not None:
            raise ValueError(f"dense_token_mask is an argument of backward='dense_tokens', got backward={backward!r}")
        return None
    if dense_token_mask is None:
        raise ValueError("backward='dense_tokens' needs dense_token_mask: a bool tensor of shape x.shape[:-1], True "
                         "for the tokens whose backward runs through every neuron")
    mask = check_token_mask(dense_token_mask, x, name="dense_token_mask",
                            role="the tokens whose backward runs through every neuron")
    if torch.compiler.is_compiling():
        raise ValueError("backward='dense_tokens' is not supported under torch.compile: the number of tokens of "
                         "dense_token_mask decides the shapes of its backward (a data-dependent shape); run it "
                         "eagerly or use backward='sparse' / 'exact_input'")
    return mask


def mlp_selector(k: int, *, metric: str, strategy: str, generator: Optional[torch.Generator], group,
                 w_down: Optional[torch.Tensor], stats: Optional[dict] = None,
                 token_mask: Optional[torch.Tensor] = None, hold: Optional[SelectionHold] = None) -> Selector:
    """The :class:`~sat_kernels.ops.selector.Selector` of an MLP op: scores the neuron-major activations ``A^T``
    ``[I, T]`` with ``metric`` (``"contrib"`` weighs by the column norms of ``w_down``) over the tokens of the bool
    ``token_mask`` (any shape of ``T`` entries, flattened here; ``None``: every token) and keeps ``k`` neurons, or
    reuses the selection of ``hold``."""
    mask = token_mask.reshape(-1) if token_mask is not None else None
    return Selector(k, metric=metric, strategy=strategy, generator=generator, group=group, stats=stats,
                    token_mask=mask, hold=hold,
                    score=lambda a_t: activation_scores(a_t, metric, w_down, neuron_dim=0, token_mask=mask))


def gathered_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 indices: torch.Tensor, *, act: str = "silu", backend: str = "auto",
                 validate: bool = True, backward: str = "sparse") -> torch.Tensor:
    """The SwiGLU MLP restricted to the neurons ``indices`` (sorted ascending), forward and backward.

    ``y = W_down[:, S] (act(W_gate[S] x) * (W_up[S] x))``; only the kept rows/columns get (non-zero) gradients.

    Args:
        x, w_gate, w_up, w_down, act, backend: as in :func:`sat_mlp`.
        indices: 1-D integer tensor of kept neurons, strictly ascending, in ``[0, I)``, on ``x``'s device.
        validate: check ``indices``' values (default ``True``). On a GPU that costs three host synchronisations per
            call (the first and last index against the range, then the order): the CPU waits for all queued GPU work
            each time, so the launches of the next layers no longer overlap the running ones. Pass ``False`` for
            indices from :func:`select_neurons` or ``sat_mlp(..., return_indices=True)``, which are valid by
            construction. No training path of the package calls ``gathered_mlp`` (``SATMLP``, ``replace_mlp`` and
            ``sat-train`` run :func:`sat_mlp`, which selects without a host sync).
        backward: ``"sparse"`` only. ``"exact_input"`` and ``"dense_tokens"`` are refused: they need the exact
            forward over every neuron, and ``gathered_mlp`` computes the given neurons only (its forward is the
            sparse one); use ``sat_mlp(..., forward="dense", backward=...)``.
    """
    inter, _ = check_mlp_inputs(x, w_gate, w_up, w_down)
    check_choice(act, ACTIVATIONS, "act")
    if check_choice(backward, BACKWARD_MODES, "backward") != "sparse":
        raise ValueError(f"gathered_mlp: backward={backward!r} needs the exact forward over every neuron, and "
                         f"gathered_mlp computes the given neurons only (a sparse forward); use "
                         f"sat_mlp(..., forward='dense', backward={backward!r})")
    from ...backends import resolve_backend
    launcher = resolve_backend(backend, x)
    idx = check_indices(indices, inter, x.device) if validate else indices.long()
    y, _ = _run(launcher, x, w_gate, w_up, w_down, idx, act)
    return y


@torch.no_grad()
def neuron_scores(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                  metric: str = "l2", act: str = "silu", token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 ``[I]`` importance of every intermediate neuron over all tokens of ``x`` (not differentiable), or over the
    tokens of ``token_mask`` (as in :func:`sat_mlp`: bool or integer, shape ``x.shape[:-1]``, True / nonzero for the
    tokens that count).

    ``"l2"``: ``||a[:, i]||_2``; ``"l1"``: ``sum_t |a[t, i]|``; ``"contrib"``: ``||a[:, i]||_2 * ||w_down[:, i]||_2``,
    where ``a = act(x W_gate^T) * (x W_up^T)``.
    """
    check_mlp_inputs(x, w_gate, w_up, w_down)
    check_choice(metric, METRICS, "metric")
    check_choice(act, ACTIVATIONS, "act")
    mask = check_token_mask(token_mask, x)
    x2 = x.reshape(-1, x.shape[-1])
    a = act_fwd(x2 @ w_gate.t(), act) * (x2 @ w_up.t())
    return activation_scores(a, metric, w_down, token_mask=mask.reshape(-1) if mask is not None else None)
