"""sat_kernels: Sparsity-Accelerated Training (SAT) kernels for Llama-family models.

See README.md for the API and DESIGN.md for the semantics. Public names are stable.
"""
from .backends import available_backends, unavailable_backends
from .ops import gathered_mlp, neuron_scores, sat_mlp
from .selection import num_kept, select_neurons

__version__ = "0.1.0"

__all__ = [
    "sat_mlp", "gathered_mlp", "neuron_scores", "select_neurons", "num_kept", "available_backends",
    "unavailable_backends",
]
