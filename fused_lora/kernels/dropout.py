"""Dropout mask m of the LoRA path, regenerated in-kernel from (seed, row, column) and never stored.

    m[i, j] = 1/(1-p)  if rand(seed, i·K + j) ≥ p  else 0          (i < M rows of x, j < K columns)

``tl.rand`` is Triton's counter-based Philox generator, so every kernel that needs the mask (the u kernel in
the forward pass, the dx/dA kernel in the backward pass) draws exactly the same values for the same element.
``dropout_mask_kernel`` materialises the same mask for tests.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_mask_tile(seed, offs_m, offs_k, K, p, keep_scale):
    """m for the tile rows ``offs_m`` × columns ``offs_k`` (fp32, entries 0 or ``keep_scale`` = 1/(1-p))."""
    counter = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    return tl.where(tl.rand(seed, counter) >= p, keep_scale, 0.0)


@triton.jit
def dropout_mask_kernel(
    m_ptr,  # (M, K) fp32 output, contiguous
    seed,
    M,
    K,
    p,
    keep_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = dropout_mask_tile(seed, offs_m, offs_k, K, p, keep_scale)
    in_range = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(m_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], m, mask=in_range)
