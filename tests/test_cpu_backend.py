"""The "cpu" backend (fused_lora/cpu.py over fused_lora._C's CPU kernels) against the float64 reference.

* The NF4 dequantizer is byte-exact with the reference one (every blocksize, double quantization on and off,
  fp32/fp16/bf16/fp64 outputs, ragged element counts, strided rows, the AVX2 and the portable paths).
* The dropout keep mask is bit-identical to ``reference.dropout_mask`` for the same seed.
* ``lora_linear`` / ``frozen_linear`` on backend="cpu": the output and every gradient (dx, dA, dB, db) meet the
  tolerance rule of docs/DESIGN.md against the float64 reference, on odd shapes, ranks 1-64, 3-D and strided x,
  fp32/fp16/bf16 x with adapters in fp32 or x's dtype, bias, dropout, NF4 (several blocksizes, with and without
  double quantization) and dense weights; the GEMMs in fp32 over half-precision values (AVX2 machines) and in x's
  own dtype (machines with native half GEMMs) both; plus a seeded fuzz over random cases.
* Backend selection: "auto" picks "cpu" for CPU tensors, falls back to the reference with one warning without the
  extension; "cpu" without the extension or on CUDA tensors is a clear error.
"""

import random
import warnings

import pytest
import torch

import fused_lora as fl
from fused_lora import _common, _ext, backend, cpu, functional, reference
from fused_lora.nf4 import BLOCKSIZES
from fused_lora.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(backend.cpu_kernels_error() is not None, reason="fused_lora._C is not built")

SCALING = 2.0
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(params=["avx2", "portable"])
def kernel_path(request):
    """Run a test on the AVX2 paths of the C++ kernels and on the portable ones."""
    C = _ext.load()
    if request.param == "avx2" and not C.cpu_has_avx2():
        pytest.skip("this CPU has no AVX2")
    previous = C.cpu_use_avx2(request.param == "avx2")
    yield request.param
    C.cpu_use_avx2(previous)


@pytest.fixture(params=["fp32-gemm", "native-gemm"])
def gemm_mode(request, monkeypatch):
    """bf16/fp16 GEMMs in fp32 over the half-precision values (AVX2 machines) or in x's own dtype (machines with
    native half GEMMs; forced here whatever this CPU has)."""
    if request.param == "native-gemm":
        monkeypatch.setattr(cpu, "_native_half_gemm", lambda dtype: True)
    else:
        monkeypatch.setattr(cpu, "_native_half_gemm", lambda dtype: False)
    return request.param


# ------------------------------------------------------------------------------------------------- NF4 decode


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_dequantize_is_byte_exact_with_the_reference(blocksize, double_quant, kernel_path):
    gen = torch.Generator().manual_seed(blocksize)
    for shape in [(37, 129), (1, 1), (3, 5), (17, 4097), (2, 8192 + 7)]:
        weight = torch.randn(shape, generator=gen)
        w = fl.quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant, backend="reference")
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            ours = fl.dequantize_nf4(w, dtype, backend="cpu")
            expected = fl.dequantize_nf4(w, dtype, backend="reference")
            assert ours.shape == expected.shape and ours.dtype == dtype
            assert torch.equal(ours.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), (shape, dtype)


@pytest.mark.parametrize("round_to", [torch.bfloat16, torch.float16])
def test_dequantize_into_strided_rows_rounds_through_the_half_dtype(round_to, kernel_path):
    """Rows written with a row stride (the untouched columns stay NaN); an fp32 output holding exactly the values of
    a bf16/fp16 dequantize (what the fp32 GEMM over half-precision weights uses)."""
    w = fl.quantize_nf4(torch.randn(37, 65), blocksize=64, double_quant=True)
    out = torch.full((37, 70), float("nan"))
    cpu.dequantize_into(out[:, :65], w, round_to=round_to)
    assert torch.equal(out[:, :65], w.dequantize(round_to, backend="reference").float())
    assert torch.isnan(out[:, 65:]).all()


def test_auto_dequantize_runs_the_cpu_kernel(monkeypatch):
    calls = []
    real = cpu.dequantize_nf4
    monkeypatch.setattr(cpu, "dequantize_nf4", lambda w, dtype: calls.append(dtype) or real(w, dtype))
    monkeypatch.delenv(backend.BACKEND_ENV_VAR, raising=False)
    w = fl.quantize_nf4(torch.randn(8, 64))
    assert torch.equal(w.dequantize(torch.bfloat16), w.dequantize(torch.bfloat16, backend="reference"))
    assert calls == [torch.bfloat16]


