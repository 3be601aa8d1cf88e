"""Forward+backward time of the SAT MLP (torch backend) vs the dense MLP (``F.linear``, autograd) on CPU, fp32 and bf16.

Arms (each one forward + backward of one ``[T, h]`` batch):

- ``dense``: the dense SwiGLU MLP as Hugging Face ``LlamaMLP`` runs it (``F.linear`` + autograd), the baseline;
- ``sat``: ``sk.sat_mlp(..., backend="torch")`` of this checkout at the omission rate, forward and backward mode
  asked;
- ``base``: the same call from the package as it was at ``--baseline REV`` (extracted with ``git archive`` and imported
  under another name), so a change is measured against its parent in the same run (``--backward sparse`` and
  ``dense_tokens`` rows).

With ``--lora-rank r`` the three arms are the LoRA MLP on a frozen base instead (adapters of rank ``r`` on gate, up
and down, gradients for ``x`` and the adapters): ``dense`` is the PEFT forward (``reference_lora_mlp``), ``sat`` and
``base`` run ``sat_lora_mlp``.

The arms run in turn, in an order reversed every round, so a slow phase of a shared machine hits all of them; each
figure is the median over rounds of the per-round ratio to ``dense``, printed beside the FLOP limit of
docs/design.md section 5: ``(4 + 14 rho) / 18`` sparse forward, ``(6 + 12 rho) / 18`` exact forward,
``(12 + 6 rho) / 18`` exact forward with ``--backward exact_input``, ``(6 + 12 rho + 12 (1 - rho) delta) / 18``
with ``--backward dense_tokens`` (``delta`` = ``--dense-fraction``, the share of tokens marked: a fixed random set,
or with ``--vary-marked`` a count that changes every call, cycling through 16 counts within 10% of it, as the loss
tokens of sft batches do);
on a frozen base ``(4 + 8 rho) / 12`` and ``(6 + 6 rho) / 12``. ``vs limit`` = ratio / limit (1.0: as fast as the
FLOPs allow). ``exact_input`` and ``dense_tokens`` rows are made for the exact forward only.

    python benchmarks/cpu_mlp_speed.py --dtype bf16 fp32 --forward sparse dense --threads 1
    python benchmarks/cpu_mlp_speed.py --forward dense --backward sparse exact_input --shapes 2048x576x1536
    python benchmarks/cpu_mlp_speed.py --forward dense --backward sparse dense_tokens --dense-fraction 0.28
    python benchmarks/cpu_mlp_speed.py --baseline HEAD~1 --out benchmarks/results/cpu_mlp_speed.json
    python benchmarks/cpu_mlp_speed.py --lora-rank 16 --shapes 2048x576x1536
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from baseline import load_baseline
from sat_kernels.bench.results import environment
from sat_kernels.ops.mlp import LoRA, dense_mlp, sat_lora_mlp
from sat_kernels.ops.reference import reference_lora_mlp
import sat_kernels as sk

SHAPES = ["2048x576x1536", "2048x640x2048", "1024x1024x2816"]   # SmolLM2-135M, Gemma 3 270M, a mid shape
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _base_lora(base):
    for name in ("sat_kernels_base.ops.mlp.lora", "sat_kernels_base.ops.sat_mlp_lora"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("the baseline has no LoRA MLP op")


def limit(rho: float, forward: str, lora: bool, backward: str = "sparse", dense_fraction: float = 0.0) -> float:
    if lora:
        return (4 + 8 * rho) / 12 if forward == "sparse" else (6 + 6 * rho) / 12
    if backward == "exact_input":
        return (12 + 6 * rho) / 18
    if backward == "dense_tokens":
        return (6 + 12 * rho + 12 * (1 - rho) * dense_fraction) / 18
    return (4 + 14 * rho) / 18 if forward == "sparse" else (6 + 12 * rho) / 18


def marked_masks(T: int, fraction: float, vary: bool, g: torch.Generator):
    """The token masks of ``--backward dense_tokens``: one random set of ``round(fraction * T)`` tokens, or 16 sets
    whose counts spread over 10% of it (``vary``), used in turn."""
    counts = [round(fraction * T * (0.9 + 0.2 * i / 15)) for i in range(16)] if vary else [round(fraction * T)]
    masks = []
    for n in counts:
        m = torch.zeros(T, dtype=torch.bool)
        m[torch.randperm(T, generator=g)[:min(n, T)]] = True
        masks.append(m)
    return masks


def make_arms(T, h, inter, rate, forward, dtype, lora_rank, base, backward="sparse", dense_fraction=0.0,
              vary_marked=False):
    """``{arm: step()}``: each step runs one forward + backward and drops the gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, h, generator=g).to(dtype)
    ws = [(torch.randn(*s, generator=g) * s[1] ** -0.5).to(dtype) for s in ((inter, h), (inter, h), (h, inter))]
    dy = torch.randn(T, h, generator=g).to(dtype)
    k = sk.num_kept(inter, rate)
    if lora_rank:
        adapters = tuple(LoRA((torch.randn(lora_rank, fin, generator=g) * fin ** -0.5).to(dtype).requires_grad_(),
                              (torch.randn(fout, lora_rank, generator=g) * 0.02).to(dtype).requires_grad_(), 2.0)
                         for fin, fout in ((h, inter), (h, inter), (inter, h)))
        leaves = [x.requires_grad_()] + [t for a in adapters for t in (a.a, a.b)]
        fns = {"dense": lambda: reference_lora_mlp(x, *ws, adapters),
               "sat": lambda: sat_lora_mlp(x, *ws, adapters, k, forward=forward)}
        if base is not None:
            mod = _base_lora(base)
            base_adapters = tuple(mod.LoRA(*a) for a in adapters)
            fns["base"] = lambda: mod.sat_lora_mlp(x, *ws, base_adapters, k, forward=forward)
    else:
        leaves = [x.requires_grad_()] + [w.requires_grad_() for w in ws]
        fns = {"dense": lambda: dense_mlp(x, *ws)}
        if backward == "dense_tokens":
            masks = marked_masks(T, dense_fraction, vary_marked, g)

            def marked_call(op):   # each arm walks through the masks in the same order
                turn = itertools.cycle(masks)
                return lambda: op(x, *ws, rate, backend="torch", forward=forward, backward=backward,
                                  dense_token_mask=next(turn))
            fns["sat"] = marked_call(sk.sat_mlp)
            if base is not None:
                fns["base"] = marked_call(base.sat_mlp)
        else:
            fns["sat"] = lambda: sk.sat_mlp(x, *ws, rate, backend="torch", forward=forward, backward=backward)
            if base is not None and backward == "sparse":
                fns["base"] = lambda: base.sat_mlp(x, *ws, rate, backend="torch", forward=forward)

    def step(fn):
        def run():
            torch.autograd.grad(fn(), leaves, dy)
        return run
    return {name: step(fn) for name, fn in fns.items()}, k


