"""Element offsets past 2³¹ in views of huge tensors, under the CPU interpreter (on the Triton kernels) and on the CPU
backend: a kernel that computed such an offset in int32 would wrap and read another row or column (silently wrong,
or a fault on a GPU).

The big tensors are torch.empty of about 4.3 GB of address space in fp16, of which the tests touch a few pages: the
kernels read only the rows or columns of the view. Each result must equal, bit for bit, the same call on a
contiguous copy of the view.
"""

import pytest
import torch

import fused_lora as fl

pytestmark = pytest.mark.usefixtures("interpret_triton")

SCALING = 2.0
INT32_MAX = 2**31 - 1


@pytest.fixture(params=["triton", "cpu"])
def lora(request):
    if request.param == "cpu":
        from fused_lora import cpu

        return cpu
    from fused_lora.kernels import lora

    return lora


def _huge_view(shape, strides, gen):
    """A (rows, cols) fp16 view with the given strides over a fresh torch.empty buffer just large enough, filled
    with random values (only the view's elements are written)."""
    size = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    assert size > INT32_MAX
    view = torch.empty(size, dtype=torch.float16).as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=gen).half())
    return view


def _adapters(K, N, r, gen):
    return torch.randn(r, K, generator=gen) * 0.1, torch.randn(N, r, generator=gen) * 0.1


def _assert_same_outputs(lora, calls):
    """Runs forward and backward for each (x2d, weight, A, B, g) in ``calls`` (two); all six outputs bit-equal."""
    outputs = []
    for x2d, weight, A, B, g in calls:
        y, u = lora.forward(x2d, weight, A, B, SCALING, None, 0.0, 0)
        outputs.append((y, u, *lora.backward(g, x2d, weight, A, B, SCALING, 0.0, 0, u, True, True, True, True)))
    for name, got, want in zip(("y", "u", "dx", "dA", "dB", "db"), *outputs):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_rows_of_x_past_int32_at_decode_size(lora, base):
    """x = one token of each of 16 long sequences: row 15 starts past 2³¹ elements. The decode backward reads x for
    dA; the forward reads it for y and u."""
    M, K, N, r = 16, 64, 40, 4
    gen = torch.Generator().manual_seed(0)
    row_stride = INT32_MAX // (M - 1) + 64
    x = _huge_view((M, K), (row_stride, 1), gen)
    W = torch.randn(N, K, generator=gen)
    weight = fl.quantize_nf4(W, blocksize=64) if base == "nf4" else W.half()
    A, B = _adapters(K, N, r, gen)
    g = torch.randn(M, N, generator=gen).half()
    _assert_same_outputs(lora, [(x, weight, A, B, g), (x.contiguous(), weight, A, B, g)])


def test_columns_of_a_dense_w_past_int32(lora):
    """W = a transposed view whose column stride puts column 63 past 2³¹ elements (as W = Wt.t() of a (K, N) weight
    with a huge N)."""
    M, K, N, r = 5, 64, 8, 4
    gen = torch.Generator().manual_seed(1)
    W = _huge_view((N, K), (1, INT32_MAX // (K - 1) + 8), gen)
    x = torch.randn(M, K, generator=gen).half()
    A, B = _adapters(K, N, r, gen)
    g = torch.randn(M, N, generator=gen).half()
    _assert_same_outputs(lora, [(x, W, A, B, g), (x, W.contiguous(), A, B, g)])
