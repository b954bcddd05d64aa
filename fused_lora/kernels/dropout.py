"""Dropout mask m of the LoRA path, regenerated in-kernel from (seed, row, column) and never stored.

    m[i, j] = 1/(1-p)  if rand4x(seed, i·⌈K/4⌉ + j // 4)[j % 4] ≥ p  else 0      (i < M rows of x, j < K columns)

``tl.rand4x`` is Triton's counter-based Philox generator, four uniform numbers per counter: one Philox evaluation
covers four consecutive columns of a row (a quarter of the work and of the registers of one evaluation per
element, which made 128×128 dx tiles spill). Every kernel that needs the mask (u in the forward pass, dx/dA in the
backward pass, on every path) draws exactly the same values for the same element. ``dropout_mask_kernel``
materialises the same mask for tests, or m⊙x in x's dtype (DoRA with dropout, whose second frozen product x_d·Wᵀ
needs x_d as a GEMM operand).
"""

import triton
import triton.language as tl


@triton.jit
def dropout_mask_tile(seed, offs_m, col0, K, p, keep_scale, BLOCK_K: tl.constexpr):
    """m for the tile rows ``offs_m`` × columns col0 + arange(BLOCK_K) of rows K long (fp32, entries 0 or
    ``keep_scale`` = 1/(1-p)); col0 and BLOCK_K are multiples of 4."""
    groups = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    counter = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    # column 4g + 2a + b comes from r_{2a+b}[g]
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (offs_m.shape[0], BLOCK_K))
    return tl.where(r >= p, keep_scale, 0.0)


@triton.jit
def dropout_mask_kernel(
    m_ptr,  # (M, K) output, contiguous: m in fp32, or m⊙x in x's dtype when x_ptr is given
    seed,
    M,
    K,
    p,
    keep_scale,
    x_ptr=None,  # (M, K) any strides, or None
    stride_xm=0,
    stride_xk=0,
    BLOCK_M: tl.constexpr = 16,
    BLOCK_K: tl.constexpr = 64,
):
    """m for this seed (dropout_mask_tile), or m⊙x rounded once to x's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_range = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = offs_m.to(tl.int64)[:, None]
    m = dropout_mask_tile(seed, offs_m, tl.program_id(1) * BLOCK_K, K, p, keep_scale, BLOCK_K)
    if x_ptr is not None:
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :] * stride_xk, mask=in_range, other=0.0)
        m = m * x.to(tl.float32)
    tl.store(m_ptr + rows * K + offs_k[None, :], m.to(m_ptr.dtype.element_ty), mask=in_range)
