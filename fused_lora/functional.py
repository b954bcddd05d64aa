"""``lora_linear``: input checks, backend dispatch and the autograd function of the LoRA layer.

    y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ        (symbols and backward formulas: fused_lora/reference.py)

Backends:
    "reference"  plain PyTorch (fused_lora/reference.py); an NF4 weight is dequantized to x's dtype first.
    "triton"     the fused kernels (fused_lora.kernels.lora); on CPU this needs TRITON_INTERPRET=1.
    "auto"       "triton" for CUDA tensors when Triton is installed, "reference" otherwise. The environment
                 variable FUSED_LORA_BACKEND overrides "auto".
A case the kernels do not support (their ``unsupported_reason``) runs on the reference with one warning that
names the case; the fast path never returns a silently wrong answer.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import reference

__all__ = ["lora_linear", "resolve_backend", "validate_backend_name", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV_VAR = "FUSED_LORA_BACKEND"
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def validate_backend_name(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ValueError listing the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return name


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with `pip install triton`"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" or "reference") that ``backend`` selects for tensors on ``device``."""
    validate_backend_name(backend)
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV_VAR)
        if override:
            try:
                backend = validate_backend_name(override)
            except ValueError as error:
                raise ValueError(f"{BACKEND_ENV_VAR}: {error}") from None
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        problem = _triton_import_error()
        if problem is not None:
            _warn_once(f"lora_linear: falling back to the reference backend on CUDA because {problem}")
            return "reference"
        return "triton"
    if backend == "triton":
        problem = _triton_import_error()
        if problem is not None:
            raise RuntimeError(f"lora_linear: backend='triton' needs Triton, but {problem}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"lora_linear: backend='triton' got {device.type} tensors; the kernels run on CUDA, or on the "
                "CPU only under Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
            )
    return backend


def _is_nf4(weight) -> bool:
    from .nf4 import NF4Weight

    return isinstance(weight, NF4Weight)


def _check_floating(name: str, t: torch.Tensor, allowed=COMPUTE_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        kind = "floating-point" if not t.is_floating_point() else "supported floating-point"
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"lora_linear: {name} must be a {kind} tensor ({names}), got {t.dtype}")


def _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p):
    _check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension (..., in_features)")
    if _is_nf4(weight):
        if len(weight.shape) != 2:
            raise ValueError(f"lora_linear: the NF4 weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        weight_device = weight.device
    else:
        _check_floating("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"lora_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "lora_linear: the frozen weight requires grad, but W gets no gradient here; "
                "call weight.requires_grad_(False) (only lora_A, lora_B and bias are trained)"
            )
        if weight.dtype != x.dtype:
            raise TypeError(
                f"lora_linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}; "
                "cast x or the frozen weight to the compute dtype"
            )
        weight_device = weight.device
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, expected {in_features}")
    adapter_dtypes = (x.dtype, torch.float32) if x.dtype != torch.float64 else (torch.float64,)
    _check_floating("lora_A", lora_A, adapter_dtypes)
    _check_floating("lora_B", lora_B, adapter_dtypes)
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_A must be (r, in_features) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_linear: lora_A has shape {tuple(lora_A.shape)}, expected ({r}, {in_features})")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_linear: lora_B has shape {tuple(lora_B.shape)}, expected ({out_features}, {r})")
    if bias is not None:
        _check_floating("bias", bias, adapter_dtypes)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    for name, t_device in (("weight", weight_device), ("lora_A", lora_A.device), ("lora_B", lora_B.device)):
        if t_device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t_device} but x is on {x.device}; move them together")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"lora_linear: bias is on {bias.device} but x is on {x.device}; move them together")
    if isinstance(scaling, torch.Tensor):
        raise TypeError("lora_linear: scaling must be a Python number (alpha / r), not a tensor")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"lora_linear: scaling must be finite, got {scaling}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


class _ReferenceImpl:
    """The backend protocol (forward / backward) over fused_lora.reference; see kernels/lora.py for the twin."""

    @staticmethod
    def _dense(weight, dtype):
        return weight.dequantize(dtype) if _is_nf4(weight) else weight

    @staticmethod
    def _mask(x2d, dropout_p, seed):
        return reference.dropout_mask(x2d.shape, dropout_p, seed, x2d.device)

    @classmethod
    def forward(cls, x2d, weight, A, B, scaling, bias, dropout_p, seed):
        m = cls._mask(x2d, dropout_p, seed)
        return reference.lora_forward(x2d, cls._dense(weight, x2d.dtype), A, B, scaling, bias, m)

    @classmethod
    def backward(cls, g, x2d, weight, A, B, scaling, dropout_p, seed, u, need_dx, need_dA, need_dB, need_db):
        m = cls._mask(x2d, dropout_p, seed)
        W = cls._dense(weight, x2d.dtype) if need_dx else None
        return reference.lora_backward(g, x2d, W, A, B, scaling, u, m, need_dx, need_dA, need_dB, need_db)


