"""Fused multi-tensor AdamW updates: one launch updates a whole chunk of parameters.

Symbols (per element; scalars per tensor, computed on the host in float64 and rounded once to fp32):
    p parameter, g gradient, m first moment (exp_avg / state1), v second moment (exp_avg_sq / state2),
    t step, b1, b2 betas, lr, wd weight decay, c1 = 1 - b1^t, c2 = sqrt(1 - b2^t).

BNB_ORDER=False (torch.optim.AdamW, the update of PagedAdamW):
    p ← p·(1 - lr·wd)
    m ← m + (1-b1)·(g - m)                      (lerp)
    v ← v·b2 + ((1-b2)·g)·g
    p ← p + ((-lr/c1)·m) / (sqrt(v)/c2 + eps)

BNB_ORDER=True (bitsandbytes' 32-bit AdamW, used for tensors below min_8bit_size in the 8-bit optimizers):
    m ← m·b1 + (1-b1)·g
    v ← v·b2 + ((1-b2)·g)·g
    p ← p·(1 - lr·wd)                            (only when wd > 0; ·1 is exact otherwise)
    p ← p + (-lr·c2/c1) · (m / (sqrt(v) + eps·c2))

8-bit blockwise (bitsandbytes' AdamW8bit): m and v are stored as uint8 codes qm, qv into 256-entry sorted maps
code_m (signed) and code_v (unsigned), with one fp32 absmax per block of QBLOCK = 256 elements:
    m = code_m[qm]·am,  v = code_v[qv]·av                                  (dequantize)
    m ← m·b1 + (1-b1)·g;  v ← v·b2 + ((1-b2)·g)·g
    p ← p·(1 - lr·wd);  p ← p + ((-lr/c1)·m) / (sqrt(v)/c2 + eps)
    am ← max|m| over the block;  u = clamp(m·(1/am), -1, 1)                (requantize; same for v)
    qm ← lut_m[trunc(((u + 1)·0.5)·65535 + 0.5)]                          (qm = 0 where am = 0)
lut is bitsandbytes' 65536-entry table of the nearest code (fused_lora.codec.quantization_lut); the requantization
is the arithmetic of fused_lora.codec.quantize_blockwise, whose docstring states the index rule. The 8-bit kernel
is compiled without FMA contraction (enable_fp_fusion=False), so every product and sum is rounded separately as in
the PyTorch path; the code index is the same with or without an fma (the codec's index rule).

The per-tensor scalars come as AdamWScalars rows (kernels/adamw_scalars.py, the column order of the scalar table).

The launchers take lists of tensors that share a device and dtypes. A table of their addresses (int64) and a
block map (tensor index, element offset) let every program find its tensor, so the grid covers all elements of
all tensors in one launch. Division and square root are IEEE-rounded (div_rn, sqrt_rn) like PyTorch's.
"""

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from .adamw_scalars import AdamWScalars

QBLOCK = 256

# Per-tensor scalars, one row of the fp32 scalar table per tensor, in AdamWScalars' field order.
SCALAR_COLUMNS = AdamWScalars._fields
assert len(SCALAR_COLUMNS) == 8, "_load_scalars reads 8 columns in AdamWScalars' order"


@triton.jit
def _program_block(block_map_ptr, numel_ptr):
    """This program's (tensor index, first element, that tensor's element count) from the block map."""
    pid = tl.program_id(0)
    tensor_index = tl.load(block_map_ptr + 2 * pid)
    start = tl.load(block_map_ptr + 2 * pid + 1)
    return tensor_index, start, tl.load(numel_ptr + tensor_index)


@triton.jit
def _load_scalars(scalar_ptr, tensor_index):
    row = scalar_ptr + tensor_index * 8
    return (
        tl.load(row + 0),
        tl.load(row + 1),
        tl.load(row + 2),
        tl.load(row + 3),
        tl.load(row + 4),
        tl.load(row + 5),
        tl.load(row + 6),
        tl.load(row + 7),
    )


