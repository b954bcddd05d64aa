"""Every bad input to the public API gets a clear error: one case per entry point and kind of mistake, each asserting
the exception type and that the message names the problem (the function, the argument or key, what was expected).

Entry points: quantize_nf4, dequantize_nf4, NF4Weight(...), NF4Weight.from_bnb / from_state_dict / to,
lora_linear, frozen_linear, FusedLoraLinear(...) / from_linear / from_bnb / load_state_dict / forward /
merge / unmerge, patch_peft_model, unpatch_peft_model, register_fused_lora, the optimizers' constructors, step()
and load_state_dict, and the command line. A case is (callable, exception type, regex for the message)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fused_lora as fl
from fused_lora import functional
from fused_lora import optim as fo
from fused_lora.nf4 import NF4Weight

np = pytest.importorskip("numpy")

K, N, R = 64, 40, 4


def _w():
    return fl.quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(0)))


def _sd(**fields):
    """An NF4 state dict under prefix "l." with quant-state fields replaced (a value None deletes the field)."""
    sd = _w().state_dict("l.")
    key = "l.weight.quant_state.bitsandbytes__nf4"
    if fields:
        state = json.loads(bytes(sd[key].tolist()).decode("utf-8"))
        state.update(fields)
        state = {k: v for k, v in state.items() if v is not None}
        sd[key] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return sd


def _sd_with(key, value):
    sd = _sd()
    sd["l." + key] = value
    return sd


def _bnb_state(weight=None, double_quant=True):
    F = pytest.importorskip("bitsandbytes").functional
    weight = torch.randn(N, K) if weight is None else weight
    return F.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant)


def _ctor(**changes):
    w = _w()
    args = dict(packed=w.packed, shape=w.shape, dtype=w.dtype, blocksize=w.blocksize, code=w.code, absmax=w.absmax,
                offset=w.offset, nested_absmax=w.nested_absmax, nested_code=w.nested_code)  # fmt: skip
    args.update(changes)
    return NF4Weight(**args)


NF4_CASES = {
    "quantize-not-a-tensor": (lambda: fl.quantize_nf4([[1.0]]), TypeError, "quantize_nf4: weight must be a torch.Tensor"),
    "quantize-int-weight": (lambda: fl.quantize_nf4(torch.ones(4, 4, dtype=torch.int32)), TypeError,
                            "weight must be float32, float16, bfloat16, got torch.int32"),
    "quantize-empty": (lambda: fl.quantize_nf4(torch.empty(0, 8)), ValueError, "weight of shape \\(0, 8\\) is empty"),
    "quantize-nan": (lambda: fl.quantize_nf4(torch.tensor([[1.0, math.nan]])), ValueError, "NaN or inf"),
    "quantize-blocksize-48": (lambda: fl.quantize_nf4(torch.randn(4, 64), blocksize=48), ValueError,
                              "blocksize 48 is not supported; bitsandbytes accepts 32, 64"),
    "quantize-blocksize-float": (lambda: fl.quantize_nf4(torch.randn(4, 64), blocksize=64.0), ValueError,
                                 "blocksize 64.0 is not supported"),
    "quantize-numpy-blocksize-48": (lambda: fl.quantize_nf4(torch.randn(4, 64), blocksize=np.int64(48)), ValueError,
                                    "blocksize 48 is not supported"),
    "quantize-double-quant-str": (lambda: fl.quantize_nf4(torch.randn(4, 64), double_quant="yes"), TypeError,
                                  "double_quant must be True or False, got 'yes'"),
    "quantize-meta": (lambda: fl.quantize_nf4(torch.empty(4, 64, device="meta")), ValueError,
                      "quantize_nf4: weight is on the meta device"),
    "quantize-unknown-backend": (lambda: fl.quantize_nf4(torch.randn(4, 64), backend="gpu"), ValueError,
                                 "quantize_nf4: unknown backend 'gpu'; expected one of"),
    "quantize-double-quant-overflow": (lambda: fl.quantize_nf4(torch.full((8, 64), 1e38)), ValueError,
                                       "double quantization cannot store the block scales.*double_quant=False"),
    "dequantize-not-nf4": (lambda: fl.dequantize_nf4(torch.randn(4, 4)), TypeError,
                           "dequantize_nf4: expected an NF4Weight, got Tensor"),
    "dequantize-dtype-str": (lambda: fl.dequantize_nf4(_w(), "float16"), TypeError,
                             "dtype must be one of float32, float16, bfloat16, float64, got 'float16'"),
    "dequantize-int-dtype": (lambda: _w().dequantize(torch.int8), TypeError, "dtype must be one of .*got torch.int8"),
    "dequantize-unknown-backend": (lambda: fl.dequantize_nf4(_w(), backend="gpu"), ValueError,
                                   "dequantize_nf4: unknown backend 'gpu'"),
    "ctor-packed-not-tensor": (lambda: _ctor(packed=[1, 2]), TypeError, "NF4Weight: packed must be a torch.Tensor"),
    "ctor-shape-str": (lambda: _ctor(shape="40x64"), TypeError, "NF4Weight: shape must be a sequence of integers"),
    "ctor-wrong-packed-size": (lambda: _ctor(shape=(N, K + 2)), ValueError, "packed must be uint8 of shape"),
    "ctor-bad-dtype": (lambda: _ctor(dtype=torch.int8), TypeError, "NF4Weight: dtype must be one of"),
    "ctor-blocksize": (lambda: _ctor(blocksize=100), ValueError, "NF4Weight: blocksize 100 is not supported"),
    "ctor-half-nested": (lambda: _ctor(offset=None), ValueError,
                         "offset, nested_absmax and nested_code must be given together"),
    "ctor-nested-blocksize": (lambda: NF4Weight(**{**_ctor().__dict__, "nested_blocksize": 0}), ValueError,
                              "nested_blocksize must be an integer >= 1, got 0"),
    "from-bnb-none-state": (lambda: NF4Weight.from_bnb(_bnb_state()[0], None), TypeError,
                            "from_bnb: quant_state must be a bitsandbytes.functional.QuantState.*got NoneType"),
    "from-bnb-packed-list": (lambda: NF4Weight.from_bnb([1, 2], _bnb_state()[1]), TypeError,
                             "from_bnb: packed must be the packed weight tensor, got list"),
    "from-bnb-offset-inf": (lambda: NF4Weight.from_bnb(*_bnb_state(torch.full((8, 64), 1e38))), ValueError,
                            "from_bnb: the QuantState's offset holds NaN or inf"),
    "from-sd-not-mapping": (lambda: NF4Weight.from_state_dict([1], "l."), TypeError,
                            "from_state_dict: state_dict must be a mapping"),
    "from-sd-missing-key": (lambda: NF4Weight.from_state_dict(_sd(), "other."), KeyError, "missing key 'other.weight"),
    "from-sd-bad-dtype-name": (lambda: NF4Weight.from_state_dict(_sd(dtype="float99"), "l."), ValueError,
                               "the quant state's dtype 'float99' is not one of float32, float16, bfloat16"),
    "from-sd-missing-offset": (lambda: NF4Weight.from_state_dict(_sd(nested_offset=None), "l."), ValueError,
                               "quant state in l.weight.quant_state.bitsandbytes__nf4 has no nested_offset"),
    "from-sd-nan-offset": (lambda: NF4Weight.from_state_dict(_sd(nested_offset=math.nan), "l."), ValueError,
                           "nested_offset is nan; it must be a finite number"),
    "from-sd-missing-shape": (lambda: NF4Weight.from_state_dict(_sd(shape=None), "l."), ValueError, "has no shape"),
    "from-sd-quant-type": (lambda: NF4Weight.from_state_dict(_sd(quant_type="fp4"), "l."), ValueError,
                           "quant_type is 'fp4'; only 'nf4'"),
    "from-sd-not-json": (lambda: NF4Weight.from_state_dict(
        _sd_with("weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2], dtype=torch.uint8)), "l."), ValueError,
        "l.weight.quant_state.bitsandbytes__nf4 is not bitsandbytes' quant state"),
    "from-sd-nan-nested-absmax": (lambda: NF4Weight.from_state_dict(
        _sd_with("weight.nested_absmax", torch.tensor([math.nan])), "l."), ValueError,
        "l.weight.nested_absmax holds NaN or inf"),
    "from-sd-entry-not-tensor": (lambda: NF4Weight.from_state_dict(_sd_with("weight.absmax", [1, 2]), "l."),
                                 TypeError, "l.weight.absmax must be a tensor, got list"),
    "from-sd-short-absmax": (lambda: NF4Weight.from_state_dict(
        _sd_with("weight.absmax", _w().absmax[:-1]), "l."), ValueError, "absmax must be uint8 \\[40\\]"),
    "to-dtype": (lambda: _w().to(torch.float16), TypeError, "NF4Weight.to: got the dtype torch.float16"),
    "to-bad-device": (lambda: _w().to("gpu"), ValueError, "NF4Weight.to: 'gpu' is not a device"),
}


@pytest.mark.parametrize("case", list(NF4_CASES))
def test_nf4_entry_points_name_the_problem(case):
    fn, error, match = NF4_CASES[case]
    with pytest.raises(error, match=match):
        fn()


def _layer(**kwargs):
    return fl.FusedLoraLinear(K, N, r=R, compute_dtype=torch.float32, **kwargs)


def _loaded(layer, sd, strict=True):
    return layer.load_state_dict(sd, strict=strict)


def _without(sd, *keys):
    return {k: v for k, v in sd.items() if k not in keys}


def _fake_bnb_linear():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Linear4bit(K, N, quant_type="fp4").to("cpu")


MODULE_CASES = {
    "ctor-r-zero": (lambda: fl.FusedLoraLinear(K, N, r=0), ValueError,
                    "FusedLoraLinear: r must be an integer >= 1, got 0"),
    "ctor-in-features-float": (lambda: fl.FusedLoraLinear(64.0, N), ValueError, "in_features must be an integer"),
    "ctor-alpha-str": (lambda: _layer(lora_alpha="16"), TypeError, "lora_alpha must be a number, got str '16'"),
    "ctor-alpha-nan": (lambda: _layer(lora_alpha=math.nan), ValueError, "lora_alpha must be a finite number"),
    "ctor-dropout-one": (lambda: _layer(lora_dropout=1.0), ValueError, "lora_dropout must be in \\[0, 1\\), got 1.0"),
    "ctor-quant-fp4": (lambda: _layer(quant="fp4"), ValueError, "quant must be 'nf4' or None, got 'fp4'"),
    "ctor-blocksize": (lambda: _layer(blocksize=100), ValueError, "FusedLoraLinear: blocksize 100 is not supported"),
    "ctor-compute-dtype-str": (lambda: fl.FusedLoraLinear(K, N, compute_dtype="bf16"), ValueError,
                               "compute_dtype must be one of .*got 'bf16'"),
    "ctor-adapter-dtype-int": (lambda: _layer(adapter_dtype=torch.int8), ValueError,
                               "adapter_dtype must be a floating-point dtype"),
    "ctor-backend": (lambda: _layer(backend="gpu"), ValueError, "FusedLoraLinear: unknown backend 'gpu'"),
    "ctor-bias-str": (lambda: _layer(bias="yes"), TypeError, "bias must be True or False, got 'yes'"),
    "ctor-double-quant-str": (lambda: _layer(double_quant="no"), TypeError,
                              "double_quant must be True or False, got 'no'"),
    "ctor-rslora-str": (lambda: _layer(use_rslora="no"), TypeError, "use_rslora must be True or False, got 'no'"),
    "ctor-nf4-on-meta": (lambda: _layer(device="meta"), ValueError,
                         "quant='nf4' quantizes the weight's values and the meta device has none"),
    "from-linear-not-linear": (lambda: fl.FusedLoraLinear.from_linear(torch.nn.Conv1d(3, 3, 1)), TypeError,
                               "from_linear: expected an nn.Linear, got Conv1d"),
    "from-linear-r-zero": (lambda: fl.FusedLoraLinear.from_linear(torch.nn.Linear(K, N), r=0), ValueError,
                           "r must be an integer >= 1"),
    "from-bnb-plain-linear": (lambda: fl.FusedLoraLinear.from_bnb(torch.nn.Linear(K, N)), ValueError,
                              "from_bnb: Linear has no quantized weight"),
    "from-bnb-fp4": (lambda: fl.FusedLoraLinear.from_bnb(_fake_bnb_linear()), ValueError,
                     "only NF4 is supported, got quant_type='fp4'"),
    "forward-int-x": (lambda: _layer()(torch.ones(2, K, dtype=torch.long)), TypeError,
                      "x must be a floating-point tensor, got torch.int64"),
    "forward-wrong-features": (lambda: _layer()(torch.randn(2, K - 1)), ValueError, "x has 63 features, expected 64"),
    "forward-not-tensor": (lambda: _layer()([1.0]), TypeError, "x must be a torch.Tensor, got list"),
    "forward-0d": (lambda: _layer()(torch.tensor(1.0)), ValueError, "x is a 0-d tensor"),
    "forward-meta-x": (lambda: _layer(quant=None)(torch.empty(2, K, device="meta")), ValueError,
                       "FusedLoraLinear: x is on the meta device"),
    "forward-meta-layer": (lambda: _layer(quant=None, device="meta")(torch.randn(2, K)), ValueError,
                           "x is on cpu but the layer is on meta"),
    "load-wrong-shape": (lambda: _loaded(_layer(), fl.FusedLoraLinear(K - 1, N, r=R).state_dict()), RuntimeError,
                         "size mismatch for weight: the checkpoint has shape \\(40, 63\\)"),
    "load-missing-absmax": (lambda: _loaded(_layer(), _without(_layer().state_dict(), "weight.absmax")),
                            RuntimeError, 'Missing key\\(s\\) in state_dict: "weight.absmax"'),
    "load-unexpected-weight-key": (lambda: _loaded(_layer(), {**_layer().state_dict(), "weight.x": torch.ones(1)}),
                                   RuntimeError, 'Unexpected key\\(s\\) in state_dict: "weight.x"'),
    "load-dense-weight-not-tensor": (lambda: _loaded(_layer(quant=None), {**_layer(quant=None).state_dict(),
                                                                           "weight": [1.0]}),
                                     RuntimeError, "could not load weight: a dense weight must be a floating-point"),
    "load-bad-quant-dtype": (lambda: _loaded(_layer(), {**_layer().state_dict(), **{
        k.replace("l.", ""): v for k, v in _sd(dtype="float99").items() if "quant_state" in k}}), RuntimeError,
        "could not load weight: .*dtype 'float99'"),
    "merge-requantize-str": (lambda: _layer().merge(requantize="no"), TypeError,
                             "merge: requantize must be True or False, got 'no'"),
    "enable-adapters-str": (lambda: _layer().enable_adapters("no"), TypeError,
                            "enable_adapters: enabled must be True or False, got 'no'"),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_layer_entry_points_name_the_problem(case):
    fn, error, match = MODULE_CASES[case]
    with pytest.raises(error, match=match):
        fn()
