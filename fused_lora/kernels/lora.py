"""Launchers of the fused LoRA kernels: the Triton backend of ``fused_lora.functional.lora_linear``.

Symbols (docs/DESIGN.md): x (M×K), W (N×K) frozen NF4 or dense, A (r×K), B (N×r), b (N), s scaling, m dropout
mask (0 or 1/(1-p), regenerated from ``seed`` inside the kernels, never stored), g = ∂L/∂y.

    forward:   u = (m⊙x)·Aᵀ;  y = x·deq(W)ᵀ + b + s·u·Bᵀ
    backward:  v = g·B;  dB = s·gᵀ·u;  db = Σ_M g                              (one pass over g)
               dx = g·deq(W) + s·m⊙(v·A);  dA = s·vᵀ·(m⊙x)                   (one GEMM pass)

Each call takes one of three paths by M, the weight and the GPU (strategy.py: thresholds, deterministic mode):
decode (launch_decode.py: split-K kernels, lora_decode.py), middle (launch_gemm.py: the GEMMs of lora_fwd.py and
lora_bwd.py with NF4 decoded in registers) and large (launch_slab.py: slabs of W dequantized into a bounded
workspace, then the same GEMMs over dense slabs). v, dB, db and dA accumulate with relaxed atomics, or, in the
deterministic mode, through split reductions summed in a fixed order (lora_reduce.py).

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
term of −64000), the reference returns inf and the kernels the finite, correct value. With bf16/fp16 x on a GPU the
middle and decode paths round each NF4 code and scale to the compute dtype before multiplying them (docs/DESIGN.md,
NF4 format); the large path and every fp32 computation use bitsandbytes' exact values.

This module imports Triton lazily, so importing it is cheap and never touches CUDA.
"""

from __future__ import annotations

import importlib.util

import torch

from .._common import side_dtypes
from ..backend import interpreting
from . import launch_decode, launch_gemm, launch_slab, strategy
from .common import (  # noqa: F401  (vdb_tile, _int32_columns: names other modules and tests use)
    MAX_RANK,
    NESTED_BLOCKSIZE,
    device_guard,
    int32_columns as _int32_columns,
    is_nf4 as _is_nf4,
    precisions as _precisions,
)
from .launch_gemm import VdbTile, vdb_tile  # noqa: F401

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["unsupported_reason", "forward", "backward", "frozen_forward", "frozen_backward", "dropout_mask"]


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
        # read as int32 words on a GPU (nf4_lookup.nf4_prmt); same rule everywhere. A traced tensor has no address:
        # under torch.compile the op realigns such bytes when it runs (functional._weight_of)
        if not torch.compiler.is_compiling() and weight.packed.data_ptr() % 4:
            return "NF4 packed bytes do not start on a 4-byte boundary (a view at an odd offset)"
        if weight.double_quant and weight.nested_blocksize != NESTED_BLOCKSIZE:
            return f"nested blocksize {weight.nested_blocksize} is not {NESTED_BLOCKSIZE}"
    elif weight.dtype != x2d.dtype:
        return f"dense weight dtype {weight.dtype} differs from x's dtype {x2d.dtype}"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p={dropout_p} is outside [0, 1)"
    return None


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
    y, u, _ = _forward(x2d, weight, A, B, scaling, bias, dropout_p, seed, None)
    return y, u


def forward_scaled(x2d, weight, A, B, scaling: float, bias, col_scale):
    """DoRA's training forward (fused_lora/dora.py, no dropout): z = x·Wᵀ + s·u·Bᵀ and y = c⊙z + b, both written by
    the GEMM's epilogue from one fp32 accumulator (at decode sizes z by the decode kernels, then one column-scale pass).

    Args: as ``forward``, plus col_scale: c, (N,) fp32 (mag / ‖W + s·B·A‖_row).
    Returns: y and z (M, N) in x's dtype, u (M, r) fp32.

    Example:
        >>> y, u, z = forward_scaled(x, w, A, B, 2.0, None, c)   # y == c * z (+ bias), z == forward(...)[0]
    """
    return _forward(x2d, weight, A, B, scaling, bias, 0.0, 0, col_scale.to(torch.float32).contiguous())


