"""``python -m fused_lora bench``: the QLoRA layer sweep against its peers and the roofline, and ``--report``.

What is measured (shared/DESIGN.md, "Benchmarks and results"), all in one run so that ratios are same-run ratios:

* ``qlora_linear``: one LoRA layer y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ over a frozen NF4 weight W ∈ R^{N×K}, x ∈ R^{M×K},
  A ∈ R^{r×K}, B ∈ R^{N×r}, bf16 activations and adapters, s = 2. Passes: ``fwd`` (the training forward: inputs
  require grad, so whatever an implementation saves for backward is part of the cost) and ``fwd_bwd`` (forward,
  then backward with a fixed upstream gradient g; dx, dA and dB are computed, W is frozen). Implementations:

  - ``fused``: ``fused_lora.functional.lora_linear(..., backend="triton")`` over an ``fl.NF4Weight``.
  - ``dense_cublas``: the roofline. The dense bf16 GEMMs of the same shape and nothing else: forward x·Wᵀ,
    backward g·W (``F.linear`` on a bf16 W, autograd computing dx only). No NF4, no LoRA: a QLoRA layer cannot
    beat it, and fused/dense_cublas says how close to it the fused kernels come.
  - ``dequant_cublas``: the Unsloth-style path. bitsandbytes ``dequantize_4bit`` into a bf16 N×K buffer, cuBLAS
    for x·Wᵀ and g·W, the low-rank terms with ``addmm``; a handwritten autograd function that saves u = x·Aᵀ and
    dequantizes again in backward.
  - ``peft_bnb``: PEFT's LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) over ``bnb.nn.Linear4bit``, built by
    ``get_peft_model``, adapters cast to bf16.
  - ``compiled_reference``: ``torch.compile`` of ``fused_lora.reference.lora_linear_naive`` over the weight
    dequantized once to bf16 before timing (so it measures LoRA over a dense bf16 weight under Inductor).
  - ``reference`` (CPU runs only): ``lora_linear_naive`` eagerly over the dequantized weight.

* FLOP count (the LoRA layer's math, used for every implementation so that TFLOP/s compares like with like;
  ``dense_cublas`` does less work, so its "effective" TFLOP/s is the ceiling for the layer):

      fwd     = 2·M·N·K + 2·M·r·(K + N)                     (x·Wᵀ;  u = x·Aᵀ;  u·Bᵀ)
      fwd_bwd = fwd + 2·M·N·K + 4·M·r·(K + N)               (+ dx = g·W;  v = g·B;  v·A;  dA = vᵀ·x;  dB = gᵀ·u)

* ``nf4_dequant``: NF4 → bf16 dequantization of W alone, GB/s over the bytes read and written
  (N·K/2 packed + N·K/64 absmax codes + 2·N·K out), as a fraction of the device copy bandwidth measured in the
  same run. ``optimizer``: rows from ``fused_lora.bench_optim.run_optimizer_bench``. ``e2e_qlora_step``: one
  QLoRA training step of a ~1B Llama, from ``fused_lora.bench_e2e``.

Timing on CUDA: ``triton.testing.do_bench`` median (warm-up, L2 flushed between calls) over several input sets
cycled between calls; ``peak_fraction`` = TFLOP/s ÷ the bf16 peak measured once per run with an 8192³ cuBLAS GEMM;
``peak_mem_mb`` = ``torch.cuda.max_memory_allocated`` during one call minus the memory allocated before it. On a
CPU the same tooling runs ``reference`` and ``compiled_reference`` on small shapes, single-threaded, timed with
``time.perf_counter`` (median), so CI exercises it.

Results go to ``bench/results/<gpu-name-slug>/<YYYYmmdd-HHMM>.json`` (schema in DESIGN.md; rows may carry extra
fields) and the file is rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "lora_layer_flops", "run_sweep", "render_report", "find_newest_results", "validate_results"]

LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))
LLAMA3_70B_SHAPES = ((8192, 28672),)
SHAPE_NAMES = {
    (4096, 4096): "8B q/o_proj",
    (4096, 14336): "8B gate/up_proj",
    (14336, 4096): "8B down_proj",
    (4096, 1024): "8B k/v_proj",
    (8192, 28672): "70B gate/up_proj",
}
FULL_M = (1, 16, 512, 2048, 8192, 16384)
FULL_R = (8, 16, 64)
QUICK_M = (16, 2048, 8192)
QUICK_R = (16,)
CPU_SHAPES = ((256, 256), (256, 704))
CPU_M = (16, 128)
CPU_R = (8,)
GPU_IMPLS = ("fused", "dense_cublas", "dequant_cublas", "peft_bnb", "compiled_reference")
CPU_IMPLS = ("reference", "compiled_reference")
ALL_IMPLS = GPU_IMPLS + ("reference",)
PASSES = ("fwd", "fwd_bwd")
LORA_SCALING = 2.0
ROW_KEYS = ("bench", "impl", "pass", "M", "K", "N", "r", "dtype", "median_ms", "tflops", "peak_mem_mb")
TARGETS = (
    # (label, numerator impl, denominator impl, comparison, bound)
    ("fused / dense_cublas", "fused", "dense_cublas", "<=", 1.15),
    ("peft_bnb / fused", "peft_bnb", "fused", ">=", 1.6),
    ("dequant_cublas / fused", "dequant_cublas", "fused", ">=", 1.2),
)
RATIO_COLUMNS = (
    ("fused / dense_cublas", "fused", "dense_cublas"),
    ("dequant_cublas / fused", "dequant_cublas", "fused"),
    ("peft_bnb / fused", "peft_bnb", "fused"),
    ("compiled_reference / fused", "compiled_reference", "fused"),
    ("reference / compiled_reference", "reference", "compiled_reference"),
)


def lora_layer_flops(M: int, K: int, N: int, r: int, pass_name: str) -> int:
    """FLOPs of one LoRA layer pass (formula in the module docstring).

    Example: ``lora_layer_flops(8192, 4096, 14336, 16, "fwd")`` = 2·8192·14336·4096 + 2·8192·16·(4096+14336).
    """
    forward = 2 * M * N * K + 2 * M * r * (K + N)
    if pass_name == "fwd":
        return forward
    if pass_name == "fwd_bwd":
        return forward + 2 * M * N * K + 4 * M * r * (K + N)
    raise ValueError(f"lora_layer_flops: unknown pass {pass_name!r}, expected 'fwd' or 'fwd_bwd'")


# ----------------------------------------------------------------------------------------------------------------
# Environment


def repo_root() -> Path:
    """The checkout that holds bench/ (the package is installed editable), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "bench").is_dir() else Path.cwd()


