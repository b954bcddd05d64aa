"""Dropout mask m of the LoRA path, regenerated in-kernel from (seed, row, column) and never stored.

    m[i, j] = 1/(1-p)  if rand4x(seed, i·⌈K/4⌉ + j // 4)[j % 4] ≥ p  else 0      (i < M rows of x, j < K columns)

``tl.rand4x`` is Triton's counter-based Philox generator, four uniform numbers per counter: one Philox evaluation
covers four consecutive columns of a row (a quarter of the work and of the registers of one evaluation per
element, which made 128×128 dx tiles spill). Every kernel that needs the mask (u in the forward pass, dx/dA in the
backward pass, on every path) draws exactly the same values for the same element. ``dropout_mask_kernel``
materialises the same mask for tests, or m⊙x in x's dtype (DoRA with dropout, whose second frozen product x_d·Wᵀ
needs x_d as a GEMM operand).

The seed (31 bits, drawn on the host at every call) is a kernel argument that Triton never specialises
(``do_not_specialize``, on every kernel that takes it): otherwise a seed that is a multiple of 16 compiles a second
variant of each kernel, a stall at the first such step. Dropout itself is refused inside a CUDA graph capture
(common.dropout_args, which every launch with a seed takes its arguments from): a graph would replay the captured
step's seed, and so its mask, at every step.
"""

import torch
import triton
import triton.language as tl

from .common import device_guard, dropout_args


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


@triton.jit(do_not_specialize=["seed"])  # any seed, one compiled kernel (module docstring)
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


def _launch_dropout(out: torch.Tensor, seed: int, p: float, x2d=None) -> torch.Tensor:
    """dropout_mask_kernel into ``out`` (M, K) contiguous: m, or m⊙x with x2d."""
    M, K = out.shape
    dropout = dropout_args(p, seed)  # (refused inside a CUDA graph capture, even for an empty tensor)
    if M and K:
        x_args = {} if x2d is None else {"x_ptr": x2d, "stride_xm": x2d.stride(0), "stride_xk": x2d.stride(1)}
        with device_guard(out):
            dropout_mask_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 64))](
                out, M=M, K=K, **dropout, **x_args, BLOCK_M=16, BLOCK_K=64,
            )  # fmt: skip
    return out


def dropout_apply(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x_d = m⊙x (M, K) in x's dtype, contiguous, m the kernels' mask for (seed, p) (0 < p < 1).

    Example:
        >>> x_d = dropout_apply(x, 0.1, 1234)        # x * dropout_mask(1234, *x.shape, 0.1, x.device), rounded once
    """
    return _launch_dropout(torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype), seed, p, x2d)


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The dropout mask m that the kernels regenerate for (seed, p), materialised (for tests).

    Returns:
        (M, K) fp32 tensor with entries 0 or 1/(1-p); all ones when p == 0.

    Example:
        >>> m = dropout_mask(1234, 37, 64, 0.1, "cpu")     # pass as ``m`` to fused_lora.reference.lora_forward
    """
    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), device=device, dtype=torch.float32)
    return _launch_dropout(torch.empty((M, K), device=device, dtype=torch.float32), seed, p)
