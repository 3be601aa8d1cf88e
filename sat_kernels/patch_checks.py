"""What ``replace_mlp`` and ``replace_attention`` patch: the modules they find, and the checks that refuse, before any
module is changed, what SAT would compute differently (biases, adapters, extra parameters, other activations or
forwards, head layouts it does not model)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .lora import lora_parts, peft_adapter
from .forwards import LIGER_ADVICE, callable_path, is_liger
from .modules import SATMLP, class_path
from .ops.mlp.function import act_fwd

MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                     "Gemma3Attention")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def swiglu_mlps(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of the modules of ``model`` laid out as a SwiGLU MLP (``MLP_PARTS``), not yet SAT."""
    for name, module in model.named_modules():
        if not isinstance(module, SATMLP) and all(hasattr(module, p) for p in MLP_PARTS):
            yield name, module


def supported_attentions(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of the attention modules of ``model`` whose class SAT attention reproduces."""
    for name, module in model.named_modules():
        if type(module).__name__ in ATTENTION_CLASSES:
            yield name, module


def _detect_act(act_fn) -> Optional[str]:
    """Which supported activation ``act_fn`` computes, found by evaluating it (class names vary across versions)."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # any failure means "not a supported elementwise activation"
        return None
    for act in ("silu", "gelu_tanh"):
        if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(out, act_fwd(probe, act),
                                                                                          atol=1e-6, rtol=1e-5):
            return act
    return None


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


def liger_mlp(mlp: nn.Module) -> Optional[str]:
    """The Liger-Kernel forward or class that ``mlp`` runs (``LigerSwiGLUMLP``: its class when Liger patched the
    model's classes before loading, its forward when ``apply_liger_kernel_to_*(model=...)`` bound it), else ``None``."""
    if is_liger(type(mlp)):
        return class_path(mlp)
    forward = mlp.__dict__.get("forward")
    return callable_path(forward) if forward is not None and is_liger(forward) else None


def check_mlp(name: str, mlp: nn.Module) -> str:
    liger = liger_mlp(mlp)
    if liger is not None:
        raise ValueError(f"replace_mlp: {name} runs Liger-Kernel's {liger}. {LIGER_ADVICE}, before or after "
                         f"replace_mlp, on a model loaded again without Liger's SwiGLU")
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


def _full_shape(weight: torch.Tensor) -> tuple:
    """The shape of ``weight``, for a DeepSpeed ZeRO-3 parameter its whole shape (``ds_shape``), not the empty
    partition's."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


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
                except Exception as e:  # reported as "cannot check", with the cause
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


def _rms_norm_layout(norm: nn.Module, head_dim: int) -> Optional[Tuple[float, float]]:
    """``(eps, offset)`` of a per-head RMSNorm ``norm`` if it computes ``(offset + w) * x / sqrt(mean(x^2) + eps)``
    with ``offset`` 0 (Llama-style: Qwen3) or 1 (Gemma-style, weights stored as ``w - 1``: Gemma 3), else ``None``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(w, torch.Tensor) or _full_shape(w) != (head_dim,):
        return None
    gemma_style = type(norm).__name__.startswith("Gemma")
    # not materialized (patched before loading weights, or a DeepSpeed ZeRO-3 partition, empty outside a forward):
    # nothing to evaluate, trust the class
    if w.is_meta or hasattr(w, "ds_id"):
        return (eps, 1.0 if gemma_style else 0.0) if type(norm).__name__.endswith("RMSNorm") else None
    probe = torch.linspace(-3.0, 3.0, 3 * head_dim, dtype=w.dtype, device=w.device).view(3, head_dim)
    with torch.no_grad():
        try:
            out = norm(probe)
        except Exception:  # any failure means "not the supported RMSNorm"
            return None
        p32 = probe.float()
        n = p32 * torch.rsqrt(p32.pow(2).mean(-1, keepdim=True) + eps)
        for offset in (0.0, 1.0):
            want = ((offset + w.float()) * n).to(w.dtype) if offset else w * n.to(w.dtype)
            if isinstance(out, torch.Tensor) and out.shape == want.shape and torch.allclose(
                    out.float(), want.float(), atol=1e-5, rtol=1e-4):
                return eps, offset
    return None


def check_attention(name: str, attn: nn.Module) -> dict:
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
                         f"{[_full_shape(p.weight) for p in (q, k, v, o)]}")
    if ("q_norm" in children) != ("k_norm" in children):
        raise ValueError(f"replace_attention: {name} has only one of q_norm/k_norm")
    norms = {}
    for part in ("q_norm", "k_norm"):
        if part in children:
            norms[part] = _rms_norm_layout(children[part], head_dim)
            if norms[part] is None:
                raise ValueError(f"replace_attention: {name}.{part} ({type(children[part]).__name__}) is not a "
                                 f"per-head RMSNorm of size head_dim = {head_dim}")
    if len(set(norms.values())) > 1:
        raise ValueError(f"replace_attention: {name}.q_norm and k_norm differ in (epsilon, weight offset): {norms}")
    norm_eps, norm_offset = norms.get("q_norm", (1e-6, 0.0))
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"replace_attention: {name}.attn_logit_softcapping = {softcap}; SAT attention computes "
                         f"softmax(q k^T * scale) without a soft cap (set it to None, as Gemma 3 has it)")
    if getattr(attn, "attention_dropout", 0.0):
        raise ValueError(f"replace_attention: {name}.attention_dropout = {attn.attention_dropout}; SAT attention "
                         f"supports attention dropout 0 (the default of these models)")
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"replace_attention: attention implementation {impl!r} is not supported; load the model "
                         f"with attn_implementation='sdpa' (or 'eager')")
    scale = getattr(attn, "scaling", head_dim ** -0.5)
    return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=float(scale),
                norm_eps=norm_eps, norm_offset=norm_offset)
