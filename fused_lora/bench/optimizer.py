"""Step time of the paged optimizers against their peers, as rows of the results schema (bench "paged_adamw").

Parameters: M matrices of N×K fp32 (a stack of adapter-sized or layer-sized tensors), gradients fixed. One row per
(implementation, size); ``median_ms`` is one optimizer step. Implementations (same run, same tensors):

* ``torch_adamw_fused``: torch.optim.AdamW(fused=True) on CUDA (foreach=False on a CPU): the baseline.
* ``paged_adamw_resident``: PagedAdamW with every state on the GPU (default budget). Goal ≤ 1.05× the baseline.
* ``paged_adamw_host``: PagedAdamW with gpu_budget_bytes=0: every step streams all state in and evicts it.
* ``transfer_floor``: not an optimizer: 2 × state bytes (in and out) / host-to-device bandwidth measured in the same
  run with a pinned copy. Goal: paged_adamw_host ≤ 1.3× this.
* ``paged_adamw8bit_resident`` / ``paged_adamw8bit_host``: PagedAdamW8bit, same two budgets.
* ``bnb_paged_adamw`` / ``bnb_paged_adamw8bit``: bitsandbytes' PagedAdamW / PagedAdamW8bit (goal: ours faster).

Extra fields: ``params`` (elements), ``state_bytes`` (optimizer state, for 8-bit ≈ 2 bytes/param + absmax),
``ratio`` and ``ratio_to`` (median_ms ÷ the goal's baseline: torch fused for resident runs, the transfer floor
for the host run), ``ratio_bnb`` (÷ the bitsandbytes paged optimizer of the same state width). On a CPU the torch
paths run at small sizes with time.perf_counter, so the code runs in CI; bitsandbytes' paged optimizers run only on
CUDA.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import optim as fo
from ..backend import cuda_available

_ROW_BASE = {"bench": "paged_adamw", "pass": "step", "r": 0, "dtype": "float32", "tflops": None}


def _sizes(quick: bool, cuda: bool) -> list[tuple[int, int, int]]:
    """(M tensors, N rows, K cols)."""
    if not cuda:
        return [(4, 128, 128)] if quick else [(4, 128, 128), (8, 256, 256)]
    if quick:
        return [(8, 2048, 2048)]
    return [(8, 2048, 2048), (224, 16, 4096), (16, 4096, 4096)]


def _time_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _h2d_ms(nbytes: int) -> float:
    """Milliseconds to copy nbytes from pinned host memory to the device (median of several copies)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return _time_ms(lambda: device.copy_(host, non_blocking=True), cuda=True)


def _state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if isinstance(t, torch.Tensor) and not key.startswith("qmap")
    )


def _measure(make_opt, M, N, K, device, cuda):
    params = [torch.nn.Parameter(torch.randn(N, K, device=device) * 0.02) for _ in range(M)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_opt(params)
    opt.step()  # creates the state
    median_ms = _time_ms(opt.step, cuda)
    peak = None
    if cuda:  # one step on its own: around _time_ms the peak would hold do_bench's 256 MiB cache-flush buffer
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return median_ms, peak, _state_bytes(opt)


def _implementations(cuda: bool):
    impls = {
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
        if cuda
        else torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "paged_adamw_resident": lambda ps: fo.PagedAdamW(ps, lr=1e-4),
        "paged_adamw_host": lambda ps: fo.PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=0),
        "paged_adamw8bit_resident": lambda ps: fo.PagedAdamW8bit(ps, lr=1e-4),
        "paged_adamw8bit_host": lambda ps: fo.PagedAdamW8bit(ps, lr=1e-4, gpu_budget_bytes=0),
    }
    if cuda:
        try:
            import bitsandbytes as bnb

            impls["bnb_paged_adamw"] = lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-4)
            impls["bnb_paged_adamw8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4)
        except ImportError:
            pass
    return impls


# impl -> the implementations its ratios are taken against (first: "ratio"; bitsandbytes: "ratio_bnb").
_RATIOS = {
    "paged_adamw_resident": ("torch_adamw_fused", "bnb_paged_adamw"),
    "paged_adamw_host": ("transfer_floor", None),
    "paged_adamw8bit_resident": ("torch_adamw_fused", "bnb_paged_adamw8bit"),
}


def run_optimizer_bench(quick: bool, device=None, skip=None) -> list[dict]:
    """Rows {"bench": "paged_adamw", "impl", "pass": "step", "M", "K", "N", "r": 0, "dtype", "median_ms",
    "tflops": None, "peak_mem_mb", "params", "state_bytes", "ratio", "ratio_to", "ratio_bnb"}, one per
    implementation and size (M tensors of N×K fp32).

    ``device``: where the parameters live (default: CUDA when available, else the CPU). ``skip(what, reason)``: called
    for an implementation that fails at a size (``what`` = {"bench", "impl", "M", "K", "N"}), whose row is then left
    out while the others are measured and their ratios taken against what was measured; without it the error is
    raised.

    Example: ``rows = run_optimizer_bench(quick=True)``
    """
    device = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    cuda = device.type == "cuda"
    rows = []
    for M, N, K in _sizes(quick, cuda):
        size_rows = {}
        for impl, make_opt in _implementations(cuda).items():
            try:
                median_ms, peak, state_bytes = _measure(make_opt, M, N, K, device, cuda)
            except Exception as exc:
                if skip is None:
                    raise
                skip({"bench": _ROW_BASE["bench"], "impl": impl, "M": M, "K": K, "N": N},
                     f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            size_rows[impl] = {**_ROW_BASE, "impl": impl, "M": M, "K": K, "N": N, "median_ms": median_ms,
                               "peak_mem_mb": peak, "params": M * N * K, "state_bytes": state_bytes}
        if cuda and "paged_adamw_host" in size_rows:
            fp32_state = size_rows["paged_adamw_host"]["state_bytes"]
            size_rows["transfer_floor"] = {**_ROW_BASE, "impl": "transfer_floor", "M": M, "K": K, "N": N,
                                           "median_ms": 2 * _h2d_ms(fp32_state), "peak_mem_mb": None,
                                           "params": M * N * K, "state_bytes": fp32_state}
        for impl, row in size_rows.items():
            baseline, bnb_peer = (size_rows.get(name) for name in _RATIOS.get(impl, (None, None)))
            row["ratio_to"] = baseline["impl"] if baseline else None
            row["ratio"] = row["median_ms"] / baseline["median_ms"] if baseline else None
            row["ratio_bnb"] = row["median_ms"] / bnb_peer["median_ms"] if bnb_peer else None
            rows.append(row)
    return rows
