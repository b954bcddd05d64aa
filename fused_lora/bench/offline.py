"""The offline performance instrument: what the fused LoRA kernels will cost on an H200, read from their compiled code
on a machine without a GPU.

    TRITON_INTERPRET=0 python -m fused_lora.bench.offline            # the full sweep (both targets), about an hour
    TRITON_INTERPRET=0 python -m fused_lora.bench.offline --quick    # sm_90a, K=4096, N=14336, r=16: minutes

For every benchmark shape (M in {1, 16, 256, 2048, 8192}; Llama-3-8B (K, N); r in {16, 64}; bf16 x; fp32 and bf16
adapters; NF4 with double quantization and a dense bf16 W) and both passes (fwd, fwd_bwd), it

1. runs the launchers of fused_lora.kernels on shape-only tensors as the target GPU would see them
   (offline_capture.py): which kernels they launch, with which arguments, and every config the autotuner would
   time after its pruning;
2. compiles each launch for sm_90a and sm_80 with Triton's bundled ptxas (offline_compile.py): registers, spill
   bytes, shared memory, shared-memory ring depth, MMA kind (HGMMA/HMMA) and whether the main loop keeps an MMA in
   flight (TTGIR warp_group_dot_wait pendings, SASS WARPGROUP.DEPBAR), SASS instructions per main-loop iteration
   per warp, global load widths; the same for a plain Triton bf16 GEMM at the same tile (offline_baseline.py);
3. prices each launch, each pass and the peer implementations with the cost model of offline_model.py (its
   assumptions are in its docstring and in the report), with the H200 constants of ``GpuConstants``; the config
   the autotuner is predicted to pick is the one with the least predicted time;
4. writes ``bench/results/offline/<YYYYmmdd-HHMM>.json`` and the markdown reports ``bench/results/offline/report.md``
   (cost model, targets) and ``bench/results/compile_report.md`` (compiled resources of every launch).

JSON: ``{"env": {...}, "constants": {...}, "rows": [...]}``, one row per launched kernel config (``impl`` "fused")
and one ``kernel`` "total" row per implementation (fused, dense_cublas, dequant_cublas, peft_bnb), pass and shape,
each with ``kernel, pass, path, M, K, N, r, spill_bytes, mma, mma_pipelined, sass_per_kstep, dense_sass_per_kstep,
predicted_ms, predicted_ratio_vs_cublas, predicted_hbm_fraction`` and more (arch, weight, x/adapter dtypes, config,
chosen, registers, shared, smem_ring_depth, bound, ...). A kernel row's ratio is its share: its time over the pass's
dense cuBLAS time. Predictions are for sm_90a (H200) only; sm_80 rows carry the compiled figures.

Measured beside predicted: GPU results (``python -m fused_lora bench`` writes bench/results/<gpu>/<stamp>.json) are
joined onto the "total" rows on (impl, pass, M, K, N, r, x dtype, adapter dtype; NF4 double quant) from the newest
file of every GPU folder; the report shows measured_ms and the measured ratio to dense_cublas beside the prediction.

Kernels are priced through ``offline_kernels.KERNELS`` (one entry per kernel; see there to add one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from .offline_capture import LayerSpec, capture_pass, torch_dtype_name
from .offline_compile import SHARED_LIMIT, Job, Ptr, TlDtype, job_key, run_jobs
from .offline_kernels import KERNELS
from .offline_model import H200, GpuConstants, peer_pass, predict_kernel, predict_torch_op, simulate_pass

__all__ = ["Variant", "SWEEP", "QUICK", "TARGET", "plan", "launch_job", "launch_config", "evaluate", "main"]

SHAPES = ((4096, 14336), (4096, 4096), (14336, 4096), (4096, 1024))  # Llama-3-8B (K, N)
M_VALUES = (1, 16, 256, 2048, 8192)
RANKS = (16, 64)
ADAPTERS = (torch.float32, torch.bfloat16)
WEIGHTS = ("nf4dq", "dense")
ARCHS = (90, 80)
PASSES = ("fwd", "fwd_bwd")
PEERS = ("dense_cublas", "dequant_cublas", "peft_bnb")
PREDICTED_ARCH = 90
# Every row has these keys (None where they do not apply), the schema of docs/DESIGN.md
ROW_KEYS = ("kernel", "pass", "path", "M", "K", "N", "r", "spill_bytes", "mma", "mma_pipelined", "sass_per_kstep",
            "dense_sass_per_kstep", "predicted_ms", "predicted_ratio_vs_cublas", "predicted_hbm_fraction")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One layer shape and dtype variant on one target, in one pass."""

    arch: int
    pass_name: str
    spec: LayerSpec

    @property
    def name(self) -> str:
        s = self.spec
        return (f"sm{self.arch}-{self.pass_name}-{s.weight}-{torch_dtype_name(s.x_dtype)}-"
                f"A{torch_dtype_name(s.adapter_dtype)}-M{s.M}-K{s.K}-N{s.N}-r{s.r}")  # fmt: skip


