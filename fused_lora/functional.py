"""``lora_linear`` and ``frozen_linear``: input checks, backend dispatch and the custom ops (with their autograd).

    lora_linear:    y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ   (symbols and backward formulas: fused_lora/reference.py)
    frozen_linear:  y = x·Wᵀ + b                     (the frozen layer alone: dx = g·W, db = Σ_M g, no dW)

Backends:
    "reference"  plain PyTorch (fused_lora/reference.py); an NF4 weight is dequantized to x's dtype first.
    "triton"     the fused kernels (fused_lora.kernels.lora); on CPU this needs TRITON_INTERPRET=1.
    "cpu"        the fast CPU path (fused_lora/cpu.py: C++ NF4 decode, BLAS GEMMs with the LoRA term and the bias
                 added in place, row chunks); CPU tensors.
    "auto"       "triton" for CUDA tensors when Triton is installed, "cpu" for CPU tensors when the extension is
                 built, "reference" otherwise (fused_lora/backend.py). The environment variable FUSED_LORA_BACKEND
                 overrides "auto".
A case a fast backend does not support (its ``unsupported_reason``) runs on the reference with one warning that
names the case; the fast path never returns a silently wrong answer.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from . import reference
from ._common import COMPUTE_DTYPES, dtype_names, flush_deferred_warnings, side_dtypes, warn_once
from .backend import BACKEND_ENV_VAR, BACKENDS, resolve_backend, validate_backend_name
from .nf4 import NF4Weight

__all__ = ["lora_linear", "frozen_linear", "resolve_backend", "validate_backend_name", "BACKENDS", "BACKEND_ENV_VAR"]

def _is_nf4(weight) -> bool:
    return isinstance(weight, NF4Weight)


def _check_floating(caller: str, name: str, t: torch.Tensor, allowed=COMPUTE_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        kind = "floating-point" if not t.is_floating_point() else "supported floating-point"
        names = dtype_names(allowed)
        raise TypeError(f"{caller}: {name} must be a {kind} tensor ({names}), got {t.dtype}")


def _check_side_dtype(caller: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """An adapter or the bias: a tensor in x's dtype or fp32 (fp64 only with fp64 x)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = side_dtypes(x.dtype)
    if t.dtype not in allowed:
        expected = dtype_names(allowed, " or ")
        raise TypeError(f"{caller}: {name} is {t.dtype}; with x in {x.dtype} it must be {expected}")


def _check_same_device(caller: str, name: str, device: torch.device, x: torch.Tensor) -> None:
    if device != x.device:
        raise ValueError(f"{caller}: {name} is on {device} but x is on {x.device}; move them together")


def _check_x_and_weight(caller: str, x, weight, trained: str) -> tuple[int, int]:
    """Checks shared by every layer function; returns (out_features, in_features). ``trained`` names what gets
    gradients, for the message about a frozen weight that requires grad."""
    _check_floating(caller, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{caller}: x must have at least one dimension (..., in_features)")
    if x.device.type == "meta":
        raise ValueError(
            f"{caller}: x is on the meta device (shapes only, no data); materialise the model first, e.g. "
            "model.to_empty(device=...) and load its weights"
        )
    if _is_nf4(weight):
        if len(weight.shape) != 2:
            raise ValueError(f"{caller}: the NF4 weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    else:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{caller}: weight must be an NF4Weight or a torch.Tensor, got {type(weight).__name__}")
        _check_floating(caller, "weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"{caller}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{caller}: the frozen weight requires grad, but W gets no gradient here; "
                f"call weight.requires_grad_(False) (only {trained})"
            )
        if weight.dtype != x.dtype:
            raise TypeError(
                f"{caller}: weight dtype {weight.dtype} differs from x dtype {x.dtype}; "
                "cast x or the frozen weight to the compute dtype"
            )
    out_features, in_features = weight.shape
    if in_features == 0:
        raise ValueError(f"{caller}: the weight has 0 input features (shape {tuple(weight.shape)}); nothing to multiply")
    if x.shape[-1] != in_features:
        raise ValueError(f"{caller}: x has {x.shape[-1]} features, expected {in_features}")
    _check_same_device(caller, "weight", weight.device, x)
    return out_features, in_features


def _check_bias(caller: str, x, bias, out_features: int) -> None:
    if bias is None:
        return
    _check_side_dtype(caller, "bias", bias, x)
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{caller}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    _check_same_device(caller, "bias", bias.device, x)


def _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training):
    caller = "lora_linear"
    out_features, in_features = _check_x_and_weight(caller, x, weight, "lora_A, lora_B and bias are trained")
    _check_side_dtype(caller, "lora_A", lora_A, x)
    _check_side_dtype(caller, "lora_B", lora_B, x)
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"{caller}: lora_A must be (r, in_features) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        hint = " (transposed?)" if lora_A.shape[0] == in_features else ""
        raise ValueError(f"{caller}: lora_A has shape {tuple(lora_A.shape)}, expected (r, in_features) = "
                         f"(r, {in_features}){hint}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{caller}: lora_B has shape {tuple(lora_B.shape)}, expected ({out_features}, {r})")
    _check_bias(caller, x, bias, out_features)
    _check_same_device(caller, "lora_A", lora_A.device, x)
    _check_same_device(caller, "lora_B", lora_B.device, x)
    _check_real(caller, "scaling", scaling, "a Python number (alpha / r)")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"{caller}: scaling must be finite, got {scaling}")
    _check_real(caller, "dropout_p", dropout_p, "a probability in [0, 1)")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"{caller}: training must be True or False, got {training!r}")


