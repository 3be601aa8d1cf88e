"""Time to dense quality (``sat-train --time-to-quality``): how much training wall-clock SAT needs to reach the
held-out eval loss that dense training reaches in ``N`` steps.

Method (the MLPerf Training measure, wall-clock to a fixed quality target):

1. The dense arm trains ``N`` steps (AdamW, linear warm-up and decay to 0 over its ``N`` steps); its final dense eval
   loss is the **target**.
2. The SAT arm trains from the same model, data order, seed and optimizer, with its own step budget
   ``M = ceil(factor * N)`` (its learning-rate and omission schedules span ``M``), and is evaluated every ``E``
   steps. ``sat_seconds`` is its training time at the first evaluation whose loss is at or below the target
   (``None`` when not reached within ``M`` steps); the ratio is ``sat_seconds / dense_seconds``. Since SAT is
   evaluated every ``E`` steps only, ``ratio_interpolated`` also divides by ``dense_seconds`` the time at which
   SAT's eval loss, interpolated linearly between two evaluations, crosses the target (on a convex loss curve the
   chord lies above it, so this crossing is if anything late).
3. Both arms run in **one process, step by step interleaved** (dense step ``s`` and SAT step ``s``, their order
   alternating), so load from other processes hits both; after step ``N`` the SAT arm runs alone. Only training
   steps are timed (forward, backward, gradient clipping, optimizer and learning-rate step); evaluation is excluded.
   The times reported are **robust step times**, all on the dense arm's clock: a dense step costs the median
   seconds per token of the dense arm's steps, times its tokens (:func:`as_dense_steps`); a SAT step costs that
   times SAT's **paired** step cost at its omission rates, the median over those steps of SAT's seconds over the
   seconds of the dense step run beside it, on the same batch at the same moment (:func:`relative_step_costs`). So a
   stall of a shared machine during one step (seen here: one step of 600 s among steps of 8-25 s) does not decide
   the result, and neither does load that changes during the run (each omission rate of a schedule falls in its own
   stretch of the run: costed from its own steps alone, a rate run while the machine was busier looks slower). The
   raw sums are reported beside them (``measured``).
4. Equal-time figure: SAT's eval loss at the dense arm's training time, interpolated linearly in time between the
   two evaluations around it.
5. Control (``control=True``, ``sat-train --control``): a third arm trains dense with the SAT arm's step budget
   and schedules, interleaved with the others. A longer learning-rate schedule alone lowers the loss at step ``N``
   while training is far from converged, so the ratio of point 2 mixes SAT's effect with the schedule's; the
   control's time to the target (its steps costed as dense steps; after step ``N`` the SAT arm's steps are paired
   with the control's) gives
   ``control.ratio = sat_seconds / control seconds``, SAT against dense on the same schedule. With a peak learning
   rate of its own for the SAT arm (``cfg.sat_lr``, ``sat-train --sat-lr``) the control trains at that rate too:
   it differs from the SAT arm in the omission only.

Evaluations are those of :func:`~sat_kernels.train.runner.evaluate` (eval mode: SAT modules compute the dense
function), on the same held-out examples for both arms. The loop mirrors the settings of the ``Trainer`` runs of
``sat-train --compare`` (AdamW without weight decay, gradient clipping at 1.0, linear schedule) and drives the SAT
arm's schedules through :class:`sat_kernels.SATCallback`, so ``--skip-omitted-updates`` and ``--per-layer-budget``
apply.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import sat_kernels as sk

from .compare import save_figure
from .data import collate
from .runner import TrainConfig, _schedule_callbacks, evaluate, make_model, resolve_device_precision, sat_schedule_lr
from .step_log import synchronize

MAX_GRAD_NORM = 1.0   # the Trainer's default, used by the sat-train --compare runs
CONTROL_NAME = "dense, SAT's schedule"


@dataclass
class Arm:
    """One arm of the benchmark: its model, optimizer and schedule, and what it recorded."""

    name: str
    sat: bool
    steps: int
    model: torch.nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    lr_schedule: object = field(repr=False)
    callbacks: list = field(repr=False)
    rate_of: object = field(repr=False)
    attn_rate_of: object = field(repr=False)
    step_seconds: List[float] = field(default_factory=list)
    step_tokens: List[int] = field(default_factory=list)   # tokens of each step's batch, padding included
    losses: List[float] = field(default_factory=list)
    omission_rates: List[float] = field(default_factory=list)
    attn_omission_rates: List[float] = field(default_factory=list)
    evals: List[Dict] = field(default_factory=list)   # {"step", "seconds" (training time so far), "eval_loss"}
    state: object = field(default=None, repr=False)   # what SATCallback reads (the step and the planned steps)

    def record(self) -> Dict:
        return {"name": self.name, "sat": self.sat, "steps_budget": self.steps, "steps_run": len(self.losses),
                "step_seconds": self.step_seconds, "step_tokens": self.step_tokens, "losses": self.losses,
                "omission_rates": self.omission_rates, "attn_omission_rates": self.attn_omission_rates,
                "evals": self.evals}


def _rate_keys(run: Dict) -> List[tuple]:
    """Each step's ``(MLP omission rate, attention omission rate or None)``."""
    attn = run.get("attn_omission_rates") or [None] * len(run["step_seconds"])
    return list(zip(run["omission_rates"], attn))