def _variants(archs, shapes, ms, ranks, adapters, weights) -> list[Variant]:
    return [Variant(arch, p, LayerSpec(M, K, N, r, torch.bfloat16, a, w))
            for arch in archs for (K, N) in shapes for r in ranks for a in adapters for w in weights
            for M in ms for p in PASSES]  # fmt: skip


SWEEP = dict(archs=ARCHS, shapes=SHAPES, ms=M_VALUES, ranks=RANKS, adapters=ADAPTERS, weights=WEIGHTS)
QUICK = dict(archs=(90,), shapes=SHAPES[:1], ms=M_VALUES, ranks=(16,), adapters=(torch.float32,), weights=WEIGHTS)
TARGET = LayerSpec(8192, 4096, 14336, 16, torch.bfloat16, torch.float32, "nf4dq")


# ----------------------------------------------------------------------------------------------------------------
# Launches as compile jobs


def _job_value(value):
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return Ptr(torch_dtype_name(value.dtype), value.storage_offset() * value.element_size() % 16 == 0)
    if isinstance(value, tl.dtype):
        return TlDtype(value.name)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"offline instrument: cannot describe the launch argument {value!r} for compilation; teach "
                    "fused_lora.bench.offline._job_value and offline_compile.specialise its kind")


def _variant_tag(spec: LayerSpec) -> str:
    return (f"{spec.weight}-{torch_dtype_name(spec.x_dtype)}-A{torch_dtype_name(spec.adapter_dtype)}-r{spec.r}"
            + ("-dropout" if spec.dropout_p else "") + (f"-bs{spec.blocksize}" if spec.blocksize != 64 else "")
            + ("-M1" if spec.M == 1 else ""))  # fmt: skip


def launch_config(launch) -> str:
    """The launch's config as a short name: the autotune config's, or its BLOCK_* sizes and warps."""
    if launch.config:
        return launch.config
    blocks = "x".join(str(v) for k, v in launch.args.items() if k.startswith("BLOCK"))
    return f"{blocks}w{launch.options.get('num_warps', 4)}"


def launch_job(launch, spec: LayerSpec, arch: int) -> Job:
    """The compile job of one captured launch (``offline_capture.Launch``), named kernel-path-variant-config."""
    name = launch.kernel.removesuffix("_kernel")
    path = KERNELS[launch.kernel].path_of(launch.args)
    args = {k: _job_value(v) for k, v in launch.args.items()}
    return Job(f"{name}-{path}-{_variant_tag(spec)}-{launch_config(launch)}", launch.module, launch.kernel, args,
               dict(launch.options), arch)


def _baseline(launch, variant: Variant) -> Job | None:
    """The plain Triton GEMM at the launch's tile and operand layout (None for a kernel that is not a GEMM)."""
    from .offline_baseline import baseline_job

    names = KERNELS[launch.kernel].baseline
    if names is None:
        return None
    s, a, o = variant.spec, launch.args, launch.options
    rows, cols, step = (s.M, s.N, s.K) if names.b_transposed else (s.M, s.K, s.N)
    tile = (a[names.rows], a[names.cols], a[names.step], a.get("GROUP_M", 8), o.get("num_warps", 4),
            o.get("num_stages", 3))  # fmt: skip
    return baseline_job(variant.arch, torch_dtype_name(s.x_dtype), tile, names.b_transposed, rows, cols, step)


def plan(variants: list[Variant]) -> tuple[list, dict]:
    """Capture every variant; ([(variant, steps, facts)], {job key: Job}) with the baseline GEMM jobs."""
    captured, jobs = [], {}
    for variant in variants:
        steps, facts = capture_pass(variant.pass_name, variant.spec, variant.arch)
        captured.append((variant, steps, facts))
        for step in steps:
            for launch in step.candidates:
                model = KERNELS.get(launch.kernel)
                if model is None:
                    raise KeyError(f"offline instrument: the launchers launch {launch.kernel} ({launch.module}), "
                                   "which has no entry in fused_lora.bench.offline_kernels.KERNELS; add one")
                for job in (launch_job(launch, variant.spec, variant.arch), _baseline(launch, variant)):
                    if job is not None:
                        jobs.setdefault(job_key(job), job)
    return captured, jobs


