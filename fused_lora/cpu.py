"""The "cpu" backend: ``lora_linear``, ``frozen_linear`` and ``dequantize_nf4`` at BLAS speed on a CPU.

The math and symbols are fused_lora/reference.py's (docs/DESIGN.md, "The math"); x (M×K), W (N×K), A (r×K),
B (N×r), b (N), s, m the dropout mask (0 or 1/(1-p)), g = ∂L/∂y:

    forward:   u = (m⊙x)·Aᵀ;  y = x·Wᵀ + b + s·u·Bᵀ
    backward:  v = g·B;  dB = s·gᵀ·u;  db = Σ_M g;  dx = g·W + s·m⊙(v·A);  dA = s·vᵀ·(m⊙x)
    frozen:    y = x·Wᵀ + b;  dx = g·W;  db = Σ_M g

What it does instead of the reference (the readable oracle, which stays as it is):

* NF4 W is decoded by ``fused_lora._C.nf4_dequantize_into`` (AVX2, threaded, double-quant scales decoded per
  block) straight into the GEMM's dtype: byte-exact with ``dequantize_nf4``, and when x is bf16/fp16 but the GEMM
  runs in fp32, the values are rounded to x's dtype first, so W is the weight a half-precision dequantize gives.
* The GEMM dtype: fp32 (fp64 for fp64 x). For bf16/fp16 x on a CPU without native half-precision GEMMs (oneDNN's
  check; AVX2 machines), torch's half GEMM is a slow fallback, so the products run in fp32 over the exact bf16/fp16
  values of x and W (each product exact, fp32 accumulation, one rounding of y and dx to x's dtype: a half GEMM
  with fp32 accumulation). Where the CPU has native half GEMMs they run in x's dtype, as the reference does.
* No M×N temporary: the bias and the low-rank term s·u·Bᵀ are written into y first and the frozen GEMM accumulates
  onto them (``addmm_``, beta = 1: BLAS reads its C once, no extra pass over y); in backward s·m⊙(v·A) is written
  into dx (the mask applied in place) and g·W accumulates onto it. With fp32 x the GEMMs cover all rows at once;
  with a dtype conversion (bf16/fp16 x in fp32 GEMMs) the rows run in chunks of ``chunk_rows`` so that the
  converted x, g and the fp32 output exist one chunk at a time. m⊙x is a chunk temporary (M×K at most, 4 MB).
  The temporaries (decoded W, m⊙x, conversions) live in a per-thread workspace reused between calls, so their page
  faults are paid once (``release_workspace`` frees it); y, dx, u and the gradients are always fresh tensors.
* Dropout: the reference's mask (torch's CPU generator, same seed, bit for bit: ``fused_lora._C.dropout_keep``, a
  vectorised mt19937), drawn as a uint8 keep mask and regenerated in backward; m⊙x is never saved.
* u is kept in fp32 (fp64 for fp64 x) whatever the adapters' dtype, like the Triton backend; the low-rank path
  runs in fp32 (the reference runs it in the adapters' dtype: fp16/bf16 adapters are more accurate here).

Numerics: the tolerance rule of docs/DESIGN.md against the float64 reference (tests/test_cpu_backend.py). The
module imports only torch and the package's lower layers; the extension loads on first use.
"""

from __future__ import annotations

import math
import threading

import torch

from . import _ext
from .backend import cpu_kernels_error

__all__ = [
    "unsupported_reason",
    "forward",
    "backward",
    "frozen_forward",
    "frozen_backward",
    "dequantize_nf4",
    "dequantize_into",
    "dropout_mask",
    "gemm_dtype",
    "chunk_rows",
    "release_workspace",
]

_HALF = (torch.float16, torch.bfloat16)
# Rows per chunk: about this many elements (4 MB in fp32) in the widest chunk temporary (M×max(N, K) split by rows).
CHUNK_ELEMENTS = 1 << 20
# Temporaries up to this size are kept between calls (see _Workspace); larger ones are allocated per call.
WORKSPACE_MAX_BYTES = 64 << 20


