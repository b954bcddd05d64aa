"""lora_linear: argument checks, backend selection, fallback, dtypes and dropout on the reference backend."""

import math
import warnings

import pytest
import torch

import fused_lora as fl
from fused_lora import _common, functional, reference
from fused_lora.functional import lora_linear
from fused_lora.testing import assert_close_to_reference


def _layer(M=37, K=64, N=80, r=8, dtype=torch.float32, adapter_dtype=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype).requires_grad_(True)
    B = torch.randn(N, r, generator=g).to(adapter_dtype).requires_grad_(True)
    b = torch.randn(N, generator=g).to(dtype).requires_grad_(True) if bias else None
    return x, W, A, B, b


def _grads(y, leaves):
    g = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, g)
    return g, grads


DTYPE_CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
               (torch.float16, True)]


@pytest.mark.parametrize(
    "dtype, adapter_fp32", DTYPE_CASES,
    ids=[f"{str(d)[6:]}-adapters-{'fp32' if a else 'compute'}" for d, a in DTYPE_CASES],
)
def test_reference_backend_matches_float64_math_in_every_dtype(dtype, adapter_fp32):
    x, W, A, B, b = _layer(dtype=dtype, adapter_dtype=torch.float32 if adapter_fp32 else dtype, bias=True)
    x = x.reshape(1, 37, 64).requires_grad_(True)
    y = lora_linear(x, W, A, B, 2.0, bias=b, backend="reference")
    assert y.shape == (1, 37, 80) and y.dtype == dtype
    g, grads = _grads(y, (x, A, B, b))
    assert grads[1].dtype == A.dtype and grads[2].dtype == B.dtype and grads[3].dtype == b.dtype

    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B, b)]
    y64 = reference.lora_linear_naive(leaves64[0], W.double(), leaves64[1], leaves64[2], 2.0, leaves64[3])
    ref_grads = torch.autograd.grad(y64, leaves64, g.double())
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, b)]
    y_plain = reference.lora_linear_naive(leaves[0], W, leaves[1], leaves[2], 2.0, leaves[3])
    plain_grads = torch.autograd.grad(y_plain, leaves, g)
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for name, ours, plain, ref in zip(("dx", "dA", "dB", "db"), grads, plain_grads, ref_grads):
        assert_close_to_reference(name, ours, plain, ref, dtype)


def test_nf4_weight_equals_dequantized_dense_weight():
    x, W, A, B, _ = _layer()
    w4 = fl.quantize_nf4(W)
    y4 = lora_linear(x, w4, A, B, 1.5, backend="reference")
    y = lora_linear(x, w4.dequantize(torch.float32), A, B, 1.5, backend="reference")
    torch.testing.assert_close(y4, y, rtol=0, atol=0)


def test_any_leading_dims_and_noncontiguous_input():
    x, W, A, B, _ = _layer(M=6 * 7)
    x3 = x.reshape(6, 7, 64)
    y3 = lora_linear(x3, W, A, B, 2.0, backend="reference")
    assert y3.shape == (6, 7, 80)
    x_t = x3.transpose(0, 1)
    assert not x_t.is_contiguous()
    torch.testing.assert_close(lora_linear(x_t, W, A, B, 2.0, backend="reference"), y3.transpose(0, 1))


def test_dropout_mask_is_regenerated_in_backward_not_stored():
    x, W, A, B, _ = _layer()
    torch.manual_seed(11)
    y = lora_linear(x, W, A, B, 2.0, dropout_p=0.4, training=True, backend="reference")
    g, (dA,) = _grads(y, (A,))
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    m = reference.dropout_mask(x.shape, 0.4, seed, "cpu")
    y_ref, u = reference.lora_forward(x, W, A.detach(), B.detach(), 2.0, None, m)
    _, dA_ref, _, _ = reference.lora_backward(g, x, W, A.detach(), B.detach(), 2.0, u, m)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dA, dA_ref)


def test_dropout_is_off_in_eval_and_changes_output_in_training():
    x, W, A, B, _ = _layer()
    y_eval = lora_linear(x, W, A, B, 2.0, dropout_p=0.5, training=False, backend="reference")
    y_plain = lora_linear(x, W, A, B, 2.0, backend="reference")
    torch.testing.assert_close(y_eval, y_plain, rtol=0, atol=0)
    y_train = lora_linear(x, W, A, B, 2.0, dropout_p=0.5, training=True, backend="reference")
    assert not torch.allclose(y_train, y_plain)


def test_nan_and_inf_propagate_as_in_the_reference():
    x, W, A, B, _ = _layer()
    x[3, 5] = float("nan")
    x[7, 1] = float("inf")
    y = lora_linear(x, W, A, B, 2.0, backend="reference")
    y_ref, _ = reference.lora_forward(x, W, A.detach(), B.detach(), 2.0)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y[3]).all()


