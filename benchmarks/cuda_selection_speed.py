"""Speed of the CUDA extension's selection, gather and scatter kernels against torch, on one GPU.

Selection (fp32 scores of one layer, k = n/2, sorted int64 indices): the fused kernel vs ``torch.topk`` + ``torch.sort``
(what the torch backend runs), at the MLP widths of Llama-2-7B (11008), Llama-3-8B (14336) and Llama-2-70B (28672);
also 32 rows in one launch (one per layer) and ``strategy="sample"`` (vs ``rand`` + Gumbel + topk + sort). Two
timings per provider: ``gpu_us``, device time of one call from a CUDA graph of 50 calls (no Python or launch
overhead; the goal is <= 20 us per layer), and ``eager_us``, the time per call of 50 back-to-back eager calls
(includes the Python and dispatch overhead when the host is the bottleneck).

Gathers and scatters (bf16, Llama-3-8B MLP: T=8192 tokens, h=4096, I=14336, k=7168): achieved bandwidth (bytes read +
written / time) of the kernels and of the torch ops they replace, against the device copy bandwidth measured in the
same run (``dst.copy_(src)`` of 1 GiB).

Medians with 20th/80th percentiles over repeats. Writes JSON to ``--out`` and prints a Markdown table. GPU only.

    python benchmarks/cuda_selection_speed.py --out results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from typing import Callable, Dict, List

import torch


def quantiles(xs: List[float]) -> Dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20": q[0], "median": q[1], "p80": q[2]}


def time_eager(fn: Callable[[], object], calls: int = 50, repeats: int = 15) -> Dict[str, float]:
    """Microseconds per call of ``calls`` back-to-back eager calls (CUDA events around the loop)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1000.0 / calls)
    return quantiles(out)