@triton.jit
def adamw32_kernel(
    address_ptr,  # int64 (n_tensors, 4): addresses of p, g, m, v
    numel_ptr,  # int64 (n_tensors,)
    scalar_ptr,  # fp32 (n_tensors, 8) in SCALAR_COLUMNS order
    block_map_ptr,  # int64 (n_programs, 2): tensor index, first element
    p_like,  # any tensor of p's dtype: gives the element type of the p addresses
    g_like,  # any tensor of g's dtype
    BNB_ORDER: tl.constexpr,  # False: torch.optim.AdamW's op order; True: bitsandbytes' 32-bit AdamW's
    BLOCK: tl.constexpr,
):
    tensor_index, start, numel = _program_block(block_map_ptr, numel_ptr)
    p_ptr = tl.load(address_ptr + 4 * tensor_index + 0).to(p_like.dtype)
    g_ptr = tl.load(address_ptr + 4 * tensor_index + 1).to(g_like.dtype)
    m_ptr = tl.load(address_ptr + 4 * tensor_index + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(address_ptr + 4 * tensor_index + 3).to(tl.pointer_type(tl.float32))
    beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_scale, c2, eps = _load_scalars(scalar_ptr, tensor_index)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    v = v * beta2 + (one_minus_beta2 * g) * g
    if not BNB_ORDER:
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        p = p + tl.div_rn(step_scale * m, tl.div_rn(tl.sqrt_rn(v), c2) + eps)
    else:
        m = m * beta1 + one_minus_beta1 * g
        p = p * decay
        p = p + step_scale * tl.div_rn(m, tl.sqrt_rn(v) + eps)

    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize(q_ptr, absmax_ptr, code_ptr, offs, rows, mask):
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + rows)
    return tl.where(mask, tl.load(code_ptr + q) * absmax[:, None], 0.0)


@triton.jit
def _requantize(x, q_ptr, absmax_ptr, lut_ptr, offs, rows, mask, row_mask):
    """Blockwise absmax and bitsandbytes' table lookup of the code of x (one block per row); stores both."""
    absmax = tl.max(tl.abs(x), axis=1)
    empty = absmax == 0.0
    normed = x * tl.div_rn(1.0, tl.where(empty, 1.0, absmax))[:, None]
    normed = tl.minimum(tl.maximum(normed, -1.0), 1.0)
    t = ((normed + 1.0) * 0.5) * 65535.0 + 0.5
    q = tl.load(lut_ptr + t.to(tl.int32), mask=mask, other=0)
    q = tl.where(empty[:, None], 0, q)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=row_mask)


