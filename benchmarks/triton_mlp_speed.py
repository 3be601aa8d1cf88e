"""GPU speed of the Triton backend at the Llama-2-7B MLP shape: whole op and every kernel, side by side.

Not measured on GPU yet: no number from this script is quoted anywhere until it has been run on a GPU and its JSON
committed under benchmarks/results/ with the GPU name, versions and date.

For each omission rate it reports, from ``triton.testing.do_bench`` (median and 20/80 percentiles, ms):

- forward + backward of the dense MLP (``F.linear`` + autograd, what Hugging Face ``LlamaMLP`` runs), of
  ``sat_mlp(backend="torch")`` (gathers + cuBLAS) and of ``sat_mlp(backend="triton")``; the SAT/dense ratios next to
  the FLOP limit ``(4 + 14 rho) / 18`` (docs/design.md section 5) and ``triton_over_torch`` (the ratio that
  ``sat_kernels.backends._AUTO_TRITON_OVER_TORCH`` takes);
- every Triton kernel of the step alone, its TFLOP/s and the TFLOP/s of a cuBLAS ``torch.mm`` of the same size
  (``vs_cublas`` = ours / cuBLAS; 1.0 = as fast as a dense GEMM of that shape); the down GEMMs both with the compact
  ``w_down[:, S]`` (the default, its gather copy included) and with the in-kernel gather through the index;
- scoring + selection (reduce the fused partials, top-k, sort) as a share of the triton step.

Usage (GPU only)::

    python benchmarks/triton_mlp_speed.py --out triton_mlp_speed.json     # Markdown table on stdout
"""
import argparse
import datetime
import json
import sys

import torch


