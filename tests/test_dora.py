"""dora_linear (fused_lora/dora.py): the row-norm identity and its cache, output and every gradient against PEFT's
DoRA formula in float64 (dora_linear_naive) on the reference and Triton backends, NF4 and dense, dropout, 3-D
inputs, odd shapes and ranks, fp32/fp16 (bf16 on the reference only: the Triton interpreter cannot compute it)."""

import pytest
import torch
from test_kernels_paths import PATHS  # the strategy thresholds that send every NF4 call down one path

import fused_lora as fl
from fused_lora import dora, reference
from fused_lora.testing import assert_close_to_reference, relative_error

SCALING = 1.7


def _case(M=37, K=70, N=45, r=5, dtype=torch.float32, nf4=False, bias=True, seed=0, adapter_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g) / K**0.5
    weight = fl.quantize_nf4(W) if nf4 else W.to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    B = torch.randn(N, r, generator=g).to(adapter_dtype)
    W_stored = weight.dequantize(torch.float32) if nf4 else weight.float()
    # a magnitude away from the norm, so c != 1 and every DoRA term matters
    mag = (dora.dora_row_norm_naive(W_stored, A.float(), B.float(), SCALING) * (0.5 + torch.rand(N, generator=g)))
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, weight, A, B, mag.to(adapter_dtype), b


def _seeded_mask(call_seed, shape, p, backend="reference"):
    """The mask dora_linear draws after torch.manual_seed(call_seed) (its seed is the first torch.randint): the
    reference's generator, or on the Triton backend the kernels' (Philox), on every path."""
    torch.manual_seed(call_seed)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if backend == "triton":
        from fused_lora.kernels import lora

        return lora.dropout_mask(seed, shape[0], shape[1], p, "cpu")
    return reference.dropout_mask(shape, p, seed, "cpu")


def _run(x, weight, A, B, mag, b, p, backend, leading=None, call_seed=3):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, mag)]
    bias = None if b is None else b.detach().clone().requires_grad_(True)
    xin = leaves[0] if leading is None else leaves[0].reshape(*leading, x.shape[-1])
    torch.manual_seed(call_seed)
    y = dora.dora_linear(xin, weight, leaves[1], leaves[2], leaves[3], SCALING, bias=bias, dropout_p=p,
                         backend=backend)
    return y, leaves + ([bias] if bias is not None else [])


def _oracle(x, weight, A, B, mag, b, m, dtype):
    """PEFT's formula by autograd: in float64 (the reference) and in ``dtype`` (plain PyTorch of the rule)."""
    W = weight.dequantize(dtype) if isinstance(weight, fl.NF4Weight) else weight.to(dtype)
    to = (lambda t: t.detach().to(torch.float64)) if dtype == torch.float64 else (lambda t: t.detach().clone())
    leaves = [to(t).requires_grad_(True) for t in (x, A, B, mag)]
    bias = None if b is None else to(b).requires_grad_(True)
    y = dora.dora_linear_naive(leaves[0], W, leaves[1], leaves[2], SCALING, leaves[3], bias,
                               None if m is None else m.to(torch.float64 if dtype == torch.float64 else torch.float32))
    return y, leaves + ([bias] if bias is not None else [])


