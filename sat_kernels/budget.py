"""A per-layer budget of kept units: the same total kept count as a uniform omission rate, moved to the layers whose
score mass is spread over more units.

At a uniform rate every layer keeps ``k = num_kept(n, rate)`` units. Layers differ, though: in one the top ``k``
neurons hold 95% of the score mass, in another 70%. :class:`PerLayerBudget` keeps the total ``B = sum of k`` and
splits it so that the total share of score mass kept, summed over the layers, is as large as possible: it ranks the
units of all layers together by their share of their own layer's score mass (``score / sum of the layer's scores``)
and gives each layer as many units as it has among the ``B`` highest. The split is measured on the scores of the last
training forward and smoothed over steps (an exponential moving average of each layer's share of ``B``), so kept
counts drift slowly; it is applied from the next step on.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .patching import sat_modules


def _split(total: int, shares: List[float], caps: List[int]) -> List[int]:
    """``total`` split into integers in ``[1, caps[i]]`` in proportion to ``shares`` (largest remainders; a layer at
    its cap passes its excess on to the others)."""
    n = len(shares)
    counts = [1] * n
    left = max(n, min(total, sum(caps))) - n
    while left > 0:
        free = [i for i in range(n) if counts[i] < caps[i]]
        weight = sum(shares[i] for i in free)
        want = {i: left * (shares[i] / weight if weight > 0 else 1.0 / len(free)) for i in free}
        add = {i: min(math.floor(want[i]), caps[i] - counts[i]) for i in free}
        if not any(add.values()):   # every share of what is left is below one unit: the largest get one
            add = {i: 1 for i in sorted(free, key=lambda i: want[i], reverse=True)[:left]}
        for i, a in add.items():
            counts[i] += a
        left -= sum(add.values())
    return counts


class PerLayerBudget:
    """Per-layer kept counts for the SAT modules of one kind, with the total of a uniform rate.

    Call :meth:`apply` after each change of the omission rate (it replaces the uniform kept counts that
    :func:`sat_kernels.set_omission_rate` set with the budget's split of their total) and :meth:`observe` after each
    training forward (it reads the scores the modules kept from it and updates the split). :class:`sat_kernels.
    SATCallback` does both with ``per_layer_budget=True``. Until the first :meth:`observe` the split is uniform. The
    kept count of each layer is in :func:`sat_kernels.sat_stats` (``kept``) and :meth:`kept`.

    Cost: ``observe`` sorts the scores of every layer (``n`` floats each) and reads the per-layer counts back (one host
    synchronisation). Under ``torch.compile`` every new kept count compiles the layer again: use it in eager mode.

    Args:
        model: the model with SAT modules.
        kind: ``"mlp"`` (default) or ``"attention"``: the modules the budget splits over.
        momentum: weight of the previous split in the moving average, in ``[0, 1)`` (default 0.9; 0: each step's
            split as measured).
    """

    def __init__(self, model: nn.Module, kind: str = "mlp", momentum: float = 0.9):
        if kind not in ("mlp", "attention"):
            raise ValueError(f"PerLayerBudget: kind must be 'mlp' or 'attention', got {kind!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"PerLayerBudget: momentum must be a number in [0, 1), got {momentum!r}")
        found = list(sat_modules(model, kind))
        self.names = [name for name, _ in found]
        self.modules = [m for _, m in found]
        if not self.modules:
            raise ValueError(f"PerLayerBudget: the model has no SAT {kind} modules; call "
                             f"sat_kernels.replace_{kind}(model) first")
        for m in self.modules:
            m._keep_scores = True   # the modules keep a copy of their last scores for observe()
        self.kind = kind
        self.momentum = float(momentum)
        self.shares: Optional[List[float]] = None   # each layer's share of the budget (moving average)

    def kept(self) -> Dict[str, int]:
        """The kept count of each module now (module name -> k)."""
        return {name: m._kept for name, m in zip(self.names, self.modules)}

    def apply(self) -> None:
        """Split the modules' current total kept count by the budget's shares (uniform before any observation;
        nothing to split when every module keeps all its units)."""
        caps = [m._units for m in self.modules]
        uniform = [m._kept for m in self.modules]
        if self.shares is None or uniform == caps:
            return
        for m, k in zip(self.modules, _split(sum(uniform), self.shares, caps)):
            m._kept = k

    @torch.no_grad()
    def observe(self) -> None:
        """Update the shares from the scores of the modules' last training forward (modules that kept every unit,
        or have not scored yet, leave the shares unchanged)."""
        scores = [(m._last_stats or {}).get("scores") for m in self.modules]
        if any(s is None for s in scores):
            return
        normalised = []
        for s in scores:
            s = torch.nan_to_num(s.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
            normalised.append(s / s.sum().clamp_min(torch.finfo(torch.float32).tiny))
        budget = sum(m._kept for m in self.modules)
        device = normalised[0].device
        every = torch.cat([s.to(device) for s in normalised])
        layer = torch.cat([torch.full((s.numel(),), i, device=device) for i, s in enumerate(normalised)])
        top = torch.topk(every, budget, sorted=False).indices
        counts = torch.bincount(layer[top], minlength=len(normalised)).tolist()   # the one host sync
        total = sum(counts)
        measured = [c / total for c in counts]
        if self.shares is None:
            self.shares = measured
        else:
            self.shares = [self.momentum * old + (1.0 - self.momentum) * new
                           for old, new in zip(self.shares, measured)]
