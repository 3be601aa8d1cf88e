"""``torch.library`` custom ops over the kernels of ``sat_kernels._C``.

Each op checks its arguments (type, dtype, shape, contiguity, sizes, and last the device) before it allocates its
output and launches on ``torch.cuda.current_stream()``, so bad input gets a ``TypeError``/``ValueError`` naming the
argument, never a crash inside a kernel; the checks need no GPU. Index *values* are not read on the host (that would
synchronise): gathers device-assert them, scatters need them strictly ascending (as :func:`select_kept` returns them).

Selection (:func:`select_kept`, :func:`select_neurons`): one launch per call, one thread block per row, no host sync.

- ``"topk"``: the ``k`` largest scores. Ties go to the lower index, so the set is the first ``k`` of a *stable*
  descending sort. NaN scores rank below every number (``-inf`` included): they are kept only when ``k`` exceeds the
  number of non-NaN scores. :func:`sat_kernels.select_neurons` (torch and triton backends) ranks the same way, so
  every backend keeps the same set from the same scores.
- ``"sample"``: ``k`` draws without replacement with probability proportional to the score: the top ``k`` of
  ``log(score) + Gumbel`` (zero or negative scores are drawn last).
- ``"random"``: ``k`` uniform draws without replacement.

The noise of ``"sample"``/``"random"`` is Philox4x32-10 in the kernel, keyed by ``(seed, offset, row, index)``:
reproducible from a ``torch.Generator`` (see :func:`philox_seed_offset`), but not the numbers of ``torch.rand``, so
the torch and cuda backends draw different (equally distributed) sets from one seed. Pre-drawn noise (``uniform``)
is used as is, e.g. the one all data-parallel ranks share. While a CUDA graph is being captured the noise is drawn
with ``torch.rand`` from the generator instead (reading a generator's seed and offset on the host raises then, and a
captured offset would replay one draw forever), so every replay draws anew.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import load_extension

STRATEGY_CODES = {"topk": 0, "sample": 1, "random": 2}
_ELEM_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
_MAX_DIM = 2 ** 31 - 1


def _check_tensor(t, name: str, dims: Tuple[int, ...], dtypes) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got shape {tuple(t.shape)} with strides "
                         f"{t.stride()}")


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_device(**tensors: Tensor) -> torch.device:
    """All tensors on one CUDA device, which is returned. Checked after everything else."""
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one CUDA device, got {devices}")
    return next(iter(tensors.values())).device


def _launch_args(device: torch.device) -> Tuple[int, int]:
    """(device index, handle of the current stream) for a launch on ``device``."""
    return device.index, torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------------------------------------------- selection
def _check_select(scores, uniform, k, strategy, seed, offset) -> Tuple[int, int, torch.device]:
    _check_tensor(scores, "scores", (1, 2), (torch.float32,))
    n = scores.shape[-1]
    rows = scores.shape[0] if scores.dim() == 2 else 1
    _check_int(n, "scores.shape[-1] (n)", 1, _MAX_DIM)
    _check_int(rows, "scores.shape[0] (rows)", 1, _MAX_DIM)
    _check_int(k, "k", 1, n)
    _check_int(strategy, "strategy", 0, 2)
    _check_int(seed, "seed", -2 ** 63, 2 ** 63 - 1)
    _check_int(offset, "offset", -2 ** 63, 2 ** 63 - 1)
    named = {"scores": scores}
    if uniform is not None:
        _check_tensor(uniform, "uniform", (scores.dim(),), (torch.float32,))
        if uniform.shape != scores.shape:
            raise ValueError(f"uniform must have the shape of scores {tuple(scores.shape)}, got {tuple(uniform.shape)}")
        if strategy == STRATEGY_CODES["topk"]:
            raise ValueError("uniform noise is only used by strategy 'sample' or 'random', got strategy 'topk'")
        named["uniform"] = uniform
    return rows, n, _check_device(**named)


@torch.library.custom_op("sat_kernels::cuda_select_kept", mutates_args=())
def _select_kept_op(scores: Tensor, uniform: Optional[Tensor], k: int, strategy: int, seed: int, offset: int,
                    index_int32: bool) -> Tensor:
    rows, n, device = _check_select(scores, uniform, k, strategy, seed, offset)
    out = torch.empty(*scores.shape[:-1], k, dtype=torch.int32 if index_int32 else torch.int64, device=device)
    workspace = torch.empty(rows * n, dtype=torch.int32, device=device)  # used when the keys exceed shared memory
    load_extension().select_kept(scores.data_ptr(), 0 if uniform is None else uniform.data_ptr(),
                                 workspace.data_ptr(), out.data_ptr(), index_int32, rows, n, k, strategy,
                                 seed % 2 ** 64, offset % 2 ** 64, *_launch_args(device))
    return out


@_select_kept_op.register_fake
def _(scores, uniform, k, strategy, seed, offset, index_int32):
    _check_select(scores, uniform, k, strategy, seed, offset)
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int32 if index_int32 else torch.int64)


def philox_seed_offset(generator: Optional[torch.Generator], device: torch.device) -> Tuple[int, int]:
    """``(seed, offset)`` of the in-kernel Philox noise, taken from ``generator`` and advancing it.

    A CUDA generator (``None``: the default generator of ``device``, the one ``torch.manual_seed`` seeds and activation
    checkpointing saves and restores) gives its seed and Philox offset and moves the offset on by 4, as a torch kernel
    drawing one 128-bit block per element would: the next call draws anew and a replay from a saved state draws the
    same. A CPU generator gives one 63-bit seed (offset 0). Reading them needs no GPU synchronisation, but raises
    while a CUDA graph is being captured: :func:`select_kept` then draws the noise with :func:`capture_noise`.
    """
    if generator is None:
        generator = torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()]
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type == "cuda":
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + 4)
        return seed, offset
    return int(torch.randint(0, 2 ** 63 - 1, (), generator=generator)), 0


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (``False`` without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def capture_noise(scores: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """U(0, 1) fp32 noise of the shape of ``scores`` drawn by ``torch.rand`` on their device, for use while a CUDA graph
    is captured: torch's CUDA generators hand a captured graph a fresh Philox offset at every replay.

    ``generator``: ``None`` (the default CUDA generator) or a CUDA generator (one other than the default must be
    registered with the graph, ``CUDAGraph.register_generator_state``); a CPU generator cannot run inside a graph.
    """
    if generator is not None and generator.device.type != "cuda":
        raise RuntimeError(f"strategy 'sample'/'random' of the cuda backend cannot draw from a generator on "
                           f"{generator.device} while a CUDA graph is being captured; pass a CUDA generator or None")
    return torch.rand(scores.shape, device=scores.device, generator=generator)


def _signed64(value: int) -> int:
    """A uint64 seed as the int64 that custom-op integer arguments carry (the kernel reads the same 64 bits)."""
    value %= 2 ** 64
    return value - 2 ** 64 if value >= 2 ** 63 else value


def select_kept(scores: Tensor, k: int, *, strategy: str = "topk", generator: Optional[torch.Generator] = None,
                uniform: Optional[Tensor] = None, index_dtype: torch.dtype = torch.int64) -> Tensor:
    """Sorted indices of the ``k`` kept neurons of each row of ``scores``, in one fused kernel launch.

    Args:
        scores: fp32 CUDA tensor ``[n]`` or ``[rows, n]`` (e.g. one row per layer), contiguous.
        k: kept count per row, in ``[1, n]``.
        strategy: ``"topk"``, ``"sample"`` or ``"random"`` (see the module docstring for ties and NaN).
        generator: source of the Philox seed/offset for ``"sample"``/``"random"`` (see :func:`philox_seed_offset`;
            while a CUDA graph is captured, of ``torch.rand`` noise: :func:`capture_noise`).
        uniform: pre-drawn U(0, 1) fp32 noise of the shape of ``scores``, used instead of Philox.
        index_dtype: ``torch.int64`` (default) or ``torch.int32``.

    Returns:
        ``[k]`` or ``[rows, k]`` indices, ascending in each row, on the device of ``scores``.

    Example:
        >>> idx = select_kept(scores, 7168)                        # scores: fp32 [14336] on CUDA
    """
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"strategy must be one of {list(STRATEGY_CODES)}, got {strategy!r}")
    if index_dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    code = STRATEGY_CODES[strategy]
    _check_select(scores, uniform, k, code, 0, 0)  # before the generator advances
    seed = offset = 0
    if code != STRATEGY_CODES["topk"] and uniform is None:
        if capturing():
            uniform = capture_noise(scores, generator)
        else:
            seed, offset = philox_seed_offset(generator, scores.device)
    return _select_kept_op(scores, uniform, k, code, _signed64(seed), _signed64(offset), index_dtype == torch.int32)


def select_neurons(scores: Tensor, k: int, *, strategy: str = "topk", generator: Optional[torch.Generator] = None,
                   uniform: Optional[Tensor] = None) -> Tensor:
    """:func:`sat_kernels.select_neurons` on the fused kernel: sorted int64 ``[k]`` from 1-D CUDA ``scores``.

    Scores of any float dtype are compared in fp32; ``k == n`` is ``arange(n)``. Ties and NaN: see
    :func:`select_kept`.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        got = (scores.dtype, tuple(scores.shape)) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D float tensor, got {got}")
    n = scores.numel()
    k = _check_int(k, "k", 1, n)
    if k == n:
        return torch.arange(n, device=scores.device)
    if uniform is not None:
        uniform = uniform.float().contiguous()
    return select_kept(scores.float().contiguous(), k, strategy=strategy, generator=generator, uniform=uniform)