def _assert_matches_oracle(x, weight, A, B, mag, b, p, backend, leading=None):
    dtype = x.dtype
    y, leaves = _run(x, weight, A, B, mag, b, p, backend, leading)
    assert y.dtype == dtype and y.shape == (*(leading or (x.shape[0],)), weight.shape[0])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = torch.autograd.grad(y, leaves, g)
    for grad, leaf in zip(grads, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    m = _seeded_mask(3, (x.shape[0], x.shape[1]), p, backend) if p > 0 else None
    y64, leaves64 = _oracle(x, weight, A, B, mag, b, m, torch.float64)
    ref_grads = torch.autograd.grad(y64, leaves64, g.reshape(y64.shape).double())
    y_plain, leaves_plain = _oracle(x, weight, A, B, mag, b, m, dtype)
    plain_grads = torch.autograd.grad(y_plain, leaves_plain, g.reshape(y_plain.shape))
    errors = {"y": assert_close_to_reference("y", y.reshape(y64.shape), y_plain, y64, dtype)}
    for name, ours, plain, ref in zip(("dx", "dA", "dB", "dmag", "db"), grads, plain_grads, ref_grads):
        errors[name] = assert_close_to_reference(name, ours.reshape(ref.shape), plain, ref, dtype)
    return errors


# ------------------------------------------------------------------------------------------- the row norm


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_row_norm_identity_equals_the_materialised_norm(nf4):
    x, weight, A, B, _, _ = _case(nf4=nf4, r=7)
    W = weight.dequantize(torch.float64) if nf4 else weight.double()
    n_identity = dora.dora_row_norm(dora.row_squares(weight, torch.float64), W @ A.double().t(), A.double(),
                                    B.double(), SCALING)
    n_naive = dora.dora_row_norm_naive(W, A.double(), B.double(), SCALING)
    assert relative_error(n_identity, n_naive) < 1e-13
    n32 = dora.dora_row_norm(dora.row_squares(weight), W.float() @ A.t(), A, B, SCALING)
    assert relative_error(n32, n_naive) < 1e-6


def test_row_squares_follow_every_change_of_w():
    """NF4: cached, and recomputed after an in-place change. Dense: computed in every call, so a write through
    ``.data`` (no version bump) is seen too."""
    W = torch.nn.Parameter(torch.randn(45, 70), requires_grad=False)
    first = dora.row_squares(W)
    torch.testing.assert_close(first, W.square().sum(1))
    with torch.no_grad():
        W.mul_(2.0)  # an in-place change (e.g. a dense merge) bumps the version counter
    torch.testing.assert_close(dora.row_squares(W), 4.0 * first)
    version = W._version
    W.data.copy_(3.0 * W.data)  # a checkpoint loader's write: W's own version counter does not move
    assert W._version == version
    torch.testing.assert_close(dora.row_squares(W), 36.0 * first)
    w4 = fl.quantize_nf4(torch.randn(45, 70))
    cached = dora.row_squares(w4)
    assert dora.row_squares(w4) is cached
    w4.packed.copy_(255 - w4.packed)  # every code q -> 15 - q, in place: the packed version counter moves
    changed = w4.dequantize(torch.float32).square().sum(1)
    assert not torch.allclose(changed, cached)
    torch.testing.assert_close(dora.row_squares(w4), changed)
    assert dora.row_squares(w4, torch.float64).dtype == torch.float64


def test_a_dense_dora_layer_sees_a_weight_written_through_data():
    """FusedLoraLinear with DoRA over a dense W: a forward, then W.data.copy_(...) (no version bump), then a forward
    equal to a fresh layer loaded with the same state."""
    torch.manual_seed(0)
    layer = fl.FusedLoraLinear(64, 80, r=4, quant=None, use_dora=True, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    layer(x)
    layer.weight.data.copy_(torch.randn(80, 64))
    fresh = fl.FusedLoraLinear(64, 80, r=4, quant=None, use_dora=True, compute_dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


def test_no_n_by_k_temporary_per_step_on_the_composed_path(monkeypatch, interpret_triton):
    """After the first call (which fills the ‖W_n‖² cache), the NF4 weight is never dequantized again."""
    x, weight, A, B, mag, b = _case(nf4=True, M=9)
    dora.dora_linear(x, weight, A, B, mag, SCALING, backend="triton")
    calls = []
    real = fl.NF4Weight.dequantize
    monkeypatch.setattr(fl.NF4Weight, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    y = dora.dora_linear(x, weight, A.requires_grad_(True), B, mag, SCALING, backend="triton")
    y.sum().backward()
    assert calls == []


# ------------------------------------------------------------------------------------------- reference backend


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_reference_backend_matches_peft_formula_in_float64(dtype, p, nf4):
    x, weight, A, B, mag, b = _case(dtype=dtype, nf4=nf4, M=6 * 7)
    _assert_matches_oracle(x, weight, A, B, mag, b, p, "reference", leading=(6, 7))


def test_reference_backend_adapters_and_magnitude_in_the_compute_dtype():
    x, weight, A, B, mag, b = _case(dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, M=19, r=3)
    _assert_matches_oracle(x, weight, A, B, mag, b, 0.0, "reference")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_reference_dmag_with_and_without_the_kept_z_agree(p):
    x, weight, A, B, mag, b = _case(M=29, r=4)
    m = reference.dropout_mask(x.shape, p, 5, "cpu")
    y, u, norm, z = dora.dora_forward(x, weight, A, B, SCALING, mag, b, m, keep_z=True)
    g = torch.randn_like(y)
    kept = dora.dora_backward(g, x, weight, A, B, SCALING, mag, norm, u, m, z=z)
    recomputed = dora.dora_backward(g, x, weight, A, B, SCALING, mag, norm, u, m)
    for ours, other in zip(kept[:4], recomputed[:4]):
        assert relative_error(ours, other) < 1e-6


def test_float64_reference_is_exact():
    x, weight, A, B, mag, b = _case(dtype=torch.float64, adapter_dtype=torch.float64, M=23, r=9)
    errors = _assert_matches_oracle(x, weight, A, B, mag, b, 0.2, "reference")
    assert max(errors.values()) < 1e-12


# ------------------------------------------------------------------------------------------- Triton backend


WEIGHTS = [(False, 67), (True, 67), (True, 128)]  # dense; NF4 blocks straddling rows; NF4 blocks within rows


@pytest.mark.parametrize("nf4, K", WEIGHTS, ids=["dense", "nf4-ragged", "nf4-aligned"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_backend_matches_peft_formula_in_float64(dtype, p, nf4, K, interpret_triton):
    x, weight, A, B, mag, b = _case(dtype=dtype, nf4=nf4, M=3 * 7, K=K, N=41, r=3)
    _assert_matches_oracle(x, weight, A, B, mag, b, p, "triton", leading=(3, 7))


def test_triton_backward_folds_c_into_the_nf4_block_scales(monkeypatch, interpret_triton):
    """K a multiple of the blocksize: the LoRA backward kernels run over c⊙W (W's codes, scales times c) and c⊙B
    with g itself; ragged blocks take c inside the kernels (lora.backward's col_scale). Neither makes a c⊙g pass."""
    from fused_lora import _dora
    from fused_lora.kernels import dora as dora_kernels

    scaled_calls, scale_calls = [], []
    real_scaled, real_scale = dora.row_scaled_nf4, dora_kernels.scale_columns
    monkeypatch.setattr(_dora, "row_scaled_nf4", lambda w, c: scaled_calls.append(1) or real_scaled(w, c))
    monkeypatch.setattr(dora_kernels, "scale_columns", lambda *a, **k: scale_calls.append(a[2]) or real_scale(*a, **k))
    for K, folded in ((128, True), (67, False)):
        scaled_calls.clear(), scale_calls.clear()
        x, weight, A, B, mag, b = _case(nf4=True, M=9, K=K, N=41, r=3)
        y, leaves = _run(x, weight, A, B, mag, b, 0.0, "triton")
        torch.autograd.grad(y.sum(), leaves)
        # forward (M=9): the decode kernels give z, then y = c⊙z + b in one pass (with the bias) where W has whole
        # blocks per row; ragged blocks take the GEMM, whose epilogue writes y itself. Backward: no pass.
        assert [bias is not None for bias in scale_calls] == ([True] if folded else [])
        assert bool(scaled_calls) and (real_scaled(weight, torch.ones(41)) is not None) == folded


@pytest.mark.parametrize("nf4, K", WEIGHTS, ids=["dense", "nf4-ragged", "nf4-aligned"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_training_forward_scales_in_the_gemm_epilogue_on_every_path(monkeypatch, path, nf4, K, dtype,
                                                                    interpret_triton):
    """The training forward (mag needs a gradient, so z is kept): the GEMM's epilogue (middle and large paths) writes
    z and y = c⊙z + b from one fp32 accumulator, no scale_columns pass; the decode kernels give z and one pass gives
    y. The backward takes c inside its kernels (no c⊙g pass) except on the decode path over W's own rows (one pass,
    M ≤ 64). Output and every gradient against PEFT's formula in float64."""
    from fused_lora.kernels import dora as dora_kernels
    from fused_lora.kernels import lora, strategy

    forward_calls, real_scale = [], dora_kernels.scale_columns
    monkeypatch.setattr(dora_kernels, "scale_columns",
                        lambda *a, **k: forward_calls.append(a[2] is not None) or real_scale(*a, **k))
    taken = []
    real_path = lora._path
    monkeypatch.setattr(lora, "_path", lambda *a: taken.append(real_path(*a)) or taken[-1])
    x, weight, A, B, mag, b = _case(dtype=dtype, nf4=nf4, M=2 * 9, K=K, N=300, r=3)
    with strategy.use_thresholds(**PATHS[path]):
        _assert_matches_oracle(x, weight, A, B, mag, b, 0.0, "triton", leading=(2, 9))
    expected = path if (nf4 or path != "large") else "middle"  # a dense W has no slab path
    if path == "decode" and nf4 and K % weight.blocksize:
        expected = "middle"  # the decode kernels need whole NF4 blocks per row
    assert taken and set(taken) == {expected}, taken
    forward_passes = [with_bias for with_bias in forward_calls if with_bias]  # the backward's c⊙g has no bias
    assert len(forward_passes) == (1 if expected == "decode" else 0), (expected, forward_calls)
    folded = nf4 and K % weight.blocksize == 0  # the backward runs over c⊙W, c⊙B with g itself
    backward_passes = len(forward_calls) - len(forward_passes)
    assert backward_passes == (1 if expected == "decode" and not folded else 0), (expected, forward_calls)


def test_scaled_forward_writes_z_and_y_from_one_accumulator(interpret_triton):
    """kernels.lora.forward_scaled: z equals the plain fused forward's y without bias, y = c⊙z + b from the fp32
    accumulator (within one rounding of z's), on the middle and large paths."""
    from fused_lora.kernels import lora, strategy

    x, weight, A, B, _, b = _case(nf4=True, M=20, K=128, N=300, r=3)
    c = torch.rand(300) + 0.5
    for path in ("middle", "large"):
        with strategy.use_thresholds(**PATHS[path]):
            y, u, z = lora.forward_scaled(x, weight, A, B, SCALING, b, c)
            z_plain, u_plain = lora.forward(x, weight, A, B, SCALING, None, 0.0, 0)
        torch.testing.assert_close(z, z_plain, rtol=0, atol=0)
        torch.testing.assert_close(u, u_plain, rtol=0, atol=0)
        torch.testing.assert_close(y, c * z + b, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="z and col_scale come together"):
        from fused_lora.kernels import launch_gemm

        launch_gemm.launch_y(x, weight, None, torch.empty(20, 300), {}, z=torch.empty(20, 300))


@pytest.mark.parametrize("nf4, K", WEIGHTS, ids=["dense", "nf4-ragged", "nf4-aligned"])
def test_triton_inference_without_magnitude_gradient(nf4, K, interpret_triton):
    """No gradient for mag (inference, or a frozen magnitude): an aligned NF4 layer is one fused pass over (c⊙W, c⊙B)."""
    x, weight, A, B, mag, b = _case(nf4=nf4, M=11, K=K, N=41, r=3)
    with torch.no_grad():
        y = dora.dora_linear(x, weight, A, B, mag, SCALING, bias=b, backend="triton")
    y64, _ = _oracle(x, weight, A, B, mag, b, None, torch.float64)
    assert relative_error(y, y64) < 1e-5
    A_trained = A.clone().requires_grad_(True)  # A trains, mag frozen: z is not kept
    y = dora.dora_linear(x, weight, A_trained, B, mag, SCALING, bias=b, backend="triton")
    (dA,) = torch.autograd.grad(y, A_trained, torch.ones_like(y))
    y64, leaves64 = _oracle(x, weight, A, B, mag, b, None, torch.float64)
    assert relative_error(dA, torch.autograd.grad(y64, leaves64[1], torch.ones_like(y64))[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dora_kernels_scale_columns_and_column_dot(dtype, poison_empty, interpret_triton):
    from fused_lora.kernels import dora as dora_kernels

    g = torch.Generator().manual_seed(3)
    z = torch.randn(75, 53, generator=g).to(dtype)
    gz = torch.randn(53, 75, generator=g).to(dtype).t()  # a strided operand
    c, b = torch.randn(53, generator=g), torch.randn(53, generator=g).to(dtype)
    expected = (c * z.double() + b.double())
    for bias, ref in ((b, expected), (None, c * z.double())):
        y = dora_kernels.scale_columns(z, c, bias)
        assert y.dtype == dtype and relative_error(y, ref) < (1e-6 if dtype == torch.float32 else 1e-3)
    d = dora_kernels.column_dot(gz, z)
    assert d.dtype == torch.float32 and relative_error(d, (gz.double() * z.double()).sum(0)) < 1e-6
    assert torch.equal(d, dora_kernels.column_dot(gz, z))  # a fixed summation order


def test_row_scaled_nf4_keeps_the_codes_and_scales_rows():
    w = fl.quantize_nf4(torch.randn(45, 128), blocksize=64)
    c = torch.randn(45)
    scaled = dora.row_scaled_nf4(w, c)
    assert scaled.packed is w.packed and not scaled.double_quant
    torch.testing.assert_close(scaled.dequantize(torch.float32), c[:, None] * w.dequantize(torch.float32))
    assert dora.row_scaled_nf4(fl.quantize_nf4(torch.randn(45, 70)), c) is None


@pytest.mark.parametrize("nf4, K", WEIGHTS, ids=["dense", "nf4-ragged", "nf4-aligned"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_runs_in_the_gemms_off_decode_sizes(monkeypatch, path, nf4, K, dtype, interpret_triton):
    """DoRA with dropout on Triton: on the middle and large paths two GEMMs over W give z_d = x_d·Wᵀ + s·u·Bᵀ and
    y = x·Wᵀ + s·u·Bᵀ + b + (c−1)⊙z_d (frozen_forward only for the norm's W·Aᵀ, no PyTorch composition), and the
    backward takes c and the mask inside its kernels; the decode path composes (frozen_forward twice more). One
    mask, the kernels', on every path.
    Output and every gradient against PEFT's formula in float64."""
    from fused_lora.kernels import lora, strategy

    frozen, real_frozen = [], lora.frozen_forward
    monkeypatch.setattr(lora, "frozen_forward", lambda *a: frozen.append(1) or real_frozen(*a))
    x, weight, A, B, mag, b = _case(dtype=dtype, nf4=nf4, M=2 * 9, K=K, N=300, r=3)
    with strategy.use_thresholds(**PATHS[path]):
        _assert_matches_oracle(x, weight, A, B, mag, b, 0.3, "triton", leading=(2, 9))
        composed = not lora.fuses_dora_dropout(18, weight, x.device)
    assert composed == (path == "decode" and (not nf4 or K % weight.blocksize == 0))
    assert len(frozen) == 1 + (2 if composed else 0)  # W·Aᵀ for the norm, then the composition's x·Wᵀ and x_d·Wᵀ


# ------------------------------------------------------------------------------------------- semantics


def test_eval_mode_ignores_dropout_and_a_fresh_adapter_is_the_base():
    x, weight, A, B, mag, b = _case()
    y_eval = dora.dora_linear(x, weight, A, B, mag, SCALING, bias=b, dropout_p=0.5, training=False,
                              backend="reference")
    torch.testing.assert_close(y_eval, dora.dora_linear(x, weight, A, B, mag, SCALING, bias=b, backend="reference"))
    # PEFT's initialisation: B = 0 and mag = ‖W‖ row-wise give exactly the frozen layer
    B0 = torch.zeros_like(B)
    mag0 = dora.row_squares(weight).sqrt()
    y0 = dora.dora_linear(x, weight, A, B0, mag0, SCALING, bias=b, backend="reference")
    torch.testing.assert_close(y0, x @ weight.t() + b, rtol=1e-5, atol=1e-5)


def test_norm_is_detached_no_gradient_reaches_a_and_b_through_it():
    """dA and dB are those of PEFT's formula with ‖W + s·B·A‖ detached (a constant), written out here in float64;
    the same formula with the norm attached gives gradients that differ by far more than the tolerance, so a norm
    that let the gradient through would fail."""
    x, weight, A, B, mag, b = (t.double() for t in _case())
    y = dora.dora_linear(x, weight, A.requires_grad_(True), B.requires_grad_(True), mag, SCALING, bias=b,
                         backend="reference")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = torch.autograd.grad(y, (A, B), g)

    def formula_grads(detach):
        A_, B_ = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
        norm = (weight + SCALING * B_ @ A_).norm(dim=1)
        c = mag / (norm.detach() if detach else norm)
        y_ = c * (x @ weight.t() + SCALING * (x @ A_.t()) @ B_.t()) + b
        return torch.autograd.grad(y_, (A_, B_), g)

    detached, attached = formula_grads(True), formula_grads(False)
    for name, got, want, wrong in zip(("dA", "dB"), ours, detached, attached):
        assert relative_error(got, want) < 1e-12, name
        assert relative_error(wrong, want) > 1e-3, name


def test_argument_errors_name_dora_linear():
    x, weight, A, B, mag, b = _case()
    with pytest.raises(ValueError, match=r"dora_linear: magnitude has shape \(44,\), expected \(45,\)"):
        dora.dora_linear(x, weight, A, B, mag[:44], SCALING)
    with pytest.raises(TypeError, match="dora_linear: magnitude is torch.float16"):
        dora.dora_linear(x, weight, A, B, mag.half(), SCALING)
    with pytest.raises(ValueError, match="dora_linear: lora_B has shape"):
        dora.dora_linear(x, weight, A, B[:, :2], mag, SCALING)
    with pytest.raises(ValueError, match="dora_linear: dropout_p"):
        dora.dora_linear(x, weight, A, B, mag, SCALING, dropout_p=1.0)


def test_second_derivatives_raise():
    x, weight, A, B, mag, b = _case()
    A = A.requires_grad_(True)
    y = dora.dora_linear(x, weight, A, B, mag, SCALING, backend="reference")
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(y.sum(), A, create_graph=True)


def test_the_cpu_backends_dora_keeps_fp64_whole_and_half_dtype_adapter_gradients_in_fp32():
    """The "cpu" backend composes DoRA over its kernels: fp64 x was rounded to fp32 three times (dmag's column sum,
    NF4 row norms, c folded into NF4's fp32 block scales: 7e-8 against the fp64 bound of 1e-10), and with bf16 x the
    low-rank gradients came from c⊙g rounded to bf16 (1.7e-3 relative; the reference 1.6e-7)."""
    s = 2.0
    torch.manual_seed(0)
    M, K, N, r = 7, 64, 48, 4
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    for weight in (torch.randn(N, K, dtype=torch.float64) / 8, fl.quantize_nf4(torch.randn(N, K) / 8)):
        W = weight.dequantize(torch.float64) if isinstance(weight, fl.NF4Weight) else weight
        mag = (torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1) * 1.2).requires_grad_(True)
        g = torch.randn(M, N, dtype=torch.float64)
        n = torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1)
        expected = (mag / n) * (x @ W.t() + s * (x @ A.t()) @ B.t())
        want = [expected, *torch.autograd.grad(expected, [x, A, B, mag], g)]
        y = fl.dora.dora_linear(x, weight, A, B, mag, s, backend="cpu")
        got = [y, *torch.autograd.grad(y, [x, A, B, mag], g)]
        for name, a, b in zip(("y", "dx", "dA", "dB", "dmag"), got, want):
            assert relative_error(a, b) <= 1e-12, name
    x = torch.randn(37, K).bfloat16()
    W = (torch.randn(N, K) / 8).bfloat16()
    A, B = torch.randn(r, K) / 8, torch.randn(N, r)
    mag = torch.linalg.norm(W.float() + s * B @ A, dim=1) * 1.2
    g = torch.randn(37, N).bfloat16()
    A64, B64 = A.double().requires_grad_(True), B.double().requires_grad_(True)
    n = torch.linalg.norm(W.double() + s * B64.detach() @ A64.detach(), dim=1)
    expected = (mag.double() / n) * (x.double() @ W.double().t() + s * (x.double() @ A64.t()) @ B64.t())
    want = torch.autograd.grad(expected, [A64, B64], g.double())
    A, B = A.requires_grad_(True), B.requires_grad_(True)
    got = torch.autograd.grad(fl.dora.dora_linear(x, W, A, B, mag, s, backend="cpu"), [A, B], g)
    assert all(relative_error(a, b) <= 3e-4 for a, b in zip(got, want))  # W·Aᵀ with A in W's dtype: ~7e-5 left
