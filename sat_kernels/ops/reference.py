"""Plain masked-dense PyTorch reference of the SAT MLP, for tests and benchmarks.

Every backend must compute this function (within dtype tolerance). It multiplies the intermediate activations by a
0/1 mask over neurons, so autograd gives exactly zero gradient to omitted rows of ``W_gate``/``W_up`` and columns of
``W_down``. Call it on fp64 copies of the operands to get the ground truth.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..selection import activation_scores, num_kept, select_neurons


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return g * torch.sigmoid(g)
    if act == "gelu_tanh":
        c = (2.0 / torch.pi) ** 0.5
        return 0.5 * g * (1.0 + torch.tanh(c * (g + 0.044715 * g ** 3)))
    raise ValueError(f"act must be 'silu' or 'gelu_tanh', got {act!r}")


def reference_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  indices: Optional[torch.Tensor] = None, *, act: str = "silu") -> torch.Tensor:
    """``y = W_down (m * act(W_gate x) * (W_up x))`` with ``m`` the 0/1 mask of ``indices`` (all ones if ``None``)."""
    a = _act(F.linear(x, w_gate), act) * F.linear(x, w_up)
    if indices is not None:
        mask = torch.zeros(w_gate.shape[0], dtype=a.dtype, device=a.device)
        mask[indices] = 1
        a = a * mask
    return F.linear(a, w_down)


@torch.no_grad()
def reference_indices(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      omission_rate: float, *, metric: str = "l2", act: str = "silu") -> torch.Tensor:
    """The top-k kept set the SAT MLP must select, from scores computed in the operands' precision."""
    x2 = x.reshape(-1, x.shape[-1])
    a = _act(F.linear(x2, w_gate), act) * F.linear(x2, w_up)
    k = num_kept(w_gate.shape[0], omission_rate)
    return select_neurons(activation_scores(a, metric, w_down), k, strategy="topk")


def reference_sat_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      omission_rate: float, *, metric: str = "l2", act: str = "silu") -> torch.Tensor:
    """SAT MLP with top-k selection, as masked dense: the semantics every backend's ``sat_mlp`` must match."""
    idx = reference_indices(x, w_gate, w_up, w_down, omission_rate, metric=metric, act=act)
    return reference_mlp(x, w_gate, w_up, w_down, idx, act=act)