def _check_real(caller: str, name: str, value, what: str) -> None:
    """A real Python (or NumPy) number; bools, strings and tensors are refused."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be {what}, got {type(value).__name__} {value!r}")


class _ReferenceImpl:
    """The backend protocol (forward / backward) over fused_lora.reference; see fused_lora/kernels/lora.py for the twin."""

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

    @classmethod
    def frozen_forward(cls, x2d, weight, bias):
        """y = x·Wᵀ + b, rounded as reference.lora_forward rounds its base term (the product, then the bias)."""
        y = x2d @ cls._dense(weight, x2d.dtype).t()
        return y if bias is None else y + bias.to(y.dtype)

    @classmethod
    def frozen_backward(cls, g, weight, need_dx, need_db):
        """dx = g·W in g's dtype; db = Σ_M g in at least fp32 (as reference.lora_backward)."""
        dx = g @ cls._dense(weight, g.dtype) if need_dx else None
        db = g.to(torch.promote_types(g.dtype, torch.float32)).sum(0) if need_db else None
        return dx, db


def _implementation(backend: str):
    """The module (or class) with forward / backward / frozen_forward / frozen_backward / unsupported_reason."""
    if backend == "reference":
        return _ReferenceImpl
    if backend == "cpu":
        # imported on first use, like the kernels: fused_lora.cpu marks its entry points with torch.compiler.disable,
        # which imports torch._dynamo (and with it Triton), and `import fused_lora` must import neither
        from . import cpu

        return cpu
    from .kernels import lora as triton_lora

    return triton_lora


def _refuse_double_backward(caller: str) -> None:
    """Raise when autograd records the backward pass (create_graph=True): these functions have no second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{caller}: second derivatives are not supported (backward was called with create_graph=True); "
            "compute the gradients with create_graph=False"
        )


# ---------------------------------------------------------------------------------------------------------------
# The layer functions as torch.library custom ops: torch.compile (Dynamo, AOTAutograd, Inductor) sees each forward and
# backward as one opaque op with a fake (meta) implementation and a registered autograd formula, so a compiled model
# has no graph break here. The ops take the frozen W as plain tensors and ints (a dense W, or an NF4 weight's packed
# bytes, absmax, code, nested absmax and code, offset, blocksize, nested blocksize, shape and original dtype; no
# Python object crosses the op boundary) and the dropout seed as a 1-element int64 CPU tensor drawn by torch.randint
# (None without dropout), so nothing calls .item() or builds a Generator in a traced region. Their bodies dispatch to
# ``_implementation(backend)`` ("reference", "triton", "cpu"). Not twice differentiable (see
# ``_refuse_double_backward``): u is saved without a graph and the kernels have no derivatives.


def _weight_args(weight) -> tuple:
    """W as the ops take it: (dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
    nested_blocksize, shape, nf4_dtype); a dense W fills ``dense`` and its shape only."""
    if _is_nf4(weight):
        return (None, weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code,
                weight.offset, weight.blocksize, weight.nested_blocksize, list(weight.shape), weight.dtype)
    return (weight, None, None, None, None, None, None, 0, 0, list(weight.shape), weight.dtype)


def _weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
               nf4_dtype):
    """The inverse of ``_weight_args``: the dense tensor, or an NF4Weight over the same tensors (packed bytes at an
    odd address copied to an aligned tensor: the Triton kernels read them as int32 words, and under torch.compile
    the backend was chosen without the address)."""
    if packed is None:
        return dense
    if packed.data_ptr() % 4:
        packed = packed.clone()
    return NF4Weight(packed, shape, nf4_dtype, blocksize, code, absmax, offset, nested_absmax, nested_code,
                     nested_blocksize)


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _lowrank_dtype(x2d: torch.Tensor) -> torch.dtype:
    """u's dtype on every backend: fp32, fp64 for fp64 x (adapters beside fp64 x are fp64)."""
    return torch.float64 if x2d.dtype == torch.float64 else torch.float32


