"""Timing: ``triton.testing.do_bench`` on CUDA; interleaved repeats with ``perf_counter`` on CPU.

Both report the median and the 20th/80th percentiles in milliseconds. On a CPU shared with other work, the wall clock
also counts the time the process waits for a core; ``clock="cpu"`` times the process's CPU time instead
(``time.process_time``), which is the work itself when torch runs on one thread.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


def _quantiles(samples: List[float]):
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(round(q * (len(samples) - 1))))]  # noqa: E731
    return statistics.median(samples), pick(0.2), pick(0.8)


CLOCKS = ("wall", "cpu")


def bench_cpu_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
                          order: Optional[Sequence[str]] = None, clock: str = "wall"):
    """Run every function once per round (or the names of ``order`` in turn, repeats allowed), ``repeats`` rounds,
    so all see the same machine state.

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU time of every thread of
    the process, so only meaningful with ``torch.get_num_threads() == 1``, which it requires).

    Returns ``{name: (median_ms, p20_ms, p80_ms)}`` and, for ratios, the per-round samples ``{name: [ms, ...]}``.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(f"clock='cpu' sums the CPU time of all threads: set torch.set_num_threads(1) first "
                         f"(now {torch.get_num_threads()})")
    timer = time.perf_counter if clock == "wall" else time.process_time
    order = list(fns) if order is None else list(order)
    for _ in range(warmup):
        for name in order:
            fns[name]()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name in order:
            t0 = timer()
            fns[name]()
            samples[name].append(1e3 * (timer() - t0))
    return {name: _quantiles(s) for name, s in samples.items() if s}, samples


def bench_cuda(fn: Callable[[], None], rep_ms: int = 100):
    """``(median_ms, p20_ms, p80_ms)`` from ``triton.testing.do_bench`` (clears L2 between runs)."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=25, rep=rep_ms, quantiles=list(QUANTILES)))


def bench(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int, clock: str = "wall"):
    """Time each function; returns ``{name: (median_ms, p20_ms, p80_ms)}`` and the median per-round ratio to the
    first function (CPU) or the ratio of medians (CUDA). ``clock``: the CPU clock of
    :func:`bench_cpu_interleaved` (CUDA ignores it)."""
    names = list(fns)
    if device.type == "cuda":
        stats = {name: bench_cuda(fn) for name, fn in fns.items()}
        base = stats[names[0]][0]
        return stats, {name: stats[name][0] / base for name in names}
    stats, samples = bench_cpu_interleaved(fns, repeats, clock=clock)
    base = samples[names[0]]
    ratios = {name: statistics.median(s / b for s, b in zip(samples[name], base)) for name in names}
    return stats, ratios
