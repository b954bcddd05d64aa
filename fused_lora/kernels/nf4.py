"""Triton kernels for bitsandbytes-compatible NF4: blockwise quantize (pack) and dequantize (unpack).

The format and the plain-PyTorch twin of both kernels live in fused_lora/nf4.py; the twin is the oracle in
tests, and both are checked byte for byte against bitsandbytes on the CPU.

Symbols (all in the code below):
    x        the flattened weight, n = n_elements values, read in its own dtype and widened to float32
    b        a quantization block: elements [b·BLOCKSIZE, (b+1)·BLOCKSIZE) ∩ [0, n)
    absmax   absmax[b] = max |x| over block b (float32)
    code     the 16 NF4 values, sorted; bounds[i] = (code[i] + code[i+1]) / 2, i < 15 (float32)
    q        the 4-bit code index of one element; element 2p goes to the HIGH nibble of byte p, 2p+1 to the low
    s        the per-block dequantization scale (float32)

Launchers take flat, contiguous tensors and allocate their outputs. The dequantize launcher compiles with
``enable_fp_fusion=False`` so that the double-quant scale is a float32 multiply followed by a float32 add (two
roundings, as bitsandbytes computes it) rather than one fused multiply-add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of packed output (byte pairs) per program; a power of two.
_PAIRS_PER_PROGRAM = 1024


# Quantize, per block b of the flattened weight x (all float32):
#   absmax[b] = max_{i∈b} |x_i|
#   d_b       = max(absmax[b], 1e-38)      (a subnormal absmax would have an inf reciprocal; bitsandbytes clamps)
#   r_i       = x_i · fl(1 / d_b)          for a full block      (bitsandbytes multiplies by the reciprocal)
#             = fl(x_i / d_b)              for the last, partial block  (bitsandbytes divides there)
#             = 0                          when absmax[b] == 0
#   r_i       = min(max(r_i, -1), 1)
#   q_i       = #{ j < 15 : r_i > bounds[j] }            (strict >: a value on a midpoint takes the lower code)
#   packed[p] = q_{2p} << 4 | q_{2p+1}                   (a missing element 2p+1 when n is odd counts as 0 → code 7)
# Divisions are IEEE round-to-nearest (div_rn), the same float32 results as PyTorch on the CPU. The launcher
# applies bitsandbytes' clamp of a partial block's stored absmax to ≥ 1e-38.
@triton.jit
def nf4_quantize_kernel(
    # pointers
    x_ptr,  # [n] float32 / float16 / bfloat16
    packed_ptr,  # [(n + 1) // 2] uint8, out
    absmax_ptr,  # [n_blocks] float32, out
    bounds_ptr,  # [15] float32
    # sizes
    n_elements,
    n_blocks,
    # constexprs
    BLOCKSIZE: tl.constexpr,  # quantization block (even)
    BLOCKS_PER_PROGRAM: tl.constexpr,  # power of two
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [R]
    pair = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [R, HALF]
    hi_index = 2 * pair
    lo_index = hi_index + 1
    x_hi = tl.load(x_ptr + hi_index, mask=hi_index < n_elements, other=0.0).to(tl.float32)
    x_lo = tl.load(x_ptr + lo_index, mask=lo_index < n_elements, other=0.0).to(tl.float32)

    absmax = tl.maximum(tl.max(tl.abs(x_hi), axis=1), tl.max(tl.abs(x_lo), axis=1))  # [R]
    nonzero = absmax > 0.0
    # 1e-38 as an fp32 tensor: Triton 3.6 types a Python float below fp32's normal range as fp64 (3.9 as fp32)
    divisor = tl.where(nonzero, tl.maximum(absmax, tl.full((), 1e-38, tl.float32)), 1.0)[:, None]
    reciprocal = tl.math.div_rn(tl.full(divisor.shape, 1.0, tl.float32), divisor)
    partial = ((block + 1) * BLOCKSIZE > n_elements)[:, None]

    r_hi = tl.where(partial, tl.math.div_rn(x_hi, divisor), x_hi * reciprocal)
    r_lo = tl.where(partial, tl.math.div_rn(x_lo, divisor), x_lo * reciprocal)
    r_hi = tl.where(nonzero[:, None], tl.minimum(tl.maximum(r_hi, -1.0), 1.0), 0.0)
    r_lo = tl.where(nonzero[:, None], tl.minimum(tl.maximum(r_lo, -1.0), 1.0), 0.0)

    q_hi = tl.zeros(r_hi.shape, dtype=tl.int32)
    q_lo = tl.zeros(r_lo.shape, dtype=tl.int32)
    for j in tl.static_range(15):
        bound = tl.load(bounds_ptr + j)
        q_hi += (r_hi > bound).to(tl.int32)
        q_lo += (r_lo > bound).to(tl.int32)

    n_pairs = n_elements // 2 + n_elements % 2  # not (n + 1) // 2: n = 2^31 - 1 arrives as int32 and n + 1 wraps
    tl.store(packed_ptr + pair, ((q_hi << 4) | q_lo).to(tl.uint8), mask=pair < n_pairs)
    tl.store(absmax_ptr + block, absmax, mask=block < n_blocks)


# Dequantize, for byte p (elements 2p and 2p+1, both in block b = 2p // BLOCKSIZE; BLOCKSIZE is even):
#   s       = absmax[b]                                                        (plain absmax, float32)
#           = fl(fl(nested_code[absmax_q[b]] · nested_absmax[b // NESTED_BLOCKSIZE]) + offset)   (double quant)
#   y_{2p}   = fl(code[packed[p] >> 4]   · s)   rounded once to the output dtype
#   y_{2p+1} = fl(code[packed[p] & 0xF]  · s)
# The two outputs of a byte are interleaved in registers so each program stores one contiguous run.
@triton.jit
def nf4_dequantize_kernel(
    # pointers
    packed_ptr,  # [(n + 1) // 2] uint8
    absmax_ptr,  # [n_blocks] float32, or uint8 codes when DOUBLE_QUANT
    code_ptr,  # [16] float32
    out_ptr,  # [n] float32 / float16 / bfloat16 / float64, out
    nested_absmax_ptr,  # [ceil(n_blocks / NESTED_BLOCKSIZE)] float32 (DOUBLE_QUANT only)
    nested_code_ptr,  # [256] float32 (DOUBLE_QUANT only)
    offset_ptr,  # [] float32 (DOUBLE_QUANT only)
    # sizes
    n_elements,
    # constexprs
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRS: tl.constexpr,  # bytes per program, power of two
):
    pair = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
    n_pairs = n_elements // 2 + n_elements % 2  # not (n + 1) // 2: n = 2^31 - 1 arrives as int32 and n + 1 wraps
    in_range = pair < n_pairs
    byte = tl.load(packed_ptr + pair, mask=in_range, other=0).to(tl.int32)
    block = (2 * pair) // BLOCKSIZE
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        s = tl.load(nested_code_ptr + absmax_q) * nested_scale + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    y_hi = tl.load(code_ptr + (byte >> 4)) * s
    y_lo = tl.load(code_ptr + (byte & 0xF)) * s
    y = tl.interleave(y_hi, y_lo)  # [2·PAIRS]: y_hi[0], y_lo[0], y_hi[1], ...
    element = tl.program_id(0).to(tl.int64) * (2 * PAIRS) + tl.arange(0, 2 * PAIRS)
    tl.store(out_ptr + element, y.to(out_ptr.dtype.element_ty), mask=element < n_elements)


def nf4_quantize(x: torch.Tensor, bounds: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat weight to packed NF4 bytes and per-block absmax.

    Args:
        x: [n] float32 / float16 / bfloat16, contiguous, n ≥ 1.
        bounds: [15] float32, the midpoints between consecutive NF4 codes, on x's device.
        blocksize: even quantization block size.
    Returns:
        packed [(n + 1) // 2, 1] uint8 and absmax [ceil(n / blocksize)] float32, as bitsandbytes'
        quantize_4bit(x, quant_type="nf4", compress_statistics=False) returns them.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    blocks_per_program = max(1, _PAIRS_PER_PROGRAM // (blocksize // 2))
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    nf4_quantize_kernel[grid](
        x, packed, absmax, bounds, n, n_blocks, BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program
    )
    if n % blocksize:
        absmax[-1:].clamp_(min=1e-38)
    return packed, absmax


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    n_elements: int,
    blocksize: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Dequantize packed NF4 bytes to a flat tensor, computing code[q]·s in float32 and rounding once.

    Args:
        packed: [(n + 1) // 2, 1] (or flat) uint8, any strides (all inputs are made contiguous, a copy only
            where they are not). absmax: [n_blocks] float32, or uint8 with double quant.
        code: [16] float32. n_elements: n. blocksize: even block size. dtype: output dtype.
        nested_absmax, nested_code, offset: double-quant state ([n_blocks / 256] float32, [256] float32,
            0-d float32), all None without double quant.
    Returns:
        [n] tensor of ``dtype`` on packed's device.
    """
    double_quant = nested_absmax is not None
    # The kernel indexes every input as a flat contiguous array (no copy for tensors that already are).
    packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
    out = torch.empty(n_elements, dtype=dtype, device=packed.device)
    grid = (triton.cdiv((n_elements + 1) // 2, _PAIRS_PER_PROGRAM),)
    if double_quant:
        nested = (nested_absmax.contiguous(), nested_code.contiguous(), offset.contiguous())
    else:
        nested = (absmax, code, code)
    nf4_dequantize_kernel[grid](
        packed, absmax, code, out, *nested, n_elements,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
        PAIRS=_PAIRS_PER_PROGRAM, enable_fp_fusion=False,
    )
    return out
