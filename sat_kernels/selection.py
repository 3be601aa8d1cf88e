"""Neuron scoring and selection: the SAT semantics of docs/design.md section 2.

Scores are one fp32 value per neuron, aggregated over all tokens of the batch. Selection returns the indices of the
kept neurons, sorted ascending, on the scores' device, without a host synchronisation (``torch.topk`` + ``sort``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

METRICS = ("l2", "l1", "contrib")
STRATEGIES = ("topk", "sample", "random", "priority")
# Strategies of the MLP only, on the torch backend: "priority" scales the kept neurons (priority_weights).
MLP_ONLY_STRATEGIES = ("priority",)
ATTENTION_STRATEGIES = tuple(s for s in STRATEGIES if s not in MLP_ONLY_STRATEGIES)
# "sparse": omitted neurons/heads are left out of the forward output too (the paper's mode); "dense": the forward
# output is exact (the down projection / o_proj over every neuron/head) and only the backward is sparse.
FORWARD_MODES = ("sparse", "dense")
# The default of the model-level API (replace_mlp, replace_attention, the SAT modules, sat-train): the exact forward.
# On SmolLM2-135M-Instruct, 300 steps with the ladder from 0.5, it cost +0.76% (cpt) / +1.35% (sft) eval loss against
# +2.15% / +5.58% for "sparse", at step speedups within the noise of each other (docs/quality.md). The
# functional ops (sat_mlp, sat_attention) keep "sparse", the semantics of the masked-dense reference.
DEFAULT_FORWARD = "dense"
# The MLP's backward: "sparse" runs all of it over the kept neurons (dx included); "exact_input" (forward="dense"
# only) computes the input gradient dx through every neuron, exactly the dense one, and skips only the omitted
# neurons' weight gradients (docs/design.md section 2); "dense_tokens" (forward="dense" only) runs the backward of
# the tokens of a mask (the loss tokens, at the model level) through every neuron and the others' through the kept.
BACKWARD_MODES = ("sparse", "exact_input", "dense_tokens")
DEFAULT_BACKWARD = "sparse"


def check_omission_rate(omission_rate, name: str = "omission_rate") -> float:
    """Return ``omission_rate`` as a float, or raise if it is not a real number in [0, 1)."""
    if isinstance(omission_rate, bool) or not isinstance(omission_rate, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(omission_rate).__name__}")
    rate = float(omission_rate)
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")
    return rate


def check_choice(value, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def num_kept(n: int, omission_rate: float, *, multiple_of: int = 1) -> int:
    """Number of neurons SAT keeps out of ``n`` at ``omission_rate``.

    ``k = max(1, round_half_up((1 - omission_rate) * n))``, then rounded up to a multiple of ``multiple_of`` (capped at
    ``n``), so kernels can ask for aligned kept counts and callers can reproduce ``k``.

    Example:
        >>> num_kept(11008, 0.5)
        5504
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, numbers.Integral) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    rate = check_omission_rate(omission_rate)
    k = max(1, int(math.floor((1.0 - rate) * n + 0.5)))
    k = -(-k // multiple_of) * multiple_of
    return min(int(n), k)


def activation_scores(a: torch.Tensor, metric: str = "l2", w_down: Optional[torch.Tensor] = None, *,
                      neuron_dim: int = 1, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-neuron fp32 scores from intermediate activations ``a`` of shape ``[T, I]`` (``neuron_dim=1``) or
    neuron-major ``[I, T]`` (``neuron_dim=0``, the layout of the torch backend).

    ``l2``: ``||a[:, i]||_2``; ``l1``: ``sum_t |a[t, i]|``; ``contrib``: ``||a[:, i]||_2 * ||w_down[:, i]||_2``.
    ``token_mask``: ``None`` (every token) or a bool ``[T]`` tensor on ``a``'s device: the sums then run over the
    tokens where it is True only. A masked token's terms are multiplied by 0, so a NaN or inf activation of a masked
    token still makes that neuron's score NaN, as without a mask.
    """
    check_choice(metric, METRICS, "metric")
    if metric == "contrib" and w_down is None:
        raise ValueError("metric='contrib' needs w_down")
    if neuron_dim == 0 and a.dim() == 2 and a.stride(0) == 1 and a.stride(1) != 1:
        a, neuron_dim = a.t(), 1          # a token-major [T, I] tensor seen as [I, T]: reduce it as stored
    order = 1 if metric == "l1" else 2
    s = _row_norm(a, order, token_mask) if neuron_dim == 0 else _norm(a, order, token_mask)
    if metric == "contrib":
        s = s * _norm(w_down, 2)
    return s


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _norm(t: torch.Tensor, order: int, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 column norms, squared and accumulated in fp32 (fp64 for fp64 input), also for 16-bit ``t`` (as the Triton
    backend's fused scores: squares rounded to bf16 would move a score by up to 2^-9 relative); with a bool
    ``token_mask`` ``[T]``, over its rows only.

    On CUDA ``torch.linalg.vector_norm(t, dim=0, dtype=float32)``, which reduces 16-bit input in fp32 without an fp32
    copy of ``t``. On CPU ``(t * t).sum(0)``: 0.39 ms vs 5.1 ms for vector_norm on a [2048, 1536] fp32 tensor on 2 CPU
    cores (torch 2.13), where vector_norm reduces column by column. The mask enters on CPU as the 0/1 vector of a
    GEMV that replaces the sum (0.18 vs 0.16 ms unmasked at [512, 1536] fp32, where zeroing the masked rows with a
    bool ``masked_fill_`` took 1.8 ms; EPYC, 1 thread, torch 2.13), on CUDA as a multiplication of the rows by 0/1.
    """
    acc = _acc_dtype(t)
    if t.is_cuda:
        if token_mask is not None:
            t = t * token_mask.to(t.dtype)[:, None]
        return torch.linalg.vector_norm(t, order, dim=0, dtype=acc).float()
    t = t.to(acc)
    e = t.abs() if order == 1 else t * t
    s = e.sum(0) if token_mask is None else torch.mv(e.t(), token_mask.to(acc))
    return (s if order == 1 else s.sqrt_()).float()


def _row_norm(t: torch.Tensor, order: int, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 row norms of ``t`` ``[I, T]``, accumulated in fp32 (fp64 for fp64 input), the reduction along the
    contiguous dimension; with a bool ``token_mask`` ``[T]``, over its columns only.

    A 16-bit ``t`` is reduced in blocks of rows of about 1 MB in fp32: ``vector_norm(dtype=float32)`` converts its
    whole input first, and a fresh ``[I, T]`` fp32 buffer every step costs its page faults (3.8 ms of a 118 ms SAT
    MLP step at T 2048, h 576, I 1536, bf16; EPYC, 1 thread, torch 2.13). Compiled graphs reduce in one call (the
    conversion fuses into the reduction there). With a mask, on CPU every dtype goes by blocks: each block's squares
    (absolute values) times the 0/1 mask in a GEMV (1.17 vs 1.08 ms unmasked at [1536, 2048] bf16); on CUDA and in
    compiled graphs ``t`` times the mask is reduced in one call.
    """
    acc = _acc_dtype(t)
    if token_mask is not None:
        if t.is_cuda or torch.compiler.is_compiling():
            return torch.linalg.vector_norm(t * token_mask.to(t.dtype), order, dim=1, dtype=acc).float()
        rows = max(1, (1 << 18) // max(1, t.shape[1]))
        m = token_mask.to(acc)
        parts = [torch.mv(b.to(acc).abs() if order == 1 else b.to(acc).square(), m) for b in t.split(rows)]
        s = torch.cat(parts)
        return (s if order == 1 else s.sqrt_()).float()
    if t.element_size() >= 4 or torch.compiler.is_compiling():
        return torch.linalg.vector_norm(t, order, dim=1, dtype=acc).float()
    rows = max(1, (1 << 18) // max(1, t.shape[1]))
    return torch.cat([torch.linalg.vector_norm(b, order, dim=1, dtype=acc) for b in t.split(rows)]).float()


def selection_stats(scores: torch.Tensor, idx: torch.Tensor, keep_scores: bool = False) -> dict:
    """Statistics of one selection of ``idx`` from ``scores`` ``[n]``, as device tensors (no host sync):

    - ``kept``: ``idx.numel()`` (a Python int);
    - ``kept_mass``: the share of the score mass kept, ``sum(scores[idx]) / sum(scores)`` over the finite scores
      (fp32, 0-dim; 1 when every finite score is 0);
    - ``nonfinite``: the number of NaN/inf scores (int64, 0-dim);
    - ``scores``, with ``keep_scores``: a copy of ``scores`` (for :class:`sat_kernels.budget.PerLayerBudget`; a copy,
      so under ``torch.compile`` it is a new tensor the graph can hand out).
    """
    finite = torch.isfinite(scores)
    mass = torch.where(finite, scores.float(), 0.0)                    # [n]
    total = mass.sum()
    kept_mass = torch.where(total > 0, mass.index_select(0, idx).sum() / total, 1.0)
    out = {"kept": idx.numel(), "kept_mass": kept_mass, "nonfinite": (~finite).sum()}
    if keep_scores:
        out["scores"] = scores.detach().clone()
    return out


def draw_uniform(n: int, strategy: str, device: torch.device,
                 generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """The U(0, 1) noise ``[n]`` (fp32) that ``strategy`` consumes, or ``None`` for ``"topk"``."""
    if strategy == "topk":
        return None
    if generator is None:
        return torch.rand(n, device=device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return torch.rand(n, device=generator.device, generator=generator).to(device, non_blocking=True)


def omitted_neurons(indices: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n - k`` units of ``n`` not in the kept ``indices`` ``[k]``, int64, ascending, without a host sync: a
    stable sort of the kept flags puts the omitted units first, in index order."""
    kept = torch.zeros(n, dtype=torch.uint8, device=indices.device).index_fill_(0, indices, 1)
    return torch.sort(kept, stable=True).indices[:n - indices.numel()]


def select_neurons(scores: torch.Tensor, k: int, *, strategy: str = "topk",
                   generator: Optional[torch.Generator] = None, uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the ``k`` kept neurons, sorted ascending (int64, on ``scores.device``).

    Args:
        scores: ``[n]`` non-negative scores (any float dtype; compared in fp32). A NaN score ranks below every
            number (``-inf`` included): that neuron is kept only when fewer than ``k`` scores are numbers. Ties go to
            the lower index. The cuda backend's selection kernel keeps the same set from the same keys.
        k: kept count in ``[1, n]`` (see :func:`num_kept`).
        strategy: ``"topk"`` (the k highest scores), ``"sample"`` (without replacement, probability proportional to
            the score: Gumbel-top-k on ``log(score)``), ``"random"`` (uniform without replacement) or ``"priority"``
            (priority sampling: the k highest ``score / u``, ``u ~ U(0, 1)``; with the weights of
            :func:`priority_weights` the kept neurons give unbiased estimates of sums over all neurons).
        generator: makes ``"sample"``/``"random"`` reproducible. With ``None`` the global RNG of the scores' device is
            used, which activation checkpointing saves and restores, so a recomputed forward draws the same set.
        uniform: pre-drawn U(0, 1) noise ``[n]`` for ``"sample"``/``"random"`` (e.g. one draw shared by all
            data-parallel ranks); by default it is drawn from ``generator``.

    Example:
        >>> select_neurons(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2)
        tensor([1, 2])
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        got = (scores.dtype, tuple(scores.shape)) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D float tensor, got {got}")
    n = scores.numel()
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the number of scores), got {k!r}")
    check_choice(strategy, STRATEGIES, "strategy")
    k = int(k)
    if k == n:
        return torch.arange(n, device=scores.device)
    if uniform is None:
        uniform = draw_uniform(n, strategy, scores.device, generator)
    elif not isinstance(uniform, torch.Tensor) or uniform.shape != (n,):
        raise ValueError(f"uniform must be a tensor of shape ({n},), got {getattr(uniform, 'shape', uniform)!r}")
    if strategy == "topk":
        keys = scores.float()
    elif strategy == "sample":
        # Gumbel-top-k: argtop_k(log s_i + G_i), G_i = -log(-log u_i), samples k without replacement with p ~ s.
        gumbel = -torch.log(-torch.log(uniform.float().clamp(min=torch.finfo(torch.float32).tiny)))
        keys = torch.log(scores.float()) + gumbel
    elif strategy == "priority":
        keys = priority_keys(scores, uniform)
    else:
        keys = uniform.float()
    idx = torch.topk(_rank_keys(keys), k, sorted=False).indices
    return torch.sort(idx).values


def priority_keys(scores: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """fp32 priorities ``score / u`` of priority sampling (``u`` clamped away from 0; a NaN score gives NaN)."""
    return scores.float() / uniform.float().clamp(min=torch.finfo(torch.float32).tiny)


def priority_weights(scores: torch.Tensor, uniform: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Weights ``max(1, tau / score)`` of the neurons ``idx`` kept by ``strategy="priority"``, fp32 ``[k]``.

    Priority sampling (Duffield, Lund and Thorup, 2007) keeps the ``k`` largest priorities ``q_i = s_i / u_i`` and
    sets ``tau``, the ``(k+1)``-th largest; then ``E[1{i kept} * max(1, tau / s_i)] = 1`` for every neuron with
    ``s_i > 0``, so a sum over the kept neurons weighted by these factors is an unbiased estimate of the sum over all
    neurons, with a fixed kept count. Neurons with ``s_i >= tau`` are kept for sure and get weight 1. A kept neuron
    whose score is 0 or not finite (kept only when fewer than ``k`` scores are positive) gets weight 1. Needs
    ``k < n``.
    """
    k = idx.numel()
    keys = priority_keys(scores, uniform)
    keys = torch.where(torch.isnan(keys), float("-inf"), keys)
    tau = torch.topk(keys, k + 1, sorted=True).values[k]
    s = scores.float().index_select(0, idx)
    ok = torch.isfinite(s) & (s > 0) & torch.isfinite(tau)
    return torch.where(ok, (tau / torch.where(ok, s, 1.0)).clamp(min=1.0), 1.0)


def _rank_keys(keys: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the selection order of fp32 ``keys [n]`` (``n < 2^31``): NaN below every
    number (``-inf`` included), -0.0 equal to +0.0, ties to the lower index.

    The key of the cuda backend's selection kernel (``order_key`` in ``csrc/selection_keys.cuh``: NaN 0, else the
    float bits made order-preserving as unsigned) times 2^31, plus the reversed index, so both backends keep the same
    set from the same keys (``torch.topk`` on the floats leaves the order of ties unspecified and ranks NaN highest).
    """
    bits = (keys.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF     # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 2 ** 31, bits ^ 0xFFFFFFFF, bits | 2 ** 31)
    ordered = ordered.masked_fill_(torch.isnan(keys), 0)
    return ordered * 2 ** 31 + torch.arange(keys.numel() - 1, -1, -1, device=keys.device)