def forward_scaled_dropout(x2d, weight, A, B, scaling: float, bias, col_scale, dropout_p: float, seed: int):
    """DoRA's training forward with dropout (fused_lora/dora.py): y = x·Wᵀ + b + (c−1)⊙(x_d·Wᵀ) + c⊙s·u·Bᵀ with
    x_d = m⊙x and u = x_d·Aᵀ, as two GEMMs over W on the middle and large paths: z_d = x_d·Wᵀ + s·u·Bᵀ (x_d written
    once in x's dtype), then y = x·Wᵀ + s·u·Bᵀ + b + (c−1)⊙z_d from the second GEMM's epilogue (lora_fwd ADD_Z).
    No M×N temporary besides z_d, which DoRA's backward needs (dmag = Σ_M g⊙z_d / n).

    Args: as ``forward_scaled``, plus dropout_p > 0 and seed (the mask the backward regenerates).
    Returns: (y, u, z_d), or None at decode sizes (M ≤ the decode threshold: the caller composes the layer).

    Example:
        >>> y, u, z_d = forward_scaled_dropout(x, w, A, B, 2.0, None, c, 0.1, 1234)
    """
    from .dropout import dropout_apply

    x2d = _int32_columns(x2d)
    M, K = x2d.shape
    N = weight.shape[0]
    if dropout_p <= 0.0 or not fuses_dora_dropout(M, weight, x2d.device):
        return None
    route = _path(M, weight, x2d.device, x2d.dtype)
    c = col_scale.detach().to(torch.float32).contiguous()
    precisions = _precisions(x2d, A, B)
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    z_d = torch.empty_like(y)
    launcher = launch_slab.launch_y if route == "large" else launch_gemm.launch_y
    with device_guard(x2d):
        u = launch_gemm.compute_u(x2d, A, dropout_p, seed, precisions)
        launcher(dropout_apply(x2d, dropout_p, seed), weight, None, z_d, precisions, u=u, B=B, scaling=scaling)
        launcher(x2d, weight, bias, y, precisions, u=u, B=B, scaling=scaling, z=z_d, col_scale=c - 1.0, z_in=True)
    return y, u, z_d


def fuses_dora_dropout(M: int, weight, device) -> bool:
    """Whether ``forward_scaled_dropout`` and ``backward`` with col_scale and dropout take M rows: not at decode
    sizes (the decode kernels have no DoRA epilogues; fused_lora/dora.py composes those few rows)."""
    return M > 0 and _path(M, weight, device) != "decode"


def _forward(x2d, weight, A, B, scaling, bias, dropout_p, seed, col_scale):
    """(y, u, z): z is None without col_scale."""
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
    z = None if col_scale is None else torch.empty_like(y)
    if M == 0:
        return y, torch.zeros((0, r), device=x2d.device, dtype=torch.float32), z
    precisions = _precisions(x2d, A, B)
    route = _path(M, weight, x2d.device, x2d.dtype)
    with device_guard(x2d):
        if route == "decode":
            out = y if z is None else z
            u = launch_decode.forward(x2d, weight, out, precisions, A=A, B=B, scaling=scaling,
                                      bias=bias if z is None else None, dropout_p=dropout_p, seed=seed)  # fmt: skip
            if z is not None:
                from .dora import scale_columns

                y = scale_columns(z, col_scale, bias, x2d.dtype)
        elif route == "middle" and z is None and (plan := launch_gemm.y_splits(M, N, K, weight, x2d)) is not None:
            u = launch_gemm.forward_split(plan, x2d, weight, A, B, scaling, bias, dropout_p, seed, y, precisions)
        else:
            u = launch_gemm.compute_u(x2d, A, dropout_p, seed, precisions)
            launcher = launch_slab.launch_y if route == "large" else launch_gemm.launch_y
            launcher(x2d, weight, bias, y, precisions, u=u, B=B, scaling=scaling, z=z, col_scale=col_scale)
    return y, u, z


def _path(M: int, weight, device, x_dtype=None) -> str:
    """strategy.path, with the decode kernels' own limits (launch_decode.supports)."""
    route = strategy.path(M, _is_nf4(weight), device, x_dtype)
    if route == "decode" and not launch_decode.supports(M, weight):
        route = "middle"
    return route


