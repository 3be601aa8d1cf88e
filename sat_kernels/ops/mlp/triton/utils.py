"""Shared pieces of the Triton kernels: activations, tile order, autotune configs, launcher checks."""
import torch
import triton
import triton.language as tl

from . import interpreting

INTERPRET = interpreting()

ACT_IDS = {"silu": 0, "gelu_tanh": 1}
SCORE_IDS = {None: 0, "l2": 1, "contrib": 1, "l1": 2}   # contrib = sqrt(sum a^2) * ||W_down[:, i]||: l2 partials


def _config(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_stages=stages, num_warps=warps)


FP32_BK = 32   # the BK of the fp32 (TF32) configs, which early_config_prune tells from the 16-bit ones by it

if INTERPRET:
    # The interpreter runs every program in numpy: one small config (no autotuning on CPU), 16 = tl.dot's minimum.
    TWO_ACC_CONFIGS = ONE_ACC_CONFIGS = SWIGLU_BWD_CONFIGS = [_config(16, 16, 16, 1, 1, group_m=2)]
    TWO_ACC_FP32_CONFIGS = ONE_ACC_FP32_CONFIGS = SWIGLU_BWD_FP32_CONFIGS = []
else:
    # Hopper (H100/H200) candidates for bf16/fp16, autotuned per shape. Their speed is not measured on a GPU yet (which
    # config wins at the Llama shapes must come from a GPU run of benchmarks/triton_mlp_speed.py). Checked statically
    # with benchmarks/triton_static_check.py (sm_90a cubins compiled without a GPU, bf16, 16-divisible shapes): every
    # config compiles to wgmma with 16-byte cp.async pipelining; with triton 3.9 no config of the default path spills,
    # the in-kernel gathers of w_down's columns (not the default, see down.py) up to 176 bytes per thread. (Triton 3.6,
    # before the fixed-granularity scores and the compact dW_down: at most 24 bytes, 112 in _down_weight_bwd_kernel at
    # 128x256, 352 in the gathers; not re-checked since.)
    # Two fp32 [BM, BN] accumulators (gate/up forward, dW_gate/dW_up): BN <= 128 keeps them in 128 registers/thread.
    TWO_ACC_CONFIGS = [
        _config(128, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
    ]
    ONE_ACC_CONFIGS = [
        _config(128, 256, 64, 3, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(128, 128, 64, 4, 4),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
    ]
    # dA + SwiGLU backward epilogue (_down_bwd_kernel): 128x256 / 256x128 tiles and 128x128 on 4 warps spill
    # 664-848 bytes even with the epilogue in halves, so they are left out.
    SWIGLU_BWD_CONFIGS = [
        _config(128, 128, 64, 4, 8),
        _config(128, 128, 64, 3, 8),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
    ]
    # fp32 operands with TF32 on (tf32 wgmma; without TF32 the triton launcher runs the torch backend, see
    # sat_mlp.py). 4-byte tiles: with BK = 64 the 3-stage 128-wide configs need 288 KB of shared memory (the limit is
    # 227 KB), so BK = 32. Static check (sm_90a, triton 3.9): all wgmma, at most 147 KB of shared memory; no spills
    # except 160 bytes in the score epilogue of _gate_up_fwd_kernel at 128x128 (the 64x64 config has none); the
    # weight-gradient kernels load their transposed operands without cp.async (tf32 wgmma wants K-major operands).
    TWO_ACC_FP32_CONFIGS = [
        _config(128, 128, FP32_BK, 3, 8),
        _config(64, 64, FP32_BK, 4, 4),
    ]
    ONE_ACC_FP32_CONFIGS = [
        _config(128, 256, FP32_BK, 3, 8),
        _config(128, 128, FP32_BK, 4, 8),
        _config(128, 64, FP32_BK, 4, 4),
        _config(64, 64, FP32_BK, 4, 4),
    ]
    SWIGLU_BWD_FP32_CONFIGS = [
        _config(128, 128, FP32_BK, 3, 8),
        _config(64, 128, FP32_BK, 4, 4),
        _config(64, 64, FP32_BK, 4, 4),
    ]


def _configs_for_dtype(configs, named_args, **kwargs):
    """``early_config_prune`` of the autotuned kernels: the fp32 configs (BK = FP32_BK) for fp32 operands, the others
    for 16-bit ones (the first kernel argument is an operand; the autotune key holds its dtype)."""
    fp32 = next(iter(named_args.values())).dtype == torch.float32
    return [c for c in configs if (c.kwargs["BK"] == FP32_BK) == fp32] or configs


BY_DTYPE = {"early_config_prune": _configs_for_dtype}


# Rows per score partial of the gate/up kernel: a fixed granularity that divides the BM of every config, so the
# partials, and the scores summed from them, do not depend on which config won autotuning.
SCORE_ROWS = min(c.kwargs["BM"] for c in TWO_ACC_CONFIGS)
assert all(c.kwargs["BM"] % SCORE_ROWS == 0 for c in TWO_ACC_CONFIGS + TWO_ACC_FP32_CONFIGS)


def tune_keys(*sizes: int) -> tuple:
    """Autotune keys of GEMM sizes: each rounded up to a power of two, at least 16.

    The token count T changes at almost every step (a collator pads to the longest example) and the kept count k
    with the omission schedule. Keyed on exact sizes, each new T or k would benchmark every config again (device
    syncs: seconds per step, and no CUDA-graph capture after warm-up); keyed on these buckets, sizes within a factor
    of two share one tuned config. Powers of two >= 16 are all divisible by 16, so the key arguments add no JIT
    specialisation (the kernels do not read them).
    """
    return tuple(max(16, triton.next_power_of_2(n)) for n in sizes)


def pad16(n: int) -> int:
    """``n`` rounded up to a multiple of 16."""
    return -(-n // 16) * 16


# Kept counts. The compact [T, k] tensors (G_S, U_S, A_S and their gradients) are [T, k] views of [T, pad16(k)]
# buffers whose pad columns are zero, and the kernels get the index padded with -1 entries to pad16(k) (see
# padded_index): they run over pad16(k) kept neurons, read zeros and store nothing for the -1 entries. A mask on a
# k that is not a multiple of 16 cannot be proven constant over 8 bf16 elements: compiled for sm_90a at k = 4403,
# down_fwd lost all of its 36 16-byte cp.async and its pipelining, the down backward epilogue issued 192 scalar
# stores instead of 24 16-byte ones (triton 3.9; tests/test_triton.py checks every kernel at k = 4403 and 5504).


def padded_empty(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Uninitialised ``[rows, cols]`` like ``like``, a view of a ``[rows, pad16(cols)]`` buffer.

    Triton specialises integer arguments divisible by 16, so the kernels see aligned rows and load them with 16-byte
    vectors (and ``cp.async``) even where ``cols`` (the kept count ``k``, e.g. 4403 of 11008 at omission 0.6) is odd.
    """
    return like.new_empty(rows, pad16(cols))[:, :cols]


def as_padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) itself if it has the layout of :func:`padded_empty` (the compact tensors of this backend, whose pad
    columns are zero), else a copy that has it, with zero pad columns."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) == pad16(cols):
        return t
    return t.new_zeros(rows, pad16(cols))[:, :cols].copy_(t)


def wide(t: torch.Tensor) -> torch.Tensor:
    """The ``[rows, pad16(cols)]`` view of ``t`` with the layout of :func:`padded_empty`: its pad columns included."""
    return t.as_strided((t.shape[0], pad16(t.shape[1])), (t.stride(0), 1))


def padded_index(idx: torch.Tensor) -> torch.Tensor:
    """The kept index ``idx [k]`` extended with -1 to ``pad16(k)`` entries, as the kernels take it."""
    pad = pad16(idx.numel()) - idx.numel()
    return torch.cat([idx, idx.new_full((pad,), -1)]) if pad else idx


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's cuBLAS TF32 setting like ``torch.mm``.

    Read from ``torch.backends.cuda.matmul.fp32_precision`` where it exists (torch 2.9+; it also reflects the legacy
    ``allow_tf32`` and ``torch.set_float32_matmul_precision``), because reading the legacy ``allow_tf32`` there raises
    ``RuntimeError`` once a user has set the new flag.
    """
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return "tf32" if matmul.fp32_precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def on_device(t: torch.Tensor):
    """``with on_device(t):`` makes ``t``'s CUDA device current for the Triton launches inside.

    Triton launches on ``torch.cuda.current_device()`` and its current stream, not on the device of its arguments: a
    layer on cuda:1 (``device_map="auto"``, any model split over GPUs) would otherwise launch on cuda:0 (an illegal
    address, or a race with peer access). For a CPU tensor (the interpreter) ``get_device()`` is -1, for which
    ``torch.cuda.device`` does nothing.
    """
    return torch.cuda.device(t.get_device())


def check_tensors(*tensors: torch.Tensor) -> None:
    """Dtype/device rules of the Triton backend, as a clear error instead of a wrong result or a crash."""
    t = tensors[0]
    if INTERPRET:
        if t.dtype not in (torch.float32, torch.float16):
            raise TypeError(f"backend='triton' under TRITON_INTERPRET=1 supports float32 and float16 only, got "
                            f"{t.dtype} (the interpreter computes bfloat16 wrongly; use backend='torch')")
    else:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {t.dtype} "
                            f"(use backend='torch')")
        if t.device.type != "cuda":
            raise ValueError(f"backend='triton' needs CUDA tensors, got device {t.device} (or set TRITON_INTERPRET=1 "
                             f"before importing triton to run the kernels on CPU in the interpreter)")


@triton.jit
def tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of program ``pid``, GROUP_M row tiles at a time so their operands stay in L2."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    i_m = first_m + (pid % width) % size_m
    i_n = (pid % width) // size_m
    return i_m, i_n


@triton.jit
def split_cols(b, BM: tl.constexpr, BN: tl.constexpr):
    """The two ``[BM, BN // 2]`` column halves of ``b [BM, BN]``.

    Epilogues that run on each half in turn keep half as many fp32 temporaries live. Static check (ptxas resource
    usage of the sm_90a cubin, triton 3.9, bf16, BM = BN = 128, 8 warps): the dA + SwiGLU epilogue of
    ``_down_bwd_kernel`` needs 143 registers and no stack in halves, 255 registers + 1064 bytes of spills in one piece.
    """
    return tl.split(tl.permute(tl.reshape(b, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    """``act(g)`` in fp32: 0 = SiLU, 1 = tanh-approximated GELU."""
    if ACT == 0:
        y = g * _sigmoid(g)
    else:
        t = 2.0 * _sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) - 1.0   # tanh(sqrt(2/pi) (g + c g^3))
        y = 0.5 * g * (1.0 + t)
    return y


@triton.jit
def act_fwd_bwd(g, ACT: tl.constexpr):
    """``(act(g), act'(g))`` in fp32."""
    if ACT == 0:
        s = _sigmoid(g)
        y = g * s
        dy = s * (1.0 + g * (1.0 - s))
    else:
        t = 2.0 * _sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) - 1.0
        y = 0.5 * g * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    return y, dy
