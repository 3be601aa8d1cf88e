"""Patch Hugging Face models in place: ``replace_mlp``, ``replace_attention``, ``set_omission_rate``, ``revert``,
``patch_summary``.

Any decoder whose MLP modules have ``gate_proj``, ``up_proj``, ``down_proj`` (bias-free ``nn.Linear``) and an
``act_fn`` computing SiLU or tanh-GELU is supported: Llama, Mistral, Qwen2, Qwen3, Gemma and their relatives. Attention
is patched for the classes whose forward SAT attention reproduces (``LlamaAttention``, ``MistralAttention``,
``Qwen2Attention``, ``Qwen3Attention``, ``GemmaAttention``, ``Gemma3Attention``). The patched model keeps its
parameter objects, names and ``state_dict`` keys. PEFT LoRA on the MLP projections is supported whether it is added
before or after patching (:mod:`sat_kernels.lora`). What can be patched is checked in :mod:`sat_kernels.patch_checks`;
what was patched is reported by :mod:`sat_kernels.summary`.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple

from torch import nn

from .backends import resolve_backend
from .lora import peft_adapter
from .modules import SATMLP, SATAttention, sat_modules
from .ops.attention import DEFAULT_UNIT, UNITS
from .ops.attention.checks import check_attention_backend
from .ops.mlp import check_backward, lora_backward_reason
from .patch_checks import ATTENTION_CLASSES, check_attention, check_mlp, supported_attentions, swiglu_mlps
from .selection import ATTENTION_STRATEGIES, BACKWARD_MODES, DEFAULT_BACKWARD, DEFAULT_FORWARD, FORWARD_MODES, \
    METRICS, STRATEGIES, check_choice, check_omission_rate
from .summary import PatchSummary, log_summary, patch_summary, summarize, warn_replaced_forwards
from .tokens import DEFAULT_SCORE_TOKENS, SCORE_TOKENS, model_tokens, remove_model_tokens

__all__ = ["replace_mlp", "replace_attention", "set_omission_rate", "revert", "patch_summary", "PatchSummary",
           "sat_modules"]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _targets(fn: str, model: nn.Module, omission_rate: float, *, kind: str,
             find: Callable[[nn.Module], Iterator[Tuple[str, nn.Module]]], itself: str,
             choices: Dict[str, Tuple[str, tuple]], backend: str, check_backend: Callable[[str], object]):
    """The checks ``replace_mlp`` and ``replace_attention`` share, before anything is changed: ``model`` is a module,
    the rate and every ``{name: (value, allowed)}`` choice are valid, the backend exists, ``model`` is not itself the
    module to wrap (``itself``: what to say then). Returns ``(rate, found, patched)``: the rate, the modules ``find``
    yields, and the SAT modules of ``kind`` already there (a second call updates their settings)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rate = check_omission_rate(omission_rate)
    for name, (value, allowed) in choices.items():
        check_choice(value, allowed, name)
    check_backend(backend)
    found = list(find(model))
    if any(name == "" for name, _ in found):
        raise ValueError(f"{fn}: model is itself {itself}")
    return rate, found, list(sat_modules(model, kind))


