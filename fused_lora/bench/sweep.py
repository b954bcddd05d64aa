"""The benchmark run behind ``python -m fused_lora bench``: the QLoRA layer sweep, NF4 dequantization, and the
end-to-end and optimizer stages, all in one run so that ratios are same-run ratios (docs/DESIGN.md, "Benchmarks
and results").

* ``qlora_linear``: one LoRA layer over a frozen NF4 weight, passes ``fwd`` and ``fwd_bwd``, for the
  implementations of ``fused_lora.bench.impls`` (where the layer, the implementations and the FLOP count are
  described).
* ``nf4_dequant``: NF4 → bf16 dequantization of W alone, GB/s over the bytes read and written
  (N·K/2 packed + N·K/64 absmax codes + 2·N·K out), as a fraction of the device copy bandwidth measured in the
  same run. ``optimizer``: rows from ``fused_lora.bench.optimizer.run_optimizer_bench``. ``e2e_qlora_step``: one
  QLoRA training step of a ~1B Llama, from ``fused_lora.bench.e2e``.

Timing (``fused_lora.bench.timing``) on CUDA: ``triton.testing.do_bench`` median over several input sets cycled
between calls; ``peak_fraction`` = TFLOP/s ÷ the bf16 peak measured once per run with an 8192³ cuBLAS GEMM. On a
CPU the same tooling runs ``reference`` and ``compiled_reference`` on small shapes, single-threaded, timed with
``time.perf_counter`` (median), so CI exercises it.

Results go to the ``ResultsFile`` the command chose (``fused_lora.bench.command`` decides whether and where a
file is written); a file is rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from pathlib import Path

import torch

from .. import reference
from .._common import dtype_name
from ..nf4 import dequantize_nf4, quantize_nf4
from ..testing import ATOL, relative_error
from .e2e import run_e2e_bench
from .environment import collect_env
from .impls import (
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
    layer_dtype,
    lora_layer_flops,
    make_adapters,
    make_base_weight,
    make_input_sets,
    pass_callable,
)
from .optimizer import run_optimizer_bench
from .report import TARGET_M, TARGET_PASS, TARGET_R, TARGETS, summary_table
from .schema import ResultsFile, results_path
from .timing import make_timer, measure_bf16_peak_tflops, measure_copy_gbps

__all__ = ["apply_defaults", "run_benchmarks", "run_sweep", "run_dequant_bench", "run_stage", "later_stage_seconds"]


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _case_label(K, N, M, r, impl, pass_name):
    return f"K{K} N{N} M{M} r{r} {impl} {pass_name}"


def _l2_bytes(device) -> int:
    """The L2 size the input sets are sized against (make_input_sets): the GPU's, 1 MiB on a CPU."""
    if device.type != "cuda":
        return 2**20
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)


def sweep_order(ms):
    """M = 8192 (where the targets are checked) first, then ascending: a run cut short keeps the target cases."""
    return sorted(ms, key=lambda M: (M != TARGET_M, M))


TARGET_IMPLS = frozenset(impl for _, numerator, denominator, _, _ in TARGETS for impl in (numerator, denominator))


def is_target_case(M: int, r: int, impl: str, pass_name: str) -> bool:
    """Whether report.target_checks reads this case (M=8192, r=16, fwd_bwd, an implementation of its ratios)."""
    return M == TARGET_M and r == TARGET_R and pass_name == TARGET_PASS and impl in TARGET_IMPLS


