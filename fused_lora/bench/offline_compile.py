"""Compile one Triton kernel launch for an NVIDIA target on a machine without a GPU, and read what the compiled kernel
does: the figures the offline performance instrument (``fused_lora.bench.offline``) and
tests/test_kernels_compile.py work from.

A launch is described by plain values (``Job``): the kernel (module and name), every argument as the launch passes it
(a tensor as ``Ptr(dtype)``, ints, floats, bools, None, tl.dtype constexprs as ``TlDtype``), the launch options
(num_warps, num_stages, enable_fp_fusion, ...) and the target (80 or 90). ``compile_job`` specialises it the way
Triton's JIT specialises a real launch (pointers and integers divisible by 16 carry tt.divisibility=16; integers equal
to 1 and None become constants), compiles it with Triton's bundled ptxas, disassembles the cubin with its cuobjdump,
and returns a record (a dict) of:

    shared, registers, stack, spill_stores, spill_loads     ptxas -v (bytes per thread for the spills)
    wgmma_serialized                                         ptxas warning C7512 (it waited after every wgmma)
    mma_sync, wgmma                                          tensor-core instructions in the PTX
    mma                                                      "HGMMA" / "HMMA" / None: the main loop's MMA in SASS
    ttgir_pendings                                           min ``pendings`` of the main loop's warp_group_dot_wait
    depbar_min                                               min N of the main loop's ``WARPGROUP.DEPBAR.LE gsb0, N``
    mma_pipelined                                            HGMMA main loop whose waits leave >= 1 MMA in flight
                                                             (depbar_min >= 1); None for HMMA or no MMA
    ring_depths, smem_ring_depth                             shared-memory buffers of the pipelined loads (TTGIR
                                                             local_alloc of rank 3: depth = leading dimension), min
    sass_total, sass_loop, unroll                            SASS instructions in the kernel and per main-loop
                                                             iteration per warp (the loop body divided by the
                                                             unrolling ptxas applied, read from the PTX loop)
    loop_alu, loop_imad, rest_alu, rest_imad                 of those, per main-loop iteration and once outside it,
                                                             the ones on the SM's half-rate pipes: ALU (integer,
                                                             logic, byte permute, select, move) and IMAD (integer
                                                             multiply-add and its MOV/SHL forms)
    loop_mma_flops, rest_mma_flops                           MMA FLOPs per program: per main-loop iteration, and once
                                                             outside it; {"16bit": .., "tf32": .., "fp8": ..}
    loop_membar, rest_membar                                 MEMBAR at GPU/system scope (fenced atomics)
    loop_global_loads, loop_load_bytes                       global loads (LDG, LDGSTS, TMA) per iteration per warp,
                                                             and bytes LDG/LDGSTS request per iteration per program
    global_loads, narrowest_global_load_bits                 PTX global loads by width ("ld.global 128b": count)

The main loop is the innermost SASS loop (a backward branch; not the branch-to-itself after EXIT) with the most MMA
instructions, then the most global loads, then the most instructions; a kernel without one has sass_loop None.

Run compilations with ``run_jobs`` (one process per core, each with its own empty Triton cache so ptxas reports every
kernel); ``cache_dir`` keeps records across runs, keyed by ``job_key``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["Ptr", "TlDtype", "Job", "SHARED_LIMIT", "compile_job", "run_jobs", "specialise", "job_key",
           "analyse_sass", "analyse_ttgir", "ptx_global_loads"]

# Largest shared memory one block may use (the opt-in limit): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of this Triton dtype name ("bf16", "u8", "fp32", "i64"); ``aligned``: its address
    is a multiple of 16 bytes (a fresh allocation is; a view at an offset may not be)."""

    dtype: str
    aligned: bool = True


@dataclasses.dataclass(frozen=True)
class TlDtype:
    """A tl.dtype constexpr argument, by name ("float32" or "fp32", "bfloat16" or "bf16"), resolved in the compiling
    process."""

    name: str


@dataclasses.dataclass
class Job:
    """One compilation: ``args`` maps parameters of the kernel to their launch values (missing ones take the
    kernel's defaults); ``options`` are the launch options (num_warps, num_stages, enable_fp_fusion, ...)."""

    id: str
    module: str
    kernel: str
    args: dict
    options: dict
    arch: int


_SELF_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # a changed reading makes new records


