"""DoRA against PEFT's own DoRA (use_dora=True): patched PEFT models over a tiny Llama loaded in 4-bit (bitsandbytes
NF4 on the CPU) and dense, and FusedLoraLinear(use_dora=True) against a PEFT DoRA layer over the same base.

fp32 everywhere, so the fused layers must give PEFT's loss, logits and every LoRA gradient (lora_A, lora_B and the
magnitude vector) to 1e-5 relative; merge_and_unload must give PEFT's merged weights; adapters saved by either side
load into the other. Models stay in training mode (or run eval with grad enabled): bitsandbytes repacks a 4-bit
weight for its CPU inference kernel in an eval, no-grad pass, which is a different computation on PEFT's side.
"""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fused_lora as fl
from fused_lora import dora, reference
from fused_lora.testing import relative_error

TIGHT = 1e-5
N_LINEAR = 2 * 7
VOCAB = 128

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama_dora")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_base(path, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    fl.bnb_compat.keep_bnb_cpu_layout(model)  # an exact bitsandbytes reference on CPUs with AVX512-BF16 too
    return model.train()


def make_dora(path, quantized: bool, seed=1, **overrides):
    from peft import LoraConfig, get_peft_model

    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                   use_dora=True)
    options.update(overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(load_base(path, quantized), LoraConfig(**options)).train()
    # PEFT starts the magnitude at the row norms (c = 1); move it so every DoRA term matters
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.75 + 0.5 * torch.rand(p.shape, generator=generator))
    return model


