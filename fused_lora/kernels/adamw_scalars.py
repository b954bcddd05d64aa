"""The per-tensor scalars of the AdamW update: one row of the fused kernels' fp32 scalar table per tensor, its
columns in the order of :class:`AdamWScalars`' fields (the one home of that order; kernels/adamw.py builds its table
and reads its rows by it). Triton-free, so the PyTorch update path (fused_lora/optim/update.py) imports it without
Triton."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["AdamWScalars"]


class AdamWScalars(NamedTuple):
    """One tensor's update scalars for step t (computed in float64 on the host; the kernels round them to fp32).

    With b1, b2 the betas, c1 = 1 - b1^t, c2 = sqrt(1 - b2^t):
        beta1, one_minus_beta1, beta2, one_minus_beta2: b1, 1 - b1, b2, 1 - b2
        decay:       1 - lr·wd (exactly 1.0 when wd is 0)
        step_scale:  -lr/c1 (torch.optim.AdamW and bitsandbytes' 8-bit update), -lr·c2/c1 (bitsandbytes' 32-bit)
        c2:          the divisor of sqrt(v) (unused by bitsandbytes' 32-bit update)
        eps:         eps, or eps·c2 in bitsandbytes' 32-bit update
    """

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float
    step_scale: float
    c2: float
    eps: float
