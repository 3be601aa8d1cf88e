"""PEFT adapters on the projections of a SAT module: recognising them (without importing peft) and reading the
active LoRA adapter of an MLP projection for :mod:`sat_kernels.ops.mlp.lora`."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .ops.mlp.lora import LoRA

_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")


def _class_names(module: nn.Module) -> set:
    return {c.__name__ for c in type(module).__mro__}


def peft_adapter(module: nn.Module) -> Optional[str]:
    """``"PEFT LoRA"`` for a PEFT LoRA layer, ``"PEFT <tuner>"`` for another PEFT tuner layer (``"PEFT ia3"``),
    else ``None``.

    Recognised by the classes PEFT's layers derive from (``LoraLayer``, ``BaseTunerLayer``), so peft need not be
    imported. A PEFT layer keeps the original ``nn.Linear`` as ``base_layer`` and adds its own parameters.
    """
    names = _class_names(module)
    if "LoraLayer" in names:
        return "PEFT LoRA"
    if "BaseTunerLayer" in names:
        path = type(module).__module__.split(".")
        return f"PEFT {path[2] if path[:2] == ['peft', 'tuners'] and len(path) > 2 else type(module).__name__}"
    return None


def lora_parts(where: str, proj: nn.Module) -> Tuple[nn.Module, Optional[LoRA]]:
    """``(base layer, active adapter)`` of a PEFT LoRA ``Linear``; ``(proj, None)`` for any other module.

    The adapter is ``None`` when PEFT's forward would not run one: adapters disabled (``disable_adapter()``), merged
    into the base weight, or none of the active adapters on this layer. Supported exactly: one active adapter with
    any ``r``/``lora_alpha`` (rsLoRA included: PEFT's ``scaling``), ``lora_dropout`` (``nn.Dropout``). Refused with a
    ``ValueError`` naming the option (``where``: the projection, for the message): DoRA and other LoRA variants,
    ``lora_bias``, ``fan_in_fan_out``, several active adapters, other LoRA layer classes (quantized bases).
    """
    if peft_adapter(proj) != "PEFT LoRA":
        return proj, None
    cls = type(proj)
    if (cls.__module__, cls.__name__) != _LORA_LINEAR:
        raise ValueError(f"{where} is a PEFT LoRA layer of class {cls.__module__}.{cls.__qualname__}; SAT supports "
                         f"{'.'.join(_LORA_LINEAR)} on a plain nn.Linear (not quantized or other bases)")
    base = proj.base_layer
    if proj.disable_adapters or proj.merged:
        return base, None
    active = [name for name in proj.active_adapters if name in proj.lora_A]
    if not active:
        return base, None
    if len(active) > 1:
        raise ValueError(f"{where} has {len(active)} active LoRA adapters {active}; SAT supports one active adapter "
                         f"per projection (select it with set_adapter)")
    (adapter,) = active
    options = {"use_dora=True (DoRA)": getattr(proj, "use_dora", {}).get(adapter),
               "lora_bias=True": getattr(proj, "lora_bias", {}).get(adapter),
               "fan_in_fan_out=True": getattr(proj, "fan_in_fan_out", False)}
    variant = getattr(proj, "lora_variant", {}).get(adapter)
    if variant is not None:
        options[f"the LoRA variant {type(variant).__name__}"] = True
    lora_a, lora_b = proj.lora_A[adapter], proj.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        options[f"lora_A/lora_B of classes {type(lora_a).__name__}/{type(lora_b).__name__}"] = True
    elif lora_a.bias is not None or lora_b.bias is not None:
        options["biases in lora_A/lora_B"] = True
    dropout = proj.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        options[f"a lora_dropout of class {type(dropout).__name__}"] = True
    refused = [option for option, on in options.items() if on]
    if refused:
        raise ValueError(f"{where}: SAT does not support PEFT LoRA with {', '.join(refused)} (adapter {adapter!r}); "
                         f"supported: plain LoRA with any r, lora_alpha, use_rslora and lora_dropout")
    active_dropout = dropout if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0 else None
    return base, LoRA(lora_a.weight, lora_b.weight, float(proj.scaling[adapter]), active_dropout)
