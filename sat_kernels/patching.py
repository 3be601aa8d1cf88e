"""Patch Hugging Face models in place: ``replace_mlp``, ``replace_attention``, ``set_omission_rate``, ``revert``,
``patch_summary``.

Any decoder whose MLP modules have ``gate_proj``, ``up_proj``, ``down_proj`` (bias-free ``nn.Linear``) and an
``act_fn`` computing SiLU or tanh-GELU is supported: Llama, Mistral, Qwen2, Qwen3, Gemma and their relatives. Attention
is patched for the classes whose forward SAT attention reproduces (``LlamaAttention``, ``MistralAttention``,
``Qwen2Attention``, ``Qwen3Attention``, ``GemmaAttention``). The patched model keeps its parameter objects, names and
``state_dict`` keys. PEFT LoRA on the MLP projections is supported whether it is added before or after patching
(:mod:`sat_kernels.lora`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .backends import resolve_backend
from .lora import lora_parts, peft_adapter
from .modules import SATMLP, SATAttention, class_path
from .ops.attention import DEFAULT_UNIT, UNITS
from .ops.attention.checks import check_attention_backend
from .ops.mlp.function import act_fwd
from .selection import ATTENTION_STRATEGIES, DEFAULT_FORWARD, FORWARD_MODES, METRICS, STRATEGIES, check_choice, \
    check_omission_rate

logger = logging.getLogger("sat_kernels")

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


def _check_linear(fn: str, name: str, proj, advice: str) -> None:
    """Refuse, at patch time, a projection that is not a plain ``nn.Linear``; ``advice``: what to do with adapters."""
    adapter = peft_adapter(proj)
    if adapter is not None:
        raise ValueError(f"{fn}: {name} is a {adapter} layer ({class_path(proj)}); "
                         f"SAT does not support {adapter} adapters on these projections: {advice}")
    if not isinstance(proj, nn.Linear):
        raise ValueError(f"{fn}: {name} must be an nn.Linear, got {class_path(proj)} "
                         f"(SAT reads its weight without calling it: wrapped or quantized projections are not "
                         f"supported)")


def _check_mlp(name: str, mlp: nn.Module) -> str:
    for part in ("gate_proj", "up_proj", "down_proj"):
        proj, _ = lora_parts(f"replace_mlp: {name}.{part}", getattr(mlp, part))
        _check_linear("replace_mlp", f"{name}.{part}", proj, "use PEFT LoRA (which SAT supports on the MLP) or put "
                      "these adapters on the attention projections only, before or after replace_mlp")
        if proj.bias is not None:
            raise ValueError(f"replace_mlp: {name}.{part} has a bias; the SAT MLP supports bias-free projections")
    own = {id(p) for part in ("gate_proj", "up_proj", "down_proj") for p in getattr(mlp, part).parameters()}
    extra = [n for n, p in mlp.named_parameters() if id(p) not in own]
    if extra:
        raise ValueError(f"replace_mlp: {name} has parameters besides its three projections: {extra}")
    act = _detect_act(mlp.act_fn)
    if act is None:
        raise ValueError(f"replace_mlp: {name}.act_fn ({type(mlp.act_fn).__name__}) is neither SiLU nor tanh-GELU")
    _check_swiglu_forward(name, mlp)
    return act


def _materialized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds its values here: not on the meta device (patched before loading), not a DTensor
    shard (FSDP2), not a DeepSpeed ZeRO-3 partition (``ds_id``, empty until gathered)."""
    return not (weight.is_meta or weight.numel() == 0 or type(weight).__name__ == "DTensor"
                or hasattr(weight, "ds_id"))


