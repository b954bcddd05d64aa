"""Forward kernels of the LoRA layer over a frozen NF4 or dense weight.

Symbols (docs/DESIGN.md): x (M×K) input, W (N×K) frozen weight, A (r×K), B (N×r), b (N) bias, s scaling,
m (M×K) dropout mask (0 or 1/(1-p), regenerated from the seed, see dropout.py).

    u = (m⊙x)·Aᵀ                    (M×r, fp32)          lora_u_kernel (split over K, the splits summed in order)
    y = x·deq(W)ᵀ + b + s·u·Bᵀ       (M×N, x's dtype)     lora_fwd_kernel, HAS_LORA=True
    y = x·deq(W)ᵀ + b                (M×N, x's dtype)     lora_fwd_kernel, HAS_LORA=False (the frozen layer alone:
                                                          adapter disabled, or merged; u and B are not read)
    z = x·deq(W)ᵀ + s·u·Bᵀ           (M×N, x's dtype)     lora_fwd_kernel, COL_SCALE=True (DoRA's training forward,
    y = c⊙z + b                      (M×N, x's dtype)     fused_lora/dora.py): both stored by the epilogue from the
                                                          one fp32 accumulator; c (N,) fp32 scales y's columns

deq(W) is computed tile by tile in registers inside the GEMM main loop and never written to memory:

    i = n·K + k                     flat row-major index of W[n, k]
    q = packed[i // 2] >> 4         if i is even, else packed[i // 2] & 15
    scale_b                         the fp32 scale of block b = i // blocksize: absmax[b], or with double quant
                                    fl(fl(nested_code[absmax[b]] · nested_absmax[b // 256]) + offset)
    W[n, k] = round(code[q] · scale_b)   LOOKUP "tree" / "gather": fp32 product of the exact fp32 values, rounded
                                         once to the compute dtype (bitsandbytes' value, bit for bit)
            = round(round(code[q]) · round(scale_b))   LOOKUP "prmt" / "lds" (bf16/fp16 on a GPU): code and scale
                                         rounded to the compute dtype first, their product rounded (nf4_lookup.py)

The launchers pass scale_b decoded once per weight (common.decoded_scales, bitsandbytes' two roundings) as an fp32
absmax with DOUBLE_QUANT False, so the main loop reads one fp32 scale per (row, block). The kernels still accept a
double-quant weight (DOUBLE_QUANT True): then the scale is a rounded fp32 multiply followed by a separately rounded
add, as bitsandbytes computes it, and the NF4 variants are compiled with ``enable_fp_fusion=False`` so that Triton
does not contract the two into one FMA (the option stops only the contraction of a separate multiply and add; the
dot is an MMA, W[n, k] a multiply without an add). The CPU interpreter never contracts.

The code lookup is done in registers or from a table in shared memory (nf4_lookup.py), never by a per-element gather
from the table in global memory except
for LOOKUP "gather" (fp32 on a GPU, and the element-wise layout below). With ROW_SCALES (K a multiple of an even
power-of-two blocksize) the packed bytes of a tile row are loaded with 16-byte loads (bytes per row, K // 2, passed
as stride_wn so that the JIT sees its divisibility), as int32 words of 8 codes for LOOKUP "prmt" and "lds".

The accumulator is fp32 and starts with the low-rank term (LoRAFusion: no second [BLOCK_M, BLOCK_N] tile and no M×N
intermediate); the bias is added after the main loop (a broadcast bias held through the pipeline's prologue made
128×256 tiles spill). Low-rank dots run in fp32 whatever the dtypes of x, A and B (``LOWRANK_DTYPE``, the
promotion of fp32, x, A and B, as the reference's low-rank path): m⊙x, u and v never round to fp16/bf16 or overflow
their range. fp32 dots use IEEE fp32 when x is fp32 (the tolerance rule compares with plain fp32 PyTorch); with
fp16/bf16 x they use tf32, whose 10-bit mantissa holds fp16/bf16 operands exactly and is finer than the rounding of
the fp16/bf16 output the low-rank term is added to. The low-rank dots are a small share of the work (r ≪ N, K), so
tf32's rate costs little. With bf16 x the u and v/dB kernels split their fp32 operand instead (LOWRANK_SPLIT,
common.lowrank_split): w = hi + lo in bf16 (split_wide), two bf16 MMAs on x or g as stored, 16 mantissa bits of w.
"""