@pytest.mark.parametrize("layer_fn", ["lora_linear", "frozen_linear"])
def test_second_derivatives_raise_instead_of_being_silently_wrong(layer_fn):
    """u is saved without a graph, so a second derivative through the layer would miss terms (d(dB)/dA through u);
    backward with create_graph=True must raise, naming the function."""
    x, W, A, B, b = _layer(bias=True)
    x.requires_grad_(True)
    if layer_fn == "lora_linear":
        y = lora_linear(x, W, A, B, 2.0, bias=b, backend="reference")
    else:
        y = functional.frozen_linear(x, W, bias=b, backend="reference")
    with pytest.raises(RuntimeError, match=f"{layer_fn}: second derivatives are not supported"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    dx, = torch.autograd.grad(y.pow(2).sum(), x)  # an ordinary backward still works
    assert torch.isfinite(dx).all()


def test_autocast_does_not_change_what_lora_linear_and_frozen_linear_compute():
    """Both functions compute in x's dtype, as the kernels do: an active autocast (forward or backward) must not
    recast the reference backend's matmuls to bf16, nor change the output dtype."""
    x, W, A, B, b = _layer(bias=True, seed=8)
    x.requires_grad_(True)
    g = torch.randn(37, 80)

    def run(fn, leaves):
        y = fn()
        return (y,) + torch.autograd.grad(y, leaves, g)

    cases = {
        "lora_linear": (lambda: lora_linear(x, W, A, B, 2.0, bias=b, backend="reference"), (x, A, B, b)),
        "frozen_linear": (lambda: functional.frozen_linear(x, W, bias=b, backend="reference"), (x, b)),
    }
    for name, (fn, leaves) in cases.items():
        expected = run(fn, leaves)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(fn, leaves)
        for ours, theirs in zip(got, expected):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_dropout_mask(reentrant):
    from torch.utils.checkpoint import checkpoint

    x, W, A, B, _ = _layer(seed=9)
    g = torch.randn(37, 80)

    def run(wrap):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
        torch.manual_seed(21)
        y = wrap(lambda t: lora_linear(t, W, leaves[1], leaves[2], 2.0, dropout_p=0.4, backend="reference"),
                 leaves[0])
        y.backward(g)  # reentrant checkpointing supports .backward() only
        return [y.detach()] + [t.grad for t in leaves]

    checkpointed = run(lambda fn, t: checkpoint(fn, t, use_reentrant=reentrant))
    plain = run(lambda fn, t: fn(t))
    for name, ours, theirs in zip(("y", "dx", "dA", "dB"), checkpointed, plain):
        assert torch.equal(ours, theirs), name


def test_frozen_weight_gets_no_gradient_and_bias_only_when_trainable():
    x, W, A, B, b = _layer(bias=True)
    b.requires_grad_(False)
    y = lora_linear(x, W, A, B, 2.0, bias=b, backend="reference")
    y.sum().backward()
    assert b.grad is None and A.grad is not None and B.grad is not None


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t: t.update(x=t["x"][:, :63]), ValueError, "x has 63 features, expected 64"),
        (lambda t: t.update(x=t["x"].long()), TypeError, "x must be a floating-point tensor"),
        (lambda t: t.update(W=t["W"].half()), TypeError, "weight dtype torch.float16 differs from x dtype"),
        (lambda t: t.update(A=t["A"][:0]), ValueError, "r >= 1"),
        (lambda t: t.update(B=t["B"][:, :3]), ValueError, "lora_B has shape"),
        (lambda t: t.update(A=t["A"].half()), TypeError,
         "lora_A is torch.float16; with x in torch.float32 it must be float32$"),
        (lambda t: t.update(x=t["x"].half(), W=t["W"].half(), B=t["B"].double()), TypeError,
         "lora_B is torch.float64; with x in torch.float16 it must be float16 or float32"),
        (lambda t: t.update(s="2.0"), TypeError, "scaling must be a Python number .* got str"),
        (lambda t: t.update(W="W"), TypeError, "weight must be an NF4Weight or a torch.Tensor, got str"),
        (lambda t: t.update(b=torch.zeros(79)), ValueError, "bias has shape"),
        (lambda t: t.update(p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda t: t.update(s=float("nan")), ValueError, "scaling must be finite"),
        (lambda t: t.update(W=t["W"].clone().requires_grad_(True)), ValueError, "frozen weight requires grad"),
        (lambda t: t.update(backend="cuda"), ValueError, "lora_linear: unknown backend 'cuda'"),
        (lambda t: t.update(A=t["A"].to("meta")), ValueError, "lora_A is on meta but x is on cpu"),
    ],
    ids=["features", "int-x", "weight-dtype", "r0", "B-shape", "A-dtype", "B-dtype-fp16-x", "scaling-str",
         "weight-str", "bias-shape", "p1", "nan-scale", "weight-grad", "backend", "device"],
)
def test_bad_input_raises_a_clear_error(mutate, error, match):
    x, W, A, B, _ = _layer()
    args = {"x": x, "W": W, "A": A, "B": B, "b": None, "p": 0.0, "s": 2.0, "backend": "reference"}
    mutate(args)
    with pytest.raises(error, match=match):
        lora_linear(args["x"], args["W"], args["A"], args["B"], args["s"], bias=args["b"], dropout_p=args["p"],
                    backend=args["backend"])


