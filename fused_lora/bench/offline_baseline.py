"""The baseline of the offline instrument: a plain Triton GEMM C = A·B in bf16 (fp32 accumulation), the matmul of
Triton's tutorial, compiled at the tile and operand layout of a fused GEMM kernel's config so that its SASS per
main-loop iteration sets the floor the fused main loop is compared with (``dense_sass_per_kstep``).

    a: (M, K) row-major (x, or g)
    b: (K, N) with strides (stride_bk, stride_bn): Wᵀ of a row-major W (stride_bk = 1) for y = x·Wᵀ, or W itself
       (stride_bn = 1) for dx = g·W
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.lora_fwd import grouped_tile
from .offline_compile import Job, Ptr

__all__ = ["dense_gemm_kernel", "baseline_job"]


@triton.jit
def dense_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    # constexprs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c[rows, cols] = Σ_k a[rows, k]·b[k, cols]; 1-D grouped grid (Triton's matmul tutorial), the fused GEMMs' own
    tile order (lora_fwd.grouped_tile)."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def baseline_job(arch: int, dtype: str, tile: tuple, b_transposed: bool, M: int, N: int, K: int) -> Job:
    """The baseline GEMM at ``tile`` = (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for an
    (M, K)·(K, N) product in ``dtype`` ("bf16", "fp16")."""
    bm, bn, bk, group, warps, stages = tile
    strides = {"stride_bk": 1, "stride_bn": K} if b_transposed else {"stride_bk": N, "stride_bn": 1}
    layout = "nt" if b_transposed else "nn"
    args = {"a_ptr": Ptr(dtype), "b_ptr": Ptr(dtype), "c_ptr": Ptr(dtype), "M": M, "N": N, "K": K,
            "stride_am": K, "stride_ak": 1, **strides, "stride_cm": N, "stride_cn": 1,
            "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}  # fmt: skip
    return Job(f"dense_gemm-{layout}-{dtype}-{bm}x{bn}x{bk}w{warps}s{stages}", __name__, "dense_gemm_kernel", args,
               {"num_warps": warps, "num_stages": stages}, arch)
