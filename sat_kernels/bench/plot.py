"""PNG plots from the committed JSONL results: time ratio to dense vs omission rate, one panel per shape."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from .results import read_jsonl


def plot_mlp(rows: List[Dict], out_dir: Path, mode: str = "full") -> List[Path]:
    """One PNG per (device, dtype): ratio to dense vs omission, a line per provider, a panel per shape and T;
    the FLOP limit of SAT dashed. The latest row wins where a configuration was measured more than once."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("sat-bench plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {}
    for row in rows:
        if row.get("mode") == mode:
            key = (row["device"], row["dtype"], row["h"], row["I"], row["T"], row["provider"], row["omission_rate"])
            latest[key] = row
    groups = defaultdict(list)
    for row in latest.values():
        groups[(row["device"], row["dtype"])].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (device, dtype), group in sorted(groups.items()):
        panels = sorted({(r["h"], r["I"], r["T"]) for r in group})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (h, inter, T) in zip(axes[0], panels):
            sel = [r for r in group if (r["h"], r["I"], r["T"]) == (h, inter, T)]
            for provider in sorted({r["provider"] for r in sel}):
                pts = sorted((r["omission_rate"], r["ratio_to_dense"]) for r in sel if r["provider"] == provider)
                ax.plot(*zip(*pts), marker="o", label=provider)
            lim = sorted({(r["omission_rate"], r["flop_limit"]) for r in sel})
            ax.plot(*zip(*lim), "k--", label="FLOP limit")
            ax.set_title(f"h={h} I={inter} T={T}", fontsize=9)
            ax.set_xlabel("omission rate")
            ax.set_ylabel(f"{mode} time / dense")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"SAT MLP {mode}, {dtype}, {device}", fontsize=9)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() else "_" for c in f"{device}_{dtype}").strip("_")
        path = out_dir / f"mlp_{mode}_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_file(path: Path, out_dir: Path) -> List[Path]:
    return plot_mlp(read_jsonl(path), out_dir)
