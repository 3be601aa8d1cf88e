"""Synchronized selection across data-parallel ranks.

Each rank scores neurons from its local batch. With synchronization, the per-neuron score accumulators (``sum a^2``
for ``l2``/``contrib``, ``sum |a|`` for ``l1``: fp32, ``I`` floats per layer) are all-reduced, so every rank selects
from the scores of the GLOBAL batch and keeps the same neurons; the all-reduced gradient is then exactly the SAT
gradient of the global batch, and omitted neurons get zero gradient on every rank. For ``"sample"``/``"random"`` the
noise of rank 0 travels in the same all-reduce (the other ranks contribute zeros), so all ranks draw the same set.

Without synchronization each rank selects from its own batch: the ranks' gradients then cover different neuron sets
and their average is not a SAT gradient of any single selection (every neuron kept by some rank gets gradient).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def default_sync_group(sync_selection) -> Optional["dist.ProcessGroup"]:
    """Resolve a ``sync_selection`` setting to a process group or ``None`` (no synchronization).

    ``None`` (auto): the default group when ``torch.distributed`` is initialised with more than one rank.
    ``True``: the default group (error if not initialised). ``False``: none. A ``ProcessGroup``: that group.
    """
    if sync_selection is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if sync_selection is None:
        return dist.group.WORLD if initialized and dist.get_world_size() > 1 else None
    if sync_selection is True:
        if not initialized:
            raise ValueError("sync_selection=True needs an initialised torch.distributed process group")
        return dist.group.WORLD
    if initialized and isinstance(sync_selection, dist.ProcessGroup):
        return sync_selection
    raise TypeError(f"sync_selection must be None, True, False or a torch.distributed ProcessGroup, "
                    f"got {type(sync_selection).__name__}")


def all_reduce_scores(scores: torch.Tensor, metric: str, uniform: Optional[torch.Tensor],
                      group) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Global-batch scores (and rank 0's noise) from local fp32 ``scores`` in one all-reduce."""
    power = 1.0 if metric == "l1" else 2.0
    parts = [scores.float().pow(power)]
    if uniform is not None:
        parts.append(uniform.float() if dist.get_rank(group) == 0 else torch.zeros_like(uniform, dtype=torch.float32))
    buf = torch.cat(parts)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    n = scores.numel()
    return buf[:n].pow_(1.0 / power), (buf[n:] if uniform is not None else None)
