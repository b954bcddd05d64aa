"""Shared helpers of the optimizer tests (test_optim_*.py): deterministic parameters and gradients, bit-exact
comparison, and the skip marker for a missing fused_lora._C."""

import pytest
import torch

from fused_lora import _ext

SHAPES = {"37x129": (37, 129), "200": (200,), "64x80": (64, 80), "3x7x41": (3, 7, 41)}


def make_params(shapes, dtype=torch.float32):
    return [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(100 + i)).to(dtype))
        for i, s in enumerate(shapes)
    ]


def train(params, opt, steps, seed=0, start=0):
    """`steps` steps with fresh random gradients drawn from (seed, step)."""
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return params


def assert_params_equal(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"parameter {i}: max |diff| {(x - y).abs().max().item():.3e}"


def refuse_nth_allocation(monkeypatch, opt, n: int, message: str = "managed allocation refused"):
    """Make the optimizer's n-th state allocation from now raise RuntimeError(message), as a GPU refuses managed
    memory beyond what is free; returns the real allocation, to set back."""
    real, calls = opt._new_state, []

    def refuse(p, eight_bit):
        calls.append(p)
        if len(calls) == n:
            raise RuntimeError(message)
        return real(p, eight_bit)

    monkeypatch.setattr(opt, "_new_state", refuse)
    return real


needs_ext = pytest.mark.skipif(not _ext.is_available(), reason="fused_lora._C is not built")
