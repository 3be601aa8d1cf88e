"""Whether a SAT module still runs its own forward: another library (Liger-Kernel's SwiGLU) may have bound its own
forward to every MLP of a model, SAT modules included, which switches SAT off in them without an error."""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from .modules import SATMLP, SATAttention

# The forwards of the SAT classes as defined here: a class attribute patched later is a replaced forward too.
_OWN_FORWARDS = {SATMLP: SATMLP.forward, SATAttention: SATAttention.forward}

LIGER_ADVICE = ("Liger-Kernel's SwiGLU replaces the MLP's forward, which is where SAT runs: apply Liger with "
                "swiglu=False (e.g. apply_liger_kernel_to_llama(swiglu=False, model=model)); its RMSNorm, RoPE and "
                "fused linear cross-entropy work with SAT's MLP")


def _wraps(fn, target) -> bool:
    """Whether ``fn`` is ``target`` or calls it as a wrapper that says so: a bound method of it, a
    ``functools.partial`` of it, or a function whose ``__wrapped__`` chain reaches it (``functools.wraps``,
    accelerate's module hooks)."""
    for _ in range(32):
        if fn is target:
            return True
        nxt = getattr(fn, "__wrapped__", None)
        if nxt is None:
            nxt = getattr(fn, "__func__", None)
        if nxt is None and isinstance(fn, functools.partial):
            nxt = fn.func
        if nxt is None:
            return False
        fn = nxt
    return False


def callable_path(fn) -> str:
    """``module.qualname`` of the function behind ``fn`` (a bound method, a partial, a function)."""
    for _ in range(32):
        inner = getattr(fn, "__func__", None) or (fn.func if isinstance(fn, functools.partial) else None)
        if inner is None:
            break
        fn = inner
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def is_liger(fn_or_class) -> bool:
    """Whether a function or class comes from Liger-Kernel (``liger_kernel``)."""
    path = callable_path(fn_or_class) if not isinstance(fn_or_class, type) else fn_or_class.__module__
    return path.split(".", 1)[0] == "liger_kernel"


def replaced_forward(module: nn.Module) -> Optional[str]:
    """What runs instead of SAT when the SAT module ``module`` is called (``"module.qualname"`` of that function), or
    ``None`` when its forward is still its own.

    Its own: ``SATMLP.forward`` / ``SATAttention.forward``, directly or through a wrapper that keeps it as
    ``__wrapped__`` (``functools.wraps``, accelerate's hooks). Replaced: an instance attribute ``forward`` that does not
    wrap it (``apply_liger_kernel_to_llama(model=...)`` binds ``LigerSwiGLUMLP.forward`` to every MLP this way, SAT
    modules included), or a class whose ``forward`` is another (a class swapped in, a patched class attribute). A
    replaced forward does not select: SAT is off in that module, and it records no statistics.
    """
    own = _OWN_FORWARDS[SATMLP if isinstance(module, SATMLP) else SATAttention]
    fn = module.__dict__.get("forward", type(module).forward)
    return None if _wraps(fn, own) else callable_path(fn)
