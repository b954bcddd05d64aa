"""``python -m fused_lora bench``: the QLoRA layer sweep against its peers and the roofline, and ``--report``.

What is measured is described in ``fused_lora.bench.sweep`` (and bench/README.md in the checkout).

Where the results JSON goes (``results_root``); the tables are printed in every case:

* ``--output DIR``: ``DIR/<device-name-slug>/<YYYYmmdd-HHMM>.json``, on any device;
* without ``--output`` on a GPU: ``bench/results/<gpu-name-slug>/`` under the current directory, only when the
  current directory has a ``bench/results`` folder (the checkout's root, where ``bench/gpu_check.sh`` runs);
  anywhere else no file is written;
* without ``--output`` on a CPU: no file. CPU numbers only exercise the tooling, so a plain run writes nothing.

``--cpu`` runs the CPU benchmark instead (``fused_lora.bench.cpu``: the fused CPU path against PEFT +
bitsandbytes on one layer, NF4 dequantization and a whole-model step, fp32 and bf16, as same-run ratios); its JSON
is written only with ``--output DIR``, to ``DIR/cpu/<YYYYmmdd-HHMM>.json``.

``--paths`` times the fused layer on every kernel path at each M and suggests the path thresholds
(``fused_lora.bench.paths``) instead of the sweep.

``--report [PATH]`` renders report.md and PNG plots next to the newest results JSON under PATH (a file or a
folder; default: ``--output``, else ``./bench/results``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ..backend import parse_device, resolve_backend
from .cpu import ISSUE_CONFIG, QUICK_CONFIG, run_cpu_bench
from .impls import CPU_IMPLS, GPU_IMPLS
from .report import render_report
from .schema import find_newest_results
from .sweep import failures, run_benchmarks

__all__ = ["DEFAULT_GPU_RESULTS", "build_parser", "results_root", "main"]

# The GPU default results root, relative to the current directory; used only when that folder exists.
DEFAULT_GPU_RESULTS = Path("bench") / "results"


def _parse_shapes(text: str):
    try:
        shapes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 4096x14336,14336x4096 (KxN, positive), got {text!r}")
    return shapes


def _parse_ints(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = _parse_ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds ≥ 0, got {text!r}")
    return value


# Options of the GPU sweep that --cpu (its own fixed cases) does not take
_SWEEP_ONLY = ("device", "shapes", "m", "ranks", "impls", "max_seconds", "no_dequant", "no_optim", "no_e2e",
               "paths")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_lora bench",
        description="Benchmark the fused QLoRA layer against dense cuBLAS, dequantize+cuBLAS, PEFT+bitsandbytes and "
        "torch.compile, plus NF4 dequantization, the paged optimizer and an end-to-end QLoRA step.",
    )
    parser.add_argument("--quick", action="store_true", help="a subset: 8B shapes, M in 16,2048,8192, r=16")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                        help="render report.md and PNG plots from the newest results under PATH (a JSON or a folder; "
                        "default: --output, else ./bench/results)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="results root: the JSON goes to DIR/<device>/<YYYYmmdd-HHMM>.json (default: on a GPU "
                        "./bench/results when that folder exists; on a CPU no file is written)")
    parser.add_argument("--shapes", type=_parse_shapes, default=None, help="KxN list, e.g. 4096x14336,4096x1024")
    parser.add_argument("--m", type=_parse_ints, default=None, help="token counts M, e.g. 16,2048,8192")
    parser.add_argument("--r", dest="ranks", type=_parse_ints, default=None, help="LoRA ranks, e.g. 8,16,64")
    parser.add_argument("--impls", type=lambda s: tuple(s.split(",")), default=None,
                        help=f"implementations (GPU: {','.join(GPU_IMPLS)}; CPU: {','.join(CPU_IMPLS)})")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of compiled_reference")
    parser.add_argument("--no-dequant", action="store_true", help="skip the NF4 dequantization rows")
    parser.add_argument("--no-optim", action="store_true", help="skip the optimizer rows")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end QLoRA step")
    parser.add_argument("--max-seconds", type=_seconds, default=None,
                        help="time budget: cases not started by then are recorded as skipped")
    parser.add_argument("--paths", action="store_true",
                        help="instead of the sweep: the fused layer on every kernel path (decode, middle, large) at "
                        "each M, and the M thresholds the times suggest for strategy.THRESHOLDS (fused_lora.bench."
                        "paths; default cases: 4096x14336, M from 1 to 4096, r=16)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU benchmark instead: fused vs PEFT+bitsandbytes on one layer, NF4 dequantization "
                        "and a whole-model step, fp32 and bf16 (JSON only with --output; --quick: fewer repetitions)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="with --cpu: torch's intra-op thread count for the run (default: torch's current, all "
                        "cores)")
    return parser


def results_root(output: Path | None, on_cuda: bool) -> Path | None:
    """The results root of a run (the rule in the module docstring): ``output`` when given; else, on a GPU,
    ``./bench/results`` when that folder exists; else None (no file).

    Example:
        >>> results_root(None, on_cuda=False) is None
        True
    """
    if output is not None:
        return Path(output)
    if on_cuda and DEFAULT_GPU_RESULTS.is_dir():
        return DEFAULT_GPU_RESULTS
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_lora bench [--quick] [--output DIR] [--report [PATH]] ...``; returns the exit status."""
    start = time.monotonic()  # --max-seconds counts the whole command
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None and not args.cpu:
        parser.error("--threads applies only with --cpu")
    if args.paths and args.impls is not None:
        parser.error("--impls applies only without --paths (it times the fused layer on each path)")
    defaults = parser.parse_args([])
    if args.cpu and (given := [name for name in _SWEEP_ONLY if getattr(args, name) != getattr(defaults, name)]):
        flag = "--" + {"ranks": "r"}.get(given[0], given[0]).replace("_", "-")
        parser.error(f"{flag} applies only without --cpu (the CPU benchmark runs its own fixed cases)")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file; it names the results folder")
    if args.report is not None:
        try:
            where = Path(args.report) if args.report else (args.output or DEFAULT_GPU_RESULTS)
            results_path = find_newest_results(where)
            report, plots = render_report(results_path)
        except (FileNotFoundError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"bench --report: {exc}", file=sys.stderr)
            return 1
        print(report.read_text())
        print(f"bench --report: wrote {report} and {len(plots)} plot(s)", file=sys.stderr)
        return 0
    if args.cpu:
        try:  # FUSED_LORA_BACKEND chooses the fused side's backend: a bad value is a usage error, as demo's
            backend = resolve_backend("auto", torch.device("cpu"), caller="bench --cpu")
        except (RuntimeError, ValueError) as error:
            print(f"bench --cpu: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        print(f"bench --cpu: the fused side runs the {backend!r} backend")
        rows, _ = run_cpu_bench(QUICK_CONFIG if args.quick else ISSUE_CONFIG, results_root(args.output, on_cuda=False),
                                threads=args.threads)
        if not rows:
            print("bench --cpu: nothing was measured (see the skipped lines above)", file=sys.stderr)
            return 1
        return 0
    try:
        device = parse_device(args.device)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    _, data = run_benchmarks(args, device, results_root(args.output, device.type == "cuda"), start)
    problems = failures(data)
    for problem in problems:
        print(f"bench: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0
