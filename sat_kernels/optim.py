"""Optimizer steps that leave omitted units alone: lazy (SparseAdam-like) updates for the SAT modules' weights.

In a SAT step the weights of an omitted MLP neuron (its row of ``gate_proj``/``up_proj``, its column of
``down_proj``) or attention head (rows of ``q/k/v_proj``, columns of ``o_proj``) get a gradient of exactly zero. A
stateful optimizer still moves them: AdamW steps by its decaying momentum ``m / sqrt(v)`` and by weight decay, SGD by
its momentum buffer. :func:`skip_omitted_updates` makes the optimizer skip them instead, as
``torch.optim.SparseAdam`` skips rows without gradient: after each step those rows and columns, and the optimizer
state of the same shape (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), hold their values from before the step.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora import peft_adapter
from .patching import sat_modules

# per kind of SAT module: its projections and the axis of their weight that indexes the units of selection
_UNIT_AXES = {"mlp": (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)),
              "attention": (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1))}


def _unit_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter, int]]:
    """``(name, parameter, unit axis)`` of every trainable parameter of the SAT modules whose slices along the axis
    belong to one unit each: the projections' weights (and biases of the input projections) and, on PEFT LoRA
    projections, ``lora_B`` of the input projections (rows) and ``lora_A`` of the output projection (columns)."""
    for kind in _UNIT_AXES:
        for name, module in sat_modules(model, kind):
            for proj_name, axis in _UNIT_AXES[kind]:
                proj = getattr(module, proj_name)
                where = f"{name}.{proj_name}"
                if peft_adapter(proj) == "PEFT LoRA":
                    factors = proj.lora_B if axis == 0 else proj.lora_A
                    found = [(f"{where}.{'lora_B' if axis == 0 else 'lora_A'}.{adapter}.weight", f.weight)
                             for adapter, f in factors.items()]
                    proj = proj.base_layer
                else:
                    found = []
                found.append((f"{where}.weight", proj.weight))
                if axis == 0 and getattr(proj, "bias", None) is not None:
                    found.append((f"{where}.bias", proj.bias))
                for pname, param in found:
                    if param.requires_grad:
                        yield pname, param, axis


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``,
    whose ``step`` calls the inner one's, where the hooks run)."""
    inner = optimizer
    while not hasattr(inner, "register_step_pre_hook") or type(inner).__name__ == "AcceleratedOptimizer":
        if not hasattr(inner, "optimizer"):
            raise TypeError(f"skip_omitted_updates: optimizer must be a torch.optim.Optimizer (or a wrapper of one "
                            f"kept as .optimizer), got {type(optimizer).__name__}")
        inner = inner.optimizer
    return inner


def _refuse_deepspeed(model: nn.Module, optimizer) -> None:
    """Refuse DeepSpeed ZeRO: its optimizer reduces the gradients into its own buffers (``param.grad`` stays
    ``None``) and steps flat fp32 partitions, not the model's parameters, so the hooks would find nothing to skip
    and change nothing."""
    zero3 = next((name for name, param, _ in _unit_parameters(model) if hasattr(param, "ds_id")), None)
    chain, inner = [], optimizer
    while inner is not None and len(chain) < 8:   # the optimizer and the wrapped ones (.optimizer)
        chain.append(inner)
        inner = getattr(inner, "optimizer", None)
    wrapper = next((o for o in chain if type(o).__module__.split(".")[0] == "deepspeed"), None)
    if zero3 is None and wrapper is None:
        return
    what = (f"{zero3} is a DeepSpeed ZeRO-3 parameter" if zero3 is not None else
            f"the optimizer is DeepSpeed's {type(wrapper).__name__}")
    raise ValueError(f"skip_omitted_updates: {what}. DeepSpeed's ZeRO optimizers reduce the gradients into their own "
                     f"buffers and step flat fp32 partitions, not the model's parameters, so these hooks would find "
                     f"no gradient and skip nothing; under DeepSpeed ZeRO train without skip_omitted_updates (the "
                     f"default)")


