"""FusedLoraLinear: output and gradients vs the float64 reference, dtypes, dropout, from_linear / from_bnb,
adapter on/off, merge/unmerge, state dicts (bitsandbytes keys), device/dtype moves and errors."""

import copy
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

import fused_lora as fl
from fused_lora import reference
from fused_lora.testing import assert_close_to_reference, relative_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _layer(K=129, N=37, r=8, quant="nf4", dtype=torch.float32, bias=True, seed=0, **kwargs):
    """A layer with a random, non-zero lora_B (a fresh layer's lora_B is zero, which would hide the LoRA term)."""
    torch.manual_seed(seed)
    layer = fl.FusedLoraLinear(K, N, r=r, lora_alpha=2 * r, bias=bias, quant=quant, compute_dtype=dtype,
                               backend=kwargs.pop("backend", "reference"), **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    return layer


def _dense_weight(layer, dtype):
    w = layer.weight
    return w.dequantize(dtype) if isinstance(w, fl.NF4Weight) else w.detach().to(dtype)


def _leaves(layer, x):
    leaves = [x, layer.lora_A, layer.lora_B]
    return leaves + [layer.bias] if layer.bias is not None and layer.bias.requires_grad else leaves


def _naive(layer, x, dtype, m=None):
    """lora_linear_naive on copies of the layer's tensors in ``dtype`` (float64: the reference; the compute
    dtype: plain PyTorch) -> (y, leaves). Adapters keep fp32 unless ``dtype`` is float64."""
    def copy(t, to_dtype):
        return t.detach().to(to_dtype).clone().requires_grad_(t.requires_grad)

    adapter_dtype = torch.float64 if dtype == torch.float64 else None
    xs = copy(x, dtype)
    A = copy(layer.lora_A, adapter_dtype or layer.lora_A.dtype)
    B = copy(layer.lora_B, adapter_dtype or layer.lora_B.dtype)
    b = None if layer.bias is None else copy(layer.bias, dtype)
    y = reference.lora_linear_naive(xs, _dense_weight(layer, dtype), A, B, layer.scaling, b, m)
    leaves = [xs, A, B] + ([b] if b is not None and b.requires_grad else [])
    return y, leaves


def _check_against_reference(layer, x, dtype, m=None):
    """Run the layer forward and backward and assert the tolerance rule for y and every gradient."""
    x = x.requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, _leaves(layer, x), g)
    y64, leaves64 = _naive(layer, x, torch.float64, m)
    ref_grads = torch.autograd.grad(y64, leaves64, g.double())
    y_plain, plain_leaves = _naive(layer, x, dtype, m)
    plain_grads = torch.autograd.grad(y_plain, plain_leaves, g)
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for name, ours, plain, ref in zip(("dx", "dA", "dB", "db"), grads, plain_grads, ref_grads):
        assert_close_to_reference(name, ours, plain, ref, dtype)
    return y, grads


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
@pytest.mark.parametrize(
    "shape", [(3, 13, 129, 37, 4), (2, 100, 200, 80, 16)], ids=["B3-T13-K129-N37-r4", "B2-T100-K200-N80-r16"]
)
def test_forward_and_grads_match_float64_reference(dtype, quant, shape):
    batch, tokens, K, N, r = shape
    layer = _layer(K, N, r, quant=quant, dtype=dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(batch, tokens, K).to(dtype)
    y, grads = _check_against_reference(layer, x, dtype)
    assert y.shape == (batch, tokens, N) and y.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, dtype]


def test_fresh_layer_is_its_base_and_only_adapters_train():
    torch.manual_seed(1)
    layer = fl.FusedLoraLinear(129, 37, r=8, bias=True, compute_dtype=torch.float32, backend="reference")
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1.0 / math.sqrt(129)  # kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in), as nn.Linear and PEFT
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(5, 129)
    base = x @ layer.weight.dequantize(torch.float32).t() + layer.bias
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_frozen_bias_gets_no_grad_and_trainable_bias_does():
    layer = _layer(dtype=torch.float32)
    layer(torch.randn(4, 129)).sum().backward()
    assert layer.bias.grad is None and layer.lora_A.grad is not None
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 129)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((37,), 4.0))


def test_fp32_input_is_computed_in_compute_dtype_and_returned_in_fp32():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(2, 7, 129)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x.bfloat16()).float(), rtol=0, atol=0)


