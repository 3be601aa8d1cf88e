"""SAT modules: drop-in replacements that reuse the parameters of the Hugging Face modules they replace."""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .lora import lora_parts, peft_adapter
from .ops.attention import DEFAULT_UNIT, UNITS, sat_attention_kept
from .ops.mlp import check_backward, lora_backward_reason, sat_lora_mlp, sat_mlp_kept
from .ops.selector import SelectionHold
from .selection import DEFAULT_BACKWARD, DEFAULT_FORWARD, FORWARD_MODES, check_choice, check_omission_rate, num_kept
from .tokens import DEFAULT_SCORE_TOKENS, SCORE_TOKENS, ModelTokens

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


def class_path(obj) -> str:
    """``module.QualifiedName`` of ``obj``'s class: PEFT's LoRA layer is also called ``Linear``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


SUPPORTED_SHARDING = ("SAT training supports DDP, FSDP2 (fully_shard on the decoder layers), FSDP1 with the decoder "
                      "layers as its wrapping units, and DeepSpeed ZeRO-1/2/3 (ZeRO-3 in eager mode, not under "
                      "torch.compile)")

_ADAPTER_ADVICE = {
    "SATMLP": "use PEFT LoRA (which SAT supports on the MLP), put these adapters on the attention projections only, "
              "or train the MLP dense with set_omission_rate(model, mlp=0.0)",
    "SATAttention": "revert(model) and patch the MLP alone with replace_mlp, or train the attention dense with "
                    "set_omission_rate(model, attention=0.0)",
}


def check_zero3_weight(owner: str, name: str, weight: torch.Tensor) -> None:
    """Refuse a DeepSpeed ZeRO-3 parameter (one with a ``ds_id``) that is not whole where SAT reads it.

    Outside a forward a ZeRO-3 parameter is an empty partition. In an eager forward of the DeepSpeed engine's model
    DeepSpeed gathers a partitioned parameter as soon as it is read (its ``ZeROOrderedDict`` of module parameters)
    and registers it with the module whose forward runs (here the SAT module), whose backward gathers it again: so
    the weights SAT reads in its own forward are whole there, and the gradients SAT returns for them reach
    DeepSpeed's partitioned gradients (docs/distributed.md). ``torch.compile`` skips that gathering (the reads are
    traced, not run), and so does a call of a submodule outside the engine's forward before its first step.
    """
    tracing = torch.compiler.is_compiling()
    if not tracing and getattr(getattr(weight, "ds_status", None), "name", None) == "AVAILABLE" \
            and weight.numel() == getattr(weight, "ds_numel", -1):
        return
    why = ("it is traced by torch.compile, which skips DeepSpeed's gathering" if tracing else
           f"it was not gathered for this forward: {getattr(weight, 'ds_status', None)}, {weight.numel()} of "
           f"{getattr(weight, 'ds_numel', '?')} elements here")
    raise ValueError(f"{owner}.{name}.weight is a DeepSpeed ZeRO-3 parameter that SAT cannot read whole here ({why}). "
                     f"SAT reads it without calling {name}; under ZeRO-3 DeepSpeed gathers such reads only in an "
                     f"eager forward of the engine's model, which torch.compile skips: run SAT without torch.compile "
                     f"(no engine.compile(), no torch.compile of the model or its layers) and call the model or the "
                     f"engine, not one of its submodules; or train this module dense (set_omission_rate(model, 0.0), "
                     f"whose projections gather their own weights); {SUPPORTED_SHARDING}")


def check_projection(owner: str, name: str, proj: nn.Module) -> None:
    """Refuse, for a training-mode SAT forward, a projection whose weight SAT cannot use directly.

    SAT reads ``proj.weight`` without calling ``proj``: the projection must be exactly ``torch.nn.Linear`` (not a
    wrapper that changes what its forward computes: a PEFT adapter, a quantized or parametrized linear) and its weight
    must be whole here. Sharding that gathers a module's parameters only in that module's own forward hooks is
    refused: FSDP2 or FSDP1 units at the projections. FSDP1/FSDP2 units at the decoder layers (or the SAT module)
    gather the weights before SAT reads them; DeepSpeed ZeRO-3 gathers them when SAT reads them in an eager forward
    of the engine's model (:func:`check_zero3_weight` refuses the rest, ``torch.compile`` included).
    """
    weight = getattr(proj, "weight", None)
    if type(weight).__name__ == "DTensor":
        raise ValueError(f"{owner}.{name}.weight is a sharded DTensor: fully_shard the decoder layers (or the "
                         f"{owner} module), not the projections inside it, whose own forward SAT bypasses; "
                         f"{SUPPORTED_SHARDING}")
    if type(proj).__name__ == "FullyShardedDataParallel":
        raise ValueError(f"{owner}.{name} is an FSDP1 unit of its own (FullyShardedDataParallel): its parameters are "
                         f"gathered only when it is called, and SAT reads its weight without calling it. Make the "
                         f"decoder layers the wrapping units (auto_wrap_policy=ModuleWrapPolicy({{decoder layer "
                         f"class}}), FSDP's transformer_based_wrap in accelerate), not nn.Linear; {SUPPORTED_SHARDING}")
    if hasattr(weight, "ds_id"):
        check_zero3_weight(owner, name, weight)
    adapter = peft_adapter(proj)
    if adapter is not None:
        raise TypeError(f"{owner}.{name} is a {adapter} layer ({class_path(proj)}); training-mode SAT does not "
                        f"support {adapter} adapters on these projections: {_ADAPTER_ADVICE[owner]} (eval() runs "
                        f"the adapters)")
    if type(proj) is not nn.Linear:
        raise TypeError(f"{owner}.{name} must be an nn.Linear (exactly torch.nn.Linear), got {class_path(proj)}; SAT "
                        f"reads its weight without calling it, so wrapped or quantized projections are not supported")
    if weight.numel() == 0:
        raise ValueError(f"{owner}.{name}.weight is empty ({tuple(weight.shape)}): a partitioned parameter that is "
                         f"gathered only when {name} itself is called, which SAT does not do; {SUPPORTED_SHARDING}")


@torch._dynamo.disable
def _in_autograd_function_forward() -> bool:
    """Whether the caller runs inside the forward of a custom ``torch.autograd.Function``: a reentrant activation
    checkpoint's first pass (``torch.utils.checkpoint(..., use_reentrant=True)``, and any checkpoint written as an
    autograd Function, the pattern of DeepSpeed's and Megatron's), which runs the wrapped function with grad mode off
    and runs it again with grad mode on in its backward. Found by walking the Python stack for a
    ``forward(ctx, ...)`` frame whose ``ctx`` is an autograd node; torch sets no flag there. Under ``torch.compile``
    this is a graph break (dynamo does not trace the stack walk); the call is only made in training-mode forwards with
    grad mode off, and dynamo traces a checkpoint inside a compiled region with grad mode on."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "forward" and code.co_argcount and code.co_varnames[0] == "ctx"
                and isinstance(frame.f_locals.get("ctx"), torch.autograd.function.BackwardCFunction)):
            return True
        frame = frame.f_back
    return False


