"""The decode path (M ≤ 64 rows, all in one tile): split-K kernels that stream W once and fill every SM.

Symbols (docs/DESIGN.md): x (M×K), W (N×K) frozen NF4 or dense, A (r×K), B (N×r), b (N), s scaling, m (M×K) dropout
mask (dropout.py), g = ∂L/∂y (M×N), v = g·B. deq(W) tiles come from lora_fwd.load_weight_tile (NF4 decoded in
registers, one scale per (row, block); 16-byte loads of the packed bytes), or for the forward with K a multiple of
128 from nf4_fragment.load_fragment_tile (the same values, rows and columns in the MMA's fragment order). Split s
covers K_s (forward) or N_s (backward), S splits in all; partial sums go to fp32 buffers that the epilogue kernels
sum in a fixed order.

    forward    yᵀ_part[s] = Σ_{k ∈ K_s} deq(W)[:, k]·x[:, k]ᵀ            lora_decode_fwd_kernel, grid (N tiles, S)
               u_part[s]  = Σ_{k ∈ K_s} (m⊙x)[:, k]·A[:, k]ᵀ             (same kernel, one more column of programs)
               u = Σ_s u_part[s];  y = Σ_s y_part[s] + b + s·u·Bᵀ         lora_decode_fwd_epilogue_kernel, grid (N tiles)
    backward   dxᵀ_part[s] = Σ_{n ∈ N_s} deq(W)[n, :]ᵀ·g[:, n]ᵀ          lora_decode_dx_kernel, grid (K tiles, S)
               dx = Σ_s dx_part[s] + s·m⊙(v·A);  dA = s·vᵀ·(m⊙x)         lora_decode_dx_epilogue_kernel, grid (K tiles)

The dx kernel loads without masks where BLOCK_N divides N and BLOCK_K divides K (EVEN: 661 SASS per iteration per warp
at M=16, 395 of them ALU, where the masked loop took 721, 446 ALU; sm_90a, K=4096, N=14336) and keeps the byte permutes
(LOOKUP "prmt"): the pair table took the loop to 517 SASS and 158 ALU, but its lookups add to the shared-memory traffic
of the decoded tile's transposition (28032 instead of 19840 B per iteration), which then bounds the loop, and the model
put it at 13.6 µs at M=16 where the byte permutes, bound by the ALU pipe, are predicted faster.

The GEMMs are computed transposed (W's tile is the first operand of the dot: the MMA's M dimension is W's, so a
one-row x wastes no MMA rows of W). All M rows are in one BLOCK_M tile, so dA needs no cross-program reduction:
the decode path is deterministic in every mode.

Where the time goes (bench/results/offline, sm_90a, K=4096, N=14336, bf16): with NF4 tiles in the wgmma fragment order
(nf4_fragment.py, FRAGMENT; 128×128 tiles, 4 warps, 128 values per thread per iteration) the forward reads the values
from the shared-memory pair table (nf4_lookup.py, LOOKUP "lds", at M ≤ 32 where the GPU has the shared memory,
launch_decode.pair_table_shared): 392 SASS per iteration per warp at M=1 (424 at M=16, 441 at M=32), of which 64 LDS, 64
LOP3 and 64 multiplies are the lookup and 64 HMUL2 the scales; 89 ALU instructions (94 at M=16). The block scales come
as pairs in the compute dtype (SCALE_PAIRS, common.scale_pairs: 1.8 MB beside the 29.4 MB of NF4 bytes, where fp32
scales were 3.7 MB and made the kernel bound by the HBM, 63 and 60 % at M=1 and 16); selected from their word by the
broadcast that scales the tile (a join of the two halves moved them through shared memory: an STS, a barrier and an LDS
per iteration). The model puts the kernel at 9.4 µs at M=1 and 10.0 µs at M=16, bound by instruction issue with the HBM
close behind: 65 and 61 % of the HBM bandwidth with the epilogue; with the byte permutes of nf4_prmt (LOOKUP "prmt",
which the dx kernel and smaller GPUs keep) the same loop took 570 SASS, 326 of them ALU (2 cycles each on the ALU pipe,
offline_model.GpuConstants.alu_cycles): 13.5 µs. The loads have no mask of their own: rows of W past N and of x past M
are read as the last row. There is no shared-memory round trip of the decoded tile; before the fragment order, the same
128 values took 717 SASS, of which 66 IMAD.MOV, 16 STS.128, 16 LDSM and 8 barriers moved the tile into the fragment
layout. 5 pipeline stages (launch_decode.PAIR_TABLE_STAGES) keep 4 tiles of W in flight and put Triton's shared memory
over 48 KiB, which the static table needs to launch. Decoding the double-quant scales here (1 byte per block read
instead of 4) was tried and not taken: the scale gathers in the fragment layout cost 54 SASS per iteration (446), more
than the bytes they save; decoding them in a compact layout of one or two per thread first gave the same 446 (Triton
spreads the decode over the tile's layout). The choices below were priced by the offline model before it counted the ALU
pipe (times in µs of that model). Two splits of 16 K steps (224 programs, launch_gemm._splits with
strategy.Thresholds.decode_programs_per_sm) leave 40 SMs one program: 9.4 µs, where 8 splits of 4 steps took 8.2 µs but
added 5 more prologues and epilogues per SM (2.8 µs) and 4× the partial sums. Sharing the steps evenly instead
(stream-K: every program 13-14 steps, a tile's parts from the programs that cover it) was tried: the loop over a
program's tiles around the pipelined K loop (or one flattened loop with a store at each tile's edge) costs Triton 3.9 as
much SASS as it saves (599-848 per iteration, 540 per tile); so does keeping the loop whole and giving a program two
copies of it, the tail of one tile then the head of the next (256 programs of 14 steps, every SM at most 28): the second
copy's pipeline prologue decodes a tile of its own (~500 SASS per program that crosses a tile) and the kernel took 201
registers instead of 167, which left the model's prediction where it was (12.4 µs). The epilogue kernel is launched with
PDL (pdl.py) on sm_90: 1.4 of the forward's 13.9 µs (2.6 of 16 before PDL and the two splits). u has a column of
programs of its own, as many K steps as the others: computed by the programs of column tile 0 after their W loop, it was
a serial tail of K/64 latency-bound steps (32 at two splits; a review of the cost model, which now prices such loops:
offline_kernels.KernelModel.side_loops). With the byte permutes, unrolling the loop by two (tl.range
loop_unroll_factor=2) dropped the 32 IMAD.MOV that carry the next tile's decoded operands (518 SASS per iteration
instead of 583) but made the first of the two wgmma groups wait at once (Triton 3.9): not taken. Nor was decoding the
tile in two 64-column halves, each half's decode after the other's MMA: 557 SASS, no IMAD.MOV, the same wait. """