def test_adapter_dtype_other_than_compute_dtype_is_cast_for_the_kernel():
    layer = _layer(dtype=torch.bfloat16, adapter_dtype=torch.float16)
    assert layer.lora_A.dtype == torch.float16
    x = torch.randn(3, 129).bfloat16().requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float16 and x.grad.dtype == torch.bfloat16


def test_autocast_computes_in_the_autocast_dtype():
    layer = _layer(quant=None, dtype=torch.float32)
    x = torch.randn(2, 9, 129)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    bf16 = _layer(quant=None, dtype=torch.bfloat16)
    torch.testing.assert_close(y, bf16(x.bfloat16()), rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_dropout_is_applied_in_training_and_off_in_eval(quant):
    layer = _layer(quant=quant, lora_dropout=0.3)
    x = torch.randn(2, 19, 129)
    layer.eval()
    y_eval = layer(x)
    y_no_dropout, _ = _naive(layer, x, torch.float32)
    torch.testing.assert_close(y_eval, y_no_dropout)

    layer.train()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # lora_linear draws its dropout seed like this
    m = reference.dropout_mask((38, 129), 0.3, seed, "cpu").reshape(2, 19, 129)
    torch.manual_seed(7)
    y, _ = _check_against_reference(layer, x.clone(), torch.float32, m=m)
    assert relative_error(y, y_eval) > 1e-3


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = _layer(r=16, use_rslora=True)
    assert layer.scaling == pytest.approx(32 / math.sqrt(16))
    assert _layer(r=16).scaling == pytest.approx(2.0)
    _check_against_reference(layer, torch.randn(2, 5, 129), torch.float32)


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_triton_backend_under_interpreter_matches_reference(quant, interpret_triton, monkeypatch):
    monkeypatch.setattr(fl._common, "_warned", set())  # a reason warned by an earlier test would warn again
    layer = _layer(K=64, N=40, r=4, quant=quant, backend="triton")
    layer.bias.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference would warn
        _check_against_reference(layer, torch.randn(3, 7, 64), torch.float32)


# ---------------------------------------------------------------- from_linear / from_bnb


def _bnb_linear4bit(K, N, bias=True, compute_dtype=torch.float32, seed=0, quant_type="nf4"):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    return bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type).to("cpu")


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_from_linear_equals_the_linear_at_init(quant):
    torch.manual_seed(2)
    linear = torch.nn.Linear(129, 37)
    layer = fl.FusedLoraLinear.from_linear(linear, r=8, quant=quant, backend="reference")
    assert layer.compute_dtype == torch.float32 and layer.lora_A.device == linear.weight.device
    x = torch.randn(3, 5, 129)
    if quant == "nf4":
        expected = fl.quantize_nf4(linear.weight.detach())
        assert torch.equal(layer.weight.packed, expected.packed) and torch.equal(layer.weight.absmax, expected.absmax)
        torch.testing.assert_close(layer(x), x @ expected.dequantize(torch.float32).t() + linear.bias)
    else:
        assert torch.equal(layer.weight, linear.weight) and layer.weight.data_ptr() != linear.weight.data_ptr()
        torch.testing.assert_close(layer(x), linear(x))
    assert torch.equal(layer.bias, linear.bias)


