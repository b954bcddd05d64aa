"""Edge cases of the "cpu" backend (fused_lora/cpu.py and the extension's CPU kernels) that tests/test_cpu_backend.py
does not reach: reused temporaries across torch.inference_mode, a torch without oneDNN, zero rows on direct calls,
argument checks of the kernels, and the GIL released while they run."""

import threading
import time
import types

import pytest
import torch

import fused_lora as fl
from fused_lora import _ext, cpu, reference
from fused_lora.functional import frozen_linear, lora_linear

pytestmark = pytest.mark.skipif(cpu.cpu_kernels_error() is not None, reason="needs the extension's CPU kernels")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_temporaries_made_under_inference_mode_serve_training_later(dtype):
    """The first call, under torch.inference_mode(), creates the reused temporaries; a later call outside it writes
    into them. Before, they were inference tensors and the later call raised "Inplace update to inference tensor
    outside InferenceMode"."""
    cpu.release_workspace()
    gen = torch.Generator().manual_seed(0)
    weight = fl.quantize_nf4(torch.randn(40, 64, generator=gen))
    x = torch.randn(6, 64, generator=gen).to(dtype)
    A, B = torch.randn(4, 64, generator=gen), torch.randn(40, 4, generator=gen)
    with torch.inference_mode():
        y_inference = frozen_linear(x, weight, backend="cpu")
    with torch.no_grad():
        assert torch.equal(frozen_linear(x, weight, backend="cpu"), y_inference)
    leaves = [t.clone().requires_grad_(True) for t in (A, B)]
    y = lora_linear(x, weight, *leaves, 2.0, backend="cpu")
    y.float().sum().backward()
    y_ref = reference.lora_forward(x.double(), weight.dequantize(torch.float64), A.double(), B.double(), 2.0)[0]
    assert (y.double() - y_ref).abs().max() < 0.05 * y_ref.abs().max()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_half_precision_gemms_need_no_onednn(monkeypatch):
    """A torch built without oneDNN has no torch.ops.mkldnn._is_mkldnn_*_supported: the check answers False (the
    fp32 GEMMs) instead of raising AttributeError in every bf16/fp16 call."""
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    assert not cpu._native_half_gemm(torch.bfloat16) and not cpu._native_half_gemm(torch.float16)
    assert cpu.gemm_dtype(torch.bfloat16) == torch.float32
    weight = fl.quantize_nf4(torch.randn(24, 64))
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert frozen_linear(x, weight, backend="cpu").shape == (3, 24)


def test_direct_calls_with_zero_rows():
    """cpu.forward / frozen_forward / backward with M = 0 return empty results (the layer functions send M = 0 to
    the reference backend; these are public too)."""
    weight = fl.quantize_nf4(torch.randn(40, 64))
    A, B = torch.randn(4, 64), torch.randn(40, 4)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(0, 64, dtype=dtype)
        assert cpu.frozen_forward(x, weight, None).shape == (0, 40)
        y, u = cpu.forward(x, weight, A, B, 2.0, None, 0.0, 0)
        assert y.shape == (0, 40) and u.shape == (0, 4)


def test_dropout_apply_into_refuses_an_out_with_overlapping_rows():
    kernels = _ext.load()
    src = torch.randn(4, 8)
    keep = kernels.dropout_keep(4, 8, 1, 0.5)
    with pytest.raises(RuntimeError, match="rows overlap"):
        kernels.dropout_apply_into(torch.empty(1, 8).expand(4, 8), src, keep, 2.0)
    out = kernels.dropout_apply_into(torch.empty(4, 8), src, keep, 2.0)
    assert torch.equal(out, src * keep.to(torch.float32) * 2.0)


@pytest.mark.parametrize("round_to", [torch.float32, torch.float64])
def test_dequantize_into_takes_roundings_that_change_nothing(round_to):
    weight = fl.quantize_nf4(torch.randn(16, 64))
    out = torch.empty(16, 64, dtype=torch.float16)
    expected = weight.dequantize(torch.float32, backend="reference").reshape(16, 64).to(torch.float16)
    assert torch.equal(cpu.dequantize_into(out, weight, round_to=round_to), expected)


def test_cpu_kernels_release_the_gil():
    """While a kernel runs on one thread, another Python thread runs: it starts the kernel's thread, waits for it to
    be about to call the kernel, sleeps 10 ms and is done long before the kernel (timed alone first, at least 0.1 s)
    returns. A kernel holding the GIL keeps it from even returning from the wait until the kernel ends."""
    kernels = _ext.load()
    rows = 1024
    while True:  # a dropout mask large enough to take 0.1 s here
        start = time.monotonic()
        kernels.dropout_keep(rows, 8192, 1, 0.1)
        alone = time.monotonic() - start
        if alone >= 0.1 or rows >= 1 << 16:
            break
        rows *= 2
    running = threading.Event()

    def work():
        running.set()
        kernels.dropout_keep(rows, 8192, 2, 0.1)

    thread = threading.Thread(target=work)
    start = time.monotonic()
    thread.start()
    running.wait()
    time.sleep(0.01)
    beside = time.monotonic() - start
    thread.join()
    assert beside < alone / 2, (beside, alone)
