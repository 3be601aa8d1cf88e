"""Triton backend of the SAT MLP (``backend="triton"``).

Kernels, one module per projection, each with its launchers:

- :mod:`.gate_up`: ``G = x W_gate^T``, ``U = x W_up^T`` in one kernel with ``act(G) * U`` and the per-neuron fp64 score
  partials (one per 64 rows, whatever the tile config) in the epilogue; the compaction of the kept columns; the
  backward GEMMs of the gate/up projections (``dW_gate[S]``, ``dW_up[S]`` in one kernel, ``dx`` in one kernel with
  row-gathered weights).
- :mod:`.down`: the down projection over the kept neurons and its backward (``dA_S = dy W_down[:, S]`` with the SwiGLU
  backward in the epilogue, ``dW_down[:, S]``).
- :mod:`.launcher`: the ``torch.library`` custom ops, their autograd formula and the backend launcher.

This module itself does not import triton, so :func:`unavailable_reason` is cheap and safe without it.
"""
import importlib.util
import os
from typing import Optional

import torch


def interpreting() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET=1``, read by triton when it is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> Optional[str]:
    """Why the Triton backend cannot run here, or ``None`` when it can (CUDA + triton, or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU in the interpreter)"
    return None
