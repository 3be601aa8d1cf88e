"""The summary of one run of benchmarks/gpu_check.sh: ``<out>/gpu_check.json`` and the short tables printed last.

Reads what the stages left in the output folder (``stages.jsonl``: one line per stage; ``backends.jsonl``: the rows
of benchmarks/gpu_backend_check.py; ``train_step.jsonl``: the rows of ``sat-bench train-step``), whatever is there
after a timeout, and adds the device, versions, git revision (``GIT_REV``, else ``git rev-parse``) and date.

    python benchmarks/gpu_check_summary.py OUT_DIR [--copy-to benchmarks/results/gpu_check.json]
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _rows(path: Path):
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut short by a timeout
            continue
    return rows


def _git_revision(root: Path) -> str:
    if os.environ.get("GIT_REV"):
        return os.environ["GIT_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    env = {"python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"), "git": _git_revision(Path(__file__).resolve().parent.parent)}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda or "none",
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
    except ImportError:
        env["torch"] = "none"
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "none"
    return env


def summarize(out: Path) -> dict:
    stages = _rows(out / "stages.jsonl")
    backends = _rows(out / "backends.jsonl")
    steps = _rows(out / "train_step.jsonl")
    ok = bool(stages) and all(s["status"] == "pass" for s in stages)
    return {"check": "benchmarks/gpu_check.sh", **environment(), "ok": ok, "stages": stages, "backends": backends,
            "train_step": steps}


def tables(summary: dict) -> str:
    lines = [f"gpu_check: {summary['device']}, torch {summary['torch']}, triton {summary['triton']}, "
             f"git {summary['git']}: {'PASS' if summary['ok'] else 'FAIL'}", "",
             "| stage | status | s | limit s | expected s |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} | {s['expected_s']} |")
    if summary["backends"]:
        lines += ["", "| backend | T | omission | forward | first call s | second call s | kept overlap | worst "
                  "err / torch err | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for r in summary["backends"]:
            if "error" in r:
                lines.append(f"| {r['backend']} | {r.get('T', '')} | {r.get('omission_rate', '')} | "
                             f"{r.get('forward', '')} | | | | {r['error'][:60]} | no |")
                continue
            worst = max(r["err_vs_fp64"][n] / max(r["torch_err_vs_fp64"][n], 1e-30) for n in r["err_vs_fp64"])
            lines.append(f"| {r['backend']} | {r['T']} | {r['omission_rate']} | {r['forward']} | "
                         f"{r['first_call_s']:.2f} | {r['second_call_s']:.3f} | {r['kept_overlap']:.4f} | "
                         f"{worst:.2f} | {'yes' if r['ok'] else 'NO'} |")
    if summary["train_step"]:
        lines += ["", "| training step | backend | omission | step ms | tokens/s | speedup |",
                  "|---|---|---|---|---|---|"]
        for r in summary["train_step"]:
            speedup = f"{r['speedup']:.3f}" if "speedup" in r else ""
            lines.append(f"| {r['config']} {r['run']} | {r.get('backend', '')} | {r['omission_rate']} | "
                         f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the output folder of gpu_check.sh")
    parser.add_argument("--copy-to", help="also write the summary here (e.g. benchmarks/results/gpu_check.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    summary = summarize(out)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if args.copy_to:
        Path(args.copy_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "gpu_check.json", args.copy_to)
    print(tables(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