def test_auto_backend_is_cpu_on_cpu_and_env_var_overrides(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_ENV_VAR, raising=False)
    assert functional.resolve_backend("auto", torch.device("cpu")) == "cpu"  # the extension is built for the tests
    monkeypatch.setenv(functional.BACKEND_ENV_VAR, "reference")
    assert functional.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert functional.resolve_backend("auto", torch.device("cuda")) == "reference"
    assert functional.resolve_backend("triton", torch.device("cpu")) == "triton"  # tests run interpreted
    monkeypatch.setenv(functional.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND: unknown backend 'fast'"):
        functional.resolve_backend("auto", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        functional.resolve_backend("triton", torch.device("cpu"))


def test_unsupported_case_falls_back_to_reference_with_one_warning(monkeypatch):
    from fused_lora.kernels import lora as triton_lora

    monkeypatch.setattr(triton_lora, "unsupported_reason", lambda *args: "a case made up by this test")
    monkeypatch.setattr(_common, "_warned", set())
    x, W, A, B, _ = _layer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = lora_linear(x, W, A, B, 2.0, backend="triton")
        y2 = lora_linear(x, W, A, B, 2.0, backend="triton")
    messages = [str(w.message) for w in caught if "made up" in str(w.message)]
    assert len(messages) == 1 and "using the reference backend" in messages[0]
    torch.testing.assert_close(y1, lora_linear(x, W, A, B, 2.0, backend="reference"), rtol=0, atol=0)
    assert math.isfinite(y2.sum().item())


def test_empty_batch_returns_empty_output():
    x, W, A, B, _ = _layer(M=0)
    y = lora_linear(x.reshape(0, 3, 64)[:, :0], W, A, B, 2.0, backend="auto")
    assert y.shape == (0, 0, 80)


# ---------------------------------------------------------------- frozen_linear (the frozen layer alone)


FROZEN_CASES = [(torch.float32, "dense", True), (torch.float32, "nf4", False), (torch.bfloat16, "nf4", True),
                (torch.float16, "dense", True), (torch.float16, "nf4", True)]


@pytest.mark.parametrize(
    "dtype, base, bias", FROZEN_CASES, ids=[f"{str(d)[6:]}-{w}{'-bias' if b else ''}" for d, w, b in FROZEN_CASES]
)
def test_frozen_linear_matches_float64_math(dtype, base, bias):
    x, W, _, _, b = _layer(M=39, K=129, N=37, dtype=dtype, bias=bias, seed=3)
    weight = fl.quantize_nf4(W, blocksize=64) if base == "nf4" else W
    W_dense = weight.dequantize(dtype) if base == "nf4" else W
    x = x.reshape(3, 13, 129).requires_grad_(True)
    leaves = (x, b) if bias else (x,)
    y = functional.frozen_linear(x, weight, bias=b, backend="reference")
    assert y.shape == (3, 13, 37) and y.dtype == dtype
    g, grads = _grads(y, leaves)
    assert all(grad.dtype == dtype for grad in grads)

    def linear(cast):
        copies = [t.detach().to(cast(t).dtype).requires_grad_(True) for t in leaves]
        bias_copy = copies[1] if bias else None
        out = torch.nn.functional.linear(copies[0], cast(W_dense), bias_copy)
        return out, torch.autograd.grad(out, copies, cast(g))

    y64, ref_grads = linear(lambda t: t.double())
    y_plain, plain_grads = linear(lambda t: t)
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for name, ours, plain, ref in zip(("dx", "db"), grads, plain_grads, ref_grads):
        assert_close_to_reference(name, ours, plain, ref, dtype)


def test_frozen_linear_equals_lora_linear_with_a_zero_adapter():
    """Same rounding as lora_linear's base term: x·Wᵀ in x's dtype, then the bias; dx and db agree exactly."""
    x, W, A, B, b = _layer(bias=True, seed=4)
    x.requires_grad_(True)
    w4 = fl.quantize_nf4(W)
    y = functional.frozen_linear(x, w4, bias=b, backend="reference")
    y_lora = lora_linear(x, w4, A, torch.zeros_like(B), 2.0, bias=b, backend="reference")
    torch.testing.assert_close(y, y_lora, rtol=0, atol=0)
    g = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, (x, b), g), torch.autograd.grad(y_lora, (x, b), g)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_frozen_linear_gives_gradients_only_to_what_requires_them():
    x, W, _, _, b = _layer(bias=True)
    b.requires_grad_(False)
    x.requires_grad_(True)
    functional.frozen_linear(x, fl.quantize_nf4(W), bias=b, backend="reference").sum().backward()
    assert x.grad is not None and b.grad is None
    with torch.no_grad():
        assert not functional.frozen_linear(x, W, bias=b).requires_grad


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t: t.update(x=t["x"][:, :63]), ValueError, "frozen_linear: x has 63 features, expected 64"),
        (lambda t: t.update(x=t["x"].long()), TypeError, "frozen_linear: x must be a floating-point tensor"),
        (lambda t: t.update(W=t["W"].half()), TypeError, "frozen_linear: weight dtype torch.float16 differs"),
        (lambda t: t.update(W=t["W"][0]), ValueError, r"frozen_linear: weight must be 2-D \[out, in\]"),
        (lambda t: t.update(W=t["W"].clone().requires_grad_(True)), ValueError,
         r"frozen_linear: the frozen weight requires grad.*only x and bias get gradients"),
        (lambda t: t.update(b=torch.zeros(79)), ValueError, r"frozen_linear: bias has shape \(79,\), expected \(80,\)"),
        (lambda t: t.update(b=torch.zeros(80, dtype=torch.float64)), TypeError,
         "frozen_linear: bias is torch.float64; with x in torch.float32 it must be float32"),
        (lambda t: t.update(b=torch.zeros(80, device="meta")), ValueError, "frozen_linear: bias is on meta"),
        (lambda t: t.update(backend="cuda"), ValueError, "frozen_linear: unknown backend 'cuda'"),
    ],
    ids=["features", "int-x", "weight-dtype", "weight-1d", "weight-grad", "bias-shape", "bias-dtype", "bias-device",
         "backend"],
)
def test_frozen_linear_bad_input_raises_a_clear_error(mutate, error, match):
    x, W, _, _, _ = _layer()
    args = {"x": x, "W": W, "b": None, "backend": "reference"}
    mutate(args)
    with pytest.raises(error, match=match):
        functional.frozen_linear(args["x"], args["W"], bias=args["b"], backend=args["backend"])


