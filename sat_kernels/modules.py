"""SAT modules: drop-in replacements that reuse the parameters of the Hugging Face modules they replace."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .ops import sat_mlp
from .ops.sat_attention import DEFAULT_UNIT, UNITS, sat_attention_kept
from .selection import FORWARD_MODES, check_choice, check_omission_rate, num_kept

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


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


class SATAttention(nn.Module):
    """A Llama-style self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, optional ``q_norm``/``k_norm``)
    that omits heads while training.

    It holds the very submodules of the attention it wraps under the same names and in the same order, so parameter
    names, shapes and ``state_dict`` keys are unchanged. In ``eval()`` mode, at omission rate 0, or when the rate is
    too small to drop a unit, it calls the original module's own forward with the same arguments (KV cache and
    generation included): the computation is exactly the dense one. In training mode it runs
    :func:`sat_kernels.sat_attention` with the module's RoPE tables, mask and causality, as the module's
    ``config._attn_implementation`` (``"eager"`` or ``"sdpa"``) would apply them, and returns ``(output, None)``.

    Setting ``omission_rate`` (or ``unit``) computes the kept unit count ``k``, and the forward depends on ``k`` only:
    under ``torch.compile`` (``fullgraph=True`` included) a model recompiles once per distinct ``k``, not per rate.

    Args:
        attn: the module to wrap (kept, unregistered, for eval and for :func:`sat_kernels.revert`).
        num_heads, num_kv_heads, head_dim, scale, norm_eps: its layout (as :func:`sat_kernels.replace_attention`
            finds and checks it).
        omission_rate, metric, strategy, unit, backend: as in :func:`sat_kernels.sat_attention`.
        sync_selection: as in :class:`SATMLP`.
        forward: ``"sparse"`` or ``"dense"`` (exact forward output, sparse backward), as in
            :func:`sat_kernels.sat_attention`; stored as ``forward_mode``.
    """

    def __init__(self, attn: nn.Module, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 norm_eps: float = 1e-6, omission_rate: float = 0.5, metric: str = "l2", strategy: str = "topk",
                 unit: str = DEFAULT_UNIT, backend: str = "auto", sync_selection=None, forward: str = "sparse"):
        super().__init__()
        for name, child in attn.named_children():
            setattr(self, name, child)
        self.__dict__["dense_module"] = attn  # not a submodule: its parameters are those of the children above
        self.train(attn.training)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.norm_eps = scale, norm_eps
        self._unit = check_choice(unit, UNITS, "unit")
        self.omission_rate = omission_rate
        self.metric = metric
        self.strategy = strategy
        self.backend = backend
        self.sync_selection = sync_selection
        self.forward_mode = check_choice(forward, FORWARD_MODES, "forward")
        self.__dict__["_signature"] = inspect.signature(attn.forward)

    @property
    def omission_rate(self) -> float:
        return self._omission_rate

    @omission_rate.setter
    def omission_rate(self, rate: float) -> None:
        # The forward reads the int kept count only: under torch.compile a float attribute read in the forward
        # would recompile at every new rate (and become a symbolic float that check_omission_rate cannot test),
        # an int recompiles once per distinct k.
        self._omission_rate = check_omission_rate(rate)
        self._count_kept()

    @property
    def unit(self) -> str:
        return self._unit

    @unit.setter
    def unit(self, unit: str) -> None:
        self._unit = check_choice(unit, UNITS, "unit")
        self._count_kept()

    def _count_kept(self) -> None:
        self._units = self.num_heads if self._unit == "head" else self.num_kv_heads
        self._kept = num_kept(self._units, self._omission_rate)

    def forward(self, *args, **kwargs):
        if not self.training or self._kept == self._units:
            return self.dense_module(*args, **kwargs)
        dense = self.dense_module
        try:
            bound = self._signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"SATAttention: the arguments do not fit {type(dense).__name__}.forward: {e}") from None
        extra = dict(bound.pop("kwargs", {}))
        call = {**bound, **extra}
        config = getattr(dense, "config", None)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"SATAttention: attention implementation {impl!r} is not supported in training mode; "
                             f"use attn_implementation='sdpa' or 'eager'")
        if call.get("output_attentions", getattr(config, "output_attentions", False)):
            raise ValueError("SATAttention: output_attentions=True is not supported in training mode (omitted heads "
                             "have no attention weights); call model.eval() or set_omission_rate(model, attention=0)")
        if getattr(dense, "attention_dropout", 0.0):
            raise ValueError(f"SATAttention: attention_dropout={dense.attention_dropout} is not supported in "
                             f"training mode; set it to 0")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(self, name)
            if not isinstance(proj, nn.Linear):
                raise TypeError(f"SATAttention.{name} must be an nn.Linear, got {type(proj).__name__}; adapters such "
                                f"as PEFT LoRA on the attention are not supported: revert(model) before adding them")
            if type(proj.weight).__name__ == "DTensor":
                raise ValueError(f"SATAttention.{name}.weight is a sharded DTensor: fully_shard the decoder layers "
                                 f"(or the attention module), not the projections inside it")
        hidden_states = call.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError(f"SATAttention: hidden_states must be a [B, T, h] tensor, got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        position_embeddings = call.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError("SATAttention: position_embeddings (cos, sin) are required, as the decoder layers of "
                             "Llama/Mistral/Qwen2/Qwen3 pass them")
        cos, sin = position_embeddings
        mask = call.get("attention_mask")
        cache = next((call[n] for n in _CACHE_ARGS if call.get(n) is not None), None)
        layer_idx = getattr(dense, "layer_idx", None)
        if cache is not None and cache.get_seq_length(layer_idx or 0) > 0:
            raise ValueError("SATAttention: a training-mode forward continuing a non-empty KV cache is not supported; "
                             "generate in eval() mode")
        seq = hidden_states.shape[1]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] != seq:
            raise ValueError(f"SATAttention: attention_mask covers {mask.shape[-1]} keys for {seq} tokens (a static "
                             f"or pre-filled KV cache); training-mode SAT attention supports self-attention only")
        # causality as Hugging Face applies it: sdpa uses is_causal when no mask is given, eager relies on the mask
        is_causal = call.get("is_causal")
        if is_causal is None:
            is_causal = getattr(dense, "is_causal", True)
        causal = impl == "sdpa" and mask is None and seq > 1 and bool(is_causal)
        norm = getattr(self, "q_norm", None) is not None
        y, _, k_all, v_all = sat_attention_kept(
            hidden_states, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight,
            self._kept, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, cos=cos, sin=sin,
            attention_mask=mask, causal=causal, scale=self.scale, b_q=self.q_proj.bias, b_k=self.k_proj.bias,
            b_v=self.v_proj.bias, b_o=self.o_proj.bias, q_norm_weight=self.q_norm.weight if norm else None,
            k_norm_weight=self.k_norm.weight if norm else None, norm_eps=self.norm_eps, metric=self.metric,
            strategy=self.strategy, unit=self.unit, backend=self.backend, sync_selection=self.sync_selection,
            forward=self.forward_mode, return_kv=cache is not None)
        if cache is not None:
            cache.update(k_all, v_all, layer_idx)
        return y, None

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"omission_rate={self.omission_rate}, metric={self.metric!r}, strategy={self.strategy!r}, "
                f"unit={self.unit!r}, backend={self.backend!r}, forward={self.forward_mode!r}")
