"""CUDA backend of the SAT MLP (``backend="cuda"``): the compiled extension ``sat_kernels._C`` (``csrc/``).

- :mod:`.kernels`: ``torch.library`` custom ops over the extension's kernels (fused kept-set selection, row/column
  gathers and zero-filling scatters), each checking its tensors before it launches on the current CUDA stream.
- :mod:`.launcher`: the backend launcher: the torch backend's autograd op with these kernels in place of
  ``topk``/``sort``, ``index_select`` and ``index_copy_``; the GEMMs stay ``torch.mm`` (cuBLAS) on compact operands.

The extension is optional at install time (``setup.py`` builds it when ``nvcc`` is found; see ENVs.md). This module
imports neither the extension nor the kernels, so :func:`unavailable_reason` is cheap and safe without them.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

_extension = None


def load_extension():
    """The module ``sat_kernels._C``; raises ``RuntimeError`` saying how to get it when it is not built."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module("sat_kernels._C")
        except ImportError as exc:
            raise RuntimeError(
                f"the CUDA extension sat_kernels._C is not built ({exc}); reinstall with nvcc on PATH or CUDA_HOME "
                f"set, and SAT_KERNELS_FORCE_CUDA_BUILD=1 to see why a build fails (see ENVs.md)") from exc
    return _extension


def unavailable_reason() -> Optional[str]:
    """Why the CUDA backend cannot run here, or ``None`` when it can (extension built and a CUDA device)."""
    try:
        ext = load_extension()
    except RuntimeError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        version = ext.runtime_version()
        return (f"no CUDA device (torch.cuda.is_available() is False); the extension sat_kernels._C is built "
                f"(CUDA {version // 1000}.{version % 1000 // 10}, archs {ext.compiled_archs()})")
    return None