import triton
import triton.language as tl

from .dropout import dropout_mask_tile
from .nf4_lookup import nf4_lookup_state, nf4_tree, nf4_values
from .pdl import wait_for_previous


@triton.jit
def grouped_tile(M, COLS, BLOCK_M: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in a 1-D grid over an M × COLS output, GROUP_M row tiles at a time
    so that programs running together share their column tiles of W in L2 (Triton's matmul tutorial)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_cols = tl.cdiv(COLS, BLOCK_COLS)
    group_size = GROUP_M * num_pid_cols
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % group_size) % group_rows, (pid % group_size) // group_rows


@triton.jit
def block_absmax(
    block,  # block indices b (any shape, int64)
    in_range,  # mask of the same shape
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """absmax_b in fp32: absmax[b], or fl(fl(nested_code[absmax[b]]·nested_absmax[b // 256]) + offset) (double
    quant); 0 where ``in_range`` is False, so padded tile elements dequantize to 0 (None: every block exists, no
    mask). The multiply and the add round separately only when the kernel is compiled with enable_fp_fusion=False
    (module docstring)."""
    if in_range is None:
        if DOUBLE_QUANT:
            absmax_code = tl.load(absmax_ptr + block).to(tl.int32)
            nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE)
            return tl.load(nested_code_ptr + absmax_code) * nested_scale + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + block)
    elif DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_code) * nested_scale + tl.load(offset_ptr)
        return tl.where(in_range, scale, 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=in_range, other=0.0)


@triton.jit
def _and_rows(mask, row_in_range):
    """mask & row_in_range, or mask alone when row_in_range is None (load_weight_tile with ROWS_OUT)."""
    if row_in_range is None:
        return mask
    else:
        return mask & row_in_range


