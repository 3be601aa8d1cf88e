"""Interleaved step times: dense and SAT training steps on one batch, timed in alternating rounds, and the speedup
of an omission schedule computed from them (``sat-train --compare`` after training, ``benchmarks/schedule_speed.py``).
"""
from __future__ import annotations

import gc
from functools import partial
from typing import Dict, Sequence

import torch

import sat_kernels as sk

from .data import collate
from .runner import TrainConfig, make_model, resolve_device_precision, synchronize


def _training_step(model, opt, *, batch: Dict, device: torch.device, autocast_dtype, rates=None):
    """One full training step of ``model`` on ``batch`` (at the SAT ``rates`` ``(mlp, attention)`` when given), as a
    function to time."""
    def run():
        if rates is not None:
            sk.set_omission_rate(model, mlp=rates[0], attention=rates[1])
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
    return run


def interleaved_step_times(pristine, batch_examples: Sequence[Dict], cfg: TrainConfig, *, pad_id: int,
                           schedule: Sequence[tuple], repeats: int = 5, clock: str = "wall") -> Dict:
    """Step times of dense and of SAT at each omission rate ``schedule`` visited, measured interleaved.

    The tokens/s of two training runs made one after the other also carry whatever changed on the machine in
    between (other processes, clocks, allocator state). Here fresh copies of ``pristine`` (:func:`make_model`: one
    dense, one patched like the SAT run, both with the runs' LoRA adapters when ``cfg.lora`` is set) take full
    training steps (forward, backward, AdamW step over the trainable parameters; with ``cfg.skip_omitted_updates``
    the SAT model's steps skip its omitted units) on the same batch, in rounds that run
    every variant once, so all variants see the same machine state (on GPU each is timed with ``do_bench``). On CPU
    each round runs ``dense, SAT r1, dense, SAT r2, ...``, so every timed step follows a step of the other model (the
    same condition for every variant). SAT at rate 0 runs the dense computation: ``control_dense_over_sat_rate0``
    shows how far apart two timings of one computation came out.

    ``schedule`` is the SAT run's per-step ``(mlp rate, attention rate or None)``; the schedule speedup is
    ``steps * t_dense / sum over steps of t_SAT(rate of the step)``. ``clock`` (CPU only): ``"wall"`` or ``"cpu"``
    (process CPU time, one torch thread; see :func:`sat_kernels.bench.timing.bench_cpu_interleaved`). Returns a
    JSON-ready dict.
    """
    from ..bench.timing import bench, bench_cpu_interleaved

    device, autocast_dtype = resolve_device_precision(cfg.precision)
    batch = {k: v.to(device) for k, v in collate(list(batch_examples), pad_id).items()}
    models, optimizers = {}, {}
    for name in ("dense", "SAT"):
        models[name] = make_model(pristine, cfg, sat=name == "SAT", device=device)
        trainable = [p for p in models[name].parameters() if p.requires_grad]   # LoRA: the adapters only
        optimizers[name] = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    if cfg.skip_omitted_updates:   # the SAT run's lazy optimizer steps, at their cost
        sk.skip_omitted_updates(models["SAT"], optimizers["SAT"])
    visited = sorted(set(schedule), key=lambda r: (-r[0], -(r[1] or 0.0)))
    label = lambda r: f"SAT {r[0]:g}" + (f" / attention {r[1]:g}" if r[1] is not None else "")  # noqa: E731
    step = partial(_training_step, batch=batch, device=device, autocast_dtype=autocast_dtype)
    fns = {"dense": step(models["dense"], optimizers["dense"])}
    fns.update({label(r): step(models["SAT"], optimizers["SAT"], rates=r) for r in visited})
    if device.type == "cuda":
        stats, _ = bench(fns, device, repeats)
    else:
        order = [name for r in visited for name in ("dense", label(r))]
        stats, _ = bench_cpu_interleaved(fns, repeats, warmup=1, order=order, clock=clock)
    ms = {name: stats[name][0] for name in fns}
    sat_total = sum(ms[label(r)] for r in schedule)
    del models, optimizers, fns   # free the copies (the timed closures hold them) before the caller goes on
    gc.collect()
    # SAT at rate 0 runs exactly the dense computation: its ratio to dense is the measurement's own error
    zero = [label(r) for r in visited if r[0] == 0.0 and not r[1]]
    return {"batch_sequences": len(batch_examples), "batch_tokens": int(batch["attention_mask"].sum()),
            "repeats": repeats, "clock": clock if device.type == "cpu" else "cuda", "step_ms": ms,
            "step_ms_p20_p80": {name: [stats[name][1], stats[name][2]] for name in ms},
            "speedup_schedule": len(schedule) * ms["dense"] / sat_total,
            "control_dense_over_sat_rate0": ms["dense"] / ms[zero[0]] if zero else None}