def replace_mlp(model: nn.Module, omission_rate: float = 0.5, *, metric: str = "l2", strategy: str = "topk",
                backend: str = "auto", sync_selection=None, forward: str = DEFAULT_FORWARD,
                backward: str = DEFAULT_BACKWARD, score_tokens: str = DEFAULT_SCORE_TOKENS) -> nn.Module:
    """Replace every SwiGLU MLP of ``model`` by a :class:`SATMLP` sharing its parameters, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the intermediate neurons per layer and step; ``eval()``
    is exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.
    What was patched and what was not (mixture-of-experts blocks: only their shared experts) is logged on the
    ``"sat_kernels"`` logger and returned by :func:`patch_summary`.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``; usually driven by a schedule through :class:`SATCallback` afterwards.
        metric, strategy, backend: as in :func:`sat_kernels.sat_mlp`.
        sync_selection: ``None`` (auto: synchronized across ranks when torch.distributed is initialised with several
            ranks, as under DDP/FSDP), ``True``/a ``ProcessGroup``, or ``False`` (each rank selects from its own
            batch). See :mod:`sat_kernels.distributed`.
        forward: ``"dense"`` (default: exact forward output, backward over the kept neurons only) or ``"sparse"``
            (omitted neurons are left out of the output too, the paper's mode); see :func:`sat_kernels.sat_mlp` and
            ``DEFAULT_FORWARD`` in :mod:`sat_kernels.selection` for the measurements behind the default.
        backward: ``"sparse"`` (default: the whole backward over the kept neurons), ``"exact_input"`` (with
            ``forward="dense"``, on the torch backend: the input gradient through every neuron, the dense one, and
            weight gradients of the kept neurons only) or ``"dense_tokens"`` (with ``forward="dense"``, on the torch
            backend, not under ``torch.compile``: the tokens whose logits enter the loss take the dense backward,
            every other token the sparse one; see :class:`SATMLP`); the last two refused on MLPs with PEFT LoRA
            projections; see :func:`sat_kernels.sat_mlp`. Stored on each module as ``backward_mode``.
        score_tokens: the tokens of each batch the neuron scores are summed over, read from the arguments of
            ``model``'s forward by a forward pre-hook on ``model`` (removed by :func:`revert`): ``"real"`` (default:
            ``attention_mask != 0``, so padding, left or right, does not count), ``"loss"`` (opt-in: the real tokens
            whose logits enter the loss, ``labels`` shifted by one != -100; without ``labels`` the real tokens) or
            ``"all"`` (every token). See :mod:`sat_kernels.tokens`.

    Example:
        >>> model = sk.replace_mlp(AutoModelForCausalLM.from_pretrained(path), omission_rate=0.5)
    """
    check_backward(backward, forward, backend, strategy)   # first: its backend message is clearer than "not available"
    rate, found, patched = _targets(
        "replace_mlp", model, omission_rate, kind="mlp", find=swiglu_mlps,
        itself="an MLP; pass the model that contains it, or wrap it in SATMLP",
        choices={"metric": (metric, METRICS), "strategy": (strategy, STRATEGIES), "forward": (forward, FORWARD_MODES),
                 "backward": (backward, BACKWARD_MODES),
                 "score_tokens": (score_tokens, SCORE_TOKENS)},
        backend=backend, check_backend=resolve_backend)
    if not found and not patched:
        skipped = "".join(f"; its layers' {cls}: {why}" for cls, why in summarize(model, "mlp").skipped.items())
        raise ValueError(f"replace_mlp: {type(model).__name__} has no SwiGLU MLP (a module with gate_proj, up_proj, "
                         f"down_proj and act_fn){skipped}; supported: Llama, Mistral, Qwen2, Qwen3 and decoders with "
                         f"that layout")
    if backward != "sparse":
        lora = [f"{name}.{proj}" for name, mlp in found + patched for proj in ("gate_proj", "up_proj", "down_proj")
                if peft_adapter(getattr(mlp, proj)) is not None]
        if lora:
            raise ValueError(f"replace_mlp: backward={backward!r} is not supported on MLPs with PEFT adapters "
                             f"({', '.join(lora[:3])}{', ...' if len(lora) > 3 else ''}): "
                             f"{lora_backward_reason(backward)}; use backward='sparse'")
    settings = dict(metric=metric, strategy=strategy, backend=backend, sync_selection=sync_selection, forward=forward,
                    backward=backward, score_tokens=score_tokens)
    acts = {name: check_mlp(name, mlp) for name, mlp in found}   # check all before changing any
    for name, mlp in found:
        _set_child(model, name, SATMLP(mlp, acts[name], rate, **settings))
    for _, module in patched:
        module.configure(rate, **settings)
    _connect_tokens(model, "mlp")
    log_summary("replace_mlp", model, "mlp")
    return model


def _connect_tokens(model: nn.Module, kind: str) -> None:
    """Give the SAT modules of ``kind`` in ``model`` the token masks of ``model``'s forward (one
    :class:`~sat_kernels.tokens.ModelTokens` pre-hook on ``model``, shared by all its SAT modules)."""
    tokens = model_tokens(model)
    for _, module in sat_modules(model, kind):
        module._tokens = tokens


