"""MLP microbenchmarks: forward / backward / forward+backward, providers side by side in one run.

Providers (every one computes a SwiGLU MLP of the same shape):

- ``dense``: ``F.linear`` + autograd, what Hugging Face ``LlamaMLP`` runs (the baseline of every ratio);
- ``dense_k``: a dense MLP with intermediate size ``k`` (the speed of light of any sparse method);
- ``masked``: dense, scores + selection, activations multiplied by a 0/1 mask (shows that masking saves nothing);
- ``torch``, ``triton``, ``cuda``: ``sat_kernels.sat_mlp`` on that backend (those usable here);
- ``liger``: Liger-Kernel's fused SiLU*mul between cuBLAS GEMMs, dense (CUDA, when ``liger-kernel`` is installed).

FLOPs per mode, ``rho = k / I``: dense fwd 6, bwd 12, full 18 (x ``T*h*I``); SAT fwd ``4 + 2 rho``, bwd
``12 rho``, full ``4 + 14 rho``; dense_k ``rho`` times dense. ``limit`` is the SAT/dense FLOP ratio of the mode
(DESIGN.md section 5); ``vs_limit`` = measured ratio / limit (1.0 = as fast as the FLOPs allow).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import sat_kernels as sk
from sat_kernels.ops.sat_mlp import act_fwd, dense_mlp
from sat_kernels.selection import activation_scores, num_kept, select_neurons

from .timing import bench

SHAPES = {  # name: (h, I)
    "llama2-7b": (4096, 11008),
    "llama3-8b": (4096, 14336),
    "llama2-13b": (5120, 13824),
    "smollm2-135m": (576, 1536),
}
MODES = ("fwd", "bwd", "full")
SAT_PROVIDERS = ("torch", "triton", "cuda")


def flops(provider: str, mode: str, T: int, h: int, inter: int, k: int, forward: str = "sparse") -> float:
    """FLOPs of ``provider`` in ``mode`` (DESIGN.md section 5); ``forward`` is the SAT providers' forward mode."""
    rho = k / inter
    dense = {"fwd": 6.0, "bwd": 12.0, "full": 18.0}[mode]
    if provider in SAT_PROVIDERS:
        fwd = 4 + 2 * rho if forward == "sparse" else 6.0
        per = {"fwd": fwd, "bwd": 12 * rho, "full": fwd + 12 * rho}[mode]
    elif provider == "dense_k":
        per = dense * rho
    else:
        per = dense
    return per * T * h * inter


def _liger():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerSiLUMulFunction


def available_providers(device: torch.device) -> List[str]:
    names = ["dense", "dense_k", "masked"] + [b for b in SAT_PROVIDERS if b in sk.available_backends()]
    if device.type == "cuda" and _liger() is not None:
        names.append("liger")
    return names


def _masked_mlp(x, wg, wu, wd, k, metric):
    g, u = F.linear(x, wg), F.linear(x, wu)
    a = act_fwd(g, "silu") * u
    with torch.no_grad():
        idx = select_neurons(activation_scores(a.reshape(-1, a.shape[-1]), metric, wd), k)
        mask = torch.zeros(wg.shape[0], dtype=a.dtype, device=a.device).index_fill_(0, idx, 1)
    return F.linear(a * mask, wd)


def make_provider(name: str, x, ws, rate: float, k: int, metric: str = "l2",
                  forward: str = "sparse") -> Tuple[Callable, List[torch.Tensor]]:
    """``(forward callable returning y, leaf tensors that receive gradients)`` for provider ``name``."""
    wg, wu, wd = ws
    if name == "dense":
        return (lambda: dense_mlp(x, wg, wu, wd)), [x, *ws]
    if name == "dense_k":
        small = [wg[:k].detach().clone().requires_grad_(), wu[:k].detach().clone().requires_grad_(),
                 wd[:, :k].detach().clone().contiguous().requires_grad_()]
        return (lambda: dense_mlp(x, *small)), [x, *small]
    if name == "masked":
        return (lambda: _masked_mlp(x, wg, wu, wd, k, metric)), [x, *ws]
    if name in SAT_PROVIDERS:
        return (lambda: sk.sat_mlp(x, wg, wu, wd, rate, metric=metric, backend=name, forward=forward)), [x, *ws]
    if name == "liger":
        fn = _liger()
        return (lambda: F.linear(fn.apply(F.linear(x, wg), F.linear(x, wu)), wd)), [x, *ws]
    raise ValueError(f"unknown provider {name!r}")