def _implementation(backend: str):
    if backend == "reference":
        return _ReferenceImpl
    from .kernels import lora as triton_lora

    return triton_lora


class _LoraLinearFunction(torch.autograd.Function):
    """Autograd over a backend's forward/backward. Only x, A, B, u (and a dense W) are saved; the dropout mask
    is regenerated from ``seed`` in backward; the NF4 weight is frozen and never receives a gradient."""

    @staticmethod
    def forward(ctx, x2d, dense_weight, lora_A, lora_B, bias, nf4_weight, scaling, dropout_p, seed, backend):
        weight = nf4_weight if nf4_weight is not None else dense_weight
        y, u = _implementation(backend).forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
        ctx.save_for_backward(x2d, dense_weight, lora_A, lora_B, u)
        ctx.nf4_weight = nf4_weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.hyper = (scaling, dropout_p, seed, backend)
        return y

    @staticmethod
    def backward(ctx, g):
        x2d, dense_weight, lora_A, lora_B, u = ctx.saved_tensors
        scaling, dropout_p, seed, backend = ctx.hyper
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else dense_weight
        need_dx, _, need_dA, need_dB, need_db = ctx.needs_input_grad[:5]
        dx, dA, dB, db = _implementation(backend).backward(
            g.contiguous(), x2d, weight, lora_A, lora_B, scaling, dropout_p, seed, u,
            need_dx, need_dA, need_dB, need_db,
        )
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, None, dA, dB, db, None, None, None, None, None


def _choose_backend(backend, x2d, weight, lora_A, lora_B, bias, dropout_p) -> str:
    chosen = resolve_backend(backend, x2d.device)
    if chosen == "triton":
        if x2d.shape[0] == 0:
            return "reference"
        from .kernels import lora as triton_lora

        reason = triton_lora.unsupported_reason(x2d, weight, lora_A, lora_B, bias, dropout_p)
        if reason is not None:
            _warn_once(f"lora_linear: the Triton kernels do not support {reason}; using the reference backend")
            return "reference"
    return chosen


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer over a frozen weight: y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ.

    Args:
        x: (..., K) input, bf16 / fp16 / fp32 (fp64 on the reference backend). Any strides.
        weight: frozen W, an ``NF4Weight`` of shape (N, K) or a dense (N, K) tensor in x's dtype.
        lora_A: (r, K) and lora_B: (N, r), in x's dtype or fp32 (accumulation is always at least fp32).
        scaling: s, a Python number (α/r, or α/√r with rsLoRA).
        bias: optional (N,) in x's dtype or fp32; it gets a gradient only if it requires one.
        dropout_p: LoRA dropout on the adapter input, applied only when ``training``; the mask m is drawn
            from a seed (torch's CPU generator) and regenerated in backward, never stored.
        training: whether dropout is active.
        backend: "auto", "triton" or "reference" (see the module docstring).
    Returns:
        y: (..., N) in x's dtype. Gradients flow to x, lora_A, lora_B and bias (W is frozen).

    Example:
        >>> import torch, fused_lora as fl
        >>> W = fl.quantize_nf4(torch.randn(80, 64))
        >>> A, B = torch.randn(8, 64, requires_grad=True), torch.zeros(80, 8, requires_grad=True)
        >>> fl.functional.lora_linear(torch.randn(2, 5, 64), W, A, B, scaling=2.0).shape
        torch.Size([2, 5, 80])
    """
    _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    dropout_p = float(dropout_p) if training else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0
    leading, in_features = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, in_features)
    chosen = _choose_backend(backend, x2d, weight, lora_A, lora_B, bias, dropout_p)
    nf4_weight, dense_weight = (weight, None) if _is_nf4(weight) else (None, weight)
    y = _LoraLinearFunction.apply(
        x2d, dense_weight, lora_A, lora_B, bias, nf4_weight, float(scaling), dropout_p, seed, chosen
    )
    return y.reshape(*leading, y.shape[-1])
