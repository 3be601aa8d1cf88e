"""Omission-rate schedules. ``rate(step)`` gives the omission rate for optimizer step ``step`` (0-based).

:class:`LadderOmissionScheduler` (LORS) is the default of SAT: it starts sparse, lowers the rate in a few equal rungs
and ends with a dense phase, so the last updates are ordinary dense training and the result is a normal dense model.
"""
from __future__ import annotations

import numbers
from typing import Optional

from .selection import check_omission_rate


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_steps(value, name: str, allow_none: bool = True, minimum: int = 1) -> Optional[int]:
    """``value`` as an int of at least ``minimum`` (1 or 0), or ``None`` where ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _check_warmup(value) -> int:
    return _check_steps(value, "dense_warmup_steps", allow_none=False, minimum=0)


class OmissionScheduler:
    """Base class: subclasses implement :meth:`rate`. ``total_steps`` may be left ``None`` and filled in by
    :class:`sat_kernels.SATCallback` from the Trainer's ``max_steps``, anew for every run the callback is used in."""

    total_steps: Optional[int] = None
    dense_warmup_steps: int = 0

    def rate(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.rate(step)

    def _total(self) -> int:
        if self.total_steps is None:
            raise ValueError(f"{type(self).__name__}.total_steps is not set: pass total_steps=, or let SATCallback "
                             f"take it from the Trainer")
        return self.total_steps

    @staticmethod
    def _check_step(step) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        return int(step)

    def _sparse_span(self):
        """``(first, end)``: the sparse phase of a schedule with a dense warm-up of ``dense_warmup_steps`` and a
        dense final ``dense_fraction`` of ``total_steps`` (the ladder and the linear schedule)."""
        total, dense_fraction = self._total(), self.dense_fraction
        first, end = self.dense_warmup_steps, int((1.0 - dense_fraction) * total)
        if first and first >= end:
            raise ValueError(f"{type(self).__name__}: dense_warmup_steps={first} leaves no sparse step before the "
                             f"dense final phase (steps {end}..{total - 1} of total_steps={total}, "
                             f"dense_fraction={dense_fraction})")
        return first, end


class ConstantOmissionScheduler(OmissionScheduler):
    """The same rate at every step (ablation baseline), after ``dense_warmup_steps`` dense steps (default 0)."""

    def __init__(self, rate: float = 0.5, *, dense_warmup_steps: int = 0):
        self.value = check_omission_rate(rate, "rate")
        self.dense_warmup_steps = _check_warmup(dense_warmup_steps)

    def rate(self, step: int) -> float:
        return 0.0 if self._check_step(step) < self.dense_warmup_steps else self.value

    def __repr__(self) -> str:
        return f"ConstantOmissionScheduler(rate={self.value}, dense_warmup_steps={self.dense_warmup_steps})"


class LinearOmissionScheduler(OmissionScheduler):
    """Linear decay from ``initial_rate`` to 0 over the first ``1 - dense_fraction`` of ``total_steps``, then dense;
    with ``dense_warmup_steps`` the decay starts after that many dense steps."""

    def __init__(self, initial_rate: float = 0.5, total_steps: Optional[int] = None, dense_fraction: float = 0.1, *,
                 dense_warmup_steps: int = 0):
        self.initial_rate = check_omission_rate(initial_rate, "initial_rate")
        self.total_steps = _check_steps(total_steps, "total_steps")
        self.dense_fraction = _check_fraction(dense_fraction, "dense_fraction")
        self.dense_warmup_steps = _check_warmup(dense_warmup_steps)

    def rate(self, step: int) -> float:
        step = self._check_step(step)
        first, end = self._sparse_span()
        if not first <= step < end:
            return 0.0
        return self.initial_rate * (1.0 - (step - first) / (end - first))

    def __repr__(self) -> str:
        return (f"LinearOmissionScheduler(initial_rate={self.initial_rate}, total_steps={self.total_steps}, "
                f"dense_fraction={self.dense_fraction}, dense_warmup_steps={self.dense_warmup_steps})")


class LadderOmissionScheduler(OmissionScheduler):
    """Ladder Omission Rate Scheduler (LORS): piecewise constant, non-increasing, ending dense.

    The first ``1 - dense_fraction`` of the steps are split into ``num_rungs`` equal rungs; rung ``j`` (0-based) uses
    ``initial_rate * (num_rungs - j) / num_rungs``; the remaining ``dense_fraction`` of the steps run at rate 0, as does
    any step at or past ``total_steps``. With ``dense_warmup_steps`` the rungs split the steps between the warm-up
    and the dense final phase instead, and the warm-up runs at rate 0.

    Args:
        initial_rate: omission rate of the first rung, in ``[0, 1)``. Default 0.5.
        total_steps: number of optimizer steps of the run; ``None`` lets :class:`SATCallback` set it.
        num_rungs: number of sparse rungs. Default 2 (0.5 then 0.25 with the default ``initial_rate``).
        dense_fraction: share of the steps trained dense at the end, in ``[0, 1]``. Default 0.1.
        dense_warmup_steps: steps trained dense at the start (not in the SAT paper's LORS). Default 0.

    Example:
        >>> s = LadderOmissionScheduler(0.5, total_steps=100)
        >>> [s.rate(t) for t in (0, 44, 45, 89, 90, 99)]
        [0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    """

    def __init__(self, initial_rate: float = 0.5, total_steps: Optional[int] = None, *, num_rungs: int = 2,
                 dense_fraction: float = 0.1, dense_warmup_steps: int = 0):
        self.initial_rate = check_omission_rate(initial_rate, "initial_rate")
        self.total_steps = _check_steps(total_steps, "total_steps")
        self.num_rungs = _check_steps(num_rungs, "num_rungs", allow_none=False)
        self.dense_fraction = _check_fraction(dense_fraction, "dense_fraction")
        self.dense_warmup_steps = _check_warmup(dense_warmup_steps)

    def rate(self, step: int) -> float:
        step = self._check_step(step)
        first, end = self._sparse_span()
        if not first <= step < end:
            return 0.0
        rung = (step - first) * self.num_rungs // (end - first)
        return self.initial_rate * (self.num_rungs - rung) / self.num_rungs

    def __repr__(self) -> str:
        return (f"LadderOmissionScheduler(initial_rate={self.initial_rate}, total_steps={self.total_steps}, "
                f"num_rungs={self.num_rungs}, dense_fraction={self.dense_fraction}, "
                f"dense_warmup_steps={self.dense_warmup_steps})")