def skip_omitted_updates(model: nn.Module, optimizer) -> RemovableHandle:
    """Make ``optimizer.step()`` skip the omitted units of ``model``'s SAT modules: lazy, SparseAdam-like updates.

    A unit (MLP neuron, attention head or KV group) is omitted in a step when its slice of a parameter's gradient is
    exactly zero: with gradient accumulation, in every micro-batch of the step. Before each step the hook saves
    those slices of the parameter and of every optimizer-state tensor of the parameter's shape; after the step it
    writes them back, so omitted units keep their weights, momentum and second moment (no momentum step, no weight
    decay), as ``torch.optim.SparseAdam`` does for rows without gradient. Kept units are updated exactly as without
    the hook (AdamW and SGD are elementwise). Scalar state (Adam's ``step``) still counts every step. State that the
    first step creates is what the optimizer makes from a zero gradient for the omitted units (zeros for AdamW).

    Parameters: every trainable parameter of :func:`sat_kernels.replace_mlp` / :func:`replace_attention` modules
    indexed by units (``gate_proj``/``up_proj`` rows and ``down_proj`` columns; ``q/k/v_proj`` rows and biases and
    ``o_proj`` columns; on PEFT LoRA projections ``lora_B`` of the input projections and ``lora_A`` of the output
    one), found again at every step (adapters may be added later). A parameter without a gradient is left alone; one
    whose gradient is exactly zero in a slice for another reason (a unit dead in the whole batch) is skipped too.

    Cost: one host synchronisation per step (the omitted indices), the saved slices (at most the omitted fraction of
    the SAT weights and their optimizer state) and two copies of them. Parameters must be ordinary tensors on one
    device: under FSDP (DTensor or flattened parameters) it raises ``TypeError``; DeepSpeed ZeRO (ZeRO-3 parameters, or
    an optimizer of DeepSpeed's, which steps its own flat partitions) is refused with ``ValueError``.

    Args:
        model: the model with SAT modules (the one whose parameters ``optimizer`` updates).
        optimizer: a ``torch.optim.Optimizer``, or a wrapper of one kept as ``.optimizer`` (accelerate, the HF
            ``Trainer``'s optimizer).

    Returns:
        a handle whose ``remove()`` takes both hooks off again.

    Example:
        >>> sk.replace_mlp(model, 0.5)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        >>> handle = sk.skip_omitted_updates(model, opt)
        (or ``SATCallback(sched, skip_omitted_updates=True)`` with the HF Trainer)
    """
    if not any(True for _ in sat_modules(model)):
        raise ValueError("skip_omitted_updates: the model has no SAT modules; call sat_kernels.replace_mlp(model) "
                         "(or replace_attention) first")
    _refuse_deepspeed(model, optimizer)
    inner = _base_optimizer(optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable and trainable.isdisjoint(id(p) for group in inner.param_groups for p in group["params"]):
        raise ValueError("skip_omitted_updates: the optimizer updates none of the model's trainable parameters (an "
                         "optimizer given to DeepSpeed ZeRO, which steps its own flat partitions instead, or one of "
                         "another model), so its step hooks would skip nothing")
    lazy = _LazyUpdates(model)
    return _Handles(inner.register_step_pre_hook(lazy.save), inner.register_step_post_hook(lazy.restore))


class _LazyUpdates:
    """The two step hooks of :func:`skip_omitted_updates`: ``save`` the omitted units' slices of each parameter and of
    its optimizer state before the step, ``restore`` them after it."""

    def __init__(self, model: nn.Module):
        self.model = model
        # per parameter with omitted units: (parameter, omitted indices, unit axis, {name: saved slices})
        self.saved: List[Tuple[torch.Tensor, torch.Tensor, int, Dict[str, torch.Tensor]]] = []

    @staticmethod
    def _shaped_state(opt, param) -> Dict[str, torch.Tensor]:
        return {key: t for key, t in opt.state.get(param, {}).items()
                if isinstance(t, torch.Tensor) and t.shape == param.shape}

    def save(self, opt, args, kwargs):
        self.saved.clear()
        found = []
        for name, param, axis in _unit_parameters(self.model):
            grad = param.grad
            if grad is None:
                continue
            if type(param) is not nn.Parameter and type(param) is not torch.Tensor or grad.is_sparse:
                raise TypeError(f"skip_omitted_updates: {name} is a {type(param).__name__} (gradient layout "
                                f"{grad.layout}); only ordinary dense parameters are supported (not FSDP's)")
            other = [d for d in range(grad.dim()) if d != axis]
            found.append((param, axis, (grad != 0).any(dim=other) if other else grad != 0))
        if not found:
            return
        # one host synchronisation for all parameters: the omitted count of each; nonzero_static then needs none
        counts = torch.stack([(~kept).sum() for _, _, kept in found]).tolist()
        for (param, axis, kept), count in zip(found, counts):
            if count == 0:
                continue
            idx = torch.nonzero_static(~kept, size=count).squeeze(1)
            slices = {key: t.index_select(axis, idx) for key, t in self._shaped_state(opt, param).items()}
            slices[None] = param.detach().index_select(axis, idx)
            self.saved.append((param, idx, axis, slices))

    def restore(self, opt, args, kwargs):
        with torch.no_grad():
            for param, idx, axis, slices in self.saved:
                param.index_copy_(axis, idx, slices[None])
                for key, t in self._shaped_state(opt, param).items():
                    if key in slices:
                        t.index_copy_(axis, idx, slices[key])
                    else:   # state this step created (the first): an untouched unit's is zero
                        t.index_fill_(axis, idx, 0)
        self.saved.clear()


class _Handles(RemovableHandle):
    """Removes the pre- and post-step hooks together."""

    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