def job_key(job: Job) -> str:
    """Hash of everything a record depends on: the kernel's source (with the functions it calls), the specialisation
    of its arguments (so launches that differ only in sizes Triton does not specialise on share one key), the
    options, the target, the Triton version and this module (how the compiled code is read)."""
    import triton

    fn = getattr(importlib.import_module(job.module), job.kernel)
    signature, constexprs, attrs = specialise(fn, job.args)
    parts = [triton.__version__, _SELF_HASH, fn.cache_key, job.arch, signature,
             sorted((k, repr(v)) for k, v in constexprs.items()),
             sorted((str(k), v) for k, v in attrs.items()), sorted((k, repr(v)) for k, v in job.options.items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


class _TensorStandIn:
    """What Triton's specialisation reads of a tensor argument: its dtype and whether its address is 16-aligned."""

    _DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64", "u8": "uint8",
               "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64"}  # fmt: skip

    def __init__(self, ptr: Ptr):
        import torch

        self.dtype = getattr(torch, self._DTYPES[ptr.dtype])
        self._address = 0 if ptr.aligned else 8

    def data_ptr(self) -> int:
        return self._address


def specialise(fn, args: dict):
    """(signature, constexprs, attrs) of ASTSource for these argument values, as Triton's JIT specialises a launch
    (its own ``native_specialize_impl``: integers equal to 1 and None become constants, pointers and integers
    divisible by 16 carry tt.divisibility=16, except parameters the kernel names in ``do_not_specialize``);
    constexpr parameters are constants."""
    import triton.language as tl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    params = inspect.signature(fn.fn).parameters
    unknown = set(args) - set(params)
    missing = [n for n, p in params.items() if n not in args and p.default is inspect.Parameter.empty]
    if unknown or missing:
        raise ValueError(f"{fn.fn.__name__}: arguments {sorted(unknown)} unknown, {missing} missing")
    jit_params = {p.name: p for p in getattr(fn, "params", [])}
    for index, (name, param) in enumerate(params.items()):
        value = args.get(name, param.default)
        free = getattr(jit_params.get(name), "do_not_specialize", False)
        free_alignment = getattr(jit_params.get(name), "do_not_specialize_on_alignment", False)
        if isinstance(value, TlDtype):
            value = getattr(tl, value.name, None) or tl.dtype(value.name)
        if "constexpr" in str(param.annotation):
            kind, attr = "constexpr", None
        else:
            launched = _TensorStandIn(value) if isinstance(value, Ptr) else value
            try:
                kind, attr = native_specialize_impl(BaseBackend, launched, False, not free, not free_alignment)[:2]
            except Exception as error:
                raise TypeError(f"{fn.fn.__name__}: no specialisation for {name}={value!r} ({error})") from error
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(attr, str) and BaseBackend.parse_attr(attr):
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------------------------
# Reading the compiled code

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
# static shared memory (a ``.shared`` array the kernel declares itself, e.g. nf4_lookup's pair table) besides the
# dynamic shared memory Triton allocates (compiled.metadata.shared)
_PTXAS_STATIC_SHARED = re.compile(r"Used \d+ registers.*?(\d+) bytes smem")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_GLOBAL_LOAD = re.compile(
    r"\b(ld\.global[\w.]*|cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(?:0x)?[0-9a-f]+)"
)
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(LBB\d+);")
# HGMMA.64x128x16.F32.BF16, HMMA.1688.F32.TF32, QGMMA.64x64x32.F32.E4M3.E4M3; fp16 operands have no suffix of their
# own (HGMMA.64x16x16.F32, HMMA.16816.F32)
_SASS_MMA = re.compile(r"\b(HGMMA|HMMA|QGMMA)\.(\w+)\.F(?:32|16)(?:\.(BF16|F16|TF32|E4M3|E5M2))?\b")
_SASS_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)")
_SASS_GLOBAL_LOAD = re.compile(r"\b(LDG|LDGSTS|UBLKCP|UTMALDG)\b")
# Instructions of the two half-rate pipes (offline_model.GpuConstants.alu_cycles, imad_cycles), by opcode after an
# optional predicate; uniform-datapath instructions (ULOP3, UIADD3, ...) are neither. ALU: integer add, logic, shift,
# byte permute, compare, select, move, fp32 compare/min/max and the fp32 → 16-bit pack. IMAD: the integer
# multiply-adds, with the forms ptxas uses for moves, left shifts and adds (IMAD.MOV, IMAD.SHL, IMAD.IADD).
_SASS_ALU = re.compile(r"^(?:@!?U?P\w+\s+)?(?:LOP3|LOP|SHF|SHL|SHR|PRMT|IADD3|IADD|ISETP|ICMP|SEL|FSEL|LEA|IABS|IMNMX|"
                       r"VIMNMX|BMSK|SGXT|PLOP3|P2R|R2P|FLO|POPC|BREV|FSETP|FMNMX|MOV|F2FP)\b")