class _OutputCaptureInstaller:
    """Forward pre-hook of the pretrained models that hold SAT attention (transformers 5).

    Transformers installs its output-capturing hooks (``output_attentions``, ``output_hidden_states``) the first time
    a call asks for such an output, on the modules of the classes it records, which it finds by class: it would miss
    the original attention modules inside :class:`SATAttention`, and ``eval()`` with ``output_attentions=True`` would
    return no attentions. This hook puts the originals back in place for that one installation. Installing the hooks
    up front instead made every patched model fail ``torch.save(model)``: transformers' hooks are local functions,
    which do not pickle, whereas this hook is an instance of a module-level class. (Once a call has asked for such
    outputs, a model carries transformers' hooks and no longer pickles whole, patched or not.)
    """

    def __call__(self, model: nn.Module, args, kwargs) -> None:
        if getattr(model, "_output_capturing_hooks_installed", False):
            return
        config = getattr(model, "config", None)
        if not any(kwargs.get(f"output_{key}", getattr(config, f"output_{key}", False))
                   for key in getattr(model, "_can_record_outputs", None) or {}):
            return
        from transformers.utils.output_capturing import maybe_install_capturing_hooks

        wrapped = list(sat_modules(model, "attention"))
        for name, module in wrapped:
            _set_child(model, name, module.dense_module)
        try:
            maybe_install_capturing_hooks(model)
        finally:
            for name, module in wrapped:
                _set_child(model, name, module)