# ----------------------------------------------------------------------------------------------------------------
# Rows


def _hbm_fraction(weight_bytes: float, ms: float, gpu: GpuConstants):
    return None if not ms else weight_bytes / (ms * 1e-3) / (gpu.hbm_tbps * 1e12)


def _kernel_row(variant, launch, record, base, weight_bytes: int, cublas_ms: float, gpu, launch_us=None) -> dict:
    model = KERNELS[launch.kernel]
    s = variant.spec
    trips = model.trips(launch.args)
    hbm = model.hbm_bytes(launch.args) if model.hbm_bytes else launch.tensor_bytes
    row = {
        "impl": "fused", "kernel": launch.kernel, "pass": variant.pass_name, "path": model.path_of(launch.args),
        "arch": variant.arch, "M": s.M, "K": s.K, "N": s.N, "r": s.r, "weight": s.weight,
        "x_dtype": torch_dtype_name(s.x_dtype), "adapter_dtype": torch_dtype_name(s.adapter_dtype),
        "config": launch_config(launch), "programs": launch.programs, "trips": trips, "error": record["error"],
    }  # fmt: skip
    if record["error"]:
        return row
    sass, dense = record["sass_loop"], base["sass_loop"] if base and not base["error"] else None
    row.update({
        "registers": record["registers"], "shared": record["shared"], "smem_ring_depth": record["smem_ring_depth"],
        "spill_bytes": record["spill_stores"], "spill_loads": record["spill_loads"], "mma": record["mma"],
        "mma_pipelined": record["mma_pipelined"], "ttgir_pendings": record["ttgir_pendings"],
        "sass_per_kstep": sass, "dense_sass_per_kstep": dense, "alu_per_kstep": record.get("loop_alu"),
        "sass_ratio": round(sass / dense, 2) if sass and dense else None,
        "narrowest_load_bits": record["narrowest_global_load_bits"], "hbm_bytes": hbm,
    })  # fmt: skip
    if variant.arch == PREDICTED_ARCH:
        side = model.side_loops(launch.args) if model.side_loops else None
        t = predict_kernel(record, launch.programs, trips, hbm, gpu, launch_us, side)
        share = model.weight_share(launch.args) if model.weight_share else launch.weight_reads
        fraction = _hbm_fraction(share * weight_bytes, t.ms, gpu) if share else None
        row.update({"predicted_ms": round(t.ms, 5), "predicted_ratio_vs_cublas": round(t.ms / cublas_ms, 4),
                    "predicted_hbm_fraction": None if fraction is None else round(fraction, 3),
                    "predicted_compute_ms": round(t.compute_ms, 5), "predicted_memory_ms": round(t.memory_ms, 5),
                    "bound": t.bound, "occupancy": t.occupancy, "_time": t,
                    "_weight_bytes": share * weight_bytes})  # fmt: skip
    return row


def launches_early(steps) -> list[bool]:
    """Per step: whether it is a kernel launched with programmatic dependent launch (options["launch_pdl"]) right
    after a kernel on its stream that was launched so too (and so lets it launch early, kernels/pdl.py). A PyTorch op,
    a stream wait or the host's work between passes (a "host" mark) breaks the chain."""
    triggers, early = {}, []  # stream -> whether its last step is a kernel launched with PDL
    for step in steps:
        if step.sync:
            triggers = {} if step.sync[0] == "host" else {**triggers, step.sync[1]: False}
            early.append(False)
            continue
        pdl = bool(step.candidates) and bool(step.candidates[0].options.get("launch_pdl"))
        early.append(pdl and triggers.get(step.stream, False))
        triggers[step.stream] = pdl
    return early


