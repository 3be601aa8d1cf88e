"""Backend registry and dispatch.

A backend is a launcher with the signature of :func:`sat_kernels.ops.mlp.function.sat_mlp_torch`:
``(x2 [T, h], w_gate [I, h], w_up [I, h], w_down [h, I], select, act, forward) -> (y [T, h], idx [k])`` where
``select`` is a sorted index tensor or a :class:`~sat_kernels.ops.selector.Selector` that picks the kept set from the
full activations, and ``forward`` is ``"sparse"`` or ``"dense"`` (the exact forward output).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .ops.mlp.cuda import unavailable_reason as _cuda_unavailable_reason
from .ops.mlp.function import sat_mlp_torch
from .ops.mlp.triton import unavailable_reason as _triton_unavailable_reason

BACKENDS = ("auto", "torch", "triton", "cuda")

_LAUNCHERS: Dict[str, Callable] = {"torch": sat_mlp_torch}
_MISSING: Dict[str, str] = {}


def _register_triton() -> None:
    """Register the Triton launcher where it can run (CUDA + triton, or TRITON_INTERPRET=1), else the reason."""
    reason = _triton_unavailable_reason()
    if reason is None:
        try:
            from .ops.mlp.triton.launcher import sat_mlp_triton
        except Exception as exc:  # a broken triton install must not break `import sat_kernels`
            reason = f"triton failed to import: {type(exc).__name__}: {exc}"
        else:
            _LAUNCHERS["triton"] = sat_mlp_triton
            return
    _MISSING["triton"] = reason


_register_triton()


def _register_cuda() -> None:
    """Register the CUDA-extension launcher where it can run (sat_kernels._C built, a CUDA device), else the reason.

    Not in "auto": the cuda backend has not been measured on a GPU yet."""
    reason = _cuda_unavailable_reason()
    if reason is None:
        from .ops.mlp.cuda.launcher import sat_mlp_cuda
        _LAUNCHERS["cuda"] = sat_mlp_cuda
    else:
        _MISSING["cuda"] = reason


_register_cuda()

# Measured fwd+bwd time of the triton backend over the torch backend, keyed on (torch.cuda.get_device_name(), dtype):
# "auto" picks triton on CUDA where the ratio is below 1. Entries must come from a GPU run of
# benchmarks/triton_mlp_speed.py (its "triton_over_torch" ratios), committed with the GPU, versions and date. Empty:
# the Triton kernels have not been measured on a GPU yet, so "auto" is the torch backend everywhere.
_AUTO_TRITON_OVER_TORCH: Dict[Tuple[str, torch.dtype], float] = {}


def available_backends() -> List[str]:
    """Backends usable in this installation, e.g. ``["torch"]``. See :func:`unavailable_backends` for the others."""
    return list(_LAUNCHERS)


def unavailable_backends() -> Dict[str, str]:
    """Known backends that are not usable here, each with the reason."""
    return dict(_MISSING)


def resolve_backend(backend: str, x: Optional[torch.Tensor] = None) -> Callable:
    """The launcher for ``backend``; raises if it is unknown or unusable here.

    ``"auto"`` picks the fastest usable backend for ``x``'s device, dtype and shape.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if (_AUTO_TRITON_OVER_TORCH and "triton" in _LAUNCHERS and x is not None and x.is_cuda
                and _AUTO_TRITON_OVER_TORCH.get((torch.cuda.get_device_name(x.device), x.dtype), 1.0) < 1.0):
            return _LAUNCHERS["triton"]
        return _LAUNCHERS["torch"]
    if backend not in _LAUNCHERS:
        raise ValueError(f"backend {backend!r} is not available: {_MISSING[backend]}; "
                         f"available: {available_backends()}")
    return _LAUNCHERS[backend]