def as_dense_steps(run: Dict, dense_run: Dict) -> List[float]:
    """What each step of ``run`` would cost as a dense step: the dense arm's median seconds per token times the
    step's tokens (per step when either record lacks its tokens)."""
    weigh = bool(run.get("step_tokens")) and bool(dense_run.get("step_tokens"))
    units = (lambda r: r["step_tokens"]) if weigh else (lambda r: [1] * len(r["step_seconds"]))  # noqa: E731
    per_unit = statistics.median(t / n for t, n in zip(dense_run["step_seconds"], units(dense_run)))
    return [per_unit * n for n in units(run)]


def relative_step_costs(sat_run: Dict, dense_run: Dict, control_run: Optional[Dict] = None) -> List[Dict]:
    """SAT's step time relative to a dense step at each omission rate of its run, measured in pairs.

    Step ``s`` of every arm trains on the same batch, one right after the other (module docstring, point 3), so
    ``SAT seconds / dense seconds`` of step ``s`` compares the two steps under the same load. The cost at a rate is
    the median of that ratio over SAT's steps at the rate, each paired with the dense arm's step ``s`` (steps before
    ``N``) or else the control's (``control_run``, unless it ran in another process: ``separate_process``, set by
    :func:`attach_control`). A rate none of whose steps has a dense step beside it falls back to the ratio of the
    medians of seconds per token (SAT's steps at that rate over the dense arm's).

    Returns one dict per rate, in the order of first use: ``omission_rate``, ``attn_omission_rate`` (or ``None``),
    ``relative_to_dense`` and ``paired_steps`` (0 for the fallback).
    """
    beside = [dense_run] + ([control_run] if control_run is not None and not control_run.get("separate_process")
                            else [])
    sat_seconds, keys = sat_run["step_seconds"], _rate_keys(sat_run)
    as_dense = as_dense_steps(sat_run, dense_run)
    costs = []
    for key in dict.fromkeys(keys):
        steps = [s for s, k in enumerate(keys) if k == key]
        refs = {s: next((r["step_seconds"][s] for r in beside if s < len(r["step_seconds"])), None) for s in steps}
        ratios = [sat_seconds[s] / refs[s] for s in steps if refs[s] is not None]
        relative = statistics.median(ratios) if ratios else statistics.median(sat_seconds[s] / as_dense[s]
                                                                              for s in steps)
        costs.append({"omission_rate": key[0], "attn_omission_rate": key[1], "relative_to_dense": relative,
                      "paired_steps": len(ratios)})
    return costs


def sat_step_seconds(sat_run: Dict, dense_run: Dict, costs: List[Dict]) -> List[float]:
    """Each SAT step's time on the dense arm's clock: its cost as a dense step (:func:`as_dense_steps`) times SAT's
    paired cost at the step's rates (``costs``, from :func:`relative_step_costs`)."""
    relative = {(c["omission_rate"], c["attn_omission_rate"]): c["relative_to_dense"] for c in costs}
    return [relative[k] * t for k, t in zip(_rate_keys(sat_run), as_dense_steps(sat_run, dense_run))]


class _State:
    """What :class:`sat_kernels.SATCallback` reads from the Trainer's state: the step and the planned steps."""

    def __init__(self, max_steps: int):
        self.max_steps, self.global_step, self.log_history = max_steps, 0, []


