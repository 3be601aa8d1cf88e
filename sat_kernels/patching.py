"""Patch Hugging Face models in place: ``replace_mlp``, ``replace_attention``, ``set_omission_rate``, ``revert``.

Any decoder whose MLP modules have ``gate_proj``, ``up_proj``, ``down_proj`` (bias-free ``nn.Linear``) and an
``act_fn`` computing SiLU or tanh-GELU is supported: Llama, Mistral, Qwen2, Qwen3, Gemma and their relatives. Attention
is patched for the classes whose forward SAT attention reproduces (``LlamaAttention``, ``MistralAttention``,
``Qwen2Attention``, ``Qwen3Attention``, ``GemmaAttention``). The patched model keeps its parameter objects, names and
``state_dict`` keys.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .backends import resolve_backend
from .modules import SATMLP, SATAttention
from .ops.attention.checks import check_attention_backend
from .ops.sat_attention import DEFAULT_UNIT, UNITS
from .ops.sat_mlp import act_fwd
from .selection import FORWARD_MODES, METRICS, STRATEGIES, check_choice, check_omission_rate

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


def sat_modules(model: nn.Module, kind: Optional[str] = None) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of every SAT module in ``model``: of one kind with ``kind="mlp"`` / ``"attention"``."""
    classes = {None: (SATMLP, SATAttention), "mlp": SATMLP, "attention": SATAttention}[kind]
    for name, module in model.named_modules():
        if isinstance(module, classes):
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
    patched = list(sat_modules(model, "mlp"))
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


_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attentions(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module).__name__ in _ATTENTION_CLASSES:
            yield name, module