class _Workspace(threading.local):
    """Reused buffers for the temporaries of one call (the decoded W, m⊙x, dtype conversions, chunk outputs), one
    set per thread. A fresh multi-megabyte tensor costs its page faults on every call (about 0.1 ms per MB, as much
    as decoding W); a buffer is handed out again only after the call that used it has returned, and none of them is
    ever returned to the caller. Buffers above WORKSPACE_MAX_BYTES are not kept."""

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on the CPU, the same storage for the same ``name``."""
        numel = math.prod(shape)
        if numel * torch.finfo(dtype).bits // 8 > WORKSPACE_MAX_BYTES:
            return torch.empty(shape, dtype=dtype)
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # kept for later calls: not an inference tensor if made inside one
                buffer = torch.empty(numel, dtype=dtype)
            self.buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)


_workspace = _Workspace()


def release_workspace() -> None:
    """Free this thread's reused temporaries (they come back, at their page-fault cost, on the next call).

    Example:
        >>> release_workspace()
    """
    _workspace.buffers.clear()


def _opaque_to_dynamo(function):
    """Run ``function`` eagerly under torch.compile (a graph break), instead of Dynamo tracing into the extension's
    functions, which it cannot, and warning about each (custom ops with fake implementations: issue 10)."""
    return torch.compiler.disable(function)


def _kernels():
    problem = cpu_kernels_error()
    if problem is not None:
        raise RuntimeError(f"fused_lora: the 'cpu' backend needs the CPU kernels, but {problem}")
    return _ext.load()


def _is_nf4(weight) -> bool:
    return hasattr(weight, "packed") and hasattr(weight, "absmax")


def _native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether torch runs ``dtype`` (bf16/fp16) GEMMs natively on this CPU (oneDNN's check), rather than through
    its slow generic fallback). False on a torch built without oneDNN (no such check; the fp32 GEMMs are always
    right)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def gemm_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the frozen GEMMs for an x of ``x_dtype``: x's own on native hardware, else fp32 (fp64 stays).

    Example:
        >>> gemm_dtype(torch.bfloat16)       # on an AVX2 machine
        torch.float32
    """
    if x_dtype in _HALF and not _native_half_gemm(x_dtype):
        return torch.float32
    return x_dtype


