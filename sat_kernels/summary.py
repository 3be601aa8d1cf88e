"""What the SAT patch covers in a model: :class:`PatchSummary` and :func:`patch_summary` (re-exported by
:mod:`sat_kernels.patching`), and the log line ``replace_mlp`` / ``replace_attention`` write."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

from torch import nn

from .modules import SATMLP, SATAttention, sat_modules
from .patch_checks import ATTENTION_CLASSES, MLP_PARTS

logger = logging.getLogger("sat_kernels")

_LAYER_PARTS = {"mlp": ("mlp", "block_sparse_moe", "feed_forward"), "attention": ("self_attn",)}
_SAT_CLASSES = {"mlp": SATMLP, "attention": SATAttention}


@dataclass(frozen=True)
class PatchSummary:
    """What the SAT patch of one kind (``"mlp"`` or ``"attention"``) covers in a model: see :func:`patch_summary`.

    Layers are the elements of the model's ``nn.ModuleList``\\ s that have an MLP child (``mlp``,
    ``block_sparse_moe``, ``feed_forward``) or an attention child (``self_attn``): the decoder layers, and those of
    an encoder tower if the model has one. Names are module names in the model (``"model.layers.0.mlp"``).

    Attributes:
        kind: ``"mlp"`` or ``"attention"``.
        num_layers: layers with a module of this kind.
        patched_layers: names of those modules that are SAT modules.
        patched_classes: class names of the modules those SAT modules wrap (``("LlamaMLP",)``).
        partial_layers: ``{name: class name}`` of those that hold SAT modules inside without being one (a
            mixture-of-experts block whose shared expert is patched).
        unpatched_layers: ``{name: class name}`` of those with no SAT module.
        sat_modules: names of every SAT module of this kind, inside layers or not.
        skipped: ``{class name: why}`` for the classes in ``partial_layers`` and ``unpatched_layers``.
    """

    kind: str
    num_layers: int
    patched_layers: Tuple[str, ...]
    patched_classes: Tuple[str, ...]
    partial_layers: Dict[str, str]
    unpatched_layers: Dict[str, str]
    sat_modules: Tuple[str, ...]
    skipped: Dict[str, str]

    @property
    def complete(self) -> bool:
        """Whether the module of this kind of every layer is a SAT module."""
        return not self.partial_layers and not self.unpatched_layers

    def __str__(self) -> str:
        noun = "MLP" if self.kind == "mlp" else "attention"
        classes = f" ({', '.join(self.patched_classes)})" if self.patched_classes else ""
        text = (f"SAT {noun} in {len(self.patched_layers)} of {self.num_layers} layers{classes}, "
                f"{len(self.sat_modules)} SAT {noun} module{'s' if len(self.sat_modules) != 1 else ''} in all")
        for label, layers in (("partly patched", self.partial_layers), ("not patched", self.unpatched_layers)):
            for cls in sorted(set(layers.values())):
                count = sum(1 for c in layers.values() if c == cls)
                text += f"; {label}: {count} layer{'s' if count > 1 else ''} of {cls} ({self.skipped[cls]})"
        return text


def _layer_modules(model: nn.Module, kind: str) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of the MLP (or attention) child of every layer: element of an ``nn.ModuleList``."""
    for list_name, module_list in model.named_modules():
        if not isinstance(module_list, nn.ModuleList):
            continue
        for index, layer in module_list.named_children():
            for part in _LAYER_PARTS[kind]:
                child = layer._modules.get(part)
                if isinstance(child, nn.Module):
                    yield ".".join(n for n in (list_name, index, part) if n), child
                    break


def _why_not_patched(module: nn.Module, kind: str) -> str:
    sat_class = _SAT_CLASSES[kind]
    inside = [name for name, sub in module.named_modules() if isinstance(sub, sat_class)]
    experts = module._modules.get("experts")
    moe = "mixture of experts: " if experts is not None else ""
    if inside:
        rest = [f"{name} ({type(child).__name__})" for name, child in module.named_children()
                if not any(n == name or n.startswith(name + ".") for n in inside)
                and next(child.parameters(), None) is not None]
        return f"{moe}{', '.join(inside)} patched; {', '.join(rest)} not"
    if experts is not None:
        return f"{moe}its routed experts ({type(experts).__name__}) are not supported"
    if kind == "attention":
        if type(module).__name__ not in ATTENTION_CLASSES:
            return f"not a supported attention class (supported: {', '.join(ATTENTION_CLASSES)})"
        return "not patched: replace_attention was not called or was reverted"
    missing = [part for part in MLP_PARTS if not hasattr(module, part)]
    if missing:
        return f"not a SwiGLU MLP: no {', '.join(missing)}"
    return "not patched: replace_mlp was not called or was reverted"


def summarize(model: nn.Module, kind: str) -> PatchSummary:
    """The :class:`PatchSummary` of one kind (``"mlp"`` or ``"attention"``)."""
    sat_class = _SAT_CLASSES[kind]
    patched, partial, unpatched, skipped, classes = [], {}, {}, {}, set()
    layers = list(_layer_modules(model, kind))
    for name, module in layers:
        if isinstance(module, sat_class):
            patched.append(name)
            classes.add(type(module.dense_module).__name__)
            continue
        bucket = partial if any(isinstance(m, sat_class) for m in module.modules()) else unpatched
        bucket[name] = type(module).__name__
        skipped.setdefault(type(module).__name__, _why_not_patched(module, kind))
    return PatchSummary(kind=kind, num_layers=len(layers), patched_layers=tuple(patched),
                        patched_classes=tuple(sorted(classes)), partial_layers=partial, unpatched_layers=unpatched,
                        sat_modules=tuple(n for n, _ in sat_modules(model, kind)), skipped=skipped)


def patch_summary(model: nn.Module) -> Dict[str, PatchSummary]:
    """What ``replace_mlp`` / ``replace_attention`` patched in ``model``: ``{"mlp": ..., "attention": ...}``.

    Each :class:`PatchSummary` counts the layers whose MLP (attention) is a SAT module, those patched only partly
    (a mixture-of-experts block whose shared expert is a SwiGLU MLP: the routed experts are not supported) and those
    not patched, with the reason per module class. ``replace_mlp`` and ``replace_attention`` log it on the
    ``"sat_kernels"`` logger: INFO when every layer is covered, WARNING otherwise.

    Example:
        >>> sk.replace_mlp(qwen2_moe_model)            # WARNING: SAT MLP in 0 of 24 layers ... partly patched ...
        >>> s = sk.patch_summary(qwen2_moe_model)["mlp"]
        >>> s.complete, s.sat_modules[0], s.skipped
        (False, 'model.layers.0.mlp.shared_expert', {'Qwen2MoeSparseMoeBlock': 'mixture of experts: ...'})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {kind: summarize(model, kind) for kind in _SAT_CLASSES}


def log_summary(fn: str, model: nn.Module, kind: str) -> None:
    """Log the summary of ``kind`` after ``fn`` patched ``model``: INFO when complete, WARNING otherwise."""
    summary = summarize(model, kind)
    logger.log(logging.INFO if summary.complete else logging.WARNING, "%s: %s", fn, summary)
