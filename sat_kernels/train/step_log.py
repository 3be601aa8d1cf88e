"""The step log of a ``sat-train`` run: a Trainer callback that times each optimizer step (with a CUDA
synchronisation at both ends on GPU) and records loss, tokens/s and the omission rates into the run's result."""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from .runner import RunResult


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA only), so that a time taken next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step_log(result: RunResult, device: torch.device, total_steps: int, rate_of: Callable[[], float],
                  attn_rate_of: Optional[Callable[[], float]], kept_of: Optional[Callable[[], list]] = None, *,
                  progress: bool, verbose: bool):
    """The :class:`transformers.TrainerCallback` that fills ``result`` step by step: step time, loss, grad norm, the
    omission rates (``rate_of``, ``attn_rate_of``) and per-layer kept counts (``kept_of``) read at each step's end.
    Every process records; only a ``verbose`` one (rank 0) prints a line per step and, with ``progress``, a bar."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Times each optimizer step, records loss / tokens/s / omission rate, drives the progress bar."""

        def __init__(self):
            self.bar = None
            self.t0 = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total_steps, desc=result.name, disable=not (progress and verbose), file=sys.stderr,
                            dynamic_ncols=True, leave=False)

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            result.step_seconds.append(time.perf_counter() - self.t0)
            result.omission_rates.append(rate_of())
            if attn_rate_of is not None:
                result.attn_omission_rates.append(attn_rate_of())
            if kept_of is not None:
                result.layer_kept.append(kept_of())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or len(result.losses) >= len(result.step_seconds):
                return
            step = len(result.losses)
            result.losses.append(float(logs["loss"]))
            result.grad_norms.append(float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None)
            tok_s = result.step_tokens[step] / result.step_seconds[step]
            line = (f"[{result.name}] step {step + 1}/{total_steps}  loss {result.losses[-1]:.4f}  "
                    f"tokens/s {tok_s:.0f}  omission {result.omission_rates[step]:.2f}")
            if result.attn_omission_rates:
                line += f"  attention omission {result.attn_omission_rates[step]:.2f}"
            if not verbose:
                return
            if progress:
                self.bar.set_postfix_str(f"loss {result.losses[-1]:.3f} tok/s {tok_s:.0f} "
                                         f"r {result.omission_rates[step]:.2f}")
                self.bar.update(1)
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return StepLog()