def test_frozen_linear_unsupported_case_falls_back_with_one_warning(monkeypatch):
    from fused_lora.kernels import lora as triton_lora

    monkeypatch.setattr(triton_lora, "unsupported_reason", lambda *args: "a case made up by this test")
    monkeypatch.setattr(_common, "_warned", set())
    x, W, _, _, b = _layer(bias=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = functional.frozen_linear(x, W, b, backend="triton")
        functional.frozen_linear(x, W, b, backend="triton")
    messages = [str(w.message) for w in caught if "made up" in str(w.message)]
    assert messages == ["frozen_linear: the Triton kernels cannot run this call (a case made up by this test); "
                        "using the reference backend"]
    torch.testing.assert_close(y1, functional.frozen_linear(x, W, b, backend="reference"), rtol=0, atol=0)


def test_frozen_linear_empty_batch():
    x, W, _, _, _ = _layer(M=0)
    assert functional.frozen_linear(x.reshape(0, 3, 64)[:, :0], fl.quantize_nf4(W)).shape == (0, 0, 80)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scaling": True}, TypeError, "scaling must be a Python number"),
        ({"dropout_p": "0.5"}, TypeError, "dropout_p must be a probability"),
        ({"training": "no"}, TypeError, "training must be True or False"),
    ],
    ids=["scaling-bool", "dropout-str", "training-str"],
)
def test_lora_linear_refuses_arguments_of_the_wrong_kind(kwargs, error, message):
    x, W = torch.randn(3, 16), torch.randn(8, 16)
    args = {"scaling": 2.0, "dropout_p": 0.0, "training": True, **kwargs}
    with pytest.raises(error, match=message):
        lora_linear(x, W, torch.randn(2, 16), torch.zeros(8, 2), args["scaling"], dropout_p=args["dropout_p"],
                    training=args["training"])


def test_meta_tensors_and_zero_input_features_get_clear_errors():
    with pytest.raises(ValueError, match="meta device"):
        lora_linear(torch.randn(3, 16, device="meta"), torch.randn(8, 16, device="meta"),
                    torch.randn(2, 16, device="meta"), torch.zeros(8, 2, device="meta"), 2.0)
    with pytest.raises(ValueError, match="0 input features"):
        functional.frozen_linear(torch.randn(3, 0), torch.randn(8, 0))
