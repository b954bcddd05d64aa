"""The fused Triton kernels (fused_lora/kernels/lora.py) against fused_lora/reference.py in float64, under the CPU interpreter.

Every case checks y, u, dx, dA, dB and db with DESIGN's tolerance rule (kernel error ≤ 2 × plain PyTorch error in
the same dtype + atol), on ragged shapes that cross tile borders, with outputs poisoned with NaN (poison_empty).
bf16 is GPU-only (tests/test_kernels_gpu.py): the interpreter cannot compute it.
"""

import warnings

import pytest
import torch

import fused_lora as fl
from fused_lora import reference
from fused_lora.testing import assert_close_to_reference, relative_error

pytestmark = pytest.mark.usefixtures("interpret_triton")

SCALING = 2.0


def _kernels():
    from fused_lora.kernels import lora

    return lora


@pytest.fixture(params=["triton", "cpu"])
def lora(request):
    """The backend module under test: the cases below marked with this fixture run on the Triton kernels
    (interpreted) and on the CPU backend (fused_lora/cpu.py), which has the same protocol."""
    if request.param == "cpu":
        from fused_lora import cpu

        return cpu
    return _kernels()


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` calls ``record(grid, kwargs)``, then launches
    the real kernel."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record(grid, kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _make_case(M, K, N, r, dtype, base, adapter_dtype, bias, layout, blocksize, seed):
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        x = torch.randn(K, M, generator=gen).to(dtype).t()
    elif layout == "sliced":
        x = torch.randn(M, K + 24, generator=gen).to(dtype)[:, 5 : 5 + K]
    elif layout == "3d":
        x = torch.randn(3, M // 3, K, generator=gen).to(dtype).reshape(-1, K)
    else:
        x = torch.randn(M, K, generator=gen).to(dtype)
    w_dense = torch.randn(N, K, generator=gen) / K**0.5
    if base == "dense":
        weight = w_dense.to(dtype)
        w_compute = weight
    else:
        weight = fl.quantize_nf4(w_dense.to(dtype), blocksize=blocksize, double_quant=base == "nf4-dq")
        w_compute = weight.dequantize(dtype)
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(adapter_dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    g = torch.randn(M, N, generator=gen).to(dtype)
    return x, weight, w_compute, A, B, b, g


def _reference(x, w_compute, A, B, b, g, m, dtype_of=lambda t: t.double()):
    f = dtype_of
    y, u = reference.lora_forward(f(x), f(w_compute), f(A), f(B), SCALING, None if b is None else f(b), m)
    grads = reference.lora_backward(
        f(g), f(x), f(w_compute), f(A), f(B), SCALING, u, m, need_db=b is not None
    )
    return (y, u) + tuple(grads)


CASES = [
    # (M, K, N, r, dtype, base, adapter dtype, bias, dropout p, x layout, NF4 blocksize)
    (1, 64, 80, 4, torch.float32, "nf4-dq", torch.float32, False, 0.0, "contiguous", 64),
    (37, 192, 80, 8, torch.float16, "nf4-dq", torch.float32, True, 0.1, "contiguous", 64),
    (37, 192, 80, 4, torch.float16, "nf4", torch.float16, False, 0.0, "transposed", 64),
    (129, 64, 200, 16, torch.float16, "dense", torch.float16, True, 0.0, "contiguous", 64),
    (37, 64, 200, 16, torch.float32, "dense", torch.float32, False, 0.25, "sliced", 64),
    (39, 192, 80, 8, torch.float32, "nf4-dq", torch.float32, True, 0.0, "3d", 128),
    (129, 64, 80, 8, torch.float16, "nf4-dq", torch.float32, False, 0.5, "3d", 64),
    (17, 65, 37, 1, torch.float32, "nf4-dq", torch.float32, True, 0.0, "contiguous", 64),
    (20, 48, 40, 100, torch.float32, "nf4", torch.float32, False, 0.1, "contiguous", 32),
    (33, 70, 50, 5, torch.float16, "dense", torch.float32, True, 0.3, "transposed", 64),
]


def _case_id(case):
    M, K, N, r, dtype, base, adapter, bias, p, layout, bs = case
    parts = [f"M{M}", f"K{K}", f"N{N}", f"r{r}", str(dtype).replace("torch.float", "fp"), base]
    if base != "dense":
        parts.append(f"bs{bs}")
    if adapter != dtype:
        parts.append("adapters-fp32")
    parts += (["bias"] if bias else []) + ([f"dropout{p}"] if p else []) + ([layout] if layout != "contiguous" else [])
    return "-".join(parts)


def _check_all(kernel_out, x, w_compute, A, B, b, g, m, dtype):
    """Assert the tolerance rule for y, u, dx, dA, dB (and db) against the float64 reference."""
    ref = _reference(x, w_compute, A, B, b, g, None if m is None else m.double())
    plain = _reference(x, w_compute, A, B, b, g, None if m is None else m.to(dtype), dtype_of=lambda t: t)
    names = ("y", "u", "dx", "dA", "dB", "db")
    for name, ours, plain_t, ref_t in zip(names, kernel_out, plain, ref):
        if ref_t is None:
            assert ours is None, f"{name} was not requested but was returned"
            continue
        assert_close_to_reference(name, ours, plain_t, ref_t, dtype)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_and_backward_match_reference(lora, case, poison_empty):
    M, K, N, r, dtype, base, adapter_dtype, bias, p, layout, blocksize = case
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, adapter_dtype, bias, layout, blocksize, M)
    assert lora.unsupported_reason(x, weight, A, B, b, p) is None
    seed = 1000 + M
    y, u = lora.forward(x, weight, A, B, SCALING, b, p, seed)
    assert y.dtype == dtype and u.dtype == torch.float32 and y.shape == (M, N) and u.shape == (M, r)
    dx, dA, dB, db = lora.backward(g, x, weight, A, B, SCALING, p, seed, u, True, True, True, b is not None)
    assert dx.dtype == dtype and dA.dtype == A.dtype and dB.dtype == B.dtype
    assert db is None or db.dtype == torch.float32
    m = lora.dropout_mask(seed, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u, dx, dA, dB, db), x, w_compute, A, B, b, g, m, dtype)


@pytest.mark.parametrize("block_k, blocksize", [(64, 32), (128, 32)], ids=["BK64-bs32", "BK128-bs32"])
def test_several_nf4_blocks_per_tile_row(block_k, blocksize, monkeypatch, poison_empty):
    """Tiles wider than the NF4 block decode one absmax per (row, block) and broadcast it (forward and dx)."""
    from fused_lora.kernels import autotune

    monkeypatch.setitem(autotune.INTERPRETER_CONFIG, "BLOCK_K", block_k)
    x, weight, w_compute, A, B, b, g = _make_case(
        21, 256, 48, 8, torch.float32, "nf4-dq", torch.float32, True, "contiguous", blocksize, 3
    )
    lora = _kernels()
    y, u = lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)
    grads = lora.backward(g, x, weight, A, B, SCALING, 0.0, 0, u, True, True, True, True)
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, None, torch.float32)


@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, False, False), (False, False, True, True), (False, True, True, False)],
    ids=["dx-only", "dA-only", "dB-db-only", "dA-dB"],
)
def test_backward_computes_exactly_the_requested_gradients(lora, needs, poison_empty):
    x, weight, w_compute, A, B, b, g = _make_case(
        37, 64, 80, 8, torch.float32, "nf4-dq", torch.float32, True, "contiguous", 64, 5
    )
    y, u = lora.forward(x, weight, A, B, SCALING, b, 0.2, 77)
    grads = lora.backward(g, x, weight, A, B, SCALING, 0.2, 77, u, *needs)
    m = lora.dropout_mask(77, 37, 64, 0.2, "cpu").double()
    ref = _reference(x, w_compute, A, B, b, g, m)[2:]
    for name, need, ours, ref_t in zip(("dx", "dA", "dB", "db"), needs, grads, ref):
        if need:
            assert relative_error(ours, ref_t) < 1e-5, name
        else:
            assert ours is None, f"{name} was not requested but was returned"


def test_dropout_mask_is_the_one_the_kernels_use_in_forward_and_backward(lora, poison_empty):
    """u (forward) and dA (backward) both see m⊙x: they match the reference only with the materialised mask, and
    both differ from the reference under a mask drawn from another seed."""
    x, weight, w_compute, A, B, b, g = _make_case(
        37, 64, 80, 8, torch.float32, "dense", torch.float32, False, "contiguous", 64, 9
    )
    y, u = lora.forward(x, weight, A, B, SCALING, None, 0.3, 4242)
    dx, dA, _, _ = lora.backward(g, x, weight, A, B, SCALING, 0.3, 4242, u, True, True, False, False)
    same = _reference(x, w_compute, A, B, None, g, lora.dropout_mask(4242, 37, 64, 0.3, "cpu").double())
    other = _reference(x, w_compute, A, B, None, g, lora.dropout_mask(4243, 37, 64, 0.3, "cpu").double())
    for name, ours, i in (("u", u, 1), ("dx", dx, 2), ("dA", dA, 3)):
        assert relative_error(ours, same[i]) < 1e-5, name
        assert relative_error(ours, other[i]) > 1e-2, name


def test_dropout_mask_values_rate_and_determinism(lora):
    m = lora.dropout_mask(7, 129, 200, 0.25, "cpu")
    assert m.shape == (129, 200) and m.dtype == torch.float32
    assert torch.equal(m.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((m == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(m, lora.dropout_mask(7, 129, 200, 0.25, "cpu"))
    assert not torch.equal(m, lora.dropout_mask(8, 129, 200, 0.25, "cpu"))
    assert torch.equal(lora.dropout_mask(7, 5, 6, 0.0, "cpu"), torch.ones(5, 6))


def test_empty_batch(poison_empty):
    x, weight, _, A, B, b, _ = _make_case(3, 64, 80, 8, torch.float32, "nf4-dq", torch.float32, True, "contiguous", 64, 1)
    lora = _kernels()
    y, u = lora.forward(x[:0], weight, A, B, SCALING, b, 0.0, 0)
    assert y.shape == (0, 80) and u.shape == (0, 8)
    dx, dA, dB, db = lora.backward(y, x[:0], weight, A, B, SCALING, 0.0, 0, u, True, True, True, True)
    assert dx.shape == (0, 64)
    assert torch.equal(dA, torch.zeros(8, 64)) and torch.equal(dB, torch.zeros(80, 8)) and torch.equal(db, torch.zeros(80))


def _supported_inputs():
    x, weight, _, A, B, b, _ = _make_case(4, 64, 80, 8, torch.float16, "nf4-dq", torch.float32, True, "contiguous", 64, 2)
    return {"x2d": x, "weight": weight, "A": A, "B": B, "bias": b, "dropout_p": 0.1}


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda a: a, None),
        (lambda a: a.update(A=torch.randn(300, 64), B=torch.randn(80, 300)), "r=300"),
        (lambda a: a.update(x2d=a["x2d"].double()), "float64"),
        (lambda a: a.update(x2d=a["x2d"].bfloat16()), "bfloat16 under the Triton CPU interpreter"),
        (lambda a: a.update(weight=torch.randn(80, 64)), "dense weight dtype torch.float32"),
        (lambda a: a.update(A=a["A"].bfloat16()), "lora_A dtype torch.bfloat16"),
        (lambda a: a.update(bias=a["bias"].double()), "bias dtype torch.float64"),
        (lambda a: a.update(dropout_p=1.0), "dropout_p=1.0"),
    ],
    ids=["supported", "rank-300", "fp64-x", "bf16-interpreter", "dense-weight-dtype", "bf16-A-with-fp16-x",
         "fp64-bias", "dropout-1"],
)
def test_unsupported_reason_names_the_case(change, reason):
    args = _supported_inputs()
    change(args)
    got = _kernels().unsupported_reason(**args)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_cpu_tensors_without_interpreter_are_unsupported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    got = _kernels().unsupported_reason(**_supported_inputs())
    assert got is not None and "CUDA" in got


def test_lora_linear_uses_the_kernels_for_3d_input(poison_empty):
    from fused_lora.functional import lora_linear

    x, W, w_compute, A, B, b, _ = _make_case(39, 64, 80, 8, torch.float32, "dense", torch.float32, True, "3d", 64, 4)
    x3 = x.reshape(3, 13, 64).clone().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (A, B, b)]
    y = lora_linear(x3, W, *leaves[:2], SCALING, bias=leaves[2], backend="triton")
    assert y.shape == (3, 13, 80)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x3, *leaves], g)
    ref = _reference(x, w_compute, A, B, b, g.reshape(39, 80), None)
    assert relative_error(y.reshape(39, 80), ref[0]) < 1e-5
    for name, ours, ref_t in zip(("dx", "dA", "dB", "db"), grads, ref[2:]):
        assert relative_error(ours.reshape(ref_t.shape), ref_t) < 1e-5, name


# ---------------------------------------------------------------- the frozen layer alone (HAS_LORA=False)


FROZEN_CASES = [
    # (M, K, N, dtype, base, bias, x layout, NF4 blocksize)
    (37, 192, 80, torch.float32, "nf4-dq", True, "contiguous", 64),
    (129, 65, 37, torch.float16, "nf4-dq", False, "transposed", 64),
    (20, 96, 40, torch.float16, "nf4", True, "contiguous", 32),
    (1, 64, 80, torch.float32, "nf4", True, "contiguous", 128),
    (33, 70, 50, torch.float16, "dense", True, "sliced", 64),
    (39, 64, 200, torch.float32, "dense", False, "3d", 64),
]


def _frozen_case_id(case):
    M, K, N, dtype, base, bias, layout, bs = case
    parts = [f"M{M}", f"K{K}", f"N{N}", str(dtype).replace("torch.float", "fp"), base]
    parts += ([f"bs{bs}"] if base != "dense" else []) + (["bias"] if bias else [])
    return "-".join(parts + ([layout] if layout != "contiguous" else []))


def _frozen_reference(x, w_compute, b, g, cast):
    """(y, dx, db) of the frozen layer in plain PyTorch on ``cast`` copies (float64: the reference)."""
    y = cast(x) @ cast(w_compute).t()
    if b is not None:
        y = y + cast(b)
    dx = cast(g) @ cast(w_compute)
    db = cast(g).to(torch.promote_types(cast(g).dtype, torch.float32)).sum(0) if b is not None else None
    return y, dx, db


@pytest.mark.parametrize("case", FROZEN_CASES, ids=[_frozen_case_id(c) for c in FROZEN_CASES])
def test_frozen_forward_and_backward_match_reference(lora, case, poison_empty):
    M, K, N, dtype, base, bias, layout, blocksize = case
    x, weight, w_compute, _, _, b, g = _make_case(M, K, N, 4, dtype, base, dtype, bias, layout, blocksize, M + 7)
    assert lora.unsupported_reason(x, weight, None, None, b, 0.0) is None
    y = lora.frozen_forward(x, weight, b)
    assert y.dtype == dtype and y.shape == (M, N)
    dx, db = lora.frozen_backward(g, weight, True, b is not None)
    assert dx.dtype == dtype and dx.shape == (M, K) and (db is None or db.dtype == torch.float32)
    ref = _frozen_reference(x, w_compute, b, g, lambda t: t.double())
    plain = _frozen_reference(x, w_compute, b, g, lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "dx", "db"), (y, dx, db), plain, ref):
        if ref_t is None:
            assert ours is None, f"{name} was not requested but was returned"
        else:
            assert_close_to_reference(name, ours, plain_t, ref_t, dtype)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["dx-only", "db-only"])
def test_frozen_backward_computes_exactly_the_requested_gradients(lora, needs, poison_empty):
    x, weight, w_compute, _, _, b, g = _make_case(
        37, 64, 80, 4, torch.float32, "nf4-dq", torch.float32, True, "contiguous", 64, 6
    )
    dx, db = lora.frozen_backward(g, weight, *needs)
    _, dx_ref, db_ref = _frozen_reference(x, w_compute, b, g, lambda t: t.double())
    for name, need, ours, ref_t in (("dx", needs[0], dx, dx_ref), ("db", needs[1], db, db_ref)):
        if need:
            assert relative_error(ours, ref_t) < 1e-5, name
        else:
            assert ours is None, f"{name} was not requested but was returned"


@pytest.mark.parametrize("K, blocksize", [(192, 64), (65, 64)], ids=["row-scales-K192", "flat-index-K65"])
def test_frozen_gemms_dequantize_bit_exactly_like_nf4weight(K, blocksize, poison_empty):
    """With x = I and g = I every output element is one dequantized weight times 1 (fp32, IEEE dots), so y = deq(W)ᵀ
    and dx = deq(W) must equal NF4Weight.dequantize bit for bit (double-quant scale included)."""
    N = 80
    weight = fl.quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(K)), blocksize=blocksize)
    dense = weight.dequantize(torch.float32)
    lora = _kernels()
    assert torch.equal(lora.frozen_forward(torch.eye(K), weight, None), dense.t())
    assert torch.equal(lora.frozen_backward(torch.eye(N), weight, True, False)[0], dense)


def test_strided_bias_is_added_element_for_element(poison_empty):
    """A bias that is a strided view (every other element of a buffer) must add b[n], not buffer[n]."""
    x, weight, w_compute, A, B, _, _ = _make_case(9, 64, 40, 4, torch.float32, "dense", torch.float32, False,
                                                  "contiguous", 64, 12)
    bias = torch.randn(80, generator=torch.Generator().manual_seed(1))[::2]
    lora = _kernels()
    assert lora.unsupported_reason(x, weight, A, B, bias, 0.0) is None
    y, u = lora.forward(x, weight, A, B, SCALING, bias, 0.0, 0)
    y_ref, _ = reference.lora_forward(x.double(), w_compute.double(), A.double(), B.double(), SCALING, bias.double())
    assert relative_error(y, y_ref) < 1e-5
    frozen_ref = x.double() @ w_compute.double().t() + bias.double()
    assert relative_error(lora.frozen_forward(x, weight, bias), frozen_ref) < 1e-5
    from fused_lora.kernels import strategy

    # ... and on the middle path with its forward split over K (the split epilogue reads the bias)
    with strategy.use_thresholds(decode_max_m=0, large_min_m=10**9, split_k_min_steps=1):
        assert relative_error(lora.forward(x, weight, A, B, SCALING, bias, 0.0, 0)[0], y_ref) < 1e-5
        assert relative_error(lora.frozen_forward(x, weight, bias), frozen_ref) < 1e-5


def test_gemms_read_strided_nf4_tables_correctly_and_refuse_strided_or_misaligned_packed_bytes(poison_empty):
    """code, nested_code, nested_absmax and offset may be strided views: the GEMMs must decode W as
    NF4Weight.dequantize does (bit for bit with x = I). Strided packed bytes are W-sized, and a GPU reads them as
    int32 words: strided or misaligned packed bytes are reported unsupported."""
    K, N = 64, 40
    weight = fl.quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(2)), blocksize=64)

    def strided(t):
        buffer = torch.zeros(t.numel(), 3, dtype=t.dtype)
        buffer[:, 1] = t.reshape(-1)
        return buffer[:, 1].view(t.shape) if t.dim() else buffer[0, 1]

    fields = weight._tensors()
    tables = {name: strided(fields[name]) for name in ("code", "offset", "nested_absmax", "nested_code")}
    w_tables = fl.NF4Weight(shape=weight.shape, dtype=weight.dtype, blocksize=64, **{**fields, **tables})
    lora = _kernels()
    eye = torch.eye(K)
    assert lora.unsupported_reason(eye, w_tables, None, None, None, 0.0) is None
    assert torch.equal(lora.frozen_forward(eye, w_tables, None), weight.dequantize(torch.float32).t())
    w_packed = fl.NF4Weight(shape=weight.shape, dtype=weight.dtype, blocksize=64,
                            **{**fields, "packed": strided(fields["packed"])})
    assert "not contiguous" in lora.unsupported_reason(eye, w_packed, None, None, None, 0.0)
    # contiguous but one byte past a 4-byte boundary: the GPU reads the bytes as int32 words, so it is refused
    shifted = torch.empty(fields["packed"].numel() + 1, dtype=torch.uint8)[1:].view(fields["packed"].shape)
    shifted.copy_(fields["packed"])
    w_shifted = fl.NF4Weight(shape=weight.shape, dtype=weight.dtype, blocksize=64, **{**fields, "packed": shifted})
    assert shifted.is_contiguous() and torch.equal(w_shifted.dequantize(), weight.dequantize())
    assert "4-byte boundary" in lora.unsupported_reason(eye, w_shifted, None, None, None, 0.0)


def test_nf4_gemms_are_compiled_without_fp_contraction(monkeypatch):
    """Every GEMM launch over an NF4 W asks for enable_fp_fusion=False (the double-quant scale must round like
    bitsandbytes: a multiply, then an add; see lora_fwd.py), every dense launch for True. The interpreter ignores
    the option, so this checks what reaches the launch; tests/test_kernels_gpu.py checks the bits on a GPU."""
    from fused_lora.kernels import common

    lora = _kernels()
    launches = []
    real_gemm = common.gemm

    def recording_gemm(kernel, *args, **kwargs):
        launcher, meta = real_gemm(kernel, *args, **kwargs)
        record = lambda grid, kw: launches.append((kw["IS_NF4"], kw["enable_fp_fusion"]))  # noqa: E731
        return LaunchRecorder(launcher, record), meta

    monkeypatch.setattr(common, "gemm", recording_gemm)
    for base in ("nf4-dq", "dense"):
        x, weight, _, A, B, b, g = _make_case(17, 64, 40, 4, torch.float32, base, torch.float32, True, "contiguous",
                                               64, 1)
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)
        lora.backward(g, x, weight, A, B, SCALING, 0.0, 0, u, True, True, True, True)
        lora.frozen_forward(x, weight, b)
        lora.frozen_backward(g, weight, True, True)
    assert launches == [(True, False)] * 4 + [(False, True)] * 4


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda a: a, None),
        (lambda a: a.update(x2d=a["x2d"].bfloat16()), "bfloat16 under the Triton CPU interpreter"),
        (lambda a: a.update(weight=torch.randn(80, 64)), "dense weight dtype torch.float32"),
        (lambda a: a.update(bias=a["bias"].double()), "bias dtype torch.float64"),
        (lambda a: a.update(bias=a["bias"].to("meta")), "bias is on meta"),
    ],
    ids=["supported", "bf16-interpreter", "dense-weight-dtype", "fp64-bias", "bias-device"],
)
def test_unsupported_reason_of_the_frozen_layer_names_the_case(change, reason):
    args = _supported_inputs()
    args.update(A=None, B=None, dropout_p=0.0)
    change(args)
    got = _kernels().unsupported_reason(**args)
    assert got is None if reason is None else (got is not None and reason in got), got


@pytest.mark.parametrize("state", ["disabled-nf4", "disabled-dense", "merged-nf4", "merged-nf4-to-dense"])
def test_layer_without_its_lora_term_runs_the_kernels_without_dequantizing_w(state, monkeypatch):
    """FusedLoraLinear(backend="triton") with the adapter disabled or merged: no fallback warning, no call of
    NF4Weight.dequantize (no N×K copy of W), and y, dx, db as on the reference backend."""
    torch.manual_seed(5)
    layer = fl.FusedLoraLinear(64, 40, r=4, bias=True, quant=None if state == "disabled-dense" else "nf4",
                               compute_dtype=torch.float32, backend="reference")
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    layer.bias.requires_grad_(True)
    if state.startswith("merged"):
        layer.merge(requantize=state == "merged-nf4")
    else:
        layer.enable_adapters(False)
    x = torch.randn(3, 7, 64)
    g = torch.randn(3, 7, 40)

    def run():
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        return (y,) + torch.autograd.grad(y, (xs, layer.bias), g)

    expected = run()
    layer.backend = "triton"
    monkeypatch.setattr(fl.NF4Weight, "dequantize", lambda *args, **kwargs: pytest.fail("W was dequantized"))
    monkeypatch.setattr(fl._common, "_warned", set())  # a reason warned by an earlier test would warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference would warn
        got = run()
    for name, ours, ref in zip(("y", "dx", "db"), got, expected):
        assert relative_error(ours, ref) < 1e-5, name


# ---------------------------------------------------------------- NaN / inf


NONFINITE_CASES = [
    # (operand poisoned, value, base, dropout p)
    ("x", float("inf"), "dense", 0.3),
    ("x", float("nan"), "nf4-dq", 0.0),
    ("g", float("-inf"), "nf4-dq", 0.3),
    ("A", float("inf"), "nf4", 0.0),
    ("B", float("nan"), "dense", 0.3),
    ("bias", float("-inf"), "nf4-dq", 0.0),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-p{c[3]}")
def test_nan_and_inf_reach_the_same_outputs_as_in_the_reference(lora, case):
    """Each of y, u, dx, dA, dB, db has NaN, +inf and −inf exactly where the fp32 reference has them (masked tile
    padding must not turn inf·0 into NaN in a real element, nor hide one)."""
    name, value, base, p = case
    x, weight, w_compute, A, B, b, g = _make_case(19, 40, 37, 3, torch.float32, base, torch.float32, True,
                                                  "contiguous", 32, 11)
    poisoned = {"x": x, "g": g, "A": A, "B": B, "bias": b}[name]
    poisoned.view(-1)[[2, poisoned.numel() // 2]] = value
    y, u = lora.forward(x, weight, A, B, SCALING, b, p, 99)
    ours = (y, u) + lora.backward(g, x, weight, A, B, SCALING, p, 99, u, True, True, True, True)
    m = lora.dropout_mask(99, 19, 40, p, "cpu") if p > 0 else None
    ref = _reference(x, w_compute, A, B, b, g, m, dtype_of=lambda t: t)
    assert not all(torch.isfinite(t).all() for t in ref)
    for out_name, out, ref_t in zip(("y", "u", "dx", "dA", "dB", "db"), ours, ref):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(ref_t)), f"{out_name}: {kind.__name__} differs"



@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("poisoned", ["A", "B", "dropped x"])
def test_the_split_lowrank_path_keeps_inf_and_nan_where_the_reference_has_them(poisoned, monkeypatch):
    """bf16 x on a GPU splits the fp32 low-rank operands into hi + lo (fp16 stands in here, as in
    test_kernels_paths): lo = wide - hi made an inf operand NaN (y or dx NaN where the reference has ±inf), and
    dropout's select gave a dropped inf element 0 where the reference has inf·0 = NaN."""
    from fused_lora.kernels import common, strategy

    lora = _kernels()
    monkeypatch.setattr(common, "SPLIT_DTYPES", (torch.bfloat16, torch.float16))
    torch.manual_seed(0)
    M, K, N, r, p = 19, 64, 40, 4, (0.5 if poisoned == "dropped x" else 0.0)
    x, W, g = torch.randn(M, K).half(), (torch.randn(N, K) / 8).half(), torch.randn(M, N).half()
    A, B = torch.randn(r, K) / 8, torch.randn(N, r) / 2
    if poisoned == "A":
        A[1, 5] = float("inf")
    elif poisoned == "B":
        B[3, 1] = float("inf")
    else:
        dropped = int((lora.dropout_mask(99, M, K, p, "cpu")[0] == 0).nonzero()[0])
        x[0, dropped] = float("inf")
    with strategy.use_thresholds(decode_max_m=0, large_min_m=10**9):  # the middle path
        y, u = lora.forward(x, W, A, B, SCALING, None, p, 99)
        dx = lora.backward(g, x, W, A, B, SCALING, p, 99, u, True, False, False, False)[0]
    m = lora.dropout_mask(99, M, K, p, "cpu").double() if p else None
    y_ref, u_ref = reference.lora_forward(x.double(), W.double(), A.double(), B.double(), SCALING, None, m)
    dx_ref = reference.lora_backward(g.double(), x.double(), W.double(), A.double(), B.double(), SCALING, u_ref,
                                     m)[0]
    for name, out, ref in (("u", u, u_ref), ("y", y, y_ref), ("dx", dx, dx_ref)):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(ref)), f"{name}: {kind.__name__} differs"

def test_fp16_overflow_of_the_intermediate_base_product_stays_finite():
    """The kernels round y once from fp32; the reference rounds x·Wᵀ to fp16 first, so an intermediate 80000 makes
    it inf although y = 80000 − 64000 fits (the documented difference in fused_lora/kernels/lora.py)."""
    x = torch.full((4, 32), 100.0, dtype=torch.float16)
    W = torch.full((16, 32), 25.0, dtype=torch.float16)
    A = torch.ones(2, 32, dtype=torch.float16)
    B = torch.full((16, 2), -5.0, dtype=torch.float16)
    y, _ = _kernels().forward(x, W, A, B, SCALING, None, 0.0, 0)
    assert torch.equal(y, torch.full((4, 16), 16000.0, dtype=torch.float16))
    assert torch.isinf(reference.lora_forward(x, W, A, B, SCALING)[0]).all()


def test_huge_column_strides_are_copied_so_int32_column_offsets_cannot_overflow():
    from fused_lora.kernels.lora import _int32_columns

    transposed = torch.empty_strided((3, 40_000), (1, 60_000), device="meta")  # (K-1)·stride_k > 2**31
    assert _int32_columns(transposed).stride() == (40_000, 1)
    ordinary = torch.empty_strided((60_000, 40_000), (40_000, 1), device="meta")
    assert _int32_columns(ordinary) is ordinary
    small_transposed = torch.empty_strided((37, 64), (1, 37), device="meta")
    assert _int32_columns(small_transposed) is small_transposed