def batch(seed=2, batch_size=2, length=23):
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def step(model, inputs):
    """Loss, logits and the LoRA gradients keyed by parameter name without the adapter name."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.[^.]+\.", r".\1.", name): p.grad.clone()
             for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_same_step(fused_model, peft_model, inputs):
    fused_loss, fused_logits, fused_grads = step(fused_model, inputs)
    peft_loss, peft_logits, peft_grads = step(peft_model, inputs)
    assert abs(fused_loss.item() - peft_loss.item()) <= TIGHT * abs(peft_loss.item())
    errors = {"logits": relative_error(fused_logits, peft_logits)}
    assert fused_grads.keys() == peft_grads.keys() and len(peft_grads) == 3 * N_LINEAR
    assert sum("lora_magnitude_vector" in name for name in peft_grads) == N_LINEAR
    errors.update({name: relative_error(fused_grads[name], grad) for name, grad in peft_grads.items()})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TIGHT, (worst, errors[worst])
    return errors


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fl._common, "_warned", set())


def spy_dora_linear(monkeypatch):
    calls = []
    real = fl.peft_routes.dora_linear
    monkeypatch.setattr(fl.peft_routes, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def no_fallback(record):
    fallbacks = [str(w.message) for w in record if "PEFT's own forward" in str(w.message)]
    assert not fallbacks, fallbacks


# ------------------------------------------------------------------------------------------- training parity


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_dora_training_step_matches_peft(tiny_llama_dir, quantized, monkeypatch, fresh_warnings):
    peft_model = make_dora(tiny_llama_dir, quantized)
    fused_model = make_dora(tiny_llama_dir, quantized)
    assert fl.patch_peft_model(fused_model) == N_LINEAR
    calls = spy_dora_linear(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        errors = assert_same_step(fused_model, peft_model, batch())
    no_fallback(record)
    assert len(calls) == N_LINEAR
    # a second step after an optimizer update of both (the row-norm cache must follow A and B)
    for model in (fused_model, peft_model):
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.5 * p.grad)
    assert_same_step(fused_model, peft_model, batch(seed=3))
    print({k: f"{v:.1e}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:3]})


def test_dora_in_eval_mode_ignores_dropout_as_peft_does(tiny_llama_dir):
    peft_model = make_dora(tiny_llama_dir, True, lora_dropout=0.2).eval()
    fused_model = make_dora(tiny_llama_dir, True, lora_dropout=0.2).eval()
    fl.patch_peft_model(fused_model)
    inputs = batch(seed=4)
    assert relative_error(fused_model(**inputs).logits, peft_model(**inputs).logits) <= TIGHT


@pytest.mark.parametrize("backend, M", [("auto", 11), ("triton", 11), ("triton", 80)],
                         ids=["auto", "triton-decode", "triton-fused"])
def test_dora_dropout_follows_peft_with_the_same_mask(backend, M, monkeypatch, request):
    """One PEFT DoRA layer trains with dropout: PEFT's second frozen product over the dropped input. The PEFT side gets
    the very mask the fused side draws (a module multiplying by it: the reference's generator on the CPU backend, the
    kernels' on Triton, composed at decode sizes and in two fused GEMMs above), so both must agree to fp32
    rounding."""
    from peft import LoraConfig, get_peft_model

    K, N, p = 64, 37, 0.3
    if backend == "triton":
        request.getfixturevalue("interpret_triton")
        monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")

    def make():
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(K, N)), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"], init_lora_weights=False, use_dora=True))
        with torch.no_grad():
            model.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.3)
        return model.train()

    peft_model, fused_model = make(), make()
    fl.patch_peft_model(fused_model)
    torch.manual_seed(21)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if backend == "triton":
        from fused_lora.kernels import lora

        mask = lora.dropout_mask(seed, M, K, p, "cpu")
        assert lora.fuses_dora_dropout(M, torch.empty(N, K), torch.device("cpu")) == (M == 80)
    else:
        mask = reference.dropout_mask((M, K), p, seed, "cpu")

    class FixedMask(nn.Module):
        def forward(self, x):
            return x * mask

    peft_model.base_model.model[0].lora_dropout["default"] = FixedMask()
    x = torch.randn(M, K)
    torch.manual_seed(21)
    y_fused = fused_model(x)
    y_peft = peft_model(x)
    assert relative_error(y_fused, y_peft) <= TIGHT
    g = torch.randn_like(y_peft)
    fused_params = [p_ for p_ in fused_model.parameters() if p_.requires_grad]
    peft_params = [p_ for p_ in peft_model.parameters() if p_.requires_grad]
    assert len(peft_params) == 3
    for ours, theirs in zip(torch.autograd.grad(y_fused, fused_params, g), torch.autograd.grad(y_peft, peft_params, g)):
        assert relative_error(ours, theirs) <= TIGHT


# ------------------------------------------------------------------------------------------- merge, save, load


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_dora_merge_and_unload_gives_peft_merge(tiny_llama_dir, quantized):
    peft_model = make_dora(tiny_llama_dir, quantized)
    fused_model = make_dora(tiny_llama_dir, quantized)
    fl.patch_peft_model(fused_model)
    inputs = batch(seed=5)
    with torch.no_grad():
        before = fused_model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "Merge lora module to 4-bit linear may get different.."
        merged_fused = fused_model.merge_and_unload()
        merged_peft = peft_model.merge_and_unload()

    def weights(model):
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model."):
                w = module.weight
                out[name] = (fl.NF4Weight.from_bnb(w.data, w.quant_state).dequantize(torch.float32)
                             if hasattr(w, "quant_state") and w.quant_state is not None else w.detach())
        return out

    fused_weights, peft_weights = weights(merged_fused), weights(merged_peft)
    assert len(peft_weights) == N_LINEAR
    for name, w in peft_weights.items():
        torch.testing.assert_close(fused_weights[name], w, rtol=0, atol=0)
    with torch.no_grad():
        after = merged_fused(**inputs).logits
        torch.testing.assert_close(after, merged_peft(**inputs).logits, rtol=0, atol=0)
    if quantized:  # bitsandbytes requantizes the merged weight: close to the adapter model, not equal
        assert 0 < relative_error(after, before) < 1.0
    else:
        assert relative_error(after, before) <= TIGHT


def test_dora_merge_then_unmerge_restores_the_fused_output(tiny_llama_dir):
    model = make_dora(tiny_llama_dir, False)
    fl.patch_peft_model(model)
    inputs = batch(seed=6)
    with torch.no_grad():
        before = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits  # the frozen route over the merged (DoRA-scaled) weight
        model.unmerge_adapter()
        after = model(**inputs).logits  # the row-norm cache must see the restored weight
    assert relative_error(merged, before) <= TIGHT
    assert relative_error(after, before) <= TIGHT


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_dora_adapters_save_and_load_in_peft_format_both_ways(tiny_llama_dir, quantized, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    inputs = batch(seed=7)
    fused_model = make_dora(tiny_llama_dir, quantized, seed=3)
    fl.patch_peft_model(fused_model)
    keys = get_peft_model_state_dict(fused_model).keys()
    assert sum("lora_magnitude_vector" in k for k in keys) == N_LINEAR
    fused_model.save_pretrained(tmp_path / "from_fused")
    plain = PeftModel.from_pretrained(load_base(tiny_llama_dir, quantized), tmp_path / "from_fused").train()
    with torch.no_grad():
        expected = fused_model(**inputs).logits
        assert relative_error(plain(**inputs).logits, expected) <= TIGHT

    peft_model = make_dora(tiny_llama_dir, quantized, seed=4)
    peft_model.save_pretrained(tmp_path / "from_peft")
    loaded = PeftModel.from_pretrained(load_base(tiny_llama_dir, quantized), tmp_path / "from_peft",
                                       is_trainable=True).train()
    assert fl.patch_peft_model(loaded) == N_LINEAR
    assert_same_step(loaded, peft_model, inputs)


# ------------------------------------------------------------------------------------------- FusedLoraLinear


@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "dense"])
def test_fused_lora_linear_dora_matches_a_peft_dora_layer(tiny_llama_dir, quantized):
    """FusedLoraLinear(use_dora=True) over a PEFT DoRA layer's own base, with its A, B and magnitude."""
    peft_model = make_dora(tiny_llama_dir, quantized)
    peft_layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    base = peft_layer.get_base_layer()
    options = dict(r=8, lora_alpha=16, use_dora=True, compute_dtype=torch.float32)
    layer = (fl.FusedLoraLinear.from_bnb(base, **options) if quantized
             else fl.FusedLoraLinear.from_linear(base, quant=None, **options))
    assert "use_dora=True" in repr(layer)
    # a fresh layer starts as PEFT does: magnitude = row norms of W (B = 0), so it computes its base
    x = torch.randn(3, 7, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    y, y_peft = layer(x), peft_layer(x)
    assert relative_error(y, y_peft) <= TIGHT
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), g)
    theirs = torch.autograd.grad(y_peft, (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                                          peft_layer.lora_magnitude_vector["default"].weight), g)
    for name, a, b in zip(("dA", "dB", "dmag"), ours, theirs):
        assert relative_error(a, b) <= TIGHT, name

    # merge: the merged weight is PEFT's DoRA merge, (mag / ‖W + s·B·A‖)⊙(W + s·B·A)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft_layer.merge()
    merged_peft = base.weight if not quantized else fl.NF4Weight.from_bnb(
        peft_layer.get_base_layer().weight.data, peft_layer.get_base_layer().weight.quant_state)
    merged_peft = merged_peft.dequantize(torch.float32) if quantized else merged_peft.detach()
    exact = layer.merged_weight(torch.float32)
    if quantized:  # PEFT requantizes to NF4; compare with our exact merged weight at NF4's rounding
        assert relative_error(merged_peft, exact) < 0.1
    else:
        assert relative_error(exact, merged_peft) <= 1e-6
    layer.merge(requantize=False)
    with torch.no_grad():
        assert relative_error(layer(x), y) <= TIGHT
    layer.unmerge()