_SASS_IMAD = re.compile(r"^(?:@!?U?P\w+\s+)?(?:IMAD|IMUL|IDP)\b")
_SASS_LOAD = re.compile(r"\b(LDG|LDGSTS)(\.\S+)?\s")
# bytes per lane of a load or shared-memory access by its width suffix (none: 4)
_WIDTH_BYTES = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
# a register tile moved through shared memory inside the loop: stored (STS) and read back as MMA fragments (LDSM)
_SASS_SHARED_ROUND_TRIP = re.compile(r"\b(STS|LDSM)\b")
# shared-memory accesses by the cycles of the SM's shared-memory pipe they take without bank conflicts
# (offline_model.GpuConstants.shared_bytes_per_cycle): bytes per lane × 32 lanes; ldmatrix .x1/.x2/.x4 moves
# 128/256/512 bytes per warp
_SASS_SHARED = re.compile(r"\b(LDS|STS|LDSM)((?:\.[\w]+)*)\s")
_SASS_MEMBAR = re.compile(r"\bMEMBAR\.\S*(GPU|SYS)")
_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_PTX_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.")
_MMA_DTYPE = {"BF16": "16bit", "F16": "16bit", "TF32": "tf32", "E4M3": "fp8", "E5M2": "fp8"}


def _lane_bytes(suffixes: list[str]) -> int:
    """Bytes one lane moves, from an access's suffixes (["E", "128"] → 16, ["U8"] → 1, none of _WIDTH_BYTES → 4)."""
    return next((_WIDTH_BYTES[p] for p in suffixes if p in _WIDTH_BYTES), 4)


def _sass_load_bytes(instruction: str) -> int:
    """Bytes one lane requests with an LDG/LDGSTS (0 for anything else): LDG.E.128 → 16, LDG.E.U8 → 1, LDG.E → 4."""
    if not (m := _SASS_LOAD.search(instruction)):
        return 0
    return _lane_bytes((m.group(2) or "").split("."))


def _sass_shared_bytes(instruction: str) -> int:
    """Bytes a warp moves through shared memory with one LDS/STS/LDSM (0 for anything else): LDS.128 → 512,
    LDS → 128, LDSM.16.M88.4 → 512."""
    if not (m := _SASS_SHARED.search(instruction)):
        return 0
    parts = (m.group(2) or "").upper().split(".")
    if m.group(1) == "LDSM":  # LDSM.16.M88.4 (x4), .2, or none (x1)
        return {"4": 512, "2": 256}.get(parts[-1], 128)
    return 32 * _lane_bytes(parts)


def _global_load_bits(instruction: str) -> tuple[str, int]:
    """("ld.global" or "cp.async", bits one instruction moves): ld.global.v4.b32 → 128; cp.async ..., 0x10 → 128."""
    if instruction.startswith("cp.async"):
        size = instruction.rsplit(",", 1)[1].strip()
        return "cp.async", 8 * int(size, 16 if size.startswith("0x") else 10)
    parts = instruction.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"[bsuf](\d+)", p)))
    return "ld.global", lanes * bits


def ptx_global_loads(ptx: str) -> dict:
    """{"ld.global 8b": count, "cp.async 128b": count, ...} over the PTX."""
    loads = {}
    for instruction in _GLOBAL_LOAD.findall(ptx):
        kind, bits = _global_load_bits(instruction)
        loads[f"{kind} {bits}b"] = loads.get(f"{kind} {bits}b", 0) + 1
    return loads


