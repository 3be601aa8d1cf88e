"""MLP microbenchmarks: forward / backward / forward+backward, providers side by side in one run.

Providers (every one computes a SwiGLU MLP of the same shape):

- ``dense``: ``F.linear`` + autograd, what Hugging Face ``LlamaMLP`` runs (the baseline of every ratio);
- ``dense_k``: a dense MLP with intermediate size ``k`` (the speed of light of any sparse method);
- ``masked``: dense, scores + selection, activations multiplied by a 0/1 mask (shows that masking saves nothing);
- ``torch``, ``triton``, ``cuda``: ``sat_kernels.sat_mlp`` on that backend (those usable here);
- ``liger``: Liger-Kernel's fused SiLU*mul between cuBLAS GEMMs, dense (CUDA, when ``liger-kernel`` is installed).

LoRA mode (``lora_rank``): frozen base weights with LoRA adapters of rank ``r`` on gate, up and down
(``W x + s B (A x)``, ``s = 2``), gradients for ``x`` and the adapters only. Providers: ``dense`` (the PEFT forward
with ``F.linear`` + autograd, :func:`sat_kernels.ops.reference.reference_lora_mlp`), ``dense_k`` (the same with
intermediate size ``k``) and ``torch`` (:func:`sat_kernels.ops.mlp.lora.sat_lora_mlp`, the LoRA path of a SAT
module).

FLOPs per mode, ``rho = k / I``: dense fwd 6, bwd 12, full 18 (x ``T*h*I``); SAT fwd ``4 + 2 rho``, bwd
``12 rho``, full ``4 + 14 rho``; dense_k ``rho`` times dense. On a frozen base (LoRA; the adapter GEMMs,
``O(T*r*(h + I))``, left out) the backward is ``dx`` only: dense bwd 6, full 12; SAT bwd ``6 rho``, full
``4 + 8 rho``. With ``forward="dense"`` the SAT forward is 6. ``limit`` is the SAT/dense FLOP ratio of the mode
(docs/design.md section 5); ``vs_limit`` = measured ratio / limit (1.0 = as fast as the FLOPs allow).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import sat_kernels as sk
from sat_kernels.ops.reference import reference_lora_mlp
from sat_kernels.ops.mlp.function import act_fwd, dense_mlp
from sat_kernels.ops.mlp.lora import LoRA, sat_lora_mlp
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
LORA_PROVIDERS = ("dense", "dense_k", "torch")   # the SAT LoRA path runs on the torch backend only


def flops(provider: str, mode: str, T: int, h: int, inter: int, k: int, forward: str = "sparse",
          lora: bool = False) -> float:
    """FLOPs of ``provider`` in ``mode`` (docs/design.md section 5); ``forward`` is the SAT providers' forward mode,
    ``lora``: a frozen base (no weight gradients; adapter GEMMs left out)."""
    rho = k / inter
    bwd = 6.0 if lora else 12.0
    dense = {"fwd": 6.0, "bwd": bwd, "full": 6.0 + bwd}[mode]
    if provider in SAT_PROVIDERS:
        fwd = 4 + 2 * rho if forward == "sparse" else 6.0
        per = {"fwd": fwd, "bwd": bwd * rho, "full": fwd + bwd * rho}[mode]
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


def available_providers(device: torch.device, lora: bool = False) -> List[str]:
    if lora:
        return list(LORA_PROVIDERS)
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


def _lora_provider(name: str, x, ws, adapters, k: int, metric: str, forward: str):
    wg, wu, wd = ws
    tensors = [x, *ws, *(t for lora in adapters for t in (lora.a, lora.b))]
    if name == "dense":
        return (lambda: reference_lora_mlp(x, wg, wu, wd, adapters)), tensors
    if name == "dense_k":
        gate, up, down = adapters
        small = [wg[:k].clone(), wu[:k].clone(), wd[:, :k].contiguous()]
        small_adapters = (gate._replace(b=gate.b[:k].detach().clone().requires_grad_()),
                          up._replace(b=up.b[:k].detach().clone().requires_grad_()),
                          down._replace(a=down.a[:, :k].detach().contiguous().requires_grad_()))
        return ((lambda: reference_lora_mlp(x, *small, small_adapters)),
                [x, *small, *(t for lora in small_adapters for t in (lora.a, lora.b))])
    if name == "torch":
        return (lambda: sat_lora_mlp(x, wg, wu, wd, adapters, k, metric=metric, forward=forward)), tensors
    raise ValueError(f"provider {name!r} has no LoRA mode; LoRA providers: {list(LORA_PROVIDERS)}")


def make_provider(name: str, x, ws, rate: float, k: int, metric: str = "l2", forward: str = "sparse",
                  adapters: Optional[Tuple[LoRA, LoRA, LoRA]] = None) -> Tuple[Callable, List[torch.Tensor]]:
    """``(forward callable returning y, its input, weights and adapters)`` for provider ``name``; those that
    require grad receive gradients. ``adapters``: LoRA on gate, up, down (the LoRA mode; base weights frozen)."""
    if adapters is not None:
        return _lora_provider(name, x, ws, adapters, k, metric, forward)
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


def selection_ms(T: int, inter: int, k: int, dtype, device, repeats: int, clock: str = "wall") -> float:
    """Median time of scoring (``l2`` over ``[T, I]``) + top-k selection, as the torch backend runs them."""
    a = torch.randn(T, inter, dtype=dtype, device=device)
    fn = lambda: select_neurons(activation_scores(a, "l2"), k)  # noqa: E731
    stats, _ = bench({"select": fn}, device, repeats, clock)
    return stats["select"][0]


def _randn(gen, *shape, dtype, device, requires_grad: bool):
    """``randn / sqrt(fan_in)`` (the last dimension), a leaf tensor."""
    return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) / shape[-1] ** 0.5).requires_grad_(
        requires_grad)


def run_shape(T: int, h: int, inter: int, rate: float, *, dtype, device, providers: Sequence[str],
              modes: Sequence[str], repeats: int, shape_name: str = "", seed: int = 0,
              forward: str = "sparse", lora_rank: Optional[int] = None, clock: str = "wall") -> List[Dict]:
    """Benchmark every provider and mode at one shape and rate; returns one row per (provider, mode).
    ``forward`` is the SAT providers' forward mode (``"sparse"`` or ``"dense"``); ``lora_rank``: the LoRA mode
    (frozen base, adapters of this rank on gate, up and down, scaling 2); ``clock``: the CPU clock
    (:func:`sat_kernels.bench.timing.bench_cpu_interleaved`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    lora = lora_rank is not None
    ws = [_randn(gen, *s, dtype=dtype, device=device, requires_grad=not lora)
          for s in ((inter, h), (inter, h), (h, inter))]
    adapters = None
    if lora:
        adapters = tuple(LoRA(_randn(gen, lora_rank, fan_in, dtype=dtype, device=device, requires_grad=True),
                              _randn(gen, fan_out, lora_rank, dtype=dtype, device=device, requires_grad=True), 2.0)
                         for fan_in, fan_out in ((h, inter), (h, inter), (inter, h)))
    dy = torch.randn(T, h, generator=gen, device=device, dtype=dtype)
    k = num_kept(inter, rate)
    made = {p: make_provider(p, x, ws, rate, k, forward=forward, adapters=adapters) for p in providers}
    rows = []
    sel_ms = selection_ms(T, inter, k, dtype, device, repeats, clock) if rate > 0 else 0.0
    for mode in modes:
        fns = {p: _timed(mode, fwd, leaves, dy) for p, (fwd, leaves) in made.items()}
        stats, ratios = bench(fns, device, repeats, clock)
        dense_flops = flops("dense", mode, T, h, inter, k, lora=lora)
        for p in providers:
            med, p20, p80 = stats[p]
            fl = flops(p, mode, T, h, inter, k, forward, lora)
            limit = flops("torch", mode, T, h, inter, k, forward, lora) / dense_flops
            row = {"shape": shape_name, "T": T, "h": h, "I": inter, "k": k, "omission_rate": rate,
                   "dtype": str(dtype).replace("torch.", ""), "provider": p, "mode": mode, "forward": forward,
                   "lora_rank": lora_rank, "clock": clock if device.type == "cpu" else "cuda", "median_ms": med,
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