def test_fused_lora_linear_dora_state_dict_round_trip_and_training():
    layer = fl.FusedLoraLinear(70, 45, r=4, lora_alpha=8, quant="nf4", compute_dtype=torch.float32, use_dora=True,
                               lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.2)
    state = layer.state_dict()
    assert state["lora_magnitude_vector"].shape == (45,)
    other = fl.FusedLoraLinear(70, 45, r=4, lora_alpha=8, quant="nf4", compute_dtype=torch.float32, use_dora=True)
    other.load_state_dict(state)
    x = torch.randn(5, 70)
    layer.eval(), other.eval()
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    layer.train()
    y = layer(x)
    grads = torch.autograd.grad(y.sum(), [p for p in layer.parameters() if p.requires_grad])
    assert len(grads) == 3 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # the fused layer is the dora_linear of its parameters
    layer.eval()
    expected = dora.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                layer.scaling)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["two-adapters", "dora"])
def test_a_trainable_base_is_the_reason_given_whatever_the_adapters(dora, fresh_warnings):
    """Several active adapters, or one DoRA adapter, over a base the fused path cannot take (a trainable dense W):
    the fallback warning names the base (it blamed "several active adapters" or the DoRA variant), and the numbers
    are PEFT's own."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 37)), LoraConfig(use_dora=dora, **config))
    if not dora:
        model.add_adapter("second", LoraConfig(**config))
        model.base_model.set_adapter(["default", "second"])
    model.base_model.model[0].get_base_layer().weight.requires_grad_(True)
    x = torch.randn(2, 5, 64)
    expected = model(x).detach()
    fl.patch_peft_model(model)
    with pytest.warns(RuntimeWarning, match="a trainable base weight") as record:
        torch.testing.assert_close(model(x).detach(), expected, rtol=0, atol=0)
    assert not [w for w in record if "several active adapters" in str(w.message) or "variant" in str(w.message)]
