"""Compile every Triton kernel of fused_lora for an NVIDIA target on a machine without a GPU, and report what each
compiled kernel uses: shared memory, registers, spills, tensor-core instructions and the widths of its global loads.

tests/test_kernels_compile.py runs this script once, in a subprocess with TRITON_INTERPRET=0 (under the CPU
interpreter @triton.jit functions are interpreted and cannot be compiled); the compilations of both targets are spread
over one process per CPU core. bench/results/compile_report.md was made with every autotune config of the GEMMs:

    TRITON_INTERPRET=0 python tests/_compile_kernels.py --all-configs --markdown bench/results/compile_report.md

Without --markdown it prints one JSON object per target: {"arch", "triton", "ptxas", "records": [...]}.

Every launch is specialised as Triton's JIT specialises a real one (pointers and integers divisible by 16 carry
tt.divisibility=16; integers equal to 1 and None arguments become constants), with the arguments and meta-parameters
the launchers in fused_lora/kernels/ pass at a Llama-3-8B shape (M=8192 or M=8, K=N=4096, r=16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in limit): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
GEMM_KERNELS = ("lora_fwd_kernel", "lora_dx_kernel")

M_LARGE, M_SMALL, K_LLAMA, N_LLAMA, K_RAGGED = 8192, 8, 4096, 4096, 4100


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of this Triton dtype name ("bf16", "u8", "fp32", "i64"), 16-byte aligned."""

    dtype: str


@dataclasses.dataclass(frozen=True)
class TlDtype:
    """A tl.dtype constexpr argument, by name ("float32", "bfloat16"), resolved in the compiling process."""

    name: str


@dataclasses.dataclass
class Case:
    """One kernel compilation: ``args`` maps every parameter of the kernel to its value at launch."""

    id: str  # readable test id, e.g. "lora_fwd-nf4dq-lora-bf16-128x256x64w8s3"
    module: str  # fused_lora.kernels submodule holding the kernel
    kernel: str
    args: dict
    options: dict  # num_warps, num_stages, enable_fp_fusion as the launcher passes them
    role: str = ""  # GEMM autotune config: "first" (tried first at training M), "small_m" (first at M ≤ 8), "other"
    tile: tuple = ()  # (BLOCK_M, BLOCK_OUT, BLOCK_REDUCE, GROUP_M, num_warps, num_stages) of a GEMM config


_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _tile_name(tile) -> str:
    bm, bo, br, _, warps, stages = tile
    return f"{bm}x{bo}x{br}w{warps}s{stages}"


def _gemm_tiles(arch: int):
    """[(role, tile)]: every autotune config for ``arch`` in the autotuner's order, with its role."""
    from fused_lora.kernels.autotune import gemm_configs, keep_tiles_for_m

    configs = gemm_configs((arch // 10, arch % 10), "BLOCK_N", "BLOCK_K")
    first = keep_tiles_for_m(configs, {"M_BUCKET": M_LARGE})[0]
    small = keep_tiles_for_m(configs, {"M_BUCKET": M_SMALL})[0]
    tiles = []
    for c in configs:
        kw = c.kwargs
        tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], c.num_warps, c.num_stages)
        tiles.append(("first" if c is first else "small_m" if c is small else "other", tile))
    return tiles


def _weight(kind: str, N: int, K: int, dtype: str) -> dict:
    """The W arguments of a GEMM kernel, as lora._weight_args builds them (blocksize 64)."""
    if kind == "dense":
        return {"w_ptr": Ptr(dtype), "absmax_ptr": None, "code_ptr": None, "nested_absmax_ptr": None,
                "nested_code_ptr": None, "offset_ptr": None, "stride_wn": K, "stride_wk": 1, "IS_NF4": False,
                "DOUBLE_QUANT": False, "BLOCKSIZE": 1, "NESTED_BLOCKSIZE": 1, "ROW_SCALES": False}
    double_quant = kind == "nf4dq"
    nested = (Ptr("fp32"), Ptr("fp32"), Ptr("fp32")) if double_quant else (None, None, None)
    return {"w_ptr": Ptr("u8"), "absmax_ptr": Ptr("u8" if double_quant else "fp32"), "code_ptr": Ptr("fp32"),
            "nested_absmax_ptr": nested[0], "nested_code_ptr": nested[1], "offset_ptr": nested[2],
            "stride_wn": 0, "stride_wk": 0, "IS_NF4": True, "DOUBLE_QUANT": double_quant, "BLOCKSIZE": 64,
            "NESTED_BLOCKSIZE": 256, "ROW_SCALES": K % 64 == 0}


