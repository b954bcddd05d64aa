"""The M thresholds of strategy.Thresholds from the offline cost model: ``python -m fused_lora.bench.offline_paths``.

Why: the thresholds that send a call to the decode, middle or large path (fused_lora/kernels/strategy.py) are
measured on a GPU by ``python -m fused_lora bench --paths`` (bench/paths.py); before any GPU run they come from the
offline cost model, and they go stale when the kernels change. This run is the GPU tool's twin on predictions: it
forces each path with ``strategy.use_thresholds`` (paths.forced_thresholds) at every M of paths.PATH_M, for the
sweep's Llama-3-8B shapes (sm_90a, bf16 and fp32 x, fp32 adapters), captures the launches, compiles them (the same
cache as the sweep) and prices the fused fwd_bwd pass (offline.evaluate) of NF4 with double quantization at r = 16;
then it suggests thresholds per x dtype by paths.suggest_thresholds's rules, with two changes for predictions:

- a path is not eligible at an M where a config it launches (of those the autotuner is predicted to pick, for NF4 or
  a dense W, which takes the decode path too, at r = 16 or 64) did not compile, needs more shared memory than the
  GPU has, or (bf16 x) spills: the model prices instructions, not local-memory traffic, and a config that spills is
  one the project does not launch at M >= 64 by rule;
- the large path takes an M where it is predicted within LARGE_MARGIN (10 %) of the middle path's time, there and
  at every larger M (for every shape: the largest such M over the shapes). The large path is a dequantization pass
  and a dense GEMM (its extra cost is a memory pass that the side stream hides); the middle path's speed rests on the
  model's assumption that the decode in its main loop hides under the MMA. Within that margin, the path whose time
  depends less on the assumption takes the M. 10 % is a judgment, not a measurement: ``bench --paths`` on a GPU
  replaces it with times (and applies no margin).

    TRITON_INTERPRET=0 python -m fused_lora.bench.offline_paths [--output DIR] [--cache DIR | --no-cache]
                                                               [--constants NAME=VALUE ...]

It writes ``bench/results/offline/paths.md`` (the predicted ms of each path at each M, and the suggestion beside
strategy.THRESHOLDS["sm90"]); nothing in strategy.py is changed automatically.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..kernels import strategy
from .offline_capture import LayerSpec, torch_dtype_name

__all__ = ["LARGE_MARGIN", "X_DTYPES", "path_rows", "suggest", "predicted_path_table", "run_offline_paths", "main"]

LARGE_MARGIN = 0.10
RANKS = (16, 64)
# x dtypes priced: bf16 (the 16-bit case; fp16 compiles to the same MMA loops) and fp32, whose GEMMs run in IEEE fp32
# on the FMA pipes, where the middle path's decode cannot hide (Thresholds.large_min_m_fp32). Every fp32 config spills
# (its operand tiles are fp32 in registers): the spill rule, which would leave no path, applies to 16-bit x only.
X_DTYPES = ("bf16", "fp32")
_TORCH = {torch_dtype_name(d): d for d in (torch.bfloat16, torch.float32)}


def path_variants(shapes, ms, arch: int = 90) -> list[tuple[str, object]]:
    """[(path, Variant)] of every path each M can take (decode at M ≤ paths.DECODE_LIMIT; large for NF4 only),
    fwd_bwd: bf16 x over NF4 with double quantization and a dense W (which takes the decode path too) at r = 16 and
    64; fp32 x over NF4 at r = 16."""
    from .offline import Variant
    from .paths import DECODE_LIMIT, PATHS

    layers = [("bf16", w, r) for w in ("nf4dq", "dense") for r in RANKS] + [("fp32", "nf4dq", 16)]
    return [(path, Variant(arch, "fwd_bwd", LayerSpec(M, K, N, r, _TORCH[x], torch.float32, w)))
            for K, N in shapes for M in ms for path in PATHS for x, w, r in layers
            if (path != "decode" or M <= DECODE_LIMIT) and (path != "large" or w == "nf4dq")]  # fmt: skip


def _problems(priced: list[dict], spec, arch: int, dtype: str) -> tuple[set, set]:
    """(reasons the pass's path is not eligible, of them the launches that did not compile) of one priced variant."""
    from .offline_compile import SHARED_LIMIT

    problems, errors = set(), set()
    layer = f"{spec.weight}, r={spec.r}"
    for r in priced:
        if r["impl"] != "fused" or not r.get("chosen"):
            continue
        if r["kernel"] == "total":
            if r.get("error"):
                errors.add(f"{layer}: {r['error']}")
        elif (r.get("shared") or 0) > SHARED_LIMIT[arch]:
            problems.add(f"{r['kernel']} {r['config']} ({layer}: {r['shared']} B of shared memory)")
        elif dtype != "fp32" and r.get("spill_bytes"):
            problems.add(f"{r['kernel']} {r['config']} ({layer}: spills {r['spill_bytes']} B)")
    return problems | errors, errors


def path_rows(shapes=None, ms=None, cache_dir: Path | None = None, gpu=None) -> list[dict]:
    """Rows in bench --paths' schema (bench "qlora_paths", impl "fused-<path>", median_ms: the predicted ms) plus
    ``dtype`` (x's), one per (x dtype, shape, M, path) for NF4 at r = 16 (the GPU tool's layer). ``problems`` names
    what makes the path ineligible there for any weight and rank of path_variants (_problems), ``errors`` the
    launches of them that did not compile; median_ms is inf where there are problems or no time. The sweep's shapes
    (offline.SHAPES), paths.PATH_M and the H200 constants unless given."""
    from .offline import SHAPES, evaluate, plan
    from .offline_compile import run_jobs
    from .offline_model import H200
    from .paths import PATH_M, forced_thresholds

    captured, jobs = [], {}
    for path, variant in path_variants(shapes or SHAPES, ms or PATH_M):
        with strategy.use_thresholds(**forced_thresholds(path)):
            got, new = plan([variant])
        captured += [(path, *c) for c in got]
        jobs.update(new)
    keys = list(jobs)
    records = dict(zip(keys, run_jobs([jobs[k] for k in keys], cache_dir)))
    rows, problems, errors = [], {}, {}
    for path, variant, steps, facts in captured:
        priced = evaluate([(variant, steps, facts)], records, gpu or H200)
        s = variant.spec
        dtype = torch_dtype_name(s.x_dtype)
        case = (dtype, s.K, s.N, s.M, path)
        found, failed = _problems(priced, s, variant.arch, dtype)
        problems.setdefault(case, set()).update(found)
        errors.setdefault(case, set()).update(failed)
        if s.weight != "nf4dq" or s.r != 16:
            continue
        total = next(r for r in priced if r["kernel"] == "total" and r["impl"] == "fused")
        rows.append({"bench": "qlora_paths", "impl": f"fused-{path}", "pass": "fwd_bwd", "M": s.M, "K": s.K,
                     "N": s.N, "r": s.r, "dtype": dtype, "predicted_ms": total["predicted_ms"], "case": case})
    for row in rows:
        case = row.pop("case")
        row["problems"], row["errors"] = sorted(problems[case]), sorted(errors[case])
        row["median_ms"] = math.inf if row["problems"] or row["predicted_ms"] is None else row["predicted_ms"]
    return rows


def suggest(rows: list[dict]) -> dict:
    """{x dtype: paths.suggest_thresholds(that dtype's rows, LARGE_MARGIN)}."""
    from .paths import suggest_thresholds

    return {d: suggest_thresholds([r for r in rows if r["dtype"] == d], large_margin=LARGE_MARGIN)
            for d in X_DTYPES if any(r["dtype"] == d for r in rows)}


def predicted_path_table(rows: list[dict], suggested: dict, current: dict) -> str:
    """Markdown per x dtype: predicted ms per path at each (shape, M), the fastest eligible in bold, the ineligible
    marked, and the suggestion beside the current thresholds (``current``: {x dtype: {decode_max_m, large_min_m}})."""
    from .paths import PATHS

    lines = []
    for dtype in X_DTYPES:
        mine = [r for r in rows if r["dtype"] == dtype]
        if not mine:
            continue
        lines += [f"## x {dtype}", "", "| K | N | M | " + " | ".join(PATHS) + " |", "|---" * (3 + len(PATHS)) + "|"]
        for K, N, M in sorted({(r["K"], r["N"], r["M"]) for r in mine}):
            cells = {r["impl"].removeprefix("fused-"): r for r in mine if (r["K"], r["N"], r["M"]) == (K, N, M)}
            best = min((r["median_ms"] for r in cells.values()), default=math.inf)
            out = []
            for path in PATHS:
                r = cells.get(path)
                if r is None:
                    out.append("–")
                    continue
                text = "–" if r["predicted_ms"] is None else f"{r['predicted_ms']:.4g}"
                text = f"**{text}**" if r["median_ms"] == best and best < math.inf else text
                out.append(text + (" (not eligible)" if r["problems"] else ""))
            lines.append(f"| {K} | {N} | {M} | " + " | ".join(out) + " |")
        got, now = suggested.get(dtype, {}), current[dtype]
        lines += ["", f"Suggested for sm_90 (H200), x {dtype}, over every shape: "
                  f"decode_max_m = {got.get('decode_max_m')}, large_min_m = {got.get('large_min_m')} "
                  f"(current: decode_max_m = {now['decode_max_m']}, large_min_m = {now['large_min_m']}). "
                  f"Per shape: {got.get('per_shape')}."]
        reasons = sorted({p for r in mine for p in r["problems"]})
        if reasons:
            lines += ["", "Not eligible where a launched config " + ("spills, " if dtype != "fp32" else "")
                      + "needs more shared memory than the GPU has or did not compile: " + "; ".join(reasons) + "."]
        lines.append("")
    return "\n".join(lines)


def current_thresholds() -> dict:
    """strategy.THRESHOLDS["sm90"]'s {x dtype: {decode_max_m, large_min_m}} (fp32: large_min_m_fp32)."""
    sm90 = strategy.THRESHOLDS["sm90"]
    return {d: {"decode_max_m": sm90.decode_max_m, "large_min_m": sm90.large_min_for(_TORCH[d])} for d in X_DTYPES}


def run_offline_paths(output: Path, cache_dir: Path | None, command: str, gpu=None) -> tuple[dict, list[dict]]:
    """Predict, suggest and write ``output``/offline/paths.md; returns (the suggestion per x dtype, the rows)."""
    rows = path_rows(cache_dir=cache_dir, gpu=gpu)
    suggested = suggest(rows)
    header = ("# Predicted fwd_bwd ms per kernel path (offline cost model, sm_90a, H200)\n\n"
              f"Generated by `{command}`. NF4 with double quantization, fp32 adapters, r = 16; each path forced at "
              "each M (decode up to M = 64); bold: the fastest eligible path. The rules are in "
              "fused_lora/bench/offline_paths.py (the large path takes an M where it is predicted within "
              f"{LARGE_MARGIN:.0%} of the middle path there and at every larger M, for every shape).\n\n")
    out = output / "offline" / "paths.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + predicted_path_table(rows, suggested, current_thresholds()))
    return suggested, rows


def main(argv: list[str] | None = None) -> int:
    from .offline import _constants, parse_common

    parser = argparse.ArgumentParser(prog="python -m fused_lora.bench.offline_paths",
                                     description=__doc__.split("\n\n")[0])
    options = parse_common(parser, argv, "offline paths")
    suggested, rows = run_offline_paths(options.output, None if options.no_cache else options.cache,
                                        "TRITON_INTERPRET=0 python -m fused_lora.bench.offline_paths",
                                        _constants(options.constants))
    for dtype, got in suggested.items():
        print(f"offline paths: suggested sm_90 thresholds for x {dtype}: decode_max_m = {got.get('decode_max_m')}, "
              f"large_min_m = {got.get('large_min_m')}", file=sys.stderr)
    print(f"offline paths: wrote {options.output / 'offline' / 'paths.md'}", file=sys.stderr)
    failed = sorted({f"{r['dtype']} {r['K']}x{r['N']} M={r['M']} {r['impl']} ({e})" for r in rows
                     for e in r["errors"]})  # fmt: skip
    if failed:  # a path without a time is not "not the fastest": say so, and fail
        print("offline paths: passes with launches that did not compile or fit the shared memory:\n"
              + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
