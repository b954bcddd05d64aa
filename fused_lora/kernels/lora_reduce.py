"""Split reductions of the backward pass for the deterministic mode (strategy.deterministic()): no atomics.

Symbols (docs/DESIGN.md): g = ∂L/∂y (M×N), x (M×K), A (r×K), B (N×r), s scaling, m (M×K) dropout mask
(dropout.py), u = (m⊙x)·Aᵀ, v = g·B. Each kernel writes one partial sum per split of its reduction axis into a
[splits, ...] fp32 buffer with plain stores; the launcher sums the splits in a fixed order (common.fixed_order_sum),
so every gradient is bitwise reproducible. Inside a program the rows (or columns) are visited in a fixed order too.

    v_part[s]  = Σ_{n in split s} g[:, n]·B[n, :]                 (M×r)   lora_v_split_kernel,  grid (M tiles, splits)
    dB_part[s] = s·Σ_{i in split s} g[i, :]ᵀ·u[i, :]               (N×r)   lora_db_split_kernel, grid (N tiles, splits)
    db_part[s] = Σ_{i in split s} g[i, :]                          (N)     lora_db_split_kernel
    dA_part[s] = s·Σ_{i in split s} v[i, :]ᵀ·(m⊙x)[i, :]            (r×K)   lora_da_split_kernel, grid (K tiles, splits)

The default (non-deterministic) mode computes the same sums in one pass over g (lora_bwd.lora_vdb_kernel) and in
the dx GEMM (dA) with relaxed atomics.
"""

import triton
import triton.language as tl

from .dropout import dropout_mask_tile


@triton.jit
def lora_v_split_kernel(
    g_ptr,  # (M, N) compute dtype
    b_ptr,  # B (N, r)
    v_ptr,  # (splits, M, r) fp32 output
    M,
    N,
    R,
    N_PER_SPLIT,  # a multiple of BLOCK_N
    stride_gm,
    stride_gn,
    stride_bn,
    stride_br,
    stride_vs,
    stride_vm,
    stride_vr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """v_part[pid_1, rows] = Σ_{n in split pid_1} g[rows, n]·B[n, :]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    n_start = tl.program_id(1) * N_PER_SPLIT
    n_end = min(n_start + N_PER_SPLIT, N)
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
        b = tl.load(b_ptrs, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        v = tl.dot(g.to(LOWRANK_DTYPE), b.to(LOWRANK_DTYPE), v, input_precision=LOWRANK_PRECISION)
    v_ptrs = v_ptr + tl.program_id(1) * stride_vs + offs_m.to(tl.int64)[:, None] * stride_vm + offs_r[None, :] * stride_vr
    tl.store(v_ptrs, v, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def lora_db_split_kernel(
    g_ptr,  # (M, N) compute dtype
    u_ptr,  # (M, r) fp32
    db_lora_ptr,  # dB (splits, N, r) fp32 output
    db_bias_ptr,  # db (splits, N) fp32 output
    M,
    N,
    R,
    M_PER_SPLIT,  # a multiple of BLOCK_M
    stride_gm,
    stride_gn,
    stride_um,
    stride_ur,
    stride_dbs,
    stride_dbn,
    stride_dbr,
    stride_biass,
    scaling,
    NEED_DB_LORA: tl.constexpr,
    NEED_DB_BIAS: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dB_part[pid_1, cols] = s·Σ_{i in split pid_1} g[i, cols]ᵀ·u[i]; db_part[pid_1, cols] = Σ_i g[i, cols]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_start = tl.program_id(1) * M_PER_SPLIT
    m_end = min(m_start + M_PER_SPLIT, M)
    db_lora = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    db_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        if NEED_DB_LORA:
            u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
            u = tl.load(u_ptrs, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
            db_lora = tl.dot(tl.trans(g.to(LOWRANK_DTYPE)), u.to(LOWRANK_DTYPE), db_lora, input_precision=LOWRANK_PRECISION)
        if NEED_DB_BIAS:
            db_bias += tl.sum(g.to(tl.float32), axis=0)
    if NEED_DB_LORA:
        db_ptrs = db_lora_ptr + tl.program_id(1) * stride_dbs + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
        tl.store(db_ptrs, scaling * db_lora, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R))
    if NEED_DB_BIAS:
        tl.store(db_bias_ptr + tl.program_id(1) * stride_biass + offs_n, db_bias, mask=offs_n < N)


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (dropout.py)
def lora_da_split_kernel(
    x_ptr,  # (M, K) compute dtype
    v_ptr,  # (M, r) fp32
    da_ptr,  # dA (splits, r, K) fp32 output
    M,
    K,
    R,
    M_PER_SPLIT,  # a multiple of BLOCK_M
    stride_xm,
    stride_xk,
    stride_vm,
    stride_vr,
    stride_das,
    stride_dar,
    stride_dak,
    scaling,
    seed,
    p,
    keep_scale,
    DROPOUT: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA_part[pid_1, :, cols] = s·Σ_{i in split pid_1} v[i]ᵀ·(m⊙x)[i, cols]."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_start = tl.program_id(1) * M_PER_SPLIT
    m_end = min(m_start + M_PER_SPLIT, M)
    da = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if DROPOUT:
            x = x.to(tl.float32) * dropout_mask_tile(seed, offs_m, tl.program_id(0) * BLOCK_K, K, p, keep_scale, BLOCK_K)
        v_ptrs = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm + offs_r[None, :] * stride_vr
        v = tl.load(v_ptrs, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        da = tl.dot(tl.trans(v.to(LOWRANK_DTYPE)), x.to(LOWRANK_DTYPE), da, input_precision=LOWRANK_PRECISION)
    da_ptrs = da_ptr + tl.program_id(1) * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    tl.store(da_ptrs, scaling * da, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))
