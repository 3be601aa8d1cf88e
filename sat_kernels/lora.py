"""PEFT adapters on the projections of a SAT module: recognising them (without importing peft)."""
from __future__ import annotations

from typing import Optional

from torch import nn


def _class_names(module: nn.Module) -> set:
    return {c.__name__ for c in type(module).__mro__}


def peft_adapter(module: nn.Module) -> Optional[str]:
    """``"PEFT LoRA"`` for a PEFT LoRA layer, ``"PEFT <class>"`` for another PEFT tuner layer, else ``None``.

    Recognised by the classes PEFT's layers derive from (``LoraLayer``, ``BaseTunerLayer``), so peft need not be
    imported. A PEFT layer keeps the original ``nn.Linear`` as ``base_layer`` and adds its own parameters.
    """
    names = _class_names(module)
    if "LoraLayer" in names:
        return "PEFT LoRA"
    if "BaseTunerLayer" in names:
        return f"PEFT {type(module).__name__}"
    return None
