"""The ``"torch"`` backend of SAT attention (:mod:`sat_kernels.ops.sat_attention` holds the public functions).

- :mod:`.layout`: the static description of a call (:class:`~.layout.AttentionSpec`) and the index arithmetic of
  heads and KV groups in token-major ``[B, T, heads, d]`` tensors;
- :mod:`.rope_norm`: RoPE and the per-head RMSNorm (Qwen3), forward and backward;
- :mod:`.core`: masks and the attention core (torch's fused CPU flash attention or explicit softmax), forward and
  backward;
- :mod:`.function`: the autograd op (forward over all heads, backward over the kept heads only) and the dense path;
- :mod:`.checks`: argument validation.
"""
