"""Where results go: JSONL rows with the device, versions, git revision and date; markdown tables on stdout."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source checkout (editable install), else of the working directory."""
    root = REPO_ROOT if (REPO_ROOT / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def cpu_bf16_isa() -> str:
    """The CPU's bf16 matrix instructions as /proc/cpuinfo names them: ``"amx_bf16"`` (Intel AMX, bf16 GEMMs ~4x fp32
    per core), ``"avx512_bf16"`` (~2x), ``"none"`` or ``"unknown"`` (no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((isa for isa in ("amx_bf16", "avx512_bf16") if isa in flags), "none")


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "python": platform.python_version(), "git": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cpu":
        env["cpu_bf16"] = cpu_bf16_isa()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:   # the version only: importing peft takes seconds
        env["peft"] = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        pass
    if os.environ.get("TRITON_INTERPRET") == "1":
        env["triton_interpret"] = "1"
    return env


def append_jsonl(path: Path, rows: Iterable[Dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def read_jsonl(path: Path) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: List[Dict], columns: List[str], formats: Dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            cells.append("-" if value is None else format(value, formats.get(col, "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
