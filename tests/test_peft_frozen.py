"""The frozen path of patched PEFT layers and bitsandbytes' CPU repack (tiny Llama, CPU, reference backend).

* disable_adapter() (the reference model of DPO/GRPO) and merged layers run ``frozen_linear``, never bitsandbytes'
  forward, and give the base model's logits bit for bit;
* a 4-bit weight that bitsandbytes repacked for its CPU inference kernel (simulated here with bitsandbytes' own
  repack function, as its Linear4bit.forward does on CPUs with AVX512-BF16 in eval mode without grad) keeps the
  layer on the fused path, and merge_and_unload still works;
* FusedLoraLinear.from_linear on a bitsandbytes Linear4bit hands it to from_bnb.
"""

import bitsandbytes as bnb
import pytest
import torch
from _peft_helpers import (N_LINEAR, batch, count_calls, fused_layers, load_dense_base, load_qlora_base, make_peft,
                           no_fallback_warning)
from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

import fused_lora as fl
from fused_lora.testing import relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from _peft_helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_frozen"))


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fl._common, "_warned", set())


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("load", [load_qlora_base, load_dense_base], ids=["qlora", "dense"])
def test_disable_adapter_runs_frozen_linear_and_gives_the_base_model(tiny_llama_dir, monkeypatch, load):
    inputs = batch()
    base_logits = logits(load(tiny_llama_dir).eval(), inputs)
    model = make_peft(load(tiny_llama_dir))
    fl.patch_peft_model(model)
    counts = count_calls(monkeypatch, "lora_linear", "frozen_linear", "bnb_forward")
    model.eval()  # eval without grad: the pass in which bitsandbytes repacks a 4-bit weight on AVX512-BF16 CPUs
    with model.disable_adapter():
        disabled = logits(model, inputs)
    assert counts == {"lora_linear": 0, "frozen_linear": N_LINEAR, "bnb_forward": 0}
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=0)
    enabled = logits(model, inputs)
    assert counts["lora_linear"] == N_LINEAR and relative_error(enabled, base_logits) > 1e-3


def test_merged_qlora_layers_run_frozen_linear_like_merged_peft(tiny_llama_dir, monkeypatch):
    plain = make_peft(load_qlora_base(tiny_llama_dir))
    fused = make_peft(load_qlora_base(tiny_llama_dir))
    fl.patch_peft_model(fused)
    for model in (plain, fused):
        model.merge_adapter()
    counts = count_calls(monkeypatch, "lora_linear", "frozen_linear", "bnb_forward")
    fused_logits = logits(fused, batch())
    assert counts == {"lora_linear": 0, "frozen_linear": N_LINEAR, "bnb_forward": 0}
    torch.testing.assert_close(fused_logits, logits(plain, batch()), rtol=0, atol=0)
    with fused.disable_adapter():  # PEFT unmerges a disabled layer before running its base
        fused(**batch())
    assert not any(layer.merged for layer in fused_layers(fused))


def repack_for_cpu_inference(model) -> int:
    """What bitsandbytes' Linear4bit.forward does in eval mode without grad on a CPU with AVX512-BF16."""
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.data, _ = _convert_weight_packed_for_cpu(module.weight.data, module.weight.quant_state)
            count += 1
    return count


def test_nf4weight_reads_a_cpu_repacked_weight_back():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    state = layer.weight.quant_state
    canonical = fl.NF4Weight.from_bnb(layer.weight.data, state)
    packed, absmax = canonical.packed.clone(), canonical.absmax_fp32().clone()
    layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, state)
    repacked = fl.NF4Weight.from_bnb(layer.weight.data, state)
    assert torch.equal(repacked.packed, packed), "every 4-bit code is read back in place"
    assert torch.equal(repacked.absmax, absmax.to(torch.bfloat16).float()), "the scales as bitsandbytes rounded them"
    assert repacked.dtype == torch.float32 and not repacked.double_quant


def test_cpu_repack_keeps_the_fused_path_and_merge_works(tiny_llama_dir, monkeypatch, fresh_warnings):
    inputs = batch(seed=3)
    fused = make_peft(load_qlora_base(tiny_llama_dir))
    fl.patch_peft_model(fused)
    before = logits(fused, inputs)
    assert repack_for_cpu_inference(fused) == N_LINEAR
    counts = count_calls(monkeypatch, "lora_linear", "bnb_forward")
    with no_fallback_warning():
        loss = fused(**inputs).loss
        loss.backward()
    assert counts == {"lora_linear": N_LINEAR, "bnb_forward": 0}
    assert all(p.grad is not None for n, p in fused.named_parameters() if p.requires_grad)
    after = logits(fused, inputs)
    assert 0 < relative_error(after, before) < 1e-2, "the same weight up to bitsandbytes' bf16 rounding of absmax"
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in fused.modules() if isinstance(m, bnb.nn.Linear4bit)), "the fused path changes nothing"

    # merge: PEFT dequantizes the canonical layout, so the fused layer restores it first (as bitsandbytes does
    # before saving); the same sequence by hand on a plain PEFT model gives the same merged model.
    plain = make_peft(load_qlora_base(tiny_llama_dir))
    repack_for_cpu_inference(plain)
    for module in plain.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state)
    merged_fused, merged_plain = fused.merge_and_unload(), plain.merge_and_unload()
    merged_logits = logits(merged_fused, inputs)
    torch.testing.assert_close(merged_logits, logits(merged_plain, inputs), rtol=0, atol=0)
    # against a merge that never saw a repack: bf16 absmax rounding moves a few codes (0.03 measured); a merge of
    # the repacked layout as if it were canonical gives 0.73
    never_repacked = logits(make_peft(load_qlora_base(tiny_llama_dir)).merge_and_unload(), inputs)
    assert relative_error(merged_logits, never_repacked) < 0.1


