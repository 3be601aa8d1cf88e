"""Helpers every SAT op shares: accepted dtypes, autocast of the operands, validation of a given kept-index set and of
a token mask."""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_indices(indices, n: int, device: torch.device, name: str = "indices", units: str = "neurons") -> torch.Tensor:
    """Validate a kept-index set: 1-D integer, non-empty, strictly ascending, in ``[0, n)``; returns int64.

    The sortedness and range checks read the values, which synchronises with a GPU.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {indices.dtype}")
    if indices.dim() != 1 or indices.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {indices.device}")
    if indices.numel() > n:
        raise ValueError(f"{name} has {indices.numel()} entries, more than the {n} {units}")
    idx = indices.long()
    if bool(idx[0] < 0) or bool(idx[-1] >= n):
        raise ValueError(f"{name} must be in [0, {n}), got values from {int(idx.min())} to {int(idx.max())}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{name} must be sorted strictly ascending (unique); use torch.sort(...).values")
    return idx.contiguous()


def autocast_operands(tensors):
    """Cast the operands like ``F.linear`` under ``torch.autocast``; returns (tensors, device_type or None).

    A None entry stays None."""
    device_type = next(t for t in tensors if t is not None).device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [None if t is None else t.to(dtype) for t in tensors], device_type
    return list(tensors), None


def check_token_mask(token_mask, x: torch.Tensor, *, lead: Optional[tuple] = None, name: str = "token_mask",
                     role: str = "the tokens the scores cover") -> Optional[torch.Tensor]:
    """Validate the ``token_mask`` of an op on ``x`` ``[..., h]``: ``None``, or a bool or integer tensor of shape
    ``x.shape[:-1]`` (``lead`` when given) on ``x``'s device, nonzero / True for the tokens the scores cover (an
    integer 0/1 ``attention_mask`` as Hugging Face builds it passes as it is). Returns ``None`` or the mask as bool,
    of the same shape. Reads no values: no host synchronisation. ``name`` and ``role``: the argument's name and what
    its True entries mark, for the error messages."""
    if token_mask is None:
        return None
    shape = tuple(x.shape[:-1]) if lead is None else tuple(lead)
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"{name} must be None or a bool/integer tensor of shape {list(shape)} (x.shape[:-1], True "
                        f"or 1 for {role}), got {type(token_mask).__name__}")
    if token_mask.dtype != torch.bool and (token_mask.dtype.is_floating_point or token_mask.dtype.is_complex):
        raise TypeError(f"{name} must be a bool or integer tensor (True or 1 for {role}, e.g. an attention_mask), "
                        f"got {token_mask.dtype}")
    if tuple(token_mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (x.shape[:-1], one entry per token), got "
                         f"{list(token_mask.shape)}")
    if token_mask.device != x.device:
        raise ValueError(f"{name} must be on {x.device} (the device of x), got {token_mask.device}")
    return token_mask if token_mask.dtype == torch.bool else token_mask != 0