def _grad_or_empty(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A gradient the op returns: ``t``, or an empty tensor when it was not asked for (ops return no None)."""
    return t if t is not None else like.new_empty(0, dtype=dtype or like.dtype)


@torch.library.custom_op("fused_lora::lora_linear", mutates_args=())
def _lora_op(
    x2d: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
    code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, shape: list[int], nf4_dtype: torch.dtype,
    lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None, seed: torch.Tensor | None,
    scaling: float, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u) of lora_linear on a 2-D x; u = (m⊙x)·Aᵀ is saved for the backward op."""
    flush_deferred_warnings()  # a fallback chosen while torch.compile traced warns when the graph runs
    weight = _weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        shape, nf4_dtype)
    with _autocast_off(x2d.device):
        y, u = _implementation(backend).forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p,
                                                _seed_value(seed))
    return y.to(x2d.dtype), u.to(_lowrank_dtype(x2d))  # the dtypes the fake implementation promises


@_lora_op.register_fake
def _(x2d, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, lora_A, lora_B, bias, seed, scaling, dropout_p, backend):
    return x2d.new_empty(x2d.shape[0], shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[0],
                                                                 dtype=_lowrank_dtype(x2d))


@torch.library.custom_op("fused_lora::lora_linear_backward", mutates_args=())
def _lora_backward_op(
    g: torch.Tensor, x2d: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None,
    absmax: torch.Tensor | None, code: torch.Tensor | None, nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
    shape: list[int], nf4_dtype: torch.dtype, lora_A: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor,
    seed: torch.Tensor | None, scaling: float, dropout_p: float, backend: str,
    need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, db) of lora_linear; a gradient not asked for is an empty tensor; db in at least fp32."""
    weight = _weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        shape, nf4_dtype)
    with _autocast_off(g.device):
        dx, dA, dB, db = _implementation(backend).backward(
            g.contiguous(), x2d, weight, lora_A, lora_B, scaling, dropout_p, _seed_value(seed), u,
            need_dx, need_dA, need_dB, need_db,
        )
    db_dtype = torch.promote_types(g.dtype, torch.float32)
    dx, dA, dB = (None if t is None else t.to(like.dtype).contiguous() for t, like in ((dx, x2d), (dA, lora_A),
                                                                                       (dB, lora_B)))
    return (_grad_or_empty(dx, x2d), _grad_or_empty(dA, lora_A), _grad_or_empty(dB, lora_B),
            _grad_or_empty(None if db is None else db.to(db_dtype), g, db_dtype))


@_lora_backward_op.register_fake
def _(g, x2d, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, lora_A, lora_B, u, seed, scaling, dropout_p, backend, need_dx, need_dA, need_dB, need_db):
    db_dtype = torch.promote_types(g.dtype, torch.float32)
    # contiguous, as the op returns them (empty_like would keep a transposed x's strides)
    return (x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_dA else lora_A.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else lora_B.new_empty(0),
            g.new_empty(shape[0] if need_db else 0, dtype=db_dtype))


_N_WEIGHT_ARGS = 11  # the tensors and ints of _weight_args


def _lora_setup_context(ctx, inputs, output):
    x2d, *weight, lora_A, lora_B, bias, seed, scaling, dropout_p, backend = inputs
    ctx.save_for_backward(x2d, *weight[:7], lora_A, lora_B, output[1], seed)
    ctx.weight_ints = weight[7:]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.hyper = (scaling, dropout_p, backend)


def _lora_backward(ctx, g, _grad_u):
    _refuse_double_backward("lora_linear")
    x2d, *weight_tensors, lora_A, lora_B, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dA, need_dB = need[0], need[1 + _N_WEIGHT_ARGS], need[2 + _N_WEIGHT_ARGS]
    need_db = need[3 + _N_WEIGHT_ARGS]
    dx, dA, dB, db = _lora_backward_op(g, x2d, *weight_tensors, *ctx.weight_ints, lora_A, lora_B, u, seed,
                                       *ctx.hyper, need_dx, need_dA, need_dB, need_db)
    grads = (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None,
             db.to(ctx.bias_dtype) if need_db else None)
    return grads[0], *([None] * _N_WEIGHT_ARGS), grads[1], grads[2], grads[3], None, None, None, None


_lora_op.register_autograd(_lora_backward, setup_context=_lora_setup_context)


@torch.library.custom_op("fused_lora::frozen_linear", mutates_args=())
def _frozen_op(
    x2d: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
    code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, shape: list[int], nf4_dtype: torch.dtype,
    bias: torch.Tensor | None, backend: str,
) -> torch.Tensor:
    """y = x·Wᵀ + b on a 2-D x."""
    flush_deferred_warnings()
    weight = _weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        shape, nf4_dtype)
    with _autocast_off(x2d.device):
        return _implementation(backend).frozen_forward(x2d, weight, bias).to(x2d.dtype)


@_frozen_op.register_fake
def _(x2d, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, bias, backend):
    return x2d.new_empty(x2d.shape[0], shape[0])


@torch.library.custom_op("fused_lora::frozen_linear_backward", mutates_args=())
def _frozen_backward_op(
    g: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
    code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, shape: list[int], nf4_dtype: torch.dtype,
    backend: str, need_dx: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, db) of frozen_linear; a gradient not asked for is an empty tensor; db in at least fp32."""
    weight = _weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        shape, nf4_dtype)
    with _autocast_off(g.device):
        dx, db = _implementation(backend).frozen_backward(g.contiguous(), weight, need_dx, need_db)
    db_dtype = torch.promote_types(g.dtype, torch.float32)
    dx = None if dx is None else dx.to(g.dtype)
    return _grad_or_empty(dx, g), _grad_or_empty(None if db is None else db.to(db_dtype), g, db_dtype)