import triton
import triton.language as tl

from .dropout import dropout_mask_tile
from .lora_fwd import load_weight_tile
from .nf4_fragment import fragment_k, fragment_rows, load_fragment_tile
from .nf4_lookup import nf4_lookup_state
from .pdl import wait_for_previous


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (dropout.py)
def lora_decode_fwd_kernel(
    x_ptr,  # (M, K) compute dtype
    w_ptr,  # dense (N, K) compute dtype, or NF4 packed uint8
    scale_ptr,  # NF4: fp32 scale per block, or with SCALE_PAIRS pairs of scales (None for a dense W)
    code_ptr,  # NF4: [16] fp32
    a_ptr,  # A (r, K) (None without HAS_LORA)
    y_ptr,  # (S, M, N) fp32 partial sums
    u_ptr,  # (S, M, r) fp32 partial sums (None without HAS_LORA)
    M,
    N,
    K,
    R,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_wn,  # dense: W's row stride; NF4: bytes per row (K // 2)
    stride_wk,
    stride_ar,
    stride_ak,
    stride_ys,
    stride_ym,
    stride_us,
    stride_um,
    seed,
    p,
    keep_scale,
    IS_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    LOOKUP: tl.constexpr,
    FRAGMENT: tl.constexpr,  # NF4 tiles in the wgmma fragment order (nf4_fragment.py): BLOCK_K 128, K % 128 == 0
    SCALE_PAIRS: tl.constexpr,  # FRAGMENT only: scales as int32 pairs in the compute dtype (common.scale_pairs)
    HAS_LORA: tl.constexpr,
    DROPOUT: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,  # ranks per low-rank dot (min(R_PAD, 64))
    BLOCK_M: tl.constexpr,  # ≥ M
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """y_part[s, :, cols]ᵀ = Σ_{k ∈ K_s} deq(W)[cols, k]·x[:, k]ᵀ; with HAS_LORA the last column of programs
    computes u_part[s] = Σ_{k ∈ K_s} (m⊙x)[:, k]·A[:, k]ᵀ instead (as many K steps as the others: no tail)."""
    wait_for_previous(PDL)
    COMPUTE_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    k_start = split * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)
    # rows of x past M (and below, of W past N) are read as the last row, without a mask (so without a predicate per
    # load and iteration): they reach only rows and columns of yᵀ and u that the stores leave out
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    # W's programs first in the code: their loop is the kernel's main loop (offline_kernels.KernelModel.main_loop)
    if not HAS_LORA or pid_n < tl.num_programs(0) - 1:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # yᵀ, from an MMA of zeros (an accumulator defined by ordinary instructions serialises the wgmma pipeline)
        acc = tl.dot(tl.zeros((BLOCK_N, 16), COMPUTE_DTYPE), tl.zeros((16, BLOCK_M), COMPUTE_DTYPE))
        lut = nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE) if IS_NF4 else None
        if FRAGMENT:  # row n' of acc is W's row out_rows[n']; column k' of the tile is k0 + offs_x[k']
            tl.static_assert(BLOCK_K == 128, "fragment-ordered tiles are 128 columns wide")
            out_rows = pid_n * BLOCK_N + fragment_rows(BLOCK_N)
            offs_x = fragment_k()
            w_rows = tl.minimum(offs_n, N - 1)  # yᵀ[n, m] reads W's row n and x's row m alone
        else:
            out_rows = offs_n
            offs_x = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + offs_x
            if FRAGMENT:  # K is a multiple of BLOCK_K: no column mask (it would narrow the loads)
                x = tl.load(x_rows + offs_k[None, :] * stride_xk)
                w = load_fragment_tile(
                    w_ptr, scale_ptr, code_ptr, lut, w_rows, k0, K, stride_wn, BLOCKSIZE, LOOKUP, BLOCK_N,
                    COMPUTE_DTYPE, SCALE_PAIRS,
                )  # fmt: skip
            else:
                x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < K, other=0.0)
                w = load_weight_tile(
                    w_ptr, scale_ptr, code_ptr, scale_ptr, code_ptr, code_ptr,
                    offs_n, k0, N, K, stride_wn, stride_wk,
                    IS_NF4, False, BLOCKSIZE, 1, IS_NF4, LOOKUP, lut, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, True,
                )  # fmt: skip
            acc = tl.dot(w, tl.trans(x), acc, input_precision=BASE_PRECISION)
        y_ptrs = y_ptr + split * stride_ys + offs_m[None, :] * stride_ym + out_rows[:, None]
        tl.store(y_ptrs, acc, mask=(offs_m[None, :] < M) & (out_rows[:, None] < N))
    else:
        # u_part[split], R_CHUNK ranks at a time (small tiles of A at any r), BLOCK_K columns per step
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            u = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < K, other=0.0)
                if DROPOUT:
                    x = x.to(tl.float32) * dropout_mask_tile(seed, offs_m, k0, K, p, keep_scale, BLOCK_K)
                a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
                a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
                u = tl.dot(x.to(LOWRANK_DTYPE), tl.trans(a.to(LOWRANK_DTYPE)), u, input_precision=LOWRANK_PRECISION)
            u_ptrs = u_ptr + split * stride_us + offs_m[:, None] * stride_um + offs_r[None, :]
            tl.store(u_ptrs, u, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


PARTIALS_PER_TRIP = tl.constexpr(4)


@triton.jit
def sum_partials(acc, ptrs, stride_s, S, mask):
    """acc + Σ_{s < S} ptrs[s·stride_s], added in the order s = 0, 1, … (the same sum in every run): the loads of
    PARTIALS_PER_TRIP splits are in flight together, so the loop waits for memory once per PARTIALS_PER_TRIP splits
    rather than once per split."""
    for s in range(0, S, PARTIALS_PER_TRIP):
        split = tl.full(mask.shape, s, tl.int32)  # a tensor, so that the masks below stay tensors of booleans
        p0 = tl.load(ptrs + s * stride_s, mask=mask, other=0.0)
        p1 = tl.load(ptrs + (s + 1) * stride_s, mask=mask & (split + 1 < S), other=0.0)
        p2 = tl.load(ptrs + (s + 2) * stride_s, mask=mask & (split + 2 < S), other=0.0)
        p3 = tl.load(ptrs + (s + 3) * stride_s, mask=mask & (split + 3 < S), other=0.0)
        acc = acc + p0 + p1 + p2 + p3
    return acc


def u_parts_per_trip(block_m: int, r_chunk: int) -> int:
    """Parts of u that sum_small_parts loads at once for a BLOCK_M × R_CHUNK tile: up to 16, at most 16384 values
    (16 parts of 16 × 64: 132 registers, no spill on sm_90, bench/results/compile_report.md)."""
    return max(1, min(16, 16384 // (block_m * r_chunk)))


@triton.jit
def sum_small_parts(acc, ptrs, stride_s, S, mask, PER_TRIP: tl.constexpr):
    """acc + Σ_{s < S} ptrs[s·stride_s] for a small tile (u's, BLOCK_M × R_CHUNK): PER_TRIP parts per load
    (u_parts_per_trip), each such group added by one reduction (a fixed order: the same sum in every run), so that
    the loop waits for memory once per PER_TRIP parts (lora_u_kernel leaves tens of them at middle M)."""
    offs_s = tl.arange(0, PER_TRIP)
    for s in range(0, S, PER_TRIP):
        in_range = mask[None, :, :] & ((s + offs_s) < S)[:, None, None]
        parts = tl.load(ptrs[None, :, :] + (s + offs_s)[:, None, None] * stride_s, mask=in_range, other=0.0)
        acc = acc + tl.sum(parts, axis=0)
    return acc


@triton.jit
def lora_decode_fwd_epilogue_kernel(
    y_part_ptr,  # (S, M, N) fp32
    u_part_ptr,  # (U_SPLITS, M, r) fp32 (None without HAS_LORA)
    b_ptr,  # B (N, r)
    bias_ptr,  # (N,) or None
    y_ptr,  # (M, N) compute dtype output
    u_ptr,  # (M, r) fp32 output (STORE_U; else None)
    M,
    N,
    R,
    S,
    U_SPLITS,
    stride_ps,
    stride_pm,
    stride_qs,
    stride_qm,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_um,
    scaling,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_U: tl.constexpr,  # the programs of column tile 0 store u = Σ_s u_part[s]
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,  # ranks per low-rank dot (min(R_PAD, 64))
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U_PER_TRIP: tl.constexpr = 1,  # u_parts_per_trip(BLOCK_M, R_CHUNK)
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """y[rows, cols] = Σ_s y_part[s, rows, cols] + b[cols] + s·u[rows]·B[cols]ᵀ with u = Σ_s u_part[s] (the
    programs of column tile 0 store u with STORE_U); grid (column tiles, row tiles). Also the epilogue of the middle
    path's split-K GEMM (lora_fwd_kernel SPLIT_K; u_part from lora_u_kernel, or a whole u as one part)."""
    wait_for_previous(PDL)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_in = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = sum_partials(acc, y_part_ptr + rows * stride_pm + offs_n[None, :], stride_ps, S, tile_in)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        lowrank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            u_in = (offs_m[:, None] < M) & (offs_r[None, :] < R)
            u = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
            u = sum_small_parts(u, u_part_ptr + rows * stride_qm + offs_r[None, :], stride_qs, U_SPLITS, u_in,
                                U_PER_TRIP)
            if STORE_U:
                if tl.program_id(0) == 0:
                    tl.store(u_ptr + rows * stride_um + offs_r[None, :], u, mask=u_in)
            bt_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
            bt = tl.load(bt_ptrs, mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
            lowrank = tl.dot(u.to(LOWRANK_DTYPE), bt.to(LOWRANK_DTYPE), lowrank, input_precision=LOWRANK_PRECISION)
        acc += scaling * lowrank
    tl.store(y_ptr + rows * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=tile_in)


@triton.jit
def lora_decode_dx_kernel(
    g_ptr,  # (M, N) compute dtype
    w_ptr,  # dense (N, K) compute dtype, or NF4 packed uint8
    scale_ptr,
    code_ptr,
    dx_ptr,  # (S, M, K) fp32 partial sums
    M,
    N,
    K,
    N_PER_SPLIT,  # a multiple of BLOCK_N
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_ds,
    stride_dm,
    IS_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    LOOKUP: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction tile over N
    BLOCK_K: tl.constexpr,  # output tile over K
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
    EVEN: tl.constexpr = False,  # BLOCK_N divides N and BLOCK_K divides K: the loop's loads have no mask
):
    """dx_part[s, :, cols]ᵀ = Σ_{n ∈ N_s} deq(W)[n, cols]ᵀ·g[:, n]ᵀ."""
    wait_for_previous(PDL)
    COMPUTE_DTYPE: tl.constexpr = g_ptr.dtype.element_ty
    split = tl.program_id(1)
    k0 = tl.program_id(0) * BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_start = split * N_PER_SPLIT
    n_end = min(n_start + N_PER_SPLIT, N)
    g_rows = g_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_gm  # past M: row M - 1, not stored
    acc = tl.dot(tl.zeros((BLOCK_K, 16), COMPUTE_DTYPE), tl.zeros((16, BLOCK_M), COMPUTE_DTYPE))  # dxᵀ, as above
    lut = nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE) if IS_NF4 else None
    # W's pointers move with the loop, rebased to the tile's first row (lora_dx_kernel's REBASE)
    w_rows = w_ptr + n_start.to(tl.int64) * stride_wn
    s_rows = scale_ptr
    if IS_NF4:
        s_rows += n_start.to(tl.int64) * (K // BLOCKSIZE)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if EVEN:
            g = tl.load(g_rows + offs_n[None, :] * stride_gn)
        else:
            g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=offs_n[None, :] < N, other=0.0)
        w = load_weight_tile(
            w_rows, s_rows, code_ptr, s_rows, code_ptr, code_ptr,
            tl.arange(0, BLOCK_N), k0, N - n0, K, stride_wn, stride_wk,
            IS_NF4, False, BLOCKSIZE, 1, IS_NF4, LOOKUP, lut, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, False, EVEN,
        )  # fmt: skip
        w_rows += BLOCK_N * stride_wn
        if IS_NF4:
            s_rows += BLOCK_N * (K // BLOCKSIZE)
        acc = tl.dot(tl.trans(w), tl.trans(g), acc, input_precision=BASE_PRECISION)
    dx_ptrs = dx_ptr + split * stride_ds + offs_m[None, :] * stride_dm + offs_k[:, None]
    tl.store(dx_ptrs, acc, mask=(offs_m[None, :] < M) & (offs_k[:, None] < K))


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (dropout.py)
def lora_decode_dx_epilogue_kernel(
    dx_part_ptr,  # (S, M, K) fp32 (None when dx is not needed)
    x_ptr,  # (M, K) compute dtype (read for dA)
    a_ptr,  # A (r, K)
    v_ptr,  # (M, r) fp32
    dx_ptr,  # (M, K) compute dtype output (None when not needed)
    da_ptr,  # dA (r, K) fp32 output (None when not needed)
    M,
    K,
    R,
    S,
    stride_ps,
    stride_pm,
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
    seed,
    p,
    keep_scale,
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DROPOUT: tl.constexpr,
    LOWRANK_DTYPE: tl.constexpr,
    LOWRANK_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,  # ranks per low-rank dot (min(R_PAD, 64))
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """dx[:, cols] = Σ_s dx_part[s, :, cols] + s·m⊙(v·A[:, cols]); dA[:, cols] = s·vᵀ·(m⊙x)[:, cols] (every row is
    in this program: no reduction across programs)."""
    wait_for_previous(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile_in = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NEED_DX:
        acc = sum_partials(acc, dx_part_ptr + offs_m[:, None] * stride_pm + offs_k[None, :], stride_ps, S, tile_in)
    if HAS_LORA:
        if DROPOUT:
            m = dropout_mask_tile(seed, offs_m, tl.program_id(0) * BLOCK_K, K, p, keep_scale, BLOCK_K)
        if NEED_DA:
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # the user's x: row offsets in int64
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=tile_in, other=0.0)
            if DROPOUT:
                x = x.to(tl.float32) * m
            x = x.to(LOWRANK_DTYPE)
        lowrank = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            v_ptrs = v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr
            v = tl.load(v_ptrs, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0).to(LOWRANK_DTYPE)
            if NEED_DX:
                a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
                a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
                lowrank = tl.dot(v, a.to(LOWRANK_DTYPE), lowrank, input_precision=LOWRANK_PRECISION)
            if NEED_DA:
                da = tl.dot(tl.trans(v), x, input_precision=LOWRANK_PRECISION)
                da_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
                tl.store(da_ptrs, scaling * da, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))
        if NEED_DX:
            lowrank = scaling * lowrank
            if DROPOUT:
                lowrank = lowrank * m
            acc += lowrank
    if NEED_DX:
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile_in)
