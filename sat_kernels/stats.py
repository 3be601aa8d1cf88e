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

_COUNTS = ("kept", "units", "nonfinite", "nonfinite_total")   # read back as int


def _read(values: Dict[str, Dict]) -> Dict[str, Dict]:
    """``values`` with every tensor replaced by its Python number (int for counts), in one host synchronisation."""
    tensors = [t for layer in values.values() for t in layer.values() if isinstance(t, torch.Tensor)]
    numbers = iter(torch.stack([t.to(tensors[0].device, torch.float64) for t in tensors]).tolist() if tensors else [])
    out = {}
    for name, layer in values.items():
        out[name] = {}
        for key, value in layer.items():
            value = next(numbers) if isinstance(value, torch.Tensor) else value
            out[name][key] = int(value) if key in _COUNTS else float(value)
    return out


def _warn_nonfinite(modules: Dict[str, nn.Module], layers: Dict[str, Dict]) -> None:
    """One warning per module, the first time its count of non-finite scores is read non-zero."""
    new = [name for name, layer in layers.items()
           if layer["nonfinite_total"] > 0 and not modules[name]._nonfinite_warned]
    if not new:
        return
    for name in new:
        modules[name]._nonfinite_warned = True
    counts = ", ".join(f"{name}: {layers[name]['nonfinite_total']}" for name in new)
    warnings.warn(f"sat_stats: non-finite (NaN/inf) neuron scores in {len(new)} SAT layer(s) ({counts}). Selection "
                  f"ranks NaN lowest and omits those neurons, so the SAT training loss can stay finite while the "
                  f"dense (eval) model computes NaN: the weights or activations have diverged.", RuntimeWarning,
                  stacklevel=3)


def _summary(layers: Dict[str, Dict]) -> Dict:
    if not layers:
        return {}
    kept = [layer["kept"] for layer in layers.values()]
    mass = [layer["kept_mass"] for layer in layers.values()]
    return {"kept_mean": sum(kept) / len(kept), "kept_min": min(kept), "kept_mass_mean": sum(mass) / len(mass),
            "kept_mass_min": min(mass), "nonfinite": sum(layer["nonfinite"] for layer in layers.values()),
            "nonfinite_total": sum(layer["nonfinite_total"] for layer in layers.values())}


def sat_stats(model: nn.Module) -> Dict[str, Dict]:
    """Per-layer selection statistics of the SAT MLP modules of ``model`` from their last training forward, and
    their mean/min over the layers.

    Returns ``{"mlp": {"layers": {name: values}, "summary": summary}}`` (``{}`` for a model without SAT MLP modules;
    ``"layers"`` holds the modules that have run a training forward). A layer's ``values``:

    - ``kept``: neurons kept (``k``) and ``units``: neurons of the layer (``I``);
    - ``kept_mass``: share of the score mass kept, ``sum(kept scores) / sum(all scores)`` over the finite scores of
      the layer's metric (``l2``: column norms of the activations), in ``[0, 1]``;
    - ``nonfinite``: NaN/inf neuron scores in that forward;
    - ``nonfinite_total``: NaN/inf scores in all its training forwards since patching (a forward recomputed by
      activation checkpointing counts again).

    A dense training forward (omission rate 0) scores nothing: ``kept = units``, ``kept_mass`` 1, ``nonfinite`` 0.
    ``summary``: ``kept_mean``, ``kept_min``, ``kept_mass_mean``, ``kept_mass_min`` over the layers, and
    ``nonfinite``, ``nonfinite_total`` summed over the layers (``{}`` before any training forward).

    NaN scores rank lowest and those neurons are omitted, so a diverged layer (e.g. a NaN row of ``gate_proj``) can
    leave the SAT loss finite while the dense and eval loss is NaN. The statistics stay on the device during the step
    (no host synchronisation); this call reads them with one synchronisation and issues a ``RuntimeWarning`` the
    first time it finds non-finite scores in a module (once per module), so the warning appears when statistics are
    read, e.g. at the Trainer's logging steps through :class:`sat_kernels.SATCallback`. Attention modules keep no
    statistics yet.

    Example:
        >>> loss = sk.replace_mlp(model, 0.5)(**batch).loss
        >>> stats = sk.sat_stats(model)["mlp"]
        >>> stats["layers"]["model.layers.0.mlp"]["kept_mass"], stats["summary"]["kept_mass_min"]
    """
    modules = {name: m for name, m in sat_modules(model, "mlp")}
    if not modules:
        return {}
    raw = {name: {"kept": m._last_stats["kept"], "units": m.gate_proj.out_features,
                  "kept_mass": m._last_stats["kept_mass"], "nonfinite": m._last_stats["nonfinite"],
                  "nonfinite_total": m._nonfinite_total}
           for name, m in modules.items() if m._last_stats is not None}
    layers = _read(raw)
    _warn_nonfinite(modules, layers)
    return {"mlp": {"layers": layers, "summary": _summary(layers)}}