def _precisions(dtype: str, adapter: str) -> dict:
    lowrank = "float32" if "fp32" in (dtype, adapter) else _TORCH_NAMES[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    return {"BASE_PRECISION": precision, "LOWRANK_DTYPE": TlDtype(lowrank), "LOWRANK_PRECISION": precision}


def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _fwd_args(weight: str, lora: bool, dtype: str, M: int, K: int, r: int, tile) -> dict:
    """lora_fwd_kernel as lora._launch_y launches it (x, y contiguous; fp32 A/B; bias only without LoRA)."""
    N = N_LLAMA
    bm, bo, br, group, _, _ = tile
    r_pad = _rank_pad(r) if lora else 16
    return {
        "x_ptr": Ptr(dtype), **_weight(weight, N, K, dtype),
        "u_ptr": Ptr("fp32") if lora else None, "b_ptr": Ptr("fp32") if lora else None,
        "bias_ptr": None if lora else Ptr(dtype), "y_ptr": Ptr(dtype),
        "M": M, "N": N, "K": K, "R": r if lora else 0, "M_BUCKET": min(1 << (M - 1).bit_length(), 8192),
        "stride_xm": K, "stride_xk": 1, "stride_um": r if lora else 0, "stride_ur": 1 if lora else 0,
        "stride_bn": r if lora else 0, "stride_br": 1 if lora else 0, "stride_ym": N, "stride_yn": 1,
        "scaling": 2.0, "HAS_BIAS": not lora, "HAS_LORA": lora, **_precisions(dtype, "fp32"),
        "R_PAD": r_pad, "R_CHUNK": min(r_pad, 64), "BLOCK_M": bm, "BLOCK_N": bo, "BLOCK_K": br, "GROUP_M": group,
    }  # fmt: skip


def _dx_args(weight: str, lora: bool, dtype: str, M: int, K: int, r: int, tile) -> dict:
    """lora_dx_kernel as lora._launch_dx launches it: with LoRA, dx and dA and dropout (the heaviest variant)."""
    N = N_LLAMA
    bm, bo, br, group, _, _ = tile
    r_pad = _rank_pad(r) if lora else 16
    lowrank = {"x_ptr": Ptr(dtype), "a_ptr": Ptr("fp32"), "v_ptr": Ptr("fp32")} if lora else {
        "x_ptr": None, "a_ptr": None, "v_ptr": None}
    return {
        "g_ptr": Ptr(dtype), **_weight(weight, N, K, dtype), **lowrank, "dx_ptr": Ptr(dtype),
        "da_ptr": Ptr("fp32") if lora else None,
        "M": M, "N": N, "K": K, "R": r if lora else 0, "M_BUCKET": min(1 << (M - 1).bit_length(), 8192),
        "stride_gm": N, "stride_gn": 1, "stride_xm": K if lora else 0, "stride_xk": 1 if lora else 0,
        "stride_ar": K if lora else 0, "stride_ak": 1 if lora else 0, "stride_vm": r if lora else 0,
        "stride_vr": 1 if lora else 0, "stride_dxm": K, "stride_dxk": 1, "stride_dar": K if lora else 0,
        "stride_dak": 1 if lora else 0, "scaling": 2.0, "seed": 1234, "p": 0.1 if lora else 0.0,
        "keep_scale": 1 / 0.9 if lora else 1.0, "NEED_DX": True, "NEED_DA": lora, "DROPOUT": lora,
        "HAS_LORA": lora, **_precisions(dtype, "fp32"), "R_PAD": r_pad, "R_CHUNK": min(r_pad, 64),
        "BLOCK_M": bm, "BLOCK_N": br, "BLOCK_K": bo, "GROUP_M": group,
    }  # fmt: skip


# GEMM variants: (kernel, W kind, low-rank term, dtype, K, r, roles compiled by the test). The test compiles each
# variant at the listed roles only (the whole file must stay fast on 2 cores: a spilling dx config takes 20 s);
# --all-configs compiles every variant, the extra ones too, at every config.
_FIRST, _SMALL = ("first",), ("small_m",)
_GEMM_VARIANTS = [
    ("lora_fwd", "nf4dq", True, "bf16", K_LLAMA, 16, _FIRST + _SMALL),
    ("lora_fwd", "nf4dq", False, "bf16", K_LLAMA, 16, _FIRST),
    ("lora_fwd", "nf4", True, "bf16", K_LLAMA, 16, _FIRST),
    ("lora_fwd", "dense", True, "bf16", K_LLAMA, 16, _FIRST + _SMALL),
    ("lora_fwd", "dense", False, "bf16", K_LLAMA, 16, _FIRST),
    ("lora_fwd", "nf4dq", True, "fp16", K_LLAMA, 16, _FIRST),
    ("lora_fwd", "nf4dq", True, "bf16", K_RAGGED, 16, _FIRST),
    ("lora_dx", "nf4dq", True, "bf16", K_LLAMA, 16, _FIRST + _SMALL),
    ("lora_dx", "nf4dq", False, "bf16", K_LLAMA, 16, _FIRST),
    ("lora_dx", "dense", True, "bf16", K_LLAMA, 16, _SMALL),
    ("lora_dx", "dense", False, "bf16", K_LLAMA, 16, _FIRST),
]
_GEMM_EXTRA_VARIANTS = [
    ("lora_fwd", "nf4dq", True, "bf16", K_LLAMA, 256, ()),
    ("lora_fwd", "dense", True, "fp32", K_LLAMA, 16, ()),
    ("lora_dx", "nf4", True, "bf16", K_LLAMA, 16, ()),
    ("lora_dx", "nf4dq", True, "bf16", K_LLAMA, 256, ()),
    ("lora_dx", "nf4dq", True, "bf16", K_RAGGED, 16, ()),
    ("lora_dx", "dense", True, "fp32", K_LLAMA, 16, ()),
]


def _launched_stages(arch: int, kernel: str, args: dict, tile) -> int:
    """num_stages the autotuner launches this tile with for these arguments (its pruning sets 1 for NF4 with
    ROW_SCALES False); the config's own when the pruning drops the tile (the test reports it as pruned)."""
    from fused_lora.kernels.autotune import gemm_configs, keep_tiles_for_m

    names = ("BLOCK_N", "BLOCK_K") if kernel == "lora_fwd" else ("BLOCK_K", "BLOCK_N")
    kept = keep_tiles_for_m(gemm_configs((arch // 10, arch % 10), *names), args)
    for c in kept:
        if (c.kwargs["BLOCK_M"], c.kwargs[names[0]], c.kwargs[names[1]]) == tile[:3]:
            return c.num_stages
    return tile[5]


def _gemm_cases(arch: int, all_configs: bool) -> list[Case]:
    cases = []
    variants = _GEMM_VARIANTS + (_GEMM_EXTRA_VARIANTS if all_configs else [])
    for role, config_tile in _gemm_tiles(arch):
        for name, weight, lora, dtype, K, r, roles in variants:
            if not all_configs and role not in roles:
                continue
            M = M_SMALL if role == "small_m" else M_LARGE
            build = _fwd_args if name == "lora_fwd" else _dx_args
            args = build(weight, lora, dtype, M, K, r, config_tile)
            tile = (*config_tile[:5], _launched_stages(arch, name, args, config_tile))
            parts = [name, weight, "lora" if lora else "frozen", dtype]
            parts += ([f"r{r}"] if r != 16 else []) + ([f"K{K}"] if K != K_LLAMA else []) + [_tile_name(tile)]
            cases.append(Case(
                id="-".join(parts), module="lora_fwd" if name == "lora_fwd" else "lora_bwd", kernel=f"{name}_kernel",
                args=args,
                options={"num_warps": tile[4], "num_stages": tile[5], "enable_fp_fusion": weight == "dense"},
                role=role, tile=tile,
            ))  # fmt: skip
    return cases


def _u_case(dtype: str, adapter: str, r: int, dropout: bool) -> Case:
    """lora_u_kernel as lora._compute_u launches it at M=8192."""
    r_pad = _rank_pad(r)
    args = {
        "x_ptr": Ptr(dtype), "a_ptr": Ptr(adapter), "u_ptr": Ptr("fp32"), "M": M_LARGE, "K": K_LLAMA, "R": r,
        "stride_xm": K_LLAMA, "stride_xk": 1, "stride_ar": K_LLAMA, "stride_ak": 1, "stride_um": r, "stride_ur": 1,
        "seed": 1234, "p": 0.1 if dropout else 0.0, "keep_scale": 1 / 0.9 if dropout else 1.0, "DROPOUT": dropout,
        "LOWRANK_DTYPE": _precisions(dtype, adapter)["LOWRANK_DTYPE"], "LOWRANK_PRECISION": "tf32",
        "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": min(r_pad, 64),
    }  # fmt: skip
    name = f"lora_u-{dtype}-A{adapter}-r{r}" + ("-dropout" if dropout else "")
    return Case(name, "lora_fwd", "lora_u_kernel", args, {"num_warps": 4})


def _vdb_case(dtype: str, r: int | None) -> Case:
    """lora_vdb_kernel as lora._launch_vdb launches it at M=8192 (r=None: the frozen layer's db only)."""
    from fused_lora.kernels.lora import vdb_tile

    r_pad = _rank_pad(r) if r else 16
    block_m, block_n, warps = vdb_tile(M_LARGE, r_pad)
    lora = r is not None
    args = {
        "g_ptr": Ptr(dtype), "b_ptr": Ptr("fp32") if lora else None, "u_ptr": Ptr("fp32") if lora else None,
        "v_ptr": Ptr("fp32") if lora else None, "db_lora_ptr": Ptr("fp32") if lora else None,
        "db_bias_ptr": Ptr("fp32"), "M": M_LARGE, "N": N_LLAMA, "R": r or 0, "N_PER_SPLIT": 1024,
        "stride_gm": N_LLAMA, "stride_gn": 1, "stride_bn": r or 0, "stride_br": 1 if lora else 0,
        "stride_um": r or 0, "stride_ur": 1 if lora else 0, "stride_vm": r or 0, "stride_vr": 1 if lora else 0,
        "stride_dbn": r or 0, "stride_dbr": 1 if lora else 0, "scaling": 2.0, "NEED_V": lora, "NEED_DB_LORA": lora,
        "NEED_DB_BIAS": True, **{k: v for k, v in _precisions(dtype, "fp32").items() if k != "BASE_PRECISION"},
        "R_PAD": r_pad, "BLOCK_M": block_m, "BLOCK_N": block_n,
    }  # fmt: skip
    name = f"lora_vdb-{dtype}-" + (f"r{r}" if lora else "frozen")
    return Case(name, "lora_bwd", "lora_vdb_kernel", args, {"num_warps": warps})


def _small_kernel_cases(all_configs: bool) -> list[Case]:
    """The non-GEMM kernels with the launchers' meta-parameters (r=128 of the v/dB pass only in the report)."""
    dequant = {"packed_ptr": Ptr("u8"), "code_ptr": Ptr("fp32"), "n_elements": N_LLAMA * K_LLAMA, "BLOCKSIZE": 64,
               "NESTED_BLOCKSIZE": 256, "PAIRS": 1024}
    adamw_tables = {"address_ptr": Ptr("i64"), "numel_ptr": Ptr("i64"), "scalar_ptr": Ptr("fp32"),
                    "block_map_ptr": Ptr("i64")}
    return [
        _u_case("bf16", "fp32", 16, True),
        _u_case("bf16", "bf16", 64, False),
        _vdb_case("bf16", 16),
        _vdb_case("bf16", 64),
        *([_vdb_case("bf16", 128)] if all_configs else []),
        _vdb_case("bf16", 256),
        _vdb_case("bf16", None),
        Case("dropout_mask", "dropout", "dropout_mask_kernel",
             {"m_ptr": Ptr("fp32"), "seed": 1234, "M": M_LARGE, "K": K_LLAMA, "p": 0.1, "keep_scale": 1 / 0.9,
              "BLOCK_M": 16, "BLOCK_K": 64}, {}),
        Case("nf4_quantize-bf16", "nf4", "nf4_quantize_kernel",
             {"x_ptr": Ptr("bf16"), "packed_ptr": Ptr("u8"), "absmax_ptr": Ptr("fp32"), "bounds_ptr": Ptr("fp32"),
              "n_elements": N_LLAMA * K_LLAMA, "n_blocks": N_LLAMA * K_LLAMA // 64, "BLOCKSIZE": 64,
              "BLOCKS_PER_PROGRAM": 32}, {}),
        Case("nf4_dequantize-nf4dq-bf16", "nf4", "nf4_dequantize_kernel",
             {**dequant, "absmax_ptr": Ptr("u8"), "out_ptr": Ptr("bf16"), "nested_absmax_ptr": Ptr("fp32"),
              "nested_code_ptr": Ptr("fp32"), "offset_ptr": Ptr("fp32"), "DOUBLE_QUANT": True},
             {"enable_fp_fusion": False}),
        Case("nf4_dequantize-nf4-fp16", "nf4", "nf4_dequantize_kernel",
             {**dequant, "absmax_ptr": Ptr("fp32"), "out_ptr": Ptr("fp16"), "nested_absmax_ptr": Ptr("fp32"),
              "nested_code_ptr": Ptr("fp32"), "offset_ptr": Ptr("fp32"), "DOUBLE_QUANT": False},
             {"enable_fp_fusion": False}),
        Case("adamw32-torch-bf16", "adamw", "adamw32_kernel",
             {**adamw_tables, "p_like": Ptr("bf16"), "g_like": Ptr("bf16"), "BNB_ORDER": False, "BLOCK": 4096},
             {"num_warps": 8}),
        Case("adamw32-bnb-fp32", "adamw", "adamw32_kernel",
             {**adamw_tables, "p_like": Ptr("fp32"), "g_like": Ptr("fp32"), "BNB_ORDER": True, "BLOCK": 4096},
             {"num_warps": 8}),
        Case("adamw8bit-bf16", "adamw", "adamw8bit_kernel",
             {**adamw_tables, "code_m_ptr": Ptr("fp32"), "code_v_ptr": Ptr("fp32"), "lut_m_ptr": Ptr("u8"),
              "lut_v_ptr": Ptr("u8"), "p_like": Ptr("bf16"), "g_like": Ptr("bf16"), "ROWS": 4, "QBLOCK": 256},
             {"num_warps": 4, "enable_fp_fusion": False}),
    ]  # fmt: skip


def cases(arch: int, all_configs: bool = False) -> list[Case]:
    """Every compilation for ``arch``: the GEMM kernels at their first and first small-M autotune configs (all
    configs and extra variants with ``all_configs``), then every other kernel of the package."""
    return _gemm_cases(arch, all_configs) + _small_kernel_cases(all_configs)


def _specialise(fn, args: dict):
    """(signature, constexprs, attrs) of ASTSource for these argument values, the way the JIT specialises them."""
    import triton.language as tl

    signature, constexprs, attrs = {}, {}, {}
    params = inspect.signature(fn.fn).parameters
    missing = set(params) ^ set(args)
    if missing:
        raise ValueError(f"{fn.fn.__name__}: arguments {sorted(missing)} missing or unknown")
    for index, (name, param) in enumerate(params.items()):
        value = args[name]
        if isinstance(value, TlDtype):
            value = getattr(tl, value.name)
        if "constexpr" in str(param.annotation) or value is None or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, Ptr):
            signature[name] = f"*{value.dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: no specialisation for {name}={value!r}")
    return signature, constexprs, attrs


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# A global load in the PTX: "ld.global[.nc][.v4].b32" or "cp.async.c[ag].shared.global [dst], [src], 0x10".
_GLOBAL_LOAD = re.compile(
    r"\b(ld\.global[\w.]*|cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(?:0x)?[0-9a-f]+)"
)


def _global_load_bits(instruction: str) -> tuple[str, int]:
    """("ld.global" or "cp.async", bits one instruction moves): ld.global.v4.b32 → 128; cp.async ..., 0x10 → 128."""
    if instruction.startswith("cp.async"):
        size = instruction.rsplit(",", 1)[1].strip()
        return "cp.async", 8 * int(size, 16 if size.startswith("0x") else 10)
    parts = instruction.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"[bsuf](\d+)", p)))
    return "ld.global", lanes * bits