def time_graph(fn: Callable[[], object], calls: int = 50, repeats: int = 15) -> Dict[str, float]:
    """Microseconds per call of device time: ``calls`` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1000.0 / calls)
    return quantiles(out)


def torch_topk_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k, dim=-1, sorted=False).indices, dim=-1).values


def torch_sample(scores: torch.Tensor, k: int) -> torch.Tensor:
    u = torch.rand_like(scores)
    keys = torch.log(scores) - torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
    return torch_topk_sort(keys, k)


def bench_selection(kernels, widths, rows_multi: int) -> List[Dict]:
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for n in widths:
        k = n // 2
        for nrows in (1, rows_multi):
            scores = torch.rand(nrows, n, device="cuda", generator=gen) + 0.01
            s_in = scores[0] if nrows == 1 else scores
            stable = torch.sort(torch.sort(s_in, dim=-1, descending=True, stable=True).indices[..., :k], dim=-1)
            if not torch.equal(kernels.select_kept(s_in, k), stable.values):
                raise RuntimeError(f"selection differs from a stable sorted top-k at n={n}, rows={nrows}")
            entry = {"n": n, "k": k, "rows": nrows, "strategy": "topk",
                     "ours_gpu_us": time_graph(lambda: kernels.select_kept(s_in, k)),
                     "torch_gpu_us": time_graph(lambda: torch_topk_sort(s_in, k)),
                     "ours_eager_us": time_eager(lambda: kernels.select_kept(s_in, k)),
                     "torch_eager_us": time_eager(lambda: torch_topk_sort(s_in, k))}
            rows.append(entry)
        s1 = torch.rand(n, device="cuda", generator=gen) + 0.01
        rows.append({"n": n, "k": k, "rows": 1, "strategy": "sample",
                     "ours_eager_us": time_eager(lambda: kernels.select_kept(s1, k, strategy="sample")),
                     "torch_eager_us": time_eager(lambda: torch_sample(s1, k))})
    return rows


def copy_bandwidth() -> float:
    """GB/s of ``dst.copy_(src)`` on 1 GiB (read + write counted)."""
    src = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = time_eager(lambda: dst.copy_(src), calls=5, repeats=9)["median"]
    return 2 * src.numel() * src.element_size() / (t * 1e-6) / 1e9


def bench_gather_scatter(kernels, tokens: int, hidden: int, inter: int) -> List[Dict]:
    k = inter // 2
    dt = torch.bfloat16
    gen = torch.Generator("cuda").manual_seed(1)
    idx = torch.sort(torch.randperm(inter, device="cuda", generator=gen)[:k]).values
    a = torch.randn(tokens, inter, device="cuda", dtype=dt)           # G / U / A            [T, I]
    w = torch.randn(inter, hidden, device="cuda", dtype=dt)           # W_gate / W_up        [I, h]
    wd = torch.randn(hidden, inter, device="cuda", dtype=dt)          # W_down               [h, I]
    gr = torch.randn(k, hidden, device="cuda", dtype=dt)              # dW_gate[S]           [k, h]
    gc = torch.randn(hidden, k, device="cuda", dtype=dt)              # dW_down[:, S]        [h, k]
    es = a.element_size()
    cases = [
        ("gather_cols A[:, S]", lambda: kernels.gather_cols(a, idx), lambda: a.index_select(1, idx),
         2 * tokens * k * es),
        ("gather_rows W_gate[S]", lambda: kernels.gather_rows(w, idx), lambda: w.index_select(0, idx),
         2 * k * hidden * es),
        ("gather_cols W_down[:, S]", lambda: kernels.gather_cols(wd, idx), lambda: wd.index_select(1, idx),
         2 * hidden * k * es),
        ("scatter_rows dW_gate", lambda: kernels.scatter_rows(gr, idx, inter),
         lambda: gr.new_zeros(inter, hidden).index_copy_(0, idx, gr), (k + inter) * hidden * es),
        ("scatter_cols dW_down", lambda: kernels.scatter_cols(gc, idx, inter),
         lambda: gc.new_zeros(hidden, inter).index_copy_(1, idx, gc), hidden * (k + inter) * es),
    ]
    out = []
    for name, ours, ref, nbytes in cases:
        if not torch.equal(ours(), ref()):
            raise RuntimeError(f"{name}: kernel result differs from torch")
        t_ours = time_eager(ours, calls=10, repeats=9)["median"]
        t_ref = time_eager(ref, calls=10, repeats=9)["median"]
        out.append({"op": name, "bytes": nbytes, "ours_us": t_ours, "torch_us": t_ref,
                    "ours_GBps": nbytes / (t_ours * 1e-6) / 1e9, "torch_GBps": nbytes / (t_ref * 1e-6) / 1e9})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--widths", type=int, nargs="+", default=[11008, 14336, 28672])
    parser.add_argument("--rows", type=int, default=32, help="rows (layers) of the multi-row selection")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_selection_speed.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    from sat_kernels.ops.mlp import cuda as cuda_ops

    try:
        cuda_ops.load_extension()
    except RuntimeError as exc:
        print(f"cuda_selection_speed.py: {exc}", file=sys.stderr)
        return 2
    from sat_kernels.ops.mlp.cuda import kernels

    ext = cuda_ops.load_extension()
    result = {
        "benchmark": "cuda_selection_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "extension_cuda_runtime": ext.runtime_version(), "extension_archs": ext.compiled_archs(),
        "python": platform.python_version(),
        "selection": bench_selection(kernels, args.widths, args.rows),
        "copy_GBps": copy_bandwidth(),
        "gather_scatter": bench_gather_scatter(kernels, args.tokens, args.hidden, args.inter),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    print(f"GPU {result['gpu']}, torch {result['torch']} (CUDA {result['torch_cuda']}), {result['date']}\n")
    print("| n | k | rows | strategy | ours GPU us | torch GPU us | ours eager us | torch eager us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["selection"]:
        g = lambda key: f"{r[key]['median']:.1f}" if key in r else "-"  # noqa: E731
        print(f"| {r['n']} | {r['k']} | {r['rows']} | {r['strategy']} | {g('ours_gpu_us')} | {g('torch_gpu_us')} | "
              f"{g('ours_eager_us')} | {g('torch_eager_us')} |")
    print(f"\ndevice copy bandwidth: {result['copy_GBps']:.0f} GB/s (bf16, T={args.tokens}, h={args.hidden}, "
          f"I={args.inter}, k={args.inter // 2})\n")
    print("| op | ours GB/s | torch GB/s | ours / copy |")
    print("|---|---|---|---|")
    for r in result["gather_scatter"]:
        share = r['ours_GBps'] / result['copy_GBps']
        print(f"| {r['op']} | {r['ours_GBps']:.0f} | {r['torch_GBps']:.0f} | {share:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