# --------------------------------------------------------------------------------------------- gathers and scatters
def _check_gather(src, idx) -> torch.device:
    _check_tensor(src, "src", (2,), tuple(_ELEM_SIZE))
    _check_tensor(idx, "idx", (1,), (torch.int64,))
    return _check_device(src=src, idx=idx)


def _check_scatter(src, idx, n, dim: int) -> Tuple[int, torch.device]:
    _check_tensor(src, "src", (2,), tuple(_ELEM_SIZE))
    _check_tensor(idx, "idx", (1,), (torch.int64,))
    n = _check_int(n, "n", 0, 2 ** 62)
    if src.shape[dim] != idx.numel():
        raise ValueError(f"src.shape[{dim}] must equal the number of indices {idx.numel()}, got {tuple(src.shape)}")
    if idx.numel() > n:
        raise ValueError(f"idx has {idx.numel()} entries, more than n = {n}")
    return n, _check_device(src=src, idx=idx)


def _launch(kernel: str, out: Tensor, *args) -> Tensor:
    """Run the extension's ``kernel``, which writes ``out``; nothing to run for an empty ``out`` (zero tokens), whose
    zero-size grid would be a CUDA launch error."""
    if out.numel():
        getattr(load_extension(), kernel)(*args)
    return out


@torch.library.custom_op("sat_kernels::cuda_gather_rows", mutates_args=())
def _gather_rows_op(src: Tensor, idx: Tensor) -> Tensor:
    device = _check_gather(src, idx)
    (n, width), k = src.shape, idx.numel()
    out = torch.empty(k, width, dtype=src.dtype, device=device)
    return _launch("gather_rows", out, src.data_ptr(), idx.data_ptr(), out.data_ptr(), n, k, width,
                   src.element_size(), *_launch_args(device))