def frozen_forward(x2d, weight, bias):
    """Fused forward of the frozen layer alone (adapter disabled, or merged): y = x·deq(W)ᵀ + b.

    No N×K copy of W is made: it is decoded inside the kernels, or, at large M, slab by slab into a bounded workspace.

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
        route = _path(M, weight, x2d.device, x2d.dtype)
        with device_guard(x2d):
            if route == "decode":
                launch_decode.forward(x2d, weight, y, _precisions(x2d), bias=bias)
            else:
                launcher = launch_slab.launch_y if route == "large" else launch_gemm.launch_y
                launcher(x2d, weight, bias, y, _precisions(x2d))
    return y


def backward(g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db, col_scale=None):
    """Fused backward of the LoRA layer (W is frozen: no dW).

    Args:
        g: (M, N) ∂L/∂y in x's dtype, any strides. x2d, weight, A, B, scaling, dropout_p, seed: as in ``forward``
            (the same seed, so the kernels regenerate the same mask). u: (M, r) fp32 from ``forward``.
        need_dx, need_dA, need_dB, need_db: which gradients to compute.
        col_scale: None, or c (N,): DoRA's backward (fused_lora/dora.py) without an M×N pass over c⊙g:
            v = g·(c⊙B), dB = c⊙(s·gᵀ·u), dx = g·deq(W) + m⊙(((c−1)⊙g)·deq(W) + s·v·A), db = Σ_M g. Without
            dropout dx = (c⊙g)·deq(W) + s·v·A, c inside the dx GEMM's main loop (at decode sizes one c⊙g pass,
            M ≤ 64); with dropout t = m⊙(((c−1)⊙g)·deq(W)) by a frozen dx GEMM (the mask in its epilogue), then the
            LoRA dx GEMM adds t in its epilogue (not at decode sizes: ValueError, fused_lora/dora.py composes those).
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
    dx = torch.empty((M, K), device=device, dtype=x2d.dtype) if need_dx else None
    if M == 0:
        zeros = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float32)  # noqa: E731
        return (dx, zeros(r, K).to(A.dtype) if need_dA else None, zeros(N, r).to(B.dtype) if need_dB else None,
                zeros(N) if need_db else None)  # fmt: skip
    need_v = need_dx or need_dA
    precisions = _precisions(x2d, A, B)
    route = _path(M, weight, device, x2d.dtype)
    c = None if col_scale is None else col_scale.detach().to(torch.float32).contiguous()
    # dA rides on the dx GEMM with relaxed atomics (its accumulator zeroed with v's and dB's), or (deterministic
    # mode) takes its split reduction; at decode sizes the dx epilogue computes it
    fused_dA = need_dA and need_dx and route != "decode" and not strategy.deterministic()
    with device_guard(x2d):
        B_v = B if c is None else B.to(torch.float32) * c[:, None]  # (c⊙g)·B = g·(c⊙B)
        v, dB32, db, dA32 = launch_gemm.launch_vdb(
            g, precisions, need_v, need_dB, need_db, B=B_v, u=u, scaling=scaling, also_zero=(r, K) if fused_dA else None
        ) if (need_v or need_dB or need_db) else (None, None, None, None)
        if c is not None and dB32 is not None:
            dB32 = dB32 * c[:, None]  # s·(c⊙g)ᵀ·u = c⊙(s·gᵀ·u), row by row
        lowrank = {"x2d": x2d, "A": A, "v": v, "scaling": scaling, "dropout_p": dropout_p, "seed": seed}
        if c is not None and dropout_p > 0.0 and route == "decode" and need_dx:
            raise ValueError("fused LoRA backward: DoRA with dropout (col_scale and dropout_p > 0) is not fused at "
                             "decode sizes")
        if route == "decode" and need_v:
            if c is not None:
                from .dora import scale_columns

                g = scale_columns(g, c, None, g.dtype)
            dA32 = launch_decode.dx(g, weight, dx, precisions, need_dA=need_dA, **lowrank)
        elif need_dx:
            launcher = launch_slab.launch_dx if route == "large" else launch_gemm.launch_dx
            t = None
            if c is not None and dropout_p > 0.0:  # DoRA with dropout: t = m⊙(((c−1)⊙g)·W), then dx + t
                t = torch.empty_like(dx)
                launcher(g, weight, t, precisions, dropout_p=dropout_p, seed=seed, col_scale=c - 1.0, mask_dx=True)
            launcher(g, weight, dx, precisions, dA32=dA32, col_scale=None if t is not None else c, t_add=t, **lowrank)
        if need_dA and dA32 is None:
            dA32 = launch_gemm.da_split(x2d, v, r, precisions, scaling, dropout_p, seed)

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
    db = torch.zeros((N,), device=g.device, dtype=torch.float32) if need_db and M == 0 else None
    if M > 0:
        precisions = _precisions(g)
        route = _path(M, weight, g.device, g.dtype)
        with device_guard(g):
            if need_db:
                db = launch_gemm.launch_vdb(g, precisions, False, False, True)[2]
            if need_dx and route == "decode":
                launch_decode.dx(g, weight, dx, precisions)
            elif need_dx:
                launcher = launch_slab.launch_dx if route == "large" else launch_gemm.launch_dx
                launcher(g, weight, dx, precisions)
    return dx, db


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The dropout mask m that the kernels regenerate for (seed, p), materialised (for tests): (M, K) fp32, entries
    0 or 1/(1-p), all ones when p == 0 (``fused_lora.kernels.dropout.dropout_mask``, imported when first used, like
    every kernel module).

    Example:
        >>> m = dropout_mask(1234, 37, 64, 0.1, "cpu")     # pass as ``m`` to fused_lora.reference.lora_forward
    """
    from .dropout import dropout_mask as kernel_mask

    return kernel_mask(seed, M, K, p, device)