def test_from_linear_follows_the_linear_dtype_unless_given():
    linear = torch.nn.Linear(64, 48).half()
    assert fl.FusedLoraLinear.from_linear(linear, quant=None).weight.dtype == torch.float16
    layer = fl.FusedLoraLinear.from_linear(linear, quant=None, compute_dtype=torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_from_bnb_reuses_the_bytes_and_equals_linear4bit_at_init(compute_dtype):
    q = _bnb_linear4bit(128, 96, compute_dtype=compute_dtype)
    layer = fl.FusedLoraLinear.from_bnb(q, r=8, backend="reference")
    assert layer.weight.packed.data_ptr() == q.weight.data_ptr()
    assert layer.weight.absmax.data_ptr() == q.weight.quant_state.absmax.data_ptr()
    assert layer.compute_dtype == compute_dtype and layer.blocksize == q.weight.quant_state.blocksize
    x = torch.randn(2, 11, 128).to(compute_dtype)
    y_bnb = q(x)  # training mode: bitsandbytes does not repack the weight for its CPU inference kernel
    y_ref = x.double() @ layer.weight.dequantize(torch.float64).t() + q.bias.double()
    assert_close_to_reference("y", layer(x), y_bnb, y_ref, compute_dtype)


def test_from_bnb_rejects_unquantized_fp4_and_repacked_layers():
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="no quantized weight"):
        fl.FusedLoraLinear.from_bnb(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    with pytest.raises(ValueError, match="only NF4"):
        fl.FusedLoraLinear.from_bnb(_bnb_linear4bit(64, 64, quant_type="fp4"))
    q = _bnb_linear4bit(64, 64, compute_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        q(torch.randn(2, 64).bfloat16())
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU (no AVX512-BF16)")
    with pytest.raises(ValueError, match="repacked"):
        fl.FusedLoraLinear.from_bnb(q)


# ---------------------------------------------------------------- adapter on/off, merge


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_disable_adapter_computes_only_the_base(quant):
    layer = _layer(quant=quant)
    x = torch.randn(2, 6, 129, requires_grad=True)
    y_lora = layer(x)
    base = (x @ _dense_weight(layer, torch.float32).t() + layer.bias).detach()
    assert relative_error(y_lora, base) > 1e-2
    with layer.disable_adapter():
        assert not layer.adapter_enabled
        y = layer(x)
        torch.testing.assert_close(y, base, rtol=0, atol=0)
        y.sum().backward()
        assert layer.lora_A.grad is None and layer.lora_B.grad is None and x.grad is not None
    assert layer.adapter_enabled
    torch.testing.assert_close(layer(x), y_lora, rtol=0, atol=0)
    layer.enable_adapters(False)
    assert "adapter_enabled=False" in repr(layer)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_merge_dense_folds_lora_and_unmerge_restores_exactly(dtype):
    layer = _layer(quant=None, dtype=dtype)
    x = torch.randn(3, 129).to(dtype)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    exact = w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(layer.merged_weight(torch.float64), exact)
    error = layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert error == pytest.approx(relative_error(layer.weight, exact))
    assert error < (1e-6 if dtype == torch.float32 else 1e-2)
    y_plain = x @ exact.to(dtype).t() + layer.bias
    assert_close_to_reference("y merged", layer(x), y_plain, x.double() @ exact.t() + layer.bias.double(), dtype)
    with pytest.warns(RuntimeWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="not merged"):
        layer.unmerge()


def test_merge_nf4_requantizes_reports_the_error_and_unmerge_restores_the_original():
    layer = _layer(quant="nf4")
    x = torch.randn(4, 129)
    y = layer(x)
    original = layer.weight
    packed0, absmax0 = original.packed.clone(), original.absmax.clone()
    exact = original.dequantize(torch.float64) + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    error = layer.merge(requantize=True)
    merged = layer.weight
    assert isinstance(merged, fl.NF4Weight) and merged is not original
    assert merged.blocksize == original.blocksize and merged.double_quant == original.double_quant
    assert error == pytest.approx(relative_error(merged.dequantize(torch.float64), exact), rel=1e-9)
    assert 1e-3 < error < 0.2 and layer.merge_error == error
    torch.testing.assert_close(layer(x), x @ merged.dequantize(torch.float32).t() + layer.bias, rtol=0, atol=0)
    assert set(layer.state_dict()) == set(fl.FusedLoraLinear(129, 37, r=8, bias=True).state_dict())
    layer.unmerge()
    assert layer.weight is original
    assert torch.equal(layer.weight.packed, packed0) and torch.equal(layer.weight.absmax, absmax0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_merge_nf4_without_requantizing_gives_a_dense_merged_base():
    layer = _layer(quant="nf4")
    x = torch.randn(4, 129)
    y = layer(x)
    original = layer.weight
    error = layer.merge(requantize=False)
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad
    assert error < 1e-6 and "quant=nf4" in repr(layer)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), layer.weight.detach(), rtol=0, atol=0)
    layer.unmerge()
    assert layer.weight is original and "weight" not in dict(layer.named_parameters())
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


MERGE_KINDS = [("nf4", True), ("nf4", False), (None, True)]
MERGE_IDS = ["nf4-requantized", "nf4-merged-dense", "dense"]


@pytest.mark.parametrize("quant, requantize", MERGE_KINDS, ids=MERGE_IDS)
def test_disabled_adapter_of_a_merged_layer_computes_the_original_base(quant, requantize):
    """Disabling the adapter gives the frozen base (an RL reference model), also while s·B·A is merged into W."""
    layer = _layer(quant=quant)
    x = torch.randn(2, 5, 129)
    with layer.disable_adapter():
        base = layer(x)
    layer.merge(requantize=requantize)
    assert relative_error(layer(x), base) > 1e-2
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


# ---------------------------------------------------------------- state dict, moves


def test_state_dict_keys_and_bytes_equal_bitsandbytes():
    q = _bnb_linear4bit(128, 96)
    layer = fl.FusedLoraLinear.from_bnb(q, r=8)
    ours, theirs = layer.state_dict(), q.state_dict()
    assert set(ours) == set(theirs) | {"lora_A", "lora_B"}
    for key in theirs:
        if key != "bias":
            assert torch.equal(ours[key], theirs[key]), key
    assert set(fl.FusedLoraLinear(64, 32, bias=False).state_dict()) == set(theirs) - {"bias"} | {"lora_A", "lora_B"}


def test_bitsandbytes_checkpoint_loads_into_the_layer_and_back():
    bnb = pytest.importorskip("bitsandbytes")
    q = _bnb_linear4bit(128, 96)
    x = torch.randn(5, 128)
    layer = fl.FusedLoraLinear(128, 96, r=4, bias=True, compute_dtype=torch.float32, backend="reference")
    lora = {"lora_A": torch.randn(4, 128), "lora_B": torch.randn(96, 4)}
    layer.load_state_dict({**q.state_dict(), **lora})
    assert torch.equal(layer.weight.packed, q.weight.data.view(-1, 1))
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), q(x))

    sd = layer.state_dict()
    q2 = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    q2.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=q2)
    q2.bias = torch.nn.Parameter(sd["bias"].clone())
    with layer.disable_adapter():
        torch.testing.assert_close(q2(x), layer(x))


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_state_dict_round_trip_is_exact(quant):
    """Through torch.save and torch.load(weights_only=True), as a checkpoint is loaded: nothing in the state dict
    needs pickle (the NF4 quant state is a uint8 tensor of JSON)."""
    layer = _layer(quant=quant, dtype=torch.bfloat16)
    fresh = fl.FusedLoraLinear(129, 37, r=8, lora_alpha=16, bias=True, quant=quant, compute_dtype=torch.bfloat16,
                               backend="reference")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(3, 4, 129).bfloat16()
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("quant, requantize", MERGE_KINDS, ids=MERGE_IDS)
def test_state_dict_of_a_merged_layer_holds_the_unmerged_base(quant, requantize):
    """A checkpoint saved while merged equals the one saved before merging, so loading it (base + adapters) into a
    fresh layer gives the unmerged layer, not one that applies the adapter twice."""
    layer = _layer(quant=quant)
    x = torch.randn(3, 129)
    y = layer(x)
    before = {key: value.clone() for key, value in layer.state_dict().items()}  # a dense merge writes W in place
    layer.merge(requantize=requantize)
    after = layer.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    fresh = fl.FusedLoraLinear(129, 37, r=8, lora_alpha=16, bias=True, quant=quant, compute_dtype=torch.float32,
                               backend="reference")
    fresh.load_state_dict(after)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_loading_an_nf4_checkpoint_with_another_blocksize_updates_the_layer():
    layer = fl.FusedLoraLinear(129, 37, r=8, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    other = fl.FusedLoraLinear(129, 37, r=8, blocksize=128, double_quant=False, compute_dtype=torch.float32)
    layer.load_state_dict(other.state_dict())
    assert layer.weight.blocksize == layer.blocksize == 128
    assert layer.weight.double_quant is layer.double_quant is False
    assert "blocksize=128" in repr(layer) and "double_quant=False" in repr(layer)


def test_dense_checkpoint_is_quantized_into_an_nf4_layer_and_nf4_dequantized_into_a_dense_one():
    linear = torch.nn.Linear(129, 37)
    nf4_layer = fl.FusedLoraLinear(129, 37, r=8, bias=True, compute_dtype=torch.float32)
    missing, unexpected = nf4_layer.load_state_dict(linear.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(nf4_layer.weight.packed, fl.quantize_nf4(linear.weight.detach()).packed)
    dense_layer = fl.FusedLoraLinear(129, 37, r=8, bias=True, quant=None, compute_dtype=torch.float32)
    dense_layer.load_state_dict(nf4_layer.state_dict())
    assert torch.equal(dense_layer.weight, nf4_layer.weight.dequantize(torch.float32))


def test_load_rejects_a_wrong_shape_and_missing_base():
    layer = fl.FusedLoraLinear(129, 37, r=8)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(37, 129\)"):
        layer.load_state_dict(fl.FusedLoraLinear(128, 37, r=8).state_dict(), strict=False)
    sd = layer.state_dict()
    del sd["weight"]
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict({k: v for k, v in sd.items() if not k.startswith("weight")})


def _with_quant_state(sd, **fields):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = {k: v for k, v in {**json.loads(bytes(sd[key].tolist()).decode("utf-8")), **fields}.items() if v is not None}
    return {**sd, key: torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)}


@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4-layer", "dense-layer"])
def test_load_reports_unexpected_weight_keys_and_missing_nf4_entries_by_name(quant):
    """strict=True ignored unexpected weight.* keys, and an NF4 checkpoint without weight.absmax was reported as
    "size mismatch for weight: (1280, 1) vs (40, 64)"; now torch's own Missing/Unexpected key messages name them,
    strict=False returns them, and an incomplete NF4 base leaves the layer's base as it was."""
    layer = fl.FusedLoraLinear(64, 40, r=4, quant=quant, compute_dtype=torch.float32)
    sd = fl.FusedLoraLinear(64, 40, r=4, compute_dtype=torch.float32).state_dict()
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "weight.scale"'):
        layer.load_state_dict({**sd, "weight.scale": torch.ones(1)})  # the rest loads, as torch does
    before = layer.state_dict()
    no_absmax = {k: v for k, v in sd.items() if k != "weight.absmax"}
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "weight.absmax"') as raised:
        layer.load_state_dict(no_absmax)
    assert "size mismatch" not in str(raised.value)
    assert layer.load_state_dict(no_absmax, strict=False).missing_keys == ["weight.absmax"]
    dense = fl.FusedLoraLinear(64, 40, r=4, quant=None, compute_dtype=torch.float32).state_dict()
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "weight.quant_map", "weight.quant_st'):
        layer.load_state_dict({**dense, "weight.absmax": sd["weight.absmax"].float()})  # an NF4 entry: NF4 rules
    for key in ("weight", "weight.absmax"):
        if key in before:
            assert torch.equal(layer.state_dict()[key], before[key]), key


@pytest.mark.parametrize(
    "fields, message",
    [({"dtype": "float99"}, "the quant state's dtype 'float99' is not one of float32"),
     ({"nested_offset": float("nan")}, "nested_offset is nan; it must be a finite number"),
     ({"nested_offset": None}, "has no nested_offset")],
    ids=["bad-dtype-name", "nan-offset", "no-offset"],
)
def test_load_of_a_bad_quant_state_is_a_load_error_naming_the_field(fields, message):
    """A bad dtype string escaped as a raw AttributeError and a missing nested_offset as a KeyError; a NaN
    nested_offset was accepted and every output became NaN."""
    layer = fl.FusedLoraLinear(64, 40, r=4, compute_dtype=torch.float32)
    packed = layer.weight.packed.clone()
    sd = _with_quant_state(layer.state_dict(), **fields)
    with pytest.raises(RuntimeError, match=f"could not load weight: NF4Weight.from_state_dict: .*{message}"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.weight.packed, packed)
    assert torch.isfinite(layer(torch.randn(3, 64))).all()


def test_dtype_casts_never_touch_the_nf4_bytes():
    layer = _layer(quant="nf4", dtype=torch.bfloat16)
    names = ("packed", "code", "absmax", "offset", "nested_absmax", "nested_code")
    snapshot = {name: getattr(layer.weight, name).clone() for name in names}
    layer.half()
    assert layer.compute_dtype == torch.float16 and layer.lora_A.dtype == torch.float16
    assert layer.bias.dtype == torch.float16
    layer.to("cpu").to(torch.float32)
    assert layer.compute_dtype == torch.float32 and isinstance(layer.weight, fl.NF4Weight)
    for name in names:
        t = getattr(layer.weight, name)
        assert t.dtype == snapshot[name].dtype and torch.equal(t, snapshot[name]), name
    assert layer(torch.randn(2, 129)).dtype == torch.float32


@pytest.mark.gpu
def test_cuda_move_takes_the_nf4_weight_along():
    layer = _layer(quant="nf4", dtype=torch.bfloat16)
    x = torch.randn(4, 129).bfloat16()
    y_cpu = layer(x)
    layer.cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.absmax.dtype == torch.uint8
    y = layer(x.cuda())
    assert relative_error(y, y_cpu) < 2e-2
    layer.cpu()
    assert layer.weight.device.type == "cpu"


# ---------------------------------------------------------------- errors, repr


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(in_features=0), "in_features must be an integer >= 1"),
        (dict(out_features=-3), "out_features must be an integer >= 1"),
        (dict(quant="fp4"), "quant must be 'nf4' or None"),
        (dict(compute_dtype=torch.int8), "compute_dtype must be one of"),
        (dict(blocksize=100), "blocksize 100 is not supported"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(adapter_dtype=torch.int32), "adapter_dtype must be a floating-point dtype"),
    ],
    ids=["r0", "in0", "out-neg", "quant-fp4", "compute-int8", "blocksize100", "dropout1", "dropout-neg",
         "backend-cuda", "adapter-int32"],
)
def test_constructor_errors_name_the_problem(kwargs, match):
    args = dict(in_features=64, out_features=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match="FusedLoraLinear: " + match):
        fl.FusedLoraLinear(**args)


