"""Markdown of the offline instrument (fused_lora.bench.offline): the cost-model report with the targets, and the
compiled resources of every launch."""

from __future__ import annotations

import dataclasses

from . import offline_model
from .offline_model import GpuConstants

__all__ = ["offline_report", "compile_report", "target_checks"]

TARGET_SHAPE = {"arch": 90, "K": 4096, "N": 14336, "r": 16, "weight": "nf4dq", "x_dtype": "bf16",
                "adapter_dtype": "fp32"}  # fmt: skip
MIDDLE_M = (256,)  # the sweep's M between the decode sizes and the large-M sizes


def _at_target(rows, **extra):
    want = {**TARGET_SHAPE, **extra}
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _percent(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def _total(rows, impl, pass_name, M):
    found = _at_target(rows, kernel="total", impl=impl, **{"pass": pass_name}, M=M)
    return found[0] if found else None


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets at the target shape (sm_90a, K=4096, N=14336, r=16, bf16 x, fp32 adapters, NF4):
    [{"target", "value", "met"}]."""
    checks = []
    launched = [r for r in _at_target(rows, impl="fused") if r["M"] >= 64 and r["kernel"] != "total"
                and r.get("mma") is not None]  # fmt: skip
    configs = {(r["kernel"], r["path"], r["config"]) for r in launched}
    bad = sorted({(r["kernel"], r["path"], r["config"]) for r in launched
                  if r["spill_bytes"] or r["mma_pipelined"] is False})  # fmt: skip
    detail = {(r["kernel"], r["path"], r["config"]): r for r in launched}
    checks.append({"target": "no config the launchers pick at M >= 64 spills or waits for its MMA at once",
                   "value": f"{len(bad)} of {len(configs)} configs: " + (", ".join(
                       f"{k} {p} {c} (spill {detail[(k, p, c)]['spill_bytes']} B, pipelined "
                       f"{detail[(k, p, c)]['mma_pipelined']})" for k, p, c in bad) or "none"),
                   "met": not bad})  # fmt: skip
    middle = [r for r in _at_target(rows, impl="fused", chosen=True, **{"pass": "fwd_bwd"})
              if r["M"] in MIDDLE_M and r.get("sass_ratio") is not None and r["path"] == "inloop"]
    checks.append({"target": "middle-M NF4 main loop <= 1.5x the dense loop's SASS per iteration",
                   "value": ", ".join(f"{r['kernel']} M={r['M']} {r['sass_per_kstep']}/{r['dense_sass_per_kstep']}"
                                      f" = {r['sass_ratio']}x" for r in middle) or "no in-loop NF4 GEMM at middle M",
                   "met": all(r["sass_ratio"] <= 1.5 for r in middle)})  # fmt: skip
    for M, bound in ((8192, 1.15), (2048, 1.25)):
        total = _total(rows, "fused", "fwd_bwd", M)
        value = total["predicted_ratio_vs_cublas"] if total else None
        checks.append({"target": f"predicted fused fwd+bwd / dense cuBLAS <= {bound} at M={M}",
                       "value": "–" if value is None else f"{value:.3f}", "met": value is not None and value <= bound})
    for M in (1, 16):
        total = _total(rows, "fused", "fwd", M)
        value = total["predicted_hbm_fraction"] if total else None
        checks.append({"target": f"decode (fwd) at M={M}: >= 60 % of HBM bandwidth on the NF4 bytes",
                       "value": _percent(value), "met": value is not None and value >= 0.6})
    return checks


def _constants_table(constants: dict) -> list[str]:
    notes = {f.name: f.metadata.get("note", "") for f in dataclasses.fields(GpuConstants)}
    return _table(["constant", "value", "source"], [[k, v, notes.get(k, "")] for k, v in constants.items()])


def compile_error_lines(rows: list[dict]) -> list[str]:
    """A warning and one line per launched kernel that did not compile (its time is missing from every total and
    target below), or nothing."""
    failed = sorted({(r["arch"], r["kernel"], r.get("config"), r["error"].splitlines()[0][:200])
                     for r in rows if r.get("error") and r["kernel"] != "total"})  # fmt: skip
    if not failed:
        return []
    return [f"**{len(failed)} launched kernel configs did not compile: a pass that needs one has no predicted time "
            "below, and an autotuned launch is priced without them.**", "",
            *[f"- sm_{a} {k} {c}: {e}" for a, k, c, e in failed], ""]


def offline_report(data: dict, json_name: str) -> str:
    rows, env = data["rows"], data["env"]
    lines = [
        "# Offline performance report (no GPU): fused LoRA kernels on an H200, predicted from their SASS",
        "",
        f"Generated by `TRITON_INTERPRET=0 {env['command']}` in {env['runtime_s']} s on {env['cpu_count']} CPU cores "
        f"(triton {env['triton']}, torch {env['torch']}, commit {env['commit']}); rows in `{json_name}`.",
        "Every number below is a prediction of the cost model from compiled code, not a measurement, unless a "
        "`measured` column says otherwise. GPU results read: " + (", ".join(data["gpu_results"]) or "none yet") + ".",
        "",
        *compile_error_lines(rows),
        "## Targets (sm_90a, K=4096, N=14336, r=16, bf16 x, fp32 adapters, NF4 with double quantization)",
        "",
        *_table(["target", "today", "met"], [[c["target"], c["value"], c["met"]] for c in target_checks(rows)]),
        "",
        "## Predicted time per implementation at the target shape",
        "",
        "ms per pass and ratio to dense cuBLAS (the same pass's bf16 GEMMs alone); HBM: the weight's stored bytes "
        "read over the time, as a fraction of the measured copy bandwidth.",
        "",
    ]
    body = []
    for pass_name in ("fwd", "fwd_bwd"):
        for M in sorted({r["M"] for r in _at_target(rows, kernel="total")}):
            for impl in ("fused", "dense_cublas", "dequant_cublas", "peft_bnb"):
                t = _total(rows, impl, pass_name, M)
                if t:
                    body.append([pass_name, M, impl, t.get("path"), t["predicted_ms"], t["predicted_ratio_vs_cublas"],
                                 _percent(t["predicted_hbm_fraction"]), t.get("measured_ms"),
                                 t.get("measured_ratio_vs_cublas")])  # fmt: skip
    lines += _table(["pass", "M", "impl", "path", "predicted ms", "ratio", "HBM", "measured ms", "measured ratio"],
                    body)  # fmt: skip
    lines += ["", "## The configs the autotuner is predicted to pick (target shape, fwd_bwd, sm_90a)", "",
              "sass/iter: SASS instructions per main-loop iteration per warp; alu: those on the ALU pipe (16 lanes "
              "per scheduler: 2 cycles each); dense: a plain Triton bf16 GEMM at the same tile and layout; ring: "
              "shared-memory pipeline depth (min over the loop's buffers); pipelined: the main loop keeps >= 1 wgmma "
              "in flight (TTGIR pendings, SASS DEPBAR); bound: issue, alu (the ALU or IMAD pipe), shared (the SM's "
              "shared-memory pipe), mma, serial (a loop that waits for its MMA), memory or latency.", ""]
    launches: dict = {}  # (M, kernel, path, config) -> [row, launches, total ms]: slabs repeat one launch
    for r in _at_target(rows, impl="fused", chosen=True, **{"pass": "fwd_bwd"}):
        if r["kernel"] != "total":
            entry = launches.setdefault((r["M"], r["kernel"], r["path"], r.get("config")), [r, 0, 0.0])
            entry[1] += 1
            entry[2] += r.get("predicted_ms") or 0.0
    lines += _table(
        ["M", "kernel", "path", "config", "launches", "programs", "regs", "spill B", "smem B", "ring", "mma",
         "pipelined", "pendings", "sass/iter", "alu", "dense", "ratio", "bound", "ms (all launches)"],
        [[M, kernel, path, config, count, r.get("programs"), r.get("registers"), r.get("spill_bytes"),
          r.get("shared"), r.get("smem_ring_depth"), r.get("mma"), r.get("mma_pipelined"), r.get("ttgir_pendings"),
          r.get("sass_per_kstep"), r.get("alu_per_kstep"), r.get("dense_sass_per_kstep"), r.get("sass_ratio"),
          r.get("bound"), ms]
         for (M, kernel, path, config), (r, count, ms) in sorted(launches.items(), key=lambda kv: kv[0][0])],
    )  # fmt: skip
    lines += ["", "## Fused / dense cuBLAS over every shape (sm_90a, predicted)", ""]
    totals = [r for r in rows if r["kernel"] == "total" and r["impl"] == "fused"]
    ms_ = sorted({r["M"] for r in totals})
    table = {}
    for r in totals:
        key = (r["pass"], r["weight"], r["K"], r["N"], r["r"], r["adapter_dtype"])
        table.setdefault(key, {})[r["M"]] = r["predicted_ratio_vs_cublas"]
    lines += _table(["pass", "W", "K", "N", "r", "adapters", *[f"M={m}" for m in ms_]],
                    [[*k, *[v.get(m) for m in ms_]] for k, v in sorted(table.items())])
    lines += ["", "## Every launched config at the target shape (fwd_bwd)", ""]
    every = {}
    for r in rows:
        if (r["impl"] == "fused" and r["kernel"] != "total" and r.get("config") and r["pass"] == "fwd_bwd"
                and all(r.get(k) == v for k, v in TARGET_SHAPE.items() if k != "arch")):  # fmt: skip
            every.setdefault((r["arch"], r["M"], r["kernel"], r["path"], r["config"]), r)
    lines += _table(
        ["arch", "M", "kernel", "path", "config", "chosen", "regs", "spill st/ld B", "ring", "mma", "pipelined",
         "sass/iter", "dense", "ms"],
        [[f"sm_{a}", M, k, p, c, r["chosen"], r.get("registers"), f"{r.get('spill_bytes')}/{r.get('spill_loads')}",
          r.get("smem_ring_depth"), r.get("mma"), r.get("mma_pipelined"), r.get("sass_per_kstep"),
          r.get("dense_sass_per_kstep"), r.get("predicted_ms")] for (a, M, k, p, c), r in sorted(every.items())],
    )  # fmt: skip
    lines += ["", "## Constants (fused_lora.bench.offline_model.GpuConstants)", "", *_constants_table(data["constants"]),
              "", "## Cost model", "", offline_model.__doc__.strip(), ""]
    return "\n".join(lines)


def compile_report(records: list[dict], env: dict) -> str:
    """Compiled resources of every distinct launch (and baseline GEMM) of the instrument's sweep."""
    lines = [
        "# Compiled resources of the Triton kernels (no GPU needed)",
        "",
        f"Generated by `TRITON_INTERPRET=0 {env['command']}` (triton {env['triton']}, ptxas shipped with triton, "
        f"commit {env['commit']}): every launch the launchers make at the benchmark shapes, every autotune config "
        "they keep after pruning, compiled for sm_90a and sm_80; the dense_gemm rows are the plain Triton GEMM "
        "baseline at the same tiles. Id: kernel-W-x dtype-adapter dtype-r-config (M1: M=1, which Triton "
        "specialises). Shared memory limit per block: sm_80 166912 B, sm_90 232448 B. spill: bytes stored/loaded "
        "per thread (ptxas); tc: mma.sync/wgmma in the PTX, `ser` when ptxas serialised the wgmma; pipelined: the "
        "main loop keeps a wgmma in flight; sass/iter: SASS per main-loop iteration per warp; loads: the narrowest "
        "global load (bits). Cost-model predictions: bench/results/offline/report.md.",
        "",
    ]
    for arch in sorted({r["arch"] for r in records}, reverse=True):
        lines += [f"## sm_{arch}", ""]
        body = []
        for r in sorted((r for r in records if r["arch"] == arch), key=lambda r: r["id"]):
            if r["error"]:
                body.append([r["id"], "compile error: " + r["error"].splitlines()[0], *[None] * 9])
                continue
            tc = f"{r['mma_sync']}/{r['wgmma']}" + (" ser" if r["wgmma_serialized"] else "")
            body.append([r["id"], r["shared"], r["shared"] <= r["shared_limit"], r["registers"],
                         f"{r['spill_stores']}/{r['spill_loads']}", tc, r["mma_pipelined"], r["smem_ring_depth"],
                         r["sass_loop"], r["narrowest_global_load_bits"], r.get("compile_s")])  # fmt: skip
        lines += _table(["id", "shared B", "fits", "regs", "spill st/ld B", "tc", "pipelined", "ring", "sass/iter",
                         "loads", "compile s"], body)  # fmt: skip
        lines.append("")
    return "\n".join(lines)