def _acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The low-rank path's dtype (u, v, dA, dB): fp32, fp64 for fp64 x."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def chunk_rows(M: int, width: int) -> int:
    """Rows per chunk for M rows whose widest per-row temporary has ``width`` elements.

    Example:
        >>> chunk_rows(4096, 1408)
        744
    """
    return max(1, min(M, CHUNK_ELEMENTS // max(width, 1)))


def unsupported_reason(x2d, weight, A, B, bias, dropout_p) -> str | None:
    """Why this backend cannot run the call, or None. Same arguments as fused_lora.kernels.lora.unsupported_reason.

    Example:
        >>> unsupported_reason(torch.randn(4, 8), torch.randn(0, 8), None, None, None, 0.0)
        'empty weight: 0 output and 8 input features'
    """
    if x2d.shape[1] == 0 or weight.shape[0] == 0:
        return f"empty weight: {weight.shape[0]} output and {x2d.shape[1]} input features"
    return None


# ---------------------------------------------------------------------------------------------------------------
# NF4


def dequantize_into(out: torch.Tensor, w, round_to: torch.dtype | None = None) -> torch.Tensor:
    """Decode the NF4 weight ``w`` (an NF4Weight, read by duck typing) into ``out``, a 2-D CPU tensor of w's
    row-major elements (e.g. [N, K], or [1, n]); unit column stride, any row stride. ``round_to`` (bf16/fp16):
    round each value to that dtype first. Returns ``out``.

    Example:
        >>> out = torch.empty(37, 129)
        >>> torch.equal(dequantize_into(out, w), w.dequantize(torch.float32, backend="reference"))
        True
    """
    nested = {}
    if w.double_quant:
        nested = dict(nested_absmax=w.nested_absmax.contiguous(), nested_code=w.nested_code.contiguous(),
                      offset=float(w.offset), nested_blocksize=int(w.nested_blocksize))  # fmt: skip
    # only bf16/fp16 other than out's own dtype is a rounding: fp32 or fp64 changes no fp32 value
    halves = (torch.bfloat16, torch.float16)
    rounding = str(round_to).removeprefix("torch.") if round_to in halves and round_to != out.dtype else ""
    _kernels().nf4_dequantize_into(out, w.packed.contiguous(), w.absmax.contiguous(), w.code.contiguous(),
                                   int(w.blocksize), rounding, **nested)  # fmt: skip
    return out


@_opaque_to_dynamo
def dequantize_nf4(w, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight as a flat [n] tensor of ``dtype`` (float32, float16, bfloat16 or float64), byte-exact with
    the reference: fl32(code[q]·absmax) rounded once.

    Example:
        >>> dequantize_nf4(quantize_nf4(torch.randn(8, 8)), torch.bfloat16).shape
        torch.Size([64])
    """
    n = w.shape.numel()
    out = torch.empty((1, n), dtype=dtype, device=w.packed.device)
    return dequantize_into(out, w).view(n)


def _frozen_weight(weight, dtype: torch.dtype, x_dtype: torch.dtype) -> torch.Tensor:
    """W as an [N, K] tensor of ``dtype`` (the GEMM dtype) holding the values of W in x's dtype."""
    if _is_nf4(weight):
        return dequantize_into(_workspace.get("weight", tuple(weight.shape), dtype), weight, round_to=x_dtype)
    if weight.dtype == dtype:
        return weight
    return _workspace.get("weight", tuple(weight.shape), dtype).copy_(weight)


# ---------------------------------------------------------------------------------------------------------------
# Dropout


def _keep_scale(p: float) -> float:
    """The kept entries of m as the reference's float32 mask holds them (1 / (1 - p) computed as it does)."""
    return float((torch.ones((), dtype=torch.float32) / (1.0 - p)).item())


def _keep(M: int, K: int, p: float, seed: int) -> torch.Tensor | None:
    return _kernels().dropout_keep(M, K, int(seed), float(p)) if p > 0.0 else None


def dropout_mask(seed: int, M: int, K: int, p: float, device="cpu") -> torch.Tensor:
    """The dropout mask m this backend applies for (seed, p), materialised (for tests; the signature of
    ``fused_lora.kernels.lora.dropout_mask``): (M, K) fp32 on the CPU with entries 0 or 1/(1-p), equal to
    ``fused_lora.reference.dropout_mask((M, K), p, seed, "cpu")``; all ones when p == 0.

    Example:
        >>> torch.equal(dropout_mask(7, 37, 64, 0.25), reference.dropout_mask((37, 64), 0.25, 7, "cpu"))
        True
    """
    if torch.device(device).type != "cpu":
        raise ValueError(f"cpu.dropout_mask: the CPU backend's mask lives on the CPU, got device {device}")
    if p == 0.0:
        return torch.ones((M, K), dtype=torch.float32)
    return _keep(M, K, p, seed).to(torch.float32) * _keep_scale(p)


def _masked(t: torch.Tensor, keep, p: float, dtype: torch.dtype) -> torch.Tensor:
    """m⊙t in ``dtype`` (a workspace temporary), or t in ``dtype`` without dropout (t itself when it has it)."""
    if keep is None:
        return _converted(t, dtype, "masked")
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _kernels().dropout_apply_into(_workspace.get("masked", tuple(t.shape), dtype), t, keep, _keep_scale(p))


def _converted(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """t in ``dtype``: t itself when it has it, else a copy in the workspace buffer ``name``."""
    if t.dtype == dtype:
        return t
    return _workspace.get(name, tuple(t.shape), dtype).copy_(t)


# ---------------------------------------------------------------------------------------------------------------
# The layer


def _chunks(M: int, rows: int):
    """(i0, i1) row ranges of at most ``rows`` rows covering 0..M."""
    return ((i0, min(M, i0 + rows)) for i0 in range(0, M, max(rows, 1)))


def _gemm_rows(M: int, width: int, x_dtype: torch.dtype, acc: torch.dtype) -> int:
    """Rows per frozen GEMM: all M when x is already in the accumulation dtype (the GEMMs write y / dx in place, one
    call keeps BLAS at full speed), else chunks whose conversion temporaries hold about CHUNK_ELEMENTS."""
    return M if x_dtype == acc else chunk_rows(M, width)


def _accumulate_gemm(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, started: bool) -> torch.Tensor:
    """target = a·b (started False) or target += a·b (started True: the GEMM reads target as its C, beta = 1, so a
    term written there first costs no extra pass over the output)."""
    if started:
        return target.addmm_(a, b)
    return torch.mm(a, b, out=target)


def _lowrank_in(x2d, A_acc, keep, dropout_p: float, acc: torch.dtype) -> torch.Tensor:
    """u = (m⊙x)·Aᵀ (M, r) in the accumulation dtype; m⊙x (or x converted) exists only one row chunk at a time."""
    if keep is None and x2d.dtype == acc:
        return x2d @ A_acc.t()
    M, K = x2d.shape
    u = torch.empty((M, A_acc.shape[0]), dtype=acc)
    for i0, i1 in _chunks(M, chunk_rows(M, K)):
        rows_keep = None if keep is None else keep[i0:i1]
        torch.mm(_masked(x2d[i0:i1], rows_keep, dropout_p, acc), A_acc.t(), out=u[i0:i1])
    return u


def _forward_rows(x_rows, W, bias, u_rows, sB_acc, gemm, acc, y_view):
    """One chunk of y = b + s·u·Bᵀ + x·Wᵀ. With an fp32 (fp64) GEMM the bias and the low-rank term are written into
    the chunk first and the frozen GEMM accumulates onto them; a native half GEMM rounds x·Wᵀ (+ b) to x's dtype
    first, as the reference does, and the low-rank term is added in fp32."""
    if gemm == acc:
        target = y_view if y_view.dtype == acc else _workspace.get("out_rows", tuple(y_view.shape), acc)
        started = u_rows is not None or bias is not None
        if u_rows is not None and bias is not None:
            torch.addmm(bias.to(acc), u_rows, sB_acc.t(), out=target)
        elif u_rows is not None:
            torch.mm(u_rows, sB_acc.t(), out=target)
        elif bias is not None:
            target.copy_(bias.to(acc).expand_as(target))
        _accumulate_gemm(target, _converted(x_rows, gemm, "in_rows"), W.t(), started)
    else:
        base = torch.mm(x_rows, W.t())
        if bias is not None:
            base += bias.to(base.dtype)
        if u_rows is None:
            target = base
        else:
            target = base.to(acc).addmm_(u_rows, sB_acc.t())
    if target is not y_view:
        y_view.copy_(target)


def _run_forward(x2d, weight, A, B, scaling, bias, dropout_p, seed):
    M, K = x2d.shape
    N = weight.shape[0]
    gemm, acc = gemm_dtype(x2d.dtype), _acc_dtype(x2d.dtype)
    W = _frozen_weight(weight, gemm, x2d.dtype)
    y = torch.empty((M, N), dtype=x2d.dtype)
    u = sB_acc = None
    if A is not None:
        sB_acc = B.to(acc) * scaling
        u = _lowrank_in(x2d, A.to(acc), _keep(M, K, dropout_p, seed), dropout_p, acc)
    for i0, i1 in _chunks(M, _gemm_rows(M, max(N, K), x2d.dtype, acc)):
        _forward_rows(x2d[i0:i1], W, bias, None if u is None else u[i0:i1], sB_acc, gemm, acc, y[i0:i1])
    return y, u


@_opaque_to_dynamo
def forward(x2d, weight, A, B, scaling, bias, dropout_p, seed):
    """y (M, N) in x's dtype and u (M, r) in fp32 (fp64 for fp64 x). Arguments as
    ``fused_lora.functional._ReferenceImpl.forward``: x2d (M, K), weight NF4Weight or dense (N, K), A (r, K),
    B (N, r), bias (N,) or None, the dropout probability and its seed.

    Example:
        >>> y, u = forward(torch.randn(37, 64), quantize_nf4(torch.randn(80, 64)), A, B, 2.0, None, 0.1, 1234)
    """
    return _run_forward(x2d, weight, A, B, scaling, bias, dropout_p, seed)


def _grad_input_rows(g_rows, g_acc, W, v_rows, sA_acc, keep_rows, dropout_p, gemm, acc, dx_view):
    """One chunk of dx = s·m⊙(v·A) + g·W: the low-rank term (masked in place) is written first and the frozen GEMM
    accumulates onto it (fp32/fp64 GEMM), or, with a native half GEMM, g·W rounded to g's dtype is added to it."""
    native = gemm != acc
    started = v_rows is not None
    if native and not started:
        torch.mm(g_rows, W, out=dx_view)
        return
    in_place = dx_view.dtype == acc and not native
    target = dx_view if in_place else _workspace.get("out_rows", tuple(dx_view.shape), acc)
    if started:
        torch.mm(v_rows, sA_acc, out=target)
        if keep_rows is not None:
            _kernels().dropout_apply_into(target, target, keep_rows, _keep_scale(dropout_p))
    if native:
        target.add_(torch.mm(g_rows, W))
    else:
        _accumulate_gemm(target, g_acc, W, started)
    if target is not dx_view:
        dx_view.copy_(target)


def _run_backward(g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db):
    M, N = g.shape
    K = weight.shape[1]
    gemm, acc = gemm_dtype(g.dtype), _acc_dtype(g.dtype)
    lora = A is not None
    need_dA, need_dB = need_dA and lora, need_dB and lora
    need_v = lora and (need_dx or need_dA)
    W = _frozen_weight(weight, gemm, g.dtype) if need_dx else None
    dx = torch.empty((M, K), dtype=g.dtype) if need_dx else None
    db = torch.zeros(N, dtype=acc) if need_db else None
    dB = torch.zeros(B.shape, dtype=acc) if need_dB else None
    v = torch.empty((M, A.shape[0]), dtype=acc) if need_v else None
    keep = _keep(M, K, dropout_p, seed) if need_v else None
    if lora:
        B_acc, sA_acc = B.to(acc), A.to(acc) * scaling
    for i0, i1 in _chunks(M, _gemm_rows(M, max(N, K), g.dtype, acc)):
        g_rows = g[i0:i1]
        g_acc = _converted(g_rows, acc, "in_rows") if (need_db or need_dB or need_v or gemm == acc) else None
        if need_db:
            db += g_acc.sum(0)
        if need_dB:
            dB.addmm_(g_acc.t(), u[i0:i1].to(acc), alpha=scaling)
        if need_v:
            torch.mm(g_acc, B_acc, out=v[i0:i1])
        if need_dx:
            rows_keep = None if keep is None else keep[i0:i1]
            _grad_input_rows(g_rows, g_acc, W, v[i0:i1] if lora else None, sA_acc if lora else None, rows_keep,
                             dropout_p, gemm, acc, dx[i0:i1])  # fmt: skip
    dA = None
    if need_dA:
        dA = torch.zeros(A.shape, dtype=acc)
        for i0, i1 in _chunks(M, M if keep is None and x2d.dtype == acc else chunk_rows(M, K)):
            rows_keep = None if keep is None else keep[i0:i1]
            dA.addmm_(v[i0:i1].t(), _masked(x2d[i0:i1], rows_keep, dropout_p, acc), alpha=scaling)
    if not lora:
        return dx, db
    return dx, None if dA is None else dA.to(A.dtype), None if dB is None else dB.to(B.dtype), db


@_opaque_to_dynamo
def backward(g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db):
    """(dx in x's dtype, dA in A's dtype, dB in B's dtype, db in fp32 (fp64 for fp64 g)); None where not needed.
    g: (M, N) contiguous. Arguments as ``forward`` plus u from it.

    Example:
        >>> dx, dA, dB, db = backward(g, x, w, A, B, 2.0, 0.1, 1234, u, True, True, True, False)
    """
    return _run_backward(g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db)


@_opaque_to_dynamo
def frozen_forward(x2d, weight, bias):
    """y = x·Wᵀ + b (M, N) in x's dtype.

    Example:
        >>> frozen_forward(torch.randn(37, 64), quantize_nf4(torch.randn(80, 64)), None).shape
        torch.Size([37, 80])
    """
    y, _ = _run_forward(x2d, weight, None, None, 0.0, bias, 0.0, 0)
    return y


@_opaque_to_dynamo
def frozen_backward(g, weight, need_dx, need_db):
    """(dx = g·W in g's dtype, db = Σ_M g in fp32, fp64 for fp64 g); None where not needed.

    Example:
        >>> dx, db = frozen_backward(torch.randn(37, 80), w, True, True)
    """
    return _run_backward(g, None, weight, None, None, 0.0, 0.0, 0, None, need_dx, False, False, need_db)
