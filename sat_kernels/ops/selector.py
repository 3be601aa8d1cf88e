"""The in-step selection both SAT ops run inside their forward: score the units, (all-reduce,) pick the kept set.

A :class:`Selector` is built by the public function of an op (``sat_mlp``, ``sat_attention``) from its options and
handed to the autograd Function, which calls it once it has the activations the scores need. The call returns a
:class:`Selection`: the kept units, the optional per-unit weights of ``strategy="priority"`` and the scores they were
picked from. Units are MLP neurons or attention heads / KV groups; the selector does not know which.

A :class:`SelectionHold` makes several forwards share one selection (:func:`sat_kernels.hold_selection`: the
micro-batches of one optimizer step under gradient accumulation): the first call of a selector given the hold selects
and stores its :class:`Selection`, and later calls with the same ``k`` return it without scoring.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ..distributed import all_reduce_scores
from ..selection import draw_uniform, priority_weights, select_neurons, selection_stats


class Selection(NamedTuple):
    """One selection of ``k`` of ``n`` units.

    Attributes:
        indices: the kept units, sorted ascending, int64 ``[k]``.
        scores: the fp32 scores ``[n]`` they were picked from (global-batch scores with a sync group).
        weights: fp32 ``[k]`` factors ``max(1, tau / score)`` of the kept units with ``strategy="priority"``
            (:func:`sat_kernels.selection.priority_weights`), else ``None``.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    weights: Optional[torch.Tensor] = None


class SelectionHold:
    """The selection one SAT module keeps across forwards while it is held (:func:`sat_kernels.hold_selection`).

    Attributes:
        selection: the :class:`Selection` of the first forward since the hold began, or ``None`` before it.
        stats: the statistics recorded with it (:func:`sat_kernels.selection.selection_stats`), or ``None``.
    """

    def __init__(self):
        self.selection: Optional[Selection] = None
        self.stats: Optional[dict] = None

    def held(self, k: int) -> Optional[Selection]:
        """The stored selection if it kept ``k`` units, else ``None`` (a new rate selects again)."""
        selection = self.selection
        return selection if selection is not None and selection.indices.numel() == k else None

    def store(self, selection: Selection, stats: dict) -> None:
        """Keep ``selection`` and its ``stats``, as copies: under ``torch.compile`` a tensor that leaves the op's
        graph through a side effect must not alias one of its inputs or outputs."""
        self.selection = Selection(*(None if t is None else t.detach().clone() for t in selection))
        self.stats = {key: v.detach().clone() if isinstance(v, torch.Tensor) else v for key, v in stats.items()}


class Selector:
    """Picks ``k`` units from the activations of one forward.

    Args:
        k: kept units, an int in ``[1, n]``.
        metric: ``"l2"``, ``"l1"`` or ``"contrib"``: what ``score`` computes. A backend that fuses the scoring into
            its own kernel reads it and calls ``selector(scores=...)`` instead.
        strategy: as in :func:`sat_kernels.select_neurons`.
        score: ``score(activations) -> fp32 [n]`` with ``metric``.
        generator: ``torch.Generator`` for ``"sample"``/``"random"``/``"priority"``; ``None``: the global RNG.
        group: process group whose ranks select from their summed scores (one all-reduce of ``n`` floats and rank 0's
            noise), or ``None`` (see :mod:`sat_kernels.distributed`).
        stats: a dict that receives :func:`sat_kernels.selection.selection_stats` of each call (a ``"scores"`` key
            asks for a copy of the scores too), or ``None``.
        token_mask: the tokens the scores cover, a bool tensor (``[T]`` for the MLP, ``[B, T]`` for attention), or
            ``None`` for every token. ``score`` applies it; a backend that fuses the scoring reads it as it reads
            ``metric``.
        hold: a :class:`SelectionHold` to reuse (and on a first call, to fill), or ``None``: select every call.
            ``reused`` says whether it returns the held selection (a fusing backend still scores the activations,
            but nothing is selected).
        fill_hold: store a new selection in ``hold`` (default). ``False`` leaves that to the caller, after the
            autograd Function that calls the selector has returned: under ``torch.compile`` a write to an outside
            object from inside the Function's forward makes dynamo hand its intermediates out of the graph (the
            attention op's saved views then fail to compile).
    """

    def __init__(self, k: int, *, metric: str, strategy: str, score: Callable[[torch.Tensor], torch.Tensor],
                 generator: Optional[torch.Generator] = None, group=None, stats: Optional[dict] = None,
                 token_mask: Optional[torch.Tensor] = None, hold: Optional[SelectionHold] = None,
                 fill_hold: bool = True):
        self.k, self.metric, self.strategy, self.score = k, metric, strategy, score
        self.generator, self.group, self.stats, self.token_mask = generator, group, stats, token_mask
        self.hold, self.fill_hold = hold, fill_hold
        # decided here, not in __call__: the call runs inside an autograd Function, where any write to this object
        # is a side effect that torch.compile must carry out of the Function's graph
        self.held = hold.held(k) if hold is not None else None
        self.reused = self.held is not None

    def __call__(self, activations: Optional[torch.Tensor] = None, *, scores: Optional[torch.Tensor] = None,
                 select_fn=select_neurons) -> Selection:
        """Select from ``activations`` (scored with ``score``) or from precomputed fp32 ``scores`` ``[n]``.

        ``select_fn``: :func:`sat_kernels.select_neurons` or a backend kernel of that signature, which draws the noise
        itself when ``uniform`` is ``None`` (the cuda backend draws it inside its selection kernel).
        """
        if self.held is not None:
            if self.stats is not None:
                self.stats.update(reused_stats(self.hold.stats, keep_scores="scores" in self.stats))
            return self.held
        if scores is None:
            scores = self.score(activations)
        uniform = None
        if self.group is not None or self.strategy == "priority":   # priority: the weights need the same noise
            uniform = draw_uniform(scores.numel(), self.strategy, scores.device, self.generator)
        if self.group is not None:
            scores, uniform = all_reduce_scores(scores, self.metric, uniform, self.group)
        idx = select_fn(scores, self.k, strategy=self.strategy, generator=self.generator, uniform=uniform)
        weights = priority_weights(scores, uniform, idx) if self.strategy == "priority" else None
        selection = Selection(idx, scores, weights)
        fill = self.hold is not None and self.fill_hold
        if self.stats is not None or fill:
            stats = selection_stats(scores, idx, keep_scores=self.stats is not None and "scores" in self.stats)
            if self.stats is not None:
                self.stats.update(stats)
            if fill:
                self.hold.store(selection, stats)
        return selection


def reused_stats(stats: dict, keep_scores: bool = False) -> dict:
    """The statistics of a forward that reused a held selection: those of the forward that chose it (``kept``,
    ``kept_mass``), with ``nonfinite`` 0 (nothing was scored again, so nothing is counted twice)."""
    out = {"kept": stats["kept"], "kept_mass": stats["kept_mass"], "nonfinite": torch.zeros_like(stats["nonfinite"])}
    if keep_scores and "scores" in stats:
        out["scores"] = stats["scores"]
    return out
