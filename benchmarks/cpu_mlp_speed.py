"""Forward+backward time of the SAT MLP (torch backend) vs the dense MLP (``F.linear``, autograd), fp32 on CPU.

Dense and SAT runs are interleaved (dense, SAT, dense, SAT, ...) so both see the same machine state; the figure is the
median of the per-pair ratios SAT/dense, next to the FLOP limit of docs/design.md section 5, ``(4 + 14 * rho) / 18``
(``(6 + 12 * rho) / 18`` with ``--forward dense``).
These are the README's CPU figures; ``sat-bench`` runs the full provider set.

    python benchmarks/cpu_mlp_speed.py                # the two shapes of the README, omission 0.5
    python benchmarks/cpu_mlp_speed.py --rates 0.25 0.5 0.75 --repeats 15
    python benchmarks/cpu_mlp_speed.py --rates 0.5 0.75 --forward dense
"""
from __future__ import annotations

import argparse

import torch

from sat_kernels.bench.mlp import run_shape
from sat_kernels.bench.results import device_name

SHAPES = ["2048x576x1536", "1024x1024x2816"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="TxHxI, e.g. 2048x576x1536")
    p.add_argument("--forward", choices=["sparse", "dense"], default="sparse", help="SAT forward mode")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, fp32, forward={args.forward}, "
          f"median of {args.repeats} pairs")
    print("| T | h | I | omission | dense ms | SAT ms | SAT/dense | FLOP limit |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        T, h, inter = (int(v) for v in shape.split("x"))
        for rate in args.rates:
            rows = run_shape(T, h, inter, rate, dtype=torch.float32, device=torch.device("cpu"),
                             providers=["dense", "torch"], modes=["full"], repeats=args.repeats,
                             forward=args.forward)
            dense, sat = rows
            print(f"| {T} | {h} | {inter} | {rate} | {dense['median_ms']:.1f} | {sat['median_ms']:.1f} | "
                  f"{sat['ratio_to_dense']:.3f} | {sat['flop_limit']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
