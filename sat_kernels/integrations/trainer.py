"""Hugging Face ``Trainer`` integration: a callback that applies an omission-rate schedule at every step."""
from __future__ import annotations

from transformers import TrainerCallback

from ..patching import sat_modules, set_omission_rate
from ..schedules import OmissionScheduler


class SATCallback(TrainerCallback):
    """Apply ``scheduler.rate(global_step)`` to every SAT module of the model before each optimizer step, and log it
    as ``sat_omission_rate``.

    If ``scheduler.total_steps`` is ``None`` it is set from the Trainer's ``max_steps`` when training begins. The
    model must have been patched (:func:`sat_kernels.replace_mlp`) before training.

    Example:
        >>> sk.replace_mlp(model)
        >>> trainer = Trainer(model, args, train_dataset=ds,
        ...                   callbacks=[sk.SATCallback(sk.LadderOmissionScheduler(0.5))])
    """

    def __init__(self, scheduler: OmissionScheduler):
        if not callable(getattr(scheduler, "rate", None)):
            raise TypeError(f"scheduler must have a rate(step) method, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.current_rate = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(self.scheduler, "total_steps", 0) is None:
            self.scheduler.total_steps = state.max_steps
        if model is not None and not any(True for _ in sat_modules(model)):
            raise ValueError("SATCallback: the model has no SAT modules; call sat_kernels.replace_mlp(model) first")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.current_rate = float(self.scheduler.rate(state.global_step))
        if model is not None:
            set_omission_rate(model, self.current_rate)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.current_rate is None:
            return
        if logs is not None:
            logs["sat_omission_rate"] = self.current_rate
        if state.log_history and "sat_omission_rate" not in state.log_history[-1]:
            state.log_history[-1]["sat_omission_rate"] = self.current_rate