@triton.jit
def _load(ptrs, mask, other, EVEN: tl.constexpr):
    """tl.load(ptrs, mask, other), or with EVEN (the whole tile exists) an unmasked tl.load. (No jit function here
    returns None: Triton 3.6 cannot compile an explicit ``return None``.)"""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def load_weight_tile(
    # pointers: dense W, or the NF4 fields (packed bytes, absmax, code, nested absmax, nested code, offset)
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    # the tile: rows offs_n of W, columns k0 + arange(BLOCK_K)
    offs_n,
    k0,
    N,
    K,
    stride_wn,  # dense: W's row stride; NF4 with ROW_SCALES: K // 2 (bytes per row); otherwise unused
    stride_wk,
    IS_NF4: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,  # NF4 absmax blocksize over the flat index
    NESTED_BLOCKSIZE: tl.constexpr,
    ROW_SCALES: tl.constexpr,  # K % BLOCKSIZE == 0, BLOCKSIZE an even power of two: scales per (row, block)
    LOOKUP: tl.constexpr,  # "tree", "gather", "prmt" or "lds" (nf4_lookup.py)
    lut,  # nf4_lookup.nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE), made before the main loop (None: per element)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ROWS_OUT: tl.constexpr,  # W's rows are the GEMM's output dimension (the forward, y = x·Wᵀ), not its reduced one
    EVEN: tl.constexpr = False,  # the tile's columns are all < K and (unless ROWS_OUT) its rows all < N: no masks
):
    """W[offs_n, k0:k0+BLOCK_K] as a (BLOCK_N, BLOCK_K) tile in the compute dtype; 0 outside N×K, except with
    ROWS_OUT for dense W and NF4 with ROW_SCALES: rows past N are then copies of row N - 1, read without a row mask
    (so without a predicate per load and iteration), and reach only outputs the caller does not store. The columns
    are masked unless EVEN (the caller knows BLOCK_K divides K: K_DIVISOR, N_DIVISOR): clamping the contiguous
    dimension would cost the loads their width. A caller looping over W's rows (dx) may pass W's pointers rebased to
    the tile's first row, offs_n = arange(BLOCK_N) and N the rows left (lora_dx_kernel's REBASE)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    in_range = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if ROWS_OUT:
        rows = tl.minimum(offs_n, N - 1)
        row_in_range = None
    else:
        rows = offs_n
        row_in_range = offs_n[:, None] < N
    if IS_NF4:
        if ROW_SCALES:
            # K is a multiple of the (even) blocksize: a row of W starts on a byte and on a block, each byte of
            # the row holds elements (2j, 2j+1), and a tile row holds SCALES_PER_ROW whole blocks (or a part of
            # one): load the bytes once, split the nibbles, decode one absmax per (row, block) and broadcast it.
            # stride_wn = K // 2, the bytes of a row, passed by the launcher so that the JIT specialises its
            # divisibility (16 when K % 32 == 0): 16-byte loads of the packed bytes.
            if LOOKUP == "prmt" or LOOKUP == "lds":  # int32 words of 4 bytes (8 codes); K % 8 == 0 (BLOCKSIZE ≥ 32)
                offs_word = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                word_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (stride_wn // 4)
                word_in_range = _and_rows(offs_word[None, :] < K // 8, row_in_range)
                packed = _load(word_rows + offs_word[None, :], word_in_range, 0, EVEN)
            else:
                offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                byte_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_byte[None, :]
                packed = _load(byte_ptrs, _and_rows(offs_byte[None, :] < K // 2, row_in_range), 0, EVEN)
            values = nf4_values(packed, code_ptr, lut, LOOKUP, COMPUTE_DTYPE)
            SCALES_PER_ROW: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
            first_block = rows.to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE  # row part loop-invariant
            block = first_block[:, None] + tl.arange(0, SCALES_PER_ROW)[None, :]
            block_k = k0 + tl.arange(0, SCALES_PER_ROW)[None, :] * BLOCKSIZE
            if EVEN:  # every block of the tile exists: no mask
                scale = block_absmax(block, None, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                     DOUBLE_QUANT, NESTED_BLOCKSIZE)
            else:
                scale = block_absmax(block, _and_rows(block_k < K, row_in_range), absmax_ptr, nested_absmax_ptr,
                                     nested_code_ptr, offset_ptr, DOUBLE_QUANT, NESTED_BLOCKSIZE)
            values = tl.reshape(values, (BLOCK_N, SCALES_PER_ROW, BLOCK_K // SCALES_PER_ROW))
            if LOOKUP == "prmt" or LOOKUP == "lds":  # code and scale in the compute dtype, one rounded product
                scale = scale.to(COMPUTE_DTYPE)
            w = tl.reshape(values * scale[:, :, None], (BLOCK_N, BLOCK_K))
        else:
            # Any K and blocksize: nibble and block of every element from its flat index.
            flat = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
            packed = tl.load(w_ptr + flat // 2, mask=in_range, other=0).to(tl.int32)
            q = (packed >> (4 - 4 * (flat % 2)).to(tl.int32)) & 15
            if LOOKUP == "tree":
                values = nf4_tree(q)
            else:  # "gather" (and "prmt"/"lds", which need whole bytes per element pair: exact fp32 gather here)
                values = tl.load(code_ptr + q)
            scale = block_absmax(
                flat // BLOCKSIZE,
                in_range,
                absmax_ptr,
                nested_absmax_ptr,
                nested_code_ptr,
                offset_ptr,
                DOUBLE_QUANT,
                NESTED_BLOCKSIZE,
            )
            w = values * scale
    else:
        # int64 columns too: a transposed view of a large W has a column stride of N (no extra work at stride 1)
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk
        w = _load(w_ptrs, _and_rows(offs_k[None, :] < K, row_in_range), 0.0, EVEN)
    return w.to(COMPUTE_DTYPE)


@triton.jit
def hi_lo(wide, NARROW: tl.constexpr):
    """(hi, lo) in the 16-bit dtype NARROW: hi = round(wide), lo = round(wide - hi). hi + lo keeps 16 mantissa bits
    of an fp32 wide (tf32 keeps 10). lo is 0 where hi is wide already: for ±inf, wide - hi would be NaN (and hi + lo
    NaN where the reference has inf); NaN stays NaN."""
    hi = wide.to(NARROW)
    wide32, hi32 = wide.to(tl.float32), hi.to(tl.float32)
    return tl.join(hi, tl.where(hi32 == wide32, 0.0, wide32 - hi32).to(NARROW))


@triton.jit
def split_wide(wide, NARROW: tl.constexpr):
    """[rows, C] fp32 -> [rows, 2C] in NARROW (hi_lo): column 2c = hi_c, column 2c + 1 = lo_c."""
    return tl.reshape(hi_lo(wide, NARROW), (wide.shape[0], 2 * wide.shape[1]))


@triton.jit
def split_wide_rows(wide, NARROW: tl.constexpr):
    """split_wide along rows: [R, C] fp32 -> [2R, C] in NARROW, row 2i = hi_i, row 2i + 1 = lo_i (built directly,
    not as split_wide's transpose: that layout makes ptxas reuse the wgmma's operand registers and wait for it)."""
    return tl.reshape(tl.permute(hi_lo(wide, NARROW), (0, 2, 1)), (2 * wide.shape[0], wide.shape[1]))


@triton.jit
def fold_split_rows(acc):
    """[2R, C] accumulator of split_wide_rows(wide)·narrow -> [R, C]: the hi and lo rows summed (fp32)."""
    hi, lo = tl.split(tl.permute(tl.reshape(acc, (acc.shape[0] // 2, 2, acc.shape[1])), (0, 2, 1)))
    return hi + lo


@triton.jit
def fold_split(acc):
    """[rows, 2C] accumulator of narrow·split_wide(wide) -> [rows, C]: the hi and lo products summed (fp32)."""
    hi, lo = tl.split(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 2, 2)))
    return hi + lo


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (dropout.py)
def lora_u_kernel(
    # pointers
    x_ptr,  # (M, K) compute dtype
    a_ptr,  # (r, K) fp32 or compute dtype
    u_ptr,  # (splits, M, r) fp32 output: one partial sum per split of K (splits = 1: u itself)
    # sizes
    M,
    K,
    R,
    K_PER_SPLIT,  # columns of x per split (a multiple of BLOCK_K)
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_us,
    stride_um,
    stride_ur,
    # dropout
    seed,
    p,
    keep_scale,
    # constexprs
    DROPOUT: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    LOWRANK_SPLIT: tl.constexpr,  # common.lowrank_split: 16-bit dots on x and split_wide(A)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """u_part[s, rows, ranks] = Σ_{k in split s} (m⊙x)[rows, k] · A[ranks, k]; grid (M / BLOCK_M, r_pad / BLOCK_R,
    splits). The launcher sums the splits in a fixed order (u = Σ_s u_part[s]), so u is reproducible.
    With LOWRANK_SPLIT the dots take x in its own 16-bit dtype (exact) and A as split_wide's hi and lo, accumulated in
    separate columns and summed after the loop (fold_split): one MMA chain from shared memory that keeps a wgmma in
    flight. With dropout the dots take the kept entries of x and u_part is scaled by 1/(1-p) once at the end:
    Σ_k (m⊙x)·A = 1/(1-p) · Σ_{k kept} x·A."""
    wait_for_previous(PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    u = tl.zeros((2 * BLOCK_R, BLOCK_M) if LOWRANK_SPLIT else (BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if DROPOUT:
            if LOWRANK_SPLIT:
                # x·0 where dropped, not 0: a dropped inf is NaN as in the reference (m⊙x)
                x = tl.where(dropout_mask_tile(seed, offs_m, k0, K, p, 1.0, BLOCK_K) != 0.0, x, x * 0.0).to(x.dtype)
            else:
                x = x.to(tl.float32) * dropout_mask_tile(seed, offs_m, k0, K, p, keep_scale, BLOCK_K)
        a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if LOWRANK_SPLIT:  # transposed, A's split rows as the register operand: uᵀ += [hi; lo]·xᵀ
            u = tl.dot(split_wide_rows(a, x.dtype), tl.trans(x), u)
        else:
            u = tl.dot(x.to(LOWRANK_DTYPE), tl.trans(a.to(LOWRANK_DTYPE)), u, input_precision=LOWRANK_PRECISION)
    if LOWRANK_SPLIT:
        u = tl.trans(fold_split_rows(u))
        if DROPOUT:
            u = u * keep_scale
    u_ptrs = u_ptr + tl.program_id(2) * stride_us + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, u, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def lora_fwd_kernel(
    # pointers
    x_ptr,  # (M, K) compute dtype
    w_ptr,  # dense (N, K) compute dtype, or NF4 packed uint8
    absmax_ptr,  # NF4 only (None for a dense W)
    code_ptr,
    nested_absmax_ptr,  # double quant only
    nested_code_ptr,
    offset_ptr,
    u_ptr,  # (M, r) fp32 from lora_u_kernel (None without HAS_LORA)
    b_ptr,  # B (N, r) (None without HAS_LORA)
    bias_ptr,  # (N,) or None
    y_ptr,  # (M, N) compute dtype output
    z_ptr,  # (M, N) compute dtype, y's strides: written with COL_SCALE (the sum before c and b), read with ADD_Z
    col_scale_ptr,  # (N,) fp32 c (COL_SCALE or ADD_Z, else None)
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    K_PER_SPLIT,  # SPLIT_K: columns of x and W per program along grid axis 1, a multiple of BLOCK_K (else unused)
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_ys,  # SPLIT_K: y's stride between splits (else unused)
    scaling,
    # constexprs
    IS_NF4: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    LOOKUP: tl.constexpr,  # NF4 code lookup: "tree", "gather", "prmt" or "lds" (nf4_lookup.py)
    W_FIRST: tl.constexpr,  # W's tile is the first (register) operand of the dot: the transposed product
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,  # False: y = x·deq(W)ᵀ + b only (u, B, R, scaling unused)
    COL_SCALE: tl.constexpr,  # True: z = acc and y = c⊙acc + b are both stored (DoRA)
    ADD_Z: tl.constexpr,  # True: y = acc + b + c⊙z with z read (DoRA with dropout: c − 1 and x_d·Wᵀ + s·u·Bᵀ)
    SPLIT_K: tl.constexpr,  # True: y is (S, M, N) fp32, y[s] = Σ_{k ∈ K_s} x[:, k]·deq(W)[:, k]ᵀ (no other term)
    BASE_PRECISION: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,  # r rounded up to a power of two ≥ 16
    R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py; the split-K launch only)
    K_DIVISOR: tl.constexpr = 1,  # a power of two dividing K (launch_gemm.k_divisor): EVEN_K where BLOCK_K divides it
):
    """y[rows, cols] = (s·Σ_r u[rows, r]·B[cols, r] when HAS_LORA) + Σ_k x[rows, k]·deq(W)[cols, k] + b[cols]: the
    low-rank term starts the accumulator (before the K loop), the bias is added to it after; 1-D grouped grid.

    With W_FIRST (the launchers set it for an NF4 W decoded in registers, common.w_first) W's tile
    is the first operand of the dot: the accumulator is yᵀ[cols, rows] = Σ_k deq(W)[cols, k]·x[rows, k] (the
    transposed sums, stored transposed), so the decoded tile feeds the wgmma from registers and never waits in shared
    memory for the previous MMA to finish reading it.

    Epilogues (DoRA, fused_lora/dora.py): COL_SCALE stores z = acc and y = c⊙acc + b; ADD_Z reads z and stores
    y = acc + b + c⊙z (one M×N read, in place of the passes that would combine them).

    SPLIT_K (a grid too small to fill the GPU, launch_gemm.y_splits): program (tile, s) sums over its K_PER_SPLIT
    columns only and stores its fp32 partial sum to y[s]; lora_decode.lora_decode_fwd_epilogue_kernel adds the S partial
    sums in a fixed order, then b and s·u·Bᵀ (the decode forward's epilogue)."""
    wait_for_previous(PDL)
    COMPUTE_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K:
        tl.static_assert(not (HAS_LORA or HAS_BIAS or COL_SCALE or ADD_Z), "split-K programs store x·deq(W)ᵀ only")
        k_start = tl.program_id(1) * K_PER_SPLIT
        k_end = min(k_start + K_PER_SPLIT, K)
        y_ptr += tl.program_id(1).to(tl.int64) * stride_ys
    else:
        k_start = 0
        k_end = K

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # EVEN_K (BLOCK_K divides K): the main loop's loads have no mask at all; x's rows past M are read as row M - 1
    # (as load_weight_tile reads W's rows past N) and reach only rows of y that are not stored. A mask per load is
    # two SEL and an ISETP per 16-byte copy, and W's masked words load 8 bytes at a time: 284 -> 234 SASS per
    # iteration at 256x128x64 (NF4 with the byte permutes, sm_90a; a row mask alone kept 22 of them). Otherwise x
    # keeps its row mask beside the column one. The launchers pass K_DIVISOR 1 before sm_90, where the clamped rows
    # made the 128x128x64 4-warp tile spill 64 B (launch_gemm.k_divisor).
    EVEN_K: tl.constexpr = K_DIVISOR % BLOCK_K == 0
    if EVEN_K:
        x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    else:
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # The low-rank term and the bias start the accumulator (LoRAFusion): no second [BLOCK_M, BLOCK_N] tile.
    if W_FIRST:
        if HAS_LORA:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:  # zeros from an MMA: see lora_dx_kernel
            acc = tl.dot(tl.zeros((BLOCK_N, 16), COMPUTE_DTYPE), tl.zeros((16, BLOCK_M), COMPUTE_DTYPE))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
            u = tl.load(u_ptrs, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0).to(LOWRANK_DTYPE)
            b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
            b = tl.load(b_ptrs, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(LOWRANK_DTYPE)
            if W_FIRST:
                acc = tl.dot(b, tl.trans(u), acc, input_precision=LOWRANK_PRECISION)
            else:
                acc = tl.dot(u, tl.trans(b), acc, input_precision=LOWRANK_PRECISION)
        acc = acc * scaling
    lut = nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE) if IS_NF4 else None
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk)
        else:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                        other=0.0)
        w = load_weight_tile(
            w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
            offs_n, k0, N, K, stride_wn, stride_wk,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED_BLOCKSIZE, ROW_SCALES, LOOKUP, lut, BLOCK_N, BLOCK_K,
            COMPUTE_DTYPE, True, EVEN_K,
        )  # fmt: skip
        if W_FIRST:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=BASE_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=BASE_PRECISION)

    y_tile = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    in_range = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if COL_SCALE:  # z, then y = c⊙z (+ b below) from the same fp32 accumulator
        c = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        if W_FIRST:
            tl.store(z_ptr + tl.trans(y_tile), acc.to(COMPUTE_DTYPE), mask=tl.trans(in_range))
            acc = acc * c[:, None]
        else:
            tl.store(z_ptr + y_tile, acc.to(COMPUTE_DTYPE), mask=in_range)
            acc = acc * c[None, :]
    if ADD_Z:  # + c⊙z, z read in y's layout
        c = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        z = tl.load(z_ptr + y_tile, mask=in_range, other=0.0).to(tl.float32) * c[None, :]
        if W_FIRST:
            acc += tl.trans(z)
        else:
            acc += z
    if HAS_BIAS:  # after the loop: held through the pipeline's prologue, the broadcast bias made 128×256 spill
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if W_FIRST:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if W_FIRST:
        tl.store(y_ptr + tl.trans(y_tile), acc.to(y_ptr.dtype.element_ty), mask=tl.trans(in_range))
    else:
        tl.store(y_ptr + y_tile, acc.to(y_ptr.dtype.element_ty), mask=in_range)
