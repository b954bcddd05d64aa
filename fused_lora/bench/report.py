"""``python -m fused_lora bench --report``: report.md and PNG plots from a results JSON, and the short tables a run
prints at its end.

report.md lists the fused-kernel targets first (M=8192, r=16, bf16, fwd_bwd, Llama-3-8B shapes), then the
end-to-end ratios, the ratio table of every layer case, the plots, and every row. Plots: TFLOP/s vs M per shape,
one line per implementation, with the bf16 peak measured in the same run. Rendering needs matplotlib, no GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .impls import ALL_IMPLS, LLAMA3_8B_SHAPES, PASSES, SHAPE_NAMES
from .schema import ROW_KEYS, row_problem, validate_env

__all__ = ["target_checks", "e2e_summary", "summary_table", "plot_tflops", "render_report"]

TARGET_M, TARGET_R, TARGET_PASS = 8192, 16, "fwd_bwd"  # the cases target_checks reads (bf16, Llama-3-8B shapes)
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
        if row["bench"] == "qlora_linear" and row.get("rel_err_ok") is not False:  # a wrong result is not timed
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
            case = (K, N, TARGET_M, TARGET_R, TARGET_PASS, "bfloat16")
            per_shape[(K, N)] = _ratio(times.get(case, {}), numerator, denominator)
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
        backend = next((row.get("backend") for row in rows
                        if row["bench"] == "e2e_qlora_step" and row["impl"] == "fused"), None)
        fallback = backend is not None and backend != "triton"  # a GPU run whose patched layers did not run Triton

        def verdict(met: bool) -> str:
            return f"not measured (the fused layers ran the {backend!r} backend)" if fallback else \
                ("met" if met else "not met")

        parts += ["## End-to-end QLoRA step (fused ÷ PEFT+bitsandbytes)", "",
                  _markdown_table(["metric", "ratio", "goal", "verdict"], [
                      ["tokens/s", speed, "≥ 1.5", verdict(speed >= 1.5)],
                      ["peak memory", memory, "≤ 0.8", "not measured" if memory is None else verdict(memory <= 0.8)],
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
                  _markdown_table(["impl", "dtype", "K", "N", "ms", "GB/s", "of copy bandwidth"],
                                  [[row["impl"], row.get("dtype"), row["K"], row["N"], row["median_ms"],
                                    row.get("gbps"), row.get("bw_fraction")]
                                   for row in sorted(dequant_rows, key=lambda x: (str(x.get("dtype")), x["K"],
                                                                                  x["N"], x["impl"]))]), ""]
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