def evaluate(captured, records: dict, gpu: GpuConstants = H200) -> list[dict]:
    """Rows of every launch (each candidate config, ``chosen`` marking the least predicted time among those that fit
    the GPU's shared memory) and the "total" rows of the fused pass and of the peers; ``records`` maps job keys to
    compile records."""
    rows = []
    for variant, steps, facts in captured:
        s = variant.spec
        cublas_ms = peer_pass("dense_cublas", variant.pass_name, s.M, s.K, s.N, s.r, s.x_dtype.itemsize, gpu)["ms"]
        timeline, paths, weight_read, failed = [], set(), 0.0, 0
        for step, early in zip(steps, launches_early(steps)):
            if step.sync:
                timeline.append(step.sync)
                continue
            if step.torch_op:
                t = predict_torch_op(step.torch_op.bytes, gpu)
                priced = variant.arch == PREDICTED_ARCH
                rows.append({"impl": "fused", "kernel": f"torch.{step.torch_op.name}", "pass": variant.pass_name,
                             "path": "torch", "arch": variant.arch, "M": s.M, "K": s.K, "N": s.N, "r": s.r,
                             "weight": s.weight, "x_dtype": torch_dtype_name(s.x_dtype),
                             "adapter_dtype": torch_dtype_name(s.adapter_dtype), "hbm_bytes": step.torch_op.bytes,
                             "predicted_ms": round(t.ms, 5) if priced else None,
                             "predicted_ratio_vs_cublas": round(t.ms / cublas_ms, 4) if priced else None,
                             "chosen": True})  # fmt: skip
                timeline.append(("work", step.stream, t))
                continue
            group = []
            for launch in step.candidates:
                base = _baseline(launch, variant)
                record = records[job_key(launch_job(launch, s, variant.arch))]
                group.append(_kernel_row(variant, launch, record, base and records[job_key(base)],
                                         facts["weight_bytes"], cublas_ms, gpu, gpu.pdl_launch_us if early else None))
            # a config with more shared memory than the GPU has fails to launch: the autotuner skips it
            priced = [r for r in group if "_time" in r and r["shared"] <= SHARED_LIMIT[variant.arch]]
            best = min(priced, key=lambda r: r["predicted_ms"]) if priced else None
            for r in group:
                r["chosen"] = r is best if priced else len(group) == 1
            if best is not None:
                timeline.append(("work", step.stream, best["_time"]))
                paths.add(best["path"])
                weight_read += best["_weight_bytes"]
            else:
                failed += 1  # no config of this launch compiled: the pass has no time
            rows.extend(group)
        if variant.arch == PREDICTED_ARCH:
            rows.extend(_total_rows(variant, timeline, paths, weight_read, cublas_ms, gpu, failed))
    for r in rows:
        r.pop("_time", None)
        r.pop("_weight_bytes", None)
        for key in ROW_KEYS:
            r.setdefault(key, None)
    return rows


def _total_rows(variant, timeline, paths, weight_read, cublas_ms, gpu, failed: int = 0) -> list[dict]:
    """The pass's "total" rows: the fused pass (no time when ``failed`` of its launches have no compiled config)
    and the peers."""
    s = variant.spec
    x_bytes = s.x_dtype.itemsize
    common = {"pass": variant.pass_name, "arch": variant.arch, "M": s.M, "K": s.K, "N": s.N, "r": s.r,
              "weight": s.weight, "x_dtype": torch_dtype_name(s.x_dtype),
              "adapter_dtype": torch_dtype_name(s.adapter_dtype), "kernel": "total", "chosen": True}  # fmt: skip
    fused = {**common, "impl": "fused", "path": "+".join(sorted(paths - {"lowrank"})) or "lowrank"}
    if failed:
        fused.update(predicted_ms=None, predicted_ratio_vs_cublas=None, predicted_hbm_fraction=None,
                     error=f"{failed} launches did not compile or fit the shared memory")
    else:
        fused_ms = simulate_pass(timeline, gpu)
        fused.update(predicted_ms=round(fused_ms, 5), predicted_ratio_vs_cublas=round(fused_ms / cublas_ms, 3),
                     predicted_hbm_fraction=round(_hbm_fraction(weight_read, fused_ms, gpu), 3))
    rows = [fused]
    for impl in PEERS if s.weight == "nf4dq" else ("dense_cublas",):
        peer = peer_pass(impl, variant.pass_name, s.M, s.K, s.N, s.r, x_bytes, gpu)
        rows.append({**common, "impl": impl, "path": impl, "predicted_ms": round(peer["ms"], 5),
                     "predicted_ratio_vs_cublas": round(peer["ms"] / cublas_ms, 3),
                     "predicted_hbm_fraction": round(_hbm_fraction(peer["weight_read_bytes"], peer["ms"], gpu), 3)})
    return rows


