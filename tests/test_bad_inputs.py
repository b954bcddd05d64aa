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
    "quantize-not-a-tensor": (lambda: fl.quantize_nf4([[1.0]]), TypeError,
                              "quantize_nf4: weight must be a torch.Tensor"),
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


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)


def _lora(x=None, weight=None, A=None, B=None, scaling=2.0, **kwargs):
    x = _x(3, K) if x is None else x
    weight = _w() if weight is None else weight
    A = _x(R, K) if A is None else A
    B = _x(N, R) if B is None else B
    return functional.lora_linear(x, weight, A, B, scaling, **kwargs)


LAYER_FUNCTION_CASES = {
    "x-not-a-tensor": (lambda: _lora(x=[1.0]), TypeError, "lora_linear: x must be a torch.Tensor, got list"),
    "x-int": (lambda: _lora(x=torch.ones(3, K, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    "x-wrong-features": (lambda: _lora(x=_x(3, K - 1)), ValueError, "lora_linear: x has 63 features, expected 64"),
    "x-0d": (lambda: _lora(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    "x-meta": (lambda: _lora(x=_x(3, K, device="meta")), ValueError, "lora_linear: x is on the meta device"),
    "weight-none": (lambda: functional.lora_linear(_x(3, K), None, _x(R, K), _x(N, R), 2.0), TypeError,
                    "weight must be an NF4Weight or a torch.Tensor, got NoneType"),
    "weight-3d": (lambda: _lora(weight=_x(2, N, K)), ValueError, "weight must be 2-D \[out, in\]"),
    "weight-other-dtype": (lambda: _lora(weight=_x(N, K, dtype=torch.float64)), TypeError,
                           "weight dtype torch.float64 differs from x dtype torch.float32"),
    "weight-requires-grad": (lambda: _lora(weight=_x(N, K).requires_grad_()), ValueError,
                             "the frozen weight requires grad"),
    "weight-zero-features": (lambda: functional.lora_linear(_x(3, 0), _x(N, 0), _x(R, 0), _x(N, R), 2.0),
                             ValueError, "the weight has 0 input features"),
    "weight-on-meta": (lambda: _lora(weight=_x(N, K, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    "lora-a-shape": (lambda: _lora(A=_x(R, K + 1)), ValueError,
                     "lora_A has shape \(4, 65\), expected \(r, in_features\) = \(r, 64\)$"),
    "lora-a-transposed": (lambda: _lora(A=_x(K, R)), ValueError,
                          "lora_A has shape \(64, 4\), expected \(r, in_features\) = \(r, 64\) \(transposed\?\)"),
    "lora-a-rank-zero": (lambda: _lora(A=_x(0, K), B=_x(N, 0)), ValueError,
                         "lora_A must be \(r, in_features\) with r >= 1"),
    "lora-b-shape": (lambda: _lora(B=_x(N + 1, R)), ValueError, "lora_B has shape \(41, 4\), expected \(40, 4\)"),
    "lora-a-half-beside-fp32": (lambda: _lora(A=_x(R, K, dtype=torch.float16)), TypeError,
                                "lora_A is torch.float16; with x in torch.float32 it must be float32"),
    "lora-b-list": (lambda: _lora(B=[1.0]), TypeError, "lora_B must be a torch.Tensor, got list"),
    "bias-shape": (lambda: _lora(bias=_x(N + 1)), ValueError, "bias has shape \(41,\), expected \(40,\)"),
    "bias-int": (lambda: _lora(bias=torch.ones(N, dtype=torch.long)), TypeError, "bias is torch.int64"),
    "scaling-nan": (lambda: _lora(scaling=math.nan), ValueError, "scaling must be finite, got nan"),
    "scaling-string": (lambda: _lora(scaling="2"), TypeError, "scaling must be a Python number .*got str '2'"),
    "scaling-bool": (lambda: _lora(scaling=True), TypeError, "scaling must be a Python number .*got bool"),
    "scaling-tensor": (lambda: _lora(scaling=torch.tensor(2.0)), TypeError, "scaling must be a Python number"),
    "dropout-one": (lambda: _lora(dropout_p=1.0), ValueError, "dropout_p must be in \[0, 1\), got 1.0"),
    "dropout-string": (lambda: _lora(dropout_p="0.5"), TypeError, "dropout_p must be a probability"),
    "training-string": (lambda: _lora(training="no"), TypeError, "training must be True or False, got 'no'"),
    "backend-unknown": (lambda: _lora(backend="gpu"), ValueError, "lora_linear: unknown backend 'gpu'"),
    "backend-env-unknown": (lambda: _with_env("FUSED_LORA_BACKEND", "fast", _lora), ValueError,
                            "FUSED_LORA_BACKEND: unknown backend 'fast'"),
    "double-backward": (lambda: _double_backward(), RuntimeError, "second derivatives are not supported"),
    "frozen-x-not-a-tensor": (lambda: functional.frozen_linear([1.0], _w()), TypeError,
                              "frozen_linear: x must be a torch.Tensor"),
    "frozen-wrong-features": (lambda: functional.frozen_linear(_x(3, K - 1), _w()), ValueError,
                              "frozen_linear: x has 63 features, expected 64"),
    "frozen-bias-shape": (lambda: functional.frozen_linear(_x(3, K), _w(), bias=_x(N + 1)), ValueError,
                          "frozen_linear: bias has shape \(41,\)"),
    "frozen-weight-string": (lambda: functional.frozen_linear(_x(3, K), "W"), TypeError,
                             "frozen_linear: weight must be an NF4Weight or a torch.Tensor, got str"),
    "frozen-weight-requires-grad": (lambda: functional.frozen_linear(_x(3, K), _x(N, K).requires_grad_()),
                                    ValueError, "frozen_linear: the frozen weight requires grad"),
    "frozen-meta-x": (lambda: functional.frozen_linear(_x(3, K, device="meta"), _w()), ValueError,
                      "frozen_linear: x is on the meta device"),
    "frozen-backend": (lambda: functional.frozen_linear(_x(3, K), _w(), backend="gpu"), ValueError,
                       "frozen_linear: unknown backend 'gpu'"),
}


def _with_env(name, value, fn):
    from unittest import mock

    with mock.patch.dict("os.environ", {name: value}):
        return fn()


def _double_backward():
    x = _x(3, K).requires_grad_()
    y = _lora(x=x, A=_x(R, K).requires_grad_(), B=_x(N, R).requires_grad_())
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    dx.sum().backward()


@pytest.mark.parametrize("case", list(LAYER_FUNCTION_CASES))
def test_layer_functions_name_the_problem(case):
    fn, error, match = LAYER_FUNCTION_CASES[case]
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
    "ctor-adapter-dtype-fp8": (lambda: _layer(adapter_dtype=torch.float8_e4m3fn), ValueError,
                               "adapter_dtype must be a floating-point dtype, one of .*got torch.float8_e4m3fn"),
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


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))


def _step(cls=fo.AdamW8bit, grad=None, **kwargs):
    p = _param(64, 80)
    opt = cls([p], **kwargs)
    p.grad = grad if grad is not None else torch.randn(64, 80)
    opt.step()
    return opt


def _with_grad_of(cls, grad):
    """A step where the gradient no longer matches its parameter (torch refuses such assignments through p.grad,
    but a grad replaced in place, e.g. by a hook or .data, reaches the optimizer)."""
    p = _param(64, 80)
    opt = cls([p])
    p.grad = torch.randn(64, 80)
    p.grad.data = grad
    opt.step()


def _load(cls, change):
    p = _param(64, 80)
    opt = cls([p])
    p.grad = torch.randn(64, 80)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = dict(sd["state"][0])
    change(sd["state"][0])
    opt.load_state_dict(sd)


OPTIMIZER_CASES = {
    "params-none": (lambda: fo.AdamW8bit(None), TypeError, "AdamW8bit: params must be an iterable of parameters"),
    "params-tensor": (lambda: fo.PagedAdamW(torch.randn(3)), TypeError, "PagedAdamW: params must be an iterable"),
    "lr-negative": (lambda: fo.AdamW8bit([_param(3)], lr=-1.0), ValueError,
                    "AdamW8bit: lr must be a finite number >= 0, got -1.0"),
    "lr-string": (lambda: fo.AdamW8bit([_param(3)], lr="1e-3"), ValueError,
                  "lr must be a finite number >= 0, got '1e-3'"),
    "lr-inf": (lambda: fo.PagedAdamW8bit([_param(3)], lr=math.inf), ValueError,
               "lr must be a finite number >= 0, got inf"),
    "eps-string": (lambda: fo.AdamW8bit([_param(3)], eps="x"), ValueError, "eps must be a finite number >= 0, got 'x'"),
    "eps-nan": (lambda: fo.PagedAdamW([_param(3)], eps=math.nan), ValueError, "eps must be a finite number >= 0"),
    "weight-decay-inf": (lambda: fo.AdamW8bit([_param(3)], weight_decay=math.inf), ValueError,
                         "weight_decay must be a finite number >= 0, got inf"),
    "betas-one": (lambda: fo.AdamW8bit([_param(3)], betas=(0.9, 1.0)), ValueError,
                  "betas must be two numbers in \\[0, 1\\), got \\(0.9, 1.0\\)"),
    "betas-string": (lambda: fo.AdamW8bit([_param(3)], betas="0.9"), ValueError,
                     "betas must be two numbers in \\[0, 1\\), got '0.9'"),
    "amsgrad": (lambda: fo.PagedAdamW([_param(3)], amsgrad=True), ValueError, "amsgrad=True is not supported"),
    "maximize": (lambda: fo.AdamW8bit([_param(3)], maximize=True), ValueError, "maximize=True is not supported"),
    "min-8bit-size-string": (lambda: fo.AdamW8bit([_param(3)], min_8bit_size="4096"), ValueError,
                             "min_8bit_size must be an integer >= 0, got '4096'"),
    "chunk-bytes-zero": (lambda: fo.PagedAdamW([_param(3)], chunk_bytes=0), ValueError,
                         "chunk_bytes must be an integer >= 1, got 0"),
    "gpu-budget-string": (lambda: fo.PagedAdamW8bit([_param(3)], gpu_budget_bytes="1G"), ValueError,
                          "gpu_budget_bytes must be an integer >= 0, got '1G'"),
    "page-min-bytes-negative": (lambda: fo.PagedAdamW([_param(3)], page_min_bytes=-1), ValueError,
                                "page_min_bytes must be an integer >= 0, got -1"),
    "backend": (lambda: fo.PagedAdamW([_param(3)], backend="gpu"), ValueError, "PagedAdamW: unknown backend 'gpu'"),
    "complex-param": (lambda: fo.AdamW8bit([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))]), ValueError,
                      "parameters must be real floating point"),
    "group-added-bad-lr": (lambda: fo.AdamW8bit([_param(3)]).add_param_group({"params": [_param(4)], "lr": -1}),
                           ValueError, "AdamW8bit: lr must be a finite number >= 0"),
    "step-grad-wrong-shape": (lambda: _with_grad_of(fo.AdamW8bit, torch.randn(80, 64)), RuntimeError,
                              "AdamW8bit: gradient shape \\(80, 64\\) != parameter \\(64, 80\\)"),
    "step-grad-sparse": (lambda: _step(grad=torch.randn(64, 80).to_sparse()), RuntimeError,
                         "AdamW8bit does not support sparse gradients"),
    "step-closure-not-callable": (lambda: fo.AdamW8bit([_param(3)]).step(closure=3), TypeError,
                                  "AdamW8bit.step: closure must be callable"),
    "step-triton-on-cpu": (lambda: _step_without_interpreter(), RuntimeError, "backend='triton' got cpu tensors"),
    "load-not-a-mapping": (lambda: fo.AdamW8bit([_param(3)]).load_state_dict([1]), TypeError,
                           "AdamW8bit.load_state_dict: expected a state dict \\(a mapping\\), got list"),
    "load-groups-mismatch": (lambda: fo.AdamW8bit([_param(3), _param(4)]).load_state_dict(
        fo.AdamW8bit([_param(3)]).state_dict()), ValueError, "parameter groups do not match"),
    "load-absmax-size": (lambda: _load(fo.AdamW8bit, lambda s: s.update(absmax1=s["absmax1"][:-1])), ValueError,
                         "absmax1 of parameter 0 has 19 values"),
    "load-qmap-size": (lambda: _load(fo.AdamW8bit, lambda s: s.update(qmap2=s["qmap2"][:100])), ValueError,
                       "qmap2 of parameter 0 has 100 values"),
    "load-step-negative": (lambda: _load(fo.AdamW8bit, lambda s: s.update(step=-3)), ValueError,
                           "step of parameter 0 is -3"),
    "load-step-nan": (lambda: _load(fo.PagedAdamW8bit, lambda s: s.update(step=math.nan)), ValueError,
                      "step of parameter 0 is nan"),
    "load-moment-size": (lambda: _load(fo.AdamW8bit, lambda s: s.update(state2=s["state2"][:10])), ValueError,
                         r"state2 of parameter 0 has shape \(10, 80\), the parameter has shape \(64, 80\)"),
    "load-torch-into-8bit": (lambda: _load(fo.AdamW8bit, lambda s: [s.pop(k) for k in ("state1", "state2")]),
                             ValueError, "the state of parameter 0 has no state1, state2"),
}


def _step_without_interpreter():
    """backend='triton' for CPU parameters when Triton's interpreter is off."""
    from unittest import mock

    with mock.patch.dict("os.environ", {"TRITON_INTERPRET": "0"}):
        _step(fo.AdamW8bit, backend="triton")


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_entry_points_name_the_problem(case):
    if "Paged" in case or "chunk" in case or "page-min" in case or "gpu-budget" in case or case == "backend":
        pytest.importorskip("fused_lora._C")
    fn, error, match = OPTIMIZER_CASES[case]
    with pytest.raises(error, match=match):
        fn()


def _peft_model():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(K, N))
    return get_peft_model(base, LoraConfig(r=R, target_modules=["0"]))


PEFT_CASES = {
    "patch-none": (lambda: fl.patch_peft_model(None), TypeError, "patch_peft_model: expected a PEFT model"),
    "patch-string": (lambda: fl.patch_peft_model("model"), TypeError, "patch_peft_model: expected a PEFT model"),
    "unpatch-none": (lambda: fl.peft.unpatch_peft_model(None), TypeError, "unpatch_peft_model: expected a PEFT model"),
    "register-dict": (lambda: fl.peft.register_fused_lora({"r": 8}), TypeError,
                      "register_fused_lora: expected a peft.LoraConfig, got dict"),
    "register-model": (lambda: fl.peft.register_fused_lora(_peft_model()), TypeError,
                       "register_fused_lora: expected a peft.LoraConfig"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_entry_points_name_the_problem(case):
    fn, error, match = PEFT_CASES[case]
    with pytest.raises(error, match=match):
        fn()


def test_patching_a_model_without_lora_layers_warns_instead_of_silently_returning_zero():
    with pytest.warns(UserWarning, match="patch_peft_model: Sequential has no PEFT LoRA layer"):
        assert fl.patch_peft_model(torch.nn.Sequential(torch.nn.Linear(K, N))) == 0
    assert fl.patch_peft_model(_peft_model()) == 1  # no warning with LoRA layers


# The command line: each unusable argument is one line and exit status 2 (argparse's usage errors go to stderr).
CLI_CASES = {
    "demo-steps-zero": (["demo", "--steps", "0"], "--steps must be at least 1"),
    "demo-steps-text": (["demo", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    "demo-lr-nan": (["demo", "--lr", "nan"], "--lr must be a positive number"),
    "demo-device": (["demo", "--device", "gpu"], "fused-lora demo: --device 'gpu' is not a device"),
    "demo-model-missing": (["demo", "--model", "/nonexistent/model"], "--model /nonexistent/model is not a directory"),
    "demo-data-missing": (["demo", "--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl: no such file"),
    "demo-output-is-a-file": (["demo", "--output", "{file}"], "exists and is not a directory"),
    "check-device": (["check", "--device", "tpu"], "fused_lora check: --device 'tpu' is not a device"),
    "check-backend": (["check", "--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
    "info-option": (["info", "--bogus"], "unrecognized arguments: --bogus"),
    "bench-option": (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    "unknown-command": (["train"], "train"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_line_names_the_problem_in_one_line(case, tmp_path, capsys):
    from fused_lora.__main__ import main

    argv, message = CLI_CASES[case]
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    if argv[0] == "demo" and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    assert message in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_a_backend_error_names_the_environment_variable_that_chose_the_backend(monkeypatch):
    """With FUSED_LORA_BACKEND set and backend left at "auto", a mismatch used to blame backend='cpu' (an argument
    the caller never passed) and advise backend='auto' (what the caller did)."""
    from fused_lora.backend import resolve_backend

    monkeypatch.setenv("FUSED_LORA_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=r"backend='cpu' \(set by FUSED_LORA_BACKEND='cpu'\) got cuda tensors; "
                                           r".*\(unset FUSED_LORA_BACKEND, or 'triton'"):
        resolve_backend("auto", torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"backend='cpu' got cuda tensors; .*\(use backend='auto'"):
        resolve_backend("cpu", torch.device("cuda"))
