"""Backend registry and dispatch.

A backend is a launcher with the signature of :func:`sat_kernels.ops.sat_mlp.sat_mlp_torch`:
``(x2 [T, h], w_gate [I, h], w_up [I, h], w_down [h, I], select, act) -> (y [T, h], idx [k])`` where ``select`` is a
sorted index tensor or a callable that picks the kept set from the full activations.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .ops.sat_mlp import sat_mlp_torch

BACKENDS = ("auto", "torch", "triton", "cuda")

_LAUNCHERS: Dict[str, Callable] = {"torch": sat_mlp_torch}
_MISSING: Dict[str, str] = {
    "triton": "the Triton kernels are not part of this version of sat_kernels",
    "cuda": "the CUDA extension (sat_kernels._C) is not part of this version of sat_kernels",
}


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
        # "torch" is the only backend in this version: it is the fastest usable one everywhere.
        return _LAUNCHERS["torch"]
    if backend not in _LAUNCHERS:
        raise ValueError(f"backend {backend!r} is not available: {_MISSING[backend]}; "
                         f"available: {available_backends()}")
    return _LAUNCHERS[backend]