def _make_arm(pristine, cfg: TrainConfig, *, sat: bool, steps: int, device, lr: float,
              name: Optional[str] = None) -> Arm:
    from transformers import get_linear_schedule_with_warmup, set_seed

    set_seed(cfg.seed)
    model = make_model(pristine, cfg, sat=sat, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_schedule = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    callbacks, rate_of, attn_rate_of, _ = _schedule_callbacks(cfg, sat)
    arm = Arm(name or ("SAT" if sat else "dense"), sat, steps, model, optimizer, lr_schedule, callbacks, rate_of,
              attn_rate_of)
    arm.state = _State(steps)
    for cb in callbacks:
        cb.on_train_begin(None, arm.state, None, model=model, optimizer=optimizer)
    return arm


def _train_step(arm: Arm, batch: Dict[str, torch.Tensor], step: int, device, autocast_dtype) -> None:
    """One optimizer step of ``arm`` on ``batch`` (already on ``device``), timed from the forward to the end of the
    learning-rate step."""
    arm.state.global_step = step
    for cb in arm.callbacks:
        cb.on_step_begin(None, arm.state, None, model=arm.model)
    synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = arm.model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in arm.optimizer.param_groups for p in g["params"]], MAX_GRAD_NORM)
    arm.optimizer.step()
    arm.lr_schedule.step()
    arm.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    arm.step_seconds.append(time.perf_counter() - start)
    arm.step_tokens.append(batch["input_ids"].numel())
    arm.losses.append(float(loss.detach()))
    arm.state.global_step = step + 1
    for cb in arm.callbacks:
        cb.on_step_end(None, arm.state, None, model=arm.model)
    arm.omission_rates.append(float(arm.rate_of() or 0.0))
    if arm.attn_rate_of is not None:
        arm.attn_omission_rates.append(float(arm.attn_rate_of() or 0.0))


def first_reached(evals: Sequence[Dict], target: float) -> Optional[Dict]:
    """The first evaluation whose loss is at or below ``target`` (``None`` if none)."""
    return next((e for e in evals if e["eval_loss"] <= target), None)


def loss_at_seconds(evals: Sequence[Dict], seconds: float) -> Optional[float]:
    """Eval loss at training time ``seconds``, linearly interpolated between the evaluations around it (``None``
    when ``seconds`` is past the last evaluation)."""
    for a, b in zip(evals, evals[1:]):
        if a["seconds"] <= seconds <= b["seconds"]:
            span = b["seconds"] - a["seconds"]
            w = 0.0 if span <= 0 else (seconds - a["seconds"]) / span
            return a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"])
    return None


def seconds_at_loss(evals: Sequence[Dict], target: float) -> Optional[float]:
    """Training time at which the eval loss first reaches ``target``, linearly interpolated between the last
    evaluation above it and the first at or below it (``None`` if never reached)."""
    for a, b in zip(evals, evals[1:]):
        if a["eval_loss"] > target >= b["eval_loss"]:
            w = (a["eval_loss"] - target) / (a["eval_loss"] - b["eval_loss"])
            return a["seconds"] + w * (b["seconds"] - a["seconds"])
    return evals[0]["seconds"] if evals and evals[0]["eval_loss"] <= target else None


def _should_stop(sat: Arm, dense: Arm, target: Optional[float], control: Optional[Arm] = None) -> bool:
    """The SAT arm may stop early once dense is done, SAT has reached the target and SAT has trained at least as
    long as dense (so the equal-time loss is known), and the control, if any, has reached the target too: nothing
    measured changes, the schedules are those of ``M``."""
    if target is None or len(dense.losses) < dense.steps:
        return False
    if control is not None and first_reached(control.evals, target) is None:
        return False
    sat_evals = _with_times(sat.record(), _live_seconds(sat, dense, control))["evals"]
    dense_seconds = sum(_live_seconds(dense, dense, control))
    return first_reached(sat_evals, target) is not None and sat_evals[-1]["seconds"] >= dense_seconds


def _live_seconds(arm: Arm, dense: Arm, control: Optional[Arm]) -> List[float]:
    """The robust step times of ``arm`` so far (those :func:`analyse` gives its record)."""
    if arm.sat:
        sat_run, dense_run = arm.record(), dense.record()
        costs = relative_step_costs(sat_run, dense_run, control.record() if control is not None else None)
        return sat_step_seconds(sat_run, dense_run, costs)
    return as_dense_steps(arm.record(), dense.record())


