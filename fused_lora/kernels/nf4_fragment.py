"""NF4 tiles decoded straight into the register layout of Hopper's wgmma A operand, with no layout conversion.

Why: a GEMM whose first operand is W's decoded tile feeds the wgmma from registers. Decoded in the layout its
bytes are loaded in (4 consecutive int32 words of one row per thread), the tile had to be moved into the MMA's
fragment layout through shared memory: STS, a barrier and LDSM for every 32 values, plus register moves (about 106
of the decode kernel's 717 SASS per iteration, bench/results/offline). The reduction Σ_k W[n, k]·x[m, k] does not
depend on the order of k, and the order of the output rows n is the kernel's to choose, so the tile can instead be
taken in an order in which every thread already holds what the fragment needs: permute k for W and x alike, permute
n on the store. The bytes in memory stay bitsandbytes' (no pre-shuffled copy of the weight).

Index bits, for a [BLOCK_N, 128] tile (BLOCK_K = common.FRAGMENT_BLOCK_K) read as BLOCK_N rows × 16 int32 words of
8 codes (16-byte loads: 4 words per thread, 4 threads per row, 8 rows per warp; the layout Triton gives such a load):

    loaded (physical)   row p = (p0 .. p_top), word w = (w0 .. w3), code e = (e0, e1, e2) in the word (element order,
                        nf4_lookup.nf4_word_values): k = e + 8·w within the tile
                        thread's registers e0 e1 e2 w0 w1 p5 (p6 ...), lanes w2 w3 p0 p1 p2, warps p3 p4
    wgmma A fragment    row n' and column k' of the MMA, per warpgroup of 4 warps:
                        registers k'0 n'3 k'3 k'4 k'5 k'6 (n'6 ...), lanes k'1 k'2 n'0 n'1 n'2, warps n'4 n'5

Matching them bit for bit (registers may be matched in any order; e0 ↔ k'0 keeps each decoded pair in one 32-bit
register):

    n' = (p0, p1, p2, p5, p3, p4, p6 ...)        fragment_rows: the physical row p of each logical row n'
    k' = (e0, w2, w3, e1, e2, w0, w1)            fragment_k: the column k = e + 8·w of each logical column k'

so x is read at k0 + fragment_k (pairs of consecutive columns: 4-byte loads, told to the compiler with
tl.max_contiguous) and the accumulator's row n' is stored to row p(n'). BLOCK_N is 64 or 128 (the two bit maps of
_to_fragment_order). Any number of warps gives the right numbers (the permutation is exact whatever the layout);
the bit match, and so the absence of a conversion, holds for 4 warps: tests/test_kernels_compile.py checks it on the
compiled decode kernel (128 rows; no LDSM and no shared-memory store in its main loop).
"""

import triton
import triton.language as tl

from .nf4_lookup import nf4_word_values


@triton.jit
def fragment_rows(BLOCK_N: tl.constexpr):
    """[BLOCK_N] int32: the tile row p (as loaded) of each logical row n' of the fragment-ordered tile."""
    n = tl.arange(0, BLOCK_N)
    return (n & 7) | (((n >> 4) & 3) << 3) | (((n >> 3) & 1) << 5) | (n & ~63)


@triton.jit
def fragment_k():
    """[FRAGMENT_BLOCK_K] int32: the tile column k of each logical column k' (pairs of consecutive columns)."""
    kp = tl.arange(0, 128)
    k = (kp & 1) | (((kp >> 3) & 1) << 1) | (((kp >> 4) & 1) << 2) | (((kp >> 5) & 1) << 3)
    k = k | (((kp >> 6) & 1) << 4) | (((kp >> 1) & 1) << 5) | (((kp >> 2) & 1) << 6)
    return tl.max_contiguous(tl.multiple_of(k, 2), 2)