@_frozen_backward_op.register_fake
def _(g, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, backend, need_dx, need_db):
    db_dtype = torch.promote_types(g.dtype, torch.float32)
    return (g.new_empty(g.shape[0], shape[1]) if need_dx else g.new_empty(0),
            g.new_empty(shape[0] if need_db else 0, dtype=db_dtype))


def _frozen_setup_context(ctx, inputs, output):
    x2d, *weight, bias, backend = inputs
    ctx.save_for_backward(*weight[:7])
    ctx.weight_ints = weight[7:]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backend


def _frozen_backward(ctx, g):
    _refuse_double_backward("frozen_linear")
    need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1 + _N_WEIGHT_ARGS]
    dx, db = _frozen_backward_op(g, *ctx.saved_tensors, *ctx.weight_ints, ctx.backend, need_dx, need_db)
    return dx if need_dx else None, *([None] * _N_WEIGHT_ARGS), db.to(ctx.bias_dtype) if need_db else None, None


_frozen_op.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


def _autocast_off(device: torch.device):
    """Autocast disabled for ``device`` while the layer runs forward or backward: the reference backend then
    computes in x's dtype, as the kernels do (an active autocast would recast its matmuls, and only on that
    backend)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _choose_backend(backend, x2d, weight, lora_A, lora_B, bias, dropout_p, caller="lora_linear") -> str:
    """The backend that runs this call; lora_A = lora_B = None for the frozen layer alone."""
    chosen = resolve_backend(backend, x2d.device, caller)
    if chosen != "reference":
        if x2d.shape[0] == 0:
            return "reference"
        reason = _implementation(chosen).unsupported_reason(x2d, weight, lora_A, lora_B, bias, dropout_p)
        if reason is not None:
            what = "the Triton kernels" if chosen == "triton" else f"the {chosen!r} backend"
            warn_once(f"{caller}: {what} cannot run this call ({reason}); using the reference backend")
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
        x: (..., K) input, bf16 / fp16 / fp32 (fp64 on the reference and cpu backends). Any strides.
        weight: frozen W, an ``NF4Weight`` of shape (N, K) or a dense (N, K) tensor in x's dtype.
        lora_A: (r, K) and lora_B: (N, r), in x's dtype or fp32 (accumulation is always at least fp32).
        scaling: s, a Python number (α/r, or α/√r with rsLoRA).
        bias: optional (N,) in x's dtype or fp32; it gets a gradient only if it requires one.
        dropout_p: LoRA dropout on the adapter input, applied only when ``training``; the mask m is drawn
            from a seed (torch's CPU generator) and regenerated in backward, never stored.
        training: whether dropout is active.
        backend: "auto", "triton", "cpu" or "reference" (see the module docstring).
    Returns:
        y: (..., N) in x's dtype, computed in x's dtype whether or not ``torch.autocast`` is active (cast x to
        the autocast dtype first, or use ``FusedLoraLinear``, which does). Gradients flow to x, lora_A, lora_B
        and bias (W is frozen); second derivatives (backward with create_graph=True) raise.

    Example:
        >>> import torch, fused_lora as fl
        >>> W = fl.quantize_nf4(torch.randn(80, 64))
        >>> A, B = torch.randn(8, 64, requires_grad=True), torch.zeros(80, 8, requires_grad=True)
        >>> fl.functional.lora_linear(torch.randn(2, 5, 64), W, A, B, scaling=2.0).shape
        torch.Size([2, 5, 80])
    """
    _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
    dropout_p = float(dropout_p) if training else 0.0
    # the seed stays a tensor (torch's CPU generator, which checkpointing restores); the op reads it
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    leading, in_features = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, in_features)
    chosen = _choose_backend(backend, x2d, weight, lora_A, lora_B, bias, dropout_p)
    with _autocast_off(x2d.device):
        y, _ = _lora_op(x2d, *_weight_args(weight), lora_A, lora_B, bias, seed, float(scaling), dropout_p, chosen)
    return y.reshape(*leading, y.shape[-1])