def run_time_to_quality(pristine, order: Sequence[Dict], eval_examples: Sequence[Dict], cfg: TrainConfig, *,
                        pad_id: int, sat_steps: int, eval_every: int, base_eval_loss: float,
                        stop_at_target: bool = True, control: bool = False, say=print) -> Dict:
    """Run both arms interleaved (see the module docstring) and return the result dictionary: the target, the
    times, the ratio, the equal-time losses and each arm's record. ``order`` holds ``sat_steps * batch_size``
    examples in training order; the dense arm uses its first ``cfg.steps * batch_size``. ``control``: also train
    the control arm (dense with SAT's step budget and schedules; point 5 of the module docstring)."""
    if sat_steps < cfg.steps:
        raise ValueError(f"sat_steps ({sat_steps}) must be at least the dense steps ({cfg.steps})")
    if eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every}")
    if len(order) < sat_steps * cfg.batch_size:
        raise ValueError(f"order must hold sat_steps * batch_size = {sat_steps * cfg.batch_size} examples, "
                         f"got {len(order)}")
    device, autocast_dtype = resolve_device_precision(cfg.precision)
    dense = _make_arm(pristine, cfg, sat=False, steps=cfg.steps, device=device, lr=cfg.lr)
    sat_lr = sat_schedule_lr(cfg)   # the control follows SAT's schedule, its peak learning rate included
    sat = _make_arm(pristine, cfg, sat=True, steps=sat_steps, device=device, lr=sat_lr)
    ctrl = (_make_arm(pristine, cfg, sat=False, steps=sat_steps, device=device, lr=sat_lr, name=CONTROL_NAME)
            if control else None)
    all_arms = [a for a in (dense, sat, ctrl) if a is not None]
    for arm in all_arms:
        arm.evals.append({"step": 0, "seconds": 0.0, "eval_loss": base_eval_loss})
    target = None
    for s in range(sat_steps):
        batch = {k: v.to(device) for k, v in
                 collate(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], pad_id).items()}
        arms = [a for a in all_arms if s < a.steps]
        for arm in (arms if s % 2 == 0 else arms[::-1]):
            _train_step(arm, batch, s, device, autocast_dtype)
        for arm in arms:
            done = s + 1
            if done % eval_every == 0 or done == arm.steps or (arm.sat and done == dense.steps):
                loss = evaluate(arm.model, eval_examples, pad_id, batch_size=cfg.eval_batch_size, device=device,
                                autocast_dtype=autocast_dtype)
                seconds = sum(_live_seconds(arm, dense, ctrl))
                arm.evals.append({"step": done, "seconds": seconds, "eval_loss": loss})
                say(f"[{arm.name}] step {done}/{arm.steps}: eval loss {loss:.4f} after {seconds:.1f} s of "
                    f"training (rate {arm.omission_rates[-1]:.2f})", flush=True)
        if s + 1 == dense.steps:
            target = dense.evals[-1]["eval_loss"]
            say(f"target (dense eval loss after {dense.steps} steps, {dense.evals[-1]['seconds']:.1f} s): "
                f"{target:.4f}", flush=True)
        if stop_at_target and _should_stop(sat, dense, target, ctrl):
            say(f"[SAT] reached the target and passed the dense time: stopping at step {s + 1} of {sat_steps}")
            break
    for arm in all_arms:
        for cb in arm.callbacks:
            cb.on_train_end(None, arm.state, None)
        sk.revert(arm.model)
    return analyse(dense.record(), sat.record(), target, ctrl.record() if ctrl is not None else None)


def _with_times(run: Dict, robust: List[float]) -> Dict:
    """``run`` with each evaluation's training time recomputed from its robust step times ``robust``
    (``seconds``) and the raw ones (``seconds_measured``)."""
    raw = run["step_seconds"]
    evals = [dict(e, seconds=sum(robust[:e["step"]]), seconds_measured=sum(raw[:e["step"]])) for e in run["evals"]]
    return dict(run, evals=evals, train_seconds=sum(robust), train_seconds_measured=sum(raw))


def _control_times(control_run: Dict, dense_run: Dict) -> Dict:
    """The control arm's record with its evaluations timed as dense steps (:func:`as_dense_steps`: the control runs
    the dense step; this keeps a control trained in another process, or in a noisier stretch, on the dense arm's
    clock)."""
    steps = as_dense_steps(control_run, dense_run)
    evals = [dict(e, seconds=sum(steps[:e["step"]])) for e in control_run["evals"]]
    return dict(control_run, evals=evals, train_seconds=sum(steps))


