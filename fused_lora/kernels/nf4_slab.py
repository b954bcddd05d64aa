"""Dequantization of one window of an NF4 weight into a dense slab: the large-M path (launch_slab.py).

Symbols (docs/DESIGN.md, NF4 format): W (N×K) flattened row-major, i = n·K + k the flat index of W[n, k],
q(i) = packed[i // 2] >> 4 for even i, packed[i // 2] & 15 for odd i, code the 16 fp32 NF4 values,
scale[b] the fp32 scale of block b = i // BLOCKSIZE (common.decoded_scales: bitsandbytes' double-quant rounding).

    slab[n - n0, k - k0] = round_to_slab_dtype(fl32(code[q(n·K + k)] · scale[(n·K + k) // BLOCKSIZE]))
    for n0 ≤ n < n0 + ROWS, k0 ≤ k < k0 + COLS

The fp32 product rounded once: byte-exact with bitsandbytes' dequantize_4bit and NF4Weight.dequantize. The code is
read from the 16-entry table in global memory (exact fp32; the kernel is bound by memory: it reads N·K/2 bytes and
N·K/BLOCKSIZE scales and writes the slab). With PAIRS (K and k0 even) each packed byte is loaded once for its two
elements, which lie in the same row and the same block (BLOCKSIZE is even).
"""

import triton
import triton.language as tl


@triton.jit
def nf4_slab_kernel(
    packed_ptr,  # [(N·K + 1) // 2] uint8
    scale_ptr,  # [n_blocks] fp32 decoded scales
    code_ptr,  # [16] fp32
    slab_ptr,  # (ROWS, COLS) output in the compute dtype, row stride stride_sn, column stride 1
    K,
    n0,
    k0,
    ROWS,
    COLS,
    stride_sn,
    stride_pn,  # PAIRS: K // 2, bytes per row of W (passed so that the JIT specialises its divisibility)
    byte0,  # PAIRS: k0 // 2
    BLOCKSIZE: tl.constexpr,
    PAIRS: tl.constexpr,  # K and k0 even: one byte load per element pair
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns per program (even)
):
    """slab[rows, cols] of the window (n0, k0, ROWS, COLS); grid (ROWS / BLOCK_R, COLS / BLOCK_C)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows[:, None] < ROWS
    flat_row = (n0 + rows).to(tl.int64)[:, None] * K + k0
    out_rows = slab_ptr + rows.to(tl.int64)[:, None] * stride_sn
    if PAIRS:
        pairs = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        in_range = row_in & (pairs[None, :] < COLS // 2)  # COLS is even with PAIRS
        flat = flat_row + 2 * pairs[None, :]  # even: the byte's high nibble
        # byte flat // 2 = row·K/2 + k0/2 + pair, from row pointers whose alignment the JIT can see (16-byte loads)
        byte_rows = packed_ptr + (n0 + rows).to(tl.int64)[:, None] * stride_pn + byte0
        byte = tl.load(byte_rows + pairs[None, :], mask=in_range, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + flat // BLOCKSIZE, mask=in_range, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        out = tl.interleave(hi, lo).to(slab_ptr.dtype.element_ty)
        tl.store(out_rows + cols[None, :], out, mask=row_in & (cols[None, :] < COLS))
    else:
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_range = row_in & (cols[None, :] < COLS)
        flat = flat_row + cols[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=in_range, other=0).to(tl.int32)
        q = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 15
        scale = tl.load(scale_ptr + flat // BLOCKSIZE, mask=in_range, other=0.0)
        out = (tl.load(code_ptr + q) * scale).to(slab_ptr.dtype.element_ty)
        tl.store(out_rows + cols[None, :], out, mask=in_range)
