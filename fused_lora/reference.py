"""The LoRA layer in plain PyTorch: the oracle for every test and the CPU fallback of ``lora_linear``.

Symbols (docs/DESIGN.md, "The math"), after flattening x's leading dimensions:

    x ∈ R^{M×K}   input, compute dtype (bf16 / fp16 / fp32)
    W ∈ R^{N×K}   frozen base weight (dense here; NF4 weights are dequantized before they get here)
    A ∈ R^{r×K}, B ∈ R^{N×r}   LoRA adapters (fp32 or the compute dtype)
    b ∈ R^{N}     optional bias
    s             scaling, α/r (α/√r with rsLoRA)
    m ∈ R^{M×K}   dropout mask already divided by (1-p): entries 0 or 1/(1-p); None means all ones

Forward:   u = (m⊙x)·Aᵀ                 (M×r, saved for backward)
           y = x·Wᵀ + b + s·u·Bᵀ
Backward, given g = ∂L/∂y:
           v  = g·B                     (M×r)
           dx = g·W + s·m⊙(v·A)
           dA = s·vᵀ·(m⊙x)              (r×K)
           dB = s·gᵀ·u                  (N×r)
           db = Σ_M g
There is no dW: W is frozen.

Dtypes: the frozen product x·Wᵀ and g·W run in the compute dtype (as a bf16 cuBLAS GEMM would); the low-rank
path (m⊙x, u, v, the low-rank terms, dA, dB) runs in at least fp32, as the kernels accumulate it (fp64 when x or an
adapter is fp64), so the dropout keep scale 1/(1-p) is never rounded to x's dtype and fp16 adapters cannot
overflow; y / dx are returned in x's dtype, u in that low-rank dtype, dA in A's dtype, dB in B's dtype and db in at
least fp32.
"""

from __future__ import annotations

import math

import torch

from ._common import refuse_dropout_in_cuda_graph

__all__ = [
    "lora_scaling",
    "dropout_mask",
    "lora_forward",
    "lora_backward",
    "lora_linear_naive",
]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r with rsLoRA.

    Example:
        >>> lora_scaling(16, 32), lora_scaling(16, 32, use_rslora=True)
        (2.0, 8.0)
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def dropout_mask(shape, p: float, seed: int, device, dtype=torch.float32) -> torch.Tensor | None:
    """The reference backend's dropout mask m (entries 0 or 1/(1-p)), regenerated from ``seed``.

    Returns None when p == 0 (m is all ones), else a ``shape`` tensor of ``dtype`` on ``device``. The Triton
    backend draws its own mask from the same seed with a different generator; tests that compare the two
    materialise the kernel's mask (``fused_lora.kernels.lora.dropout_mask``) and pass it in as ``m``.

    Example:
        >>> m = dropout_mask((37, 64), 0.25, seed=7, device="cpu")     # (37, 64) float32, entries 0 or 4/3
        >>> torch.equal(m, dropout_mask((37, 64), 0.25, seed=7, device="cpu"))
        True
    """
    if p == 0.0:
        return None
    refuse_dropout_in_cuda_graph(p)  # a graph would replay this mask at every step
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    keep = torch.rand(shape, generator=generator, device=device, dtype=torch.float32) >= p
    return keep.to(dtype) / (1.0 - p)


def _lowrank_dtype(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when x or an adapter is fp64: the low-rank path never runs below fp32 (as in the kernels, whose
    low-rank products accumulate in fp32 and keep u and v in fp32), so fp16 adapters cannot overflow v·A or vᵀ·x."""
    return torch.promote_types(torch.promote_types(torch.promote_types(x.dtype, A.dtype), B.dtype), torch.float32)


def _apply_mask(x: torch.Tensor, m: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """m⊙x in ``dtype`` (the low-rank dtype, at least fp32): the keep scale 1/(1-p) is never rounded to x's dtype."""
    x = x.to(dtype)
    return x if m is None else x * m.to(dtype)


def lora_forward(x, W, A, B, s: float, b=None, m=None):
    """Forward of the LoRA layer.

    Args:
        x: (M, K) input. W: (N, K) dense frozen weight in x's dtype. A: (r, K). B: (N, r). b: (N,) or None.
        s: scaling. m: (M, K) dropout mask (0 or 1/(1-p)) or None.
    Returns:
        y: (M, N) in x's dtype; u: (M, r) in the low-rank dtype (saved for backward).

    Example:
        >>> x, W, A, B = torch.randn(37, 64), torch.randn(80, 64), torch.randn(8, 64), torch.randn(80, 8)
        >>> y, u = lora_forward(x, W, A, B, 2.0)                  # y (37, 80), u (37, 8)
    """
    lowrank = _lowrank_dtype(x, A, B)
    u = _apply_mask(x, m, lowrank) @ A.to(lowrank).t()
    y = x @ W.t()
    if b is not None:
        y = y + b.to(y.dtype)
    y = y.to(lowrank) + s * (u @ B.to(lowrank).t())
    return y.to(x.dtype), u


def lora_backward(g, x, W, A, B, s: float, u, m=None, need_dx=True, need_dA=True, need_dB=True, need_db=False):
    """Backward of the LoRA layer (formulas in the module docstring).

    Args:
        g: (M, N) gradient of the loss w.r.t. y, in x's dtype. x, W, A, B, s, m: as in ``lora_forward``.
        u: (M, r) saved by the forward pass.
    Returns:
        (dx (M, K) in x's dtype, dA (r, K) in A's dtype, dB (N, r) in B's dtype, db (N,) in at least fp32); an entry
        is None when its ``need_*`` flag is False.

    Example:
        >>> y, u = lora_forward(x, W, A, B, 2.0)
        >>> dx, dA, dB, db = lora_backward(torch.ones_like(y), x, W, A, B, 2.0, u, need_db=True)
    """
    lowrank = _lowrank_dtype(x, A, B)
    g_lowrank = g.to(lowrank)
    dx = dA = dB = db = None
    v = g_lowrank @ B.to(lowrank) if (need_dx or need_dA) else None
    if need_dx:
        dx_lowrank = _apply_mask(s * (v @ A.to(lowrank)), m, lowrank)
        dx = ((g.to(x.dtype) @ W).to(lowrank) + dx_lowrank).to(x.dtype)
    if need_dA:
        dA = (s * (v.t() @ _apply_mask(x, m, lowrank))).to(A.dtype)
    if need_dB:
        dB = (s * (g_lowrank.t() @ u.to(lowrank))).to(B.dtype)
    if need_db:
        db = g.to(torch.promote_types(g.dtype, torch.float32)).sum(0)
    return dx, dA, dB, db


def lora_linear_naive(x, W, A, B, s: float, b=None, m=None):
    """The same layer as one autograd expression, any leading dims: the oracle for ``lora_backward``.

    Args and result as ``lora_forward`` (x of shape (..., K), y of shape (..., N)), differentiable by autograd.

    Example:
        >>> x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
        >>> W, A, B = torch.randn(80, 64).double(), torch.randn(8, 64).double(), torch.randn(80, 8).double()
        >>> lora_linear_naive(x, W, A, B, 2.0).sum().backward()    # x.grad: (2, 5, 64)
    """
    base = torch.nn.functional.linear(x, W, b)
    lowrank = _lowrank_dtype(x, A, B)
    xd = _apply_mask(x, m, lowrank)
    delta = torch.nn.functional.linear(torch.nn.functional.linear(xd, A.to(lowrank)), B.to(lowrank))
    return (base.to(lowrank) + s * delta).to(x.dtype)
