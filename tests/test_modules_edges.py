"""FusedLoraLinear at its edges: adapter dtypes beside the compute dtype, option types, and checkpoints that are not
the layer's own kind (bitsandbytes FP4, an NF4 base without its packed bytes, torch's meta-device loading)."""

import pytest
import torch

import fused_lora as fl


def _grads(layer, x):
    layer.zero_grad()
    layer(x).float().sum().backward()
    return layer.lora_A.grad, layer.lora_B.grad


def test_fp64_adapters_beside_a_half_compute_dtype_keep_fp32_precision():
    """fp64 adapters beside a bf16 compute dtype reach the layer functions in fp32 (as fp32 adapters would), not
    rounded to bf16: with values exact in fp32 the output and the gradients equal the fp32-adapter layer's (the
    gradient was rounded to bf16 before: 2.7e-3 relative error on dA, against 1.2e-7)."""
    torch.manual_seed(0)
    narrow = fl.FusedLoraLinear(64, 24, r=4, lora_alpha=8, compute_dtype=torch.bfloat16, backend="reference")
    with torch.no_grad():
        narrow.lora_B.normal_()
    wide = fl.FusedLoraLinear(64, 24, r=4, lora_alpha=8, compute_dtype=torch.bfloat16, backend="reference")
    wide.load_state_dict(narrow.state_dict())
    wide.lora_A = torch.nn.Parameter(narrow.lora_A.detach().double())
    wide.lora_B = torch.nn.Parameter(narrow.lora_B.detach().double())
    assert wide._operand(wide.lora_A, torch.bfloat16).dtype == torch.float32
    x = torch.randn(5, 64)
    assert torch.equal(wide(x), narrow(x))
    for got, expected in zip(_grads(wide, x), _grads(narrow, x)):
        assert got.dtype == torch.float64 and torch.equal(got.float(), expected)


def test_use_dora_must_be_a_bool():
    with pytest.raises(TypeError, match="use_dora must be True or False, got 'no'"):
        fl.FusedLoraLinear(64, 32, use_dora="no")


def _nf4_state():
    torch.manual_seed(1)
    source = fl.FusedLoraLinear(64, 32, r=4, quant="nf4", compute_dtype=torch.float32, backend="reference")
    with torch.no_grad():
        source.lora_B.normal_()
    return source, source.state_dict()


@pytest.mark.parametrize("quant", ["nf4", None])
@pytest.mark.parametrize("strict", [True, False])
def test_an_fp4_checkpoint_is_refused_whatever_strict_says(quant, strict):
    """bitsandbytes FP4 entries: an error (not missing/unexpected keys that strict=False would ignore, keeping the
    layer's random base without a word)."""
    _, state = _nf4_state()
    marker = "weight.quant_state.bitsandbytes__nf4"
    state["weight.quant_state.bitsandbytes__fp4"] = state.pop(marker)
    layer = fl.FusedLoraLinear(64, 32, r=4, quant=quant, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="could not load weight: the checkpoint holds bitsandbytes FP4"):
        layer.load_state_dict(state, strict=strict)


def test_a_dense_layer_reports_a_missing_nf4_weight_once():
    _, state = _nf4_state()
    del state["weight"]
    layer = fl.FusedLoraLinear(64, 32, r=4, quant=None, compute_dtype=torch.float32)
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["weight"], result


def test_a_meta_layer_loads_an_nf4_checkpoint_with_assign():
    """torch's low-memory loading, as the layer's own error message suggests it: a quant=None layer made on the meta
    device, then load_state_dict(assign=True) of an NF4 checkpoint. The base is read where the checkpoint is (it
    was moved to meta, then dequantized there: 'Cannot copy out of meta tensor', the layer left half loaded)."""
    source, state = _nf4_state()
    layer = fl.FusedLoraLinear(64, 32, r=4, quant=None, compute_dtype=torch.float32, device="meta",
                               backend="reference")
    layer.load_state_dict(state, assign=True)
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())
    assert torch.equal(layer.weight, source.weight.dequantize(torch.float32))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), source(x), rtol=1e-6, atol=1e-6)


def test_loading_an_nf4_checkpoint_copies_it_unless_assign(tmp_path):
    """torch's load_state_dict copies into the module: the layer never shares the dict's memory, so editing the dict
    leaves the layer alone, and a checkpoint loaded with mmap=True can be saved over again (the layer's packed bytes
    were pages of the file being truncated: SIGBUS and a cut file). load_state_dict(assign=True) takes the tensors."""
    sd = fl.FusedLoraLinear(64, 32, r=4, compute_dtype=torch.float32).state_dict()
    layer = fl.FusedLoraLinear(64, 32, r=4, compute_dtype=torch.float32)
    layer.load_state_dict(sd)
    before = layer.weight.dequantize().clone()
    assert layer.weight.packed.data_ptr() != sd["weight"].data_ptr()
    sd["weight.absmax"].zero_()
    assert torch.equal(layer.weight.dequantize(), before)
    path = tmp_path / "ckpt.pt"
    torch.save(fl.FusedLoraLinear(256, 128, r=4, compute_dtype=torch.float32).state_dict(), path)
    resumed = fl.FusedLoraLinear(256, 128, r=4, compute_dtype=torch.float32)
    resumed.load_state_dict(torch.load(path, mmap=True, weights_only=True))
    expected = resumed.state_dict()
    torch.save(expected, path)  # the same path, as a training loop checkpoints
    again = torch.load(path, weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in expected.items())
    assigned = fl.FusedLoraLinear(64, 32, r=4, compute_dtype=torch.float32)
    sd = assigned.state_dict()
    assigned.load_state_dict(sd, assign=True)
    assert assigned.weight.packed.data_ptr() == sd["weight"].data_ptr()


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_merged_weight_is_a_copy_in_a_floating_dtype(quant):
    """merged_weight() of a merged layer is a copy (unmerge() writes the original back into the layer's weight; the
    exported tensor kept it), and a dtype that is not floating point (or a string) is refused by name."""
    torch.manual_seed(0)
    layer = fl.FusedLoraLinear(16, 8, r=4, quant=quant, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge(requantize=False)
    exported = layer.merged_weight()
    snapshot = exported.clone()
    layer.unmerge()
    base = layer.weight.dequantize() if quant else layer.weight.detach()
    assert torch.equal(exported, snapshot) and not torch.equal(exported, base)
    for dtype in (torch.int8, torch.bool, "bfloat16"):
        with pytest.raises(TypeError, match="merged_weight: dtype must be one of"):
            layer.merged_weight(dtype)
