"""Selection statistics of the SAT modules of a model, from their last training forward.

Each :class:`SATMLP` keeps the statistics of its last training-mode forward as device tensors (a few scalars, no
indices) and adds up the non-finite neuron scores it has seen; nothing is synchronised in the step.
:func:`sat_stats` reads them all with one host synchronisation, so read them at logging steps only
(:class:`sat_kernels.SATCallback` does, at every Trainer logging step).
"""
from __future__ import annotations

import warnings
from typing import Dict

import torch
from torch import nn

from .patching import sat_modules

_COUNTS = ("nonfinite", "nonfinite_total")   # read back as int


def _read(values: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, float]]:
    """``values`` with every tensor replaced by its Python number (int for counts), in one host synchronisation."""
    flat = [t for layer in values.values() for t in layer.values()]
    if not flat:
        return {}
    device = flat[0].device
    numbers = iter(torch.stack([t.to(device, torch.float64) for t in flat]).tolist())
    return {name: {key: int(next(numbers)) if key in _COUNTS else next(numbers) for key in layer}
            for name, layer in values.items()}


def _warn_nonfinite(modules: Dict[str, nn.Module], layers: Dict[str, Dict[str, float]]) -> None:
    """One warning per module, the first time its count of non-finite scores is read non-zero."""
    new = [name for name, layer in layers.items()
           if layer["nonfinite_total"] > 0 and not modules[name]._nonfinite_warned]
    if not new:
        return
    for name in new:
        modules[name]._nonfinite_warned = True
    counts = ", ".join(f"{name}: {int(layers[name]['nonfinite_total'])}" for name in new)
    warnings.warn(f"sat_stats: non-finite (NaN/inf) neuron scores in {len(new)} SAT layer(s) ({counts}). Selection "
                  f"ranks NaN lowest and omits those neurons, so the SAT training loss can stay finite while the "
                  f"dense (eval) model computes NaN: the weights or activations have diverged.", RuntimeWarning,
                  stacklevel=3)


def sat_stats(model: nn.Module) -> Dict[str, Dict]:
    """Per-layer selection statistics of the SAT MLP modules of ``model`` from their last training forward.

    Returns ``{"mlp": {"layers": {name: values}, "summary": values}}`` (``"mlp"`` only when the model has SAT MLP
    modules; ``"layers"`` holds the modules that have run a sparse training forward), where a layer's values are:

    - ``nonfinite``: NaN/inf neuron scores in its last sparse training forward;
    - ``nonfinite_total``: NaN/inf scores in all its training forwards since patching (a forward recomputed by
      activation checkpointing counts again).

    and ``summary`` holds ``nonfinite`` and ``nonfinite_total`` summed over the layers.

    NaN scores rank lowest and those neurons are omitted, so a diverged layer (e.g. a NaN row of ``gate_proj``) can
    leave the SAT loss finite while the dense and eval loss is NaN. The statistics stay on the device during the step
    (no host synchronisation); this call reads them with one synchronisation and issues a ``RuntimeWarning`` the
    first time it finds non-finite scores in a module (once per module), so the warning appears when statistics are
    read, e.g. at the Trainer's logging steps through :class:`sat_kernels.SATCallback`.

    Example:
        >>> sk.sat_stats(model)["mlp"]["summary"]
        {'nonfinite': 0, 'nonfinite_total': 0}
    """
    modules = {name: m for name, m in sat_modules(model, "mlp")}
    if not modules:
        return {}
    raw = {name: {"nonfinite": m._last_stats["nonfinite"], "nonfinite_total": m._nonfinite_total}
           for name, m in modules.items() if m._last_stats is not None}
    layers = _read(raw)
    _warn_nonfinite(modules, layers)
    summary = {key: sum(layer[key] for layer in layers.values()) for key in ("nonfinite", "nonfinite_total")}
    return {"mlp": {"layers": layers, "summary": summary if layers else {}}}