def default_results_dir() -> Path:
    return repo_root() / "bench" / "results"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> str:
    """HEAD of the checkout (with '+dirty' when tracked files changed), else $FUSED_LORA_COMMIT, else 'unknown'."""
    root = repo_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FUSED_LORA_COMMIT", "unknown")


def collect_env(device) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Timers


class CudaTimer:
    """do_bench median in ms; peak memory of one call in MB."""

    def __init__(self, quick: bool):
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (25, 100)

    def median_ms(self, fn, grad_to_none=None) -> float:
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none, return_mode="median"
            )
        )

    def peak_mem_mb(self, fn, grad_to_none=None) -> float:
        import torch

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


def measure_bf16_peak_tflops(device, timer) -> float:
    """TFLOP/s of an 8192³ bf16 cuBLAS GEMM on random data: the measured peak every row is compared with."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timer.median_ms(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_copy_gbps(device, timer) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written, of a 1 GiB buffer."""
    import torch

    src = torch.empty(2**29, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def _dequant_matmul_lora_function():
    """The Unsloth-style autograd function (built lazily: it needs torch and bitsandbytes)."""
    import bitsandbytes.functional as bnbf
    import torch

    class DequantMatmulLora(torch.autograd.Function):
        """y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ with W dequantized into a bf16 buffer, then cuBLAS; W frozen."""

        @staticmethod
        def forward(ctx, x, packed, quant_state, A, B, s):
            W = bnbf.dequantize_4bit(packed, quant_state)
            u = x @ A.t()
            y = torch.addmm(x @ W.t(), u, B.t(), alpha=s)
            ctx.save_for_backward(x, packed, A, B, u)
            ctx.quant_state, ctx.s = quant_state, s
            return y

        @staticmethod
        def backward(ctx, g):
            x, packed, A, B, u = ctx.saved_tensors
            s = ctx.s
            W = bnbf.dequantize_4bit(packed, ctx.quant_state)
            v = g @ B
            dx = torch.addmm(g @ W, v, A, alpha=s)
            dA = torch.mm(v.t(), x).mul_(s)
            dB = torch.mm(g.t(), u).mul_(s)
            return dx, None, None, dA, dB, None

    return DequantMatmulLora


def _peft_bnb_layer(W, A, B, s):
    """PEFT's LoRA layer over bnb.nn.Linear4bit holding NF4(W), adapters set to (A, B) in bf16."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .bench_e2e import make_linear4bit

    r = A.shape[0]
    base = make_linear4bit(W, W.dtype)

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    holder = OneLayer()
    holder.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=s * r, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].to(W.dtype)
        layer.lora_B["default"].to(W.dtype)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return layer, params


class ImplBuilder:
    """Builds each implementation's layer for one (W, A, B): a callable x -> y and the tensors it owns grads of."""

    def __init__(self, compile_backend: str = "inductor"):
        self.compile_backend = compile_backend
        self._compiled_reference = None

    def compiled_reference_fn(self):
        import torch

        from . import reference

        if self._compiled_reference is None:
            dynamo_config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            self._compiled_reference = torch.compile(reference.lora_linear_naive, backend=self.compile_backend)
        return self._compiled_reference

    def build(self, impl: str, weights: dict):
        """Returns (layer, params): layer(x) -> y (M, N); params are the adapter tensors that receive grads."""
        import torch

        from . import reference

        W, W_deq, A, B, s = weights["W"], weights["W_deq"], weights["A"], weights["B"], LORA_SCALING
        if impl == "fused":
            from .functional import lora_linear

            nf4 = weights["nf4"]
            return (lambda x: lora_linear(x, nf4, A, B, s, backend="triton")), [A, B]
        if impl == "dense_cublas":
            return (lambda x: torch.nn.functional.linear(x, W)), []
        if impl == "dequant_cublas":
            import bitsandbytes.functional as bnbf

            fn = _dequant_matmul_lora_function()
            packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            return (lambda x: fn.apply(x, packed, state, A, B, s)), [A, B]
        if impl == "peft_bnb":
            return _peft_bnb_layer(W, A, B, s)
        if impl == "reference":
            return (lambda x: reference.lora_linear_naive(x, W_deq, A, B, s)), [A, B]
        if impl == "compiled_reference":
            compiled = self.compiled_reference_fn()
            return (lambda x: compiled(x, W_deq, A, B, s)), [A, B]
        raise ValueError(f"benchmark: unknown implementation {impl!r}; known: {ALL_IMPLS}")


def make_base_weight(K: int, N: int, dtype, device):
    """(W, NF4Weight of W, W dequantized back to dtype): W (N, K) ~ N(0, 1/K), seeded; every LoRA implementation
    computes with NF4(W) (``dense_cublas`` with W itself)."""
    import torch

    from .nf4 import quantize_nf4

    torch.manual_seed(0)
    W = (torch.randn(N, K, device=device, dtype=torch.float32) / math.sqrt(K)).to(dtype)
    nf4 = quantize_nf4(W, blocksize=64, double_quant=True)
    return W, nf4, nf4.dequantize(dtype)


def make_adapters(K: int, N: int, r: int, dtype, device):
    """A (r, K) and B (N, r), random (B is not zero, so the low-rank path counts), requiring grad."""
    import torch

    A = (torch.randn(r, K, device=device, dtype=torch.float32) / math.sqrt(K)).to(dtype).requires_grad_(True)
    B = (torch.randn(N, r, device=device, dtype=torch.float32) / math.sqrt(r)).to(dtype).requires_grad_(True)
    return A, B


# ----------------------------------------------------------------------------------------------------------------
# The sweep


class ResultsFile:
    """The run's JSON, rewritten after every row so that an interrupted run keeps its measurements."""

    def __init__(self, path: Path, env: dict, config: dict):
        self.path = path
        self.data = {"env": env, "config": config, "roofline": {}, "results": [], "skipped": []}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, row: dict):
        self.data["results"].append(row)
        self.flush()

    def skip(self, what: dict, reason: str):
        self.data["skipped"].append({**what, "reason": reason})
        self.flush()

    def flush(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def make_input_sets(M, K, N, dtype, device, l2_bytes=50 * 2**20):
    """Several (x, g) pairs to cycle through: together well over the L2 cache, at most 8, at least 2.

    Seeded by M, so every implementation of a case sees the same inputs (the accuracy check relies on it).
    """
    import torch

    torch.manual_seed(M)
    pair_bytes = (M * K + M * N) * torch.finfo(dtype).bits // 8
    count = int(min(8, max(2, math.ceil(4 * l2_bytes / max(pair_bytes, 1)))))
    if pair_bytes * count > 4 * 2**30:
        count = 2
    xs = [torch.randn(M, K, device=device, dtype=dtype).requires_grad_(True) for _ in range(count)]
    gs = [torch.randn(M, N, device=device, dtype=dtype) for _ in range(count)]
    return xs, gs


def pass_callable(layer, xs, gs, pass_name):
    """A no-argument callable for do_bench that runs one pass on the next input set."""
    cycle = itertools.cycle(range(len(xs)))
    if pass_name == "fwd":
        return lambda: layer(xs[next(cycle)])

    def forward_backward():
        i = next(cycle)
        layer(xs[i]).backward(gs[i])

    return forward_backward


def _relative_error(out, ref) -> float:
    import torch

    out, ref = out.detach().float(), ref.detach().float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _case_label(K, N, M, r, impl, pass_name):
    return f"K{K} N{N} M{M} r{r} {impl} {pass_name}"


def sweep_order(ms):
    """M = 8192 (where the targets are checked) first, then ascending: a run cut short keeps the target cases."""
    return sorted(ms, key=lambda M: (M != 8192, M))


def run_sweep(args, device, results: ResultsFile, deadline: float):
    """Times every (M, shape, r, implementation, pass) case into ``results``; skips (with a reason) what fails.

    Order: M by ``sweep_order``, then shapes, ranks, implementations, and fwd_bwd before fwd, so that a run stopped
    by its time budget has the target cases (M=8192, fwd_bwd) of every shape.
    """
    import torch
    from tqdm import tqdm

    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    timer = CudaTimer(args.quick) if on_cuda else CpuTimer(args.quick)
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) if on_cuda else 2**20
    peak = results.data["roofline"].get("bf16_tflops")
    builder = ImplBuilder(args.compile_backend)
    groups = [(M, K, N, r) for M in sweep_order(args.m) for (K, N) in args.shapes for r in args.ranks]
    progress = tqdm(total=len(groups) * len(args.impls) * len(PASSES), desc="qlora_linear", unit="case",
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)
    base_weights, adapters = {}, {}
    for M, K, N, r in groups:
        if (K, N) not in base_weights:
            try:
                W, nf4, W_deq = make_base_weight(K, N, dtype, device)
            except Exception as exc:  # a broken NF4 path must not sink the whole run
                base_weights[(K, N)] = f"quantize_nf4 failed: {type(exc).__name__}: {exc}"
            else:
                base_weights[(K, N)] = {"W": W, "W_deq": W_deq, "nf4": nf4}
        if (K, N, r) not in adapters:
            adapters[(K, N, r)] = dict(zip("AB", make_adapters(K, N, r, dtype, device)))
        weights = base_weights[(K, N)]
        if not isinstance(weights, str):
            weights = {**weights, **adapters[(K, N, r)]}
        case = {"M": M, "K": K, "N": N, "r": r}
        reference_output = {}
        for impl in args.impls:
            if isinstance(weights, str):
                for pass_name in PASSES[::-1]:
                    results.skip({"bench": "qlora_linear", "impl": impl, "pass": pass_name, **case}, weights)
                progress.update(len(PASSES))
                continue
            _run_impl_case(impl, case, weights, builder, timer, results, deadline, peak, l2_bytes, reference_output,
                           dtype, device, progress)
        del reference_output
        if on_cuda:
            torch.cuda.empty_cache()
    progress.close()


