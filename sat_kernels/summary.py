"""What the SAT patch covers in a model: :class:`PatchSummary` and :func:`patch_summary` (re-exported by
:mod:`sat_kernels.patching`), and the log line ``replace_mlp`` / ``replace_attention`` write."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, Tuple

from torch import nn

from .forwards import LIGER_ADVICE, replaced_forward
from .modules import SATMLP, SATAttention, class_path, sat_modules
from .patch_checks import ATTENTION_CLASSES, MLP_PARTS, liger_mlp

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
        replaced_forwards: ``{name: what runs instead}`` of the SAT modules whose forward is no longer their own
            (:func:`sat_kernels.modules.replaced_forward`: Liger-Kernel's SwiGLU applied after ``replace_mlp``):
            SAT does not run in them.
    """

    kind: str
    num_layers: int
    patched_layers: Tuple[str, ...]
    patched_classes: Tuple[str, ...]
    partial_layers: Dict[str, str]
    unpatched_layers: Dict[str, str]
    sat_modules: Tuple[str, ...]
    skipped: Dict[str, str]
    replaced_forwards: Dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the module of this kind of every layer is a SAT module running its own forward."""
        return not self.partial_layers and not self.unpatched_layers and not self.replaced_forwards

    def __str__(self) -> str:
        noun = "MLP" if self.kind == "mlp" else "attention"
        classes = f" ({', '.join(self.patched_classes)})" if self.patched_classes else ""
        text = (f"SAT {noun} in {len(self.patched_layers)} of {self.num_layers} layers{classes}, "
                f"{len(self.sat_modules)} SAT {noun} module{'s' if len(self.sat_modules) != 1 else ''} in all")
        for label, layers in (("partly patched", self.partial_layers), ("not patched", self.unpatched_layers)):
            for cls in sorted(set(layers.values())):
                count = sum(1 for c in layers.values() if c == cls)
                text += f"; {label}: {count} layer{'s' if count > 1 else ''} of {cls} ({self.skipped[cls]})"
        if self.replaced_forwards:
            text += f"; {replaced_forwards_text(self.replaced_forwards)}"
        return text


def replaced_forwards_text(replaced: Dict[str, str]) -> str:
    """One sentence on SAT modules whose forward was replaced (``{name: what runs instead}``), with Liger's remedy
    when Liger-Kernel replaced it."""
    by_function: Dict[str, list] = {}
    for name, what in replaced.items():
        by_function.setdefault(what, []).append(name)
    parts = [f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} run {what}"
             for what, names in by_function.items()]
    liger = any(what.split(".", 1)[0] == "liger_kernel" for what in by_function)
    return (f"forward replaced in {len(replaced)} SAT module{'s' if len(replaced) != 1 else ''} ({'; '.join(parts)}):"
            f" SAT does not run there{f'. {LIGER_ADVICE}' if liger else ''}")


def warn_replaced_forwards(fn: str, named: Iterable[Tuple[str, nn.Module]]) -> Dict[str, str]:
    """Warn (``RuntimeWarning``, once per module) about the SAT modules among ``named`` whose forward was replaced
    (:func:`sat_kernels.modules.replaced_forward`); returns ``{name: what runs instead}`` of all of them."""
    modules = dict(named)
    replaced = {name: what for name, what in ((n, replaced_forward(m)) for n, m in modules.items()) if what}
    new = {name: what for name, what in replaced.items() if not modules[name].__dict__.get("_replaced_warned")}
    if new:
        for name in new:
            modules[name].__dict__["_replaced_warned"] = True
        warnings.warn(f"{fn}: {replaced_forwards_text(new)}", RuntimeWarning, stacklevel=3)
    return replaced


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
    if "_wrapped" in module.__dict__ and "_last_stats" in module.__dict__:
        return f"a SAT module whose class was replaced by {class_path(module)}: SAT does not run there"
    liger = liger_mlp(module) if kind == "mlp" else None
    if liger is not None:
        return f"Liger-Kernel's {liger}: {LIGER_ADVICE}"
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
    found = list(sat_modules(model, kind))
    replaced = {name: what for name, what in ((n, replaced_forward(m)) for n, m in found) if what is not None}
    return PatchSummary(kind=kind, num_layers=len(layers), patched_layers=tuple(patched),
                        patched_classes=tuple(sorted(classes)), partial_layers=partial, unpatched_layers=unpatched,
                        sat_modules=tuple(n for n, _ in found), skipped=skipped, replaced_forwards=replaced)


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