def _rms_norm_eps(norm: nn.Module, head_dim: int) -> Optional[float]:
    """The epsilon of a per-head RMSNorm ``norm`` if it computes ``w * x / sqrt(mean(x^2) + eps)``, else ``None``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(w, torch.Tensor) or tuple(w.shape) != (head_dim,):
        return None
    if w.is_meta:  # not materialized yet (patched before loading weights): nothing to evaluate, trust the class
        return eps if type(norm).__name__.endswith("RMSNorm") else None
    probe = torch.linspace(-3.0, 3.0, 3 * head_dim, dtype=w.dtype, device=w.device).view(3, head_dim)
    with torch.no_grad():
        try:
            out = norm(probe)
        except Exception:  # noqa: BLE001 - any failure means "not the supported RMSNorm"
            return None
        p32 = probe.float()
        want = w * (p32 * torch.rsqrt(p32.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype)
    ok = isinstance(out, torch.Tensor) and out.shape == want.shape and torch.allclose(out.float(), want.float(),
                                                                                      atol=1e-5, rtol=1e-4)
    return eps if ok else None


def _check_attention(name: str, attn: nn.Module) -> dict:
    """Check that ``attn`` is an attention SAT can reproduce; returns its layout (the SATAttention keywords)."""
    children = dict(attn.named_children())
    for part in _PROJECTIONS:
        proj = children.get(part)
        if not isinstance(proj, nn.Linear):
            raise ValueError(f"replace_attention: {name}.{part} must be an nn.Linear, got {type(proj).__name__} "
                             f"(apply replace_attention before adapters such as PEFT LoRA or quantization)")
    unknown = sorted(set(children) - set(_PROJECTIONS) - {"q_norm", "k_norm"})
    if unknown:
        raise ValueError(f"replace_attention: {name} has submodules SAT attention does not model: {unknown}")
    own = {id(p) for child in children.values() for p in child.parameters()}
    extra = [n for n, p in attn.named_parameters() if id(p) not in own]
    if extra or list(attn.named_buffers(recurse=False)):
        raise ValueError(f"replace_attention: {name} has parameters or buffers besides its submodules: "
                         f"{extra + [n for n, _ in attn.named_buffers(recurse=False)]}")
    head_dim = getattr(attn, "head_dim", None)
    config = getattr(attn, "config", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"replace_attention: {name}.head_dim must be a positive int, got {head_dim!r}")
    q, k, v, o = (children[p] for p in _PROJECTIONS)
    num_heads, num_kv_heads = q.out_features // head_dim, k.out_features // head_dim
    want = (getattr(config, "num_attention_heads", num_heads), getattr(config, "num_key_value_heads", num_kv_heads))
    if (q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features
            or o.in_features != q.out_features or k.in_features != q.in_features or v.in_features != q.in_features
            or (num_heads, num_kv_heads) != want or num_heads % num_kv_heads):
        raise ValueError(f"replace_attention: {name} head counts do not match its projections: head_dim {head_dim}, "
                         f"config heads (query, kv) {want}, q/k/v/o_proj shapes "
                         f"{[tuple(p.weight.shape) for p in (q, k, v, o)]}")
    if ("q_norm" in children) != ("k_norm" in children):
        raise ValueError(f"replace_attention: {name} has only one of q_norm/k_norm")
    eps = {}
    for part in ("q_norm", "k_norm"):
        if part in children:
            eps[part] = _rms_norm_eps(children[part], head_dim)
            if eps[part] is None:
                raise ValueError(f"replace_attention: {name}.{part} ({type(children[part]).__name__}) is not a "
                                 f"per-head RMSNorm of size head_dim = {head_dim}")
    if len(set(eps.values())) > 1:
        raise ValueError(f"replace_attention: {name}.q_norm and k_norm have different epsilons {eps}")
    norm_eps = eps.get("q_norm", 1e-6)
    if getattr(attn, "attention_dropout", 0.0):
        raise ValueError(f"replace_attention: {name}.attention_dropout = {attn.attention_dropout}; SAT attention "
                         f"supports attention dropout 0 (the default of these models)")
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"replace_attention: attention implementation {impl!r} is not supported; load the model "
                         f"with attn_implementation='sdpa' (or 'eager')")
    scale = getattr(attn, "scaling", head_dim ** -0.5)
    return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=float(scale),
                norm_eps=norm_eps)


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
                      forward: str = "sparse") -> nn.Module:
    """Replace every supported self-attention of ``model`` by a :class:`SATAttention` sharing its submodules, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the heads (or KV groups, ``unit="group"``) per layer and
    step and run ``o_proj`` and the whole backward over them only; ``eval()`` (generation and KV cache included) is
    exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.

    Supported: ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention`` (q/k/v biases), ``Qwen3Attention``
    (q_norm/k_norm), ``GemmaAttention``, with ``attn_implementation`` ``"sdpa"`` or ``"eager"`` (sliding windows are
    applied through the attention mask the model builds). Training-mode forwards refuse ``output_attentions``, a
    non-empty KV cache and attention dropout.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``.
        metric, strategy, unit, backend: as in :func:`sat_kernels.sat_attention`.
        sync_selection: as in :func:`replace_mlp`.
        forward: ``"sparse"`` (default) or ``"dense"``: the training forward's output is the dense model's (``o_proj``
            over every head) while the backward stays over the kept heads, as in :func:`sat_kernels.sat_attention`.

    Example:
        >>> sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
        >>> sk.set_omission_rate(model, mlp=0.5, attention=0.25)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rate = check_omission_rate(omission_rate)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(unit, UNITS, "unit")
    check_choice(forward, FORWARD_MODES, "forward")
    check_attention_backend(backend)
    found = list(_attentions(model))
    if any(name == "" for name, _ in found):
        raise ValueError("replace_attention: model is itself an attention module; pass the model that contains it")
    patched = list(sat_modules(model, "attention"))
    if not found and not patched:
        others = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "qkv_proj")
                         or hasattr(m, "c_attn")})
        raise ValueError(f"replace_attention: {type(model).__name__} has no supported attention module"
                         f"{f' ({others} are not supported)' if others else ''}; supported: {list(_ATTENTION_CLASSES)}")
    layouts = {name: _check_attention(name, attn) for name, attn in found}   # check all before changing any
    if found:
        _add_output_capture_installer(model)
    for name, attn in found:
        _set_child(model, name, SATAttention(attn, omission_rate=rate, metric=metric, strategy=strategy, unit=unit,
                                             backend=backend, sync_selection=sync_selection, forward=forward,
                                             **layouts[name]))
    for _, module in patched:
        module.omission_rate, module.metric, module.strategy, module.unit = rate, metric, strategy, unit
        module.backend, module.sync_selection, module.forward_mode = backend, sync_selection, forward
    return model


def set_omission_rate(model: nn.Module, rate: Optional[float] = None, *, mlp: Optional[float] = None,
                      attention: Optional[float] = None) -> nn.Module:
    """Set the omission rate of the SAT modules in ``model`` (0 makes them dense in training). Returns ``model``.

    ``set_omission_rate(model, r)`` sets every SAT module (MLP and attention). ``mlp=`` / ``attention=`` set one kind
    and take precedence over ``rate`` for it; a kind left ``None`` with ``rate`` ``None`` keeps its rate.

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
    return model


def revert(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very objects ``replace_mlp`` / ``replace_attention`` wrapped), MLP and
    attention alike. Returns ``model``."""
    for name, module in list(sat_modules(model)):
        module.dense_module.train(module.training)
        _set_child(model, name, module.dense_module)
    _remove_output_capture_installers(model)
    return model
