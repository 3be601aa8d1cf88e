"""sat_kernels: Sparsity-Accelerated Training (SAT) kernels for Llama-family models.

SAT scores the intermediate neurons of every MLP in each training step, keeps the most important ones and runs the
rest of the forward and the whole backward over them only. See README.md for usage.
"""
from .accumulation import hold_selection
from .backends import available_backends, unavailable_backends
from .budget import PerLayerBudget
from .modules import SATMLP, SATAttention, sat_modules
from .optim import skip_omitted_updates
from .ops import gathered_attention, gathered_mlp, head_scores, neuron_scores, sat_attention, sat_mlp
from .patching import PatchSummary, patch_summary, replace_attention, replace_mlp, revert, set_omission_rate
from .schedules import ConstantOmissionScheduler, LadderOmissionScheduler, LinearOmissionScheduler
from .selection import num_kept, select_neurons
from .stats import sat_stats

__version__ = "0.1.0"

__all__ = [
    "sat_mlp", "gathered_mlp", "neuron_scores", "sat_attention", "gathered_attention", "head_scores",
    "replace_attention", "SATAttention", "select_neurons", "num_kept", "available_backends",
    "unavailable_backends", "replace_mlp", "set_omission_rate", "revert", "patch_summary", "PatchSummary", "SATMLP",
    "LadderOmissionScheduler", "ConstantOmissionScheduler", "LinearOmissionScheduler", "SATCallback", "sat_stats",
    "skip_omitted_updates", "PerLayerBudget", "sat_modules", "hold_selection",
]


def __getattr__(name):
    if name == "SATCallback":  # needs transformers: imported on first use only
        from .integrations import SATCallback
        return SATCallback
    raise AttributeError(f"module 'sat_kernels' has no attribute {name!r}")
