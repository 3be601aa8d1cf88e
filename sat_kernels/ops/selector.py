"""The in-step selection both SAT ops run inside their forward: score the units, (all-reduce,) pick the kept set.

A :class:`Selector` is built by the public function of an op (``sat_mlp``, ``sat_attention``) from its options and
handed to the autograd Function, which calls it once it has the activations the scores need. The call returns a
:class:`Selection`: the kept units, the optional per-unit weights of ``strategy="priority"`` and the scores they were
picked from. Units are MLP neurons or attention heads / KV groups; the selector does not know which.
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
    """

    def __init__(self, k: int, *, metric: str, strategy: str, score: Callable[[torch.Tensor], torch.Tensor],
                 generator: Optional[torch.Generator] = None, group=None, stats: Optional[dict] = None,
                 token_mask: Optional[torch.Tensor] = None):
        self.k, self.metric, self.strategy, self.score = k, metric, strategy, score
        self.generator, self.group, self.stats, self.token_mask = generator, group, stats, token_mask

    def __call__(self, activations: Optional[torch.Tensor] = None, *, scores: Optional[torch.Tensor] = None,
                 select_fn=select_neurons) -> Selection:
        """Select from ``activations`` (scored with ``score``) or from precomputed fp32 ``scores`` ``[n]``.

        ``select_fn``: :func:`sat_kernels.select_neurons` or a backend kernel of that signature, which draws the noise
        itself when ``uniform`` is ``None`` (the cuda backend draws it inside its selection kernel).
        """
        if scores is None:
            scores = self.score(activations)
        uniform = None
        if self.group is not None or self.strategy == "priority":   # priority: the weights need the same noise
            uniform = draw_uniform(scores.numel(), self.strategy, scores.device, self.generator)
        if self.group is not None:
            scores, uniform = all_reduce_scores(scores, self.metric, uniform, self.group)
        idx = select_fn(scores, self.k, strategy=self.strategy, generator=self.generator, uniform=uniform)
        weights = priority_weights(scores, uniform, idx) if self.strategy == "priority" else None
        if self.stats is not None:
            self.stats.update(selection_stats(scores, idx, keep_scores="scores" in self.stats))
        return Selection(idx, scores, weights)
