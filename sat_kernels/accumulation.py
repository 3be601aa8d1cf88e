"""Gradient accumulation: one kept set per optimizer step instead of one per micro-batch.

A SAT module selects in every training forward. Under gradient accumulation (``M`` micro-batches summed into one
optimizer step) each micro-batch therefore keeps its own units, and the accumulated gradient of a weight row is zero
only where all ``M`` selections omitted it: at omission 0.5 with 4 micro-batches, about 1/16 of the rows instead of
1/2. Each backward is still sparse (the speed is the same), but the step's gradient is not the one of the same global
batch in one forward. :func:`hold_selection` makes the micro-batches of a step share the selection of the first: the
accumulated gradient then has exactly the zero rows of one selection, as with the whole batch at once, scored on
the first micro-batch only. Which of the two trains better is measured in ``docs/quality.md``.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .modules import sat_modules
from .ops.selector import SelectionHold


class hold_selection:
    """Context manager: inside it, each SAT module of ``model`` selects in its first training forward and every later
    training forward reuses that selection (no scoring, no selection, no all-reduce with ``sync_selection``).

    Wrap the micro-batches of one optimizer step; leaving the block forgets the selections, so the next step selects
    anew. A module whose kept count changes inside the block (a new omission rate) selects again at the new count.
    Forwards that run dense (``eval()``, grad mode off) neither use nor fill the hold; the recompute of an activation
    checkpoint reuses it, like any later forward. With the Hugging Face ``Trainer``,
    ``SATCallback(hold_selection=True)`` opens one around every optimizer step.

    Args:
        model: a model patched by :func:`sat_kernels.replace_mlp` and/or :func:`sat_kernels.replace_attention`.
        kind: ``None`` (default: every SAT module), ``"mlp"`` or ``"attention"``.

    Raises:
        ValueError: ``model`` has no SAT module (of ``kind``).
        RuntimeError: on entering, when a module is already held by another open ``hold_selection``.

    Example:
        >>> for step_batches in loader:                 # M micro-batches per optimizer step
        ...     with sk.hold_selection(model):
        ...         for batch in step_batches:
        ...             (model(**batch).loss / len(step_batches)).backward()
        ...     optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, kind: Optional[str] = None):
        self.modules: List[nn.Module] = [m for _, m in sat_modules(model, kind)]
        if not self.modules:
            what = "SAT modules" if kind is None else f"SAT {kind} modules"
            raise ValueError(f"hold_selection: the model has no {what}; call sat_kernels.replace_mlp(model) "
                             f"(or replace_attention) first")
        self._entered = False

    def __enter__(self) -> "hold_selection":
        if self._entered:
            raise RuntimeError("hold_selection: this hold is already open; create a new one per optimizer step")
        held = sum(m._hold is not None for m in self.modules)
        if held:
            raise RuntimeError(f"hold_selection: {held} of the {len(self.modules)} SAT modules are already held by "
                               f"another open hold_selection (nested, or not closed)")
        for m in self.modules:
            m._hold = SelectionHold()
        self._entered = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._entered:
            for m in self.modules:
                m._hold = None
            self._entered = False
        return False

    @property
    def selected(self) -> int:
        """How many of the held modules have selected since the block began."""
        return sum(m._hold is not None and m._hold.selection is not None for m in self.modules)
