"""Markdown tables of one run of ``benchmarks/cpu_speed_suite.sh``: fp32 and bf16 side by side with the FLOP-limit
ratio, and the baseline revision timed in the same rounds.

    python benchmarks/cpu_speed_tables.py benchmarks/results/cpu_speed/avx512_bf16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path):
    data = json.loads(path.read_text())
    return data["environment"], data["rows"]


def _key(row):
    """The row's shape, omission and mode: its forward mode, with `` / exact_input`` for that backward."""
    backward = row.get("backward", "sparse")   # results written before the option have sparse backwards only
    mode = row["forward"] if backward == "sparse" else f"{row['forward']} / {backward}"
    return row["T"], row["h"], row["I"], row["omission"], mode


def mlp_table(path: Path) -> str:
    """One row per shape / omission / forward mode: SAT/dense and vs-limit in fp32 and bf16, and the baseline's."""
    env, rows = _load(path)
    by = {(_key(r), r["dtype"]): r for r in rows}
    keys = sorted({_key(r) for r in rows}, key=lambda k: (k[2], k[0], k[3], k[4]))
    head = ("| T | h | I | omission | forward | limit | fp32 SAT/dense | fp32 vs limit | fp32 before | "
            "bf16 SAT/dense | bf16 vs limit | bf16 before |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in keys:
        cells = []
        limit = None
        for dtype in ("fp32", "bf16"):
            r = by.get((key, dtype))
            if r is None:
                cells += ["", "", ""]
                continue
            limit = r["limit"]
            before = f"{r['base_ratio']:.3f}" if "base_ratio" in r else ""
            cells += [f"{r['ratio']:.3f}", f"**{r['vs_limit']:.3f}**", before]
        T, h, inter, rate, forward = key
        lines.append(f"| {T} | {h} | {inter} | {rate:g} | {forward} | {limit:.3f} | " + " | ".join(cells) + " |")
    return _caption(env) + "\n\n" + "\n".join(lines)


def attention_table(paths) -> str:
    lines = ["| heads (H/G x d), h | B x T | omission | forward | dtype | kept heads | SAT/dense | limit | vs limit "
             "| before |", "|---|---|---|---|---|---|---|---|---|---|"]
    env = None
    for path in paths:
        env, rows = _load(path)
        for r in rows:
            before = f"{r['base_ratio']:.3f}" if "base_ratio" in r else ""
            lines.append(f"| {r['heads']}/{r['kv_heads']} x {r['head_dim']}, {r['h']} | {r['B']} x {r['T']} | "
                         f"{r['omission_rate']:g} | {r['forward']} | {r['dtype']} | {r['kept_heads']} | "
                         f"{r['ratio']:.3f} | {r['flop_limit']:.3f} | **{r['ratio'] / r['flop_limit']:.3f}** | "
                         f"{before} |")
    return _caption(env) + "\n\n" + "\n".join(lines)


def _caption(env) -> str:
    return (f"{env['device']}, bf16 ISA `{env.get('cpu_bf16', '?')}`, torch {env['torch']}, git {env['git']}, "
            f"{env['date'][:10]}; median of {env['repeats']} interleaved rounds; \"before\": "
            f"{env.get('baseline') or '-'} in the same rounds")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    args = p.parse_args(argv)
    d = Path(args.directory)
    for name in ("mlp.json", "mlp_llama2_7b.json", "mlp_lora_r16.json", "mlp_fp32_quiet.json",
                 "mlp_llama2_7b_fp32_quiet.json"):
        if (d / name).exists():
            print(f"### {name}\n\n{mlp_table(d / name)}\n")
    attention = sorted(p for p in d.glob("attention_*.json") if not p.stem.endswith("_quiet"))
    if attention:
        print(f"### attention\n\n{attention_table(attention)}\n")
    quiet = sorted(d.glob("attention_*_quiet.json"))
    if quiet:
        print(f"### attention_quiet\n\n{attention_table(quiet)}\n")


if __name__ == "__main__":
    main()