@_gather_rows_op.register_fake
def _(src, idx):
    _check_gather(src, idx)
    return src.new_empty(idx.numel(), src.shape[1])


@torch.library.custom_op("sat_kernels::cuda_gather_cols", mutates_args=())
def _gather_cols_op(src: Tensor, idx: Tensor) -> Tensor:
    device = _check_gather(src, idx)
    (rows, n), k = src.shape, idx.numel()
    out = torch.empty(rows, k, dtype=src.dtype, device=device)
    return _launch("gather_cols", out, src.data_ptr(), idx.data_ptr(), out.data_ptr(), rows, n, k,
                   src.element_size(), *_launch_args(device))


@_gather_cols_op.register_fake
def _(src, idx):
    _check_gather(src, idx)
    return src.new_empty(src.shape[0], idx.numel())


@torch.library.custom_op("sat_kernels::cuda_scatter_rows", mutates_args=())
def _scatter_rows_op(src: Tensor, idx: Tensor, n: int) -> Tensor:
    n, device = _check_scatter(src, idx, n, 0)
    k, width = src.shape
    out = torch.empty(n, width, dtype=src.dtype, device=device)
    return _launch("scatter_rows", out, src.data_ptr(), idx.data_ptr(), out.data_ptr(), n, k, width,
                   src.element_size(), *_launch_args(device))