def _timed(mode: str, forward: Callable, leaves: List[torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    def clear():
        for t in leaves:
            t.grad = None

    if mode == "fwd":
        return forward
    if mode == "full":
        def full():
            clear()
            forward().backward(dy)
        return full
    y = forward()

    def bwd():
        clear()
        y.backward(dy, retain_graph=True)
    return bwd


def saved_activation_bytes(forward: Callable, leaves: Sequence[torch.Tensor]) -> int:
    """Bytes the autograd graph keeps for backward, not counting the inputs and weights themselves."""
    inputs = {t.data_ptr() for t in leaves}
    seen = {}

    def pack(t):
        if t.data_ptr() not in inputs:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def selection_ms(T: int, inter: int, k: int, dtype, device, repeats: int) -> float:
    """Median time of scoring (``l2`` over ``[T, I]``) + top-k selection, as the torch backend runs them."""
    a = torch.randn(T, inter, dtype=dtype, device=device)
    fn = lambda: select_neurons(activation_scores(a, "l2"), k)  # noqa: E731
    stats, _ = bench({"select": fn}, device, repeats)
    return stats["select"][0]


def run_shape(T: int, h: int, inter: int, rate: float, *, dtype, device, providers: Sequence[str],
              modes: Sequence[str], repeats: int, shape_name: str = "", seed: int = 0,
              forward: str = "sparse") -> List[Dict]:
    """Benchmark every provider and mode at one shape and rate; returns one row per (provider, mode).
    ``forward`` is the SAT providers' forward mode (``"sparse"`` or ``"dense"``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    ws = [(torch.randn(*s, generator=gen, device=device, dtype=dtype) / s[1] ** 0.5).requires_grad_()
          for s in ((inter, h), (inter, h), (h, inter))]
    dy = torch.randn(T, h, generator=gen, device=device, dtype=dtype)
    k = num_kept(inter, rate)
    made = {p: make_provider(p, x, ws, rate, k, forward=forward) for p in providers}
    rows = []
    sel_ms = selection_ms(T, inter, k, dtype, device, repeats) if rate > 0 else 0.0
    for mode in modes:
        fns = {p: _timed(mode, fwd, leaves, dy) for p, (fwd, leaves) in made.items()}
        stats, ratios = bench(fns, device, repeats)
        dense_flops = flops("dense", mode, T, h, inter, k)
        for p in providers:
            med, p20, p80 = stats[p]
            fl = flops(p, mode, T, h, inter, k, forward)
            limit = flops("torch", mode, T, h, inter, k, forward) / dense_flops
            row = {"shape": shape_name, "T": T, "h": h, "I": inter, "k": k, "omission_rate": rate,
                   "dtype": str(dtype).replace("torch.", ""), "provider": p, "mode": mode, "forward": forward,
                   "median_ms": med,
                   "p20_ms": p20, "p80_ms": p80, "ratio_to_dense": ratios[p], "flop_limit": limit,
                   "vs_limit": ratios[p] / limit if p in SAT_PROVIDERS else None, "tflops": fl / (med * 1e-3) / 1e12}
            if mode == "full":
                fwd, leaves = made[p]
                row["saved_bytes"] = saved_activation_bytes(fwd, leaves)
                row["peak_bytes"] = peak_memory_bytes(fns[p], device)
                if p in SAT_PROVIDERS and rate > 0:
                    row["select_ms"] = sel_ms
                    row["select_share"] = sel_ms / med
            rows.append(row)
        del fns
    return rows
