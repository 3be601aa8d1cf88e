"""Gate/up projections of the SAT MLP in Triton: fused forward with scoring, compaction, and their backward GEMMs.

Layouts (row-major): ``x [T, h]``, ``w_gate``/``w_up [I, h]`` (``nn.Linear``) contiguous; pre-activations and
activations ``[T, n]`` with ``n = I`` (all neurons, row stride padded to 16 elements, :func:`.utils.padded_empty`) or
``n = kp`` (kept, compact: ``kp = pad16(k)`` columns, the pad columns zero). Every gather goes through the sorted int64
kept index padded with -1 to ``kp`` entries (:func:`.utils.padded_index`; a -1 entry reads zeros and stores nothing);
inside the GEMMs only whole weight rows are gathered (each contiguous), so the GEMM operands are loaded with 16-byte
vectors; activation columns are gathered only in the memory-bound compaction.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import ACT_IDS, BY_DTYPE, INTERPRET, ONE_ACC_CONFIGS, ONE_ACC_FP32_CONFIGS, SCORE_IDS, SCORE_ROWS, \
    TWO_ACC_CONFIGS, TWO_ACC_FP32_CONFIGS, act_fwd, dot_precision, padded_empty, split_cols, tile_ids, tune_keys


@triton.autotune(configs=TWO_ACC_CONFIGS + TWO_ACC_FP32_CONFIGS,
                 key=["M_KEY", "N_KEY", "K_KEY", "HAS_IDX", "STORE_A", "SCORE", "HAS_MASK"],
                 prune_configs_by=BY_DTYPE)
@triton.jit
def _gate_up_fwd_kernel(x_ptr, wg_ptr, wu_ptr, idx_ptr, g_ptr, u_ptr, a_ptr, part_ptr, mask_ptr, M, N, K, M_KEY,
                        N_KEY, K_KEY, LDO,
                        HAS_IDX: tl.constexpr, STORE_A: tl.constexpr, SCORE: tl.constexpr, HAS_MASK: tl.constexpr,
                        ACT: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """G = x W_gate[rows]^T, U = x W_up[rows]^T (rows = idx or all), one [BM, BN] tile of each.

    Epilogue, in two column halves: stores G, U (and A = act(G) * U if STORE_A) in the input dtype and, if SCORE, the
    per-neuron partial scores (1: sum of A^2, 2: sum of |A|) from A as it is rounded to the input dtype: one fp64
    partial per ROWS rows (BM is a multiple of ROWS), row t // ROWS of the partials [cdiv(M, ROWS), N]. Each partial
    element is written by exactly one program (no atomics) and covers the same rows whatever the config. With
    HAS_MASK the terms of row t are multiplied by the 0/1 uint8 mask_ptr[t] (the token mask, [M]).
    """
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM]
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN]
    o_k = tl.arange(0, BK)                                             # [BK]
    m_m = o_m < M
    m_n = o_n < N
    if HAS_IDX:
        r_n = tl.load(idx_ptr + o_n, mask=m_n, other=-1)               # [BN] weight rows (int64), -1: padding
        m_w = r_n >= 0
    else:
        r_n = o_n.to(tl.int64)
        m_w = m_n
    p_x = x_ptr + o_m.to(tl.int64)[:, None] * K + o_k[None, :]         # [BM, BK]
    o_w = r_n[None, :] * K + o_k[:, None]                              # [BK, BN]
    b_g = tl.zeros((BM, BN), dtype=tl.float32)                         # [BM, BN]
    b_u = tl.zeros((BM, BN), dtype=tl.float32)                         # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)              # [BM, BK]
        b_wg = tl.load(wg_ptr + o_w, mask=m_k[:, None] & m_w[None, :], other=0.0)    # [BK, BN]
        b_wu = tl.load(wu_ptr + o_w, mask=m_k[:, None] & m_w[None, :], other=0.0)    # [BK, BN]
        b_g = tl.dot(b_x, b_wg, b_g, input_precision=PRECISION)
        b_u = tl.dot(b_x, b_wu, b_u, input_precision=PRECISION)
        p_x += BK
        o_w += BK
    b_g0, b_g1 = split_cols(b_g, BM, BN)                                # [BM, BN // 2] each
    b_u0, b_u1 = split_cols(b_u, BM, BN)                                # [BM, BN // 2] each
    o_h = tl.arange(0, BN // 2)                                         # [BN // 2]
    _gate_up_fwd_epilogue(b_g0, b_u0, i_m, o_m, i_n * BN + o_h, M, N, LDO, g_ptr, u_ptr, a_ptr, part_ptr, mask_ptr,
                          STORE_A, SCORE, HAS_MASK, ACT, ROWS, BM, BN // 2)
    _gate_up_fwd_epilogue(b_g1, b_u1, i_m, o_m, i_n * BN + BN // 2 + o_h, M, N, LDO, g_ptr, u_ptr, a_ptr, part_ptr,
                          mask_ptr, STORE_A, SCORE, HAS_MASK, ACT, ROWS, BM, BN // 2)


@triton.jit
def _gate_up_fwd_epilogue(b_g, b_u, i_m, o_m, o_n, M, N, LDO, g_ptr, u_ptr, a_ptr, part_ptr, mask_ptr,
                          STORE_A: tl.constexpr, SCORE: tl.constexpr, HAS_MASK: tl.constexpr, ACT: tl.constexpr,
                          ROWS: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """Stores of one column block of the gate/up tile (fp32 accumulators b_g, b_u [BM, BH], columns o_n)."""
    dtype = g_ptr.dtype.element_ty
    m_m = o_m < M
    m_n = o_n < N
    b_g = b_g.to(dtype)                                                # [BM, BH]
    b_u = b_u.to(dtype)                                                # [BM, BH]
    o_out = o_m.to(tl.int64)[:, None] * LDO + o_n[None, :]             # [BM, BH]
    m_out = m_m[:, None] & m_n[None, :]
    tl.store(g_ptr + o_out, b_g, mask=m_out)
    tl.store(u_ptr + o_out, b_u, mask=m_out)
    if STORE_A or SCORE != 0:
        b_a = (act_fwd(b_g.to(tl.float32), ACT) * b_u.to(tl.float32)).to(dtype)       # [BM, BH]
        if STORE_A:
            tl.store(a_ptr + o_out, b_a, mask=m_out)
        if SCORE != 0:
            # fp64: the squares of 16-bit (or fp32) values are exact, and the sums of ROWS of them are exact or
            # rounded far below the fp32 rounding of the scores, whatever order the reduction takes in a config
            b_af = tl.where(m_m[:, None], b_a.to(tl.float64), 0.0)                     # [BM, BH]
            if SCORE == 1:
                b_af = b_af * b_af
            else:
                b_af = tl.abs(b_af)
            if HAS_MASK:   # the token mask as a 0/1 factor, as the torch backend applies it
                b_tm = tl.load(mask_ptr + o_m, mask=m_m, other=0).to(tl.float64)        # [BM]
                b_af = b_af * b_tm[:, None]
            b_s = tl.sum(tl.reshape(b_af, (BM // ROWS, ROWS, BH)), axis=1)            # [BM // ROWS, BH]
            o_p = i_m * (BM // ROWS) + tl.arange(0, BM // ROWS)                        # [BM // ROWS] partial rows
            m_p = (o_p < tl.cdiv(M, ROWS))[:, None] & m_n[None, :]
            tl.store(part_ptr + o_p.to(tl.int64)[:, None] * N + o_n[None, :], b_s, mask=m_p)


def gate_up_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: str = "silu", *,
                idx: Optional[torch.Tensor] = None, store_a: bool = False, score: Optional[str] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor,
                                                                    Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused gate/up projections of the rows ``idx`` (all ``I`` if ``None``).

    Args:
        x: ``[T, h]``; w_gate, w_up: ``[I, h]``; all contiguous, one dtype.
        act: ``"silu"`` or ``"gelu_tanh"``.
        idx: kept rows, sorted int64 padded with -1 (:func:`.utils.padded_index`, ``n`` entries; the columns of the
            -1 entries come out zero), or ``None`` for all ``n = I``.
        store_a: also return ``A = act(G) * U``.
        score: ``None``, ``"l2"``/``"contrib"`` (partials of ``sum_t A^2``) or ``"l1"`` (of ``sum_t |A|``).
        token_mask: with ``score``, ``None`` or a contiguous uint8 ``[T]`` 0/1 tensor: the sums run over the tokens
            where it is 1 only (each term times the mask, as :func:`sat_kernels.selection.activation_scores`).

    Returns:
        ``(G [T, n], U [T, n], A [T, n] or None, partials [cdiv(T, SCORE_ROWS), n] fp64 or None)``, ``n = k`` or
        ``I``; the score is ``partials.sum(0)``.
    """
    T, h = x.shape
    n = w_gate.shape[0] if idx is None else idx.numel()
    g = padded_empty(x, T, n)
    u = padded_empty(x, T, n)
    a = padded_empty(x, T, n) if store_a else None
    part = torch.empty(triton.cdiv(T, SCORE_ROWS) if score else 0, n, device=x.device, dtype=torch.float64)
    if T == 0 or n == 0:
        return g, u, a, part if score else None
    grid = lambda meta: (triton.cdiv(T, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    has_mask = score is not None and token_mask is not None
    _gate_up_fwd_kernel[grid](x, w_gate, w_up, idx, g, u, a, part, token_mask if has_mask else None, T, n, h,
                              *tune_keys(T, n, h), g.stride(0), HAS_IDX=idx is not None, STORE_A=store_a,
                              SCORE=SCORE_IDS[score], HAS_MASK=has_mask, ACT=ACT_IDS[act],
                              PRECISION=dot_precision(x.dtype), ROWS=SCORE_ROWS)
    return g, u, a, part if score else None


@triton.jit
def _kept_act_fwd_kernel(g_ptr, u_ptr, idx_ptr, gs_ptr, us_ptr, as_ptr, M, N, LD, LDO, ACT: tl.constexpr,
                         STORE_A: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Compaction of the kept columns: G_S = G[:, idx], U_S = U[:, idx] and, with STORE_A, A_S = act(G_S) * U_S,
    [M, N] each (zero in the columns of the -1 entries of idx)."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)                     # [BM]
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)                     # [BN]
    m_n = o_n < N
    m = (o_m < M)[:, None] & m_n[None, :]
    c_n = tl.load(idx_ptr + o_n, mask=m_n, other=-1)                   # [BN] int64, -1: padding
    m_in = (o_m < M)[:, None] & (c_n >= 0)[None, :]
    o_full = o_m.to(tl.int64)[:, None] * LD + c_n[None, :]            # [BM, BN]
    b_g = tl.load(g_ptr + o_full, mask=m_in, other=0.0)                # [BM, BN]
    b_u = tl.load(u_ptr + o_full, mask=m_in, other=0.0)                # [BM, BN]
    o_out = o_m.to(tl.int64)[:, None] * LDO + o_n[None, :]             # [BM, BN]
    tl.store(gs_ptr + o_out, b_g, mask=m)
    tl.store(us_ptr + o_out, b_u, mask=m)
    if STORE_A:
        b_a = act_fwd(b_g.to(tl.float32), ACT) * b_u.to(tl.float32)    # [BM, BN]
        tl.store(as_ptr + o_out, b_a.to(as_ptr.dtype.element_ty), mask=m)


def kept_act_fwd(g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor, act: str = "silu",
                 store_a: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G[:, idx], U[:, idx], act(G[:, idx]) * U[:, idx])``, each ``[T, kp]``, in one memory-bound pass.

    Args:
        g, u: ``[T, I]`` pre-activations with one row stride; idx: ``[kp]`` sorted int64 padded with -1
            (:func:`.utils.padded_index`), whose columns come out zero.
        store_a: compute and write ``A_S``; without it (the exact forward, whose down projection reads the full
            ``A``) the third output is empty and the pass writes two ``[T, kp]`` tensors instead of three.
    """
    T = g.shape[0]
    k = idx.numel()
    g_s, u_s = (padded_empty(g, T, k) for _ in range(2))
    a_s = padded_empty(g, T, k) if store_a else g.new_empty(0)
    if T == 0:
        return g_s, u_s, a_s
    bm, bn = (16, 32) if INTERPRET else (32, 128)
    grid = (triton.cdiv(T, bm), triton.cdiv(k, bn))
    _kept_act_fwd_kernel[grid](g, u, idx, g_s, u_s, a_s if store_a else g_s, T, k, g.stride(0), g_s.stride(0),
                               ACT=ACT_IDS[act], STORE_A=store_a, BM=bm, BN=bn, num_warps=4)
    return g_s, u_s, a_s


@triton.autotune(configs=TWO_ACC_CONFIGS + TWO_ACC_FP32_CONFIGS, key=["M_KEY", "N_KEY", "K_KEY"],
                 prune_configs_by=BY_DTYPE)
@triton.jit
def _gate_up_weight_bwd_kernel(dg_ptr, du_ptr, x_ptr, idx_ptr, dwg_ptr, dwu_ptr, M, N, K, M_KEY, N_KEY, K_KEY, LDD,
                               PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               GROUP_M: tl.constexpr):
    """dW_gate[idx] = dG_S^T x and dW_up[idx] = dU_S^T x, one [BM, BN] tile of each (M = kp, N = h, K = T).

    The x tile is loaded once for both products; the rows idx of the two [I, h] gradients are written (nothing for
    the -1 entries), the others by the launcher (zeros).
    """
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM] kept neurons
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN] hidden
    o_k = tl.arange(0, BK)                                             # [BK] tokens
    m_m = o_m < M
    m_n = o_n < N
    o_d = o_k.to(tl.int64)[None, :] * LDD + o_m[:, None]               # [BM, BK] into dG_S [T, k], transposed
    o_x = o_k.to(tl.int64)[:, None] * N + o_n[None, :]                 # [BK, BN]
    b_dwg = tl.zeros((BM, BN), dtype=tl.float32)                       # [BM, BN]
    b_dwu = tl.zeros((BM, BN), dtype=tl.float32)                       # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        b_x = tl.load(x_ptr + o_x, mask=m_k[:, None] & m_n[None, :], other=0.0)       # [BK, BN]
        b_dg = tl.load(dg_ptr + o_d, mask=m_m[:, None] & m_k[None, :], other=0.0)     # [BM, BK]
        b_du = tl.load(du_ptr + o_d, mask=m_m[:, None] & m_k[None, :], other=0.0)     # [BM, BK]
        b_dwg = tl.dot(b_dg, b_x, b_dwg, input_precision=PRECISION)
        b_dwu = tl.dot(b_du, b_x, b_dwu, input_precision=PRECISION)
        o_d += BK * LDD
        o_x += BK * N
    r_m = tl.load(idx_ptr + o_m, mask=m_m, other=-1)                   # [BM] int64 rows of the gradients
    o_out = r_m[:, None] * N + o_n[None, :]                            # [BM, BN]
    m_out = (r_m >= 0)[:, None] & m_n[None, :]
    tl.store(dwg_ptr + o_out, b_dwg.to(dwg_ptr.dtype.element_ty), mask=m_out)
    tl.store(dwu_ptr + o_out, b_dwu.to(dwu_ptr.dtype.element_ty), mask=m_out)


def gate_up_weight_bwd(dg_s: torch.Tensor, du_s: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                       omitted: torch.Tensor, inter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-size ``(dW_gate, dW_up)`` ``[I, h]``: ``dG_S^T x``, ``dU_S^T x`` in rows ``idx``, exact zeros elsewhere;
    every element written once (the kernel the kept rows, ``index_fill_`` the omitted ones).

    Args:
        dg_s, du_s: ``[T, kp]`` with one row stride, zero in the columns of the -1 entries of ``idx``; x: ``[T, h]``;
        idx: ``[kp]`` sorted int64 padded with -1 (:func:`.utils.padded_index`); omitted: int64, the other rows;
        inter: ``I``.
    """
    T, h = x.shape
    k = idx.numel()
    dwg = x.new_empty(inter, h).index_fill_(0, omitted, 0)
    dwu = x.new_empty(inter, h).index_fill_(0, omitted, 0)
    grid = lambda meta: (triton.cdiv(k, meta["BM"]) * triton.cdiv(h, meta["BN"]),)  # noqa: E731
    _gate_up_weight_bwd_kernel[grid](dg_s, du_s, x, idx, dwg, dwu, k, h, T, *tune_keys(k, h, T), dg_s.stride(0),
                                     PRECISION=dot_precision(x.dtype))
    return dwg, dwu


@triton.autotune(configs=ONE_ACC_CONFIGS + ONE_ACC_FP32_CONFIGS, key=["M_KEY", "N_KEY", "K_KEY"],
                 prune_configs_by=BY_DTYPE)
@triton.jit
def _gate_up_input_bwd_kernel(dg_ptr, du_ptr, wg_ptr, wu_ptr, idx_ptr, dx_ptr, M, N, K, M_KEY, N_KEY, K_KEY, LDD,
                              PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              GROUP_M: tl.constexpr):
    """dx = dG_S W_gate[idx] + dU_S W_up[idx] in one accumulator (M = T, N = h, K = kp).

    The K dimension runs over the kept neurons; the weight rows are gathered through idx (each row contiguous; zeros
    for the -1 entries).
    """
    i_m, i_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)                                  # [BM] tokens
    o_n = i_n * BN + tl.arange(0, BN)                                  # [BN] hidden
    o_k = tl.arange(0, BK)                                             # [BK] kept neurons
    m_m = o_m < M
    m_n = o_n < N
    p_dg = dg_ptr + o_m.to(tl.int64)[:, None] * LDD + o_k[None, :]     # [BM, BK]
    p_du = du_ptr + o_m.to(tl.int64)[:, None] * LDD + o_k[None, :]     # [BM, BK]
    b_dx = tl.zeros((BM, BN), dtype=tl.float32)                        # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = o_k < K - k0
        r_k = tl.load(idx_ptr + k0 + o_k, mask=m_k, other=-1)          # [BK] int64 weight rows, -1: padding
        o_w = r_k[:, None] * N + o_n[None, :]                          # [BK, BN]
        m_w = (r_k >= 0)[:, None] & m_n[None, :]
        b_dg = tl.load(p_dg, mask=m_m[:, None] & m_k[None, :], other=0.0)             # [BM, BK]
        b_du = tl.load(p_du, mask=m_m[:, None] & m_k[None, :], other=0.0)             # [BM, BK]
        b_wg = tl.load(wg_ptr + o_w, mask=m_w, other=0.0)                              # [BK, BN]
        b_wu = tl.load(wu_ptr + o_w, mask=m_w, other=0.0)                              # [BK, BN]
        b_dx = tl.dot(b_dg, b_wg, b_dx, input_precision=PRECISION)
        b_dx = tl.dot(b_du, b_wu, b_dx, input_precision=PRECISION)
        p_dg += BK
        p_du += BK
    o_out = o_m.to(tl.int64)[:, None] * N + o_n[None, :]               # [BM, BN]
    tl.store(dx_ptr + o_out, b_dx.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def gate_up_input_bwd(dg_s: torch.Tensor, du_s: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      idx: torch.Tensor) -> torch.Tensor:
    """``dx [T, h] = dG_S W_gate[idx] + dU_S W_up[idx]``.

    Args:
        dg_s, du_s: ``[T, kp]`` with one row stride; w_gate, w_up: ``[I, h]``; idx: ``[kp]`` sorted int64 padded
            with -1 (:func:`.utils.padded_index`).
    """
    T, k = dg_s.shape
    h = w_gate.shape[1]
    dx = dg_s.new_empty(T, h)
    if T == 0:
        return dx
    grid = lambda meta: (triton.cdiv(T, meta["BM"]) * triton.cdiv(h, meta["BN"]),)  # noqa: E731
    _gate_up_input_bwd_kernel[grid](dg_s, du_s, w_gate, w_up, idx, dx, T, h, k, *tune_keys(T, h, k), dg_s.stride(0),
                                    PRECISION=dot_precision(dg_s.dtype))
    return dx