class _SATWrapper(nn.Module):
    """Base of the SAT modules: holds the children of the wrapped module under the same names and keeps the wrapped
    module itself (unregistered: its parameters are those of the children) for eval and for :func:`revert`.

    It also keeps what :func:`sat_kernels.sat_stats` reads: the selection statistics of the last training forward
    (device tensors, :meth:`_record`) and the number of non-finite unit scores since patching, accumulated on the
    device of the weights without a host sync. A subclass implements ``_count_kept`` (sets ``_units`` and ``_kept``:
    the units of selection and the kept count at ``_omission_rate``) and names in ``_STATS_PROJ`` the child whose
    weight's device the counter follows.

    The tokens a training forward scores come from ``_tokens``, the :class:`~sat_kernels.tokens.ModelTokens` hook of
    the model that ``replace_mlp`` / ``replace_attention`` patched (``None`` for a module built by hand: every token
    counts), as the module's ``score_tokens`` asks.
    """

    _STATS_PROJ: str

    def __init__(self, wrapped: nn.Module, children):
        super().__init__()
        for name, child in children:
            setattr(self, name, child)
        self.__dict__["_wrapped"] = wrapped
        self.train(wrapped.training)
        self._last_stats = None
        self._nonfinite_total = torch.zeros((), dtype=torch.int64, device=self._stats_device())
        self._nonfinite_warned = False
        self._keep_scores = False   # keep a copy of the last scores (set by sat_kernels.budget.PerLayerBudget)
        self._tokens: Optional[ModelTokens] = None
        self._hold: Optional[SelectionHold] = None   # set while sat_kernels.hold_selection holds this module
        self._dense_tokens_warned = False   # SATMLP, backward="dense_tokens" without labels: warned once

    def configure(self, omission_rate: float, *, metric: str, strategy: str, backend: str, sync_selection,
                  forward: str, score_tokens: str = DEFAULT_SCORE_TOKENS) -> None:
        """Set the selection settings both SAT modules share (the constructors' keywords of the same names; ``forward``
        is stored as ``forward_mode``). ``replace_mlp`` / ``replace_attention`` call it again on a patched model."""
        self.omission_rate = omission_rate
        self.metric, self.strategy, self.backend, self.sync_selection = metric, strategy, backend, sync_selection
        self.forward_mode = check_choice(forward, FORWARD_MODES, "forward")
        self.score_tokens = score_tokens

    @property
    def score_tokens(self) -> str:
        """``"real"``, ``"loss"`` or ``"all"``: the tokens of the model's batch the scores cover
        (:mod:`sat_kernels.tokens`)."""
        return self._score_tokens

    @score_tokens.setter
    def score_tokens(self, score_tokens: str) -> None:
        self._score_tokens = check_choice(score_tokens, SCORE_TOKENS, "score_tokens")

    def _token_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bool mask of the tokens of ``x`` this training forward scores, or ``None`` for every token."""
        tokens = self._tokens
        return None if tokens is None else tokens.mask(self.score_tokens, type(self).__name__, x)

    def _runs_dense(self) -> bool:
        """Whether this forward runs the wrapped module: in ``eval()``, and in training mode when grad mode is off
        (``torch.no_grad()``, ``torch.inference_mode()``: no backward to accelerate; TRL's DPO reference pass and
        GRPO rollouts) outside the first pass of a reentrant activation checkpoint, which must select as its
        recompute with grad mode on will (the loss of ``forward="sparse"``, the RNG draws of ``"sample"``)."""
        if not self.training:
            return True
        return not torch.is_grad_enabled() and not _in_autograd_function_forward()

    def _stats_device(self) -> torch.device:
        return getattr(self, self._STATS_PROJ).weight.device

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

    def _count_kept(self) -> None:
        raise NotImplementedError

    def _apply(self, *args, **kwargs):
        super()._apply(*args, **kwargs)
        # the counter follows the weights (.to(), .cuda(), to_empty()); a meta counter starts again from zero
        device = self._stats_device()
        total = self._nonfinite_total
        self._nonfinite_total = torch.zeros_like(total, device=device) if total.is_meta else total.to(device)
        return self

    def _record(self, stats: dict) -> None:
        """Keep the statistics of this training forward (the ``stats`` the op filled; ``{}`` when every unit was kept
        and nothing scored) for sat_kernels.sat_stats and the per-layer budget, detached, on the device."""
        if not stats:
            self._last_stats = {"kept": self._units, "kept_mass": 1.0, "nonfinite": 0}
            return
        self._last_stats = {key: value.detach() if isinstance(value, torch.Tensor) else value
                            for key, value in stats.items()}
        self._nonfinite_total = self._nonfinite_total + self._last_stats["nonfinite"]

    def train(self, mode: bool = True):
        """Set training mode here and in the wrapped module, whose forward runs in eval (and may read
        ``self.training``)."""
        super().train(mode)
        self.__dict__["_wrapped"].train(mode)
        return self

    @property
    def dense_module(self) -> nn.Module:
        """The wrapped module, with this module's current children put back into it first.

        Adapters added after patching (PEFT's ``get_peft_model``, ``PeftModel.from_pretrained``) or removed
        (``merge_and_unload``) replace the children of the SAT module, which is where they are found by name; the
        wrapped module then runs (eval, rate 0) and :func:`revert` returns them, never a stale original.
        """
        wrapped = self.__dict__["_wrapped"]
        for name, child in self._modules.items():
            if name in wrapped._modules and wrapped._modules[name] is not child:
                setattr(wrapped, name, child)
        return wrapped


class SATMLP(_SATWrapper):
    """A SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) that omits neurons while training.

    It holds the very ``nn.Linear`` modules of the MLP it wraps under the same names, so parameter names, shapes and
    ``state_dict`` keys are unchanged. In ``eval()`` mode, at a rate that keeps every neuron (0), or in training mode
    with grad mode off (``torch.no_grad()``: no backward to accelerate, e.g. TRL's DPO reference pass and GRPO
    rollouts) it calls the original module's own forward: the computation is exactly the dense one, and no selection
    is recorded. In training mode with grad mode on it runs :func:`sat_kernels.sat_mlp`, and so it does in the no-grad
    first pass of a reentrant activation checkpoint, which selects like its recompute (same loss, same draws). When
    projections are PEFT LoRA layers (added before or after patching) it runs
    the SAT MLP with their active adapters (:mod:`sat_kernels.ops.mlp.lora`): selection from the adapted
    activations, the adapters' gradients over the kept neurons, no gradient for the frozen base.

    Setting ``omission_rate`` computes the kept count ``k``, and the forward depends on ``k`` only: under
    ``torch.compile`` (``fullgraph=True`` included) a model recompiles once per distinct ``k``, not per rate. A
    ladder schedule visits a few ``k``; a linear one a new ``k`` at almost every step, which soon reaches dynamo's
    ``recompile_limit`` (8; with ``fullgraph=True`` that is an error).

    Args:
        mlp: the module to wrap (kept, unregistered, for eval and for :func:`sat_kernels.revert`).
        act: ``"silu"`` or ``"gelu_tanh"``, the activation of ``mlp.act_fn``.
        omission_rate, metric, strategy, backend: as in :func:`sat_kernels.sat_mlp`.
        sync_selection: as in :func:`sat_kernels.sat_mlp`, but ``None`` (auto) by default: under DDP/FSDP every rank
            keeps the neurons chosen from the global batch.
        forward: ``"dense"`` (default: exact forward output, sparse backward) or ``"sparse"``, as in
            :func:`sat_kernels.sat_mlp`; stored as ``forward_mode``.
        backward: ``"sparse"`` (default), ``"exact_input"`` (with ``forward="dense"``: the dense input gradient,
            weight gradients of the kept neurons only) or ``"dense_tokens"`` (with ``forward="dense"``: the tokens
            whose logits enter the loss, the ``score_tokens="loss"`` tokens of :mod:`sat_kernels.tokens`, take the
            dense backward, every other token the sparse one; a forward without ``labels`` marks every real token,
            so its backward is dense, and warns once), as in :func:`sat_kernels.sat_mlp`; neither of the last two
            on PEFT LoRA projections. Stored as ``backward_mode``.
        score_tokens: which tokens of the model's batch the neuron scores cover: ``"real"`` (default: not the
            padding), ``"loss"`` (the tokens whose logits enter the loss) or ``"all"``; see :mod:`sat_kernels.tokens`.
            The masks come from the model patched by :func:`sat_kernels.replace_mlp`; a module built by hand and
            called outside such a model scores every token.
    """

    _STATS_PROJ = "gate_proj"

    def __init__(self, mlp: nn.Module, act: str, omission_rate: float = 0.5, *, metric: str = "l2",
                 strategy: str = "topk", backend: str = "auto", sync_selection=None,
                 forward: str = DEFAULT_FORWARD, backward: str = DEFAULT_BACKWARD,
                 score_tokens: str = DEFAULT_SCORE_TOKENS):
        super().__init__(mlp, ((name, getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")))
        self.act = act
        self.configure(omission_rate, metric=metric, strategy=strategy, backend=backend,
                       sync_selection=sync_selection, forward=forward, backward=backward,
                       score_tokens=score_tokens)

    def configure(self, omission_rate: float, *, metric: str, strategy: str, backend: str, sync_selection,
                  forward: str, backward: str = DEFAULT_BACKWARD,
                  score_tokens: str = DEFAULT_SCORE_TOKENS) -> None:
        """The shared settings (:meth:`_SATWrapper.configure`) and ``backward``, stored as ``backward_mode``, checked
        against ``forward`` and ``backend`` first."""
        check_backward(backward, forward, backend, strategy)
        super().configure(omission_rate, metric=metric, strategy=strategy, backend=backend,
                          sync_selection=sync_selection, forward=forward, score_tokens=score_tokens)
        self.backward_mode = backward

    def _count_kept(self) -> None:
        self._units = self.gate_proj.out_features
        self._kept = num_kept(self._units, self._omission_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_dense():
            return self.dense_module(x)
        if self._kept == self._units:
            self._record({})
            return self.dense_module(x)
        weights, adapters = [], []
        for name in ("gate_proj", "up_proj", "down_proj"):
            base, adapter = lora_parts(f"SATMLP.{name}", getattr(self, name))
            check_projection("SATMLP", name, base)
            if base.bias is not None:
                raise TypeError(f"SATMLP.{name} must be a bias-free nn.Linear, got one with a bias")
            weights.append(base.weight)
            adapters.append(adapter)
        stats = {"scores": None} if self._keep_scores else {}   # scores: for a PerLayerBudget
        mask = self._token_mask(x)
        if all(adapter is None for adapter in adapters):
            dense = self._dense_token_mask(x) if self.backward_mode == "dense_tokens" else None
            y = sat_mlp_kept(x, *weights, self._kept, metric=self.metric, strategy=self.strategy, act=self.act,
                             backend=self.backend, sync_selection=self.sync_selection, forward=self.forward_mode,
                             backward=self.backward_mode, stats=stats, token_mask=mask, hold=self._hold,
                             dense_token_mask=dense)
        else:
            if self.backward_mode != "sparse":
                names = [name for name, adapter in zip(("gate_proj", "up_proj", "down_proj"), adapters) if adapter]
                raise ValueError(f"SATMLP: backward={self.backward_mode!r} is not supported with PEFT LoRA adapters "
                                 f"(on {', '.join(names)}): {lora_backward_reason(self.backward_mode)}; use "
                                 f"replace_mlp(..., backward='sparse')")
            if self.backend not in ("auto", "torch"):
                raise ValueError(f"SATMLP: backend={self.backend!r} has no LoRA path; SAT on PEFT LoRA projections "
                                 f"runs on the torch backend: use backend='auto' or 'torch'")
            y = sat_lora_mlp(x, *weights, tuple(adapters), self._kept, metric=self.metric, strategy=self.strategy,
                             act=self.act, sync_selection=self.sync_selection, forward=self.forward_mode, stats=stats,
                             token_mask=mask, hold=self._hold)
        self._record(stats)
        return y

    def _dense_token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask of the tokens of ``x`` whose backward is dense with ``backward="dense_tokens"``: those whose
        logits enter the loss in the model's latest forward, or, without ``labels`` (or outside a patched model),
        every real token, with a warning the first time."""
        tokens = self._tokens
        if tokens is not None and tokens.loss is not None:
            return tokens.mask("loss", "SATMLP", x)
        if not self._dense_tokens_warned:
            self._dense_tokens_warned = True
            warnings.warn("SATMLP: backward='dense_tokens' found no labels in the model's forward, so every real token "
                          "counts as a loss token and the backward is dense; pass labels (-100 on the tokens without "
                          "loss) or use backward='sparse'", stacklevel=2)
        real = None if tokens is None else tokens.mask("real", "SATMLP", x)
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if real is None else real

    def extra_repr(self) -> str:
        return (f"omission_rate={self.omission_rate}, metric={self.metric!r}, strategy={self.strategy!r}, "
                f"act={self.act!r}, backend={self.backend!r}, forward={self.forward_mode!r}, "
                f"backward={self.backward_mode!r}, score_tokens={self.score_tokens!r}")


