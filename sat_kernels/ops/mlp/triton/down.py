"""Down projection of the SAT MLP over the kept neurons in Triton: forward and its backward GEMMs.

Layouts (row-major, unit column stride): kept activations ``A_S``, pre-activations ``G_S``, ``U_S`` and their
gradients ``[T, kp]``, ``kp = pad16(k)``, zero in the pad columns; ``w_down [h, I]`` and ``dy [T, h]`` contiguous. The
kept columns of ``w_down`` are either gathered inside the GEMM through the sorted index padded with -1 to ``kp``
entries (``idx`` given: the K loop of the forward / the N tile of ``dA`` reads ``w_down[:, idx]``, zeros for -1) or
read from a compact copy ``w_down[:, idx]`` (``[h, kp]``, zero pad columns, ``idx=None``). The kept columns are the
contiguous dimension of ``w_down``, so the in-kernel gather loads 2-byte scalars (no 16-byte vectors), while the
compaction costs one extra pass over ``h * I`` elements; which is faster on a GPU is not measured yet
(``benchmarks/triton_mlp_speed.py`` times both).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import ACT_IDS, BY_DTYPE, INTERPRET, ONE_ACC_CONFIGS, ONE_ACC_FP32_CONFIGS, SWIGLU_BWD_CONFIGS, \
    SWIGLU_BWD_FP32_CONFIGS, act_fwd_bwd, as_padded, dot_precision, padded_empty, split_cols, tile_ids, tune_keys


@triton.autotune(configs=ONE_ACC_CONFIGS + ONE_ACC_FP32_CONFIGS, key=["M_KEY", "N_KEY", "K_KEY", "GATHER"],
                 prune_configs_by=BY_DTYPE)
@triton.jit
def _down_fwd_kernel(a_ptr, wd_ptr, idx_ptr, y_ptr, M, N, K, M_KEY, N_KEY, K_KEY, LDA, LDW, GATHER: tl.constexpr,
                     PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """y = A_S W_down[:, S]^T (M = T, N = h, K = kp), fp32 accumulation.

    GATHER: column kk of the K loop is w_down[:, idx[kk]] (LDW = I; zero for idx[kk] = -1); else w_down is the compact
    [h, kp] (LDW >= kp).
    """
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM] tokens
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN] hidden
    o_k = tl.arange(0, BK)                                             # [BK] kept neurons
    m_m = o_m < M
    m_n = o_n < N
    p_a = a_ptr + o_m.to(tl.int64)[:, None] * LDA + o_k[None, :]       # [BM, BK]
    o_wn = o_n.to(tl.int64)[None, :] * LDW                             # [1, BN]
    b_y = tl.zeros((BM, BN), dtype=tl.float32)                         # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        if GATHER:
            c_k = tl.load(idx_ptr + k0 + o_k, mask=m_k, other=-1)      # [BK] int64 columns of w_down, -1: padding
            m_wk = c_k >= 0
        else:
            c_k = k0 + o_k
            m_wk = m_k
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)                           # [BM, BK]
        b_w = tl.load(wd_ptr + o_wn + c_k[:, None], mask=m_wk[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        b_y = tl.dot(b_a, b_w, b_y, input_precision=PRECISION)
        p_a += BK
    o_out = o_m.to(tl.int64)[:, None] * N + o_n[None, :]               # [BM, BN]
    tl.store(y_ptr + o_out, b_y.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def down_fwd(a_s: torch.Tensor, w_down: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [T, h] = A_S W_down[:, idx]^T`` (also the dense ``A W_down^T``: ``a_s = A [T, I]``, ``idx=None``).

    Args:
        a_s: ``[T, kp]`` kept activations.
        w_down: ``[h, I]`` with ``idx`` (``[kp]`` sorted int64 padded with -1, :func:`.utils.padded_index`, gathered
            in the kernel), or the compact ``[h, kp]`` ``w_down[:, idx]`` with zero pad columns and ``idx=None``;
            unit column stride.
    """
    T, k = a_s.shape
    h = w_down.shape[0]
    y = a_s.new_empty(T, h)
    if T == 0:
        return y
    grid = lambda meta: (triton.cdiv(T, meta["BM"]) * triton.cdiv(h, meta["BN"]),)  # noqa: E731
    _down_fwd_kernel[grid](a_s, w_down, idx, y, T, h, k, *tune_keys(T, h, k), a_s.stride(0), w_down.stride(0),
                           GATHER=idx is not None, PRECISION=dot_precision(a_s.dtype))
    return y


@triton.autotune(configs=SWIGLU_BWD_CONFIGS + SWIGLU_BWD_FP32_CONFIGS,
                 key=["M_KEY", "N_KEY", "K_KEY", "GATHER"], prune_configs_by=BY_DTYPE)
