"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) over a frozen NF4 or dense weight: the math, its
plain-PyTorch reference twin, the row norms and the backends behind ``fused_lora.dora.dora_linear`` (the public entry
and its custom ops, fused_lora/dora.py, which re-exports the public names below).

Symbols of fused_lora/reference.py, plus mag ∈ R^N, the trainable magnitude (PEFT's ``lora_magnitude_vector``):

    n = ‖W + s·B·A‖_row ∈ R^N    row norms, detached: nothing flows back through them (DoRA paper §4.3, and PEFT)
    c = mag / n                  the per-row (per output feature) scale

Forward, as PEFT's ``DoraLinearLayer.forward`` with ``DoraLinearVariant.forward`` computes it:
    no dropout (p = 0, or eval):  y = x·Wᵀ + b + (c−1)⊙(x·Wᵀ) + c⊙s·u·Bᵀ  =  c⊙z + b,   u = x·Aᵀ, z = x·Wᵀ + s·u·Bᵀ
    dropout, in training:         y = x·Wᵀ + b + (c−1)⊙(x_d·Wᵀ) + c⊙s·u·Bᵀ,           x_d = m⊙x, u = x_d·Aᵀ
                                  (PEFT's second frozen product, over the dropped input)
Backward, given g = ∂L/∂y (c⊙g scales g's columns):
    v = (c⊙g)·B;  dA = s·vᵀ·x_d;  dB = s·(c⊙g)ᵀ·u;  db = Σ_M g
    dx = (c⊙g)·W + s·v·A                        (no dropout: the LoRA backward of c⊙g)
    dx = g·W + m⊙(((c−1)⊙g)·W + s·v·A)          (dropout)
    dmag_n = Σ_m g_mn·z_mn / n_n,   z = x_d·Wᵀ + s·u·Bᵀ   (x_d = x without dropout)
Row norms without the N×K matrix W + s·B·A:
    n_n² = ‖W_n‖² + 2s·B_n·(W·Aᵀ)_n + s²·B_n·(A·Aᵀ)·B_nᵀ
‖W_n‖² (``row_squares``): cached per NF4 weight while its tensors are unchanged, for a dense W computed in every
call (a write through ``W.data`` leaves no version to key a cache on); W·Aᵀ (N×r) is one pass over W; A·Aᵀ is r×r.

Dtypes: the norm, c and every low-rank product run in the low-rank dtype (at least fp32, as in reference.py; PEFT
computes its norm in the adapter's dtype, fp32 by default), from W's stored values (NF4 decoded in fp32, exactly
bitsandbytes' values), except W·Aᵀ over a dense half W in ``_ComposedDora.norm``: the frozen kernel's product in W's
dtype (~1e-4 relative in the norm, within the tolerance rule). y, dx in x's dtype; dA / dB / dmag in theirs; db ≥ fp32.

Backends (``backend`` as in ``lora_linear``): "reference" runs the twin below. Any other backend ("triton", and
"cpu" where it exists) composes the backend's own kernels (``_ComposedDora``): without dropout, on Triton the fused
LoRA GEMM's epilogue writes both z = x·Wᵀ + s·u·Bᵀ and y = c⊙z + b from its fp32 accumulator (the per-row scale in
the epilogue; at decode sizes the decode kernels give z and one fp32 pass y); elsewhere the backend's fused forward
gives z and one pass y = c⊙z + b follows; z is kept for dmag. The backward runs the LoRA backward kernels over
(c⊙W, A, c⊙B) with c folded into an NF4 weight's block scales (no copy of W), or, for a dense W or ragged NF4 blocks,
over (W, A, B) with c⊙g: on Triton c inside the kernels (v = g·(c⊙B), dB = c⊙(s·gᵀ·u), c⊙g in the dx GEMM's main
loop: no M×N pass), elsewhere one c⊙g pass; db comes from the backward's own pass over g; dmag is one column
reduction of g⊙z. Without a magnitude gradient (inference) an NF4 layer is one fused pass over (c⊙W, c⊙B).
W·Aᵀ for the norm is the frozen kernel over the r rows of A. With dropout, on Triton off decode sizes, PEFT's second
frozen product x_d·Wᵀ is a second fused GEMM whose epilogue combines it (``kernels.lora.forward_scaled_dropout``) and
the backward keeps c and the mask in its kernels; at decode sizes, and on the other backends, x_d·Wᵀ runs on
``frozen_forward`` and the rest in PyTorch (M×N and M×K temporaries), with the backend's own mask (``ops``). No N×K
copy of W is made per step (‖W_n‖² is computed once, from one dequantized copy).
"""

from __future__ import annotations

import torch

from . import functional, reference
from ._common import TensorCache, tensor_state
from .nf4 import NF4Weight

__all__ = [
    "dora_row_norm",
    "dora_row_norm_naive",
    "row_squares",
    "row_scaled_nf4",
    "dora_forward",
    "dora_backward",
    "dora_linear_naive",
]


# ------------------------------------------------------------------------------------------- reference twin


def _lowrank_dtype(x: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """At least fp32 (fp64 when x, an adapter or mag is fp64), as reference._lowrank_dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _dense(weight, dtype: torch.dtype) -> torch.Tensor:
    return weight.dequantize(dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)


def dora_row_norm_naive(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row, materialising the N×K matrix (PEFT's ``get_weight_norm``): the oracle of
    ``dora_row_norm``. Computed in the promoted dtype of W, A and B; returns (N,), detached.

    Example:
        >>> W, A, B = torch.randn(80, 64), torch.randn(8, 64), torch.randn(80, 8)
        >>> dora_row_norm_naive(W, A, B, 2.0).shape
        torch.Size([80])
    """
    dtype = torch.promote_types(torch.promote_types(W.dtype, A.dtype), B.dtype)
    merged = W.detach().to(dtype) + s * (B.detach().to(dtype) @ A.detach().to(dtype))
    return torch.linalg.vector_norm(merged, dim=1)


def dora_row_norm(w_sq: torch.Tensor, WA: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """n = ‖W + s·B·A‖ per row by the identity n² = ‖W_n‖² + 2s·B_n·(W·Aᵀ)_n + s²·B_n·(A·Aᵀ)·B_nᵀ (no N×K term).

    Args:
        w_sq: (N,) ‖W_n‖². WA: (N, r) W·Aᵀ. A: (r, K). B: (N, r). s: scaling. All in one dtype (the low-rank one).
    Returns:
        (N,) row norms in that dtype (a rounding below 0 is clamped to 0 before the square root).

    Example:
        >>> n = dora_row_norm((W * W).sum(1), W @ A.t(), A, B, 2.0)
        >>> torch.allclose(n, dora_row_norm_naive(W, A, B, 2.0), rtol=1e-5)
        True
    """
    A, B, WA = A.detach(), B.detach(), WA.detach()
    cross = (B * WA).sum(1)
    quadratic = ((B @ (A @ A.t())) * B).sum(1)
    return (w_sq + (2.0 * s) * cross + (s * s) * quadratic).clamp_min(0.0).sqrt()


def _row_squares(weight, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(weight, NF4Weight):
            dense = weight.dequantize(dtype)
            return (dense * dense).sum(1)
        rows = max(1, (1 << 24) // max(1, weight.shape[1]))  # bounded temporaries for a dense weight
        return torch.cat([chunk.to(dtype).square().sum(1) for chunk in weight.detach().split(rows)])


# ‖W_n‖² per frozen NF4 weight and dtype while its packed bytes live, keyed on the version and address of its
# tensors. Never for a dense W: ``W.data.copy_(...)`` (a common way to load weights) moves no version counter, and
# its pass is one read of W, as the W·Aᵀ pass of every step.
_ROW_SQUARES = TensorCache()


def row_squares(weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """‖W_n‖² (N,) in ``dtype`` for a frozen NF4Weight or dense (N, K) tensor, from W's stored values; for NF4
    computed once and cached until the weight changes or is freed, for a dense W computed in every call.

    Example:
        >>> w = fl.quantize_nf4(torch.randn(80, 64))
        >>> row_squares(w) is row_squares(w)
        True
    """
    if not isinstance(weight, NF4Weight):
        return _row_squares(weight, dtype)
    state = tensor_state(weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code,
                         weight.offset)
    return _ROW_SQUARES.get(weight.packed, None if state is None else (state, dtype),
                            lambda: _row_squares(weight, dtype))


def _scale(mag: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """c = mag / n in the norm's dtype (mag promoted, never rounded)."""
    return mag.detach().to(norm.dtype) / norm


def dora_forward(x, W, A, B, s: float, mag, b=None, m=None, norm=None, keep_z=False):
    """Forward of the DoRA layer (formulas in the module docstring).

    Args:
        x: (M, K). W: (N, K) dense frozen weight in x's dtype. A: (r, K). B: (N, r). s: scaling. mag: (N,).
        b: (N,) or None. m: (M, K) dropout mask (0 or 1/(1-p)) or None. norm: (N,) row norms in the low-rank dtype,
        or None to compute them here from W. keep_z: also return z = x_d·Wᵀ + s·u·Bᵀ (for dmag) instead of None.
    Returns:
        y (M, N) in x's dtype; u (M, r) in the low-rank dtype; norm (N,) in the low-rank dtype; z (M, N) in the
        low-rank dtype or None.

    Example:
        >>> x, W, A, B = torch.randn(37, 64), torch.randn(80, 64), torch.randn(8, 64), torch.randn(80, 8)
        >>> y, u, n, _ = dora_forward(x, W, A, B, 2.0, torch.rand(80) + 0.5)
    """
    L = _lowrank_dtype(x, A, B, mag)
    A_L, B_L = A.to(L), B.to(L)
    if norm is None:
        W_L = W.to(L)
        norm = dora_row_norm(W_L.square().sum(1), W_L @ A_L.t(), A_L, B_L, s)
    c = _scale(mag, norm)
    base = x @ W.t()  # the frozen product in x's dtype, as reference.lora_forward rounds it
    if m is None:
        u = x.to(L) @ A_L.t()
        z = base.to(L) + s * (u @ B_L.t())
        y = c * z
    else:
        x_d = x.to(L) * m.to(L)
        u = x_d @ A_L.t()
        base_d, lowrank = x_d @ W.to(L).t(), s * (u @ B_L.t())
        y = base.to(L) + (c - 1.0) * base_d + c * lowrank
        z = base_d + lowrank if keep_z else None
    if b is not None:
        y = y + b.to(L)
    return y.to(x.dtype), u, norm, (z if keep_z else None)


def dora_backward(g, x, W, A, B, s: float, mag, norm, u, m=None, need_dx=True, need_dA=True, need_dB=True,
                  need_dmag=True, need_db=False, z=None):
    """Backward of the DoRA layer (formulas in the module docstring); the norm gets no gradient.

    Args:
        g: (M, N) ∂L/∂y in x's dtype. x, W, A, B, s, mag, m: as in ``dora_forward``. norm, u (and z, optional):
        from the forward.
    Returns:
        (dx, dA, dB, dmag, db): dx in x's dtype, dA / dB / dmag in A's / B's / mag's dtype, db in at least fp32;
        an entry is None when its ``need_*`` flag is False.

    dmag is Σ_m g⊙z / n; without z it is computed as Σ_k W_nk·(gᵀ·x_d)_nk + s·Σ_j B_nj·(gᵀ·u)_nj (one more GEMM and
    an N×K temporary).
    """
    L = _lowrank_dtype(x, A, B, mag)
    A_L, B_L, g_L = A.to(L), B.to(L), g.to(L)
    c = _scale(mag, norm)
    cg = g_L * c
    x_d = x.to(L) if m is None else x.to(L) * m.to(L)
    dx = dA = dB = dmag = db = None
    v = cg @ B_L if (need_dx or need_dA) else None
    if need_dx:
        lowrank = s * (v @ A_L)
        if m is None:
            dx = (cg.to(x.dtype) @ W).to(L) + lowrank
        else:
            dx = (g.to(x.dtype) @ W).to(L) + m.to(L) * ((g_L * (c - 1.0)) @ W.to(L) + lowrank)
        dx = dx.to(x.dtype)
    if need_dA:
        dA = (s * (v.t() @ x_d)).to(A.dtype)
    if need_dB:
        dB = (s * (cg.t() @ u.to(L))).to(B.dtype)
    if need_dmag and z is not None:
        dmag = ((g_L * z.to(L)).sum(0) / norm).to(mag.dtype)
    elif need_dmag:
        frozen = (W.to(L) * (g_L.t() @ x_d)).sum(1)
        lowrank = (B_L * (g_L.t() @ u.to(L))).sum(1)
        dmag = ((frozen + s * lowrank) / norm).to(mag.dtype)
    if need_db:
        db = g.to(torch.promote_types(g.dtype, torch.float32)).sum(0)
    return dx, dA, dB, dmag, db


def dora_linear_naive(x, W, A, B, s: float, mag, b=None, m=None):
    """PEFT's DoRA as one autograd expression (the oracle of every DoRA test): y = x·Wᵀ + b + (c−1)⊙base +
    c⊙s·lora, with base = x·Wᵀ (no dropout) or x_d·Wᵀ (dropout), lora = (x_d·Aᵀ)·Bᵀ and c = mag / ‖W + s·B·A‖_row,
    the norm materialised and detached. Any leading dims; differentiable in x, A, B, mag and b.

    Example:
        >>> x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
        >>> W, A, B = torch.randn(80, 64).double(), torch.randn(8, 64).double(), torch.randn(80, 8).double()
        >>> dora_linear_naive(x, W, A, B, 2.0, torch.rand(80).double() + 0.5).sum().backward()
    """
    F = torch.nn.functional
    L = _lowrank_dtype(x, A, B, mag)
    A_L, B_L, W_L = A.to(L), B.to(L), W.to(L)
    norm = dora_row_norm_naive(W_L, A_L, B_L, s).detach()
    c = mag.to(L) / norm
    result = F.linear(x, W, b).to(L)
    x_d = x.to(L) if m is None else x.to(L) * m.to(L)
    if m is None:
        base = result if b is None else result - b.to(L)
    else:
        base = F.linear(x_d, W_L)
    lora = F.linear(F.linear(x_d, A_L), B_L)
    return (result + (c - 1.0) * base + c * (s * lora)).to(x.dtype)


# ------------------------------------------------------------------------------------------- backends


class _ReferenceDora:
    """DoRA on the reference backend: the twin above, W dequantized to x's dtype for the frozen products (and once
    more to the low-rank dtype for W·Aᵀ when x is in a lower one); z (M×N) is kept for dmag when mag needs a
    gradient, as PEFT keeps its base result."""

    @staticmethod
    def norm(x2d, W, weight, A, B, s, mag):
        L = _lowrank_dtype(x2d, A, B, mag)
        A_L = A.detach().to(L)
        WA = (W if W.dtype == L else _dense(weight, L)) @ A_L.t()
        return dora_row_norm(row_squares(weight, L), WA, A_L, B.detach().to(L), s)

    @classmethod
    def forward(cls, x2d, weight, A, B, s, mag, bias, dropout_p, seed, keep_z):
        m = reference.dropout_mask(x2d.shape, dropout_p, seed, x2d.device)
        W = _dense(weight, x2d.dtype)
        norm = cls.norm(x2d, W, weight, A, B, s, mag)
        y, u, _, z = dora_forward(x2d, W, A, B, s, mag, bias, m, norm, keep_z)
        return y, norm, u, z

    @staticmethod
    def backward(g, x2d, weight, A, B, s, mag, norm, u, z, dropout_p, seed, needs):
        m = reference.dropout_mask(x2d.shape, dropout_p, seed, x2d.device)
        need_dx, need_dA, need_dB, need_dmag, need_db = needs
        W = _dense(weight, x2d.dtype) if (need_dx or (need_dmag and z is None)) else None
        return dora_backward(g, x2d, W, A, B, s, mag, norm, u, m, *needs, z=z)


def row_scaled_nf4(weight: NF4Weight, c: torch.Tensor) -> NF4Weight | None:
    """The NF4 weight of c⊙W (row n times c[n]) with W's very codes: each block's scale times its row's c (fp32, no
    double quantization), or None when blocks straddle rows (K not a multiple of the blocksize).

    Example:
        >>> w = fl.quantize_nf4(torch.randn(80, 64)); c = torch.rand(80)
        >>> torch.allclose(row_scaled_nf4(w, c).dequantize(torch.float32), c[:, None] * w.dequantize(torch.float32))
        True
    """
    N, K = weight.shape
    if K % weight.blocksize:
        return None
    absmax = weight.absmax_fp32().view(N, K // weight.blocksize) * c.detach().to(torch.float32)[:, None]
    return NF4Weight(weight.packed, weight.shape, weight.dtype, weight.blocksize, weight.code, absmax.reshape(-1))


def _sum_rows(g: torch.Tensor) -> torch.Tensor:
    """db = Σ_M g in at least fp32."""
    return g.to(torch.promote_types(g.dtype, torch.float32)).sum(0)


class _TorchOps:
    """scale_columns / column_dot / forward_scaled in PyTorch (fp32 temporaries), for composed backends without DoRA
    kernels."""

    @classmethod
    def forward_scaled(cls, impl, x2d, weight, A, B, s, bias, c):
        """(y, u, z): z = x·Wᵀ + s·u·Bᵀ by the backend's fused forward, then y = c⊙z + b in one pass."""
        z, u = impl.forward(x2d, weight, A, B, s, None, 0.0, 0)
        return cls.scale_columns(z, c, bias, x2d.dtype), u, z

    @classmethod
    def backward_scaled(cls, impl, g, x2d, weight, A, B, s, u, c, need_dx, need_dA, need_dB, need_db):
        """(dx, dA, dB, db): dx by the backend's LoRA backward of c⊙g rounded to g's dtype (one M×N pass, as the
        backend's own GEMMs take it); dA = s·((c⊙g)·B)ᵀ·x and dB = s·(c⊙g)ᵀ·u in the low-rank dtype (u's: fp32 or
        fp64), r columns wide, so that the low-rank gradients never see c⊙g rounded to a half dtype; db = Σ_M g."""
        dx = None
        if need_dx:
            cg = cls.scale_columns(g, c, None, g.dtype)
            dx = impl.backward(cg, x2d, weight, A, B, s, 0.0, 0, u, True, False, False, False)[0]
        dA = dB = None
        if need_dA or need_dB:
            L = u.dtype
            cg = g.to(L) * c.to(L)
            if need_dA:
                dA = s * ((cg @ B.detach().to(L)).t() @ x2d.to(L))
            if need_dB:
                dB = s * (cg.t() @ u)
        return dx, dA, dB, (_sum_rows(g) if need_db else None)

    @staticmethod
    def dropout_mask(shape, p, seed, device, dtype):
        """The backend's mask for ``seed``: the reference's (torch's generator), as the "cpu" backend draws it."""
        return reference.dropout_mask(shape, p, seed, device, dtype)

    @staticmethod
    def forward_dropout(impl, x2d, weight, A, B, s, bias, c, p, seed):
        """None: composed in PyTorch (``_ComposedDora.forward``)."""
        return None

    @staticmethod
    def backward_dropout(impl, g, x2d, weight, A, B, s, p, seed, u, c, need_dx, need_dA, need_dB, need_db):
        """None: composed in PyTorch (``_ComposedDora.backward``)."""
        return None

    @staticmethod
    def scale_columns(z, c, bias=None, out_dtype=None):
        y = c * z.to(c.dtype)
        return (y if bias is None else y + bias.to(c.dtype)).to(out_dtype or z.dtype)

    @staticmethod
    def column_dot(g, z):
        """Σ_M g⊙z per column in at least fp32 (fp64 for fp64 operands)."""
        dtype = torch.promote_types(torch.promote_types(g.dtype, z.dtype), torch.float32)
        return (g.to(dtype) * z.to(dtype)).sum(0)


class _ComposedDora:
    """DoRA over another backend's kernels (module docstring, "Backends"). ``impl`` is a backend module of
    ``functional`` (forward, backward, frozen_forward, frozen_backward); ``ops`` gives scale_columns and column_dot
    (fused_lora/kernels/dora.py on the Triton backend).

    Without dropout: forward z = x·Wᵀ + s·u·Bᵀ and y = c⊙z + b (``ops.forward_scaled``: on Triton both from the GEMM's
    epilogue, elsewhere the fused forward then one scale_columns pass; z kept for dmag), or, when mag needs no
    gradient and W is NF4 with K a multiple of the blocksize, y in one fused pass over (c⊙W, A, c⊙B)
    (``row_scaled_nf4``: c folded into the block scales). Backward: the LoRA backward kernels over
    (c⊙W, A, c⊙B) with g itself (dB = c⊙dB'), or, for a dense W or ragged NF4 blocks, over (W, A, B) with c⊙g
    (``ops.backward_scaled``: c inside the kernels on Triton, one c⊙g pass elsewhere); dmag = column_dot(g, z) / n.
    With dropout: ``ops.forward_dropout`` / ``ops.backward_dropout`` (two fused GEMMs, c and the mask inside the
    kernels; Triton off decode sizes), or PEFT's second frozen product x_d·Wᵀ on ``frozen_forward`` and the
    combination in PyTorch with ``ops.dropout_mask``; z is z_d = x_d·Wᵀ + s·u·Bᵀ either way."""

    def __init__(self, impl, ops=_TorchOps):
        self.impl, self.ops = impl, ops

    def norm(self, x2d, weight, A, B, s, mag):
        L = _lowrank_dtype(x2d, A, B, mag)
        # W·Aᵀ = (A·Wᵀ)ᵀ: the frozen kernel over r rows, one pass over W with NF4 decoded in registers. An NF4
        # weight decodes at fp32 (exact; fp64 for fp64 x, whose low-rank dtype is fp64); a dense one needs A in W's
        # dtype.
        nf4_dtype = torch.float64 if L == torch.float64 else torch.float32
        A_in = A.detach().to(nf4_dtype if isinstance(weight, NF4Weight) else weight.dtype)
        WA = self.impl.frozen_forward(A_in.contiguous(), weight, None).t().to(L)
        return dora_row_norm(row_squares(weight, L), WA, A.detach().to(L), B.detach().to(L), s)

    @staticmethod
    def _scaled(weight, B, c):
        """(c⊙W as NF4, c⊙B in the low-rank dtype), or None when W cannot be row-scaled without a copy, or c is fp64
        (the scales are fp32: c⊙g keeps it whole)."""
        scaled = row_scaled_nf4(weight, c) if isinstance(weight, NF4Weight) and c.dtype != torch.float64 else None
        return None if scaled is None else (scaled, B.detach().to(c.dtype) * c[:, None])

    def forward(self, x2d, weight, A, B, s, mag, bias, dropout_p, seed, keep_z):
        norm = self.norm(x2d, weight, A, B, s, mag)
        c = _scale(mag, norm)
        L = norm.dtype
        if dropout_p == 0.0:
            scaled = None if keep_z else self._scaled(weight, B, c)
            if scaled is not None:
                y, u = self.impl.forward(x2d, scaled[0], A, scaled[1], s, bias, 0.0, 0)
                return y, norm, u, None
            y, u, z = self.ops.forward_scaled(self.impl, x2d, weight, A, B, s, bias, c)
            return y, norm, u, (z if keep_z else None)
        fused = self.ops.forward_dropout(self.impl, x2d, weight, A, B, s, bias, c, dropout_p, seed)
        if fused is not None:
            y, u, z_d = fused
            return y, norm, u, (z_d if keep_z else None)
        m = self.ops.dropout_mask(x2d.shape, dropout_p, seed, x2d.device, L)
        x_d = x2d.to(L) * m
        u = x_d @ A.to(L).t()
        base = self.impl.frozen_forward(x2d, weight, bias).to(L)
        base_d = self.impl.frozen_forward(x_d.to(x2d.dtype), weight, None).to(L)
        lora = s * (u @ B.to(L).t())
        y = base + (c - 1.0) * base_d + c * lora
        # z_d = x_d·Wᵀ + s·u·Bᵀ kept in x's dtype and u in the backend's low-rank dtype, as on every composed path
        # (the dtypes fused_lora.dora's custom op promises: composed_dtypes)
        z = (base_d + lora).to(x2d.dtype) if keep_z else None
        return y.to(x2d.dtype), norm, u.to(functional._lowrank_dtype(x2d)), z

    def backward(self, g, x2d, weight, A, B, s, mag, norm, u, z, dropout_p, seed, needs):
        need_dx, need_dA, need_dB, need_dmag, need_db = needs
        L = norm.dtype
        c = _scale(mag, norm)
        dx = dA = dB = dmag = db = None
        if dropout_p == 0.0:
            if need_dx or need_dA or need_dB or need_db:
                scaled = self._scaled(weight, B, c)
                if scaled is not None:  # g itself; db from the same pass over g
                    dx, dA, dB, db = self.impl.backward(g, x2d, scaled[0], A, scaled[1], s, 0.0, 0, u, need_dx,
                                                        need_dA, need_dB, need_db)
                    dB = None if dB is None else (c[:, None] * dB.to(L)).to(B.dtype)
                else:
                    dx, dA, dB, db = self.ops.backward_scaled(self.impl, g, x2d, weight, A, B, s, u, c, need_dx,
                                                              need_dA, need_dB, need_db)
        else:
            fused = self.ops.backward_dropout(self.impl, g, x2d, weight, A, B, s, dropout_p, seed, u, c,
                                              need_dx, need_dA, need_dB, need_db)
            if fused is not None:
                dx, dA, dB, db = fused
            else:
                dx, dA, dB = self._composed_dropout_backward(g, x2d, weight, A, B, s, u, c, dropout_p, seed,
                                                             need_dx, need_dA, need_dB)
        if need_dmag:
            dmag = (self.ops.column_dot(g, z).to(L) / norm).to(mag.dtype)
        if need_db and db is None:
            db = _sum_rows(g)
        return dx, dA, dB, dmag, db

    def _composed_dropout_backward(self, g, x2d, weight, A, B, s, u, c, dropout_p, seed, need_dx, need_dA, need_dB):
        """(dx, dA, dB) with dropout composed in PyTorch from the frozen kernels (decode sizes, other backends)."""
        L = c.dtype
        g_L = g.to(L)
        m = self.ops.dropout_mask(x2d.shape, dropout_p, seed, x2d.device, L)
        A_L, B_L = A.to(L), B.to(L)
        cg = g_L * c
        v = cg @ B_L if (need_dx or need_dA) else None
        dx = dA = dB = None
        if need_dx:
            frozen, _ = self.impl.frozen_backward(g, weight, True, False)
            dropped, _ = self.impl.frozen_backward((g_L * (c - 1.0)).to(g.dtype), weight, True, False)
            dx = (frozen.to(L) + m * (dropped.to(L) + s * (v @ A_L))).to(x2d.dtype)
        if need_dA:
            dA = (s * (v.t() @ (x2d.to(L) * m))).to(A.dtype)
        if need_dB:
            dB = (s * (cg.t() @ u.to(L))).to(B.dtype)
        return dx, dA, dB


def _dora_impl(backend: str):
    if backend == "reference":
        return _ReferenceDora
    if backend == "triton":
        from .kernels import dora as dora_kernels

        return _ComposedDora(functional._implementation(backend), dora_kernels)
    return _ComposedDora(functional._implementation(backend))