class SATAttention(_SATWrapper):
    """A Llama-style self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, optional ``q_norm``/``k_norm``)
    that omits heads while training.

    It holds the very submodules of the attention it wraps under the same names and in the same order, so parameter
    names, shapes and ``state_dict`` keys are unchanged. In ``eval()`` mode, at omission rate 0, when the rate is
    too small to drop a unit, or in training mode with grad mode off (outside a reentrant checkpoint's first pass, as
    :class:`SATMLP`) it calls the original module's own forward with the same arguments (KV cache and generation
    included, e.g. GRPO rollouts in training mode): the computation is exactly the dense one. In training mode it runs
    :func:`sat_kernels.sat_attention` with the module's RoPE tables, mask and causality, as the module's
    ``config._attn_implementation`` (``"eager"`` or ``"sdpa"``) would apply them, and returns ``(output, None)``.

    Setting ``omission_rate`` (or ``unit``) computes the kept unit count ``k``, and the forward depends on ``k`` only:
    under ``torch.compile`` (``fullgraph=True`` included) a model recompiles once per distinct ``k``, not per rate.

    Args:
        attn: the module to wrap (kept, unregistered, for eval and for :func:`sat_kernels.revert`).
        num_heads, num_kv_heads, head_dim, scale, norm_eps: its layout (as :func:`sat_kernels.replace_attention`
            finds and checks it).
        norm_offset: what the q/k norms add to their stored weights: 0 (Qwen3's ``w * x_hat``) or 1 (Gemma 3's
            ``(1 + w) * x_hat``).
        omission_rate, metric, strategy, unit, backend: as in :func:`sat_kernels.sat_attention`.
        sync_selection: as in :class:`SATMLP`.
        forward: ``"dense"`` (default: exact forward output, sparse backward) or ``"sparse"``, as in
            :func:`sat_kernels.sat_attention`; stored as ``forward_mode``.
        score_tokens: which tokens the head scores cover, as in :class:`SATMLP` (from the model patched by
            :func:`sat_kernels.replace_attention`).
    """

    _STATS_PROJ = "q_proj"

    def __init__(self, attn: nn.Module, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 norm_eps: float = 1e-6, norm_offset: float = 0.0, omission_rate: float = 0.5, metric: str = "l2",
                 strategy: str = "topk", unit: str = DEFAULT_UNIT, backend: str = "auto", sync_selection=None,
                 forward: str = DEFAULT_FORWARD, score_tokens: str = DEFAULT_SCORE_TOKENS):
        super().__init__(attn, attn.named_children())
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.norm_eps, self.norm_offset = scale, norm_eps, float(norm_offset)
        self._unit = check_choice(unit, UNITS, "unit")
        self.configure(omission_rate, metric=metric, strategy=strategy, backend=backend,
                       sync_selection=sync_selection, forward=forward, score_tokens=score_tokens)
        self.__dict__["_signature"] = inspect.signature(attn.forward)

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

    def _training_call(self, dense: nn.Module, args, kwargs):
        """The training forward's arguments by name (bound to the wrapped forward's signature) and the attention
        implementation, once what training-mode SAT attention does not support has been refused."""
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
            check_projection("SATAttention", name, getattr(self, name))
        hidden_states = call.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError(f"SATAttention: hidden_states must be a [B, T, h] tensor, got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        if call.get("position_embeddings") is None:
            raise ValueError("SATAttention: position_embeddings (cos, sin) are required, as the decoder layers of "
                             "Llama/Mistral/Qwen2/Qwen3 pass them")
        return call, impl

    def forward(self, *args, **kwargs):
        if self._runs_dense():
            return self.dense_module(*args, **kwargs)
        if self._kept == self._units:
            self._record({})
            return self.dense_module(*args, **kwargs)
        dense = self.dense_module
        call, impl = self._training_call(dense, args, kwargs)
        hidden_states = call["hidden_states"]
        cos, sin = call["position_embeddings"]
        mask = call.get("attention_mask")
        cache = next((call[n] for n in _CACHE_ARGS if call.get(n) is not None), None)
        layer_idx = getattr(dense, "layer_idx", None)
        if cache is not None and cache.get_seq_length(layer_idx or 0) > 0:
            raise ValueError("SATAttention: a training-mode forward with grad mode on continuing a non-empty KV cache "
                             "is not supported; generate in eval() mode or under torch.no_grad() (both run the dense "
                             "module)")
        seq = hidden_states.shape[1]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] != seq:
            raise ValueError(f"SATAttention: attention_mask covers {mask.shape[-1]} keys for {seq} tokens (a static "
                             f"or pre-filled KV cache); training-mode SAT attention supports self-attention only")
        # causality as Hugging Face applies it: sdpa uses is_causal when no mask is given, eager relies on the mask
        is_causal = call.get("is_causal")
        if is_causal is None:
            is_causal = getattr(dense, "is_causal", True)
        causal = impl == "sdpa" and mask is None and seq > 1 and bool(is_causal)
        q_scale, k_scale = self.norm_scales()
        stats = {"scores": None} if self._keep_scores else {}   # scores: for a PerLayerBudget
        y, _, k_all, v_all = sat_attention_kept(
            hidden_states, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight,
            self._kept, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, cos=cos, sin=sin,
            attention_mask=mask, causal=causal, scale=self.scale, b_q=self.q_proj.bias, b_k=self.k_proj.bias,
            b_v=self.v_proj.bias, b_o=self.o_proj.bias, q_norm_weight=q_scale, k_norm_weight=k_scale,
            norm_eps=self.norm_eps, metric=self.metric, strategy=self.strategy, unit=self.unit, backend=self.backend,
            sync_selection=self.sync_selection, forward=self.forward_mode, return_kv=cache is not None, stats=stats,
            token_mask=self._token_mask(hidden_states), hold=self._hold)
        self._record(stats)
        if cache is not None:
            cache.update(k_all, v_all, layer_idx)
        return y, None

    def norm_scales(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The multipliers the q and k norms apply to the normalized heads (``offset + weight``, differentiable in
        ``weight``; the sum in fp32 as Gemma 3 computes it), ``(None, None)`` without norms."""
        if getattr(self, "q_norm", None) is None:
            return None, None
        if not self.norm_offset:
            return self.q_norm.weight, self.k_norm.weight
        return tuple((self.norm_offset + w.float()).to(w.dtype) for w in (self.q_norm.weight, self.k_norm.weight))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"omission_rate={self.omission_rate}, metric={self.metric!r}, strategy={self.strategy!r}, "
                f"unit={self.unit!r}, backend={self.backend!r}, forward={self.forward_mode!r}, "
                f"score_tokens={self.score_tokens!r}")


def sat_modules(model: nn.Module, kind: Optional[str] = None) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of every SAT module in ``model`` (:class:`SATMLP`, :class:`SATAttention`), in
    ``named_modules`` order; of one kind with ``kind="mlp"`` / ``"attention"``.

    Example:
        >>> {name: m.omission_rate for name, m in sk.sat_modules(model, "mlp")}
        {'model.layers.0.mlp': 0.5, 'model.layers.1.mlp': 0.5}
    """
    kinds = {None: (SATMLP, SATAttention), "mlp": SATMLP, "attention": SATAttention}
    if kind not in kinds:
        raise ValueError(f"sat_modules: kind must be None, 'mlp' or 'attention', got {kind!r}")
    classes = kinds[kind]
    for name, module in model.named_modules():
        if isinstance(module, classes):
            yield name, module