def run_sweep(args, device, results: ResultsFile, deadline: float, select=None):
    """Times every (M, shape, r, implementation, pass) case into ``results``, or those for which
    ``select(M, r, impl, pass)`` is true; skips (with a reason) what fails.

    Order: M by ``sweep_order``, then shapes, ranks, implementations, and fwd_bwd before fwd, so that a run stopped
    by its time budget has the target cases (M=8192, fwd_bwd) of the first shapes (_run_stages runs the targets of
    every shape first on a GPU).
    """
    from tqdm import tqdm

    on_cuda = device.type == "cuda"
    dtype = layer_dtype(device)
    timer = make_timer(device, args.quick)
    l2_bytes = _l2_bytes(device)
    peak = results.data["roofline"].get("bf16_tflops")
    builder = ImplBuilder(args.compile_backend)
    selected = select or (lambda M, r, impl, pass_name: True)
    groups, passes_of = [], {}
    for M, (K, N), r in ((M, shape, r) for M in sweep_order(args.m) for shape in args.shapes for r in args.ranks):
        for impl in args.impls:
            passes = [p for p in PASSES[::-1] if selected(M, r, impl, p)]
            if passes:
                passes_of[(M, K, N, r, impl)] = passes
        if any((M, K, N, r, impl) in passes_of for impl in args.impls):
            groups.append((M, K, N, r))
    progress = tqdm(total=sum(map(len, passes_of.values())), desc="qlora_linear", unit="case",
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
            passes = passes_of.get((M, K, N, r, impl))
            if not passes:
                continue
            if isinstance(weights, str):
                for pass_name in passes:
                    results.skip({"bench": "qlora_linear", "impl": impl, "pass": pass_name, **case}, weights)
                progress.update(len(passes))
                continue
            _run_impl_case(impl, case, weights, builder, timer, results, deadline, peak, l2_bytes, reference_output,
                           dtype, device, progress, passes)
        del reference_output
        if on_cuda:
            torch.cuda.empty_cache()
    progress.close()


def _run_impl_case(impl, case, weights, builder, timer, results, deadline, peak, l2_bytes, reference_output, dtype,
                   device, progress, passes):
    """``passes`` of one implementation at one (M, K, N, r); the fwd output is checked against the reference."""
    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    layer = params = None
    build_error = None
    if time.monotonic() < deadline:
        try:
            layer, params = builder.build(impl, weights)
        except Exception as exc:  # an unavailable peer (no bitsandbytes, no PEFT) is recorded, not fatal
            build_error = f"could not build {impl}: {type(exc).__name__}: {str(exc)[:300]}"
    for pass_name in passes:
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
                    rel_err = relative_error(layer(xs[0]), reference_output["y"])
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
        results.add({**what, "dtype": dtype_name(dtype), "median_ms": median_ms, "tflops": tflops,
                     "peak_mem_mb": peak_mem, "flops": flops,
                     "peak_fraction": tflops / peak if peak else None, "rel_err": rel_err,
                     "rel_err_ok": None if rel_err is None else bool(rel_err <= REL_ERR_BOUND[dtype])})
        xs = gs = None


def run_dequant_bench(args, device, results: ResultsFile, deadline: float):
    """NF4 -> bf16 dequantization of each W alone: fused_lora's and bitsandbytes', GB/s vs the copy bandwidth."""
    on_cuda = device.type == "cuda"
    dtype = layer_dtype(device)
    timer = make_timer(device, args.quick)
    copy_gbps = results.data["roofline"].get("copy_gbps")
    for K, N in args.shapes:
        W = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
        bytes_moved = N * K // 2 + N * K // 64 + N * K * torch.finfo(dtype).bits // 8
        candidates = {}
        try:
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
            results.add({**what, "dtype": dtype_name(dtype), "median_ms": median_ms, "tflops": None,
                         "peak_mem_mb": peak_mem, "gbps": gbps, "bw_fraction": gbps / copy_gbps if copy_gbps else None})


# The forward's relative error against the fp32 reference above which a row is wrong, not merely rounded: the
# tolerance rule's absolute term per dtype (fused_lora.testing.ATOL), at least 1e-4 for fp32 (tf32 dots on a GPU).
REL_ERR_BOUND = {torch.bfloat16: ATOL[torch.bfloat16], torch.float16: ATOL[torch.float16], torch.float32: 1e-4}


def failures(data: dict) -> list[str]:
    """What makes a finished run fail (the command's exit status 1): a forward over REL_ERR_BOUND (it was timed, but
    the report leaves it out of the ratios), or no row measured at all while a case failed for a reason other than
    the time budget (--max-seconds)."""
    wrong = [f"{row['impl']} {row['pass']} M={row['M']} K={row['K']} N={row['N']} r={row['r']}: relative error "
             f"{row['rel_err']:.2e} > {REL_ERR_BOUND.get(getattr(torch, row['dtype'], None), float('nan')):.0e}"
             for row in data["results"] if row.get("rel_err_ok") is False]
    errors = [entry for entry in data["skipped"] if "time budget" not in entry["reason"]]
    if not data["results"] and errors:
        wrong.append(f"no case was measured; {len(errors)} failed, e.g. {errors[0]['reason']}")
    return wrong


def run_optimizer_rows(args, device, results: ResultsFile):
    """Rows of the paged-optimizer bench (fused_lora.bench.optimizer), or a recorded reason why there are none."""
    what = {"bench": "optimizer"}
    try:
        rows = run_optimizer_bench(quick=args.quick, device=device, skip=results.skip)  # one failing optimizer
        # is skipped with its reason; the others keep their rows
    except Exception as exc:
        results.skip(what, f"run_optimizer_bench failed: {type(exc).__name__}: {str(exc)[:300]}")
        return
    for row in rows:
        results.add(row)


def run_e2e_rows(args, device, results: ResultsFile):
    """Rows of the end-to-end QLoRA step (fused_lora.bench.e2e); failures are recorded, not raised."""
    try:
        rows, skipped = run_e2e_bench(quick=args.quick, device=device)
    except Exception as exc:
        results.skip({"bench": "e2e_qlora_step"}, f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    for row in rows:
        results.add(row)
    for entry in skipped:
        results.skip({"bench": "e2e_qlora_step", **{k: v for k, v in entry.items() if k != "reason"}},
                     entry["reason"])


# A sweep case that starts just before its deadline ends after it: the stages after it keep this much more.
CASE_OVERRUN_S = 10.0


def stage_seconds(args) -> dict:
    """{stage: seconds} each stage after the layer sweep's target cases needs on a GPU, in the order they run; the
    optimizer and end-to-end stages start only with that much time left, the dequantization rows stop then.

    Estimates for an H100/H200 (bench/README.md): the end-to-end step is two ~1.24B-parameter builds, 2 × 20 steps
    and the fused kernels' autotuning at the model's four shapes (~45–90 s with --quick); the optimizer rows ~10 s;
    the dequantization rows a few seconds per shape.
    """
    stages = {}
    if not args.no_dequant:
        stages["nf4_dequant"] = 10.0 if args.quick else 30.0
    if not args.no_optim:
        stages["optimizer"] = 15.0 if args.quick else 60.0
    if not args.no_e2e:
        stages["e2e_qlora_step"] = 90.0 if args.quick else 240.0
    return stages


def later_stage_seconds(args, on_cuda: bool) -> dict:
    """{stage: seconds} kept for the stages after the layer sweep's target cases on a GPU: those cases stop starting
    that much (and CASE_OVERRUN_S) before the --max-seconds deadline. With --quick (bench/gpu_check.sh's run, inside
    a 6-minute GPU check) the end-to-end step is optional: nothing is kept for it, it runs last and only if its time
    is left after the rest of the sweep. On a CPU nothing is kept (the tiny end-to-end model takes seconds).
    """
    if not on_cuda:
        return {}
    stages = stage_seconds(args)
    if args.quick:
        stages.pop("e2e_qlora_step", None)
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


def apply_defaults(args, on_cuda: bool) -> None:
    """Fill the cases the arguments left open (shapes, M, ranks, implementations) with the GPU or CPU defaults of
    ``fused_lora.bench.impls``; SystemExit naming an unknown implementation."""
    if getattr(args, "paths", False):  # bench --paths (fused_lora.bench.paths): the fused layer alone
        from .paths import PATH_M

        args.shapes = args.shapes or (((4096, 14336),) if on_cuda else ((64, 96),))
        args.m = args.m or (PATH_M if on_cuda else (1, 16, 80))
        args.ranks = args.ranks or (QUICK_R if on_cuda else CPU_R)
        args.impls = ("fused",)
    elif on_cuda:
        args.shapes = args.shapes or (LLAMA3_8B_SHAPES if args.quick else LLAMA3_8B_SHAPES + LLAMA3_70B_SHAPES)
        args.m = args.m or (QUICK_M if args.quick else FULL_M)
        args.ranks = args.ranks or (QUICK_R if args.quick else FULL_R)
        args.impls = args.impls or GPU_IMPLS
    else:
        args.shapes = args.shapes or CPU_SHAPES
        args.m = args.m or CPU_M
        args.ranks = args.ranks or CPU_R
        args.impls = args.impls or CPU_IMPLS
    unknown = [i for i in args.impls if i not in ALL_IMPLS]
    if unknown:
        raise SystemExit(f"bench: unknown implementation(s) {unknown}; known: {', '.join(ALL_IMPLS)}")


def run_benchmarks(args, device: torch.device, results_root: Path | None, start: float) -> tuple[Path | None, dict]:
    """Run everything the arguments ask for on ``device``.

    Args:
        args: the parsed arguments of ``fused_lora.bench.command``.
        results_root: the results JSON goes to ``results_root/<device slug>/<YYYYmmdd-HHMM>.json``; None writes no
            file (the tables are printed either way).
        start: ``time.monotonic()`` when the command started; ``--max-seconds`` counts from it.
    Returns:
        (the results JSON path, or None when none was written; the results as written: env, rows, skipped, ...).
    """
    deadline = start + args.max_seconds if args.max_seconds is not None else float("inf")
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    apply_defaults(args, on_cuda)
    threads = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(1)  # single-threaded CPU timings stay meaningful on a shared CI machine
    try:
        return _run_all(args, device, results_root, start, deadline)
    finally:
        torch.set_num_threads(threads)


def _run_stages(args, device, results: ResultsFile, deadline: float) -> None:
    """On a GPU, where --max-seconds cuts a run short: the sweep's target cases of every shape, the dequantization
    and optimizer rows (each in the time kept for it), the rest of the sweep, then the end-to-end step as time
    allows. On a CPU: the sweep, the dequantization, optimizer and end-to-end rows."""
    on_cuda = device.type == "cuda"
    later = later_stage_seconds(args, on_cuda)
    needs = stage_seconds(args) if on_cuda else {}
    e2e_kept = later.get("e2e_qlora_step", 0.0)  # 0 with --quick: the step runs only if its time is left at the end
    if on_cuda:
        run_sweep(args, device, results, deadline - sum(later.values()) - CASE_OVERRUN_S, select=is_target_case)
    else:
        run_sweep(args, device, results, deadline)
    if not args.no_dequant:
        run_dequant_bench(args, device, results, deadline - later.get("optimizer", 0.0) - e2e_kept)
    if not args.no_optim:  # before the end-to-end step: the optimizer rows are required, the step optional (--quick)
        run_stage("optimizer", needs.get("optimizer", 0.0), deadline - e2e_kept, results,
                  lambda: run_optimizer_rows(args, device, results))
    if on_cuda:
        run_sweep(args, device, results, deadline - e2e_kept,
                  select=lambda M, r, impl, pass_name: not is_target_case(M, r, impl, pass_name))
    if not args.no_e2e:
        run_stage("e2e_qlora_step", needs.get("e2e_qlora_step", 0.0), deadline, results,
                  lambda: run_e2e_rows(args, device, results))


def _run_all(args, device, results_root: Path | None, start: float, deadline: float) -> tuple[Path | None, dict]:
    on_cuda = device.type == "cuda"
    env = collect_env(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    path = results_path(results_root, device_name, stamp) if results_root is not None else None
    config = {"quick": args.quick, "shapes": [list(s) for s in args.shapes], "m": list(args.m), "r": list(args.ranks),
              "impls": list(args.impls), "compile_backend": args.compile_backend, "lora_scaling": LORA_SCALING}
    results = ResultsFile(path, env, config)
    destination = f"writing {path}" if path else "writing no results file (--output DIR keeps one)"
    print(f"bench: {env['device']}, torch {env['torch']}, triton {env['triton']}; {destination}", file=sys.stderr)
    if on_cuda:
        results.data["roofline"] = {"bf16_tflops": measure_bf16_peak_tflops(device),
                                    "copy_gbps": measure_copy_gbps(device)}
        results.flush()
        torch.cuda.empty_cache()
    if getattr(args, "paths", False):
        from .paths import path_table, run_path_bench

        run_path_bench(args.shapes, args.m, args.ranks, device, make_timer(device, args.quick), results, deadline,
                       _l2_bytes(device))
        print(path_table(results.data))
    else:
        _run_stages(args, device, results, deadline)
    results.data["wall_s"] = time.monotonic() - start
    results.flush()
    print(summary_table(results.data))
    skipped = results.data["skipped"]
    if skipped and path:
        print(f"bench: {len(skipped)} case(s) skipped; reasons in {path} ('skipped')")
    elif skipped:
        print(f"bench: {len(skipped)} case(s) skipped:")
        for entry in skipped:
            print(f"  {' '.join(f'{k}={v}' for k, v in entry.items() if k != 'reason')}: {entry['reason']}")
    print(f"bench: results written to {path}" if path else
          "bench: no results file written (pass --output DIR to keep the JSON)")
    return path, results.data
