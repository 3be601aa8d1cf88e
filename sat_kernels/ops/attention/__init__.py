"""The SAT attention-head op.

- :mod:`.interface`: the public functions (``sat_attention``, ``gathered_attention``, ``head_scores``), the unit
  scores and the selection;
- :mod:`.layout`: the static description of a call (:class:`~.layout.AttentionSpec`) and the index arithmetic of
  heads and KV groups in token-major ``[B, T, heads, d]`` tensors;
- :mod:`.rope_norm`: RoPE and the per-head RMSNorm (Qwen3), forward and backward;
- :mod:`.core`: masks and the attention core (torch's fused CPU flash attention or explicit softmax), forward and
  backward;
- :mod:`.function`: the autograd op (forward over all heads, backward over the kept heads only) and the dense path;
- :mod:`.checks`: argument validation.
"""
from .interface import DEFAULT_UNIT, UNITS, gathered_attention, head_scores, sat_attention, sat_attention_kept, \
    unit_scores

__all__ = ["sat_attention", "sat_attention_kept", "gathered_attention", "head_scores", "unit_scores", "UNITS",
           "DEFAULT_UNIT"]