def measure(arms, repeats: int, warmup: int = 2):
    """Median ms per arm and median per-round ratio to ``dense``, arms in an order reversed every round."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            arms[name]()
            samples[name].append(1e3 * (time.perf_counter() - t0))
    ms = {name: statistics.median(s) for name, s in samples.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(s, samples["dense"])) for name, s in samples.items()}
    return ms, ratio


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="TxHxI, e.g. 2048x576x1536")
    p.add_argument("--forward", nargs="+", choices=["sparse", "dense"], default=["sparse", "dense"])
    p.add_argument("--backward", nargs="+", choices=["sparse", "exact_input", "dense_tokens"], default=["sparse"],
                   help="MLP backward modes (exact_input, dense_tokens: with the dense forward only; not with "
                        "--lora-rank)")
    p.add_argument("--dense-fraction", type=float, default=0.28,
                   help="dense_tokens: the share of the tokens marked (default 0.28, the loss tokens of sat-train's "
                        "packed sft data)")
    p.add_argument("--vary-marked", action="store_true",
                   help="dense_tokens: change the marked count at every call (16 counts within 10%% of the fraction)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA MLP on a frozen base with adapters of this rank")
    p.add_argument("--baseline", default=None, help="git revision whose sat_mlp is timed in the same rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows and the environment to this JSON file")
    args = p.parse_args(argv)
    if args.lora_rank and args.backward != ["sparse"]:
        p.error("--backward exact_input / dense_tokens do not apply to the LoRA MLP (--lora-rank)")
    if not 0.0 <= args.dense_fraction <= 1.0:
        p.error(f"--dense-fraction must be in [0, 1], got {args.dense_fraction}")
    torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline) if args.baseline else None
    env = dict(environment(torch.device("cpu")), threads=args.threads,
               baseline=args.baseline, lora_rank=args.lora_rank, repeats=args.repeats,
               dense_fraction=args.dense_fraction, vary_marked=args.vary_marked)
    print(f"# {env['device']}, bf16 ISA {env['cpu_bf16']}, torch {env['torch']}, git {env['git']}, "
          f"median of {args.repeats} rounds" + (f", LoRA r{args.lora_rank}" if args.lora_rank else ""))
    cols = "| dtype | T | h | I | omission | forward | backward | dense ms | SAT ms | SAT/dense | limit | vs limit |"
    print(cols + (" base/dense | base vs limit |" if base else ""))
    print("|---" * (cols.count("|") - 1 + (2 if base else 0)) + "|")
    rows = []
    for dname in args.dtype:
        for shape in args.shapes:
            T, h, inter = (int(v) for v in shape.split("x"))
            for rate in args.rates:
                for forward, backward in [(f, b) for f in args.forward for b in args.backward
                                          if b == "sparse" or f == "dense"]:
                    arms, k = make_arms(T, h, inter, rate, forward, DTYPES[dname], args.lora_rank, base, backward,
                                        args.dense_fraction, args.vary_marked)
                    ms, ratio = measure(arms, args.repeats)
                    delta = round(args.dense_fraction * T) / T if backward == "dense_tokens" else 0.0
                    lim = limit(k / inter, forward, bool(args.lora_rank), backward, delta)
                    row = dict(dtype=dname, T=T, h=h, I=inter, omission=rate, forward=forward, backward=backward,
                               k=k, dense_fraction=delta, dense_ms=ms["dense"], sat_ms=ms["sat"],
                               ratio=ratio["sat"], limit=lim, vs_limit=ratio["sat"] / lim)
                    line = (f"| {dname} | {T} | {h} | {inter} | {rate} | {forward} | {backward} | "
                            f"{ms['dense']:.1f} | {ms['sat']:.1f} | {ratio['sat']:.3f} | {lim:.3f} | "
                            f"{ratio['sat'] / lim:.3f} |")
                    if "base" in ms:
                        row.update(base_ms=ms["base"], base_ratio=ratio["base"])
                        line += f" {ratio['base']:.3f} | {ratio['base'] / lim:.3f} |"
                    elif base:
                        line += " - | - |"
                    rows.append(row)
                    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
