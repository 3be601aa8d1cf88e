"""The quality/speed frontier of SAT configurations: eval-loss increase over dense against step speedup.

Quality comes from ``sat-train`` run summaries (``benchmarks/results/train_*.json``): each SAT run is compared with
the dense run of the same model, task, seed, steps, batch and sequence length (the dense arm of a ``--compare`` run or
a dense-only run; a dense run is bitwise reproducible on one machine, so SAT variants can be run alone). Speed comes
from interleaved step times (``benchmarks/schedule_speed.py`` JSON): a run's speedup is ``sum over its steps of
t_dense / sum of t_SAT(rates of the step)``, with the step times of its forward mode at each (MLP, attention) rate it
visited, so every configuration is priced by one measurement on one machine state, not by its own wall time.

    python benchmarks/frontier.py --speed benchmarks/results/schedule_speed_intel_1thread.json \\
        --csv benchmarks/results/frontier.csv --plot benchmarks/results/frontier.png
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

RESULTS = Path(__file__).with_name("results")


_MODEL_NAMES = {"SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct", "smollm2-135m": "SmolLM2-135M-Instruct",
                "gemma-3-270m-q4_k_m.gguf": "Gemma-3-270M", "gemma3-270m": "Gemma-3-270M"}


def _model_name(config: Dict) -> str:
    """The model, with `` + LoRA r<rank>`` for LoRA fine-tuning (its own panel and speed table)."""
    name = Path(str(config.get("model") or "smollm2-135m")).name
    lora = config.get("lora")   # sat-train: the LoRA settings; schedule_speed.py: lora_rank
    rank = lora["rank"] if isinstance(lora, dict) else config.get("lora_rank")
    return _MODEL_NAMES.get(name, name) + (f" + LoRA r{rank}" if rank else "")


def _arm_key(report: Dict, steps: bool = True) -> Tuple:
    """What a SAT run and its dense reference must share (all but the number of steps with ``steps=False``)."""
    c = report["config"]
    lora = c.get("lora")
    return (_model_name(c), c["task"], c.get("seed", 0), c["steps"] if steps else None, c["batch_size"],
            c["seq_len"], c.get("lr"), c.get("warmup_steps"), report["data"].get("fingerprint"),
            json.dumps(lora, sort_keys=True) if lora else None)


def _label(mlp: float, attn: Optional[float]) -> str:
    return f"SAT {mlp:g}" + (f" / attention {attn:g}" if attn is not None else "")


def load_speed_tables(paths: List[str]) -> Dict[Tuple, List[Dict[str, float]]]:
    """``{(model, task, forward, strategy, lazy updates, batch, seq_len): [{step label: ms}, ...]}`` from
    schedule_speed JSONs: one table per file and shape, in the order of ``paths``. Tables of different files are never
    mixed (their dense steps were timed in other rounds); a run is priced by the last one that has all its rates."""
    tables = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        forward = report["config"].get("forward", "sparse")
        model, lazy = _model_name(report["config"]), bool(report["config"].get("skip_omitted_updates"))
        strategy = report["config"].get("strategy", "topk")
        for row in report["rows"]:
            key = (model, row["task"], forward, strategy, lazy, row["batch"], row["seq_len"])
            tables.setdefault(key, []).append(row["step_ms"])
    return tables


def _step_ms(table: Dict[str, float], mlp: float, attn: Optional[float],
             zero_is_dense: bool = True) -> Optional[float]:
    """Step time at one (MLP, attention) rate; MLP-only runs are priced by MLP-only rows or rows with attention at 0
    (a SAT attention module at rate 0 runs the original module). A step at rate 0 is priced as dense (the same
    computation) unless ``zero_is_dense`` is false (lazy updates: their hook runs at rate 0 too)."""
    if not mlp and not attn and zero_is_dense:
        return table["dense"]
    for label in ((_label(mlp, attn),) if attn else (_label(mlp, None), _label(mlp, 0.0))):
        if label in table:
            return table[label]
    return None


def schedule_speedup(table: Dict[str, float], rates: List[float], attn_rates: List[float],
                     zero_is_dense: bool = True) -> Optional[float]:
    attn = attn_rates or [None] * len(rates)
    times = [_step_ms(table, r, a, zero_is_dense) for r, a in zip(rates, attn)]
    if any(t is None for t in times):
        return None
    return len(times) * table["dense"] / sum(times)


def collect(result_paths: List[str], speed_tables) -> List[Dict]:
    reports = []
    for path in result_paths:
        report = json.loads(Path(path).read_text())
        if "runs" in report and "config" in report:
            reports.append((Path(path).name, report))
    dense, dense_any_steps = {}, {}
    for name, report in reports:
        if "dense" in report["runs"]:
            ref = (name, report["runs"]["dense"]["eval_loss"], report["config"]["steps"])
            dense.setdefault(_arm_key(report), ref)
            dense_any_steps.setdefault(_arm_key(report, steps=False), []).append(ref)
    rows = []
    for name, report in reports:
        sat = report["runs"].get("SAT")
        own = report["runs"].get("dense")
        c = report["config"]
        ref = (name, own["eval_loss"], c["steps"]) if own else dense.get(_arm_key(report))
        if ref is None:   # an equal-time run: SAT trained for more (fewer) steps than its dense reference
            refs = dense_any_steps.get(_arm_key(report, steps=False), [])
            ref = max(refs, key=lambda r: r[2]) if refs else None
        if sat is None or ref is None:
            continue
        model, task, forward = _model_name(c), c["task"], c.get("forward", "sparse")
        lazy, budget, strategy = bool(c.get("skip_omitted_updates")), bool(c.get("per_layer_budget")), \
            c.get("strategy", "topk")
        rates, attn_rates = sat["omission_rates"], sat.get("attn_omission_rates") or []
        # a per-layer budget keeps the uniform rate's total: priced by the uniform rate's step times
        speedup = None
        for table in reversed(speed_tables.get((model, task, forward, strategy, lazy, c["batch_size"],
                                                 c["seq_len"]), [])):
            speedup = schedule_speedup(table, rates, attn_rates, zero_is_dense=not lazy)
            if speedup is not None:
                break
        rows.append({
            "model": model, "task": task, "forward": forward, "seed": c.get("seed", 0),
            "schedule": (f"{c['metric']}, " if c.get("metric", "l2") != "l2" else "")
                        + (f"{strategy}, " if strategy != "topk" else "")
                        + f"{c.get('scheduler', 'ladder')} from {c['omission_rate']:g}"
                        + (f", {c.get('num_rungs', 2)} rungs, dense tail {c.get('dense_fraction', 0.1):g}"
                           if c.get("scheduler", "ladder") == "ladder" else "")
                        + (", lazy updates" if lazy else "") + (", per-layer budget" if budget else "")
                        + (f", {c['steps']} steps (dense {ref[2]})" if c["steps"] != ref[2] else ""),
            "short": f"{c['omission_rate']:g}" + (f" tail {c.get('dense_fraction', 0.1):g}"
                                                  if c.get("dense_fraction", 0.1) != 0.1 else "")
                     + (f" {c['metric']}" if c.get("metric", "l2") != "l2" else "")
                     + (f" {strategy}" if strategy != "topk" else "") + (" lazy" if lazy else "")
                     + (" budget" if budget else "") + (f" {c['steps']} steps" if c["steps"] != ref[2] else ""),
            "attention": c.get("attn_omission_rate"), "metric": c.get("metric", "l2"),
            "mean_omission": sum(rates) / len(rates),
            "dense_eval_loss": ref[1], "sat_eval_loss": sat["eval_loss"],
            "eval_loss_increase_pct": 100 * (sat["eval_loss"] - ref[1]) / ref[1],
            "speedup": speedup, "steps": c["steps"], "dense_steps": ref[2],
            # the SAT run's training time over its dense reference's, from the same step times
            "time_vs_dense": len(rates) / speedup / ref[2] if speedup else None,
            "run": name, "dense_run": ref[0],
        })
    return rows


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["task"]) for r in rows if r["speedup"] is not None})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, task) in zip(axes[0], panels):
        for r in rows:
            if (r["model"], r["task"]) != (model, task) or r["speedup"] is None:
                continue
            marker = "o" if r["forward"] == "dense" else "s"
            color = "tab:blue" if r["forward"] == "dense" else "tab:red"
            if r["attention"] is not None:
                color = "tab:green" if r["forward"] == "dense" else "tab:orange"
            ax.scatter(r["speedup"], r["eval_loss_increase_pct"], marker=marker, color=color)
            ax.annotate(r["short"] + (f"/att {r['attention']:g}" if r["attention"] is not None else "")
                        + (f" s{r['seed']}" if r["seed"] else ""),
                        (r["speedup"], r["eval_loss_increase_pct"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model}, {task}")
        ax.set_xlabel("step speedup over dense (interleaved step times)")
        ax.set_ylabel("eval loss vs dense (%)")
    handles = [plt.Line2D([], [], marker=m, color=c, ls="", label=lbl) for m, c, lbl in (
        ("s", "tab:red", "sparse forward, MLP"), ("o", "tab:blue", "dense forward, MLP"),
        ("s", "tab:orange", "sparse forward, MLP + attention"), ("o", "tab:green", "dense forward, MLP + attention"))]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", default=sorted(glob.glob(str(RESULTS / "train_*.json"))))
    p.add_argument("--speed", nargs="+", required=True, help="schedule_speed.py JSON files")
    p.add_argument("--csv", default=None)
    p.add_argument("--md", default=None, help="also write the table to this Markdown file")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rows = collect(args.results, load_speed_tables(args.speed))
    rows.sort(key=lambda r: (r["model"], r["task"], r["forward"], r["speedup"] or math.inf))
    lines = ["| model | task | forward | schedule | attention | seed | mean omission | dense eval | SAT eval | "
             "SAT vs dense | speedup | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup']:.3f}x" if r["speedup"] is not None else "not measured"
        attn = f"from {r['attention']:g}" if r["attention"] is not None else "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['forward']} | {r['schedule']} | {attn} | {r['seed']} | "
                     f"{r['mean_omission']:.3f} | {r['dense_eval_loss']:.4f} | {r['sat_eval_loss']:.4f} | "
                     f"{r['eval_loss_increase_pct']:+.2f}% | {speed} | {r['run']} |")
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text(f"# SAT quality/speed frontier\n\n`python benchmarks/frontier.py "
                                 f"--speed {' '.join(Path(p).name for p in args.speed)}`\n\n" + "\n".join(lines) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