_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def join_measured(rows: list[dict], results_root: Path) -> list[str]:
    """Add measured_ms (and measured_ratio_vs_cublas, against dense_cublas of the same run) to the "total" rows from
    the newest GPU results file of every folder under ``results_root`` but offline/; returns the files read. A GPU
    row without ``adapter_dtype`` had adapters in x's dtype (fused_lora.bench.impls)."""
    from .schema import find_newest_results

    read, measured = [], {}
    for folder in sorted(p for p in results_root.iterdir() if p.is_dir() and p.name != "offline"):
        try:
            path = find_newest_results(folder)
        except FileNotFoundError:
            continue
        read.append(str(path))
        for m in json.loads(path.read_text()).get("results", []):
            if m.get("bench") != "qlora_linear" or not m.get("median_ms"):
                continue
            x = _SHORT.get(m["dtype"], m["dtype"])
            a = _SHORT.get(m.get("adapter_dtype", m["dtype"]), m.get("adapter_dtype", m["dtype"]))
            measured[(m["impl"], m["pass"], m["M"], m["K"], m["N"], m["r"], x, a)] = m["median_ms"]
    for row in rows:
        if row["kernel"] != "total" or row["weight"] != "nf4dq":
            continue
        key = (row["impl"], row["pass"], row["M"], row["K"], row["N"], row["r"], row["x_dtype"], row["adapter_dtype"])
        if key in measured:
            cublas = measured.get(("dense_cublas", *key[1:]))
            row["measured_ms"] = measured[key]
            row["measured_ratio_vs_cublas"] = round(measured[key] / cublas, 3) if cublas else None
    return read


# ----------------------------------------------------------------------------------------------------------------
# The command


def _environment(started: float) -> dict:
    import triton

    from .environment import git_commit

    return {"triton": triton.__version__, "torch": torch.__version__, "commit": git_commit(),
            "command": " ".join(["python -m fused_lora.bench.offline", *sys.argv[1:]]),
            "runtime_s": round(time.time() - started, 1), "cpu_count": os.cpu_count()}  # fmt: skip


def _json_text(data: dict) -> str:
    """The results file: one row per line, compact; a row leaves out the extra fields that do not apply (None), never
    the schema's (ROW_KEYS)."""
    def row(r):
        return json.dumps({k: v for k, v in r.items() if v is not None or k in ROW_KEYS}, separators=(",", ":"))

    head = ",\n".join(f'"{k}": {json.dumps(v)}' for k, v in data.items() if k != "rows")
    return "{\n" + head + ',\n"rows": [\n' + ",\n".join(map(row, data["rows"])) + "\n]\n}\n"


def _constants(pairs: list[str]) -> GpuConstants:
    fields = {f.name: f.type for f in dataclasses.fields(GpuConstants)}
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--constants: unknown constant {name!r}; known: {sorted(fields)}")
        changes[name] = type(getattr(H200, name))(value)
    return dataclasses.replace(H200, **changes)


def parse_common(parser: argparse.ArgumentParser, argv, command: str) -> argparse.Namespace:
    """Parse ``argv`` with the options the offline commands share (this one and offline_paths) added to ``parser``;
    refuse to run under the interpreter (its kernels cannot be compiled)."""
    parser.add_argument("--output", type=Path, default=Path("bench/results"), help="results root (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fused_lora" / "offline",
                        help="compile records kept across runs (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--constants", nargs="*", default=[], metavar="NAME=VALUE", help="recalibrated constants")
    options = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit(f"{command}: run with TRITON_INTERPRET=0 (kernels under the interpreter cannot be compiled)")
    return options


def main(argv: list[str] | None = None) -> int:
    from .offline_report import compile_error_lines, compile_report, offline_report

    parser = argparse.ArgumentParser(prog="python -m fused_lora.bench.offline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sm_90a, K=4096 N=14336, r=16, fp32 adapters only")
    options = parse_common(parser, argv, "offline instrument")
    started = time.time()
    gpu = _constants(options.constants)
    variants = _variants(**(QUICK if options.quick else SWEEP))
    captured, jobs = plan(variants)
    print(f"offline: {len(variants)} variants, {len(jobs)} distinct compilations", file=sys.stderr)
    keys = list(jobs)
    records = dict(zip(keys, run_jobs([jobs[k] for k in keys], None if options.no_cache else options.cache)))
    rows = evaluate(captured, records, gpu)
    read = join_measured(rows, options.output) if options.output.is_dir() else []
    out_dir = options.output / "offline"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    env = _environment(started)
    data = {"env": env, "constants": dataclasses.asdict(gpu), "gpu_results": read, "rows": rows}
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(_json_text(data))
    (out_dir / "report.md").write_text(offline_report(data, json_path.name))
    (options.output / "compile_report.md").write_text(compile_report(list(records.values()), env))
    print(f"offline: wrote {json_path}, {out_dir / 'report.md'}, {options.output / 'compile_report.md'} "
          f"in {env['runtime_s']} s", file=sys.stderr)
    errors = compile_error_lines(rows)
    if errors:  # the predictions leave those kernels out: say so, and fail
        print("offline: " + "\n".join(line for line in errors if line), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
