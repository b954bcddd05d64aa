"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) over a frozen NF4 or dense weight: ``dora_linear``, the
public entry, as two torch.library custom ops; the math, its reference twin and the backends are in fused_lora/_dora.py
(its module docstring has the formulas), whose public names this module re-exports.

The custom ops, as functional.py's (no graph break under torch.compile; W as tensors and ints, the dropout seed as a
1-element int64 tensor; not twice differentiable):

    fused_lora::dora_linear           (x2d, W, A, B, mag, b, seed, s, p, backend, keep_z) -> (y, n, u, z)
    fused_lora::dora_linear_backward  (g, x2d, W, A, B, mag, n, u, z, seed, s, p, backend, needs) -> (dx, dA, dB,
                                                                                                     dmag, db)

y (M, N) in x's dtype; n (N,) the detached row norms and u (M, r) in the dtypes of ``_output_dtypes``; z (M, N)
kept for dmag when ``keep_z`` (mag requires a gradient), else an empty tensor; a gradient not asked for is an empty
tensor; db in at least fp32.
"""

from __future__ import annotations

import math

import torch

from . import _dora, functional
from ._common import flush_deferred_warnings
from ._dora import (
    _dora_impl,
    _lowrank_dtype,
    dora_backward,
    dora_forward,
    dora_linear_naive,
    dora_row_norm,
    dora_row_norm_naive,
    row_scaled_nf4,
    row_squares,
)

__all__ = ["dora_linear", *_dora.__all__]


def _output_dtypes(x2d, lora_A, lora_B, magnitude, backend: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(n, u, z) dtypes of the forward op: the row norms in the low-rank dtype L (at least fp32, _dora._lowrank_dtype);
    on the reference backend u and z in L too, on a composed backend u in the backend's own low-rank dtype (fp32, fp64
    for an fp64 x) and z in x's dtype (fused_lora/_dora.py, _ComposedDora)."""
    L = _lowrank_dtype(x2d, lora_A, lora_B, magnitude)
    if backend == "reference":
        return L, L, L
    return L, functional._lowrank_dtype(x2d), x2d.dtype


@torch.library.custom_op("fused_lora::dora_linear", mutates_args=())
def _dora_op(
    x2d: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None, absmax: torch.Tensor | None,
    code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, shape: list[int], nf4_dtype: torch.dtype,
    lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None,
    seed: torch.Tensor | None, scaling: float, dropout_p: float, backend: str, keep_z: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, n, u, z) of dora_linear on a 2-D x (module docstring)."""
    flush_deferred_warnings()  # a fallback chosen while torch.compile traced warns when the graph runs
    weight = functional._weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, shape, nf4_dtype)
    with functional._autocast_off(x2d.device):
        y, norm, u, z = _dora_impl(backend).forward(x2d, weight, lora_A, lora_B, scaling, magnitude, bias, dropout_p,
                                                    functional._seed_value(seed), keep_z)
    n_dtype, u_dtype, z_dtype = _output_dtypes(x2d, lora_A, lora_B, magnitude, backend)
    z = z.to(z_dtype) if keep_z else x2d.new_empty(0, dtype=z_dtype)
    return y.to(x2d.dtype), norm.to(n_dtype), u.to(u_dtype), z  # the dtypes the fake implementation promises


@_dora_op.register_fake
def _(x2d, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, lora_A, lora_B, magnitude, bias, seed, scaling, dropout_p, backend, keep_z):
    n_dtype, u_dtype, z_dtype = _output_dtypes(x2d, lora_A, lora_B, magnitude, backend)
    M, N = x2d.shape[0], shape[0]
    return (x2d.new_empty(M, N), x2d.new_empty(N, dtype=n_dtype), x2d.new_empty(M, lora_A.shape[0], dtype=u_dtype),
            x2d.new_empty((M, N) if keep_z else (0,), dtype=z_dtype))


@torch.library.custom_op("fused_lora::dora_linear_backward", mutates_args=())
def _dora_backward_op(
    g: torch.Tensor, x2d: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor | None,
    absmax: torch.Tensor | None, code: torch.Tensor | None, nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
    shape: list[int], nf4_dtype: torch.dtype, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
    norm: torch.Tensor, u: torch.Tensor, z: torch.Tensor | None, seed: torch.Tensor | None, scaling: float,
    dropout_p: float, backend: str, need_dx: bool, need_dA: bool, need_dB: bool, need_dmag: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dmag, db) of dora_linear (module docstring); z is None when the forward did not keep it."""
    weight = functional._weight_of(dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, shape, nf4_dtype)
    with functional._autocast_off(g.device):
        dx, dA, dB, dmag, db = _dora_impl(backend).backward(
            g.contiguous(), x2d, weight, lora_A, lora_B, scaling, magnitude, norm, u, z, dropout_p,
            functional._seed_value(seed), (need_dx, need_dA, need_dB, need_dmag, need_db),
        )
    db_dtype = torch.promote_types(g.dtype, torch.float32)
    grads = [None if t is None else t.to(like.dtype).contiguous()
             for t, like in ((dx, x2d), (dA, lora_A), (dB, lora_B), (dmag, magnitude))]  # fmt: skip
    return (*(functional._grad_or_empty(t, like) for t, like in zip(grads, (x2d, lora_A, lora_B, magnitude))),
            functional._grad_or_empty(None if db is None else db.to(db_dtype), g, db_dtype))