@triton.jit
def _down_bwd_kernel(dy_ptr, wd_ptr, idx_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, a_ptr, M, N, K, M_KEY, N_KEY, K_KEY, LDS,
                     LDW, GATHER: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """dA_S = dy W_down[:, S] (M = T, N = kp, K = h) with the SwiGLU backward in the epilogue.

    From the saved G_S, U_S (act recomputed in fp32): dG_S = dA_S * U_S * act'(G_S), dU_S = dA_S * act(G_S), and
    A_S = act(G_S) * U_S for dW_down, in two column halves (see split_cols); dA_S itself never goes to memory. All five
    [T, k] share the row stride LDS.
    """
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM] tokens
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN] kept neurons
    o_k = tl.arange(0, BK)                                             # [BK] hidden
    m_m = o_m < M
    m_n = o_n < N
    if GATHER:
        c_n = tl.load(idx_ptr + o_n, mask=m_n, other=-1)               # [BN] int64 columns of w_down, -1: padding
        m_wn = c_n >= 0
    else:
        c_n = o_n.to(tl.int64)
        m_wn = m_n
    p_dy = dy_ptr + o_m.to(tl.int64)[:, None] * K + o_k[None, :]       # [BM, BK]
    o_w = o_k.to(tl.int64)[:, None] * LDW + c_n[None, :]              # [BK, BN]
    b_da = tl.zeros((BM, BN), dtype=tl.float32)                        # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_k[None, :], other=0.0)              # [BM, BK]
        b_w = tl.load(wd_ptr + o_w, mask=m_k[:, None] & m_wn[None, :], other=0.0)      # [BK, BN]
        b_da = tl.dot(b_dy, b_w, b_da, input_precision=PRECISION)
        p_dy += BK
        o_w += BK * LDW
    b_da0, b_da1 = split_cols(b_da, BM, BN)                             # [BM, BN // 2] each
    o_h = tl.arange(0, BN // 2)                                         # [BN // 2]
    _swiglu_bwd_epilogue(b_da0, o_m, i_n * BN + o_h, M, N, LDS, g_ptr, u_ptr, dg_ptr, du_ptr, a_ptr, ACT)
    _swiglu_bwd_epilogue(b_da1, o_m, i_n * BN + BN // 2 + o_h, M, N, LDS, g_ptr, u_ptr, dg_ptr, du_ptr, a_ptr, ACT)


@triton.jit
def _swiglu_bwd_epilogue(b_da, o_m, o_n, M, N, LDS, g_ptr, u_ptr, dg_ptr, du_ptr, a_ptr, ACT: tl.constexpr):
    """dG, dU, A of one column block (b_da [BM, BH] fp32, columns o_n) from G_S, U_S."""
    o_out = o_m.to(tl.int64)[:, None] * LDS + o_n[None, :]             # [BM, BH]
    m_out = (o_m < M)[:, None] & (o_n < N)[None, :]
    b_g = tl.load(g_ptr + o_out, mask=m_out, other=0.0).to(tl.float32)                 # [BM, BH]
    b_u = tl.load(u_ptr + o_out, mask=m_out, other=0.0).to(tl.float32)                 # [BM, BH]
    b_act, b_dact = act_fwd_bwd(b_g, ACT)                                              # [BM, BH]
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + o_out, (b_da * b_u * b_dact).to(dtype), mask=m_out)
    tl.store(du_ptr + o_out, (b_da * b_act).to(dtype), mask=m_out)
    tl.store(a_ptr + o_out, (b_act * b_u).to(dtype), mask=m_out)


def down_bwd(dy: torch.Tensor, w_down: torch.Tensor, idx: Optional[torch.Tensor], g_s: torch.Tensor,
             u_s: torch.Tensor, act: str = "silu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dG_S, dU_S, A_S)``, each ``[T, kp]``, from ``dA_S = dy W_down[:, idx]`` and the saved ``G_S``, ``U_S``.

    Args:
        dy: ``[T, h]``; w_down and idx: as in :func:`down_fwd`; g_s, u_s: ``[T, kp]``, zero in the pad columns;
            act: ``"silu"``/``"gelu_tanh"``.
    """
    T, k = g_s.shape
    h = dy.shape[1]
    g_s, u_s = as_padded(g_s), as_padded(u_s)
    dg_s, du_s, a_s = (padded_empty(g_s, T, k) for _ in range(3))
    if T == 0:
        return dg_s, du_s, a_s
    grid = lambda meta: (triton.cdiv(T, meta["BM"]) * triton.cdiv(k, meta["BN"]),)  # noqa: E731
    _down_bwd_kernel[grid](dy, w_down, idx, g_s, u_s, dg_s, du_s, a_s, T, k, h, *tune_keys(T, k, h), dg_s.stride(0),
                           w_down.stride(0), GATHER=idx is not None, ACT=ACT_IDS[act],
                           PRECISION=dot_precision(dy.dtype))
    return dg_s, du_s, a_s


@triton.autotune(configs=ONE_ACC_CONFIGS + ONE_ACC_FP32_CONFIGS, key=["M_KEY", "N_KEY", "K_KEY"],
                 prune_configs_by=BY_DTYPE)
@triton.jit
def _down_weight_bwd_kernel(dy_ptr, a_ptr, dws_ptr, M, N, K, M_KEY, N_KEY, K_KEY, LDA, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """dW_down[:, S] = dy^T A_S (M = h, N = kp, K = T) into the compact [h, kp] gradient (contiguous)."""
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM] hidden
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN] kept neurons
    o_k = tl.arange(0, BK)                                             # [BK] tokens
    m_m = o_m < M
    m_n = o_n < N
    o_dy = o_k.to(tl.int64)[None, :] * M + o_m[:, None]                # [BM, BK] into dy [T, h], transposed
    o_a = o_k.to(tl.int64)[:, None] * LDA + o_n[None, :]               # [BK, BN]
    b_dw = tl.zeros((BM, BN), dtype=tl.float32)                        # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        b_dy = tl.load(dy_ptr + o_dy, mask=m_m[:, None] & m_k[None, :], other=0.0)     # [BM, BK]
        b_a = tl.load(a_ptr + o_a, mask=m_k[:, None] & m_n[None, :], other=0.0)        # [BK, BN]
        b_dw = tl.dot(b_dy, b_a, b_dw, input_precision=PRECISION)
        o_dy += BK * M
        o_a += BK * LDA
    o_out = o_m.to(tl.int64)[:, None] * N + o_n[None, :]               # [BM, BN]
    tl.store(dws_ptr + o_out, b_dw.to(dws_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _scatter_cols_kernel(src_ptr, pos_ptr, out_ptr, M, N, LDS, BM: tl.constexpr, BN: tl.constexpr):
    """out[:, c] = src[:, pos[c]] where pos[c] >= 0, else zeros: out [M, N] (contiguous) written once, by rows of
    whole output columns (16-byte stores), src [M, *] read through pos."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)                     # [BM] rows
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)                     # [BN] columns of out
    m_m = o_m < M
    m_n = o_n < N
    c_n = tl.load(pos_ptr + o_n, mask=m_n, other=-1)                   # [BN] int32 columns of src, -1: zero
    b = tl.load(src_ptr + o_m.to(tl.int64)[:, None] * LDS + c_n[None, :], mask=m_m[:, None] & (c_n >= 0)[None, :],
                other=0.0)                                             # [BM, BN]
    tl.store(out_ptr + o_m.to(tl.int64)[:, None] * N + o_n[None, :], b, mask=m_m[:, None] & m_n[None, :])


def scatter_cols(src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[R, n]`` with column ``c`` = ``src[:, pos[c]]`` where ``pos[c] >= 0`` and zero elsewhere, every element
    written once.

    Args:
        src: ``[R, kp]``, unit column stride; pos: int32 ``[n]``, the column of ``src`` or -1 (see
            ``sat_mlp.kept_positions``).
    """
    rows, n = src.shape[0], pos.numel()
    out = src.new_empty(rows, n)
    # 32 x 256 on 8 warps: 16-byte stores, no spills (4 warps spill 48 bytes; sm_90a, triton 3.9)
    bm, bn = (16, 32) if INTERPRET else (32, 256)
    grid = (triton.cdiv(rows, bm), triton.cdiv(n, bn))
    _scatter_cols_kernel[grid](src, pos, out, rows, n, src.stride(0), BM=bm, BN=bn, num_warps=8)
    return out


def down_weight_bwd(dy: torch.Tensor, a_s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Full-size ``dW_down [h, I]``: ``dy^T A_S`` in the kept columns, exact zeros elsewhere, every element written
    once: the GEMM stores the compact ``[h, kp]`` gradient with 16-byte stores, :func:`scatter_cols` spreads it.

    Args:
        dy: ``[T, h]``; a_s: ``[T, kp]`` (unit column stride, zero pad columns); pos: int32 ``[I]``, the kept
            position of each neuron or -1.
    """
    T, h = dy.shape
    k = a_s.shape[1]
    dw_s = dy.new_empty(h, k)
    grid = lambda meta: (triton.cdiv(h, meta["BM"]) * triton.cdiv(k, meta["BN"]),)  # noqa: E731
    _down_weight_bwd_kernel[grid](dy, a_s, dw_s, h, k, T, *tune_keys(h, k, T), a_s.stride(0),
                                  PRECISION=dot_precision(dy.dtype))
    return scatter_cols(dw_s, pos)