def frozen_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The frozen layer alone: y = x·Wᵀ + b, without materialising a dequantized W on the fast path.

    This is what a LoRA layer computes with its adapter disabled (e.g. the reference model of RL fine-tuning that
    shares the frozen weights) or merged into W. On the "triton" backend an NF4 W is dequantized tile by tile inside
    the GEMM, forward (y) and backward (dx); the reference backend dequantizes it to x's dtype first.

    Args:
        x: (..., K) input, bf16 / fp16 / fp32 (fp64 on the reference and cpu backends). Any strides.
        weight: frozen W, an ``NF4Weight`` of shape (N, K) or a dense (N, K) tensor in x's dtype that does not
            require grad.
        bias: optional (N,) in x's dtype or fp32; it gets a gradient only if it requires one.
        backend: "auto", "triton", "cpu" or "reference" (see the module docstring); a case a fast backend does not
            support runs on the reference with one warning.
    Returns:
        y: (..., N) in x's dtype, whether or not ``torch.autocast`` is active. Gradients flow to x (dx = g·W) and
        bias (db = Σ g over the leading dims); W gets none; second derivatives raise.

    Example:
        >>> import torch, fused_lora as fl
        >>> W = fl.quantize_nf4(torch.randn(80, 64))
        >>> x = torch.randn(2, 5, 64, requires_grad=True)
        >>> y = fl.functional.frozen_linear(x, W, bias=torch.zeros(80))
        >>> y.shape, torch.autograd.grad(y.sum(), x)[0].shape
        (torch.Size([2, 5, 80]), torch.Size([2, 5, 64]))
    """
    caller = "frozen_linear"
    out_features, in_features = _check_x_and_weight(caller, x, weight, "x and bias get gradients")
    _check_bias(caller, x, bias, out_features)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    chosen = _choose_backend(backend, x2d, weight, None, None, bias, 0.0, caller)
    with _autocast_off(x2d.device):
        y = _frozen_op(x2d, *_weight_args(weight), bias, chosen)
    return y.reshape(*leading, out_features)
