"""Hugging Face ``Trainer`` integration: a callback that applies omission-rate schedules at every step."""
from __future__ import annotations

import warnings
from typing import Optional

from transformers import TrainerCallback

from ..accumulation import hold_selection as _hold_selection
from ..budget import PerLayerBudget
from ..forwards import replaced_forward
from ..optim import skip_omitted_updates as _skip_omitted_updates
from ..patching import sat_modules, set_omission_rate
from ..schedules import OmissionScheduler
from ..stats import sat_stats
from ..summary import replaced_forwards_text

_KINDS = ("mlp", "attention")
_STATS_PREFIX = {"mlp": "sat_mlp_", "attention": "sat_attn_"}   # of each kind's sat_stats summary in the logs


def _check_scheduler(scheduler, name: str) -> None:
    if scheduler is not None and not callable(getattr(scheduler, "rate", None)):
        raise TypeError(f"{name} must have a rate(step) method, got {type(scheduler).__name__}")


class SATCallback(TrainerCallback):
    """Apply omission-rate schedules to the SAT modules of the model before each optimizer step, and log the rates.

    Each kind of SAT module (MLP: :func:`sat_kernels.replace_mlp`, attention: :func:`sat_kernels.replace_attention`)
    follows its own schedule: ``mlp`` for the MLP modules and ``attention`` for the attention modules; ``scheduler``
    is the schedule of every kind that has none of its own. A kind with no schedule at all keeps the rate each of its
    modules has (from ``replace_*`` or :func:`sat_kernels.set_omission_rate`). So ``SATCallback(sched)`` drives every
    SAT module, MLP and attention alike, with ``sched`` (its meaning before per-kind schedules existed; a warning says
    so when the two kinds have different rates as training begins), and ``SATCallback(mlp=sched)`` leaves attention
    at its own rate.

    Logged at every logging step: ``sat_omission_rate`` (the rate of ``mlp``, else of ``scheduler``), with an
    ``attention`` schedule ``sat_attn_omission_rate``, and the summaries of :func:`sat_kernels.sat_stats` from the
    last training forward: over the MLP layers ``sat_mlp_kept_mean``, ``sat_mlp_kept_min``,
    ``sat_mlp_kept_mass_mean``, ``sat_mlp_kept_mass_min``, ``sat_mlp_nonfinite`` and ``sat_mlp_nonfinite_total``, and
    when the model has SAT attention modules the same over them as ``sat_attn_kept_mean``, ...,
    ``sat_attn_nonfinite_total`` (kept heads or KV groups). Reading them is one host sync per logging step;
    non-finite scores also raise a warning then, once per module.

    Checks: training refuses to begin (``ValueError``) when a scheduled SAT module's forward was replaced after
    patching, where SAT does not run (Liger-Kernel's SwiGLU applied after ``replace_mlp``: apply it with
    ``swiglu=False``); and after a step in which no scheduled SAT module ran a training forward while some omission
    rate is above 0, a ``RuntimeWarning`` says so (once per run).

    ``total_steps``: a scheduler whose ``total_steps`` is ``None`` when training begins takes the Trainer's
    ``max_steps``, and takes it again at the start of every later ``train()`` with this callback (each run its own
    ``max_steps``). A ``total_steps`` the user set (to a value other than the one this callback filled in) is kept.

    ``skip_omitted_updates=True`` installs :func:`sat_kernels.skip_omitted_updates` on the Trainer's optimizer when
    training begins (and takes it off when training ends): omitted units keep their weights and optimizer state
    through each step instead of moving by their momentum (lazy, SparseAdam-like updates).

    ``hold_selection=True`` makes the micro-batches of each optimizer step share one selection under gradient
    accumulation (``gradient_accumulation_steps > 1``): every SAT module selects in the step's first micro-batch and
    the others reuse it (:func:`sat_kernels.hold_selection`). By default each micro-batch selects its own units, so
    the accumulated gradient omits only the units that every micro-batch omitted.

    ``per_layer_budget=True`` splits each step's kept count of each kind over its layers with a
    :class:`sat_kernels.budget.PerLayerBudget` (the same total as the schedule's uniform rate, more units to the
    layers whose score mass is spread wider); the per-layer counts are in :func:`sat_kernels.sat_stats`.

    Args:
        scheduler: schedule of every kind of SAT module without a schedule of its own (an object with
            ``rate(step) -> float``, e.g. :class:`sat_kernels.LadderOmissionScheduler`).
        mlp: schedule of the MLP modules.
        attention: schedule of the attention modules.
        skip_omitted_updates: skip the optimizer's update of the omitted units in every step (default ``False``:
            the optimizer updates every parameter, as without SAT).
        per_layer_budget: split the kept count over the layers by their score mass (default ``False``: every layer
            keeps the count of the schedule's rate).
        hold_selection: one selection per optimizer step, from its first micro-batch (default ``False``: one per
            micro-batch).

    Example:
        >>> sk.replace_mlp(model, 0.5)
        >>> sk.replace_attention(model, 0.25)
        >>> cb = sk.SATCallback(mlp=sk.LadderOmissionScheduler(0.5), attention=sk.LadderOmissionScheduler(0.25))
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])
    """

    def __init__(self, scheduler: Optional[OmissionScheduler] = None, *, mlp: Optional[OmissionScheduler] = None,
                 attention: Optional[OmissionScheduler] = None, skip_omitted_updates: bool = False,
                 per_layer_budget: bool = False, hold_selection: bool = False):
        for name, value in (("scheduler", scheduler), ("mlp", mlp), ("attention", attention)):
            _check_scheduler(value, name)
        if scheduler is None and mlp is None and attention is None:
            raise TypeError("SATCallback needs a schedule: scheduler, mlp= and/or attention=")
        self.scheduler = scheduler
        self.skip_omitted_updates = bool(skip_omitted_updates)
        self._skip_handle = None      # the hooks skip_omitted_updates put on this run's optimizer
        self.per_layer_budget = bool(per_layer_budget)
        self.budgets = {}             # kind -> PerLayerBudget of this run's model
        self.hold_selection = bool(hold_selection)
        self._hold = None             # the hold_selection open during this optimizer step
        self.own_schedules = {"mlp": mlp, "attention": attention}
        # the schedule each kind of SAT module follows
        self.schedules = {kind: own if own is not None else scheduler for kind, own in self.own_schedules.items()
                          if own is not None or scheduler is not None}
        self._logged = {"sat_omission_rate": self.schedules.get("mlp"), "sat_attn_omission_rate": attention}
        self._kinds = ()              # kinds with a schedule and modules in the model, found when training begins
        self._filled_total = {}       # id(scheduler) -> the total_steps this callback filled in
        self.current_rate = None      # this step's sat_omission_rate
        self.current_attn_rate = None  # this step's sat_attn_omission_rate (with an attention schedule)
        self._scheduled = []          # the SAT modules of the scheduled kinds in this run's model
        self._stats_before = None     # their statistics objects when this step began (a forward replaces them)
        self._idle_warned = False     # the warning of a step in which no SAT module ran, once per run

    def _distinct_schedules(self):
        return {id(s): s for s in self.schedules.values()}

    def _fill_total_steps(self, max_steps: int) -> None:
        for key, sched in self._distinct_schedules().items():
            total = getattr(sched, "total_steps", 0)   # a scheduler without the attribute needs no total
            if total is None or total == self._filled_total.get(key):
                sched.total_steps = max_steps
                self._filled_total[key] = max_steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._fill_total_steps(state.max_steps)
        if model is None:
            return
        present = {kind: [m for _, m in sat_modules(model, kind)] for kind in _KINDS}
        if not any(present.values()):
            raise ValueError("SATCallback: the model has no SAT modules; call sat_kernels.replace_mlp(model) "
                             "(or replace_attention) first")
        for kind, own in self.own_schedules.items():
            if own is not None and not present[kind]:
                raise ValueError(f"SATCallback: {kind}= was given but the model has no SAT {kind} modules; call "
                                 f"sat_kernels.replace_{kind}(model) first")
        self._kinds = tuple(kind for kind in _KINDS if kind in self.schedules and present[kind])
        named = [(name, m) for kind in self._kinds for name, m in sat_modules(model, kind)]
        replaced = {name: what for name, what in ((n, replaced_forward(m)) for n, m in named) if what}
        if replaced:
            raise ValueError(f"SATCallback: {replaced_forwards_text(replaced)}; the schedule would change nothing "
                             f"there")
        self._scheduled = [m for _, m in named]
        self._stats_before, self._idle_warned = None, False
        if len(self._kinds) == 2 and self.schedules["mlp"] is self.schedules["attention"]:
            rates = {kind: sorted({m.omission_rate for m in present[kind]}) for kind in _KINDS}
            if rates["mlp"] != rates["attention"]:
                warnings.warn(f"SATCallback: one schedule drives the MLP and the attention modules, which have "
                              f"different omission rates now (MLP {rates['mlp']}, attention {rates['attention']}); "
                              f"pass SATCallback(mlp=..., attention=...) to schedule them separately", UserWarning,
                              stacklevel=2)
        if self.per_layer_budget:
            self.budgets = {kind: PerLayerBudget(model, kind) for kind in self._kinds}
        if self.skip_omitted_updates:
            optimizer = kwargs.get("optimizer")
            if optimizer is None:
                raise ValueError("SATCallback(skip_omitted_updates=True): the Trainer passed no optimizer to "
                                 "on_train_begin")
            self._remove_skip_hooks()
            self._skip_handle = _skip_omitted_updates(model, optimizer)

    def _remove_skip_hooks(self) -> None:
        if self._skip_handle is not None:
            self._skip_handle.remove()
            self._skip_handle = None

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_skip_hooks()
        self._release_hold()

    def _release_hold(self) -> None:
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        rate = {key: float(s.rate(state.global_step)) for key, s in self._distinct_schedules().items()}
        rates = {kind: rate[id(self.schedules[kind])] for kind in self._kinds}
        logged = {key: rate[id(s)] for key, s in self._logged.items() if s is not None}
        self.current_rate = logged.get("sat_omission_rate")
        self.current_attn_rate = logged.get("sat_attn_omission_rate")
        if model is not None and rates:
            set_omission_rate(model, **rates)
            for budget in self.budgets.values():
                budget.apply()
        self._release_hold()
        if self.hold_selection and model is not None and self._scheduled:
            self._hold = _hold_selection(model).__enter__()
        self._stats_before = [m._last_stats for m in self._scheduled]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._release_hold()
        for budget in self.budgets.values():
            budget.observe()
        self._check_step_ran_sat(state)

    def _check_step_ran_sat(self, state) -> None:
        """Warn (once per run) after a step in which no scheduled SAT module ran a training forward although some
        omit units: every training forward replaces a module's statistics object, so none was replaced."""
        before, self._stats_before = self._stats_before, None
        if self._idle_warned or before is None or not self._scheduled:
            return
        if any(m._kept < m._units for m in self._scheduled) and all(
                m._last_stats is old for m, old in zip(self._scheduled, before)):
            self._idle_warned = True
            warnings.warn(f"SATCallback: step {state.global_step} ran no training forward through the "
                          f"{len(self._scheduled)} SAT modules although their omission rates are above 0: SAT did "
                          f"not run. Is the Trainer's model the patched one? Was their forward replaced after "
                          f"patching (sat_kernels.patch_summary(model))?", RuntimeWarning, stacklevel=2)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        values = {key: value for key, value in (("sat_omission_rate", self.current_rate),
                                                ("sat_attn_omission_rate", self.current_attn_rate))
                  if value is not None}
        if model is not None:   # one host sync, at logging steps only
            for kind, stats in sat_stats(model).items():
                values.update({f"{_STATS_PREFIX[kind]}{key}": value for key, value in stats["summary"].items()})
        if not values:
            return
        if logs is not None:
            logs.update(values)
        if state.log_history and not values.keys() <= state.log_history[-1].keys():
            state.log_history[-1].update(values)
