"""Which tokens the SAT modules of a patched model score: the model's ``attention_mask`` (and ``labels``) reach them
through a forward pre-hook on the model.

The SAT modules see hidden states only (an MLP gets ``x``; an attention layer gets the 4-D mask the model built, or
none), so padding tokens and prompt tokens would count in the neuron and head scores like any other. ``replace_mlp``
and ``replace_attention`` register a :class:`ModelTokens` as a forward pre-hook (with kwargs) on the model they patch;
at every forward of that model it turns the 2-D ``attention_mask`` (and ``labels``) of the call into bool ``[B, T]``
masks, and each SAT module reads the one its ``score_tokens`` asks for and hands it to the op as ``token_mask``:

- ``"real"`` (default): the tokens with ``attention_mask != 0``, so padding (left or right) contributes nothing; a
  forward without a 2-D ``attention_mask`` scores every token;
- ``"loss"``: the real tokens whose logits enter the loss, ``labels[t + 1] != -100`` (Hugging Face's causal-LM loss
  shifts the labels; ``shift_labels``, when given, counts as it is): in supervised fine-tuning with the loss on the
  answers, the prompt tokens other than the last one do not count. A forward without ``labels`` scores its real
  tokens;
- ``"all"``: every token, the masks ignored (the behaviour before token masks existed).

The masks only change which units are kept; every token still goes through the modules.

Each forward of the model replaces the masks (with ``None`` when the call has no such input), so nothing of one
forward reaches the next. They stay set after the forward, for the backward: an activation checkpoint recomputes the
layers during the backward, after the model's forward has returned, and must score the same tokens to keep the same
units. So the masks of a forward are those of the model's latest forward: a backward through an earlier forward of the
same model after another forward (two forwards, then one backward of both) recomputes its checkpointed layers with
the later forward's masks (a clear error if their shapes differ from its tokens). Without activation checkpointing
nothing is recomputed and this cannot happen.

Everything here is plain Python on tensors, with no host synchronisation and no data-dependent shape:
``torch.compile`` of the model (``fullgraph=True`` included) traces the hook and the modules' reads in one graph.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

SCORE_TOKENS = ("real", "loss", "all")
# The default of replace_mlp / replace_attention and the SAT modules: padding never counts (docs/quality.md has the
# sft runs that compare the three choices).
DEFAULT_SCORE_TOKENS = "real"
IGNORE_INDEX = -100


class ModelTokens:
    """Forward pre-hook (``with_kwargs=True``) of a patched model that keeps the token masks of its latest forward.

    Attributes:
        real: bool ``[B, T]``, ``attention_mask != 0`` of the latest forward, or ``None`` (no 2-D mask given).
        loss: bool ``[B, T]``, the real tokens whose next-token label is not -100, or ``None`` (no labels given).

    An instance of a module-level class, so a patched model still pickles (``torch.save(model)``).
    """

    def __init__(self, model: nn.Module):
        self.real: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None
        # positions of the arguments in model.forward, for a call that passes them positionally
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._positions = {name: positional.index(name) for name in ("attention_mask", "labels")
                           if name in positional}

    def _argument(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        pos = self._positions.get(name)
        return args[pos] if pos is not None and pos < len(args) else None

    def __call__(self, model: nn.Module, args, kwargs) -> None:
        mask = self._argument("attention_mask", args, kwargs)
        real = mask != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        shift_labels = kwargs.get("shift_labels")
        labels = self._argument("labels", args, kwargs)
        loss = None
        if isinstance(shift_labels, torch.Tensor) and shift_labels.dim() == 2:
            loss = shift_labels != IGNORE_INDEX
        elif isinstance(labels, torch.Tensor) and labels.dim() == 2:
            loss = torch.cat([labels[:, 1:] != IGNORE_INDEX, labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)],
                             dim=1)
        if loss is not None and real is not None and loss.shape == real.shape:
            loss = loss & real
        self.real, self.loss = real, loss

    def mask(self, score_tokens: str, owner: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bool mask of the tokens of ``x`` ``[B, T, h]`` that a module with ``score_tokens`` scores, or ``None``
        (every token). A mask longer than ``T`` (the model's ``attention_mask`` covers a KV cache's past tokens and
        the ``T`` current ones) gives its last ``T`` columns; any other shape is an error naming ``owner``."""
        if score_tokens == "all":
            return None
        mask = self.loss if score_tokens == "loss" and self.loss is not None else self.real
        if mask is None:
            return None
        lead = tuple(x.shape[:-1])
        if len(lead) == 2 and mask.shape[0] == lead[0] and mask.shape[1] > lead[1]:
            mask = mask[:, mask.shape[1] - lead[1]:]
        if tuple(mask.shape) != lead:
            raise ValueError(f"{owner}: score_tokens={score_tokens!r} needs the model's [B, T] token mask to match "
                             f"the module's tokens {list(lead)}, but the model's forward got one of shape "
                             f"{list(mask.shape)}; use score_tokens='all' for models whose layers see other tokens "
                             f"than the model's inputs")
        return mask


def model_tokens(model: nn.Module) -> ModelTokens:
    """The :class:`ModelTokens` hook of ``model``, registered on it (once) if it has none."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, ModelTokens):
            return hook
    hook = ModelTokens(model)
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return hook


def remove_model_tokens(model: nn.Module) -> None:
    """Remove every :class:`ModelTokens` hook from ``model`` and its submodules."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, ModelTokens):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