def _control_result(control_run: Dict, target: float, sat_seconds: Optional[float],
                    sat_interpolated: Optional[float], steps_dense: int) -> Dict:
    evals = control_run["evals"]
    reached = first_reached(evals, target)
    interpolated = seconds_at_loss(evals, target)
    at_n = next((e for e in evals if e["step"] == steps_dense), None)
    return {"name": control_run["name"], "steps_to_target": reached["step"] if reached else None,
            "seconds": reached["seconds"] if reached else None, "seconds_interpolated": interpolated,
            "ratio": sat_seconds / reached["seconds"] if reached and sat_seconds is not None else None,
            "ratio_interpolated": (sat_interpolated / interpolated
                                   if interpolated and sat_interpolated is not None else None),
            "eval_loss_at_dense_steps": at_n["eval_loss"] if at_n else None}


def analyse(dense_run: Dict, sat_run: Dict, target: float, control_run: Optional[Dict] = None) -> Dict:
    """The result of a benchmark run from its arms' records: target, training times, ratio, equal-time losses,
    step speedups, and with ``control_run`` the control block (see the module docstring). Also re-derives the result
    of a stored JSON (``runs``)."""
    costs = relative_step_costs(sat_run, dense_run, control_run)
    sat_times = sat_step_seconds(sat_run, dense_run, costs)
    step_speedup = sum(as_dense_steps(sat_run, dense_run)) / sum(sat_times)
    sat_run = _with_times(sat_run, sat_times)
    dense_run = _with_times(dense_run, as_dense_steps(dense_run, dense_run))
    dense_evals, sat_evals = dense_run["evals"], sat_run["evals"]
    steps_dense = dense_evals[-1]["step"]
    dense_seconds = dense_evals[-1]["seconds"]
    reached = first_reached(sat_evals, target)
    sat_seconds = reached["seconds"] if reached else None
    at_dense_time = loss_at_seconds(sat_evals, dense_seconds)
    sat_at_n = next((e for e in sat_evals if e["step"] == steps_dense), None)
    median = {k: statistics.median(r["step_seconds"]) for k, r in (("dense", dense_run), ("sat", sat_run))}
    mean = {k: sum(r["step_seconds"]) / len(r["step_seconds"]) for k, r in (("dense", dense_run), ("sat", sat_run))}
    measured_dense = dense_evals[-1]["seconds_measured"]
    measured_sat = reached["seconds_measured"] if reached else None
    sat_interpolated = seconds_at_loss(sat_evals, target)
    runs = {"dense": dense_run, "sat": sat_run}
    control = None
    if control_run is not None:
        runs["control"] = _control_times(control_run, dense_run)
        control = _control_result(runs["control"], target, sat_seconds, sat_interpolated, steps_dense)
    return {
        "target_eval_loss": target, "dense_seconds": dense_seconds, "sat_seconds": sat_seconds,
        "sat_seconds_interpolated": sat_interpolated,
        "ratio": sat_seconds / dense_seconds if sat_seconds is not None else None,
        "ratio_interpolated": sat_interpolated / dense_seconds if sat_interpolated is not None else None,
        "reached": reached is not None, "sat_steps_to_target": reached["step"] if reached else None,
        "equal_time": {"sat_eval_loss": at_dense_time,
                       "rel_diff": (at_dense_time - target) / target if at_dense_time is not None else None},
        "sat_at_dense_steps": {"eval_loss": sat_at_n["eval_loss"], "seconds": sat_at_n["seconds"],
                               "rel_diff": (sat_at_n["eval_loss"] - target) / target} if sat_at_n else None,
        "measured": {"dense_seconds": measured_dense, "sat_seconds": measured_sat,
                     "ratio": measured_sat / measured_dense if measured_sat is not None else None},
        "median_step_seconds": median,
        "step_speedup_median": median["dense"] / median["sat"],
        "step_speedup_mean": mean["dense"] / mean["sat"],
        "relative_step_costs": costs, "step_speedup_paired": step_speedup,
        "control": control,
        "runs": runs,
    }


def reanalyse(record: Dict) -> Dict:
    """A stored JSON record with its result re-derived by :func:`analyse` from its per-step data."""
    runs = record["runs"]
    return dict(record, **analyse(runs["dense"], runs["sat"], record["target_eval_loss"], runs.get("control")))