def _bench(fn):
    """(median, p20, p80) in ms."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return [float(v) for v in do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])]


def _fwd_bwd(forward, leaves, dy):
    def run():
        torch.autograd.grad(forward(), leaves, dy)
    return run


def _gemm_rows(T, h, inter, idx, dtype):
    """One row per Triton kernel: (name, callable, FLOPs, cuBLAS callable of the same GEMM(s)) at kept set ``idx``,
    each launched as the backend launches it (kept count padded to a multiple of 16, see ops/triton/utils.py)."""
    from sat_kernels.ops.mlp.triton import down, gate_up
    from sat_kernels.ops.mlp.triton.launcher import compact_w_down, kept_positions
    from sat_kernels.ops.mlp.triton.utils import padded_index

    k = idx.numel()
    idx_p = padded_index(idx)
    pos, omitted = kept_positions(idx, inter)
    dev = "cuda"
    x = torch.randn(T, h, device=dev, dtype=dtype)
    wg, wu = (torch.randn(inter, h, device=dev, dtype=dtype) / h ** 0.5 for _ in range(2))
    wd = torch.randn(h, inter, device=dev, dtype=dtype) / inter ** 0.5
    dy = torch.randn(T, h, device=dev, dtype=dtype)
    g, u, _, _ = gate_up.gate_up_fwd(x, wg, wu, score="l2")
    g_s, u_s, a_s = gate_up.kept_act_fwd(g, u, idx_p)
    dg_s, du_s, _ = down.down_bwd(dy, wd, idx_p, g_s, u_s)
    # cuBLAS references: the same GEMM (M, N, K and operand layouts) on contiguous compact operands
    a_c, dg_c = a_s[:, :k].contiguous(), dg_s[:, :k].contiguous()
    wd_c, wg_c = wd[:, idx].contiguous(), wg[idx].contiguous()

    def compact():
        return compact_w_down(wd, idx_p, k)

    def twice(f):
        return lambda: (f(), f())

    return [
        ("gate_up_fwd+scores [T,h]x[h,I] x2", lambda: gate_up.gate_up_fwd(x, wg, wu, score="l2"), 4 * T * h * inter,
         twice(lambda: torch.mm(x, wg.t()))),
        ("gate_up_fwd kept rows [T,h]x[h,k] x2", lambda: gate_up.gate_up_fwd(x, wg, wu, idx=idx_p, store_a=True),
         4 * T * h * k, twice(lambda: torch.mm(x, wg_c.t()))),
        ("kept_act_fwd (compaction, memory-bound)", lambda: gate_up.kept_act_fwd(g, u, idx_p), 0, None),
        ("down_fwd compact [T,k]x[k,h] (+gather copy)", lambda: down.down_fwd(a_s, compact(), None), 2 * T * k * h,
         lambda: torch.mm(a_c, wd_c.t())),
        ("down_fwd in-kernel gather [T,k]x[k,h]", lambda: down.down_fwd(a_s, wd, idx_p), 2 * T * k * h,
         lambda: torch.mm(a_c, wd_c.t())),
        ("down_bwd compact dA+SwiGLU [T,h]x[h,k] (+gather copy)", lambda: down.down_bwd(dy, compact(), None, g_s, u_s),
         2 * T * h * k, lambda: torch.mm(dy, wd_c)),
        ("down_bwd in-kernel gather dA+SwiGLU [T,h]x[h,k]", lambda: down.down_bwd(dy, wd, idx_p, g_s, u_s),
         2 * T * h * k, lambda: torch.mm(dy, wd_c)),
        ("down_weight_bwd [h,T]x[T,k] (+scatter to [h,I])", lambda: down.down_weight_bwd(dy, a_s, pos), 2 * T * h * k,
         lambda: torch.mm(dy.t(), a_c)),
        ("gate_up_weight_bwd [k,T]x[T,h] x2", lambda: gate_up.gate_up_weight_bwd(dg_s, du_s, x, idx_p, omitted, inter),
         4 * T * h * k, twice(lambda: torch.mm(dg_c.t(), x))),
        ("gate_up_input_bwd [T,k]x[k,h] x2", lambda: gate_up.gate_up_input_bwd(dg_s, du_s, wg, wu, idx_p),
         4 * T * h * k, twice(lambda: torch.mm(dg_c, wg_c))),
    ]


def run(T, h, inter, rates, dtype):
    import triton

    import sat_kernels as sk
    from sat_kernels.ops.mlp.function import dense_mlp

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, h, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    ws = [(torch.randn(*s, device="cuda", dtype=dtype, generator=gen) / s[1] ** 0.5).requires_grad_()
          for s in ((inter, h), (inter, h), (h, inter))]
    dy = torch.randn(T, h, device="cuda", dtype=dtype, generator=gen)
    leaves = [x, *ws]
    dense = _bench(_fwd_bwd(lambda: dense_mlp(x, *ws), leaves, dy))
    results = []
    for rate in rates:
        k = sk.num_kept(inter, rate)
        rho = k / inter
        times = {"dense": dense}
        for backend in ("torch", "triton"):
            times[backend] = _bench(_fwd_bwd(lambda b=backend: sk.sat_mlp(x, *ws, rate, backend=b), leaves, dy))
        scores = torch.rand(inter, device="cuda")
        part = torch.rand(T // 64, inter, device="cuda", dtype=torch.float64)
        select_ms = _bench(lambda: sk.select_neurons(part.sum(0).sqrt_(), k))
        idx = sk.select_neurons(scores, k)
        gemms = []
        for name, fn, flops, ref in _gemm_rows(T, h, inter, idx, dtype):
            ms = _bench(fn)
            row = {"kernel": name, "ms": ms}
            if flops:
                ref_ms = _bench(ref)
                row.update(tflops=flops / ms[0] * 1e-9, cublas_ms=ref_ms, cublas_tflops=flops / ref_ms[0] * 1e-9,
                           vs_cublas=ref_ms[0] / ms[0])
            gemms.append(row)
        results.append({
            "omission_rate": rate, "k": k, "fwd_bwd_ms": times,
            "sat_over_dense": {b: times[b][0] / dense[0] for b in ("torch", "triton")},
            "flop_limit": (4 + 14 * rho) / 18, "triton_over_torch": times["triton"][0] / times["torch"][0],
            "selection_ms": select_ms, "selection_share_of_triton_step": select_ms[0] / times["triton"][0],
            "kernels": gemms,
        })
    return {
        "benchmark": "triton_mlp_speed", "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "dtype": str(dtype).replace("torch.", ""), "T": T, "h": h, "I": inter,
        "results": results,
    }


def markdown(report) -> str:
    head = (f"SAT MLP fwd+bwd, {report['gpu']}, {report['dtype']}, T={report['T']} h={report['h']} I={report['I']}, "
            f"torch {report['torch']}, triton {report['triton']}, {report['date']} (median ms [p20, p80])")
    lines = [head, "", "| omission | dense ms | torch ms | triton ms | torch/dense | triton/dense | FLOP limit | "
             "triton/torch | selection share |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"  # noqa: E731
    for r in report["results"]:
        t = r["fwd_bwd_ms"]
        lines.append(f"| {r['omission_rate']} | {fmt(t['dense'])} | {fmt(t['torch'])} | {fmt(t['triton'])} | "
                     f"{r['sat_over_dense']['torch']:.3f} | {r['sat_over_dense']['triton']:.3f} | "
                     f"{r['flop_limit']:.3f} | {r['triton_over_torch']:.3f} | "
                     f"{100 * r['selection_share_of_triton_step']:.2f}% |")
    for r in report["results"]:
        lines += ["", f"Kernels at omission {r['omission_rate']} (k = {r['k']})", "",
                  "| kernel | ms | TFLOP/s | cuBLAS TFLOP/s (same size) | vs cuBLAS |", "|---|---|---|---|---|"]
        for g in r["kernels"]:
            if "tflops" in g:
                lines.append(f"| {g['kernel']} | {fmt(g['ms'])} | {g['tflops']:.0f} | {g['cublas_tflops']:.0f} | "
                             f"{g['vs_cublas']:.2f} |")
            else:
                lines.append(f"| {g['kernel']} | {fmt(g['ms'])} | | | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report to this path")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_mlp_speed.py needs a CUDA GPU (it times the compiled Triton kernels); "
                 "none is visible here. The CPU figures are in benchmarks/cpu_mlp_speed.py.")
    import sat_kernels as sk

    if "triton" not in sk.available_backends():
        sys.exit(f"the triton backend is not available: {sk.unavailable_backends()['triton']}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    report = run(args.tokens, args.hidden, args.intermediate, args.rates, dtype)
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
