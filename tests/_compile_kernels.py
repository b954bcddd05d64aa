"""The CI subset of the offline performance instrument (fused_lora.bench.offline): compile, for real GPU targets on a
machine without one, what the launchers launch, and report per compiled kernel what test_kernels_compile.py checks.

tests/test_kernels_compile.py runs this script once, in a subprocess with TRITON_INTERPRET=0 (under the CPU
interpreter @triton.jit functions are interpreted and cannot be compiled), the compilations spread over one process
per CPU core. It compiles

- every launch of the training step (fwd_bwd) of the target layer (x bf16, NF4 with double quantization,
  K=4096, N=14336, r=16, fp32 adapters) on sm_90a, with every autotune config the autotuner keeps, at the
  instrument's ``CI_VARIANTS`` (one M per path the launchers choose: decode, middle, large), found by running the
  launchers (fused_lora.bench.offline_capture), so a new kernel or config is compiled here without a change; and
  the launches of ``SPLIT_VARIANTS`` and ``EDGE_VARIANTS`` not already among them (the middle path's split-K
  forward, at N=1024; the decode path's 64-row tiles with a dense W at r = 64 and with fp32 x);
- the DoRA variants of those GEMM launches on sm_90a (``_dora_jobs``: the forward's COL_SCALE epilogue, its ADD_Z
  one at every config the autotuner keeps for ADD_Z, dx with c in its main loop, the LoRA dx adding t, and the
  frozen dx storing t = m⊙(((c−1)⊙g)·W) at every config the autotuner keeps for the frozen dx), as
  fused_lora/kernels/lora.py launches them for fused_lora/dora.py;
- the other kernels of the package as their launchers launch them (dropout mask, NF4 quantize/dequantize, the
  AdamW kernels), on sm_90a and sm_80.

    TRITON_INTERPRET=0 python tests/_compile_kernels.py            # one JSON object: {"records": [...]}
    TRITON_INTERPRET=0 python tests/_compile_kernels.py --record   # the RECORD table of test_kernels_compile.py

``--cache DIR`` reuses the records of earlier compilations of the very same code (the instrument's cache,
~/.cache/fused_lora/offline by default there; keys cover the kernel sources and the reading): for regenerating
RECORD after ``python -m fused_lora.bench.offline``. The test never passes it: CI compiles everything.

Record ids: sm<arch>-<kernel>-<path>-<W>-<x>-A<adapters>-r<r>-<config> (the instrument's job ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from fused_lora.bench.offline_capture import LayerSpec
from fused_lora.bench.offline_compile import Job, Ptr

TARGET = dict(K=4096, N=14336, r=16, x_dtype=torch.bfloat16, adapter_dtype=torch.float32, weight="nf4dq")
# (arch, M): one M per path of the launchers at the target shape (strategy.Thresholds): decode, middle, large
CI_VARIANTS = [(90, 16), (90, 32), (90, 64), (90, 256), (90, 8192), (80, 16), (80, 256), (80, 8192)]
ARCHS = (90, 80)
# (arch, M, shape, pass): a layer whose middle-M forward splits K (launch_gemm.y_splits), Llama-3-8B's k_proj
SPLIT_VARIANTS = [(arch, 256, dict(N=1024), "fwd_bwd") for arch in ARCHS]
# ... and the decode path at its largest tile (64 rows, sm_90's default up to M = 64) with the most shared memory: a
# dense W at r = 64, and fp32 x (whose decode dx takes 229376 of sm_90's 232448 B; its per-element NF4 lookup keeps no
# state, which Triton 3.6 once failed to compile)
EDGE_VARIANTS = [(90, 64, dict(weight="dense", r=64), "fwd_bwd"), (90, 64, dict(x_dtype=torch.float32), "fwd_bwd")]
N_SMALL, K_SMALL = 4096, 4096
# (arch, M, layer changes): the decode forward with the shared-memory pair table at the edges of where the launcher
# takes it (launch_decode.pair_table_shared), at both of its BLOCK_M (16, 32; the decode path forced): the most shared
# memory (r = 64, fp32 adapters, dropout; the A100 takes the byte permutes there), fp16 x with bf16 adapters, blocks
# of 32 (twice the scales); plus the frozen layer (_frozen_decode_job)
PAIR_TABLE_VARIANTS = [(arch, M, changes) for arch in ARCHS for M in (16, 32)
                       for changes in (dict(r=64, dropout_p=0.1),
                                       dict(x_dtype=torch.float16, adapter_dtype=torch.bfloat16),
                                       dict(adapter_dtype=torch.bfloat16, blocksize=32))]  # fmt: skip
DEFAULT_SHARED = 48 * 1024  # what a block may use without Triton's opt-in


def shared_memory_problem(record: dict) -> str | None:
    """What would stop the compiled kernel from launching for lack of shared memory, or None: a kernel with a static
    shared array of its own (nf4_lookup's pair table) over 48 KiB in all must ask Triton for more than 48 KiB of
    dynamic shared memory (only then does Triton's launcher opt in beyond 48 KiB, counting the static part); a
    decode forward with the pair table must stay within the bound its launcher assumed (facts["pair_table_bound"])."""
    static = record.get("static_shared", 0)
    dynamic = record["shared"] - static
    if static and record["shared"] > DEFAULT_SHARED and dynamic <= DEFAULT_SHARED:
        return (f"{static} B of static and {dynamic} B of dynamic shared memory: over 48 KiB in all, but Triton opts "
                "in only for a dynamic share over 48 KiB (launch_decode.PAIR_TABLE_STAGES)")
    bound = record.get("facts", {}).get("pair_table_bound")
    if bound is not None and record["shared"] > bound:
        return (f"{record['shared']} B of shared memory > {bound} B, launch_decode.pair_table_shared's bound: the "
                "launcher would take the pair table on GPUs that cannot hold it")
    return None


def _small_kernel_jobs(arch: int) -> list[Job]:
    """The kernels outside the LoRA passes, with their launchers' meta-parameters."""
    dequant = {"packed_ptr": Ptr("u8"), "code_ptr": Ptr("fp32"), "n_elements": N_SMALL * K_SMALL, "BLOCKSIZE": 64,
               "NESTED_BLOCKSIZE": 256, "PAIRS": 1024}
    adamw_tables = {"address_ptr": Ptr("i64"), "numel_ptr": Ptr("i64"), "scalar_ptr": Ptr("fp32"),
                    "block_map_ptr": Ptr("i64")}
    cases = [
        ("dropout_mask", "dropout", "dropout_mask_kernel",
         {"m_ptr": Ptr("fp32"), "seed": 1234, "M": 8192, "K": K_SMALL, "p": 0.1, "keep_scale": 1 / 0.9,
          "BLOCK_M": 16, "BLOCK_K": 64}, {}),
        ("nf4_quantize-bf16", "nf4", "nf4_quantize_kernel",
         {"x_ptr": Ptr("bf16"), "packed_ptr": Ptr("u8"), "absmax_ptr": Ptr("fp32"), "bounds_ptr": Ptr("fp32"),
          "n_elements": N_SMALL * K_SMALL, "n_blocks": N_SMALL * K_SMALL // 64, "BLOCKSIZE": 64,
          "BLOCKS_PER_PROGRAM": 32}, {}),
        ("nf4_dequantize-nf4dq-bf16", "nf4", "nf4_dequantize_kernel",
         {**dequant, "absmax_ptr": Ptr("u8"), "out_ptr": Ptr("bf16"), "nested_absmax_ptr": Ptr("fp32"),
          "nested_code_ptr": Ptr("fp32"), "offset_ptr": Ptr("fp32"), "DOUBLE_QUANT": True},
         {"enable_fp_fusion": False}),
        ("nf4_dequantize-nf4-fp16", "nf4", "nf4_dequantize_kernel",
         {**dequant, "absmax_ptr": Ptr("fp32"), "out_ptr": Ptr("fp16"), "nested_absmax_ptr": Ptr("fp32"),
          "nested_code_ptr": Ptr("fp32"), "offset_ptr": Ptr("fp32"), "DOUBLE_QUANT": False},
         {"enable_fp_fusion": False}),
        ("adamw32-torch-bf16", "adamw", "adamw32_kernel",
         {**adamw_tables, "p_like": Ptr("bf16"), "g_like": Ptr("bf16"), "BNB_ORDER": False, "BLOCK": 4096},
         {"num_warps": 8}),
        ("adamw32-bnb-fp32", "adamw", "adamw32_kernel",
         {**adamw_tables, "p_like": Ptr("fp32"), "g_like": Ptr("fp32"), "BNB_ORDER": True, "BLOCK": 4096},
         {"num_warps": 8}),
        ("adamw8bit-bf16", "adamw", "adamw8bit_kernel",
         {**adamw_tables, "code_m_ptr": Ptr("fp32"), "code_v_ptr": Ptr("fp32"), "lut_m_ptr": Ptr("u8"),
          "lut_v_ptr": Ptr("u8"), "p_like": Ptr("bf16"), "g_like": Ptr("bf16"), "ROWS": 4, "QBLOCK": 256},
         {"num_warps": 4, "enable_fp_fusion": False}),
    ]  # fmt: skip
    return [Job(f"sm{arch}-{name}", f"fused_lora.kernels.{module}", kernel, args, options, arch)
            for name, module, kernel, args, options in cases]


def _kept_config_jobs(job: Job, facts: dict, args: dict, names: tuple, tag: str, prune_args=None):
    """[(job, facts)] of ``job``'s kernel with ``args`` at every config the autotuner keeps for them on sm_90 (pruned
    with ``prune_args``, default ``args``; ``names``: the output and reduction block names), named <job id without
    its config>-<tile>w<warps>s<stages>-dora-<tag>."""
    from fused_lora.kernels.autotune import gemm_configs, keep_tiles_for_m

    out = []
    for config in keep_tiles_for_m(gemm_configs((9, 0), *names), prune_args or args):
        tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", *names))
        name = f"{job.id.rsplit('-', 1)[0]}-{tile}w{config.num_warps}s{config.num_stages}-dora-{tag}"
        options = {**job.options, "num_warps": config.num_warps, "num_stages": config.num_stages}
        out.append((Job(name, job.module, job.kernel, {**args, **config.kwargs}, options, job.arch),
                    {**facts, "block_m": config.kwargs["BLOCK_M"]}))
    return out


def _dora_jobs(job: Job, facts: dict) -> list[tuple[Job, dict]]:
    """The DoRA variants of one sm_90 LoRA GEMM job (module docstring), named <job id>-dora-<variant>."""
    import dataclasses

    x = job.args["x_ptr" if facts["kernel"] == "lora_fwd_kernel" else "g_ptr"]
    dropout = {"p": 0.1, "keep_scale": 1 / 0.9}
    if facts["kernel"] == "lora_fwd_kernel":
        variants = {"COL_SCALE": {"COL_SCALE": True, "z_ptr": x, "col_scale_ptr": Ptr("fp32")}}
    else:
        variants = {"COL_SCALE": {"COL_SCALE": True, "col_scale_ptr": Ptr("fp32")},
                    "ADD_T": {"ADD_T": True, "DROPOUT": True, "t_ptr": x, **dropout}}
    out = [(dataclasses.replace(job, id=f"{job.id}-dora-{name}", args={**job.args, **extra}), facts)
           for name, extra in variants.items()]
    if job.args["BLOCK_M"] != facts["first_block_m"]:
        return out
    if facts["kernel"] == "lora_fwd_kernel":
        # y = c⊙z + b reading z (ADD_Z) at the configs kept for it (autotune: not the NF4 forward's tall tile)
        add_z = {**job.args, "ADD_Z": True, "z_ptr": x, "col_scale_ptr": Ptr("fp32")}
        out += _kept_config_jobs(job, facts, add_z, ("BLOCK_N", "BLOCK_K"), "ADD_Z")
    else:
        # t = m⊙(((c−1)⊙g)·W): the frozen dx (no low-rank operands) at the configs kept for it
        frozen = {**job.args, "HAS_LORA": False, "NEED_DA": False, "x_ptr": None, "a_ptr": None, "v_ptr": None,
                  "da_ptr": None, "COL_SCALE": True, "col_scale_ptr": Ptr("fp32"), "MASK_DX": True, **dropout}
        out += _kept_config_jobs(job, facts, frozen, ("BLOCK_K", "BLOCK_N"), "MASK_DX", {**frozen, "dx_ptr": None})
    return out


def ci_jobs() -> list[tuple[Job, dict]]:
    """[(job, facts)]: the CI subset, each job with what the test needs to know about its launch."""
    from fused_lora.bench.offline import launch_job
    from fused_lora.bench.offline_capture import capture_pass
    from fused_lora.bench.offline_compile import job_key
    from fused_lora.bench.offline_kernels import KERNELS
    from fused_lora.kernels import strategy

    found, seen = [], set()
    for arch, M, shape, pass_name in [(arch, M, {}, "fwd_bwd") for arch, M in CI_VARIANTS] + SPLIT_VARIANTS \
            + EDGE_VARIANTS:
        spec = LayerSpec(M, **{**TARGET, **shape})
        steps, _ = capture_pass(pass_name, spec, arch)
        for step in steps:
            for launch in step.candidates:
                if launch.kernel not in KERNELS:
                    raise KeyError(f"{launch.kernel} has no entry in fused_lora.bench.offline_kernels.KERNELS")
                job = launch_job(launch, spec, arch)
                job.id = f"sm{arch}-{job.id}"
                if job_key(job) in seen:
                    continue
                seen.add(job_key(job))
                facts = {"M": M, "kernel": launch.kernel, "candidates": len(step.candidates),
                         "reads_nf4": bool(launch.weight_reads) and spec.weight != "dense",
                         "block_m": launch.args.get("BLOCK_M"),
                         "fragment": bool(launch.args.get("FRAGMENT")),
                         "pair_table_bound": _pair_table_bound(launch.args, spec.adapter_dtype.itemsize)}  # fmt: skip
                found.append((job, facts))
                if arch == 90 and launch.kernel in ("lora_fwd_kernel", "lora_dx_kernel") and launch.args["HAS_LORA"]:
                    first_block_m = step.candidates[0].args["BLOCK_M"]
                    found += [(j, f) for j, f in _dora_jobs(job, {**facts, "first_block_m": first_block_m})
                              if job_key(j) not in seen and not seen.add(job_key(j))]
    for arch, M, changes in PAIR_TABLE_VARIANTS:
        spec = LayerSpec(M, **{**TARGET, **changes})
        with strategy.use_thresholds(decode_max_m=M):
            steps, _ = capture_pass("fwd", spec, arch)
        for launch in (c for step in steps for c in step.candidates if c.kernel == "lora_decode_fwd_kernel"):
            job = launch_job(launch, spec, arch)
            job.id = f"sm{arch}-{job.id}"
            if job_key(job) not in seen:
                seen.add(job_key(job))
                found.append((job, _pair_table_facts(launch.args, spec)))
    for job, facts in list(found):
        if facts.get("pair_table_bound") and job.args["HAS_LORA"] and "dropout" not in job.id:
            frozen = _frozen_decode_job(job)
            if job_key(frozen) not in seen:
                seen.add(job_key(frozen))
                found.append((frozen, {**facts, "pair_table_bound": _pair_table_bound(frozen.args, 0)}))
    for arch in ARCHS:
        found += [(job, {"kernel": job.kernel}) for job in _small_kernel_jobs(arch)]
    return found


def _pair_table_bound(args: dict, a_bytes: int) -> int | None:
    from fused_lora.kernels.launch_decode import pair_table_shared

    if args.get("LOOKUP") != "lds" or "FRAGMENT" not in args:  # the decode forward's bound (the GEMMs': autotune)
        return None
    return pair_table_shared(args["R_PAD"], a_bytes, args["HAS_LORA"], args["BLOCKSIZE"], args["BLOCK_M"])


def _pair_table_facts(args: dict, spec: LayerSpec) -> dict:
    return {"M": spec.M, "kernel": "lora_decode_fwd_kernel", "candidates": 1, "reads_nf4": True,
            "block_m": args.get("BLOCK_M"), "fragment": bool(args.get("FRAGMENT")),
            "pair_table_bound": _pair_table_bound(args, spec.adapter_dtype.itemsize)}


def _frozen_decode_job(job: Job) -> Job:
    """The frozen layer's decode forward (no u column: the least shared memory) from a LoRA one."""
    args = {**job.args, "HAS_LORA": False, "a_ptr": None, "u_ptr": None}
    return dataclasses.replace(job, id=f"{job.id}-frozen", args=args)


def run(cache_dir=None) -> dict:
    from fused_lora.bench.offline_compile import run_jobs

    start = time.perf_counter()
    jobs = ci_jobs()
    records = run_jobs([job for job, _ in jobs], cache_dir)
    return {"seconds": round(time.perf_counter() - start, 1),
            "records": [{**record, "facts": facts} for record, (_, facts) in zip(records, jobs)]}


def _record_table(report: dict) -> str:
    """RECORD of test_kernels_compile.py for the compiled kernels of this report."""
    lines = ["RECORD = {"]
    for r in report["records"]:
        if r["error"]:
            lines.append(f"    # {r['id']}: compile error")
            continue
        lines.append(f'    "{r["id"]}": ({r["spill_stores"]}, {r["spill_loads"]}, {r["mma_pipelined"]}),')
    return "\n".join(lines + ["}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="print the RECORD table instead of JSON")
    parser.add_argument("--cache", metavar="DIR", help="reuse (and keep) compile records in DIR")
    parser.add_argument("--check-compiles", action="store_true",
                        help="only say whether every kernel compiles (exit 1 naming those that do not): for another "
                             "Triton than the one RECORD was made with, e.g. the GPU machine's 3.6 (.ci/run)")
    options = parser.parse_args()
    report = run(options.cache)
    if options.check_compiles:
        import triton

        failed = [r for r in report["records"] if r["error"] or shared_memory_problem(r)]
        for r in failed:
            problem = r["error"] and (r["error"].splitlines()[-1] if r["error"].strip() else "error")
            print(f"{r['id']}: {problem or shared_memory_problem(r)}")
        print(f"triton {triton.__version__}: {len(report['records']) - len(failed)} of {len(report['records'])} "
              f"kernels compile ({report['seconds']} s)")
        sys.exit(1 if failed else 0)
    if options.record:
        print(_record_table(report))
    else:
        json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