def test_from_linear_on_a_linear4bit_dispatches_to_from_bnb():
    q = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = fl.FusedLoraLinear.from_linear(q, r=4, lora_alpha=8)
    assert layer.weight.packed.data_ptr() == q.weight.data_ptr() and layer.compute_dtype == torch.float32
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), q(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="from_linear: got a bitsandbytes Linear4bit.*FusedLoraLinear.from_bnb"):
        fl.FusedLoraLinear.from_linear(q, quant=None)
    with pytest.raises(TypeError, match="from_linear: got a bitsandbytes Linear8bitLt"):
        fl.FusedLoraLinear.from_linear(bnb.nn.Linear8bitLt(64, 96))


def test_an_offloaded_base_runs_peft_forward_with_one_warning(fresh_warnings):
    """A base whose weight lives on the meta device between calls (accelerate's offloading: a pre-forward hook of
    the base layer loads it) is left to PEFT's forward, which calls the base layer, with one warning naming the case;
    the fused forward would read the meta weight."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), LoraConfig(r=2, target_modules=["0"],
                                                                                   init_lora_weights=False))
    base = model.base_model.model[0].base_layer
    real = base.weight

    def load(module, args):  # what accelerate's AlignDevicesHook does for an offloaded module
        module.weight = real

    def unload(module, args, output):
        module.weight = torch.nn.Parameter(real.to("meta"), requires_grad=False)

    real.requires_grad_(False)
    base.register_forward_pre_hook(load)
    base.register_forward_hook(unload)
    x = torch.randn(3, 16)
    expected = model(x)
    fl.patch_peft_model(model)
    with pytest.warns(RuntimeWarning, match="a base weight on the meta device"):
        got = model(x)
    assert torch.equal(got, expected)


class _DoubledLinear(torch.nn.Linear):
    """An nn.Linear subclass whose forward is not x·Wᵀ + b (as transformers' quantized linears: scales, unpacking)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_a_linear_subclass_with_its_own_forward_stays_with_peft():
    """The fused path computes x·Wᵀ + b from the weight alone: a subclass that computes something else was fused
    anyway (a quantized one crashed on its int8 weight, or under autocast gave silently wrong numbers)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(_DoubledLinear(16, 8), torch.nn.Linear(8, 8)),
                           LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    x = torch.randn(3, 16)
    expected = model(x)
    assert fl.patch_peft_model(model) == 1  # the plain nn.Linear only
    assert torch.allclose(model(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["base_layer", "lora_A"])
def test_forward_hooks_on_the_modules_the_fused_path_reads_hand_the_call_to_peft(where, fresh_warnings):
    """The fused forward reads the base layer's and the adapters' weights without calling them, so their hooks (a
    user's; DeepSpeed ZeRO-3 gathers parameters in such hooks) did not run: now PEFT's forward runs, with one
    warning naming them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                           LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    hooked = layer.base_layer if where == "base_layer" else layer.lora_A["default"]
    calls = []
    hooked.register_forward_pre_hook(lambda module, args: calls.append(1) or (2.0 * args[0],))
    x = torch.randn(3, 16)
    expected = model(x)
    fl.patch_peft_model(model)
    with pytest.warns(RuntimeWarning, match="forward hooks on"):
        got = model(x)
    assert torch.equal(got, expected) and len(calls) == 2


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_a_bitsandbytes_checkpoint_with_another_quant_storage_loads(storage):
    """bitsandbytes stores the packed bytes in quant_storage's dtype (bf16 in the FSDP-QLoRA recipe): read as
    floats some of them are NaN or inf, which from_state_dict refused as non-finite values."""
    import io

    torch.manual_seed(0)
    layer4 = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer4.load_state_dict(torch.nn.Linear(128, 96).state_dict())
    layer4 = layer4.to("cpu")
    expected = bnb.functional.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state)
    buffer = io.BytesIO()
    torch.save(layer4.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["weight"].dtype == storage
    weight = fl.NF4Weight.from_state_dict(state)
    assert torch.equal(weight.dequantize(torch.float32), expected)
    fused = fl.FusedLoraLinear(128, 96, r=4, compute_dtype=torch.float32)
    fused.load_state_dict(state, strict=False)
    assert torch.equal(fused.weight.dequantize(torch.float32), expected)


def test_keep_bnb_cpu_layout_keeps_bitsandbytes_from_repacking_a_reference():
    """bitsandbytes repacks a Linear4bit's weight in place at its first eval, no-grad forward on a CPU with
    AVX512-BF16 (bf16 scales, its own layout): keep_bnb_cpu_layout turns that off, so a reference model stays
    dequantize + matmul of the weight it was given on every CPU (the CPU check forced on here, whatever it says)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu"))
    model[0].support_avx512bf16_for_cpu = True
    assert fl.bnb_compat.keep_bnb_cpu_layout(model) == 1 and model[0].support_avx512bf16_for_cpu is False
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = model.eval()(x)
    state = model[0].weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)
    weight = bnb.functional.dequantize_4bit(model[0].weight.data, state)
    assert relative_error(y, x @ weight.t() + model[0].bias) < 1e-6