def _innermost(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def _ptx_loop_mma(ptx: str) -> int:
    """MMA instructions in the PTX loop that holds the most of them (Triton emits one iteration per loop body)."""
    lines = [line for line in ptx.splitlines() if line.strip() and not line.strip().startswith("//")]
    labels, loops = {}, []
    for i, line in enumerate(lines):
        if m := _PTX_LABEL.match(line):
            labels[m.group(1)] = i
        elif (m := _PTX_BRANCH.search(line)) and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    counts = [sum(bool(_PTX_MMA.search(line)) for line in lines[a:b + 1]) for a, b in _innermost(loops)]
    return max(counts, default=0)


def _mma_flops(instructions: list[str], num_warps: int) -> dict:
    """MMA FLOPs one program executes over ``instructions`` (each warp runs the stream once), by operand kind."""
    flops = {}
    for ins in instructions:
        if not (m := _SASS_MMA.search(ins)):
            continue
        kind, shape, dtype = m.groups()
        if kind == "HMMA":  # per warp: m16n8k16 ("16816") or m16n8k8 ("1688")
            mnk = (16, 8, int(shape[3:]))
            per_program = num_warps
        else:  # warpgroup-wide: m64nNkK, issued once by each of the 4 warps of a warpgroup
            mnk = tuple(int(v) for v in shape.split("x"))
            per_program = max(1, num_warps // 4)
        key = _MMA_DTYPE[dtype or "F16"]
        flops[key] = flops.get(key, 0) + 2 * mnk[0] * mnk[1] * mnk[2] * per_program
    return flops


def analyse_sass(sass: str, ptx: str, num_warps: int, main_loop: int | None = None) -> dict:
    """The main loop and MMA figures of a kernel from Triton's SASS listing (``compiled.asm["sass"]``); the main
    loop is the innermost loop with the most MMA, then loads, or the ``main_loop``-th innermost loop in code order
    (offline_kernels.KernelModel.main_loop)."""
    instructions, labels, loops = [], {}, []
    for line in sass.splitlines():
        line = line.strip()
        if re.fullmatch(r"LBB\d+:", line):
            labels[line[:-1]] = len(instructions)
        elif "\t" in line:
            instructions.append(line.split("\t", 1)[1])
    for i, ins in enumerate(instructions):  # a backward branch closes a loop; not the 1-instruction trap after EXIT
        if (m := _SASS_BRANCH.search(ins)) and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))

    def rank(loop):
        body = instructions[loop[0]:loop[1] + 1]
        return (sum(bool(_SASS_MMA.search(s)) for s in body), sum(bool(_SASS_GLOBAL_LOAD.search(s)) for s in body),
                len(body))

    innermost = sorted(_innermost(loops))
    if main_loop is not None and main_loop < len(innermost):
        main = innermost[main_loop]
    else:
        main = max(innermost, key=rank, default=None)
    body = instructions[main[0]:main[1] + 1] if main else []
    rest = instructions[:main[0]] + instructions[main[1] + 1:] if main else instructions
    loop_mma = [s for s in body if _SASS_MMA.search(s)]
    ptx_mma = _ptx_loop_mma(ptx)
    unroll = max(1, round(len(loop_mma) / ptx_mma)) if loop_mma and ptx_mma else 1
    kind = _SASS_MMA.search(loop_mma[0]).group(1) if loop_mma else None
    depbars = [int(m.group(1), 16) for s in body if (m := _SASS_DEPBAR.search(s))]
    depbar_min = min(depbars) if depbars else None
    pipelined = None
    if kind in ("HGMMA", "QGMMA"):
        pipelined = depbar_min is None or depbar_min >= 1
    loop_flops = {k: v / unroll for k, v in _mma_flops(body, num_warps).items()}
    return {
        "mma": kind, "mma_pipelined": pipelined, "depbar_min": depbar_min, "unroll": unroll,
        "sass_total": len(instructions), "sass_loop": round(len(body) / unroll) if main else None,
        # the other innermost loops, in code order: SASS per iteration and whether it loads from global memory
        "side_loops": [[b - a + 1, any(bool(_SASS_GLOBAL_LOAD.search(s)) for s in instructions[a:b + 1])]
                       for a, b in innermost if (a, b) != main],
        "loop_mma_flops": loop_flops, "rest_mma_flops": _mma_flops(rest, num_warps),
        "loop_alu": sum(bool(_SASS_ALU.match(s)) for s in body) / unroll,
        "loop_imad": sum(bool(_SASS_IMAD.match(s)) for s in body) / unroll,
        "rest_alu": sum(bool(_SASS_ALU.match(s)) for s in rest),
        "rest_imad": sum(bool(_SASS_IMAD.match(s)) for s in rest),
        "loop_membar": sum(bool(_SASS_MEMBAR.search(s)) for s in body) / unroll,
        "rest_membar": sum(bool(_SASS_MEMBAR.search(s)) for s in rest),
        "loop_global_loads": sum(bool(_SASS_GLOBAL_LOAD.search(s)) for s in body) / unroll,
        "loop_shared_round_trip": sum(bool(_SASS_SHARED_ROUND_TRIP.search(s)) for s in body) / unroll,
        "loop_load_bytes": sum(32 * _sass_load_bytes(s) for s in body) * num_warps / unroll,
        "loop_shared_bytes": sum(_sass_shared_bytes(s) for s in body) / unroll,
        "rest_shared_bytes": sum(_sass_shared_bytes(s) for s in rest),
    }  # fmt: skip


