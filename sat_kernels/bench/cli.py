"""``sat-bench``: MLP microbenchmarks, the training-step benchmark and plots.

    sat-bench                      # --quick on CPU: SmolLM2 MLP shape + training step, a few minutes on 2 cores
    sat-bench mlp --shapes llama2-7b --tokens 8192 --rates 0.5 0.75 --dtype bf16     # GPU
    sat-bench --threads 1 mlp --lora-rank 16 --clock cpu   # LoRA on a frozen base: dense LoRA vs SAT-LoRA
    sat-bench train-step --config smollm2-135m --rate 0.5
    sat-bench train-step --backend triton          # GPU: the SAT MLP on the Triton kernels
    sat-bench plot                 # PNGs from benchmarks/results/mlp.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..backends import BACKENDS
from ..selection import DEFAULT_FORWARD, FORWARD_MODES
from .mlp import MODES, SHAPES, available_providers, run_shape
from .timing import CLOCKS
from .plot import plot_file
from .results import append_jsonl, default_results_dir, environment, markdown_table
from .train_step import CONFIGS, run_train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MLP_COLUMNS = ["shape", "T", "omission_rate", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "ratio_to_dense",
               "flop_limit", "vs_limit", "tflops", "saved_bytes", "select_share"]
STEP_COLUMNS = ["config", "run", "backend", "omission_rate", "forward", "backward", "dtype", "autocast", "batch", "seq",
                "step_ms", "tokens_per_s", "mlp_share", "attention_share", "speedup", "mlp_only_ceiling", "of_ceiling"]
FORMATS = {"median_ms": ".2f", "p20_ms": ".2f", "p80_ms": ".2f", "ratio_to_dense": ".3f", "flop_limit": ".3f",
           "vs_limit": ".3f", "tflops": ".3f", "select_share": ".3%", "step_ms": ".1f", "tokens_per_s": ".0f",
           "mlp_share": ".1%", "attention_share": ".1%", "speedup": ".3f", "mlp_only_ceiling": ".3f",
           "of_ceiling": ".3f"}


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False)


def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("sat-bench: --device cuda requested but CUDA is not available")
    return torch.device(arg)


def cmd_mlp(args) -> int:
    device = _device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    shapes = args.shapes or (["smollm2-135m"] if quick else list(SHAPES))
    tokens = args.tokens or ([2048] if quick else [2048, 4096, 8192, 16384])
    rates = args.rates if args.rates is not None else ([0.25, 0.5, 0.75] if quick else [0.0, 0.25, 0.5, 0.75])
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    repeats = args.repeats or (5 if quick else 11)
    lora = args.lora_rank is not None
    if lora and args.lora_rank < 1:
        raise SystemExit(f"sat-bench: --lora-rank must be a positive integer, got {args.lora_rank}")
    if device.type == "cpu" and args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit(f"sat-bench: --clock cpu sums the CPU time of all threads: pass --threads 1 (now "
                         f"{torch.get_num_threads()} threads)")
    usable = available_providers(device, lora)
    providers = args.providers or usable
    unknown = sorted(set(providers) - set(usable))
    if unknown:
        raise SystemExit(f"sat-bench: providers {unknown} are not usable here{' in LoRA mode' if lora else ''}; "
                         f"usable: {usable}")
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"sat-bench: unknown shape {s!r}; known: {list(SHAPES)}")
    env = environment(device)
    rows = []
    jobs = [(s, T, r) for s in shapes for T in tokens for r in rates]
    for shape, T, rate in _progress(jobs, "mlp"):
        h, inter = SHAPES[shape]
        for row in run_shape(T, h, inter, rate, dtype=dtype, device=device, providers=providers, modes=args.modes,
                             repeats=repeats, shape_name=shape, forward=args.forward, lora_rank=args.lora_rank,
                             clock=args.clock):
            rows.append({**env, **row})
    what = f" with LoRA r {args.lora_rank} on gate/up/down, frozen base" if lora else ""
    print(f"\n# SAT MLP{what}, forward={args.forward}, {env['device']}, {dtype}, torch {env['torch']}, "
          f"triton {env['triton']}, git {env['git']}, {args.clock if device.type == 'cpu' else 'cuda'} clock")
    print(markdown_table(rows, MLP_COLUMNS, FORMATS))
    if not args.no_save:
        path = append_jsonl(Path(args.results_dir) / ("mlp_lora.jsonl" if lora else "mlp.jsonl"), rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


def cmd_train_step(args) -> int:
    device = _device(args.device)
    autocast = DTYPES[args.autocast] if args.autocast else None
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" or autocast else "bf16")]
    config = args.config or ("smollm2-135m" if device.type == "cpu" else "llama2-7b-4l")
    batch = args.batch or (2 if device.type == "cpu" else 4)
    seq = args.seq or (256 if device.type == "cpu" else 2048)
    env = environment(device)
    rows = [{**env, **r} for r in run_train_step(config, batch=batch, seq=seq, steps=args.steps, rate=args.rate,
                                                 attention_rate=args.attention_rate, dtype=dtype, device=device,
                                                 backend=args.backend, autocast_dtype=autocast,
                                                 forward=args.forward, backward=args.backward,
                                                 ladder=args.ladder, dense_fraction=args.dense_fraction)]
    print(f"\n# training step, {env['device']}, bf16 ISA {env.get('cpu_bf16', '-')}, {dtype}"
          f"{f' under {autocast} autocast' if autocast else ''}, torch {env['torch']}, git {env['git']}")
    print(markdown_table(rows, STEP_COLUMNS, FORMATS))
    if not args.no_save:
        path = append_jsonl(Path(args.results_dir) / "train_step.jsonl", rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


def cmd_plot(args) -> int:
    src = Path(args.results_dir) / "mlp.jsonl"
    if not src.exists():
        raise SystemExit(f"sat-bench plot: no results at {src}; run `sat-bench mlp` first")
    for path in plot_file(src, Path(args.out_dir or args.results_dir)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sat-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--results-dir", default=str(default_results_dir()))
    p.add_argument("--no-save", action="store_true", help="print only, do not append to the results files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="small set (the default on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("mlp", help="MLP microbenchmarks")
    m.add_argument("--shapes", nargs="+", help=f"from {list(SHAPES)}")
    m.add_argument("--tokens", type=int, nargs="+", help="T values (tokens per batch)")
    m.add_argument("--rates", type=float, nargs="+")
    m.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    m.add_argument("--providers", nargs="+")
    m.add_argument("--dtype", choices=list(DTYPES))
    m.add_argument("--repeats", type=int)
    m.add_argument("--full", action="store_true", help="the full shape/T/rate grid even on CPU")
    m.add_argument("--forward", choices=["sparse", "dense"], default="sparse",
                   help="forward mode of the SAT providers (FLOP limit (4 + 14 rho) / 18 or (6 + 12 rho) / 18; "
                        "with --lora-rank (4 + 8 rho) / 12 or (6 + 6 rho) / 12)")
    m.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA mode: frozen base weights, adapters of this rank on gate, up and down; providers dense "
                        "(PEFT's forward), dense_k, torch (SAT-LoRA); rows go to mlp_lora.jsonl")
    m.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="CPU timing: wall, or cpu (process CPU time, needs --threads 1; robust to other processes)")
    t = sub.add_parser("train-step", help="tokens/s of a full training step, dense vs SAT")
    t.add_argument("--config", choices=list(CONFIGS))
    t.add_argument("--batch", type=int)
    t.add_argument("--seq", type=int)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--rate", type=float, default=0.5)
    t.add_argument("--attention-rate", type=float, default=None)
    t.add_argument("--dtype", choices=list(DTYPES))
    t.add_argument("--backend", default="auto", choices=list(BACKENDS), help="the SAT MLP's backend")
    t.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                   help="run the forward under torch.autocast with this dtype (fp32 weights unless --dtype)")
    t.add_argument("--forward", choices=FORWARD_MODES, default=DEFAULT_FORWARD, help="the SAT modules' forward mode")
    t.add_argument("--backward", choices=["sparse", "exact_input", "dense_tokens"], default="sparse",
                   help="the SAT MLP's backward (exact_input, dense_tokens: with --forward dense; FLOP limits "
                        "(12 + 6 rho) / 18 and (6 + 12 rho + 12 (1 - rho) delta) / 18)")
    t.add_argument("--dense-fraction", type=float, default=0.28,
                   help="dense_tokens: the share of each sequence with labels, its end, as the answer of an sft pair "
                        "(delta; default 0.28)")
    t.add_argument("--ladder", action="store_true",
                   help="also time every rate of the default ladder from --rate and report the schedule's mean step")
    pl = sub.add_parser("plot", help="PNGs from benchmarks/results/mlp.jsonl")
    pl.add_argument("--out-dir")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command is None:   # the quick default: MLP microbenchmarks, then the training step
        base = ["--results-dir", args.results_dir, "--device", args.device] + (["--no-save"] if args.no_save else [])
        cmd_mlp(parser.parse_args(base + ["--quick", "mlp"]))
        return cmd_train_step(parser.parse_args(base + ["train-step"]))
    return {"mlp": cmd_mlp, "train-step": cmd_train_step, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