def test_forward_errors_name_the_problem():
    layer = fl.FusedLoraLinear(4096, 8, r=4, quant=None, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="FusedLoraLinear: x has 4095 features, expected 4096"):
        layer(torch.randn(2, 4095))
    with pytest.raises(TypeError, match="FusedLoraLinear: x must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 4096, dtype=torch.long))
    with pytest.raises(ValueError, match=r"FusedLoraLinear: x is a 0-d tensor; expected shape \(\.\.\., 4096\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        fl.FusedLoraLinear.from_linear(layer)


def test_extra_repr_shows_the_configuration():
    text = repr(fl.FusedLoraLinear(64, 32, r=8, lora_alpha=16, lora_dropout=0.1, blocksize=128, use_rslora=True))
    for part in ("in_features=64", "out_features=32", "r=8", "lora_alpha=16", "scaling=5.657", "quant=nf4",
                 "blocksize=128", "lora_dropout=0.1", "backend='auto'", "compute_dtype=bfloat16"):
        assert part in text, part
    assert "blocksize" not in repr(fl.FusedLoraLinear(64, 32, quant=None))


def test_numeric_hyper_parameters_of_the_wrong_kind_are_refused():
    with pytest.raises(TypeError, match="lora_alpha must be a number, got str '16'"):
        fl.FusedLoraLinear(16, 8, r=2, lora_alpha="16", quant=None, compute_dtype=torch.float32)
    layer = fl.FusedLoraLinear(np.int64(16), 8, r=np.int64(2), quant=None, compute_dtype=torch.float32)
    assert type(layer.in_features) is int and type(layer.r) is int


def test_adapters_of_another_half_dtype_are_widened_not_rounded():
    """fp16 adapters beside a bf16 compute dtype reach the layer functions widened to fp32 (exact), as PEFT's layers
    take them (_common.adapter_operand), not rounded to bf16: the output equals the same layer with the adapters'
    values stored in fp32."""
    torch.manual_seed(0)
    half = fl.FusedLoraLinear(64, 24, r=4, lora_alpha=8, compute_dtype=torch.bfloat16, adapter_dtype=torch.float16)
    with torch.no_grad():
        half.lora_B.normal_()
    wide = copy.deepcopy(half)
    wide.lora_A = torch.nn.Parameter(half.lora_A.detach().float())
    wide.lora_B = torch.nn.Parameter(half.lora_B.detach().float())
    assert half._operand(half.lora_A, torch.bfloat16).dtype == torch.float32
    x = torch.randn(5, 64)
    assert torch.equal(half(x), wide(x))