def _add_output_capture_installer(model: nn.Module) -> None:
    """Register :class:`_OutputCaptureInstaller` on the pretrained models of ``model`` whose forward captures outputs
    (``LlamaModel`` in ``LlamaForCausalLM``: the innermost ones), once."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks  # noqa: F401
    except ImportError:  # transformers 4: attention weights are returned through the layers' outputs
        return
    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for module in pretrained:
        innermost = not any(other is not module and any(o is other for o in module.modules()) for other in pretrained)
        if innermost and not any(isinstance(h, _OutputCaptureInstaller) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_OutputCaptureInstaller(), with_kwargs=True)


def _remove_output_capture_installers(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, _OutputCaptureInstaller):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def replace_attention(model: nn.Module, omission_rate: float = 0.5, *, metric: str = "l2", strategy: str = "topk",
                      unit: str = DEFAULT_UNIT, backend: str = "auto", sync_selection=None,
                      forward: str = DEFAULT_FORWARD, score_tokens: str = DEFAULT_SCORE_TOKENS) -> nn.Module:
    """Replace every supported self-attention of ``model`` by a :class:`SATAttention` sharing its submodules, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the heads (or KV groups, ``unit="group"``) per layer and
    step and run ``o_proj`` and the whole backward over them only; ``eval()`` (generation and KV cache included) is
    exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.
    What was patched and what was not is logged and returned by :func:`patch_summary`.

    Supported: ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention`` (q/k/v biases), ``Qwen3Attention``
    (q_norm/k_norm), ``GemmaAttention``, ``Gemma3Attention`` (q_norm/k_norm multiplying by ``1 + weight``, scale
    ``query_pre_attn_scalar ** -0.5``; an ``attn_logit_softcapping`` is refused), with ``attn_implementation``
    ``"sdpa"`` or ``"eager"`` (sliding windows are applied through the attention mask the model builds).
    Training-mode forwards refuse ``output_attentions``, a non-empty KV cache and attention dropout.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``.
        metric, strategy, unit, backend: as in :func:`sat_kernels.sat_attention`.
        sync_selection: as in :func:`replace_mlp`.
        forward: ``"dense"`` (default): the training forward's output is the dense model's (``o_proj`` over every
            head) while the backward stays over the kept heads; ``"sparse"``: omitted heads are left out of the output
            too. As in :func:`sat_kernels.sat_attention`.
        score_tokens: ``"real"`` (default), ``"loss"`` or ``"all"``: the tokens the head scores cover, as in
            :func:`replace_mlp`.

    Example:
        >>> sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
        >>> sk.set_omission_rate(model, mlp=0.5, attention=0.25)
    """
    rate, found, patched = _targets(
        "replace_attention", model, omission_rate, kind="attention", find=supported_attentions,
        itself="an attention module; pass the model that contains it",
        choices={"metric": (metric, METRICS), "strategy": (strategy, ATTENTION_STRATEGIES), "unit": (unit, UNITS),
                 "forward": (forward, FORWARD_MODES), "score_tokens": (score_tokens, SCORE_TOKENS)},
        backend=backend, check_backend=check_attention_backend)
    if not found and not patched:
        others = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "qkv_proj")
                         or hasattr(m, "c_attn")})
        raise ValueError(f"replace_attention: {type(model).__name__} has no supported attention module"
                         f"{f' ({others} are not supported)' if others else ''}; supported: {list(ATTENTION_CLASSES)}")
    settings = dict(metric=metric, strategy=strategy, backend=backend, sync_selection=sync_selection, forward=forward,
                    score_tokens=score_tokens)
    layouts = {name: check_attention(name, attn) for name, attn in found}   # check all before changing any
    if found:
        _add_output_capture_installer(model)
    for name, attn in found:
        _set_child(model, name, SATAttention(attn, omission_rate=rate, unit=unit, **settings, **layouts[name]))
    for _, module in patched:
        module.unit = unit
        module.configure(rate, **settings)
    _connect_tokens(model, "attention")
    log_summary("replace_attention", model, "attention")
    return model


def set_omission_rate(model: nn.Module, rate: Optional[float] = None, *, mlp: Optional[float] = None,
                      attention: Optional[float] = None) -> nn.Module:
    """Set the omission rate of the SAT modules in ``model`` (0 makes them dense in training). Returns ``model``.

    ``set_omission_rate(model, r)`` sets every SAT module (MLP and attention). ``mlp=`` / ``attention=`` set one kind
    and take precedence over ``rate`` for it; a kind left ``None`` with ``rate`` ``None`` keeps its rate. A rate above
    0 for SAT modules whose forward was replaced (Liger-Kernel's SwiGLU applied after ``replace_mlp``), where SAT
    does not run, raises a ``RuntimeWarning`` naming them, once per module.

    Example:
        >>> sk.set_omission_rate(model, 0.5)                      # every SAT module
        >>> sk.set_omission_rate(model, mlp=0.5, attention=0.25)  # separate rates
        >>> sk.set_omission_rate(model, attention=0.0)            # dense attention, MLP rate unchanged
    """
    if rate is None and mlp is None and attention is None:
        raise ValueError("set_omission_rate: give rate, or mlp= and/or attention=")
    rates = {}
    for kind, explicit in (("mlp", mlp), ("attention", attention)):
        if explicit is not None:
            rates[kind] = check_omission_rate(explicit, kind)
        elif rate is not None:
            rates[kind] = check_omission_rate(rate, "rate")
    modules = {kind: list(sat_modules(model, kind)) for kind in rates}
    for kind, explicit in (("mlp", mlp), ("attention", attention)):
        if explicit is not None and not modules[kind]:
            raise ValueError(f"set_omission_rate: {kind}={explicit} but {type(model).__name__} has no SAT {kind} "
                             f"modules; call replace_{kind} first")
    if not any(modules.values()):
        raise ValueError(f"set_omission_rate: {type(model).__name__} has no SAT modules; call replace_mlp or "
                         f"replace_attention first")
    for kind, found in modules.items():
        for _, module in found:
            module.omission_rate = rates[kind]
        if rates[kind] > 0:
            warn_replaced_forwards("set_omission_rate", found)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very objects ``replace_mlp`` / ``replace_attention`` wrapped), MLP and
    attention alike, with the SAT modules' current children: adapters added after patching (PEFT LoRA) stay; remove
    the hooks patching added (the token masks' forward pre-hook among them). Returns ``model``."""
    for name, module in list(sat_modules(model)):
        module.dense_module.train(module.training)
        _set_child(model, name, module.dense_module)
    _remove_output_capture_installers(model)
    remove_model_tokens(model)
    return model