def _check_swiglu_forward(name: str, mlp: nn.Module) -> None:
    """Refuse an MLP whose forward is not ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, which SAT computes.

    Dropout submodules (outside the projections) are refused. Then the module's own forward is run on a small probe
    input, in eval mode and in training mode (the projections in eval mode, the global RNG untouched), and compared with
    that formula: extra multipliers (FalconH1), activation sparsity (Gemma3n), clamps or functional dropout on
    ``self.training`` (SeedOss's residual dropout) show up as a mismatch. Skipped when the weights are not
    materialized here (meta device, sharded, partitioned).
    """
    projections = ("gate_proj", "up_proj", "down_proj")
    dropout = [f"{child_name}.{sub_name}".rstrip(".") for child_name, child in mlp.named_children()
               if child_name not in projections for sub_name, sub in child.named_modules()
               if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0]
    if dropout:
        raise ValueError(f"replace_mlp: {name} ({type(mlp).__name__}) has dropout {dropout}, which SAT does not "
                         f"apply; set its p to 0 to patch it")
    weight = mlp.gate_proj.weight
    if not all(_materialized(getattr(mlp, part).weight) for part in projections):
        return
    x = torch.randn(1, 5, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    modes = {module: module.training for module in mlp.modules()}
    rng_devices = [weight.device.index] if weight.device.type not in ("cpu", "meta") else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices, device_type=weight.device.type):
            mlp.eval()
            want = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            for training in (False, True):
                mlp.training = training
                try:
                    out = mlp(x)
                except Exception as e:  # noqa: BLE001 - reported as "cannot check", with the cause
                    raise ValueError(f"replace_mlp: {name} ({type(mlp).__name__}) failed on a probe input of shape "
                                     f"{tuple(x.shape)} ({type(e).__name__}: {e})") from e
                _compare_probe(name, mlp, out, want, "training" if training else "eval")
    finally:
        for module, mode in modes.items():
            module.training = mode


def _compare_probe(name: str, mlp: nn.Module, out, want: torch.Tensor, mode: str) -> None:
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2
    finite = want.float()[want.isfinite()]   # non-finite weights (NaN rows) give NaN in both: nothing to compare
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if isinstance(out, torch.Tensor) and out.shape == want.shape and torch.allclose(
            out.float(), want.float(), rtol=tol, atol=tol * scale, equal_nan=True):
        return
    err = (f"differs by up to {float((out.float() - want.float()).abs().nan_to_num(nan=float('inf')).max()):.3g} "
           f"(largest value {scale:.3g})"
           if isinstance(out, torch.Tensor) and out.shape == want.shape else
           f"returns {getattr(out, 'shape', type(out).__name__)}")
    hints = [f"{key}={value}" for key, value in vars(mlp).items()
             if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0]
    hint = f"; {', '.join(hints)} looks like a dropout: set it to 0 to patch it" if hints else ""
    raise ValueError(f"replace_mlp: {name} ({type(mlp).__name__}) does not compute "
                     f"down_proj(act_fn(gate_proj(x)) * up_proj(x)): in {mode} mode its forward {err} on a probe "
                     f"input, so SAT would change what it computes (multipliers, clamps, activation sparsity, "
                     f"dropout){hint}")


