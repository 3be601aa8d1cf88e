"""Layout of one attention call: :class:`AttentionSpec`, and which rows of the projections and which heads of the
token-major ``[B, T, heads, d]`` tensors belong to a set of query heads or KV groups.

Query head ``i`` owns rows ``i*d .. i*d + d - 1`` of ``W_q`` (and columns of ``W_o``); it reads KV group ``i // rep``
(``rep = H / G``), whose rows of ``W_k``/``W_v`` are numbered the same way. Nothing here synchronises with the host or
has a data-dependent size, so the attention op traces whole under ``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class AttentionSpec(NamedTuple):
    """Static description of one attention call (hashable, not a tensor)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    norm_eps: float
    return_kv: bool = False
    group_units: bool = False      # the kept heads form whole KV groups (unit="group")
    forward: str = "sparse"        # "dense": o_proj over every head (the exact output), the backward over the kept ones


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of operands of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Rows of ``W_q`` (or columns of ``W_o``) of the heads ``heads``: ``[len(heads) * d]``."""
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1)


def groups_of(heads: torch.Tensor, spec: AttentionSpec):
    """The KV groups whose keys and values the kept query heads ``heads`` (sorted) are computed with (sorted), and per
    head the position of its group among them.

    Their number depends only on ``len(heads)``, never on which heads were kept, and finding them needs no host
    synchronisation (the distinct groups of the heads, ``torch.unique``, would have a data-dependent size: a sync on
    GPU and a graph break under ``torch.compile``). With ``group_units`` the heads form ``len(heads) / rep`` whole
    groups. Otherwise the first ``min(G, len(heads))`` groups are every group that holds a kept head, then the
    lowest-numbered others, whose k/v gradients come out exactly zero: with at least G kept heads (SmolLM2: 3 groups,
    omission <= 2/3) that is all groups.
    """
    G = spec.num_kv_heads
    rep, kq = spec.num_heads // G, heads.numel()
    if rep == 1:
        return heads, torch.arange(kq, device=heads.device)
    of_head = torch.div(heads, rep, rounding_mode="floor")
    kg = kq // rep if spec.group_units else min(G, kq)
    if kg == G:
        return torch.arange(G, device=heads.device), of_head
    touched = torch.zeros(G, device=heads.device).index_fill_(0, of_head, 1.0)                      # [G]
    groups = torch.sort(torch.argsort(touched, descending=True, stable=True)[:kg]).values           # [kg]
    position = torch.zeros(G, dtype=torch.long, device=heads.device).index_copy_(
        0, groups, torch.arange(kg, device=heads.device))
    return groups, position[of_head]


def take_heads(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Heads ``idx`` of a token-major ``t`` ``[B, T, n, d]``: ``[B, T, len(idx), d]``, contiguous.

    A gather of ``d``-element rows on the ``[B*T, n, d]`` view (a copy first if ``t`` is not token-major contiguous):
    the same gather of single columns on the ``[B*T, n*d]`` view is a scalar loop on CPU, 9.4 vs 0.07 ms for 5 of 9
    heads of ``[4096, 9, 64]`` bf16 (1.2 vs 0.15 ms fp32; EPYC, 1 thread, torch 2.13).
    """
    B, T, n, d = t.shape
    return t.reshape(B * T, n, d).index_select(1, idx).view(B, T, idx.numel(), d)


def take_cols(w: torch.Tensor, heads: torch.Tensor, d: int) -> torch.Tensor:
    """The columns of the heads ``heads`` of ``w`` ``[R, n*d]`` (``W_o``): ``[R, len(heads)*d]``, as ``d``-element
    rows of the ``[R, n, d]`` view (see :func:`take_heads`)."""
    return w.view(w.shape[0], -1, d).index_select(1, heads).view(w.shape[0], -1)


def scatter_cols(cols: torch.Tensor, heads: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Zeros ``[R, n*d]`` with the head columns ``heads`` set to ``cols`` ``[R, len(heads)*d]`` (the inverse of
    :func:`take_cols`)."""
    R = cols.shape[0]
    return cols.new_zeros(R, n, d).index_copy_(1, heads, cols.view(R, -1, d)).view(R, n * d)


def sum_heads_into_groups(t: torch.Tensor, head_group: torch.Tensor, kg: int) -> torch.Tensor:
    """``[B, T, kq, d]`` per-head gradients summed into their groups: ``[B, T, kg, d]``.

    One batched matmul with the 0/1 ``[kg, kq]`` membership matrix (0.3 ms for ``[4, 512, 5, 64]`` fp32 on CPU):
    ``index_add_`` issues one strided add per head, each a parallel region, and measured from 0.09 to 73 ms between
    runs on the shared 2-core machine (torch 2.13).
    """
    member = (head_group[None, :] == torch.arange(kg, device=t.device)[:, None]).to(t.dtype)     # [kg, kq]
    return torch.matmul(member, t)


def project(x2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rows: Optional[torch.Tensor]):
    """``x2 W^T (+b)`` over the rows ``rows`` of ``W`` (and ``b``), or all rows for ``None``."""
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    return F.linear(x2, w, b)