_TTGIR_RING = re.compile(r"%(\w+?)(?:_\d+)? = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x\d+x?\w*,.*mutable")
_TTGIR_PENDINGS = re.compile(r"warp_group_dot_wait .*\{pendings = (\d+)")


def analyse_ttgir(ttgir: str) -> dict:
    """Ring depths of the pipelined loads and the MMA waits of the innermost scf.for that holds a wgmma wait."""
    rings = {}
    for m in _TTGIR_RING.finditer(ttgir):
        rings[m.group(1)] = min(int(m.group(2)), rings.get(m.group(1), 1 << 30))
    lines = ttgir.splitlines()
    loops = []  # (first line, last line) of every scf.for body
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            indent = len(line) - len(line.lstrip())
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent),
                       len(lines) - 1)  # fmt: skip
            loops.append((i, end))
    with_waits = [(a, b) for a, b in loops if any(_TTGIR_PENDINGS.search(s) for s in lines[a:b + 1])]
    pendings = None
    if inner := _innermost(with_waits):
        a, b = inner[0]
        pendings = min(int(m.group(1)) for s in lines[a:b + 1] if (m := _TTGIR_PENDINGS.search(s)))
    return {"ring_depths": rings, "smem_ring_depth": min(rings.values(), default=None), "ttgir_pendings": pendings}


# ----------------------------------------------------------------------------------------------------------------
# Compiling


def _main_loop(kernel: str) -> int | None:
    from .offline_kernels import KERNELS

    model = KERNELS.get(kernel)
    return model.main_loop if model is not None else None


def compile_job(job: Job) -> dict:
    """Compile one job for sm_<arch>; the record of what the compiled kernel uses (``error`` set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = {"id": job.id, "kernel": job.kernel, "arch": job.arch, "num_warps": job.options.get("num_warps", 4),
              "num_stages": job.options.get("num_stages"), "shared_limit": SHARED_LIMIT[job.arch], "error": None}
    fn = getattr(importlib.import_module(job.module), job.kernel)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constexprs, attrs = specialise(fn, job.args)
        with contextlib.redirect_stdout(log):  # ptxas -v output (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        sass = compiled.asm["sass"]
    except Exception as error:  # reported per job; the caller names the job that failed
        record["error"] = f"{type(error).__name__}: {error}"[:2000] + log.getvalue()[-2000:]
        return record
    ptxas = log.getvalue()
    spills = _PTXAS_SPILLS.search(ptxas)
    static_shared = int(m.group(1)) if (m := _PTXAS_STATIC_SHARED.search(ptxas)) else 0
    ptx = compiled.asm["ptx"]
    loads = ptx_global_loads(ptx)
    record.update({
        "compile_s": round(time.perf_counter() - start, 2),
        "shared": compiled.metadata.shared + static_shared, "static_shared": static_shared,
        "registers": int(_PTXAS_REGISTERS.search(ptxas).group(1)),
        "stack": int(spills.group(1)), "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3)),
        "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)), "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in ptxas,
        "global_loads": loads,
        "narrowest_global_load_bits": min((int(key.split()[1][:-1]) for key in loads), default=None),
        **analyse_ttgir(compiled.asm["ttgir"]),
        **analyse_sass(sass, ptx, record["num_warps"], _main_loop(job.kernel)),
    })  # fmt: skip
    return record


def _start_worker(cache_root: str) -> None:
    """A compiling process: real compilation, its own empty Triton cache (so ptxas runs and reports every kernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("offline compile: set TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


def run_jobs(jobs: list[Job], cache_dir: Path | None = None, workers: int | None = None) -> list[dict]:
    """Records of ``jobs`` in their order, compiled over one process per CPU core; with ``cache_dir``, records of
    earlier runs are reused (failed compilations are never cached)."""
    keys = [job_key(job) for job in jobs]
    records: dict[str, dict] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for key in set(keys):
            path = cache_dir / f"{key}.json"
            if path.exists():
                records[key] = json.loads(path.read_text())
    todo = {key: job for key, job in zip(keys, jobs) if key not in records}
    if todo:
        with tempfile.TemporaryDirectory() as cache_root:
            with ProcessPoolExecutor(workers or os.cpu_count() or 1, initializer=_start_worker,
                                     initargs=(cache_root,)) as pool:  # fmt: skip
                for key, record in zip(todo, pool.map(compile_job, todo.values())):
                    records[key] = record
                    if cache_dir is not None and record["error"] is None:
                        (cache_dir / f"{key}.json").write_text(json.dumps(record))
    return [{**records[key], "id": job.id} for key, job in zip(keys, jobs)]
