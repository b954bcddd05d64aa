"""Timers of the benchmark cases and the roofline measured once per GPU run.

On CUDA: ``triton.testing.do_bench`` median (warm-up, L2 flushed between calls) and the peak memory of one call
(``torch.cuda.max_memory_allocated`` minus what was allocated before it). On a CPU: ``time.perf_counter`` median
after one warm-up call; memory is not measured.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["LAYER_TIMING_MS", "ROOFLINE_TIMING_MS", "CudaTimer", "CpuTimer", "make_timer",
           "measure_bf16_peak_tflops", "measure_copy_gbps"]

# (warm-up, repetitions) in ms of triton.testing.do_bench: the layer cases with and without --quick, and the two
# roofline measurements, taken once per run with a longer warm-up so that the GPU has reached its clocks.
LAYER_TIMING_MS = {True: (10, 40), False: (25, 100)}
ROOFLINE_TIMING_MS = (200, 1000)


class CudaTimer:
    """do_bench median in ms (L2 flushed before every call); peak memory of one call in MB."""

    def __init__(self, warmup_ms: float, rep_ms: float):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def median_ms(self, fn, grad_to_none=None) -> float:
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none, return_mode="median"
            )
        )

    def peak_mem_mb(self, fn, grad_to_none=None) -> float:
        for t in grad_to_none or ():
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        for t in grad_to_none or ():
            t.grad = None
        return peak / 2**20


class CpuTimer:
    """time.perf_counter median in ms over a few repetitions after one warm-up call; memory is not measured."""

    def __init__(self, quick: bool):
        self.reps = 3 if quick else 7

    def median_ms(self, fn, grad_to_none=None) -> float:
        times = []
        for i in range(self.reps + 1):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            if i:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_mem_mb(self, fn, grad_to_none=None):
        return None


def make_timer(device, quick: bool):
    """The timer of the layer and dequantization cases: CudaTimer on CUDA, CpuTimer elsewhere."""
    if device.type == "cuda":
        return CudaTimer(*LAYER_TIMING_MS[quick])
    return CpuTimer(quick)


def measure_bf16_peak_tflops(device) -> float:
    """TFLOP/s of an 8192³ bf16 cuBLAS GEMM on random data: the measured peak every row is compared with."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = CudaTimer(*ROOFLINE_TIMING_MS).median_ms(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_copy_gbps(device) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written, of a 1 GiB buffer."""
    src = torch.empty(2**29, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = CudaTimer(*ROOFLINE_TIMING_MS).median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