@_dora_backward_op.register_fake
def _(g, x2d, dense, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
      nf4_dtype, lora_A, lora_B, magnitude, norm, u, z, seed, scaling, dropout_p, backend, need_dx, need_dA, need_dB,
      need_dmag, need_db):
    # contiguous, as the op returns them
    return tuple(like.new_empty(like.shape if need else (0,)) for like, need in (
        (x2d, need_dx), (lora_A, need_dA), (lora_B, need_dB), (magnitude, need_dmag))) + (
        g.new_empty(shape[0] if need_db else 0, dtype=torch.promote_types(g.dtype, torch.float32)),)


_N_WEIGHT_ARGS = functional._N_WEIGHT_ARGS


def _dora_setup_context(ctx, inputs, output):
    x2d, *weight, lora_A, lora_B, magnitude, bias, seed, scaling, dropout_p, backend, keep_z = inputs
    _, norm, u, z = output
    ctx.save_for_backward(x2d, *weight[:7], lora_A, lora_B, magnitude, norm, u, z if keep_z else None, seed)
    ctx.weight_ints = weight[7:]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.hyper = (scaling, dropout_p, backend)


def _dora_backward(ctx, g, _grad_norm, _grad_u, _grad_z):
    functional._refuse_double_backward("dora_linear")
    x2d, *weight_tensors, lora_A, lora_B, magnitude, norm, u, z, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, (need_dA, need_dB, need_dmag, need_db) = need[0], need[1 + _N_WEIGHT_ARGS:5 + _N_WEIGHT_ARGS]
    dx, dA, dB, dmag, db = _dora_backward_op(g, x2d, *weight_tensors, *ctx.weight_ints, lora_A, lora_B, magnitude,
                                             norm, u, z, seed, *ctx.hyper, need_dx, need_dA, need_dB, need_dmag,
                                             need_db)  # fmt: skip
    grads = (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None,
             dmag if need_dmag else None, db.to(ctx.bias_dtype) if need_db else None)
    return grads[0], *([None] * _N_WEIGHT_ARGS), *grads[1:], None, None, None, None, None


_dora_op.register_autograd(_dora_backward, setup_context=_dora_setup_context)


# ------------------------------------------------------------------------------------------- public entry


def _check_dora_inputs(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training):
    caller = "dora_linear"
    out_features, in_features = functional._check_x_and_weight(
        caller, x, weight, "lora_A, lora_B, magnitude and bias are trained"
    )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        functional._check_side_dtype(caller, name, t, x)
        functional._check_same_device(caller, name, t.device, x)
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"{caller}: lora_A must be (r, in_features) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{caller}: lora_A has shape {tuple(lora_A.shape)}, expected ({r}, {in_features})")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{caller}: lora_B has shape {tuple(lora_B.shape)}, expected ({out_features}, {r})")
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"{caller}: magnitude has shape {tuple(magnitude.shape)}, expected ({out_features},)")
    functional._check_bias(caller, x, bias, out_features)
    functional._check_real(caller, "scaling", scaling, "a Python number (alpha / r)")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"{caller}: scaling must be finite, got {scaling}")
    functional._check_real(caller, "dropout_p", dropout_p, "a probability in [0, 1)")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"{caller}: training must be True or False, got {training!r}")


def dora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA linear layer over a frozen weight, as PEFT's ``use_dora=True`` computes it (module docstring).

    Args:
        x: (..., K) input, bf16 / fp16 / fp32 (fp64 on the reference backend). Any strides.
        weight: frozen W, an ``NF4Weight`` (N, K) or a dense (N, K) tensor in x's dtype that does not require grad.
        lora_A: (r, K), lora_B: (N, r), magnitude: (N,) (PEFT's ``lora_magnitude_vector``), each in x's dtype
            or fp32.
        scaling: s (α/r, or α/√r with rsLoRA). bias: optional (N,) in x's dtype or fp32.
        dropout_p: LoRA dropout, active only when ``training`` (PEFT's formula with the dropped input then applies).
        backend: "auto", "triton", "reference" (and "cpu" where built), as for ``lora_linear``.
    Returns:
        y: (..., N) in x's dtype (autocast is turned off inside, as in ``lora_linear``). Gradients flow to x,
        lora_A, lora_B, magnitude and bias; the row norms are detached (no gradient), W is frozen.

    Example:
        >>> import torch, fused_lora as fl
        >>> W = fl.quantize_nf4(torch.randn(80, 64))
        >>> A, B = torch.randn(8, 64, requires_grad=True), torch.randn(80, 8, requires_grad=True)
        >>> mag = fl.dora.row_squares(W).sqrt().requires_grad_(True)
        >>> fl.dora.dora_linear(torch.randn(2, 5, 64), W, A, B, mag, scaling=2.0).shape
        torch.Size([2, 5, 80])
    """
    _check_dora_inputs(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training)
    dropout_p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None  # as lora_linear's
    leading, in_features = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, in_features)
    chosen = functional._choose_backend(backend, x2d, weight, lora_A, lora_B, bias, dropout_p, caller="dora_linear")
    keep_z = magnitude.requires_grad and torch.is_grad_enabled()  # z (M×N) is kept only for dmag
    with functional._autocast_off(x2d.device):
        y = _dora_op(x2d, *functional._weight_args(weight), lora_A, lora_B, magnitude, bias, seed, float(scaling),
                     dropout_p, chosen, keep_z)[0]
    return y.reshape(*leading, y.shape[-1])
