"""``python -m fused_lora bench``: the QLoRA layer sweep against its peers and the roofline, and ``--report``.

What is measured (shared/DESIGN.md, "Benchmarks and results"), all in one run so that ratios are same-run ratios:

* ``qlora_linear``: one LoRA layer over a frozen NF4 weight, passes ``fwd`` and ``fwd_bwd``, for the
  implementations of ``fused_lora.bench_impls`` (where the layer, the implementations and the FLOP count are
  described).
* ``nf4_dequant``: NF4 → bf16 dequantization of W alone, GB/s over the bytes read and written
  (N·K/2 packed + N·K/64 absmax codes + 2·N·K out), as a fraction of the device copy bandwidth measured in the
  same run. ``optimizer``: rows from ``fused_lora.bench_optim.run_optimizer_bench``. ``e2e_qlora_step``: one
  QLoRA training step of a ~1B Llama, from ``fused_lora.bench_e2e``.

Timing on CUDA: ``triton.testing.do_bench`` median (warm-up, L2 flushed between calls) over several input sets
cycled between calls; ``peak_fraction`` = TFLOP/s ÷ the bf16 peak measured once per run with an 8192³ cuBLAS GEMM;
``peak_mem_mb`` = ``torch.cuda.max_memory_allocated`` during one call minus the memory allocated before it. On a
CPU the same tooling runs ``reference`` and ``compiled_reference`` on small shapes, single-threaded, timed with
``time.perf_counter`` (median), so CI exercises it.

Results go to ``bench/results/<gpu-name-slug>/<YYYYmmdd-HHMM>.json`` (schema in ``fused_lora.bench_schema``) and
the file is rewritten after every case, so a run cut short keeps what it measured. ``--report`` is
``fused_lora.bench_report``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .bench_impls import (
    ALL_IMPLS,
    CPU_IMPLS,
    CPU_M,
    CPU_R,
    CPU_SHAPES,
    FULL_M,
    FULL_R,
    GPU_IMPLS,
    LLAMA3_70B_SHAPES,
    LLAMA3_8B_SHAPES,
    LORA_SCALING,
    PASSES,
    QUICK_M,
    QUICK_R,
    ImplBuilder,
    lora_layer_flops,
    make_adapters,
    make_base_weight,
    make_input_sets,
    pass_callable,
)
from .bench_report import render_report, summary_table
from .bench_schema import ResultsFile, default_results_dir, device_slug, find_newest_results, repo_root

__all__ = ["main", "run_benchmarks", "run_sweep", "run_dequant_bench"]


# ----------------------------------------------------------------------------------------------------------------
# Environment


def git_commit() -> str:
    """HEAD of the checkout (with '+dirty' when tracked files changed), else $FUSED_LORA_COMMIT, else 'unknown'.

    Git is asked only when the checkout itself holds ``.git``: a copy of the tree without it (what a GPU machine
    gets) placed inside some other repository must not record that repository's HEAD.
    """
    root = repo_root()
    fallback = os.environ.get("FUSED_LORA_COMMIT") or "unknown"
    if not (root / ".git").exists():
        return fallback
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
        return fallback


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


def make_timer(device, quick: bool):
    """The timer of the layer and dequantization cases: CudaTimer on CUDA, CpuTimer elsewhere."""
    if device.type == "cuda":
        return CudaTimer(*LAYER_TIMING_MS[quick])
    return CpuTimer(quick)


def measure_bf16_peak_tflops(device) -> float:
    """TFLOP/s of an 8192³ bf16 cuBLAS GEMM on random data: the measured peak every row is compared with."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = CudaTimer(*ROOFLINE_TIMING_MS).median_ms(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_copy_gbps(device) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written, of a 1 GiB buffer."""
    import torch

    src = torch.empty(2**29, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = CudaTimer(*ROOFLINE_TIMING_MS).median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# The sweep


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
    timer = make_timer(device, args.quick)
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
    timer = make_timer(device, args.quick)
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


def later_stage_seconds(args, on_cuda: bool) -> dict:
    """{stage: seconds} kept for the stages after the layer sweep on a GPU: the sweep (and the dequantization rows)
    stop starting cases that much before the --max-seconds deadline, and each stage starts only with its time left.

    Estimates for an H100 (bench/README.md): the end-to-end step is two ~1.24B-parameter builds, 2 × 20 steps and
    the fused kernels' autotuning at the model's four shapes (~45–90 s with --quick); the optimizer rows ~10 s.
    On a CPU nothing is kept (the tiny end-to-end model takes seconds).
    """
    if not on_cuda:
        return {}
    stages = {}
    if not args.no_e2e:
        stages["e2e_qlora_step"] = 90.0 if args.quick else 240.0
    if not args.no_optim:
        stages["optimizer"] = 15.0 if args.quick else 60.0
    return stages


def run_stage(bench: str, needed_s: float, deadline: float, results: ResultsFile, run) -> None:
    """``run()`` when at least ``needed_s`` seconds (and any time at all) are left before ``deadline``; else record
    the stage as skipped: a stage cut off by gpu_check.sh's timeout would lose its rows and every later one."""
    left = deadline - time.monotonic()
    if left > 0 and left >= needed_s:
        run()
    else:
        results.skip({"bench": bench}, f"time budget (--max-seconds): {max(left, 0.0):.0f} s left, the stage needs "
                                       f"about {needed_s:.0f} s")


def run_benchmarks(args) -> Path:
    """Run everything the arguments ask for; returns the results JSON path."""
    start = time.monotonic()  # before importing torch: --max-seconds counts the whole command
    deadline = start + args.max_seconds if args.max_seconds is not None else float("inf")
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    _apply_defaults(args, on_cuda)
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
        results.data["roofline"] = {"bf16_tflops": measure_bf16_peak_tflops(device),
                                    "copy_gbps": measure_copy_gbps(device)}
        results.flush()
        torch.cuda.empty_cache()
    later = later_stage_seconds(args, on_cuda)
    sweep_deadline = deadline - sum(later.values())
    run_sweep(args, device, results, sweep_deadline)
    if not args.no_dequant:
        run_dequant_bench(args, device, results, sweep_deadline)
    if not args.no_e2e:
        run_stage("e2e_qlora_step", later.get("e2e_qlora_step", 0.0), deadline, results,
                  lambda: run_e2e_rows(args, results))
    if not args.no_optim:
        run_stage("optimizer", later.get("optimizer", 0.0), deadline, results,
                  lambda: run_optimizer_rows(args, results))
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
