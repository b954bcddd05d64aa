"""Backward kernels of the LoRA layer over a frozen NF4 or dense weight.

Symbols (docs/DESIGN.md): g = ∂L/∂y (M×N), x (M×K), W (N×K) frozen, A (r×K), B (N×r), s scaling, m (M×K)
dropout mask regenerated from the seed (dropout.py), u = (m⊙x)·Aᵀ saved by the forward pass.

    v  = g·B                        (M×r, fp32)      lora_vdb_kernel   } one pass over g
    dB = s·gᵀ·u                     (N×r, fp32)      lora_vdb_kernel   }
    db = Σ_M g                      (N,   fp32)      lora_vdb_kernel   }
    dx = s·m⊙(v·A) + g·deq(W)       (M×K, x dtype)   lora_dx_kernel    } one pass over g and deq(W); m, x and v
    dA = s·vᵀ·(m⊙x)                 (r×K, fp32)      lora_dx_kernel    } are read once, before the main loop

The frozen layer alone (adapter disabled, or merged) has no low-rank term:

    db = Σ_M g                      (N,   fp32)      lora_vdb_kernel, NEED_V = NEED_DB_LORA = False
    dx = g·deq(W)                   (M×K, x dtype)   lora_dx_kernel, HAS_LORA = False (v, A, x are not read)

deq(W) is dequantized tile by tile in registers (lora_fwd.load_weight_tile); W is frozen, so there is no dW.
The dropout mask of a launch over a column slab [mask_col0, mask_col0 + K) of x (the large-M path, launch_slab.py)
is the full layer's: m[i, mask_col0 + j] of rows mask_width long.
Reductions that cross programs (v and dB over split N, dA over M) are relaxed fp32 atomic adds into zeroed buffers
(no memory fence; their order varies run to run), all zeroed first by one launch of zero_fp32_kernel. The
deterministic mode replaces them with the split reductions of lora_reduce.py. Dot precision, the low-rank dtype and
the NF4 lookup follow lora_fwd.py.

lora_vdb_kernel's two dots: one pass over g reduces v over N inside a program (a carried accumulator) and dB over M
across programs, so every iteration's gᵀ·u leaves the loop at once (an atomic add), and Triton waits for a dot whose
result is used inside the loop (carrying it to the next iteration waits all the same, tried with Triton 3.9). So on
sm_90 with row tiles of 64 or more (launch_gemm._vdb_wgmma) the tile is 32 columns wide: gᵀ·u has 32 rows and runs
on mma.sync, which has nothing to wait for, and g·B alone is a wgmma; its operands come straight from memory into
shared memory (B split once per backward by the zeroing launch, B_SPLIT, rather than in registers in every iteration,
which Triton stores to shared memory and then waits for the wgmma that reads it), and its accumulator starts as an
MMA of zeros, so that it stays in flight across iterations (bench/results/offline/report.md). The kernel is bound by
reading g either way.
"""

import triton
import triton.language as tl

from .dropout import dropout_mask_tile
from .lora_fwd import fold_split, grouped_tile, load_weight_tile, split_wide
from .nf4_lookup import nf4_lookup_state
from .pdl import wait_for_previous


