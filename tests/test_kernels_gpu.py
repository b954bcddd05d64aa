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
    _assert_outputs_match_reference(lora, 31337, p, (x, w_compute, A, B, b, g), (y, u) + grads, dtype)


def _assert_outputs_match_reference(lora, seed, p, inputs, outputs, dtype):
    """outputs = (y, u, dx, dA, dB, db) of the kernels for inputs = (x, w_compute, A, B, b, g), with the dropout mask
    of ``seed``, against the float64 reference by the tolerance rule (plain PyTorch in ``dtype`` beside it)."""
    x = inputs[0]
    m = lora.dropout_mask(seed, x.shape[0], x.shape[1], p, "cuda") if p > 0 else None
    ref = _reference(*inputs, None if m is None else m.double(), lambda t: t.double())
    plain = _reference(*inputs, None if m is None else m.to(dtype), lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "u", "dx", "dA", "dB", "db"), outputs, plain, ref):
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


def _peak_extra_bytes(run, reset=None):
    """(peak bytes allocated by run() beyond those allocated before it, run's result).

    run() is called once first to autotune: the tuning benchmarks allocate scratch buffers that are not part of the
    layer. reset(), if given, runs between the two calls (e.g. to free gradients the warm-up accumulated).
    """
    run()
    if reset is not None:
        reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


# the two paths of a training-size call (forced by bench.paths.forced_thresholds), and the memory each may add to its
# outputs: the large path its workspace (strategy.Thresholds.workspace_bytes)
TRAINING_PATHS = ("middle", "large")


def _forced(path: str):
    from fused_lora.bench.paths import forced_thresholds
    from fused_lora.kernels import strategy

    return strategy.use_thresholds(**forced_thresholds(path))


def _margin(path: str) -> int:
    from fused_lora.kernels import strategy

    return 8 * 2**20 + (strategy.thresholds("cuda").workspace_bytes if path == "large" else 0)


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_peak_memory_of_one_layer_is_the_unavoidable_tensors(path):
    """Forward + backward of one NF4 layer allocates y, u, v, dx and the adapter gradients (and on the large path
    its bounded workspace), and nothing of the size of the weight: a bf16 dequantized W (N·K·2 bytes = 112 MiB
    here) would exceed the margin."""
    M, K, N, r = 2048, 4096, 14336, 16
    x, weight, _, A, B, _, g = _layer(M, K, N, r, torch.bfloat16, "nf4-dq", bias=False, seed=0)
    lora = _kernels()

    def layer():
        y, u = lora.forward(x, weight, A, B, SCALING, None, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, False)
        return y, u, grads

    with _forced(path):
        extra, outputs = _peak_extra_bytes(layer)
    bf16, fp32 = 2, 4
    unavoidable = M * N * bf16 + M * K * bf16 + 2 * M * r * fp32 + (r * K + N * r) * fp32  # y, dx, u, v, dA, dB
    margin = _margin(path)
    assert extra <= unavoidable + margin, (
        f"peak extra memory {extra / 2**20:.1f} MiB > unavoidable {unavoidable / 2**20:.1f} MiB + "
        f"{margin / 2**20:.0f} MiB (a bf16 copy of W would be {N * K * bf16 / 2**20:.0f} MiB)"
    )
    del outputs


# ---------------------------------------------------------------- the frozen layer alone (frozen_linear)


def _frozen_run_and_check(M, K, N, dtype, base, bias):
    from fused_lora.functional import frozen_linear

    x, weight, w_compute, _, _, b, g = _layer(M, K, N, 4, dtype, base, bias, seed=M + K + N + 1)
    leaves = [x.clone().requires_grad_(True)] + ([b.clone().requires_grad_(True)] if bias else [])
    y = frozen_linear(leaves[0], weight, leaves[1] if bias else None, backend="triton")
    grads = torch.autograd.grad(y, leaves, g)

    def plain_torch(cast):
        copies = [cast(t).detach().requires_grad_(True) for t in leaves]
        out = torch.nn.functional.linear(copies[0], cast(w_compute), copies[1] if bias else None)
        return (out,) + torch.autograd.grad(out, copies, cast(g))

    ref, plain = plain_torch(lambda t: t.double()), plain_torch(lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "dx", "db"), (y,) + grads, plain, ref):
        assert_close_to_reference(name, ours, plain_t, ref_t, dtype)


@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_frozen_linear_llama3_8b_matches_reference(dtype, base):
    _frozen_run_and_check(2048, 4096, 14336, dtype, base, bias=True)


@pytest.mark.parametrize("M, K, N", [(1, 4096, 4096), (37, 192, 200), (129, 4160, 1000), (17, 65, 37)],
                         ids=lambda v: str(v))
def test_frozen_linear_ragged_bf16_matches_reference(M, K, N):
    _frozen_run_and_check(M, K, N, torch.bfloat16, "nf4-dq", bias=True)


@pytest.mark.parametrize("K, blocksize", [(4096, 64), (4160, 128)], ids=["row-scales", "flat-index"])
def test_nf4_gemms_dequantize_bit_exactly_like_nf4weight(K, blocksize):
    """x = I and g = I make every output one dequantized weight times 1 (fp32, IEEE dots), so y = deq(W)ᵀ and
    dx = deq(W) bit for bit. A double-quant scale contracted into an FMA (enable_fp_fusion left on) is 1 ulp off
    bitsandbytes' multiply-then-add for some blocks and fails this."""
    N = 1024
    gen = torch.Generator(device="cuda").manual_seed(K)
    weight = fl.quantize_nf4(torch.randn(N, K, device="cuda", generator=gen), blocksize=blocksize, double_quant=True)
    dense = weight.dequantize(torch.float32)
    lora = _kernels()
    assert torch.equal(lora.frozen_forward(torch.eye(K, device="cuda"), weight, None), dense.t())
    assert torch.equal(lora.frozen_backward(torch.eye(N, device="cuda"), weight, True, False)[0], dense)


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_peak_memory_of_frozen_linear_stays_below_a_bf16_copy_of_w(path):
    """frozen_linear forward + backward over an NF4 W (4096×14336) allocates y, dx and db only (and on the large
    path its bounded workspace): the dequantize + matmul path it replaces would allocate a bf16 W (112 MiB) on top
    of them."""
    from fused_lora.functional import frozen_linear

    M, K, N = 2048, 4096, 14336
    x, weight, _, _, _, b, g = _layer(M, K, N, 4, torch.bfloat16, "nf4-dq", bias=True, seed=1)
    x.requires_grad_(True)
    b.requires_grad_(True)

    def layer():
        y = frozen_linear(x, weight, b, backend="triton")
        y.backward(g)
        return y

    def forget_grads():
        x.grad = b.grad = None

    with _forced(path):
        extra, y = _peak_extra_bytes(layer, reset=forget_grads)
    bf16, fp32 = 2, 4
    w_bf16 = N * K * bf16
    unavoidable = M * N * bf16 + M * K * bf16 + N * (fp32 + bf16)  # y, dx, db (fp32, then in the bias dtype)
    assert extra < w_bf16, f"peak extra memory {extra / 2**20:.1f} MiB ≥ a bf16 copy of W ({w_bf16 / 2**20:.0f} MiB)"
    assert extra <= unavoidable + _margin(path), (
        f"peak extra memory {extra / 2**20:.1f} MiB > unavoidable {unavoidable / 2**20:.1f} MiB + "
        f"{_margin(path) / 2**20:.0f} MiB"
    )
    del y
