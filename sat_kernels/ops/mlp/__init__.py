"""The SAT SwiGLU MLP op.

- :mod:`.interface`: the public functions (``sat_mlp``, ``gathered_mlp``, ``neuron_scores``), their checks and the
  backend dispatch;
- :mod:`.function`: the autograd Function (forward over all neurons, backward over the kept ones) and the torch
  backend's index operations;
- :mod:`.lora`: the same op on projections that carry PEFT LoRA adapters;
- ``triton/`` and ``cuda/``: the other backends (GPU).
"""
from .function import ACTIVATIONS, SATMLPFunction, dense_mlp
from .interface import check_backward, check_indices, check_mlp_inputs, gathered_mlp, mlp_selector, neuron_scores, \
    sat_mlp, sat_mlp_kept
from .lora import LoRA, lora_backward_reason, sat_lora_mlp

__all__ = ["sat_mlp", "sat_mlp_kept", "gathered_mlp", "neuron_scores", "sat_lora_mlp", "LoRA", "SATMLPFunction",
           "dense_mlp", "ACTIVATIONS", "check_mlp_inputs", "check_indices", "check_backward", "mlp_selector",
           "lora_backward_reason"]