def replace_mlp(model: nn.Module, omission_rate: float = 0.5, *, metric: str = "l2", strategy: str = "topk",
                backend: str = "auto", sync_selection=None, forward: str = DEFAULT_FORWARD) -> nn.Module:
    """Replace every SwiGLU MLP of ``model`` by a :class:`SATMLP` sharing its parameters, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the intermediate neurons per layer and step; ``eval()``
    is exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.
    What was patched and what was not (mixture-of-experts blocks: only their shared experts) is logged on the
    ``"sat_kernels"`` logger and returned by :func:`patch_summary`.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``; usually driven by a schedule through :class:`SATCallback` afterwards.
        metric, strategy, backend: as in :func:`sat_kernels.sat_mlp`.
        sync_selection: ``None`` (auto: synchronized across ranks when torch.distributed is initialised with several
            ranks, as under DDP/FSDP), ``True``/a ``ProcessGroup``, or ``False`` (each rank selects from its own
            batch). See :mod:`sat_kernels.distributed`.
        forward: ``"dense"`` (default: exact forward output, backward over the kept neurons only) or ``"sparse"``
            (omitted neurons are left out of the output too, the paper's mode); see :func:`sat_kernels.sat_mlp` and
            ``DEFAULT_FORWARD`` in :mod:`sat_kernels.selection` for the measurements behind the default.

    Example:
        >>> model = sk.replace_mlp(AutoModelForCausalLM.from_pretrained(path), omission_rate=0.5)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rate = check_omission_rate(omission_rate)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(forward, FORWARD_MODES, "forward")
    resolve_backend(backend)
    found = list(_swiglu_mlps(model))
    if any(name == "" for name, _ in found):
        raise ValueError("replace_mlp: model is itself an MLP; pass the model that contains it, or wrap it in SATMLP")
    patched = list(sat_modules(model, "mlp"))
    if not found and not patched:
        skipped = "".join(f"; its layers' {cls}: {why}" for cls, why in _summary(model, "mlp").skipped.items())
        raise ValueError(f"replace_mlp: {type(model).__name__} has no SwiGLU MLP (a module with gate_proj, up_proj, "
                         f"down_proj and act_fn){skipped}; supported: Llama, Mistral, Qwen2, Qwen3 and decoders with "
                         f"that layout")
    acts = {name: _check_mlp(name, mlp) for name, mlp in found}   # check all before changing any
    for name, mlp in found:
        _set_child(model, name, SATMLP(mlp, acts[name], rate, metric=metric, strategy=strategy, backend=backend,
                                       sync_selection=sync_selection, forward=forward))
    for _, module in patched:
        module.omission_rate, module.metric, module.strategy = rate, metric, strategy
        module.backend, module.sync_selection, module.forward_mode = backend, sync_selection, forward
    _log_summary("replace_mlp", model, "mlp")
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
        _check_linear("replace_attention", f"{name}.{part}", children.get(part), "leave the attention unpatched "
                      "(replace_mlp alone works with adapters on the attention projections)")
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
                      forward: str = DEFAULT_FORWARD) -> nn.Module:
    """Replace every supported self-attention of ``model`` by a :class:`SATAttention` sharing its submodules, in place.

    Training-mode forwards then keep ``1 - omission_rate`` of the heads (or KV groups, ``unit="group"``) per layer and
    step and run ``o_proj`` and the whole backward over them only; ``eval()`` (generation and KV cache included) is
    exactly the original model. Calling it again on a patched model updates the settings. Returns ``model``.
    What was patched and what was not is logged and returned by :func:`patch_summary`.

    Supported: ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention`` (q/k/v biases), ``Qwen3Attention``
    (q_norm/k_norm), ``GemmaAttention``, with ``attn_implementation`` ``"sdpa"`` or ``"eager"`` (sliding windows are
    applied through the attention mask the model builds). Training-mode forwards refuse ``output_attentions``, a
    non-empty KV cache and attention dropout.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
        omission_rate: in ``[0, 1)``.
        metric, strategy, unit, backend: as in :func:`sat_kernels.sat_attention`.
        sync_selection: as in :func:`replace_mlp`.
        forward: ``"dense"`` (default): the training forward's output is the dense model's (``o_proj`` over every
            head) while the backward stays over the kept heads; ``"sparse"``: omitted heads are left out of the output
            too. As in :func:`sat_kernels.sat_attention`.

    Example:
        >>> sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
        >>> sk.set_omission_rate(model, mlp=0.5, attention=0.25)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rate = check_omission_rate(omission_rate)
    check_choice(metric, METRICS, "metric")
    check_choice(strategy, ATTENTION_STRATEGIES, "strategy")
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
    _log_summary("replace_attention", model, "attention")
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
    attention alike, with the SAT modules' current children: adapters added after patching (PEFT LoRA) stay.
    Returns ``model``."""
    for name, module in list(sat_modules(model)):
        module.dense_module.train(module.training)
        _set_child(model, name, module.dense_module)
    _remove_output_capture_installers(model)
    return model


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
        if type(module).__name__ not in _ATTENTION_CLASSES:
            return f"not a supported attention class (supported: {', '.join(_ATTENTION_CLASSES)})"
        return "not patched: replace_attention was not called or was reverted"
    missing = [part for part in _MLP_PARTS if not hasattr(module, part)]
    if missing:
        return f"not a SwiGLU MLP: no {', '.join(missing)}"
    return "not patched: replace_mlp was not called or was reverted"


def _summary(model: nn.Module, kind: str) -> PatchSummary:
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
    return {kind: _summary(model, kind) for kind in _SAT_CLASSES}


def _log_summary(fn: str, model: nn.Module, kind: str) -> None:
    summary = _summary(model, kind)
    logger.log(logging.INFO if summary.complete else logging.WARNING, "%s: %s", fn, summary)
