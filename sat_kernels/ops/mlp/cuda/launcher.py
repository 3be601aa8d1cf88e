"""Launcher of the ``"cuda"`` backend: :class:`~sat_kernels.ops.mlp.function.SATMLPFunction` (the torch backend's
autograd op: forward over the kept neurons, backward over them only) on the kernels of ``sat_kernels._C``:

- selection: one fused launch (keys, radix select, sorted indices) instead of ``topk`` + ``sort``;
- gathers of kept columns of ``G``, ``U``, ``A``, ``W_down`` and kept rows of ``W_gate``/``W_up``: 16-byte kernels
  instead of ``index_select``;
- weight gradients: one kernel writes the whole zero-filled gradient with the kept rows/columns, instead of
  ``zeros`` + ``index_copy_``.

The six GEMMs stay ``torch.mm`` (cuBLAS) on the compact operands. Not measured on a GPU yet, so ``backend="auto"``
does not pick it.
"""
from __future__ import annotations

import torch

from ..function import SATMLPFunction
from . import kernels


class CudaIndexOps:
    """The index operations of :class:`SATMLPFunction` on the extension's kernels (operands made contiguous)."""

    @staticmethod
    def gather_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kernels.gather_rows(w.contiguous(), idx.contiguous())

    @staticmethod
    def gather_cols(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kernels.gather_cols(a.contiguous(), idx.contiguous())

    @staticmethod
    def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
        return kernels.scatter_rows(rows.contiguous(), idx.contiguous(), n)

    @staticmethod
    def scatter_cols(cols: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
        return kernels.scatter_cols(cols.contiguous(), idx.contiguous(), n)

    select_neurons = staticmethod(kernels.select_neurons)


def sat_mlp_cuda(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, select, act: str,
                 forward: str = "sparse"):
    """Launcher of the cuda backend: ``x2`` is ``[T, h]`` on a CUDA device; returns ``(y [T, h], idx [k])``."""
    if x2.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x2.device}; use backend='torch' or 'auto'")
    return SATMLPFunction.apply(x2, w_gate, w_up, w_down, select, act, CudaIndexOps, forward)
