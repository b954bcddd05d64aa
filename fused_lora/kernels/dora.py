"""The two small kernels DoRA adds beside the fused LoRA GEMMs (fused_lora/dora.py uses them on the Triton backend),
and its entry points into those GEMMs (forward_scaled, backward_scaled, forward_dropout, backward_dropout: c, and
the dropout mask, in the GEMMs themselves).

    scale_columns:  y[m, n] = c[n]·z[m, n] + b[n]     (DoRA's per-row scale of W, i.e. per column of y, then the bias)
    column_dot:     d[n]    = Σ_m g[m, n]·z[m, n]      (dmag's reduction over the rows of the batch)

Both read their M×N operands once, compute in fp32 and round once; neither makes an M×N temporary. column_dot
splits M over programs that each write a partial row of fp32 sums, which are then added in a fixed order (no
atomics: the result is the same run to run). x, z, g may be fp16 / bf16 / fp32 with a unit inner stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import device_guard

__all__ = ["scale_columns", "column_dot", "forward_scaled", "backward_scaled", "forward_dropout", "backward_dropout",
           "dropout_mask"]


@triton.jit
def scale_columns_kernel(
    z_ptr, c_ptr, b_ptr, y_ptr,
    M, N, stride_z, stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    mask = (offs_m < M)[:, None] & in_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    z = tl.load(z_ptr + rows * stride_z + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    y = z * c[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def column_dot_kernel(
    g_ptr, z_ptr, out_ptr,
    M, N, stride_g, stride_z, rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = split * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = (offs_m < last)[:, None] & in_n[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_z + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * z, axis=0)
    tl.store(out_ptr + split.to(tl.int64) * N + offs_n, acc, mask=in_n)


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _blocks(device) -> tuple[int, int]:
    return (32, 128) if device.type == "cuda" else (16, 64)


def scale_columns(z: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor:
    """y = c⊙z + b column-wise: z (M, N), c (N,) and bias (N,) or None, any float dtypes; y (M, N) in ``out_dtype``
    (default z's), computed in fp32 with one rounding.

    Example:
        >>> y = scale_columns(z, c, bias)      # y[m, n] = c[n] * z[m, n] + bias[n]
    """
    z = _rows_unit_stride(z)
    M, N = z.shape
    y = torch.empty((M, N), device=z.device, dtype=out_dtype or z.dtype)
    if M == 0 or N == 0:
        return y
    block_m, block_n = _blocks(z.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    c = c.contiguous()
    b = c if bias is None else bias.contiguous()
    with device_guard(z):
        scale_columns_kernel[grid](z, c, b, y, M, N, z.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                   BLOCK_M=block_m, BLOCK_N=block_n)
    return y


def column_dot(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d = Σ_m g⊙z per column: g and z (M, N), any float dtypes; d (N,) fp32, the same bits run to run.

    Example:
        >>> d = column_dot(g, z)               # d[n] = sum over m of g[m, n] * z[m, n]
    """
    g, z = _rows_unit_stride(g), _rows_unit_stride(z)
    M, N = g.shape
    if M == 0 or N == 0:
        return torch.zeros(N, device=g.device, dtype=torch.float32)
    block_m, block_n = _blocks(g.device)
    column_blocks = triton.cdiv(N, block_n)
    # enough programs to fill the GPU (about 4 per SM), each with at least a few row blocks
    target = 4 * common.sm_count(g.device) if g.device.type == "cuda" else 1
    splits = max(1, min(triton.cdiv(M, 4 * block_m), triton.cdiv(target, column_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_program)
    partial = torch.empty((splits, N), device=g.device, dtype=torch.float32)
    with device_guard(g):
        column_dot_kernel[(splits, column_blocks)](g, z, partial, M, N, g.stride(0), z.stride(0), rows_per_program,
                                                   BLOCK_M=block_m, BLOCK_N=block_n)
    return partial.sum(0)


def backward_scaled(impl, g, x2d, weight, A, B, s, u, c, need_dx, need_dA, need_dB, need_db):
    """(dx, dA, dB, db) of DoRA's backward without dropout: the LoRA backward of c⊙g with c inside the kernels, no
    M×N pass (``fused_lora.kernels.lora.backward`` with col_scale); db = Σ_M g."""
    return impl.backward(g, x2d, weight, A, B, s, 0.0, 0, u, need_dx, need_dA, need_dB, need_db, col_scale=c)


def dropout_mask(shape, p, seed, device, dtype):
    """The Triton kernels' mask for ``seed`` (``fused_lora.kernels.lora.dropout_mask``, Philox), for the rows DoRA
    composes at decode sizes: the same mask as the fused GEMMs and the LoRA layer draw."""
    from .dropout import dropout_mask as kernel_mask

    return kernel_mask(seed, shape[0], shape[1], p, device).to(dtype)


def forward_dropout(impl, x2d, weight, A, B, s, bias, c, p, seed):
    """(y, u, z_d) of DoRA's training forward with dropout from two fused GEMMs
    (``fused_lora.kernels.lora.forward_scaled_dropout``), or None at decode sizes."""
    return impl.forward_scaled_dropout(x2d, weight, A, B, s, bias, c, p, seed)


def backward_dropout(impl, g, x2d, weight, A, B, s, p, seed, u, c, need_dx, need_dA, need_dB, need_db):
    """(dx, dA, dB, db) of DoRA's backward with dropout, c and the mask inside the kernels
    (``fused_lora.kernels.lora.backward`` with col_scale), or None at decode sizes."""
    if not impl.fuses_dora_dropout(x2d.shape[0], weight, x2d.device):
        return None
    return impl.backward(g, x2d, weight, A, B, s, p, seed, u, need_dx, need_dA, need_dB, need_db, col_scale=c)


def forward_scaled(impl, x2d, weight, A, B, s, bias, c):
    """(y, u, z) of DoRA's training forward: y = c⊙z + b and z = x·Wᵀ + s·u·Bᵀ from the fused GEMM's epilogue
    (``fused_lora.kernels.lora.forward_scaled``; ``impl`` is that module, as fused_lora/dora.py passes it)."""
    return impl.forward_scaled(x2d, weight, A, B, s, bias, c)