# Record fields added after the first records were written, with the value those records imply.
_FIELD_DEFAULTS = {"packed": False}


def attach_control(record: Dict, control_record: Dict) -> Dict:
    """``record`` with the control arm taken from ``control_record``, a run of the same benchmark (model, task,
    seed, data, steps, budget, optimizer settings, SAT's learning rate) whose dense arm reached the same target: its
    control arm (a run with ``--control``, whatever its SAT settings: the control depends on none of them), or else
    its SAT arm if that kept every unit (``--omission-rate 0``, no attention omission), i.e. dense with SAT's budget
    and schedules. The attached arm is marked ``separate_process``: its steps ran beside another run's."""
    same = ("model", "task", "packed", "seed", "seq_len", "batch_size", "lr", "warmup_steps", "steps_dense",
            "steps_sat_budget", "dtype", "data")
    value = lambda r, k: r.get(k, _FIELD_DEFAULTS.get(k))  # noqa: E731
    differ = [k for k in same if value(record, k) != value(control_record, k)]
    if record["sat_config"].get("sat_lr") != control_record["sat_config"].get("sat_lr"):
        differ.append("sat_config.sat_lr")
    if differ:
        raise ValueError(f"attach_control: the control run differs in {differ}")
    cfg = control_record["sat_config"]
    arm = control_record["runs"].get("control")
    if arm is None:
        if cfg["omission_rate"] != 0 or cfg.get("attn_omission_rate"):
            raise ValueError(f"attach_control: the control run has no control arm and its SAT arm does not keep every "
                             f"unit (omission rate 0, no attention omission): omission_rate={cfg['omission_rate']}, "
                             f"attn_omission_rate={cfg.get('attn_omission_rate')}")
        arm = control_record["runs"]["sat"]
    if abs(record["target_eval_loss"] - control_record["target_eval_loss"]) > 1e-6 * abs(record["target_eval_loss"]):
        raise ValueError(f"attach_control: the dense arms reached different targets ({record['target_eval_loss']} "
                         f"vs {control_record['target_eval_loss']})")
    control = dict(arm, name=CONTROL_NAME, sat=False, separate_process=True)
    return reanalyse(dict(record, runs=dict(record["runs"], control=control)))


def cpu_facts(threads: int) -> Dict:
    """CPU model name, the ISA flags that matter for bf16 GEMMs, threads."""
    from ..bench.results import cpu_bf16_isa

    name = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"model_name": name, "bf16_isa": cpu_bf16_isa(), "threads": threads, "logical_cpus": os.cpu_count()}


def report(result: Dict, *, cfg: TrainConfig, model_name: str, sat_steps: int, eval_every: int, env: Dict,
           threads: int, data: Dict) -> Dict:
    """The JSON record of one benchmark run (the fields of benchmarks/results/time_to_quality/README.md)."""
    _, autocast_dtype = resolve_device_precision(cfg.precision)
    common = ("task", "pack", "steps", "seq_len", "batch_size", "lr", "warmup_steps", "seed", "precision",
              "eval_batch_size", "lora")
    sat_config = {k: v for k, v in asdict(cfg).items() if k not in common}
    return dict(result, model=model_name, task=cfg.task, packed=cfg.pack, seed=cfg.seed,
                dtype="bf16 autocast" if autocast_dtype is not None else "fp32", seq_len=cfg.seq_len,
                batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps_dense=cfg.steps,
                steps_sat_budget=sat_steps, eval_every=eval_every, lora=asdict(cfg)["lora"], sat_config=sat_config,
                cpu=cpu_facts(threads), device=env["device"],
                versions={k: env[k] for k in ("torch", "transformers", "triton", "python", "cuda", "peft")
                          if k in env},
                git_revision=env["git"], date=env["date"], data=data, load_avg=os.getloadavg()[0])