# ------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("shape", [(1, 1), (1, 624), (3, 625), (37, 65), (129, 200), (2, 3001)])
def test_dropout_mask_is_the_reference_mask(shape, kernel_path):
    """Bit-identical keep pattern and values: torch's mt19937 draws, block by block of 624 words."""
    for p in (1e-7, 0.05, 0.25, 1 / 3, 0.5, 0.9, 0.999999):
        for seed in (0, 7, 2**31 - 2):
            expected = reference.dropout_mask(shape, p, seed, "cpu")
            assert torch.equal(cpu.dropout_mask(seed, *shape, p), expected), (p, seed)


# ------------------------------------------------------------------------------------------------- the layer


def _layer_inputs(M, K, N, r, dtype, adapter_dtype, base, blocksize, bias, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = (3, M // 3) if layout == "3d" else (M,)
    if layout == "transposed":
        x = torch.randn(K, M, generator=gen).to(dtype).t()
    elif layout == "sliced":
        x = torch.randn(M, K + 9, generator=gen).to(dtype)[:, 4: 4 + K]
    else:
        x = torch.randn(*lead, K, generator=gen).to(dtype)
    w_dense = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    if base == "dense":
        weight = w_dense
    else:
        weight = fl.quantize_nf4(w_dense, blocksize=blocksize, double_quant=base == "nf4-dq")
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(adapter_dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    g = torch.randn(*x.shape[:-1], N, generator=gen).to(dtype)
    return x, weight, A, B, b, g


def _grads(fn, x, A, B, b, g):
    """(y, dx, dA, dB, db) of fn(x, A, B, b) for the upstream gradient g, through autograd."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, A, B, b)]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, g))
    return (y.detach(),) + tuple(None if t is None else next(grads) for t in leaves)


def _check_layer(x, weight, A, B, b, g, p, dtype, seed=1234):
    """lora_linear on backend="cpu" against the float64 reference (and plain PyTorch in x's dtype for the bound)."""
    w_compute = weight.dequantize(dtype) if isinstance(weight, fl.NF4Weight) else weight
    K = x.shape[-1]
    M = x.numel() // K

    def ours_fn(x_, A_, B_, b_):
        torch.manual_seed(seed)  # lora_linear draws the dropout seed from torch's generator
        return fl.functional.lora_linear(x_, weight, A_, B_, SCALING, bias=b_, dropout_p=p, backend="cpu")

    torch.manual_seed(seed)
    drawn = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0
    m = reference.dropout_mask((M, K), p, drawn, "cpu")  # the mask of that seed

    def ref_fn(cast, mask):
        def fn(x_, A_, B_, b_):
            x2 = x_.reshape(-1, K)
            y = reference.lora_linear_naive(x2, cast(w_compute), A_, B_, SCALING, b_, mask)
            return y.reshape(*x_.shape[:-1], y.shape[-1])
        return fn

    def cast(t, to):
        return None if t is None else t.to(to)

    ours = _grads(ours_fn, x, A, B, b, g)
    ref = _grads(ref_fn(lambda t: t.double(), None if m is None else m.double()),
                 *(cast(t, torch.float64) for t in (x, A, B, b, g)))
    plain = _grads(ref_fn(lambda t: t, None if m is None else m.to(dtype)), x, A, B, b, g)
    dtypes = (x.dtype, x.dtype, A.dtype, B.dtype, None if b is None else b.dtype)
    for name, o, pl, rf, expected_dtype in zip(("y", "dx", "dA", "dB", "db"), ours, plain, ref, dtypes):
        if rf is None:
            assert o is None, name
            continue
        assert o.dtype == expected_dtype, name
        assert_close_to_reference(name, o, pl, rf, dtype)


LAYER_CASES = [
    # (M, K, N, r, dtype, adapter dtype, base, blocksize, bias, dropout p, x layout)
    (1, 64, 80, 4, torch.float32, torch.float32, "nf4-dq", 64, False, 0.0, "contiguous"),
    (37, 192, 200, 16, torch.float32, torch.float32, "nf4-dq", 64, True, 0.1, "contiguous"),
    (129, 65, 37, 1, torch.float32, torch.float32, "nf4", 32, True, 0.0, "transposed"),
    (39, 129, 70, 64, torch.float32, torch.float32, "dense", 64, False, 0.3, "3d"),
    (37, 192, 80, 8, torch.bfloat16, torch.float32, "nf4-dq", 64, True, 0.05, "contiguous"),
    (129, 200, 37, 16, torch.bfloat16, torch.bfloat16, "nf4", 128, False, 0.0, "sliced"),
    (1, 65, 37, 4, torch.bfloat16, torch.float32, "dense", 64, True, 0.0, "contiguous"),
    (37, 70, 50, 4, torch.float16, torch.float32, "nf4-dq", 256, True, 0.2, "3d"),
    (129, 64, 200, 64, torch.float16, torch.float16, "dense", 64, False, 0.0, "transposed"),
    (33, 4100, 20, 16, torch.float32, torch.float32, "nf4-dq", 4096, True, 0.0, "contiguous"),
]


def _layer_id(case):
    M, K, N, r, dtype, adapter, base, bs, bias, p, layout = case
    parts = [f"M{M}", f"K{K}", f"N{N}", f"r{r}", str(dtype).replace("torch.", ""), base]
    parts += [f"bs{bs}"] if base != "dense" else []
    parts += ["adapters-fp32"] if adapter != dtype else []
    parts += (["bias"] if bias else []) + ([f"p{p}"] if p else []) + ([layout] if layout != "contiguous" else [])
    return "-".join(parts)


@pytest.mark.parametrize("case", LAYER_CASES, ids=[_layer_id(c) for c in LAYER_CASES])
def test_lora_linear_matches_the_float64_reference(case, gemm_mode, poison_empty):
    M, K, N, r, dtype, adapter_dtype, base, blocksize, bias, p, layout = case
    if gemm_mode == "native-gemm" and dtype not in HALF:
        pytest.skip("the GEMM dtype differs from fp32 only for half-precision x")
    x, weight, A, B, b, g = _layer_inputs(M, K, N, r, dtype, adapter_dtype, base, blocksize, bias, layout, seed=M + K)
    _check_layer(x, weight, A, B, b, g, p, dtype)


def test_fuzz_random_cases_match_the_float64_reference(poison_empty):
    """40 random cases (seeded): shapes 1-300, ranks 1-64, every dtype pairing, NF4 or dense, bias, dropout,
    layouts."""
    rng = random.Random(2024)
    for _ in range(40):
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        case = (
            rng.choice([1, 2, 3, 17, 37, 64, 129, 300]), rng.choice([1, 16, 31, 64, 65, 192, 257]),
            rng.choice([1, 5, 37, 80, 200]), rng.choice([1, 2, 4, 16, 64]), dtype,
            rng.choice([dtype, torch.float32]), rng.choice(["nf4-dq", "nf4", "dense"]), rng.choice([32, 64, 128]),
            rng.random() < 0.5, rng.choice([0.0, 0.0, 0.05, 0.5]), rng.choice(["contiguous", "transposed", "sliced"]),
        )
        M, K, N, r, dtype, adapter_dtype, base, blocksize, bias, p, layout = case
        x, weight, A, B, b, g = _layer_inputs(M, K, N, r, dtype, adapter_dtype, base, blocksize, bias, layout,
                                              seed=rng.randrange(10**6))  # fmt: skip
        try:
            _check_layer(x, weight, A, B, b, g, p, dtype, seed=rng.randrange(10**6))
        except AssertionError as error:
            raise AssertionError(f"fuzz case {_layer_id(case)}: {error}") from None


FROZEN_CASES = [
    # (M, K, N, dtype, base, bias, x layout)
    (37, 192, 80, torch.float32, "nf4-dq", True, "contiguous"),
    (129, 65, 37, torch.bfloat16, "nf4", False, "transposed"),
    (1, 64, 200, torch.float16, "nf4-dq", True, "contiguous"),
    (39, 70, 50, torch.bfloat16, "dense", True, "3d"),
]


@pytest.mark.parametrize("case", FROZEN_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_frozen_linear_matches_the_float64_reference(case, gemm_mode, poison_empty):
    M, K, N, dtype, base, bias, layout = case
    x, weight, _, _, b, g = _layer_inputs(M, K, N, 4, dtype, dtype, base, 64, bias, layout, seed=M)
    w_compute = weight.dequantize(dtype) if base != "dense" else weight

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors if t is not None]
        y = fn(*leaves)
        return (y.detach(),) + torch.autograd.grad(y, leaves, g.to(y.dtype))

    ours = run(lambda x_, *b_: fl.functional.frozen_linear(x_, weight, b_[0] if b_ else None, backend="cpu"), x, b)

    def naive(cast):
        return lambda x_, *b_: torch.nn.functional.linear(x_, cast(w_compute), b_[0] if b_ else None)

    ref = run(naive(lambda t: t.double()), x.double(), None if b is None else b.double())
    plain = run(naive(lambda t: t), x, b)
    for name, o, pl, rf in zip(("y", "dx", "db"), ours, plain, ref):
        assert o.dtype == pl.dtype, name
        assert_close_to_reference(name, o, pl, rf, dtype)


def test_backward_returns_exactly_the_requested_gradients(poison_empty):
    x, weight, A, B, b, g = _layer_inputs(37, 64, 80, 8, torch.bfloat16, torch.float32, "nf4-dq", 64, True,
                                          "contiguous", seed=5)  # fmt: skip
    y, u = cpu.forward(x, weight, A, B, SCALING, b, 0.2, 77)
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    every = cpu.backward(g, x, weight, A, B, SCALING, 0.2, 77, u, True, True, True, True)
    for needs in [(True, False, False, False), (False, True, False, False), (False, False, True, True)]:
        grads = cpu.backward(g, x, weight, A, B, SCALING, 0.2, 77, u, *needs)
        for need, ours, full in zip(needs, grads, every):
            assert (ours is None) != need
            if need:
                assert torch.equal(ours, full)


def _large_allocations(fn, threshold_bytes: int) -> list[int]:
    """Sizes of the CPU allocations of at least ``threshold_bytes`` made while ``fn`` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= threshold_bytes]


def test_fp32_layer_has_no_M_by_N_temporary():
    """fp32 x, NF4 W, dropout: the only M×N allocation of forward and backward is y itself (the GEMM writes it,
    the bias and the low-rank term are added in place); dx, m⊙x, v·A are at most M×K, W is N×K."""
    M, K, N = 256, 96, 200
    x, weight, A, B, b, g = _layer_inputs(M, K, N, 8, torch.float32, torch.float32, "nf4-dq", 64, True,
                                          "contiguous", seed=3)  # fmt: skip
    out = {}

    def forward():
        out["y"], out["u"] = cpu.forward(x, weight, A, B, SCALING, b, 0.1, 5)

    assert _large_allocations(forward, M * N * 4) == [M * N * 4]
    backward = lambda: cpu.backward(g, x, weight, A, B, SCALING, 0.1, 5, out["u"], True, True, True, True)  # noqa
    assert _large_allocations(backward, M * N * 4) == []


# ------------------------------------------------------------------------------------------------- selection


def test_auto_selects_the_cpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_ENV_VAR, raising=False)
    calls = []
    real = cpu.forward
    monkeypatch.setattr(cpu, "forward", lambda *args: calls.append(1) or real(*args))
    x, weight, A, B, b, _ = _layer_inputs(5, 64, 40, 4, torch.float32, torch.float32, "nf4-dq", 64, True,
                                          "contiguous", seed=1)  # fmt: skip
    y = fl.functional.lora_linear(x, weight, A, B, SCALING, bias=b)
    assert calls == [1]
    torch.testing.assert_close(y, fl.functional.lora_linear(x, weight, A, B, SCALING, bias=b, backend="reference"))
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "reference")
    fl.functional.lora_linear(x, weight, A, B, SCALING, bias=b)
    assert calls == [1], "FUSED_LORA_BACKEND=reference forces the reference"
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "cpu")
    assert backend.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_auto_falls_back_to_the_reference_with_one_warning_without_the_extension(monkeypatch):
    x, weight, A, B, _, _ = _layer_inputs(5, 64, 40, 4, torch.float32, torch.float32, "nf4", 64, False,
                                          "contiguous", seed=2)  # fmt: skip
    monkeypatch.delenv(backend.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "cpu_kernels_error", lambda: "the compiled extension is missing (made up here)")
    monkeypatch.setattr(_common, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backend.resolve_backend("auto", torch.device("cpu")) == "reference"
            fl.functional.lora_linear(x, weight, A, B, SCALING)
    messages = [str(w.message) for w in caught if "made up here" in str(w.message)]
    assert len(messages) == 1 and "falling back to the reference backend on the CPU" in messages[0]
    with pytest.raises(RuntimeError, match="backend='cpu' needs the CPU kernels, but the compiled extension"):
        fl.functional.lora_linear(x, weight, A, B, SCALING, backend="cpu")


def test_stale_extension_without_the_cpu_kernels_is_named(monkeypatch):
    class Stale:
        def is_cuda_build(self):
            return False

    monkeypatch.setattr(_ext, "load", lambda: Stale())
    monkeypatch.setattr(_ext, "is_available", lambda: True)
    problem = backend.cpu_kernels_error()
    assert "stale build without nf4_dequantize_into" in problem and "pip install --no-build-isolation" in problem


def test_cpu_backend_on_other_devices_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cpu' got cuda tensors"):
        backend.resolve_backend("cpu", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend='cpu' got meta tensors"):
        backend.resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown backend 'cpus'"):
        backend.resolve_backend("cpus", torch.device("cpu"))


def test_empty_weight_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(_common, "_warned", set())
    x = torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match=r"the 'cpu' backend cannot run this call \(empty weight: 0 output"):
        y = fl.functional.frozen_linear(x, torch.randn(0, 8), backend="cpu")
    assert y.shape == (4, 0)
