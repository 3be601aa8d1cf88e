"""Selection statistics of the SAT modules of a model, from their last training forward.

Each SAT module (:class:`SATMLP`, :class:`SATAttention`) keeps the statistics of its last training-mode forward as
device tensors (a few scalars, no indices) and adds up the non-finite unit scores it has seen; nothing is synchronised
in the step.
:func:`sat_stats` reads them all with one host synchronisation, so read them at logging steps only
(:class:`sat_kernels.SATCallback` does, at every Trainer logging step).
"""
from __future__ import annotations

import warnings
from typing import Dict

import torch
from torch import nn

from .patching import sat_modules
from .summary import warn_replaced_forwards

_COUNTS = ("kept", "units", "nonfinite", "nonfinite_total")   # read back as int
# per kind of SAT module: what its units of selection are called in the non-finite warning
_UNITS = {"mlp": ("neuron", "neurons"), "attention": ("unit (head or KV group)", "units")}


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


def _warn_nonfinite(kind: str, modules: Dict[str, nn.Module], layers: Dict[str, Dict]) -> None:
    """One warning per module, the first time its count of non-finite scores is read non-zero."""
    new = [name for name, layer in layers.items()
           if layer["nonfinite_total"] > 0 and not modules[name]._nonfinite_warned]
    if not new:
        return
    for name in new:
        modules[name]._nonfinite_warned = True
    counts = ", ".join(f"{name}: {layers[name]['nonfinite_total']}" for name in new)
    unit, units = _UNITS[kind]
    warnings.warn(f"sat_stats: non-finite (NaN/inf) {unit} scores in {len(new)} SAT layer(s) ({counts}). "
                  f"Selection ranks NaN lowest and omits those {units}, so the SAT training loss can stay finite "
                  f"while the dense (eval) model computes NaN: the weights or activations have diverged.",
                  RuntimeWarning, stacklevel=3)


def _summary(layers: Dict[str, Dict]) -> Dict:
    if not layers:
        return {}
    kept = [layer["kept"] for layer in layers.values()]
    mass = [layer["kept_mass"] for layer in layers.values()]
    return {"kept_mean": sum(kept) / len(kept), "kept_min": min(kept), "kept_mass_mean": sum(mass) / len(mass),
            "kept_mass_min": min(mass), "nonfinite": sum(layer["nonfinite"] for layer in layers.values()),
            "nonfinite_total": sum(layer["nonfinite_total"] for layer in layers.values())}


def sat_stats(model: nn.Module) -> Dict[str, Dict]:
    """Per-layer selection statistics of the SAT modules of ``model`` from their last training forward, and their
    mean/min over the layers, per kind: ``"mlp"`` (units: neurons) and ``"attention"`` (units: query heads or KV
    groups, as the module's ``unit``).

    Returns ``{kind: {"layers": {name: values}, "summary": summary}}`` with a key for each kind the model has SAT
    modules of (``{}`` for a model without SAT modules; ``"layers"`` holds the modules that have run a training
    forward). A layer's ``values``:

    - ``kept``: units kept (``k``) and ``units``: units of the layer (``I`` neurons; ``H`` heads or ``G`` groups);
    - ``kept_mass``: share of the score mass kept, ``sum(kept scores) / sum(all scores)`` over the finite scores of
      the layer's metric (``l2``: column norms of the MLP activations, norms of the units' attention outputs), in
      ``[0, 1]``;
    - ``nonfinite``: NaN/inf unit scores in that forward;
    - ``nonfinite_total``: NaN/inf scores in all its training forwards since patching (a forward recomputed by
      activation checkpointing counts again).

    A dense training forward (omission rate 0, or a rate that keeps every unit) scores nothing: ``kept = units``,
    ``kept_mass`` 1, ``nonfinite`` 0. ``summary``: ``kept_mean``, ``kept_min``, ``kept_mass_mean``,
    ``kept_mass_min`` over the layers, and ``nonfinite``, ``nonfinite_total`` summed over the layers (``{}`` before
    any training forward).

    NaN scores rank lowest and those units are omitted, so a diverged layer (e.g. a NaN row of ``gate_proj`` or
    ``v_proj``) can leave the SAT loss finite while the dense and eval loss is NaN. The statistics stay on the device
    during the step (no host synchronisation); this call reads them, all kinds together, with one synchronisation and
    issues a ``RuntimeWarning`` the first time it finds non-finite scores in a module (once per module, one warning
    per kind), so the warning appears when statistics are read, e.g. at the Trainer's logging steps through
    :class:`sat_kernels.SATCallback`. SAT modules whose forward was replaced (Liger-Kernel's SwiGLU applied after
    ``replace_mlp``) record nothing: they raise a ``RuntimeWarning`` naming them, once per module.

    Example:
        >>> loss = sk.replace_attention(sk.replace_mlp(model, 0.5), 0.25)(**batch).loss
        >>> stats = sk.sat_stats(model)
        >>> stats["mlp"]["layers"]["model.layers.0.mlp"]["kept_mass"], stats["mlp"]["summary"]["kept_mass_min"]
        >>> stats["attention"]["summary"]["kept_mass_min"]
    """
    modules = {kind: dict(sat_modules(model, kind)) for kind in _UNITS}
    modules = {kind: named for kind, named in modules.items() if named}
    warn_replaced_forwards("sat_stats", ((name, m) for named in modules.values() for name, m in named.items()))
    raw = {name: {"kept": m._last_stats["kept"], "units": m._units, "kept_mass": m._last_stats["kept_mass"],
                  "nonfinite": m._last_stats["nonfinite"], "nonfinite_total": m._nonfinite_total}
           for named in modules.values() for name, m in named.items() if m._last_stats is not None}
    values = _read(raw)
    out = {}
    for kind, named in modules.items():
        layers = {name: values[name] for name in named if name in values}
        _warn_nonfinite(kind, named, layers)
        out[kind] = {"layers": layers, "summary": _summary(layers)}
    return out
