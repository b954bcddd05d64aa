"""The AdamW update arithmetic in plain PyTorch: the CPU path of the optimizers, the path of backend="reference",
and the oracle of the Triton kernels in fused_lora/kernels/adamw.py.

Three update kinds (:class:`UpdateKind`), each reproducing a reference implementation op for op:

* ``TORCH32``: torch.optim.AdamW's single-tensor update (PagedAdamW), fp32 state exp_avg / exp_avg_sq.
* ``BNB32``: bitsandbytes' 32-bit AdamW (the 8-bit optimizers' tensors below min_8bit_size), fp32 state1 / state2.
* ``BNB8``: bitsandbytes' blockwise 8-bit AdamW, uint8 state1 / state2 with absmax1 / absmax2 and maps qmap1 / qmap2
  (dequantize, update, requantize with fused_lora.codec).

The per-tensor scalars of a step are an :class:`AdamWScalars` (fused_lora/kernels/adamw_scalars.py, the column
order of the kernels' scalar table), computed by :func:`adamw_scalars`.
"""

from __future__ import annotations

import enum
import math

from ..codec import dequantize_blockwise, quantize_blockwise
from ..kernels.adamw_scalars import AdamWScalars

__all__ = [
    "AdamWScalars",
    "UpdateKind",
    "adamw_scalars",
    "torch_adamw32_",
    "bnb_adamw32_",
    "bnb_adamw8bit_",
    "reference_update_",
]


class UpdateKind(enum.Enum):
    """Which reference update a parameter's state follows (see the module docstring)."""

    TORCH32 = "torch32"
    BNB32 = "bnb32"
    BNB8 = "bnb8"

    @property
    def moments(self) -> tuple[str, str]:
        """The state keys of the first and second moment."""
        return ("exp_avg", "exp_avg_sq") if self is UpdateKind.TORCH32 else ("state1", "state2")

    @property
    def bnb_order(self) -> bool:
        """Whether the 32-bit kernel takes bitsandbytes' op order (its BNB_ORDER constexpr)."""
        return self is not UpdateKind.TORCH32


def adamw_scalars(kind: UpdateKind, lr: float, group: dict, step: int) -> AdamWScalars:
    """The scalars of one tensor's update at ``step`` (float64 here; the kernels round them to fp32).

    lr is group["lr"] read once per group (it may be a tensor, and reading a CUDA tensor synchronizes).
    """
    (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
    c1 = 1 - beta1**step
    decay = 1 - lr * wd if wd != 0 else 1.0
    moments = (beta1, 1 - beta1, beta2, 1 - beta2, decay)
    if kind is UpdateKind.TORCH32:
        return AdamWScalars(*moments, step_scale=-(lr / c1), c2=(1 - beta2**step) ** 0.5, eps=eps)
    c2 = math.sqrt(1 - beta2**step)
    if kind is UpdateKind.BNB32:
        return AdamWScalars(*moments, step_scale=-lr * c2 / c1, c2=c2, eps=eps * c2)
    return AdamWScalars(*moments, step_scale=-lr / c1, c2=c2, eps=eps)


def torch_adamw32_(p, g, exp_avg, exp_avg_sq, scalars: AdamWScalars):
    """torch.optim.AdamW's single-tensor update (same ops in the same order, so fp32 results are bit-identical)."""
    s = scalars
    p32 = p.float()
    p32.mul_(s.decay)
    exp_avg.lerp_(g.float(), s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(g.float(), g.float(), value=s.one_minus_beta2)
    p32.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / s.c2).add_(s.eps), value=s.step_scale)
    if p32 is not p:
        p.copy_(p32)


def bnb_adamw32_(p, g, state1, state2, scalars: AdamWScalars):
    """bitsandbytes' 32-bit AdamW update (its CPU implementation's op order; scalars.eps holds eps·c2)."""
    s = scalars
    g32, p32 = g.float(), p.float()
    state1.mul_(s.beta1).add_(g32, alpha=s.one_minus_beta1)
    state2.mul_(s.beta2).addcmul_(g32, g32, value=s.one_minus_beta2)
    p32.mul_(s.decay)
    p32.add_(state1 / (state2.sqrt() + s.eps), alpha=s.step_scale)
    if p32 is not p:
        p.copy_(p32)


def bnb_adamw8bit_(p, g, state: dict, scalars: AdamWScalars, luts=(None, None)):
    """bitsandbytes' blockwise 8-bit AdamW update: dequantize, update, requantize (its CPU op order).

    state holds state1/state2 (uint8), absmax1/absmax2, qmap1/qmap2; luts are the maps' quantization_lut
    (fused_lora.codec; built per call when None).
    """
    s = scalars
    m = dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"])
    v = dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"])
    g32, p32 = g.float(), p.float()
    m.mul_(s.beta1).add_(g32, alpha=s.one_minus_beta1)
    v.mul_(s.beta2).addcmul_(g32, g32, value=s.one_minus_beta2)
    denom = (v.sqrt() / s.c2).add_(s.eps)
    p32.mul_(s.decay)
    p32.addcdiv_(m, denom, value=s.step_scale)
    if p32 is not p:
        p.copy_(p32)
    for name, x, code, lut in (("1", m, state["qmap1"], luts[0]), ("2", v, state["qmap2"], luts[1])):
        q, absmax = quantize_blockwise(x, code, lut)
        state["state" + name].copy_(q)
        state["absmax" + name].copy_(absmax)


def reference_update_(kind: UpdateKind, p, g, state: dict, scalars: AdamWScalars, luts=(None, None)):
    """One parameter's update of ``kind`` in PyTorch, in place (p and its state)."""
    if kind is UpdateKind.BNB8:
        bnb_adamw8bit_(p, g, state, scalars, luts)
    elif kind is UpdateKind.BNB32:
        bnb_adamw32_(p, g, state["state1"], state["state2"], scalars)
    else:
        torch_adamw32_(p, g, state["exp_avg"], state["exp_avg_sq"], scalars)
