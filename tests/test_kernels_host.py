"""The kernels' host side: the thresholds and their overrides, and what the launchers cache between calls (decoded
NF4 scales, the code-table check, the device's properties)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fused_lora as fl

pytestmark = pytest.mark.usefixtures("interpret_triton")


def test_thresholds_overrides_keep_the_gpu_family_and_refuse_bad_values(monkeypatch):
    """use_thresholds(**changes) changes only those values of the device's family (an H200 keeps its
    decode_programs_per_sm); a whole Thresholds replaces them; blocks nest and end in any order; a value out of
    range or an unknown name is refused by name, before any launch."""
    from fused_lora.kernels import strategy

    monkeypatch.setattr(strategy, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "cuda_capability", lambda device: (9, 0))
    sm90 = strategy.THRESHOLDS["sm90"]
    assert strategy.thresholds("cuda") == sm90 and sm90.programs_per_sm_for(True) == 2
    with strategy.use_thresholds(decode_max_m=32):
        assert strategy.thresholds("cuda") == dataclasses.replace(sm90, decode_max_m=32)
        assert strategy.thresholds("cpu") == strategy.Thresholds(decode_max_m=32)
        with strategy.use_thresholds(strategy.Thresholds(large_min_m=7)):
            assert strategy.thresholds("cuda") == strategy.Thresholds(large_min_m=7)
            with strategy.use_thresholds(programs_per_sm=3):
                assert strategy.thresholds("cuda") == strategy.Thresholds(large_min_m=7, programs_per_sm=3)
        assert strategy.thresholds("cuda").decode_programs_per_sm == 2
    assert strategy.thresholds("cuda") == sm90 and not strategy._override
    outer, inner = strategy.use_thresholds(decode_max_m=8), strategy.use_thresholds(large_min_m=9)
    outer.__enter__(), inner.__enter__()
    outer.__exit__(None, None, None)  # ends first: the inner block's change stays
    assert strategy.thresholds("cpu") == strategy.Thresholds(large_min_m=9)
    inner.__exit__(None, None, None)
    assert not strategy._override
    assert strategy.Thresholds().programs_per_sm_for(True) == 4  # None: programs_per_sm
    for bad in ({"programs_per_sm": 0}, {"decode_programs_per_sm": 0}, {"decode_max_m": -1}, {"large_min_m": 0},
                {"workspace_bytes": 0}, {"split_k_min_steps": 1.5}, {"slab_overlap": "yes"}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"Thresholds.{name}"):
            strategy.Thresholds(**bad)
        with pytest.raises(ValueError, match=f"Thresholds.{name}"):
            with strategy.use_thresholds(**bad):
                pass
    with pytest.raises(TypeError):
        with strategy.use_thresholds(decode_max=1):
            pass
    assert not strategy._override


def test_nf4_scales_are_decoded_once_through_the_ops(monkeypatch):
    """The custom ops rebuild the NF4Weight around the same tensors at every call: the decoded scales and the
    code-table check are cached on those tensors, so two training steps decode the scales once (they were decoded
    in every forward and backward); an in-place change of absmax decodes them again."""
    from fused_lora import nf4
    from fused_lora.kernels import common

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(64, 128), blocksize=64, double_quant=True)
    x, A = torch.randn(3, 128, requires_grad=True), torch.randn(4, 128, requires_grad=True)
    B = torch.randn(64, 4, requires_grad=True)
    decodes, checks = [], []
    real_decode, real_get = nf4.NF4Weight.absmax_fp32, common._STANDARD_CODE.get
    monkeypatch.setattr(nf4.NF4Weight, "absmax_fp32", lambda self: (decodes.append(1), real_decode(self))[1])
    monkeypatch.setattr(common._STANDARD_CODE, "get", lambda anchor, signature, compute: real_get(
        anchor, signature, lambda: (checks.append(1), compute())[1]))
    for _ in range(2):
        fl.functional.lora_linear(x, w, A, B, 2.0, backend="triton").sum().backward()
    assert len(decodes) == 1 and len(checks) == 1, (decodes, checks)
    with torch.no_grad():
        w.absmax.add_(1)
    fl.functional.lora_linear(x, w, A, B, 2.0, backend="triton").sum().backward()
    assert len(decodes) == 2


def test_device_properties_are_asked_once_per_device(monkeypatch):
    """backend.cuda_capability, cuda_sm_count and cuda_shared_optin ask CUDA once per device index (the launchers
    ask at every call); a device other than CUDA goes to torch.cuda.get_device_capability as before."""
    from fused_lora import backend

    asked = []

    class Properties:
        major, minor, multi_processor_count, shared_memory_per_block_optin = 9, 0, 132, 232448

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: (asked.append(index), Properties())[1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    backend._cuda_properties.cache_clear()
    try:
        for _ in range(3):
            assert backend.cuda_capability("cuda:0") == (9, 0) and backend.cuda_sm_count(torch.device("cuda", 0)) == 132
            assert backend.cuda_capability("cuda") == (9, 0)  # the current device, index 1
            assert backend.cuda_shared_optin("cuda:0") == 232448
        assert asked == [0, 1]
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
        assert backend.cuda_capability("cpu") == (7, 5)
    finally:
        backend._cuda_properties.cache_clear()


def test_an_nf4_weight_made_in_inference_mode_runs_on_the_kernels():
    """Inference tensors have no version counter, so nothing can key a cache on them: the scales are decoded and
    the code table checked without caching (this raised "Inference tensors do not track version counter")."""
    from fused_lora.kernels import common

    torch.manual_seed(0)
    with torch.inference_mode():
        w = fl.quantize_nf4(torch.randn(32, 128), blocksize=64, double_quant=True)
        x, A, B = torch.randn(3, 128), torch.randn(4, 128), torch.randn(32, 4)
        y = fl.functional.lora_linear(x, w, A, B, 2.0, backend="triton")
        expected = fl.functional.lora_linear(x, w, A, B, 2.0, backend="reference")
        assert common.tensor_state(w.absmax) is None
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_a_weight_without_double_quantization_is_freed_after_use():
    """Without double quantization the decoded scales are absmax itself: caching that value on absmax kept every
    such weight's absmax alive for good (one per layer of each discarded model)."""
    import gc
    import weakref

    from fused_lora.kernels import common

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(32, 128), blocksize=64, double_quant=False)
    x, A, B = torch.randn(3, 128), torch.randn(4, 128), torch.randn(32, 4)
    fl.functional.lora_linear(x, w, A, B, 2.0, backend="triton")
    assert common.decoded_scales(w) is w.absmax
    absmax = weakref.ref(w.absmax)
    del w
    gc.collect()
    assert absmax() is None