@triton.jit
def _to_fragment_order(t, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 16, 2, 2, 2] (row p, word w, e2, e1, e0) -> [BLOCK_N, 128] (row n', column k'), module docstring."""
    tl.static_assert(BLOCK_N == 64 or BLOCK_N == 128, "fragment-ordered NF4 tiles have 64 or 128 rows")
    if BLOCK_N == 64:
        # dims: p5 p4 p3 p2 p1 p0 | w3 w2 w1 w0 | e2 e1 e0
        #   -> n'5..n'0 = p4 p3 p5 p2 p1 p0 | k'6..k'0 = w1 w0 e2 e1 w3 w2 e0
        t = tl.reshape(t, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2))
        t = tl.permute(t, (1, 2, 0, 3, 4, 5, 8, 9, 10, 11, 6, 7, 12))
    else:
        # dims: p6 .. p0 | w3 .. w0 | e2 e1 e0  ->  n'6..n'0 = p6 p4 p3 p5 p2 p1 p0 | k' as above
        t = tl.reshape(t, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2))
        t = tl.permute(t, (0, 2, 3, 1, 4, 5, 6, 9, 10, 11, 12, 7, 8, 13))
    return tl.reshape(t, (BLOCK_N, 128))


@triton.jit
def load_fragment_tile(
    w_ptr,  # NF4 packed bytes, (N, K // 2) row-major
    scale_ptr,  # fp32 scale per (row, block) (common.decoded_scales), or with SCALE_PAIRS int32 pairs of scales in
    # COMPUTE_DTYPE (common.scale_pairs: blocks 2j and 2j + 1 in the low and high halves)
    code_ptr,  # [16] fp32
    lut,  # nf4_lookup.nf4_lookup_state(code_ptr, LOOKUP, COMPUTE_DTYPE) ("prmt", "lds"), else None
    rows,  # [BLOCK_N] rows of W, in loaded order, each < N (a contiguous range, the caller clamps the tail)
    k0,  # first column, a multiple of 128
    K,  # a multiple of 128 and of BLOCKSIZE
    stride_wn,  # bytes per row, K // 2
    BLOCKSIZE: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    SCALE_PAIRS: tl.constexpr = False,  # BLOCKSIZE ≤ 64; the scales as pairs in COMPUTE_DTYPE (bf16, fp16)
):
    """deq(W)[rows[fragment_rows], k0 + fragment_k] as a [BLOCK_N, 128] tile in COMPUTE_DTYPE: the same values as
    lora_fwd.load_weight_tile, rounded the same way (with SCALE_PAIRS, the scale as LOOKUP "prmt" and "lds" round
    it), in the fragment order of the module docstring. No mask: every row must exist (loads without a predicate per
    iteration)."""
    offs_word = tl.multiple_of(k0 // 8, 16) + tl.arange(0, 16)
    word_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (stride_wn // 4)
    words = tl.load(word_rows + offs_word[None, :])
    v0, v1, v2, v3, v4, v5, v6, v7 = nf4_word_values(words, code_ptr, lut, LOOKUP, COMPUTE_DTYPE)
    # [BLOCK_N, 16, 2, 2, 2]: element e = 4·e2 + 2·e1 + e0 of word w
    t = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    SCALES_PER_ROW: tl.constexpr = 128 // BLOCKSIZE if BLOCKSIZE < 128 else 1
    # (rows·K + k0) // BLOCKSIZE, split so that the row part is loop-invariant (K is a multiple of BLOCKSIZE)
    if SCALE_PAIRS:  # word j of a row: its blocks 2j (low half) and 2j + 1 (high half), 4-byte asynchronous copies
        tl.static_assert(BLOCKSIZE <= 64, "scale pairs need at least two blocks per tile row")
        WORDS: tl.constexpr = SCALES_PER_ROW // 2
        first_word = rows.to(tl.int64) * (K // BLOCKSIZE // 2) + k0 // BLOCKSIZE // 2
        pair = tl.load(scale_ptr.to(tl.pointer_type(tl.int32)) + first_word[:, None] + tl.arange(0, WORDS)[None, :])
        # [BLOCK_N, WORDS, 2]: half h of word j, block 2j + h (a select, not a join: the scales keep a layout that
        # broadcasts over the tile's; the cast to int16 keeps the low 16 bits)
        half = tl.where(tl.arange(0, 2)[None, None, :] == 0, pair[:, :, None], pair[:, :, None] >> 16)
        scale = half.to(tl.int16).to(COMPUTE_DTYPE, bitcast=True)
        t = tl.reshape(t, (BLOCK_N, WORDS, 2, 16 // SCALES_PER_ROW, 8)) * scale[:, :, :, None, None]
    else:
        first_block = rows.to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE
        block = first_block[:, None] + tl.arange(0, SCALES_PER_ROW)[None, :]
        scale = tl.load(scale_ptr + block)
        if LOOKUP == "prmt" or LOOKUP == "lds":  # code and scale in the compute dtype (as load_weight_tile)
            scale = scale.to(COMPUTE_DTYPE)
        t = tl.reshape(t, (BLOCK_N, SCALES_PER_ROW, 16 // SCALES_PER_ROW, 8)) * scale[:, :, None, None]
    t = tl.reshape(t.to(COMPUTE_DTYPE), (BLOCK_N, 16, 2, 2, 2))
    return _to_fragment_order(t, BLOCK_N)