@triton.jit
def zero_fp32_kernel(
    p0, n0, p1, n1, p2, n2, p3, n3,
    src_ptr=None, dst_ptr=None, N=0, R=0, stride_sn=0, stride_sr=0,
    BLOCK: tl.constexpr = 1024,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
    BLOCK_SPLIT: tl.constexpr = 0,  # > 0: also split rows [pid·BLOCK_SPLIT, +BLOCK_SPLIT) of src into dst
    R_PAD: tl.constexpr = 16,
):  # fmt: skip
    """p_i[j] = 0 for j < n_i, i = 0..3 (fp32; a buffer with n_i = 0 is not touched): the atomic accumulators of one
    backward zeroed by one launch instead of a memset each. With BLOCK_SPLIT the same launch splits the fp32 (N, r)
    operand B for the v/dB pass (B_SPLIT): dst[n, 2c] = hi(src[n, c]), dst[n, 2c + 1] = lo(src[n, c])
    (lora_fwd.split_wide; dst (N, 2r) contiguous in its 16-bit dtype), so that the pass's wgmma reads B from memory
    instead of splitting it in registers in every iteration."""
    wait_for_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros((BLOCK,), dtype=tl.float32)
    tl.store(p0 + offs, zero, mask=offs < n0)
    tl.store(p1 + offs, zero, mask=offs < n1)
    tl.store(p2 + offs, zero, mask=offs < n2)
    tl.store(p3 + offs, zero, mask=offs < n3)
    if BLOCK_SPLIT > 0:
        offs_n = tl.program_id(0) * BLOCK_SPLIT + tl.arange(0, BLOCK_SPLIT)
        offs_r = tl.arange(0, R_PAD)
        wide = tl.load(src_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + offs_r[None, :] * stride_sr,
                       mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)  # fmt: skip
        offs_c = tl.arange(0, 2 * R_PAD)
        dst = dst_ptr + offs_n.to(tl.int64)[:, None] * (2 * R) + offs_c[None, :]
        tl.store(dst, split_wide(wide.to(tl.float32), dst_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < N) & (offs_c[None, :] < 2 * R))  # fmt: skip


