"""The fused Triton kernels on a CUDA device: bf16 / fp16 / fp32 at Llama-3-8B shapes against the float64
reference (DESIGN's tolerance rule), ragged bf16 shapes, and the peak memory of one layer's forward + backward."""

import pytest
import torch

import fused_lora as fl
from fused_lora import reference
from fused_lora.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

SCALING = 2.0
LLAMA3_8B_KN = [(4096, 4096), (4096, 14336), (14336, 4096)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _kernels():
    from fused_lora.kernels import lora

    return lora


def _layer(M, K, N, r, dtype, base, bias, seed, adapter_dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
    w_dense = (torch.randn(N, K, device="cuda", generator=gen) / K**0.5).to(dtype)
    if base == "dense":
        weight, w_compute = w_dense, w_dense
    else:
        weight = fl.quantize_nf4(w_dense, blocksize=64, double_quant=True)
        w_compute = weight.dequantize(dtype)
    A = (torch.randn(r, K, device="cuda", generator=gen) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device="cuda", generator=gen) / r**0.5).to(adapter_dtype)
    b = torch.randn(N, device="cuda", generator=gen).to(dtype) if bias else None
    g = torch.randn(M, N, device="cuda", generator=gen).to(dtype)
    return x, weight, w_compute, A, B, b, g


def _reference(x, w_compute, A, B, b, g, m, cast):
    y, u = reference.lora_forward(cast(x), cast(w_compute), cast(A), cast(B), SCALING, None if b is None else cast(b), m)
    grads = reference.lora_backward(cast(g), cast(x), cast(w_compute), cast(A), cast(B), SCALING, u, m, need_db=b is not None)
    return (y, u) + tuple(grads)


def _run_and_check(M, K, N, r, dtype, base, bias, p, adapter_dtype=torch.float32, x_transposed=False):
    x, weight, w_compute, A, B, b, g = _layer(M, K, N, r, dtype, base, bias, seed=M + K + N, adapter_dtype=adapter_dtype)
    if x_transposed:
        x = x.t().contiguous().t()
    lora = _kernels()
    assert lora.unsupported_reason(x, weight, A, B, b, p) is None
    y, u = lora.forward(x, weight, A, B, SCALING, b, p, 31337)
    grads = lora.backward(g, x, weight, A, B, SCALING, p, 31337, u, True, True, True, b is not None)
    m = lora.dropout_mask(31337, M, K, p, "cuda") if p > 0 else None
    ref = _reference(x, w_compute, A, B, b, g, None if m is None else m.double(), lambda t: t.double())
    plain = _reference(x, w_compute, A, B, b, g, None if m is None else m.to(dtype), lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "u", "dx", "dA", "dB", "db"), (y, u) + grads, plain, ref):
        if ref_t is not None:
            assert_close_to_reference(name, ours, plain_t, ref_t, dtype)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
@pytest.mark.parametrize("K, N", LLAMA3_8B_KN, ids=[f"K{k}-N{n}" for k, n in LLAMA3_8B_KN])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_llama3_8b_shapes_match_reference(dtype, K, N, base, poison_empty):
    _run_and_check(2048, K, N, 16, dtype, base, bias=False, p=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_llama3_8b_with_dropout_bias_and_compute_dtype_adapters(dtype, poison_empty):
    _run_and_check(2048, 4096, 14336, 16, dtype, "nf4-dq", bias=True, p=0.1, adapter_dtype=dtype)


@pytest.mark.parametrize(
    "M, K, N, r, base",
    [(1, 4096, 4096, 16, "nf4-dq"), (37, 192, 200, 8, "nf4-dq"), (129, 4160, 1000, 64, "nf4-dq"),
     (300, 1000, 333, 256, "dense"), (17, 65, 37, 3, "nf4-dq")],
    ids=lambda v: str(v),
)
def test_ragged_bf16_shapes_match_reference(M, K, N, r, base, poison_empty):
    _run_and_check(M, K, N, r, torch.bfloat16, base, bias=True, p=0.2, x_transposed=True)


def test_peak_memory_of_one_layer_is_the_unavoidable_tensors():
    """Forward + backward of one NF4 layer allocates y, u, v, dx and the adapter gradients, and nothing of the
    size of the weight: a bf16 dequantized W (N·K·2 bytes = 112 MiB here) would exceed the margin many times."""
    M, K, N, r = 2048, 4096, 14336, 16
    x, weight, _, A, B, _, g = _layer(M, K, N, r, torch.bfloat16, "nf4-dq", bias=False, seed=0)
    lora = _kernels()

    def layer():
        y, u = lora.forward(x, weight, A, B, SCALING, None, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, False)
        return y, u, grads

    layer()  # autotune first: its benchmarking allocates scratch buffers that are not part of the layer
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outputs = layer()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    bf16, fp32 = 2, 4
    unavoidable = M * N * bf16 + M * K * bf16 + 2 * M * r * fp32 + (r * K + N * r) * fp32  # y, dx, u, v, dA, dB
    margin = 8 * 2**20
    assert extra <= unavoidable + margin, (
        f"peak extra memory {extra / 2**20:.1f} MiB > unavoidable {unavoidable / 2**20:.1f} MiB + 8 MiB "
        f"(a bf16 copy of W would be {N * K * bf16 / 2**20:.0f} MiB)"
    )
    del outputs
