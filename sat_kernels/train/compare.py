"""Reports of ``sat-train``: the comparison table, the JSON summary and the loss-curve plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .runner import RunResult

TOKENS_NOTE = ("tokens/s: input tokens (padding excluded) of all optimizer steps / summed step times "
               "(forward + backward + optimizer step); model loading, data preparation, logging and evaluation are "
               "excluded; speedup = SAT / dense tokens/s. final train loss: mean over the last tenth of the steps. "
               "eval: dense (eval mode), on the held-out split. interleaved: dense and SAT (at each omission rate of "
               "the schedule) training steps on one batch, timed in alternating rounds; speedup = steps x dense "
               "step / SAT steps at their rates.")


def summary(runs: Sequence[RunResult], *, config: Dict, environment: Dict, data: Dict,
            base_eval_loss: Optional[float] = None, step_times: Optional[Dict] = None) -> Dict:
    """The JSON-serialisable summary: settings, environment, data, per-run totals and per-step logs, and for a
    dense/SAT pair the speedup (tokens/s, train wall time and, when ``step_times`` from
    :func:`~sat_kernels.train.step_times.interleaved_step_times` is given, the interleaved schedule speedup) and the
    relative eval-loss difference."""
    out = {"config": config, "environment": environment, "data": data, "measurement": TOKENS_NOTE,
           "base_eval_loss": base_eval_loss, "runs": {r.name: r.to_dict() for r in runs}}
    if step_times is not None:
        out["interleaved_step_times"] = step_times
    by_sat = {r.sat: r for r in runs}
    if len(runs) == 2 and set(by_sat) == {False, True}:
        dense, sat = by_sat[False], by_sat[True]
        out["comparison"] = {
            "speedup_tokens_per_s": sat.tokens_per_s / dense.tokens_per_s,
            "speedup_median_step": sat.tokens_per_s_median_step / dense.tokens_per_s_median_step,
            "speedup_train_wall": dense.train_wall_s / sat.train_wall_s,
            "speedup_interleaved": step_times["speedup_schedule"] if step_times is not None else None,
            "eval_loss_rel_diff": (sat.eval_loss - dense.eval_loss) / dense.eval_loss,
            "final_train_loss_rel_diff": (sat.final_train_loss() - dense.final_train_loss()) / dense.final_train_loss(),
        }
    return out


def table(runs: Sequence[RunResult], base_eval_loss: Optional[float] = None) -> str:
    """Markdown table of the runs; the speedup column is relative to the dense run (tokens/s)."""
    dense = next((r for r in runs if not r.sat), None)
    lines = ["| run | final train loss | eval loss | eval ppl | tokens/s | tokens/s median step | train wall s | "
             "speedup |", "|---|---|---|---|---|---|---|---|"]
    if base_eval_loss is not None:
        lines.append(f"| before training | - | {base_eval_loss:.4f} | {math.exp(base_eval_loss):.2f} | - | - | - | - |")
    for r in runs:
        speed = f"{r.tokens_per_s / dense.tokens_per_s:.3f}x" if dense is not None else "-"
        lines.append(f"| {r.name} | {r.final_train_loss():.4f} | {r.eval_loss:.4f} | {r.eval_perplexity:.2f} | "
                     f"{r.tokens_per_s:.1f} | {r.tokens_per_s_median_step:.1f} | {r.train_wall_s:.1f} | {speed} |")
    return "\n".join(lines)


def _moving_average(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: Sequence[RunResult], path: Path, title: str, base_eval_loss: Optional[float] = None) -> Path:
    """Train loss per step (thin) and its moving average (thick) for each run, the SAT omission rate on a second
    axis, and each run's final dense eval loss as a marker. Written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = max(len(r.losses) for r in runs)
    window = max(1, steps // 20)
    colors = {False: "tab:blue", True: "tab:orange"}
    for r in runs:
        x = list(range(1, len(r.losses) + 1))
        c = colors[r.sat]
        ax.plot(x, r.losses, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(x, _moving_average(r.losses, window), color=c, linewidth=2,
                label=f"{r.name} train loss (moving avg {window})")
        ax.scatter([len(r.losses)], [r.eval_loss], color=c, marker="D", zorder=5,
                   label=f"{r.name} eval loss {r.eval_loss:.4f}")
    if base_eval_loss is not None:
        ax.axhline(base_eval_loss, color="gray", linestyle=":", label=f"eval loss before training {base_eval_loss:.4f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    sat = [r for r in runs if r.sat]
    if sat:
        ax2 = ax.twinx()
        ax2.step(range(1, len(sat[0].omission_rates) + 1), sat[0].omission_rates, where="post", color="tab:green",
                 linestyle="--", linewidth=1, label="SAT MLP omission rate")
        if sat[0].attn_omission_rates:
            ax2.step(range(1, len(sat[0].attn_omission_rates) + 1), sat[0].attn_omission_rates, where="post",
                     color="tab:red", linestyle=":", linewidth=1, label="SAT attention omission rate")
        ax2.set_ylabel("omission rate")
        ax2.set_ylim(0, 1)
        handles, labels = ax2.get_legend_handles_labels()
    else:
        handles, labels = [], []
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend(h1 + handles, l1 + labels, fontsize=8, loc="upper right")
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (directories created) at 110 dpi and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj: Dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return path