@triton.jit
def lora_vdb_kernel(
    # pointers
    g_ptr,  # (M, N) compute dtype
    b_ptr,  # B (N, r); with B_SPLIT its split (N, 2r) in g's dtype (zero_fp32_kernel BLOCK_SPLIT)
    u_ptr,  # (M, r) fp32
    v_ptr,  # (M, r) fp32 output, zeroed (atomic adds)
    db_lora_ptr,  # dB (N, r) fp32 output, zeroed (atomic adds)
    db_bias_ptr,  # db (N,) fp32 output, zeroed (atomic adds)
    # sizes
    M,
    N,
    R,
    N_PER_SPLIT,  # columns of g per program along grid axis 1 (a multiple of BLOCK_N)
    # strides
    stride_gm,
    stride_gn,
    stride_bn,
    stride_br,
    stride_um,
    stride_ur,
    stride_vm,
    stride_vr,
    stride_dbn,
    stride_dbr,
    scaling,
    # constexprs
    NEED_V: tl.constexpr,
    NEED_DB_LORA: tl.constexpr,
    NEED_DB_BIAS: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    LOWRANK_SPLIT: tl.constexpr,  # common.lowrank_split: 16-bit dots on g and lora_fwd.split_wide(B or u)
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
    B_SPLIT: tl.constexpr = False,  # LOWRANK_SPLIT with B given split (b_ptr: (N, 2r), row stride stride_bn)
):
    """Rows offs_m × columns [pid_1·N_PER_SPLIT, +N_PER_SPLIT) of g: v += g·B, dB += s·gᵀ·u, db += Σ_rows g."""
    wait_for_previous(PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    row_in_range = offs_m[:, None] < M
    rank_in_range = offs_r[None, :] < R
    n_start = tl.program_id(1) * N_PER_SPLIT
    n_end = min(n_start + N_PER_SPLIT, N)
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    if NEED_DB_LORA:
        u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
        u = tl.load(u_ptrs, mask=row_in_range & rank_in_range, other=0.0)
        u = split_wide(u, g_ptr.dtype.element_ty) if LOWRANK_SPLIT else u.to(LOWRANK_DTYPE)
    # v from an MMA of zeros: an accumulator defined by ordinary instructions serialises the wgmma pipeline (ptxas)
    V_COLS: tl.constexpr = 2 * R_PAD if LOWRANK_SPLIT else R_PAD
    v = tl.dot(tl.zeros((BLOCK_M, 16), g_ptr.dtype.element_ty), tl.zeros((16, V_COLS), g_ptr.dtype.element_ty))
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=row_in_range & (offs_n[None, :] < N), other=0.0)
        if NEED_V:
            if B_SPLIT:  # straight from memory into the MMA's shared-memory operand: no wait for the wgmma
                offs_c = tl.arange(0, 2 * R_PAD)
                b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_c[None, :] * stride_br,
                            mask=(offs_n[:, None] < N) & (offs_c[None, :] < 2 * R), other=0.0)  # fmt: skip
                v = tl.dot(g, b, v)
            else:
                b = tl.load(
                    b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=(offs_n[:, None] < N) & rank_in_range,
                    other=0.0,
                )
                if LOWRANK_SPLIT:
                    v = tl.dot(g, split_wide(b, g.dtype), v)
                else:
                    v = tl.dot(g.to(LOWRANK_DTYPE), b.to(LOWRANK_DTYPE), v, input_precision=LOWRANK_PRECISION)
        if NEED_DB_LORA:
            if LOWRANK_SPLIT:
                db_lora = fold_split(tl.dot(tl.trans(g), u))
            else:
                db_lora = tl.dot(tl.trans(g.to(LOWRANK_DTYPE)), u, input_precision=LOWRANK_PRECISION)
            tl.atomic_add(
                db_lora_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                scaling * db_lora,
                mask=(offs_n[:, None] < N) & rank_in_range,
                sem="relaxed",
            )
        if NEED_DB_BIAS:
            tl.atomic_add(db_bias_ptr + offs_n, tl.sum(g.to(tl.float32), axis=0), mask=offs_n < N, sem="relaxed")
    if NEED_V:
        if LOWRANK_SPLIT:
            v = fold_split(v)
        v_ptrs = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm + offs_r[None, :] * stride_vr
        tl.atomic_add(v_ptrs, v, mask=row_in_range & rank_in_range, sem="relaxed")


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (dropout.py)
def lora_dx_kernel(
    # pointers
    g_ptr,  # (M, N) compute dtype
    w_ptr,  # dense (N, K) compute dtype, or NF4 packed uint8
    absmax_ptr,  # NF4 only (None for a dense W)
    code_ptr,
    nested_absmax_ptr,  # double quant only
    nested_code_ptr,
    offset_ptr,
    x_ptr,  # (M, K) compute dtype (read only for dA)
    a_ptr,  # A (r, K) (None without HAS_LORA, like x and v)
    v_ptr,  # (M, r) fp32 from lora_vdb_kernel
    dx_ptr,  # (M, K) compute dtype output
    da_ptr,  # dA (r, K) fp32 output, zeroed (relaxed atomic adds)
    col_scale_ptr,  # c (N,) fp32 with COL_SCALE (None otherwise)
    t_ptr,  # (M, K) compute dtype, dx's strides, read with ADD_T (None otherwise)
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    # strides
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_vm,
    stride_vr,
    stride_dxm,
    stride_dxk,
    stride_dar,
    stride_dak,
    scaling,
    # dropout: m[i, j] for the global column j = mask_col0 + (column in this launch) of rows mask_width long
    seed,
    p,
    keep_scale,
    mask_col0,
    mask_width,
    # constexprs
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,  # only with HAS_LORA
    DROPOUT: tl.constexpr,  # only with HAS_LORA
    HAS_LORA: tl.constexpr,  # False: dx = g·deq(W) only
    COL_SCALE: tl.constexpr,  # the main loop reads c⊙g (DoRA's backward) instead of g
    MASK_DX: tl.constexpr,  # dx = m⊙acc, the mask regenerated for the output tile (DoRA with dropout: m⊙t)
    ADD_T: tl.constexpr,  # dx = acc + t, t read (DoRA with dropout: t = m⊙((c−1)⊙g)·W from a MASK_DX launch)
    IS_NF4: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    LOOKUP: tl.constexpr,  # NF4 code lookup: "tree", "gather", "prmt" or "lds" (nf4_lookup.py)
    W_FIRST: tl.constexpr,  # W's tile is the first (register) operand of the dot: the transposed product
    BASE_PRECISION: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction tile over N
    BLOCK_K: tl.constexpr,  # output tile over K
    GROUP_M: tl.constexpr,
    N_DIVISOR: tl.constexpr = 1,  # powers of two that divide N and K (launch_gemm.pow2_divisor): with BLOCK_N and
    K_DIVISOR: tl.constexpr = 1,  # BLOCK_K dividing them, the main loop's loads have no mask (EVEN)
):
    """dx[rows, cols] = (s·m⊙(v·A)[rows, cols] when HAS_LORA) + Σ_n g'[rows, n]·deq(W)[n, cols] with g' = g, or
    c⊙g (COL_SCALE: g[:, n]·c[n], DoRA's backward with v = (c⊙g)·B from lora_vdb_kernel over c⊙B), the low-rank term
    accumulated first; dA[:, cols] += s·v[rows]ᵀ·(m⊙x)[rows, cols] (NEED_DA, relaxed atomics, before the loop).

    With W_FIRST W's tile is the first operand of the dot, as in lora_fwd: the accumulator is
    dxᵀ[cols, rows] = Σ_n deq(W)[n, cols]·g[rows, n], stored transposed.

    DoRA with dropout (fused_lora/dora.py) takes two launches: MASK_DX stores t = m⊙(((c−1)⊙g)·deq(W)) (COL_SCALE
    with c − 1, no low-rank term), then ADD_T adds t to the LoRA dx. The mask is drawn in the launch without the
    low-rank operands (in the LoRA dx's epilogue, beside its accumulator, it spilled 4–96 B per thread on sm_90),
    before the main loop (drawn after it, ptxas serialised the loop's wgmma over a dense W)."""
    COMPUTE_DTYPE: tl.constexpr = g_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)

    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tile_in_range = (offs_m[:, None] < M) & (offs_k[None, :] < K)

    # The low-rank term starts the accumulator (no second [BLOCK_M, BLOCK_K] tile), and dA's share of this tile is
    # added before the main loop, so m, x and v are dead before it starts.
    if W_FIRST:
        if HAS_LORA:  # the low-rank term's dot defines the accumulator
            acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        else:
            # Zeros from an MMA: an accumulator defined by ordinary instructions makes ptxas serialise this loop's
            # wgmma pipeline (C7515, "non wgmma instructions defining accumulator registers").
            acc = tl.dot(tl.zeros((BLOCK_K, 16), COMPUTE_DTYPE), tl.zeros((16, BLOCK_M), COMPUTE_DTYPE))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_LORA:
        if DROPOUT:
            m = dropout_mask_tile(seed, offs_m, mask_col0 + k0, mask_width, p, keep_scale, BLOCK_K)
        v_rows = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm
        if NEED_DA:  # first, so that x is dead before the low-rank tile exists
            x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=tile_in_range, other=0.0)
            if DROPOUT:
                x = x.to(tl.float32) * m
            x = x.to(LOWRANK_DTYPE)
            for r0 in tl.static_range(0, R_PAD, R_CHUNK):
                offs_r = r0 + tl.arange(0, R_CHUNK)
                v = tl.load(v_rows + offs_r[None, :] * stride_vr, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
                da = tl.dot(tl.trans(v.to(LOWRANK_DTYPE)), x, input_precision=LOWRANK_PRECISION)
                da_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
                tl.atomic_add(da_ptrs, scaling * da, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), sem="relaxed")
        if NEED_DX:
            for r0 in tl.static_range(0, R_PAD, R_CHUNK):
                offs_r = r0 + tl.arange(0, R_CHUNK)
                v = tl.load(v_rows + offs_r[None, :] * stride_vr, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
                a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
                a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(LOWRANK_DTYPE)
                if W_FIRST:
                    acc = tl.dot(tl.trans(a), tl.trans(v.to(LOWRANK_DTYPE)), acc, input_precision=LOWRANK_PRECISION)
                else:
                    acc = tl.dot(v.to(LOWRANK_DTYPE), a, acc, input_precision=LOWRANK_PRECISION)
            acc = acc * scaling
            if DROPOUT:
                if W_FIRST:
                    acc = acc * tl.trans(m)
                else:
                    acc = acc * m

    if MASK_DX:  # the kept entries of m for this output tile, drawn before the loop (see the docstring)
        keep_out = dropout_mask_tile(seed, offs_m, mask_col0 + k0, mask_width, p, keep_scale, BLOCK_K) != 0.0
    if NEED_DX:
        # rows of g past M read as row M - 1 (no mask): they reach only rows of dx that are not stored (and W's
        # columns past K, in load_weight_tile, only its columns past K)
        g_rows = g_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_gm
        lut = nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE) if IS_NF4 else None
        # BLOCK_N divides N and BLOCK_K divides K: every tile of the loop exists, no mask (lora_fwd_kernel's EVEN_K)
        EVEN: tl.constexpr = N_DIVISOR % BLOCK_N == 0 and K_DIVISOR % BLOCK_K == 0
        # W's pointers move with the loop (REBASE): rebased to the tile's first row n0, its rows are 0..BLOCK_N and
        # their offsets the same tensor every iteration, a 64-bit add per row instead of a 64-bit product (NF4 dx at
        # 128x64x64, sm_90a: 196 -> 180 SASS per iteration). Not for NF4 without ROW_SCALES (blocks from the flat
        # index) or with DOUBLE_QUANT (nested blocks from the block index).
        REBASE: tl.constexpr = (not IS_NF4) or (ROW_SCALES and not DOUBLE_QUANT)
        w_rows = w_ptr
        s_rows = absmax_ptr
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if EVEN:
                g = tl.load(g_rows + offs_n[None, :] * stride_gn)
            else:
                g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=offs_n[None, :] < N, other=0.0)
            if REBASE:
                tile_rows = tl.arange(0, BLOCK_N)
                rows_left = N - n0
            else:
                tile_rows = offs_n
                rows_left = N
            w = load_weight_tile(
                w_rows, s_rows, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                tile_rows, k0, rows_left, K, stride_wn, stride_wk,
                IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED_BLOCKSIZE, ROW_SCALES, LOOKUP, lut, BLOCK_N, BLOCK_K,
                COMPUTE_DTYPE, False, EVEN,
            )  # fmt: skip
            if REBASE:
                w_rows += BLOCK_N * stride_wn
                if IS_NF4:
                    s_rows += BLOCK_N * (K // BLOCKSIZE)
            if COL_SCALE:  # c⊙g rounded to the compute dtype, as an M×N pass would store it (W's rows with W_FIRST)
                c = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
                if W_FIRST:
                    w = (w.to(tl.float32) * c[:, None]).to(COMPUTE_DTYPE)
                else:
                    g = (g.to(tl.float32) * c[None, :]).to(COMPUTE_DTYPE)
            if W_FIRST:
                acc = tl.dot(tl.trans(w), tl.trans(g), acc, input_precision=BASE_PRECISION)
            else:
                acc = tl.dot(g, w, acc, input_precision=BASE_PRECISION)

    if NEED_DX:
        dx_tile = offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        if MASK_DX:
            if W_FIRST:
                acc = tl.where(tl.trans(keep_out), acc * keep_scale, 0.0)
            else:
                acc = tl.where(keep_out, acc * keep_scale, 0.0)
        if ADD_T:
            t = tl.load(t_ptr + dx_tile, mask=tile_in_range, other=0.0).to(tl.float32)
            if W_FIRST:
                acc += tl.trans(t)
            else:
                acc += t
        if W_FIRST:
            tl.store(dx_ptr + tl.trans(dx_tile), acc.to(COMPUTE_DTYPE), mask=tl.trans(tile_in_range))
        else:
            tl.store(dx_ptr + dx_tile, acc.to(COMPUTE_DTYPE), mask=tile_in_range)
