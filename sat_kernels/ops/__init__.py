"""The SAT ops, one package per operation: :mod:`.mlp` and :mod:`.attention` (each: public functions, autograd
Function, backends), the :mod:`.selector` they share and the fp64 references in :mod:`.reference`."""
from .attention import gathered_attention, head_scores, sat_attention, sat_attention_kept
from .mlp import LoRA, gathered_mlp, neuron_scores, sat_lora_mlp, sat_mlp, sat_mlp_kept
from .selector import Selection, Selector

__all__ = ["sat_mlp", "sat_mlp_kept", "gathered_mlp", "neuron_scores", "sat_lora_mlp", "LoRA", "sat_attention",
           "sat_attention_kept", "gathered_attention", "head_scores", "Selection", "Selector"]