def _run_impl_case(impl, case, weights, builder, timer, results, deadline, peak, l2_bytes, reference_output, dtype,
                   device, progress):
    """Both passes of one implementation at one (M, K, N, r); the fwd output is checked against the reference."""
    import torch

    from . import reference

    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    layer = params = None
    build_error = None
    if time.monotonic() < deadline:
        try:
            layer, params = builder.build(impl, weights)
        except Exception as exc:  # an unavailable peer (no bitsandbytes, no PEFT) is recorded, not fatal
            build_error = f"could not build {impl}: {type(exc).__name__}: {str(exc)[:300]}"
    for pass_name in PASSES[::-1]:
        what = {"bench": "qlora_linear", "impl": impl, "pass": pass_name, **case}
        progress.set_postfix_str(_case_label(K, N, M, r, impl, pass_name))
        progress.update(1)
        if time.monotonic() >= deadline:
            results.skip(what, "time budget (--max-seconds) spent")
            continue
        if build_error is not None:
            results.skip(what, build_error)
            continue
        try:
            xs, gs = make_input_sets(M, K, N, dtype, device, l2_bytes)
            rel_err = None
            if impl != "dense_cublas" and pass_name == "fwd":
                with torch.no_grad():
                    if "y" not in reference_output:
                        reference_output["y"] = reference.lora_linear_naive(
                            xs[0].float(), weights["W_deq"].float(), weights["A"].float(), weights["B"].float(),
                            LORA_SCALING,
                        )
                    rel_err = _relative_error(layer(xs[0]), reference_output["y"])
            run = pass_callable(layer, xs, gs, pass_name)
            grads = xs + list(params)
            median_ms = timer.median_ms(run, grad_to_none=grads)
            peak_mem = timer.peak_mem_mb(run, grad_to_none=grads)
        except Exception as exc:
            xs = gs = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.skip(what, f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        flops = lora_layer_flops(M, K, N, r, pass_name)
        tflops = flops / (median_ms * 1e-3) / 1e12
        results.add({**what, "dtype": str(dtype).replace("torch.", ""), "median_ms": median_ms, "tflops": tflops,
                     "peak_mem_mb": peak_mem, "flops": flops,
                     "peak_fraction": tflops / peak if peak else None, "rel_err": rel_err})
        xs = gs = None


def run_dequant_bench(args, device, results: ResultsFile, deadline: float):
    """NF4 -> bf16 dequantization of each W alone: fused_lora's and bitsandbytes', GB/s vs the copy bandwidth."""
    import torch

    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    timer = CudaTimer(args.quick) if on_cuda else CpuTimer(args.quick)
    copy_gbps = results.data["roofline"].get("copy_gbps")
    for K, N in args.shapes:
        W = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
        bytes_moved = N * K // 2 + N * K // 64 + N * K * torch.finfo(dtype).bits // 8
        candidates = {}
        try:
            from .nf4 import dequantize_nf4, quantize_nf4

            nf4 = quantize_nf4(W, blocksize=64, double_quant=True)
            candidates["fused_lora"] = lambda: dequantize_nf4(nf4, dtype)
        except Exception as exc:
            results.skip({"bench": "nf4_dequant", "impl": "fused_lora", "K": K, "N": N}, f"{type(exc).__name__}: {exc}")
        try:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            candidates["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, state)
        except Exception as exc:
            results.skip({"bench": "nf4_dequant", "impl": "bitsandbytes", "K": K, "N": N},
                         f"{type(exc).__name__}: {exc}")
        for impl, fn in candidates.items():
            what = {"bench": "nf4_dequant", "impl": impl, "pass": "fwd", "M": 0, "K": K, "N": N, "r": 0}
            if time.monotonic() >= deadline:
                results.skip(what, "time budget (--max-seconds) spent")
                continue
            try:
                median_ms = timer.median_ms(fn)
                peak_mem = timer.peak_mem_mb(fn)
            except Exception as exc:
                results.skip(what, f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            gbps = bytes_moved / (median_ms * 1e-3) / 1e9
            results.add({**what, "dtype": str(dtype).replace("torch.", ""), "median_ms": median_ms, "tflops": None,
                         "peak_mem_mb": peak_mem, "gbps": gbps, "bw_fraction": gbps / copy_gbps if copy_gbps else None})


def run_optimizer_rows(args, results: ResultsFile):
    """Rows of the paged-optimizer bench (fused_lora.bench_optim), or a recorded reason why there are none."""
    what = {"bench": "optimizer"}
    try:
        from .bench_optim import run_optimizer_bench
    except ImportError as exc:
        results.skip(what, f"fused_lora.bench_optim not importable: {exc}")
        return
    try:
        rows = run_optimizer_bench(quick=args.quick)
    except Exception as exc:
        results.skip(what, f"run_optimizer_bench failed: {type(exc).__name__}: {str(exc)[:300]}")
        return
    for row in rows:
        results.add(row)


def run_e2e_rows(args, results: ResultsFile):
    """Rows of the end-to-end QLoRA step (fused_lora.bench_e2e); failures are recorded, not raised."""
    from .bench_e2e import run_e2e_bench

    try:
        rows, skipped = run_e2e_bench(quick=args.quick)
    except Exception as exc:
        results.skip({"bench": "e2e_qlora_step"}, f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    for row in rows:
        results.add(row)
    for entry in skipped:
        results.skip({"bench": "e2e_qlora_step", **{k: v for k, v in entry.items() if k != "reason"}},
                     entry["reason"])


# ----------------------------------------------------------------------------------------------------------------
# Validation, tables and the report


def row_problem(row: dict) -> str | None:
    """What makes one results row break the schema of DESIGN.md, or None when it follows it."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        return f"({row.get('bench')}/{row.get('impl')}) lacks {missing}"
    for key in ("M", "K", "N", "r"):
        if not isinstance(row[key], int):
            return f"{key} must be an int, got {row[key]!r}"
    for key in ("median_ms", "tflops", "peak_mem_mb"):
        if row[key] is not None and not (isinstance(row[key], (int, float)) and math.isfinite(row[key])):
            return f"{key} must be a finite number or null, got {row[key]!r}"
    if row["median_ms"] is None or row["median_ms"] <= 0:
        return f"median_ms must be positive, got {row['median_ms']!r}"
    return None


def validate_env(data: dict) -> None:
    """Raise ValueError when the env or the results list of ``data`` does not follow the schema."""
    required = {"device", "torch", "triton", "cuda", "commit"}
    if not required <= set(data.get("env", {})):
        raise ValueError(f"results: env must have {sorted(required)}; got {sorted(data.get('env', {}))}")
    if not isinstance(data.get("results"), list):
        raise ValueError("results: 'results' must be a list of rows")


def validate_results(data: dict) -> None:
    """Raise ValueError when ``data`` does not follow the results schema of DESIGN.md."""
    validate_env(data)
    for i, row in enumerate(data["results"]):
        problem = row_problem(row)
        if problem:
            raise ValueError(f"results row {i}: {problem}")


def _fmt(value) -> str:
    """Three significant digits (no decimals from 100 up), scientific notation outside [1e-3, 1e5), '–' for None."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_times(rows):
    """{(K, N, M, r, pass, dtype): {impl: median_ms}} for the qlora_linear rows."""
    times = {}
    for row in rows:
        if row["bench"] == "qlora_linear":
            key = (row["K"], row["N"], row["M"], row["r"], row["pass"], row["dtype"])
            times.setdefault(key, {})[row["impl"]] = row["median_ms"]
    return times


def _ratio(times: dict, numerator: str, denominator: str):
    if numerator in times and denominator in times:
        return times[numerator] / times[denominator]
    return None


def target_checks(rows) -> list[dict]:
    """The fused-kernel targets at M=8192, r=16, bf16, fwd_bwd on the Llama-3-8B shapes: met / not met / not measured.

    A target is met when it holds on every 8B shape, not met when it fails on a measured one, and not measured
    when no 8B shape has both implementations.
    """
    times = _layer_times(rows)
    checks = []
    for label, numerator, denominator, comparison, bound in TARGETS:
        per_shape = {}
        for K, N in LLAMA3_8B_SHAPES:
            per_shape[(K, N)] = _ratio(times.get((K, N, 8192, 16, "fwd_bwd", "bfloat16"), {}), numerator, denominator)
        measured = [v for v in per_shape.values() if v is not None]
        holds = [(v <= bound) if comparison == "<=" else (v >= bound) for v in measured]
        if not measured:
            verdict = "not measured"
        elif not all(holds):
            verdict = "not met"
        elif len(measured) < len(per_shape):
            verdict = "met on the measured shapes only"
        else:
            verdict = "met"
        checks.append({"target": f"{label} {comparison} {bound}", "per_shape": per_shape, "verdict": verdict})
    return checks


def e2e_summary(rows):
    """(tokens/s ratio fused ÷ peft_bnb, peak-memory ratio fused ÷ peft_bnb, max loss rel diff) or Nones."""
    e2e = {row["impl"]: row for row in rows if row["bench"] == "e2e_qlora_step"}
    if "fused" not in e2e or "peft_bnb" not in e2e:
        return None, None, None
    fused, peft = e2e["fused"], e2e["peft_bnb"]
    speed = fused["tokens_per_s"] / peft["tokens_per_s"]
    memory = None
    if fused.get("peak_mem_mb") and peft.get("peak_mem_mb"):
        memory = fused["peak_mem_mb"] / peft["peak_mem_mb"]
    return speed, memory, fused.get("loss_max_rel_diff")


def _aligned(lines) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def summary_table(data: dict) -> str:
    """The short plain-text tables printed at the end of a run: per layer case each implementation's ms and the
    ratios; then one line per other row (dequantization, end-to-end, optimizer)."""
    times = _layer_times(data["results"])
    blocks = []
    if times:
        impls = [i for i in ALL_IMPLS if any(i in t for t in times.values())]
        ratio_cols = [c for c in RATIO_COLUMNS if any(_ratio(t, c[1], c[2]) is not None for t in times.values())]
        lines = [["K", "N", "M", "r", "pass"] + [f"{i} ms" for i in impls] + [c[0] for c in ratio_cols]]
        for (K, N, M, r, p, _), t in sorted(times.items()):
            lines.append([str(K), str(N), str(M), str(r), p] + [_fmt(t.get(i)) for i in impls]
                         + [_fmt(_ratio(t, c[1], c[2])) for c in ratio_cols])
        blocks.append(_aligned(lines))
    other = [row for row in data["results"] if row["bench"] != "qlora_linear"]
    if other:
        lines = [["bench", "impl", "M", "K", "N", "ms", "throughput"]]
        for row in other:
            throughput = ""
            if row.get("gbps") is not None:
                throughput = f"{_fmt(row['gbps'])} GB/s"
            elif row.get("tokens_per_s") is not None:
                throughput = f"{_fmt(row['tokens_per_s'])} tokens/s"
            lines.append([row["bench"], row["impl"], str(row["M"]), str(row["K"]), str(row["N"]),
                          _fmt(row["median_ms"]), throughput])
        blocks.append(_aligned(lines))
    return "\n\n".join(blocks)


def find_newest_results(path: Path | None = None) -> Path:
    """The newest results JSON: ``path`` itself if it is a file, else the newest under it (default bench/results)."""
    path = Path(path) if path else default_results_dir()
    if path.is_file():
        return path
    candidates = [p for p in path.rglob("*.json") if re.fullmatch(r"\d{8}-\d{4}(-\d+)?", p.stem)]
    if not candidates:
        raise FileNotFoundError(f"no results JSON (YYYYmmdd-HHMM.json) under {path}; run `python -m fused_lora bench`")
    return max(candidates, key=lambda p: (p.stem, p.stat().st_mtime))


def plot_tflops(data: dict, out_dir: Path) -> list[Path]:
    """One PNG per (pass, r): TFLOP/s vs M, a panel per (K, N), a line per implementation, the measured peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in data["results"] if row["bench"] == "qlora_linear" and row.get("tflops")]
    peak = data.get("roofline", {}).get("bf16_tflops")
    written = []
    for pass_name in PASSES:
        for r in sorted({row["r"] for row in rows}):
            selected = [row for row in rows if row["pass"] == pass_name and row["r"] == r]
            shapes = sorted({(row["K"], row["N"]) for row in selected})
            if not shapes:
                continue
            columns = 2 if len(shapes) == 4 else min(len(shapes), 3)
            lines = math.ceil(len(shapes) / columns)
            fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.8 * lines), squeeze=False)
            for ax, (K, N) in zip(axes.flat, shapes):
                for impl in ALL_IMPLS:
                    points = sorted((row["M"], row["tflops"]) for row in selected
                                    if row["impl"] == impl and (row["K"], row["N"]) == (K, N))
                    if points:
                        ax.plot(*zip(*points), marker="o", label=impl)
                if peak:
                    ax.axhline(peak, color="black", linestyle="--", linewidth=1, label="measured bf16 peak")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{SHAPE_NAMES.get((K, N), '')} K={K} N={N}".strip(), fontsize=10)
                ax.set_xlabel("M (tokens)")
                ax.set_ylabel("TFLOP/s (LoRA-layer FLOPs)")
                ax.grid(True, alpha=0.3)
            for ax in list(axes.flat)[len(shapes):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=8)
            fig.suptitle(f"qlora_linear {pass_name}, r={r} — {data['env']['device']}", fontsize=11)
            fig.tight_layout()
            path = out_dir / f"tflops_{pass_name}_r{r}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def render_report(results_path: Path) -> tuple[Path, list[Path]]:
    """Write report.md (ratios and target checks first, then every row) and the PNG plots next to the JSON."""
    data = json.loads(Path(results_path).read_text())
    validate_env(data)
    invalid = [(i, row_problem(row)) for i, row in enumerate(data["results"]) if row_problem(row)]
    data["results"] = rows = [row for row in data["results"] if not row_problem(row)]
    out_dir = Path(results_path).parent
    env = data["env"]
    roofline = data.get("roofline", {})
    plots = plot_tflops(data, out_dir)
    parts = [f"# Benchmark report: {env['device']}", "",
             f"From `{Path(results_path).name}`: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"commit `{env['commit']}`. Measured in this run: bf16 peak {_fmt(roofline.get('bf16_tflops'))} "
             f"TFLOP/s (8192³ cuBLAS GEMM), copy bandwidth {_fmt(roofline.get('copy_gbps'))} GB/s. "
             "Ratios are of median times from this one run; > 1 means the second implementation is faster.", ""]

    parts += ["## Targets (M=8192, r=16, bf16, fwd_bwd, Llama-3-8B shapes)", ""]
    header = ["target"] + [f"{SHAPE_NAMES[s]} ({s[0]}×{s[1]})" for s in LLAMA3_8B_SHAPES] + ["verdict"]
    parts += [_markdown_table(header, [[c["target"]] + [c["per_shape"][s] for s in LLAMA3_8B_SHAPES]
                                       + [c["verdict"]] for c in target_checks(rows)]), ""]
    speed, memory, loss_diff = e2e_summary(rows)
    if speed is not None:
        parts += ["## End-to-end QLoRA step (fused ÷ PEFT+bitsandbytes)", "",
                  _markdown_table(["metric", "ratio", "goal", "verdict"], [
                      ["tokens/s", speed, "≥ 1.5", "met" if speed >= 1.5 else "not met"],
                      ["peak memory", memory, "≤ 0.8",
                       "not measured" if memory is None else ("met" if memory <= 0.8 else "not met")],
                      ["max loss relative difference", loss_diff, "–", "–"]]), ""]

    times = _layer_times(rows)
    ratio_cols = [c for c in RATIO_COLUMNS if any(_ratio(t, c[1], c[2]) is not None for t in times.values())]
    if times:
        parts += ["## qlora_linear ratios", ""]
        header = ["shape", "K", "N", "M", "r", "pass", "dtype"] + [c[0] for c in ratio_cols]
        table = [[SHAPE_NAMES.get((K, N), ""), K, N, M, r, p, dt] + [_ratio(t, c[1], c[2]) for c in ratio_cols]
                 for (K, N, M, r, p, dt), t in sorted(times.items())]
        parts += [_markdown_table(header, table), ""]
    parts += [f"![TFLOP/s {p.stem}]({p.name})" for p in plots] + [""]

    layer_rows = [row for row in rows if row["bench"] == "qlora_linear"]
    if layer_rows:
        parts += ["## qlora_linear, every row", "",
                  _markdown_table(["impl", "pass", "M", "K", "N", "r", "ms", "TFLOP/s", "of peak", "peak MB",
                                   "rel err"],
                                  [[row["impl"], row["pass"], row["M"], row["K"], row["N"], row["r"], row["median_ms"],
                                    row["tflops"], row.get("peak_fraction"), row["peak_mem_mb"], row.get("rel_err")]
                                   for row in sorted(layer_rows, key=lambda x: (x["K"], x["N"], x["r"], x["pass"],
                                                                                 x["M"], x["impl"]))]), ""]
    dequant_rows = [row for row in rows if row["bench"] == "nf4_dequant"]
    if dequant_rows:
        parts += ["## NF4 dequantization alone", "",
                  _markdown_table(["impl", "K", "N", "ms", "GB/s", "of copy bandwidth"],
                                  [[row["impl"], row["K"], row["N"], row["median_ms"], row.get("gbps"),
                                    row.get("bw_fraction")] for row in dequant_rows]), ""]
    other_benches = dict.fromkeys(row["bench"] for row in rows if row["bench"] not in ("qlora_linear", "nf4_dequant"))
    for bench in other_benches:
        bench_rows = [row for row in rows if row["bench"] == bench]
        extra_keys = sorted({k for row in bench_rows for k in row if k not in ROW_KEYS and not isinstance(row[k], list)})
        parts += [f"## {bench}", "",
                  _markdown_table(list(ROW_KEYS[1:]) + extra_keys,
                                  [[row.get(k) for k in ROW_KEYS[1:] + tuple(extra_keys)] for row in bench_rows]), ""]
    if invalid:
        parts += [f"## Rows left out: they break the results schema ({len(invalid)})", ""]
        parts += [f"- row {i}: {problem}" for i, problem in invalid] + [""]
    skipped = data.get("skipped", [])
    if skipped:
        parts += [f"## Skipped ({len(skipped)})", ""]
        parts += [f"- {' '.join(f'{k}={v}' for k, v in entry.items() if k != 'reason')}: {entry['reason']}"
                  for entry in skipped[:200]]
        parts += [""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    return report, plots


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _parse_shapes(text: str):
    try:
        return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 4096x14336,14336x4096 (KxN), got {text!r}")


def _parse_ints(text: str):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_lora bench",
        description="Benchmark the fused QLoRA layer against dense cuBLAS, dequantize+cuBLAS, PEFT+bitsandbytes and "
        "torch.compile, plus NF4 dequantization, the paged optimizer and an end-to-end QLoRA step.",
    )
    parser.add_argument("--quick", action="store_true", help="a subset: 8B shapes, M in 16,2048,8192, r=16")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                        help="render report.md and PNG plots from the newest results (or PATH: a JSON or a folder)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default: bench/results)")
    parser.add_argument("--shapes", type=_parse_shapes, default=None, help="KxN list, e.g. 4096x14336,4096x1024")
    parser.add_argument("--m", type=_parse_ints, default=None, help="token counts M, e.g. 16,2048,8192")
    parser.add_argument("--r", dest="ranks", type=_parse_ints, default=None, help="LoRA ranks, e.g. 8,16,64")
    parser.add_argument("--impls", type=lambda s: tuple(s.split(",")), default=None,
                        help=f"implementations (GPU: {','.join(GPU_IMPLS)}; CPU: {','.join(CPU_IMPLS)})")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of compiled_reference")
    parser.add_argument("--no-dequant", action="store_true", help="skip the NF4 dequantization rows")
    parser.add_argument("--no-optim", action="store_true", help="skip the optimizer rows")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end QLoRA step")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget: cases not started by then are recorded as skipped")
    return parser


def _apply_defaults(args, on_cuda: bool):
    if on_cuda:
        args.shapes = args.shapes or (LLAMA3_8B_SHAPES if args.quick else LLAMA3_8B_SHAPES + LLAMA3_70B_SHAPES)
        args.m = args.m or (QUICK_M if args.quick else FULL_M)
        args.ranks = args.ranks or (QUICK_R if args.quick else FULL_R)
        args.impls = args.impls or GPU_IMPLS
    else:
        args.shapes = args.shapes or CPU_SHAPES
        args.m = args.m or CPU_M
        args.ranks = args.ranks or CPU_R
        args.impls = args.impls or CPU_IMPLS
    known = ALL_IMPLS
    unknown = [i for i in args.impls if i not in known]
    if unknown:
        raise SystemExit(f"bench: unknown implementation(s) {unknown}; known: {', '.join(known)}")


def run_benchmarks(args) -> Path:
    """Run everything the arguments ask for; returns the results JSON path."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    _apply_defaults(args, on_cuda)
    start = time.monotonic()
    deadline = start + args.max_seconds if args.max_seconds else float("inf")
    threads = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(1)  # single-threaded CPU timings stay meaningful on a shared CI machine
    try:
        return _run_all(args, device, start, deadline)
    finally:
        torch.set_num_threads(threads)


def _run_all(args, device, start: float, deadline: float) -> Path:
    import torch

    on_cuda = device.type == "cuda"
    env = collect_env(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    out_dir = (args.out or default_results_dir()) / device_slug(device_name)
    path = out_dir / f"{stamp}.json"
    suffix = 1
    while path.exists():
        path, suffix = out_dir / f"{stamp}-{suffix}.json", suffix + 1
    config = {"quick": args.quick, "shapes": [list(s) for s in args.shapes], "m": list(args.m), "r": list(args.ranks),
              "impls": list(args.impls), "compile_backend": args.compile_backend, "lora_scaling": LORA_SCALING}
    results = ResultsFile(path, env, config)
    print(f"bench: {env['device']}, torch {env['torch']}, triton {env['triton']}; writing {path}", file=sys.stderr)
    if on_cuda:
        timer = CudaTimer(args.quick)
        results.data["roofline"] = {"bf16_tflops": measure_bf16_peak_tflops(device, timer),
                                    "copy_gbps": measure_copy_gbps(device, timer)}
        results.flush()
        torch.cuda.empty_cache()
    e2e_reserve = 0.0 if args.no_e2e or not on_cuda else (90.0 if args.quick else 240.0)
    run_sweep(args, device, results, deadline - e2e_reserve)
    if not args.no_dequant:
        run_dequant_bench(args, device, results, deadline - e2e_reserve)
    if not args.no_e2e:
        if time.monotonic() < deadline:
            run_e2e_rows(args, results)
        else:
            results.skip({"bench": "e2e_qlora_step"}, "time budget (--max-seconds) spent")
    if not args.no_optim:
        if time.monotonic() < deadline:
            run_optimizer_rows(args, results)
        else:
            results.skip({"bench": "optimizer"}, "time budget (--max-seconds) spent")
    results.data["wall_s"] = time.monotonic() - start
    results.flush()
    print(summary_table(results.data))
    if results.data["skipped"]:
        print(f"bench: {len(results.data['skipped'])} case(s) skipped; reasons in {path} ('skipped')")
    print(f"bench: results written to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_lora bench [--quick] [--report [PATH]] ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.report is not None:
        try:
            results_path = find_newest_results(Path(args.report) if args.report else args.out)
        except FileNotFoundError as exc:
            print(f"bench --report: {exc}", file=sys.stderr)
            return 1
        report, plots = render_report(results_path)
        print(report.read_text())
        print(f"bench --report: wrote {report} and {len(plots)} plot(s)", file=sys.stderr)
        return 0
    run_benchmarks(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
