"""Markdown table of the time-to-quality results (one JSON per run of ``sat-train --time-to-quality``).

    python benchmarks/time_to_quality_table.py                      # benchmarks/results/time_to_quality/*.json
    python benchmarks/time_to_quality_table.py path/to/runs/*.json
    python benchmarks/time_to_quality_table.py --reanalyse      # first re-derive each JSON's result from its steps
    python benchmarks/time_to_quality_table.py --attach-control RUN.json CONTROL.json   # then print the table

``--attach-control`` takes the control arm (dense with SAT's budget and schedules) from CONTROL.json, a run of the
same benchmark with ``--control`` (any SAT settings) or with ``--omission-rate 0``
(``sat_kernels.train.time_to_quality.attach_control``), into RUN.json, and rewrites RUN.json and its plot. Control
runs themselves (SAT at omission 0) are left out of the table.
"""
import argparse
import json
from pathlib import Path

from sat_kernels.train.runner import TrainConfig

DEFAULT_DIR = Path(__file__).parent / "results" / "time_to_quality"


def variant(r: dict) -> str:
    """The SAT settings that differ from the defaults of ``sat-train``, plus the step budget."""
    c = r["sat_config"]
    parts = [f"{c['scheduler']} from {c['omission_rate']}"]
    if c.get("attn_omission_rate") is not None:
        parts.append(f"attention {c['attn_omission_rate']}")
    if c.get("forward") != "dense":
        parts.append(f"forward {c['forward']}")
    if c.get("backward", "sparse") != "sparse":
        parts.append(f"backward {c['backward']}")
    if c.get("score_tokens", "real") not in ("real", None):
        parts.append(f"scores over {c['score_tokens']} tokens")
    if c.get("scheduler") != "constant" and c.get("dense_fraction", 0.1) != 0.1:
        parts.append(f"dense final {c['dense_fraction']:g}")
    if c.get("dense_warmup_steps"):
        parts.append(f"{c['dense_warmup_steps']} dense warm-up steps")
    if c.get("sat_lr") is not None:
        parts.append(f"SAT learning rate {c['sat_lr']:g} (dense {r['lr']:g})")
    elif r["lr"] != TrainConfig.lr:   # sat-train's default peak learning rate
        parts.append(f"learning rate {r['lr']:g} (every arm)")
    for flag in ("skip_omitted_updates", "per_layer_budget"):
        if c.get(flag):
            parts.append(flag.replace("_", " "))
    parts.append(f"budget {r['steps_sat_budget'] / r['steps_dense']:g} N")
    return ", ".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def row(r: dict) -> str:
    model = Path(r["model"]).name.split(".")[0].replace("-Instruct", "")
    reached = r["sat_seconds"] is not None
    ratio = (f"**{r['ratio']:.3f}** ({r['ratio_interpolated']:.3f})" if reached
             else f"not reached in {r['steps_sat_budget']} steps")
    at_n = r["sat_at_dense_steps"]
    tokens = r["runs"]["dense"].get("step_tokens") or [r["batch_size"] * r["seq_len"]]
    packed = " packed" if r.get("packed") else ""
    shape = f"{r['batch_size']} x <= {r['seq_len']}{packed} ({sum(tokens) / len(tokens):.0f})"
    cells = [model, r["task"], str(r["seed"]), shape, variant(r), f"{r['target_eval_loss']:.4f}",
             f"{r['dense_seconds']:.0f}",
             f"{r['sat_seconds']:.0f}" if reached else "-", ratio, str(r["sat_steps_to_target"] or "-"),
             _pct(r["equal_time"]["rel_diff"]), _pct(at_n and at_n["rel_diff"]), f"{r['step_speedup_paired']:.3f}x"]
    c = r.get("control")
    if c is None:
        cells += ["-", "-"]
    elif c["steps_to_target"] is None:
        cells += ["not reached", "-"]
    else:
        ratio = f"**{c['ratio']:.3f}**" if c["ratio"] is not None else "-"
        interp = f" ({c['ratio_interpolated']:.3f})" if c.get("ratio_interpolated") else ""
        cells += [f"{c['steps_to_target']} ({c['seconds']:.0f} s)", ratio + interp]
    return "| " + " | ".join(cells) + " |"


def is_control_run(r: dict) -> bool:
    """A run whose SAT arm kept every unit: the control of another run (``--attach-control``), not a result."""
    c = r["sat_config"]
    return c["omission_rate"] == 0 and not c.get("attn_omission_rate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--reanalyse", action="store_true",
                   help="re-derive each file's result from its per-step data (sat_kernels.train.time_to_quality."
                        "reanalyse) and rewrite it and its plot: for records written before a change of the analysis")
    p.add_argument("--attach-control", nargs=2, type=Path, metavar=("RUN", "CONTROL"),
                   help="attach CONTROL's control arm (a run with --control) or SAT arm (a run with --omission-rate "
                        "0) to RUN as its control and rewrite RUN and its plot")
    args = p.parse_args(argv)
    if args.attach_control:
        from sat_kernels.train.time_to_quality import attach_control, plot

        run_path, control_path = args.attach_control
        merged = attach_control(json.loads(run_path.read_text()), json.loads(control_path.read_text()))
        run_path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        plot(merged, run_path.with_suffix(".png"))
    files = args.files or sorted(DEFAULT_DIR.glob("*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    if args.reanalyse:
        from sat_kernels.train.time_to_quality import plot, reanalyse

        runs = [reanalyse(r) for r in runs]
        for f, r in zip(files, runs):
            f.write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
            plot(r, f.with_suffix(".png"))
    print("| model | task | seed | sequences x tokens per step (mean tokens) | SAT | target (dense eval loss) | "
          "dense s | SAT s to target | ratio (interpolated) | SAT steps "
          "to target | SAT at dense time | SAT after N steps | step speedup (paired) | control: dense on SAT's "
          "schedule, steps (s) to target | SAT's ratio to the control (interpolated) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if not is_control_run(r):
            print(row(r))
    if runs:
        r = runs[0]
        print(f"\n{r['dtype']}, dense N = {r['steps_dense']} steps, evaluation every {r['eval_every']} steps (first "
              f"file); {r['cpu']['model_name']} "
              f"({r['cpu']['bf16_isa']}), {r['cpu']['threads']} thread(s), torch {r['versions']['torch']}, "
              f"transformers {r['versions'].get('transformers')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