def test_nothing_is_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """Work captured in a CUDA graph runs only when the graph replays: scales decoded during capture (a layer's first
    call inside torch.cuda.graph without a warm-up) would be cached unwritten and read so by calls outside the graph
    before its first replay. They are decoded inside the graph instead; once capture ends, caching resumes."""
    from fused_lora import _common
    from fused_lora.kernels import common

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(16, 128), blocksize=64, double_quant=True)
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: True)
    first = common.decoded_scales(w)
    assert common.decoded_scales(w) is not first and torch.equal(common.decoded_scales(w), first)
    assert common.scale_pairs(w, torch.bfloat16) is not common.scale_pairs(w, torch.bfloat16)
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: False)
    cached = common.decoded_scales(w)
    assert common.decoded_scales(w) is cached and torch.equal(cached, first)
    # a value cached before the capture (a warm-up call) is what the graph reads
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: True)
    assert common.decoded_scales(w) is cached


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dropout_is_refused_inside_a_cuda_graph_capture(p, monkeypatch):
    """The dropout seed is drawn on the host at each call: a captured graph would replay the captured step's mask at
    every step (training silently wrong), so dropout inside a capture raises, on the kernels and the reference alike;
    without dropout the same call runs."""
    from fused_lora import _common, reference

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(32, 128), blocksize=64, double_quant=True)
    x, A, B = torch.randn(3, 128), torch.randn(4, 128), torch.randn(32, 4)
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: True)
    for backend in ("triton", "reference"):
        if p == 0.0:
            fl.functional.lora_linear(x, w, A, B, 2.0, dropout_p=p, backend=backend)
        else:
            with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
                fl.functional.lora_linear(x, w, A, B, 2.0, dropout_p=p, backend=backend)
    if p > 0.0:
        with pytest.raises(RuntimeError, match="reuse the mask"):
            reference.dropout_mask((3, 128), p, 7, "cpu")


SEED_PARAMS = """
import importlib, json, pkgutil
import triton
import fused_lora.kernels as kernels
out = {}
for info in pkgutil.iter_modules(kernels.__path__):
    module = importlib.import_module(f"fused_lora.kernels.{info.name}")
    for name, fn in vars(module).items():
        if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__module__ == module.__name__:
            out.update({f"{info.name}.{name}": p.do_not_specialize for p in fn.params if p.name == "seed"})
print(json.dumps(out))
"""


def test_no_kernel_specialises_on_its_dropout_seed():
    """In a subprocess without the interpreter (whose functions do not keep Triton's parameters): every kernel that
    takes a dropout seed names it in do_not_specialize, or a seed divisible by 16 (1 step in 16) compiles a second
    variant of it (kernels/dropout.py); dropout_mask_tile is a helper, inlined into the kernels that take it."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SEED_PARAMS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = json.loads(proc.stdout)
    assert seeds.pop("dropout.dropout_mask_tile") is False
    assert len(seeds) >= 6 and all(seeds.values()), seeds
