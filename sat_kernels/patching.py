"""Patch Hugging Face models in place: ``replace_mlp``, ``set_omission_rate``, ``revert``.

Any decoder whose MLP modules have ``gate_proj``, ``up_proj``, ``down_proj`` (bias-free ``nn.Linear``) and an
``act_fn`` computing SiLU or tanh-GELU is supported: Llama, Mistral, Qwen2, Qwen3, Gemma and their relatives. The
patched model keeps its parameter objects, names and ``state_dict`` keys.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .backends import resolve_backend
from .modules import SATMLP
from .ops.sat_mlp import act_fwd
from .selection import METRICS, STRATEGIES, check_choice, check_omission_rate

_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _detect_act(act_fn) -> Optional[str]:
    """Which supported activation ``act_fn`` computes, found by evaluating it (class names vary across versions)."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # noqa: BLE001 - any failure means "not a supported elementwise activation"
        return None
    for act in ("silu", "gelu_tanh"):
        if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(out, act_fwd(probe, act),
                                                                                          atol=1e-6, rtol=1e-5):
            return act
    return None


def _swiglu_mlps(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if not isinstance(module, SATMLP) and all(hasattr(module, p) for p in _MLP_PARTS):
            yield name, module


def sat_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of every SAT module in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, SATMLP):
            yield name, module


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_mlp(name: str, mlp: nn.Module) -> str:
    for part in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(mlp, part)
        if not isinstance(proj, nn.Linear):
            raise ValueError(f"replace_mlp: {name}.{part} must be an nn.Linear, got {type(proj).__name__} "
                             f"(apply replace_mlp before adapters such as PEFT LoRA or quantization)")
        if proj.bias is not None:
            raise ValueError(f"replace_mlp: {name}.{part} has a bias; the SAT MLP supports bias-free projections")
    own = {id(p) for part in ("gate_proj", "up_proj", "down_proj") for p in getattr(mlp, part).parameters()}
    extra = [n for n, p in mlp.named_parameters() if id(p) not in own]
    if extra:
        raise ValueError(f"replace_mlp: {name} has parameters besides its three projections: {extra}")
    act = _detect_act(mlp.act_fn)
    if act is None:
        raise ValueError(f"replace_mlp: {name}.act_fn ({type(mlp.act_fn).__name__}) is neither SiLU nor tanh-GELU")
    return act


def replace_mlp(model: nn.Module, omission_rate: float = 0.5, *, metric: str = "l2", strategy: str = "topk",
                backend: str = "auto", sync_selection=None) -> nn.Module:
    """Replace every SwiGLU MLP of ``model`` by a :class:`SATMLP` sharing its parameters, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the intermediate neurons per layer and step; ``eval()``
    is exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``; usually driven by a schedule through :class:`SATCallback` afterwards.
        metric, strategy, backend: as in :func:`sat_kernels.sat_mlp`.
        sync_selection: ``None`` (auto: synchronized across ranks when torch.distributed is initialised with several
            ranks, as under DDP/FSDP), ``True``/a ``ProcessGroup``, or ``False`` (each rank selects from its own
            batch). See :mod:`sat_kernels.distributed`.

    Example:
        >>> model = sk.replace_mlp(AutoModelForCausalLM.from_pretrained(path), omission_rate=0.5)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rate = check_omission_rate(omission_rate)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, STRATEGIES, "strategy")
    resolve_backend(backend)
    found = list(_swiglu_mlps(model))
    if any(name == "" for name, _ in found):
        raise ValueError("replace_mlp: model is itself an MLP; pass the model that contains it, or wrap it in SATMLP")
    patched = list(sat_modules(model))
    if not found and not patched:
        raise ValueError(f"replace_mlp: {type(model).__name__} has no SwiGLU MLP (a module with gate_proj, up_proj, "
                         f"down_proj and act_fn); supported: Llama, Mistral, Qwen2, Qwen3 and decoders with that layout")
    acts = {name: _check_mlp(name, mlp) for name, mlp in found}   # check all before changing any
    for name, mlp in found:
        _set_child(model, name, SATMLP(mlp, acts[name], rate, metric=metric, strategy=strategy, backend=backend,
                                       sync_selection=sync_selection))
    for _, module in patched:
        module.omission_rate, module.metric, module.strategy = rate, metric, strategy
        module.backend, module.sync_selection = backend, sync_selection
    return model


def set_omission_rate(model: nn.Module, rate: float) -> nn.Module:
    """Set the omission rate of every SAT module in ``model`` (0 makes training dense). Returns ``model``."""
    rate = check_omission_rate(rate, "rate")
    modules = list(sat_modules(model))
    if not modules:
        raise ValueError(f"set_omission_rate: {type(model).__name__} has no SAT modules; call replace_mlp first")
    for _, module in modules:
        module.omission_rate = rate
    return model


def revert(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very objects ``replace_mlp`` wrapped). Returns ``model``."""
    for name, module in list(sat_modules(model)):
        module.dense_module.train(module.training)
        _set_child(model, name, module.dense_module)
    return model