def compile_case(case: Case, arch: int) -> dict:
    """Compile one case for sm_<arch>; the record of what the compiled kernel uses (or the error)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = {"id": case.id, "kernel": case.kernel, "arch": arch, "role": case.role, "tile": list(case.tile),
              "num_warps": case.options.get("num_warps", 4), "shared_limit": SHARED_LIMIT[arch], "error": None}
    fn = getattr(importlib.import_module(f"fused_lora.kernels.{case.module}"), case.kernel)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constexprs, attrs = _specialise(fn, case.args)
        with contextlib.redirect_stdout(log):  # ptxas -v output (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=dict(case.options))
    except Exception as error:  # reported per case; the test names the case that failed
        record["error"] = f"{type(error).__name__}: {error}"[:2000] + log.getvalue()[-2000:]
        return record
    ptxas = log.getvalue()
    spills = _PTXAS_SPILLS.search(ptxas)
    ptx = compiled.asm["ptx"]
    loads = {}  # "ld.global 8b" / "cp.async 128b" -> instructions in the PTX
    for instruction in _GLOBAL_LOAD.findall(ptx):
        kind, bits = _global_load_bits(instruction)
        loads[f"{kind} {bits}b"] = loads.get(f"{kind} {bits}b", 0) + 1
    record.update({
        "compile_s": round(time.perf_counter() - start, 2),
        "shared": compiled.metadata.shared,
        "registers": int(_PTXAS_REGISTERS.search(ptxas).group(1)),
        "stack": int(spills.group(1)), "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3)),
        "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)), "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in ptxas,
        "global_loads": loads,
        "narrowest_global_load_bits": min((int(key.split()[1][:-1]) for key in loads), default=None),
    })  # fmt: skip
    return record


def _start_worker(cache_root: str) -> None:
    """A compiling process: real compilation, its own empty Triton cache (so ptxas runs and reports every kernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("_compile_kernels.py: set TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


def _compile_job(job: tuple[int, Case]) -> dict:
    arch, case = job
    return compile_case(case, arch)


def run(archs, all_configs: bool) -> list[dict]:
    """One report per target; the compilations of all targets are spread over one process per CPU core."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    jobs = [(arch, case) for arch in archs for case in cases(arch, all_configs)]
    with tempfile.TemporaryDirectory() as cache_root:
        with ProcessPoolExecutor(os.cpu_count() or 1, initializer=_start_worker, initargs=(cache_root,)) as pool:
            records = list(pool.map(_compile_job, jobs))
    return [
        {"arch": arch, "triton": triton.__version__,
         "ptxas": re.search(r"release [\d.]+", get_ptxas_version(arch)).group(0),
         "records": [record for record in records if record["arch"] == arch]}
        for arch in archs
    ]  # fmt: skip


def _markdown(reports: list[dict], command: str) -> str:
    lines = [
        "# Compiled resources of the Triton kernels (no GPU needed)",
        "",
        f"Generated by `{command}` (triton {reports[0]['triton']}, ptxas shipped with triton). Every kernel is",
        "compiled for the target as the launchers in fused_lora/kernels/ launch it at a Llama-3-8B shape",
        f"(M={M_LARGE} or, for the small-M configs, M={M_SMALL}; K=N=4096; r=16 unless named; x bf16, A/B fp32).",
        "GEMM tiles are BLOCK_M x BLOCK_OUT x BLOCK_REDUCE, w = num_warps, s = num_stages; role: `first` is the",
        "config the autotuner tries first at training M, `small_m` the first one it keeps for M <= 8.",
        "Shared memory limit per block: sm_80 163 KiB (166912 B), sm_90 227 KiB (232448 B).",
        "tc = tensor-core instructions in the PTX (mma.sync / wgmma.mma_async counts); `ser` marks a kernel whose",
        "wgmma ptxas serialised for lack of registers. Loads: the narrowest global load (bits), ld.global or cp.async.",
        "",
    ]
    for report in reports:
        arch = report["arch"]
        lines += [f"## sm_{arch}", "", "| kernel / variant / config | role | shared B | fits | regs | spill st/ld B | "
                  "tc mma.sync/wgmma | narrowest load |", "|---|---|---|---|---|---|---|---|"]
        for r in report["records"]:
            if r["error"]:
                lines.append(f"| {r['id']} | {r['role']} | compile error: {r['error'].splitlines()[0]} |||||| ")
                continue
            fits = "yes" if r["shared"] <= r["shared_limit"] else "**NO**"
            spills = f"{r['spill_stores']}/{r['spill_loads']}"
            spills = f"**{spills}**" if r["spill_stores"] or r["spill_loads"] else spills
            tc = f"{r['mma_sync']}/{r['wgmma']}" + (" ser" if r["wgmma_serialized"] else "")
            lines.append(f"| {r['id']} | {r['role']} | {r['shared']} | {fits} | {r['registers']} | {spills} | {tc} | "
                         f"{r['narrowest_global_load_bits']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append", help="target(s); default: all")
    parser.add_argument("--all-configs", action="store_true", help="every GEMM autotune config and extra variants")
    parser.add_argument("--markdown", metavar="PATH", help="write the markdown report here instead of JSON")
    options = parser.parse_args()
    reports = run(options.arch or list(ARCHS), options.all_configs)
    if options.markdown:
        command = "TRITON_INTERPRET=0 python " + " ".join(["tests/_compile_kernels.py", *sys.argv[1:]])
        with open(options.markdown, "w") as out:
            out.write(_markdown(reports, command))
    else:
        json.dump(reports, sys.stdout)


if __name__ == "__main__":
    main()
