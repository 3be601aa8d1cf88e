"""SAT modules: drop-in replacements that reuse the parameters of the Hugging Face modules they replace."""
from __future__ import annotations

import torch
from torch import nn

from .ops import sat_mlp
from .selection import check_omission_rate


class SATMLP(nn.Module):
    """A SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) that omits neurons while training.

    It holds the very ``nn.Linear`` modules of the MLP it wraps under the same names, so parameter names, shapes and
    ``state_dict`` keys are unchanged. In ``eval()`` mode, or at omission rate 0, it calls the original module's own
    forward: the computation is exactly the dense one. In training mode it runs :func:`sat_kernels.sat_mlp` (grad mode
    is deliberately not consulted, so a reentrant checkpoint's no-grad first pass selects like its recompute).

    Args:
        mlp: the module to wrap (kept, unregistered, for eval and for :func:`sat_kernels.revert`).
        act: ``"silu"`` or ``"gelu_tanh"``, the activation of ``mlp.act_fn``.
        omission_rate, metric, strategy, backend: as in :func:`sat_kernels.sat_mlp`.
        sync_selection: as in :func:`sat_kernels.sat_mlp`, but ``None`` (auto) by default: under DDP/FSDP every rank
            keeps the neurons chosen from the global batch.
    """

    def __init__(self, mlp: nn.Module, act: str, omission_rate: float = 0.5, *, metric: str = "l2",
                 strategy: str = "topk", backend: str = "auto", sync_selection=None):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.__dict__["dense_module"] = mlp  # not a submodule: its parameters are the three above
        self.train(mlp.training)
        self.act = act
        self.omission_rate = check_omission_rate(omission_rate)
        self.metric = metric
        self.strategy = strategy
        self.backend = backend
        self.sync_selection = sync_selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.omission_rate == 0.0:
            return self.dense_module(x)
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(self, name)
            if not isinstance(proj, nn.Linear) or proj.bias is not None:
                raise TypeError(f"SATMLP.{name} must be a bias-free nn.Linear, got {type(proj).__name__}; adapters "
                                f"such as PEFT LoRA on the MLP are not supported: revert(model) before adding them")
            if type(proj.weight).__name__ == "DTensor":
                raise ValueError(f"SATMLP.{name}.weight is a sharded DTensor: fully_shard the decoder layers (or the "
                                 f"MLP module), not the projections inside the MLP, whose own forward SAT bypasses")
        return sat_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.omission_rate,
                       metric=self.metric, strategy=self.strategy, act=self.act, backend=self.backend,
                       sync_selection=self.sync_selection)

    def extra_repr(self) -> str:
        return (f"omission_rate={self.omission_rate}, metric={self.metric!r}, strategy={self.strategy!r}, "
                f"act={self.act!r}, backend={self.backend!r}")