@triton.jit
def adamw8bit_kernel(
    address_ptr,  # int64 (n_tensors, 6): addresses of p, g, qm, qv, am, av
    numel_ptr,  # int64 (n_tensors,)
    scalar_ptr,  # fp32 (n_tensors, 8) in SCALAR_COLUMNS order
    block_map_ptr,  # int64 (n_programs, 2): tensor index, first element (a multiple of QBLOCK)
    code_m_ptr,  # fp32 (256,) signed map of m
    code_v_ptr,  # fp32 (256,) unsigned map of v
    lut_m_ptr,  # uint8 (65536,) quantization table of code_m
    lut_v_ptr,  # uint8 (65536,) quantization table of code_v
    p_like,  # any tensor of p's dtype
    g_like,  # any tensor of g's dtype
    ROWS: tl.constexpr,  # quantization blocks per program
    QBLOCK: tl.constexpr,
):
    tensor_index, start, numel = _program_block(block_map_ptr, numel_ptr)
    p_ptr = tl.load(address_ptr + 6 * tensor_index + 0).to(p_like.dtype)
    g_ptr = tl.load(address_ptr + 6 * tensor_index + 1).to(g_like.dtype)
    qm_ptr = tl.load(address_ptr + 6 * tensor_index + 2).to(tl.pointer_type(tl.uint8))
    qv_ptr = tl.load(address_ptr + 6 * tensor_index + 3).to(tl.pointer_type(tl.uint8))
    am_ptr = tl.load(address_ptr + 6 * tensor_index + 4).to(tl.pointer_type(tl.float32))
    av_ptr = tl.load(address_ptr + 6 * tensor_index + 5).to(tl.pointer_type(tl.float32))
    beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_scale, c2, eps = _load_scalars(scalar_ptr, tensor_index)

    n_blocks = tl.cdiv(numel, QBLOCK)
    rows = start // QBLOCK + tl.arange(0, ROWS)
    row_mask = rows < n_blocks
    rows = tl.where(row_mask, rows, 0)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = row_mask[:, None] & (offs < numel)

    m = _dequantize(qm_ptr, am_ptr, code_m_ptr, offs, rows, mask)
    v = _dequantize(qv_ptr, av_ptr, code_v_ptr, offs, rows, mask)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + (one_minus_beta2 * g) * g
    p = p * decay
    p = p + tl.div_rn(step_scale * m, tl.div_rn(tl.sqrt_rn(v), c2) + eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    _requantize(m, qm_ptr, am_ptr, lut_m_ptr, offs, rows, mask, row_mask)
    _requantize(v, qv_ptr, av_ptr, lut_v_ptr, offs, rows, mask, row_mask)


def _block_map(numels: list[int], block: int, device) -> torch.Tensor:
    """int64 (n_programs, 2): for every `block`-element slice of every tensor, (tensor index, first element)."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_program = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first_program[tensor_index]) * block
    return _to_device(torch.stack([tensor_index, start], dim=1), device)


def _on_device(device):
    """Make `device` current while launching (Triton launches on the current CUDA device)."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _to_device(table: torch.Tensor, device) -> torch.Tensor:
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _tables(tensor_lists, scalars, device):
    addresses = torch.tensor([[t.data_ptr() for t in row] for row in zip(*tensor_lists)], dtype=torch.int64)
    numels = torch.tensor([p.numel() for p in tensor_lists[0]], dtype=torch.int64)
    scalar_table = torch.tensor(scalars, dtype=torch.float32).reshape(len(tensor_lists[0]), len(SCALAR_COLUMNS))
    return _to_device(addresses, device), _to_device(numels, device), _to_device(scalar_table, device)


def _check_chunk(name, params, grads, states):
    device, p_dtype, g_dtype = params[0].device, params[0].dtype, grads[0].dtype
    for tensors in (params, grads, *states):
        for t in tensors:
            if t.device != device or not t.is_contiguous():
                raise ValueError(f"{name}: every tensor of a chunk must be contiguous and on {device}")
    if any(p.dtype != p_dtype for p in params) or any(g.dtype != g_dtype for g in grads):
        raise ValueError(f"{name}: a chunk must share one parameter dtype and one gradient dtype")


def adamw32_update_(params, grads, exp_avgs, exp_avg_sqs, scalars, bnb_order=False, block=None):
    """Update a chunk of parameters and their fp32 moments in place with one kernel launch.

    Args:
        params, grads: lists of contiguous tensors (same device; one dtype each, fp32/fp16/bf16), any shapes.
        exp_avgs, exp_avg_sqs: fp32 tensors with the shapes of params (m and v).
        scalars: per tensor, an AdamWScalars (or a sequence of the 8 values in its field order).
        bnb_order: False for torch.optim.AdamW's arithmetic, True for bitsandbytes' 32-bit AdamW.

    Example::

        row = AdamWScalars(0.9, 0.1, 0.999, 0.001, 1 - lr * wd, -lr / c1, c2, 1e-8)
        adamw32_update_([p], [p.grad], [m], [v], [row])
    """
    if not params:
        return
    _check_chunk("adamw32_update_", params, grads, (exp_avgs, exp_avg_sqs))
    device = params[0].device
    block = block or (1024 if interpreting() else 4096)
    addresses, numels, scalar_table = _tables((params, grads, exp_avgs, exp_avg_sqs), scalars, device)
    block_map = _block_map([p.numel() for p in params], block, device)
    grid = (block_map.shape[0],)
    with _on_device(device):
        adamw32_kernel[grid](
            addresses, numels, scalar_table, block_map, params[0], grads[0], BNB_ORDER=bool(bnb_order), BLOCK=block,
            num_warps=8,
        )


def adamw8bit_update_(params, grads, qms, qvs, ams, avs, code_m, code_v, lut_m, lut_v, scalars, rows=None):
    """Update a chunk of parameters and their blockwise 8-bit moments in place with one kernel launch.

    Args:
        params, grads: lists of contiguous tensors (same device; one dtype each, fp32/fp16/bf16).
        qms, qvs: uint8 tensors with params' shapes (codes of m and v).
        ams, avs: fp32 (ceil(numel / 256),) blockwise absmax of m and v.
        code_m, code_v: fp32 (256,) sorted signed / unsigned maps shared by the chunk.
        lut_m, lut_v: their uint8 (65536,) quantization tables (fused_lora.codec.quantization_lut).
        scalars: per tensor, an AdamWScalars (decay = 1 - lr·wd, step_scale = -lr/c1).

    Example::

        adamw8bit_update_([p], [p.grad], [qm], [qv], [am], [av], code_m, code_v, lut_m, lut_v, [scalars])
    """
    if not params:
        return
    _check_chunk("adamw8bit_update_", params, grads, (qms, qvs, ams, avs))
    device = params[0].device
    rows = rows or (1 if interpreting() else 4)
    addresses, numels, scalar_table = _tables((params, grads, qms, qvs, ams, avs), scalars, device)
    block_map = _block_map([p.numel() for p in params], rows * QBLOCK, device)
    grid = (block_map.shape[0],)
    with _on_device(device):
        adamw8bit_kernel[grid](
            addresses,
            numels,
            scalar_table,
            block_map,
            code_m.to(device=device, dtype=torch.float32).contiguous(),
            code_v.to(device=device, dtype=torch.float32).contiguous(),
            lut_m.to(device).contiguous(),
            lut_v.to(device).contiguous(),
            params[0],
            grads[0],
            ROWS=rows,
            QBLOCK=QBLOCK,
            num_warps=4,
            enable_fp_fusion=False,
        )
