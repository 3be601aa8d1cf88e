"""Forward+backward time of the SAT MLP (torch backend) vs the dense MLP (``F.linear``, autograd), on CPU.

Dense and SAT runs are interleaved (dense, SAT, dense, SAT, ...) so both see the same machine state; the figure is the
median of the per-pair ratios SAT/dense, next to the FLOP limit of DESIGN.md section 5, ``(4 + 14 * rho) / 18``.

    python benchmarks/cpu_mlp_speed.py                # the two shapes of the README, omission 0.5
    python benchmarks/cpu_mlp_speed.py --rates 0.25 0.5 0.75 --repeats 15
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import sat_kernels as sk
from sat_kernels.ops.sat_mlp import dense_mlp

SHAPES = [(2048, 576, 1536), (1024, 1024, 2816)]


def _step(fn, x, ws, dy):
    for t in (x, *ws):
        t.grad = None
    y = fn(x, *ws)
    y.backward(dy)


def measure(T: int, h: int, inter: int, rate: float, repeats: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, h, generator=gen, dtype=dtype).requires_grad_()
    ws = [(torch.randn(*s, generator=gen, dtype=dtype) / h ** 0.5).requires_grad_()
          for s in ((inter, h), (inter, h), (h, inter))]
    dy = torch.randn(T, h, generator=gen, dtype=dtype)

    def dense(*a):
        return dense_mlp(*a)

    def sat(*a):
        return sk.sat_mlp(*a, rate, backend="torch")

    for fn in (dense, sat, dense, sat):   # warm-up
        _step(fn, x, ws, dy)
    times = {"dense": [], "sat": []}
    for _ in range(repeats):
        for name, fn in (("dense", dense), ("sat", sat)):
            t0 = time.perf_counter()
            _step(fn, x, ws, dy)
            times[name].append(time.perf_counter() - t0)
    ratios = [s / d for s, d in zip(times["sat"], times["dense"])]
    rho = sk.num_kept(inter, rate) / inter
    return {
        "T": T, "h": h, "I": inter, "omission_rate": rate, "dtype": str(dtype).replace("torch.", ""),
        "dense_ms": 1e3 * statistics.median(times["dense"]), "sat_ms": 1e3 * statistics.median(times["sat"]),
        "ratio": statistics.median(ratios), "flop_limit": (4 + 14 * rho) / 18,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--shapes", type=str, nargs="+", default=[f"{t}x{h}x{i}" for t, h, i in SHAPES],
                   help="TxHxI, e.g. 2048x576x1536")
    args = p.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| T | h | I | omission | dense ms | SAT ms | SAT/dense | FLOP limit |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        T, h, inter = (int(v) for v in shape.split("x"))
        for rate in args.rates:
            r = measure(T, h, inter, rate, args.repeats)
            print(f"| {T} | {h} | {inter} | {rate} | {r['dense_ms']:.1f} | {r['sat_ms']:.1f} | "
                  f"{r['ratio']:.3f} | {r['flop_limit']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