def summary_line(r: Dict) -> str:
    if r["reached"]:
        head = (f"SAT reached the dense target {r['target_eval_loss']:.4f} after {r['sat_steps_to_target']} steps, "
                f"{r['sat_seconds']:.1f} s vs dense {r['dense_seconds']:.1f} s: ratio {r['ratio']:.3f} "
                f"({r['ratio_interpolated']:.3f} interpolated)")
    else:
        head = (f"SAT did not reach the dense target {r['target_eval_loss']:.4f} within {r['steps_sat_budget']} "
                f"steps (dense: {r['dense_seconds']:.1f} s)")
    eq = r["equal_time"]
    tail = (f"; at the dense time SAT's eval loss is {eq['sat_eval_loss']:.4f} ({100 * eq['rel_diff']:+.2f}%)"
            if eq["sat_eval_loss"] is not None else "")
    m = r.get("measured") or {}
    raw = f"; raw step-time sums: ratio {m['ratio']:.3f}" if m.get("ratio") is not None else ""
    line = head + tail + f"; step speedup {r['step_speedup_paired']:.3f}x (paired with dense steps){raw}"
    c = r.get("control")
    if c:
        if c["steps_to_target"] is None:
            line += f"; control ({c['name']}): target not reached"
        else:
            vs = f", SAT's ratio against it {c['ratio']:.3f}" if c["ratio"] is not None else ""
            line += (f"; control ({c['name']}) reached the target after {c['steps_to_target']} steps, "
                     f"{c['seconds']:.1f} s{vs}")
    return line


def title(r: Dict) -> str:
    """The plot title of record ``r``: model, task, tokens per step, dtype, seed, SAT settings, machine, date."""
    c = r["sat_config"]
    attention = f", attention {c['attn_omission_rate']}" if c.get("attn_omission_rate") is not None else ""
    backward = f", backward {c['backward']}" if c.get("backward", "sparse") != "sparse" else ""
    warmup = f", {c['dense_warmup_steps']} dense warm-up steps" if c.get("dense_warmup_steps") else ""
    lr = (f"peak learning rate {c['sat_lr']:g} (SAT and the control), {r['lr']:g} (dense); "
          if c.get("sat_lr") is not None else "")
    packed = " (packed pairs)" if r.get("packed") else ""
    return (f"time to dense quality, {r['task']}: {Path(r['model']).name}, {r['batch_size']} x {r['seq_len']} "
            f"tokens{packed}, {r['dtype']}, seed {r['seed']}\nSAT: {c['scheduler']} from {c['omission_rate']}"
            f"{attention}{warmup}, forward {c['forward']}{backward}, budget {r['steps_sat_budget']} steps\n"
            f"{lr}{r['device']}, {r['cpu']['bf16_isa']}, {r['date'][:10]}")


def plot(r: Dict, path: Path) -> Path:
    """Eval loss against training wall-clock (robust step times) for both arms, the target line and the point where
    SAT reaches it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key, color in (("dense", "tab:blue"), ("sat", "tab:orange"), ("control", "tab:green")):
        if key not in r["runs"]:
            continue
        evals = r["runs"][key]["evals"]
        ax.plot([e["seconds"] for e in evals], [e["eval_loss"] for e in evals], marker="o", markersize=3,
                color=color, label=f"{r['runs'][key]['name']} ({r['runs'][key]['steps_run']} steps)")
    ax.axhline(r["target_eval_loss"], color="gray", linestyle=":", label=f"target {r['target_eval_loss']:.4f}")
    ax.axvline(r["dense_seconds"], color="tab:blue", linestyle="--", linewidth=0.8)
    if r["reached"]:
        ax.scatter([r["sat_seconds"]], [r["target_eval_loss"]], color="tab:red", zorder=5,
                   label=f"SAT reaches it: {r['ratio']:.3f}x dense time")
    else:
        ax.plot([], [], " ", label="SAT: target not reached")
    control = r.get("control")
    if control and control["seconds"] is not None:
        vs = f": SAT takes {control['ratio']:.3f}x its time" if control["ratio"] is not None else ""
        ax.scatter([control["seconds"]], [r["target_eval_loss"]], color="tab:green", marker="s", zorder=5,
                   label=f"{control['name']} reaches it{vs}")
    ax.set_xlabel("training wall-clock (s; robust step times, evaluation excluded)")
    ax.set_ylabel("held-out eval loss")
    losses = [e["eval_loss"] for k in r["runs"] for e in r["runs"][k]["evals"][1:]]
    if losses:   # the curve after the first evaluation: the loss before training would flatten the plot
        lo, hi = min(losses), max(losses)
        pad = 0.1 * (hi - lo or abs(hi) * 0.01 or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title(r), fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def sat_step_budget(steps: int, factor: float) -> int:
    """``ceil(factor * steps)``, the SAT arm's step budget."""
    if not (factor >= 1.0 and math.isfinite(factor)):
        raise ValueError(f"the SAT step factor must be a finite number >= 1, got {factor}")
    return math.ceil(factor * steps - 1e-9)
