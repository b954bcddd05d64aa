"""The M thresholds of strategy.Thresholds from the offline cost model: ``python -m fused_lora.bench.offline --paths``.

Why: the thresholds that send a call to the decode, middle or large path (fused_lora/kernels/strategy.py) are
measured on a GPU by ``python -m fused_lora bench --paths`` (bench/paths.py); before any GPU run they come from the
offline cost model, and they go stale when the kernels change. This run is the GPU tool's twin on predictions: it
forces each path with ``strategy.use_thresholds`` (paths.forced_thresholds) at every M of paths.PATH_M, for the
sweep's Llama-3-8B shapes (sm_90a, bf16 x, fp32 adapters), captures the launches, compiles them (the same cache as
the sweep) and prices the fused fwd_bwd pass (offline.evaluate) of NF4 with double quantization at r = 16; then it
suggests thresholds by paths.suggest_thresholds's rules, with two changes for predictions:

- a path is not eligible at an M where it launches a config that spills (of the configs the autotuner is predicted
  to pick, for NF4 or a dense W, which takes the decode path too, at r = 16 or 64): the model prices instructions,
  not local-memory traffic, and the issue's rule is that no config launched at M >= 64 spills;
- the middle path keeps an M only where the large path is predicted more than LARGE_MARGIN (10 %) slower, at that M
  and every larger one. The large path is a dequantization pass and a dense GEMM (its extra cost is a memory pass
  that the side stream hides); the middle path's speed rests on the model's assumption that the decode in its main
  loop hides under the MMA. Within that margin, the path whose time depends less on the assumption keeps the M.
  10 % is a judgment, not a measurement: ``bench --paths`` on a GPU replaces it with times.

It writes ``bench/results/offline/paths.md`` (the predicted ms of each path at each M, and the suggestion beside
strategy.THRESHOLDS["sm90"]); nothing in strategy.py is changed automatically.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..kernels import strategy
from .offline_capture import LayerSpec

__all__ = ["LARGE_MARGIN", "path_rows", "predicted_path_table", "run_offline_paths"]

LARGE_MARGIN = 0.10
RANKS = (16, 64)


def path_variants(shapes, ms, arch: int = 90) -> list[tuple[str, object]]:
    """[(path, Variant)] of every path each M can take (decode at M ≤ paths.DECODE_LIMIT; large for NF4 only),
    fwd_bwd: NF4 with double quantization and a dense bf16 W (which takes the decode path too), r = 16 and 64."""
    from .offline import Variant
    from .paths import DECODE_LIMIT, PATHS

    return [(path, Variant(arch, "fwd_bwd", LayerSpec(M, K, N, r, torch.bfloat16, torch.float32, weight)))
            for K, N in shapes for M in ms for path in PATHS for weight in ("nf4dq", "dense") for r in RANKS
            if (path != "decode" or M <= DECODE_LIMIT) and (path != "large" or weight == "nf4dq")]  # fmt: skip


def path_rows(shapes=None, ms=None, cache_dir: Path | None = None) -> list[dict]:
    """Rows in bench --paths' schema (bench "qlora_paths", impl "fused-<path>", median_ms: the predicted ms), one per
    (shape, M, path) for NF4 at r = 16 (the GPU tool's layer); median_ms is inf, and ``spills`` names the configs,
    where a config launched on that path at that shape and M spills for any weight and rank of path_variants. The
    sweep's shapes (offline.SHAPES) and paths.PATH_M unless given."""
    from .offline import SHAPES, evaluate, plan
    from .offline_compile import job_key, run_jobs
    from .paths import PATH_M, forced_thresholds

    captured, jobs = [], {}
    for path, variant in path_variants(shapes or SHAPES, ms or PATH_M):
        with strategy.use_thresholds(**forced_thresholds(path)):
            got, new = plan([variant])
        captured += [(path, *c) for c in got]
        jobs.update(new)
    keys = list(jobs)
    records = dict(zip(keys, run_jobs([jobs[k] for k in keys], cache_dir)))
    rows, spills = [], {}
    for path, variant, steps, facts in captured:
        priced = evaluate([(variant, steps, facts)], records)
        s = variant.spec
        case = (s.K, s.N, s.M, path)
        spills.setdefault(case, set()).update(
            f"{r['kernel']} {r['config']} ({s.weight}, r={s.r}: {r['spill_bytes']} B)" for r in priced
            if r["impl"] == "fused" and r.get("chosen") and r.get("spill_bytes"))  # fmt: skip
        if s.weight != "nf4dq" or s.r != 16:
            continue
        total = next(r for r in priced if r["kernel"] == "total" and r["impl"] == "fused")
        rows.append({"bench": "qlora_paths", "impl": f"fused-{path}", "pass": "fwd_bwd", "M": s.M, "K": s.K,
                     "N": s.N, "r": s.r, "predicted_ms": total["predicted_ms"], "case": case})  # fmt: skip
    for row in rows:
        row["spills"] = sorted(spills[row.pop("case")])
        row["median_ms"] = math.inf if row["spills"] or row["predicted_ms"] is None else row["predicted_ms"]
    return rows


def predicted_path_table(rows: list[dict], suggested: dict, current: dict) -> str:
    """Markdown: predicted ms per path at each (shape, M), the fastest eligible in bold, spills marked, and the
    suggestion beside the current thresholds."""
    from .paths import PATHS

    lines = ["| K | N | M | " + " | ".join(PATHS) + " |", "|---" * (3 + len(PATHS)) + "|"]
    for K, N, M in sorted({(r["K"], r["N"], r["M"]) for r in rows}):
        cells = {r["impl"].removeprefix("fused-"): r for r in rows if (r["K"], r["N"], r["M"]) == (K, N, M)}
        best = min((r["median_ms"] for r in cells.values()), default=math.inf)
        out = []
        for path in PATHS:
            r = cells.get(path)
            if r is None:
                out.append("–")
                continue
            text = "–" if r["predicted_ms"] is None else f"{r['predicted_ms']:.4g}"
            text = f"**{text}**" if r["median_ms"] == best and best < math.inf else text
            out.append(text + (" (spills)" if r["spills"] else ""))
        lines.append(f"| {K} | {N} | {M} | " + " | ".join(out) + " |")
    spilled = sorted({s for r in rows for s in r["spills"]})
    lines += ["", "Suggested for sm_90 (H200), over every shape: "
              f"decode_max_m = {suggested.get('decode_max_m')}, large_min_m = {suggested.get('large_min_m')} "
              f"(current: decode_max_m = {current['decode_max_m']}, large_min_m = {current['large_min_m']}). "
              f"Per shape: {suggested.get('per_shape')}."]
    if spilled:
        lines += ["", "Not eligible where a launched config spills: " + "; ".join(spilled) + "."]
    return "\n".join(lines) + "\n"


def run_offline_paths(output: Path, cache_dir: Path | None, command: str) -> dict:
    """Predict, suggest (paths.suggest_thresholds with LARGE_MARGIN) and write ``output``/offline/paths.md; returns
    the suggestion."""
    from .paths import suggest_thresholds

    rows = path_rows(cache_dir=cache_dir)
    suggested = suggest_thresholds(rows, large_margin=LARGE_MARGIN)
    sm90 = strategy.THRESHOLDS["sm90"]
    current = {"decode_max_m": sm90.decode_max_m, "large_min_m": sm90.large_min_m}
    header = ("# Predicted fwd_bwd ms per kernel path (offline cost model, sm_90a, H200)\n\n"
              f"Generated by `{command}`. NF4 with double quantization, bf16 x, fp32 adapters, r = 16; each path "
              "forced at each M (decode up to M = 64); bold: the fastest eligible path. The rules are in "
              f"fused_lora/bench/offline_paths.py (the middle path keeps an M only where the large path is "
              f"predicted more than {LARGE_MARGIN:.0%} slower there and at every larger M).\n\n")
    out = output / "offline" / "paths.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + predicted_path_table(rows, suggested, current))
    return suggested
