"""Launchers of the fused LoRA kernels: the Triton backend of ``fused_lora.functional.lora_linear``.

Symbols (docs/DESIGN.md): x (M×K), W (N×K) frozen NF4 or dense, A (r×K), B (N×r), b (N), s scaling, m dropout
mask (0 or 1/(1-p), regenerated from ``seed`` inside the kernels, never stored), g = ∂L/∂y.

    forward:   u = (m⊙x)·Aᵀ;  y = x·deq(W)ᵀ + b + s·u·Bᵀ                     (lora_fwd.py)
    backward:  v = g·B;  dB = s·gᵀ·u;  db = Σ_M g;                             (lora_bwd.py, one pass over g)
               dx = g·deq(W) + s·m⊙(v·A);  dA = s·vᵀ·(m⊙x)                   (lora_bwd.py, one GEMM pass)

The frozen layer alone (adapter disabled, or merged), through the same kernels without their low-rank term:

    frozen_forward:   y = x·deq(W)ᵀ + b
    frozen_backward:  dx = g·deq(W);  db = Σ_M g

Supported: x in fp16 / bf16 / fp32 (bf16 only on a GPU: the CPU interpreter cannot compute it), A and B in fp32
or x's dtype, any M, K, N (ragged tiles are masked), r from 1 to 256, any strides of x, g, A and B, NF4 weights
with any blocksize and with or without double quantization, dense weights in x's dtype. Everything else is
reported by ``unsupported_reason`` so the caller can fall back to the reference.

NaN and ±inf in x, g, A, B or the bias reach exactly the output elements they reach in fused_lora/reference.py
(padding of ragged tiles is 0 and never mixes with a real row or column; a dropped element of an inf x is NaN in
both, as inf·0). One deliberate difference: y and dx are accumulated in fp32 and rounded once, and u is kept in
fp32, whereas the reference rounds the frozen product x·Wᵀ (g·W) and, with fp16/bf16 adapters, u to the compute
dtype first. So when that intermediate overflows fp16 but the final value fits (e.g. x·Wᵀ = 80000 with a low-rank
term of −64000), the reference returns inf and the kernels the finite, correct value.

This module imports Triton lazily, so importing it is cheap and never touches CUDA.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import NamedTuple

import torch

from .._common import side_dtypes
from ..backend import interpreting

MAX_RANK = 256
NESTED_BLOCKSIZE = 256
# R_PAD of the launches without a low-rank term (the kernels do not read it then); one fixed value, one variant.
_FROZEN_R_PAD = 16
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["unsupported_reason", "forward", "backward", "frozen_forward", "frozen_backward", "dropout_mask"]


def _is_nf4(weight) -> bool:
    return hasattr(weight, "packed") and hasattr(weight, "absmax")


def _weight_device(weight) -> torch.device:
    return weight.packed.device if _is_nf4(weight) else weight.device


def unsupported_reason(x2d, weight, A, B, bias, dropout_p) -> str | None:
    """Why the fused kernels cannot run this call, or None when they can.

    Args:
        x2d: (M, K) input. weight: NF4Weight or dense (N, K) tensor. A: (r, K) and B: (N, r), or both None for
            the frozen layer alone (``frozen_forward`` / ``frozen_backward``). bias: (N,) or None.
        dropout_p: dropout probability of the LoRA input (0.0 for the frozen layer).
    Returns:
        None, or a short reason naming the case, e.g. ``"r=300 is outside 1..256"``.

    Example:
        >>> reason = unsupported_reason(x2d, w, A, B, None, 0.0)
        >>> if reason is not None: warnings.warn(f"fused-lora: using the reference ({reason})")
        >>> unsupported_reason(x2d, w, None, None, bias, 0.0)      # the frozen layer alone
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x2d.dtype not in _COMPUTE_DTYPES:
        return f"x dtype {x2d.dtype} is not float16, bfloat16 or float32"
    if x2d.device.type != "cuda" and not interpreting():
        return f"x is on {x2d.device.type}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if interpreting() and x2d.dtype == torch.bfloat16:
        return "bfloat16 under the Triton CPU interpreter (it cannot compute bfloat16)"
    tensors = {"weight": _weight_device(weight)}
    adapters = {} if A is None else {"lora_A": A, "lora_B": B}
    for name, t in [*adapters.items(), ("bias", bias)]:
        if t is not None:
            tensors[name] = t.device
    for name, device in tensors.items():
        if device != x2d.device:
            return f"{name} is on {device}, x on {x2d.device}"
    if x2d.shape[1] == 0 or weight.shape[0] == 0:
        return f"empty weight: {weight.shape[0]} output and {x2d.shape[1]} input features"
    if A is not None and not 1 <= A.shape[0] <= MAX_RANK:
        return f"r={A.shape[0]} is outside 1..{MAX_RANK}"
    for name, t in adapters.items():
        if t.dtype not in side_dtypes(x2d.dtype):
            return f"{name} dtype {t.dtype} is neither float32 nor x's dtype {x2d.dtype}"
    if bias is not None and bias.dtype not in side_dtypes(x2d.dtype):
        return f"bias dtype {bias.dtype} is neither float32 nor x's dtype {x2d.dtype}"
    if _is_nf4(weight):
        if weight.packed.dtype != torch.uint8:
            return f"NF4 packed dtype {weight.packed.dtype} is not uint8"
        if not (weight.packed.is_contiguous() and weight.absmax.is_contiguous()):
            return "NF4 packed bytes or absmax are not contiguous"
        if weight.double_quant and weight.nested_blocksize != NESTED_BLOCKSIZE:
            return f"nested blocksize {weight.nested_blocksize} is not {NESTED_BLOCKSIZE}"
    elif weight.dtype != x2d.dtype:
        return f"dense weight dtype {weight.dtype} differs from x's dtype {x2d.dtype}"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p={dropout_p} is outside [0, 1)"
    return None


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _rank_pad(r: int) -> int:
    """r rounded up to a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, 1 << (r - 1).bit_length())


def _precisions(x, *adapters) -> dict:
    """Low-rank dtype (promotion of x and the adapters A, B; x's dtype without them) and dot precisions; see
    lora_fwd.py for the tf32 choice."""
    lowrank = x.dtype
    for t in adapters:
        lowrank = torch.promote_types(lowrank, t.dtype)
    exact = x.dtype == torch.float32
    return {
        "BASE_PRECISION": "ieee" if exact else "tf32",
        "LOWRANK_DTYPE": _tl_dtype(lowrank),
        "LOWRANK_PRECISION": "ieee" if exact else "tf32",
    }


class WeightArgs(NamedTuple):
    """How a launcher passes W to load_weight_tile: the six pointer arguments (w_ptr, absmax_ptr, code_ptr,
    nested_absmax_ptr, nested_code_ptr, offset_ptr; None where absent), W's strides (dense W only; 0 for NF4) and
    the constexprs that select the layout."""

    pointers: tuple
    stride_wn: int
    stride_wk: int
    constexprs: dict


def _weight_args(weight, K: int) -> WeightArgs:
    """The W arguments of the GEMM kernels for a dense or NF4 weight with K input features."""
    if not _is_nf4(weight):
        return WeightArgs(
            pointers=(weight, None, None, None, None, None), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            constexprs={"IS_NF4": False, "DOUBLE_QUANT": False, "BLOCKSIZE": 1, "NESTED_BLOCKSIZE": 1,
                        "ROW_SCALES": False},
        )  # fmt: skip
    blocksize = int(weight.blocksize)
    # The kernels index every NF4 tensor as contiguous: the small tables are made so here (no copy when they are
    # already); packed and absmax are W-sized, and unsupported_reason sends non-contiguous ones to the reference.
    code = weight.code.contiguous()
    if weight.double_quant:
        nested = (weight.nested_absmax.contiguous(), weight.nested_code.contiguous(), weight.offset.contiguous())
    else:
        nested = (None, None, None)
    even_power_of_two = blocksize >= 2 and blocksize & (blocksize - 1) == 0
    return WeightArgs(
        pointers=(weight.packed, weight.absmax, code, *nested), stride_wn=0, stride_wk=0,
        constexprs={"IS_NF4": True, "DOUBLE_QUANT": bool(weight.double_quant), "BLOCKSIZE": blocksize,
                    "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "ROW_SCALES": even_power_of_two and K % blocksize == 0},
    )  # fmt: skip


def _compile_options(weight) -> dict:
    """Triton compile options of the GEMM kernels for this W. NF4: no FP contraction, so that the double-quant scale
    fl(fl(nested_code[q]·nested_absmax) + offset) rounds like bitsandbytes and ``NF4Weight.dequantize`` (see
    lora_fwd.py); the interpreter ignores the option. Dense: contraction on (stated explicitly, because triton 3.9
    warns when the option is left to its changing default)."""
    return {"enable_fp_fusion": not _is_nf4(weight)}


def _strides(t) -> tuple[int, int]:
    """t's two strides, or (0, 0) for an operand that is absent (None) and never read."""
    return (0, 0) if t is None else t.stride()


def _dropout_args(dropout_p: float, seed: int) -> dict:
    return {"seed": int(seed), "p": float(dropout_p), "keep_scale": 1.0 / (1.0 - dropout_p)}


def _gemm(kernel, x, out_name: str, reduce_name: str, reset_to_zero: tuple = ()):
    """The kernel to launch and the fixed meta-parameters: autotuned on a GPU, one small config when interpreting."""
    if interpreting():
        from .autotune import INTERPRETER_CONFIG

        return kernel, dict(INTERPRETER_CONFIG)
    from .autotune import autotuned

    capability = torch.cuda.get_device_capability(x.device)
    return autotuned(kernel, capability, out_name, reduce_name, reset_to_zero), {}


def _device_guard(x):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _compute_u(x2d, A, dropout_p, seed, precisions) -> torch.Tensor:
    """u = (m⊙x)·Aᵀ, (M, r) fp32."""
    import triton

    from .lora_fwd import lora_u_kernel

    M, K = x2d.shape
    r = A.shape[0]
    u = torch.empty((M, r), device=x2d.device, dtype=torch.float32)
    r_pad = _rank_pad(r)
    block_r = min(r_pad, 64)
    block_m = 16 if interpreting() else min(64, max(16, triton.next_power_of_2(M)))
    block_k = 32 if interpreting() else 64
    grid = (triton.cdiv(M, block_m), r_pad // block_r)
    lora_u_kernel[grid](
        x2d, A, u, M, K, r,
        x2d.stride(0), x2d.stride(1), A.stride(0), A.stride(1), u.stride(0), u.stride(1),
        **_dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0.0,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return u


_INT32_MAX = 2**31 - 1


def _int32_columns(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it when a column offset (column index · column stride) would overflow int32.

    The kernels compute row offsets in int64 and column offsets in int32 (cheaper, and exact for any tensor whose
    last dimension is contiguous); only a huge transposed x or g needs the copy.
    """
    if t.shape[1] > 0 and (t.shape[1] - 1) * abs(t.stride(1)) > _INT32_MAX:
        return t.contiguous()
    return t


def forward(x2d, weight, A, B, scaling: float, bias, dropout_p: float, seed: int):
    """Fused forward of the LoRA layer.

    Args:
        x2d: (M, K) input in fp16/bf16/fp32, any strides. weight: NF4Weight of shape (N, K), or a dense (N, K)
            tensor in x's dtype. A: (r, K) and B: (N, r) in fp32 or x's dtype. scaling: s. bias: (N,) or None.
        dropout_p: dropout probability of the LoRA input; seed: the seed its mask is drawn from.
    Returns:
        y: (M, N) in x's dtype, y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ; u: (M, r) fp32, u = (m⊙x)·Aᵀ (save it for backward).

    Example:
        >>> w = fl.quantize_nf4(torch.randn(200, 64, device="cuda", dtype=torch.bfloat16))
        >>> x = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16)
        >>> A, B = torch.randn(8, 64, device="cuda"), torch.randn(200, 8, device="cuda")
        >>> y, u = forward(x, w, A, B, 2.0, None, 0.0, 0)      # y (37, 200) bf16, u (37, 8) fp32
    """
    x2d = _int32_columns(x2d)
    M, K = x2d.shape
    N = weight.shape[0]
    r = A.shape[0]
    if tuple(weight.shape) != (N, K) or tuple(A.shape) != (r, K) or tuple(B.shape) != (N, r):
        raise ValueError(
            f"fused LoRA forward: shapes x {tuple(x2d.shape)}, W {tuple(weight.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)} do not fit x (M, K), W (N, K), A (r, K), B (N, r)"
        )
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if M == 0:
        return y, torch.zeros((0, r), device=x2d.device, dtype=torch.float32)
    precisions = _precisions(x2d, A, B)
    with _device_guard(x2d):
        u = _compute_u(x2d, A, dropout_p, seed, precisions)
        _launch_y(x2d, weight, bias, y, precisions, u=u, B=B, scaling=scaling)
    return y, u


def frozen_forward(x2d, weight, bias):
    """Fused forward of the frozen layer alone (adapter disabled, or merged): y = x·deq(W)ᵀ + b.

    W is dequantized tile by tile inside the GEMM; no N×K copy of it is made.

    Args:
        x2d: (M, K) input in fp16/bf16/fp32, any strides. weight: NF4Weight of shape (N, K), or a dense (N, K)
            tensor in x's dtype. bias: (N,) in fp32 or x's dtype, or None.
    Returns:
        y: (M, N) in x's dtype (fp32 accumulation, the bias added before the one rounding).

    Example:
        >>> w = fl.quantize_nf4(torch.randn(200, 64, device="cuda", dtype=torch.bfloat16))
        >>> y = frozen_forward(torch.randn(37, 64, device="cuda", dtype=torch.bfloat16), w, None)   # (37, 200)
    """
    x2d = _int32_columns(x2d)
    M, K = x2d.shape
    N = weight.shape[0]
    if tuple(weight.shape) != (N, K) or (bias is not None and tuple(bias.shape) != (N,)):
        bias_shape = None if bias is None else tuple(bias.shape)
        raise ValueError(
            f"fused frozen forward: shapes x {tuple(x2d.shape)}, W {tuple(weight.shape)}, bias {bias_shape} do not "
            "fit x (M, K), W (N, K), bias (N,)"
        )
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if M > 0:
        with _device_guard(x2d):
            _launch_y(x2d, weight, bias, y, _precisions(x2d))
    return y


def _launch_y(x2d, weight, bias, y, precisions, u=None, B=None, scaling=0.0):
    """lora_fwd_kernel into y: y = x·deq(W)ᵀ + b, plus s·u·Bᵀ when u and B are given (HAS_LORA)."""
    import triton

    from .lora_fwd import lora_fwd_kernel

    if bias is not None:
        bias = bias.contiguous()  # the kernel reads b[n] at bias_ptr + n; N elements, no copy when contiguous
    M, K = x2d.shape
    N = y.shape[1]
    has_lora = u is not None
    r = u.shape[1] if has_lora else 0
    r_pad = _rank_pad(r) if has_lora else _FROZEN_R_PAD
    w = _weight_args(weight, K)
    kernel, meta = _gemm(lora_fwd_kernel, x2d, "BLOCK_N", "BLOCK_K")
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)  # noqa: E731
    kernel[grid](
        x2d, *w.pointers, u, B, bias, y,
        M, N, K, r, _m_bucket(M),
        x2d.stride(0), x2d.stride(1), w.stride_wn, w.stride_wk,
        *_strides(u), *_strides(B), y.stride(0), y.stride(1),
        float(scaling),
        **w.constexprs, HAS_BIAS=bias is not None, HAS_LORA=has_lora, **precisions,
        R_PAD=r_pad, R_CHUNK=min(r_pad, 64), **meta, **_compile_options(weight),
    )  # fmt: skip


def _m_bucket(M: int) -> int:
    from .autotune import m_bucket

    return m_bucket(M)


class VdbTile(NamedTuple):
    """The tile of the v/dB pass on a GPU."""

    block_m: int
    block_n: int
    num_warps: int


def vdb_tile(M: int, r_pad: int) -> VdbTile:
    """The tile (BLOCK_M, BLOCK_N, num_warps) of the v/dB pass on a GPU (3 pipeline stages, Triton's default). At
    R_PAD=256 the B tile is BLOCK_N·256 and the v accumulator BLOCK_M·256, so BLOCK_N is 32: at 64 the kernel needs
    180224 B of shared memory, over the A100's 166912 B (tests/test_kernels_compile.py compiles it for sm_80/sm_90)."""
    import triton

    rows = 128 if r_pad <= 32 else 64 if r_pad <= 64 else 32
    block_m = min(rows, max(16, triton.next_power_of_2(M)))
    block_n = 32 if r_pad >= 256 else 64
    return VdbTile(block_m, block_n, 8 if block_m >= 128 else 4)


def _vdb_blocks(M: int, N: int, r_pad: int, device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, columns per program, num_warps) of the v/dB pass. Tall row tiles keep the dB atomics
    ((M / BLOCK_M)·N·r adds) few; N is split across programs until the GPU is full."""
    import triton

    if interpreting():
        block_m, block_n, warps, programs_wanted = 16, 32, 4, 2 * triton.cdiv(M, 16)
    else:
        block_m, block_n, warps = vdb_tile(M, r_pad)
        programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles = triton.cdiv(N, block_n)
    splits = max(1, min(n_tiles, programs_wanted // triton.cdiv(M, block_m)))
    return block_m, block_n, triton.cdiv(n_tiles, splits) * block_n, warps


def _launch_vdb(g, precisions, v, dB32, db, B=None, u=None, scaling=0.0):
    """lora_vdb_kernel, one pass over g: v += g·B (when v is given), dB32 += s·gᵀ·u (when dB32 is given),
    db += Σ_M g (when db is given). The outputs are zeroed fp32 buffers."""
    import triton

    from .lora_bwd import lora_vdb_kernel

    M, N = g.shape
    r = B.shape[1] if B is not None else 0
    r_pad = _rank_pad(r) if B is not None else _FROZEN_R_PAD
    block_m, block_n, n_per_split, warps = _vdb_blocks(M, N, r_pad, g.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, n_per_split))
    lora_vdb_kernel[grid](
        g, B, u, v, dB32, db,
        M, N, r, n_per_split,
        g.stride(0), g.stride(1), *_strides(B), *_strides(u), *_strides(v), *_strides(dB32), float(scaling),
        NEED_V=v is not None, NEED_DB_LORA=dB32 is not None, NEED_DB_BIAS=db is not None,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip


def _launch_dx(g, weight, dx, precisions, x2d=None, A=None, v=None, dA32=None, scaling=0.0, dropout_p=0.0, seed=0):
    """lora_dx_kernel: dx = g·deq(W) (when dx is given), plus s·m⊙(v·A) and dA32 += s·vᵀ·(m⊙x) when the low-rank
    operands x2d, A, v are given (HAS_LORA)."""
    import triton

    from .lora_bwd import lora_dx_kernel

    M, N = g.shape
    K = weight.shape[1]
    has_lora = v is not None
    r = A.shape[0] if has_lora else 0
    r_pad = _rank_pad(r) if has_lora else _FROZEN_R_PAD
    w = _weight_args(weight, K)
    kernel, meta = _gemm(lora_dx_kernel, g, "BLOCK_K", "BLOCK_N", ("da_ptr",) if dA32 is not None else ())
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)  # noqa: E731
    kernel[grid](
        g, *w.pointers, x2d, A, v, dx, dA32,
        M, N, K, r, _m_bucket(M),
        g.stride(0), g.stride(1), w.stride_wn, w.stride_wk,
        *_strides(x2d), *_strides(A), *_strides(v), *_strides(dx), *_strides(dA32), float(scaling),
        **_dropout_args(dropout_p, seed),
        NEED_DX=dx is not None, NEED_DA=dA32 is not None, DROPOUT=dropout_p > 0.0, HAS_LORA=has_lora,
        **w.constexprs, **precisions, R_PAD=r_pad, R_CHUNK=min(r_pad, 64), **meta, **_compile_options(weight),
    )  # fmt: skip


def backward(g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db):
    """Fused backward of the LoRA layer (W is frozen: no dW).

    Args:
        g: (M, N) ∂L/∂y in x's dtype, any strides. x2d, weight, A, B, scaling, dropout_p, seed: as in ``forward``
            (the same seed, so the kernels regenerate the same mask). u: (M, r) fp32 from ``forward``.
        need_dx, need_dA, need_dB, need_db: which gradients to compute.
    Returns:
        (dx (M, K) x's dtype, dA (r, K) A's dtype, dB (N, r) B's dtype, db (N,) fp32), None where not needed.

    Example:
        >>> y, u = forward(x, w, A, B, 2.0, None, 0.1, seed=1234)
        >>> dx, dA, dB, db = backward(torch.ones_like(y), x, w, A, B, 2.0, 0.1, 1234, u, True, True, True, False)
    """
    g, x2d = _int32_columns(g), _int32_columns(x2d)
    M, K = x2d.shape
    N = weight.shape[0]
    r = A.shape[0]
    device = x2d.device
    need_v = need_dx or need_dA
    precisions = _precisions(x2d, A, B)
    v = torch.zeros((M, r), device=device, dtype=torch.float32) if need_v else None
    dB32 = torch.zeros((N, r), device=device, dtype=torch.float32) if need_dB else None
    db = torch.zeros((N,), device=device, dtype=torch.float32) if need_db else None
    dA32 = torch.zeros((r, K), device=device, dtype=torch.float32) if need_dA else None
    dx = torch.empty((M, K), device=device, dtype=x2d.dtype) if need_dx else None

    with _device_guard(x2d):
        if M > 0 and (need_v or need_dB or need_db):
            _launch_vdb(g, precisions, v, dB32, db, B=B, u=u, scaling=scaling)
        if M > 0 and need_v:
            _launch_dx(g, weight, dx, precisions, x2d=x2d, A=A, v=v, dA32=dA32, scaling=scaling,
                       dropout_p=dropout_p, seed=seed)

    dA = dA32.to(A.dtype) if need_dA else None
    dB = dB32.to(B.dtype) if need_dB else None
    return dx, dA, dB, db


def frozen_backward(g, weight, need_dx: bool, need_db: bool):
    """Fused backward of the frozen layer alone: dx = g·deq(W), db = Σ_M g (W is frozen: no dW).

    x is not an argument: neither gradient reads it, so autograd need not keep it alive.

    Args:
        g: (M, N) ∂L/∂y in x's dtype (fp16/bf16/fp32), any strides. weight: the W of ``frozen_forward``.
        need_dx, need_db: which gradients to compute.
    Returns:
        (dx (M, K) in g's dtype, db (N,) fp32), None where not needed.

    Example:
        >>> y = frozen_forward(x, w, bias)
        >>> dx, db = frozen_backward(torch.ones_like(y), w, True, True)
    """
    g = _int32_columns(g)
    M, N = g.shape
    K = weight.shape[1]
    if weight.shape[0] != N:
        raise ValueError(f"fused frozen backward: g has {N} columns but W has shape {tuple(weight.shape)}")
    dx = torch.empty((M, K), device=g.device, dtype=g.dtype) if need_dx else None
    db = torch.zeros((N,), device=g.device, dtype=torch.float32) if need_db else None
    if M > 0:
        precisions = _precisions(g)
        with _device_guard(g):
            if need_db:
                _launch_vdb(g, precisions, None, None, db)
            if need_dx:
                _launch_dx(g, weight, dx, precisions)
    return dx, db


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The dropout mask m that the kernels regenerate for (seed, p), materialised (for tests).

    Returns:
        (M, K) fp32 tensor with entries 0 or 1/(1-p); all ones when p == 0.

    Example:
        >>> m = dropout_mask(1234, 37, 64, 0.1, "cpu")     # pass as ``m`` to fused_lora.reference.lora_forward
    """
    import triton

    from .dropout import dropout_mask_kernel

    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), device=device, dtype=torch.float32)
    m = torch.empty((M, K), device=device, dtype=torch.float32)
    if M == 0 or K == 0:
        return m
    block_m, block_k = 16, 64
    with _device_guard(m):
        dropout_mask_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            m, int(seed), M, K, float(p), 1.0 / (1.0 - p), BLOCK_M=block_m, BLOCK_K=block_k
        )
    return m