@_scatter_rows_op.register_fake
def _(src, idx, n):
    n, _ = _check_scatter(src, idx, n, 0)
    return src.new_empty(n, src.shape[1])


@torch.library.custom_op("sat_kernels::cuda_scatter_cols", mutates_args=())
def _scatter_cols_op(src: Tensor, idx: Tensor, n: int) -> Tensor:
    n, device = _check_scatter(src, idx, n, 1)
    rows, k = src.shape
    out = torch.empty(rows, n, dtype=src.dtype, device=device)
    return _launch("scatter_cols", out, src.data_ptr(), idx.data_ptr(), out.data_ptr(), rows, n, k,
                   src.element_size(), *_launch_args(device))


@_scatter_cols_op.register_fake
def _(src, idx, n):
    n, _ = _check_scatter(src, idx, n, 1)
    return src.new_empty(src.shape[0], n)


# Public entry points: the same checks before the dispatcher sees the arguments (it would turn a list into a
# RuntimeError and a bool into an int).
def gather_rows(src: Tensor, idx: Tensor) -> Tensor:
    """``src[idx, :]``: ``src`` ``[n, W]`` (fp16/bf16/fp32/fp64), int64 ``idx`` ``[k]`` in ``[0, n)`` -> ``[k, W]``."""
    _check_gather(src, idx)
    return _gather_rows_op(src, idx)


def gather_cols(src: Tensor, idx: Tensor) -> Tensor:
    """``src[:, idx]``: ``src`` ``[R, n]`` (fp16/bf16/fp32/fp64), int64 ``idx`` ``[k]`` in ``[0, n)`` -> ``[R, k]``."""
    _check_gather(src, idx)
    return _gather_cols_op(src, idx)


def scatter_rows(src: Tensor, idx: Tensor, n: int) -> Tensor:
    """Zero ``[n, W]`` with row ``idx[j]`` = ``src[j]``: ``src`` ``[k, W]``, ``idx`` strictly ascending int64 ``[k]``.

    Every output element is written once (no separate zero fill); an index outside ``[0, n)`` is never matched.
    """
    n, _ = _check_scatter(src, idx, n, 0)
    return _scatter_rows_op(src, idx, n)


def scatter_cols(src: Tensor, idx: Tensor, n: int) -> Tensor:
    """Zero ``[R, n]`` with column ``idx[j]`` = ``src[:, j]``: ``src`` ``[R, k]``, ``idx`` strictly ascending ``[k]``.

    Every output element is written once (no separate zero fill); an index outside ``[0, n)`` is never matched.
    """
    n, _ = _check_scatter(src, idx, n, 1)
    return _scatter_cols_op(src, idx, n)
