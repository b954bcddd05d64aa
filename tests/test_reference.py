"""The reference math: explicit backward formulas vs autograd, and gradcheck in float64."""

import pytest
import torch

from fused_lora import reference
from fused_lora.functional import lora_linear

SHAPES = [(1, 64, 80, 4), (37, 192, 200, 8), (129, 64, 80, 16)]


def _ids(shape):
    M, K, N, r = shape
    return f"M{M}-K{K}-N{N}-r{r}"


def _inputs(M, K, N, r, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    A = torch.randn(r, K, generator=g, dtype=dtype) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    return x, W, A, B, b


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_explicit_backward_matches_autograd_of_naive_expression(shape, dropout):
    M, K, N, r = shape
    x, W, A, B, b = _inputs(M, K, N, r)
    s = 1.7
    m = reference.dropout_mask((M, K), dropout, seed=123, device="cpu", dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, b)]
    y_naive = reference.lora_linear_naive(leaves[0], W, leaves[1], leaves[2], s, leaves[3], m)
    g = torch.randn_like(y_naive)
    y_naive.backward(g)

    y, u = reference.lora_forward(x, W, A, B, s, b, m)
    dx, dA, dB, db = reference.lora_backward(g, x, W, A, B, s, u, m, need_db=True)
    torch.testing.assert_close(y, y_naive.detach(), rtol=1e-12, atol=1e-12)
    for name, ours, leaf in zip(("dx", "dA", "dB", "db"), (dx, dA, dB, db), leaves):
        torch.testing.assert_close(ours, leaf.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", [(3, 8, 5, 2), (7, 6, 9, 3)], ids=_ids)
def test_lora_linear_reference_passes_gradcheck_in_float64(shape):
    M, K, N, r = shape
    x, W, A, B, b = _inputs(M, K, N, r)
    inputs = tuple(t.requires_grad_(True) for t in (x, A, B, b))

    def f(x, A, B, b):
        return lora_linear(x.reshape(1, M, K), W, A, B, 0.75, bias=b, backend="reference")

    assert torch.autograd.gradcheck(f, inputs)


def test_dropout_mask_is_deterministic_per_seed_and_scaled():
    m1 = reference.dropout_mask((64, 50), 0.25, seed=7, device="cpu")
    m2 = reference.dropout_mask((64, 50), 0.25, seed=7, device="cpu")
    m3 = reference.dropout_mask((64, 50), 0.25, seed=8, device="cpu")
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    torch.testing.assert_close(m1.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.15 < (m1 == 0).float().mean().item() < 0.35
    assert reference.dropout_mask((4, 4), 0.0, seed=1, device="cpu") is None


def test_scaling_plain_and_rslora():
    assert reference.lora_scaling(16, 32) == 2.0
    assert reference.lora_scaling(16, 32, use_rslora=True) == 8.0


def test_fp16_adapters_keep_da_finite_where_the_exact_value_fits():
    """With fp16 x and fp16 adapters the low-rank path runs in fp32: v·A and vᵀ·x do not overflow fp16 on the way
    (|dA| ~ 1e3 here, while vᵀ·x summed in fp16 would pass 65504)."""
    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 4096, 32, 64, 4
    x = (torch.randn(M, K, generator=gen) * 4).half()
    W = torch.randn(N, K, generator=gen).half() / K**0.5
    A = torch.randn(r, K, generator=gen).half()
    B = torch.randn(N, r, generator=gen).half()
    g = torch.randn(M, N, generator=gen).half()
    y, u = reference.lora_forward(x, W, A, B, 2.0)
    dx, dA, dB, _ = reference.lora_backward(g, x, W, A, B, 2.0, u)
    _, exact_dA, exact_dB, _ = reference.lora_backward(
        g.double(), x.double(), W.double(), A.double(), B.double(), 2.0,
        reference.lora_forward(x.double(), W.double(), A.double(), B.double(), 2.0)[1],
    )  # fmt: skip
    assert u.dtype == torch.float32
    assert exact_dA.abs().max() < 65504 and torch.isfinite(dA).all() and torch.isfinite(dB).all()
    assert torch.allclose(dA.double(), exact_dA, rtol=1e-2, atol=1e-1)


def test_dropout_keep_scale_is_not_rounded_to_the_input_dtype():
    """m⊙x uses 1/(1-p) in fp32 even for bf16 x: with x = 1 and p = 0.1 every kept u-term is 1.1111 (fp32), not
    bf16's 1.109375."""
    x = torch.ones(8, 16, dtype=torch.bfloat16)
    A = torch.zeros(1, 16)
    A[0, 0] = 1.0
    m = reference.dropout_mask((8, 16), 0.1, seed=1, device="cpu")
    _, u = reference.lora_forward(x, torch.zeros(4, 16, dtype=torch.bfloat16), A, torch.zeros(4, 1), 1.0, m=m)
    kept = u[m[:, 0] > 0, 0]
    assert kept.numel() > 0 and torch.all(kept == torch.tensor(1.0 / 0.9, dtype=torch.float32))
