"""The offline cost model: a predicted time for a compiled Triton kernel on an H200 from what its SASS says, and for
the peer implementations from their FLOPs and bytes.

Constants (``GpuConstants``, ``H200``): measured on this workplace's H200 where a measurement exists (bf16 GEMM
769-798 TFLOP/s on random data at 8192³, device copy 4.3 TB/s counting bytes read and written, SM clock 1980 MHz
under load, 132 SMs); the rest are leads from public microbenchmarks, marked so, to recalibrate from GPU runs
(``dataclasses.replace(H200, hbm_latency_ns=...)``; ``fused_lora.bench.offline --constants k=v``).

Kernel model (``predict_kernel``), per launch of P programs of w warps, T main-loop iterations each (the registry in
offline_kernels.py gives T), from the compiled record (offline_compile.py):

1. Occupancy O: programs per SM, the least of registers (ptxas count, rounded up to 8 per thread and allocated per
   warp in units of 256), shared memory (Triton's and the kernel's own static arrays, +1 KiB reserved per program),
   64 warps and 32 programs per SM.
2. One iteration of one program costs I·w/4 issue cycles (I = SASS instructions per iteration per warp; each of the
   4 schedulers of an SM issues one warp instruction per cycle and hides every latency: a lower bound; when the
   loop's ALU instructions × ``alu_cycles`` or its IMAD instructions × ``imad_cycles`` exceed its SASS count, that
   is I instead: those pipes have 16 lanes per scheduler, so a warp instruction holds one 2 cycles) and C MMA
   cycles (the loop's MMA FLOPs over the SM's tensor-core rate: ``mma_tflops_16bit`` / SMs / clock for bf16/fp16,
   × ``tf32_fraction`` for tf32, × ``mma_sync_fraction`` for mma.sync/HMMA on Hopper) and S shared-memory cycles
   (the bytes its LDS, STS and ldmatrix move, × w, over ``shared_bytes_per_cycle``: one pipe per SM, without bank
   conflicts; a wgmma's own operand reads are in its MMA rate).
   p programs resident on one SM each doing one iteration take max(p·I·w/4, p·C, p·S, single) cycles, where single
   is one program's own critical path: max(I·w/4, S) + C when its loop waits for each MMA at once (HGMMA with
   mma_pipelined False: MMA and instruction issue serialise), max(I·w/4, S) otherwise; each fenced atomic (MEMBAR
   at GPU scope) adds ``membar_ns`` to it.
3. Waves: P programs over SMs·O slots; a last partial wave runs ceil(rest / SMs) programs per SM, so an under-filled
   grid (decode) pays one program's whole latency.
4. Outside the main loop (prologue, epilogue, the low-rank term of an epilogue) each program issues its remaining
   SASS once (or its remaining ALU or IMAD instructions, or shared-memory bytes, at their pipes' rates, as in 2.;
   plus its MMA), added per program an SM runs (no overlap with other programs' loops: pessimistic).
   A kernel's other loops (offline_kernels.KernelModel.side_loops) cost their trips × the larger of their issue
   time and one load latency per trip over the pipeline depth: added to every program when every program runs
   them after its main loop; when a few programs run them instead of the main loop (the decode forward's u), the
   kernel takes at least those programs' time.
5. Memory: the kernel moves each tensor it is passed once (HBM bytes = their sizes; the L2 catches re-reads of tiles,
   grouped launch order assumed), at ``hbm_tbps``; and a load pipelined ``depth`` iterations ahead (the ring depth of
   its shared-memory buffers minus one, at least 1) waits one latency per ``depth`` iterations: a program's loop
   takes at least T·latency/depth, latency = ``hbm_latency_ns`` for the share of requested bytes that is unique and
   ``l2_latency_ns`` for the rest (requested bytes: the loop's global loads in SASS, width × 32 lanes × w).
6. Time = max(compute, memory) + ``launch_us``; ``pdl_launch_us`` instead for a kernel launched with
   programmatic dependent launch whose predecessor on its stream is a kernel that let it launch early (both take
   part, kernels/pdl.py; not across a stream wait, a PyTorch op, or the host work between a forward and its backward).

Passes: steps on one stream add up; with a side stream (slab dequantization overlapped with a GEMM) steps start at
their stream's clock after the events they wait for, and the pass takes at least the sum of every step's compute
time and the sum of every step's memory time (the two streams share the SMs and the HBM).

Peers (``peer_pass``), as the GPU bench builds them (fused_lora.bench.impls), each operation priced
max(FLOPs / ``mma_tflops_16bit``, bytes / HBM) + launch (cuBLAS at the measured rate, element-wise passes at copy
speed), the adapters in x's dtype as the bench makes them (its rows with fp32 adapters price the same peers):
``dense_cublas`` x·Wᵀ (and g·W) on a bf16 W; ``dequant_cublas`` (Unsloth's path) bitsandbytes dequantize (three
kernels with double quantization: the absmax codes to fp32, plus the offset, then NF4 bytes in and bf16 W out),
u = x·Aᵀ, x·Wᵀ, addmm for y (reads and writes y), and in backward dequantize again, v = g·B, g·W, addmm for dx,
dA = vᵀ·x, dB = gᵀ·u and the two scalings; ``peft_bnb`` bnb Linear4bit (dequantize + linear) and PEFT 0.21's
result.clone(), lora_B(lora_A(x)), ·s and the addition, and autograd's backward of each of them.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["GpuConstants", "H200", "KernelTime", "occupancy", "loop_cycles_per_warp", "predict_kernel",
           "predict_torch_op", "simulate_pass", "peer_pass", "nf4_bytes"]


def _constant(value, note: str):
    return dataclasses.field(default=value, metadata={"note": note})


@dataclasses.dataclass(frozen=True)
class GpuConstants:
    """Constants of the cost model; each field's ``metadata["note"]`` says where its value comes from (measured on
    this workplace's H200, or a lead to recalibrate from GPU runs)."""

    name: str = _constant("NVIDIA H200 (sm_90a)", "the GPU the constants describe")
    sms: int = _constant(132, "measured: PyTorch's multi_processor_count")
    clock_ghz: float = _constant(1.98, "measured: SM clock right after bf16 GEMMs (nvidia-smi, 1980 MHz)")
    mma_tflops_16bit: float = _constant(790.0, "measured: cuBLAS bf16 8192^3 on random data, 769-798 TFLOP/s; the "
                                        "rate a wgmma loop that never waits reaches")
    tf32_fraction: float = _constant(0.5, "lead: datasheet tf32 tensor rate over bf16")
    mma_sync_fraction: float = _constant(0.6, "lead: mma.sync (HMMA) on Hopper over wgmma")
    hbm_tbps: float = _constant(4.3, "measured: device-to-device copy, bytes read + written")
    hbm_latency_ns: float = _constant(600.0, "lead: DRAM load latency under load")
    l2_latency_ns: float = _constant(150.0, "lead: L2 hit latency")
    membar_ns: float = _constant(500.0, "lead: MEMBAR at GPU scope (an L2 round trip plus draining stores)")
    launch_us: float = _constant(2.0, "lead: GPU time per launch on a busy stream (latency, ramp-up, tail)")
    pdl_launch_us: float = _constant(0.7, "lead: GPU time per launch of a kernel launched with programmatic "
                                     "dependent launch right after one that let it start early (kernels/pdl.py): "
                                     "its launch overlaps that kernel's last wave; left: the wait for its completion "
                                     "and memory flush, and the ramp-up")
    issue_per_cycle: int = _constant(4, "architecture: 4 warp schedulers per SM, one instruction per cycle each")
    alu_cycles: float = _constant(2.0, "architecture: 64 INT32 lanes per SM, 16 per scheduler (H100 whitepaper): a "
                                  "warp's ALU instruction (integer add, logic, shift, byte permute, compare, select, "
                                  "move) holds its scheduler's ALU pipe 2 cycles")
    imad_cycles: float = _constant(2.0, "architecture: 32-bit integer multiply-add at 64 results per clock per SM "
                                   "(CUDA programming guide, compute capability 9.0): IMAD and its MOV/SHL/IADD forms "
                                   "hold the FMA pipe's heavy half 2 cycles")
    shared_bytes_per_cycle: float = _constant(128.0, "architecture: 32 banks of 4 bytes per SM, one access each per "
                                              "clock: a warp's LDS/STS of 4 bytes per lane holds the SM's "
                                              "shared-memory pipe 1 cycle, LDS.128 4, ldmatrix .x4 4, without bank "
                                              "conflicts (which take more)")
    registers_per_sm: int = _constant(65536, "architecture")
    shared_per_sm: int = _constant(233472, "architecture: 228 KiB")
    shared_reserved_per_program: int = _constant(1024, "architecture: 1 KiB per resident block")
    max_warps_per_sm: int = _constant(64, "architecture")
    max_programs_per_sm: int = _constant(32, "architecture")

    @property
    def clock_hz(self) -> float:
        return self.clock_ghz * 1e9

    def mma_flops_per_cycle(self, kind: str, dtype: str) -> float:
        """Tensor-core FLOPs per SM per cycle for an MMA instruction ``kind`` (HGMMA, HMMA) on ``dtype`` operands."""
        rate = self.mma_tflops_16bit * 1e12 / self.sms / self.clock_hz
        rate *= {"16bit": 1.0, "tf32": self.tf32_fraction, "fp8": 2.0}[dtype]
        return rate * (self.mma_sync_fraction if kind == "HMMA" else 1.0)


H200 = GpuConstants()


@dataclasses.dataclass
class KernelTime:
    """A kernel's predicted time (ms) and what bounds it."""

    ms: float
    compute_ms: float
    memory_ms: float
    occupancy: int
    waves: float
    # "issue", "alu" (its ALU/IMAD pipe), "shared" (the SM's shared-memory pipe), "mma", "serial" (issue + MMA of a
    # loop that waits for each MMA), "memory", "latency"
    bound: str


def occupancy(record: dict, gpu: GpuConstants = H200) -> int:
    """Programs of this compiled kernel that fit on one SM at once (at least 1)."""
    warps = record["num_warps"]
    per_warp = math.ceil(max(record["registers"], 1) * 32 / 256) * 256
    by_registers = (gpu.registers_per_sm // per_warp) // warps
    shared = record["shared"]
    by_shared = gpu.shared_per_sm // (shared + gpu.shared_reserved_per_program) if shared else gpu.max_programs_per_sm
    return max(1, min(by_registers, by_shared, gpu.max_warps_per_sm // warps, gpu.max_programs_per_sm))


def _cycles_per_warp(sass: float, alu: float, imad: float, gpu: GpuConstants) -> float:
    """Scheduler cycles of ``sass`` instructions of one warp: one per cycle, or its ``alu`` ALU or ``imad`` IMAD
    instructions at their pipes' rates when those take longer."""
    return max(sass, gpu.alu_cycles * alu, gpu.imad_cycles * imad)


def loop_cycles_per_warp(record: dict, gpu: GpuConstants = H200) -> float:
    """Scheduler cycles one warp's main-loop iteration takes (_cycles_per_warp; above its SASS count the kernel
    is "alu"-bound)."""
    return _cycles_per_warp(record["sass_loop"] or 0, record.get("loop_alu", 0), record.get("loop_imad", 0), gpu)


def _shared_cycles(bytes_per_warp: float, warps: int, gpu: GpuConstants) -> float:
    """Cycles of the SM's shared-memory pipe for ``warps`` warps moving ``bytes_per_warp`` each."""
    return bytes_per_warp * warps / gpu.shared_bytes_per_cycle


def _mma_cycles(flops: dict, kind: str | None, gpu: GpuConstants) -> float:
    return sum(f / gpu.mma_flops_per_cycle(kind or "HGMMA", dtype) for dtype, f in flops.items())


def predict_kernel(record: dict, programs: int, trips: int, hbm_bytes: int, gpu: GpuConstants = H200,
                   launch_us: float | None = None, side_loops: list | None = None) -> KernelTime:
    """Predicted time of one launch of a compiled kernel (the module docstring's kernel model); ``launch_us``
    replaces ``gpu.launch_us`` (a launch that follows its predecessor by programmatic dependent launch);
    ``side_loops``: (trips, programs) of each of the record's other loops (offline_kernels.KernelModel)."""
    warps = record["num_warps"]
    slots_per_sm = occupancy(record, gpu)
    per_warp = loop_cycles_per_warp(record, gpu)
    issue = per_warp * warps / gpu.issue_per_cycle
    mma = _mma_cycles(record["loop_mma_flops"], record["mma"], gpu)
    membar = record["loop_membar"] * gpu.membar_ns * gpu.clock_ghz
    shared = _shared_cycles(record.get("loop_shared_bytes", 0), warps, gpu)
    waits_for_mma = record["mma"] in ("HGMMA", "QGMMA") and record["mma_pipelined"] is False
    single = max(issue, shared) + (mma if waits_for_mma else 0.0) + membar

    def round_cycles(p: int) -> float:
        return max(p * issue, p * mma, p * shared, single)

    slots = gpu.sms * slots_per_sm
    full, rest = divmod(programs, slots)
    rest_per_sm = math.ceil(rest / gpu.sms)
    loop_cycles = trips * (full * round_cycles(slots_per_sm) + (round_cycles(rest_per_sm) if rest else 0.0))
    rest_sass = record["sass_total"] - (record["sass_loop"] or 0) * record["unroll"]
    outside = _cycles_per_warp(rest_sass, record.get("rest_alu", 0), record.get("rest_imad", 0), gpu) * warps
    outside = max(outside / gpu.issue_per_cycle, _shared_cycles(record.get("rest_shared_bytes", 0), warps, gpu))
    outside += _mma_cycles(record["rest_mma_flops"], record["mma"], gpu)
    outside += record["rest_membar"] * gpu.membar_ns * gpu.clock_ghz
    per_sm = math.ceil(programs / gpu.sms)
    requested = record.get("loop_load_bytes", 0) * programs * trips
    unique = 1.0 if not requested else min(1.0, hbm_bytes / requested)
    latency_s = (unique * gpu.hbm_latency_ns + (1 - unique) * gpu.l2_latency_ns) * 1e-9
    depth = max(1, (record["smem_ring_depth"] or 1) - 1)
    every, own = _side_cycles(record, side_loops or [], latency_s * gpu.clock_hz / depth, gpu)
    compute_s = max(loop_cycles + per_sm * (outside + every), own + outside) / gpu.clock_hz

    waves_of_programs = math.ceil(programs / slots)
    latency_bound_s = waves_of_programs * trips * latency_s / depth if trips else 0.0
    bandwidth_s = hbm_bytes / (gpu.hbm_tbps * 1e12)
    memory_s = max(bandwidth_s, latency_bound_s)

    if compute_s >= memory_s:
        pipes = per_warp > (record["sass_loop"] or 0)
        bound = "serial" if waits_for_mma and mma > 0 else ("mma" if mma >= max(issue, shared) else
                                                            ("shared" if shared > issue else
                                                             ("alu" if pipes else "issue")))
    else:
        bound = "memory" if bandwidth_s >= latency_bound_s else "latency"
    total_s = max(compute_s, memory_s) + (gpu.launch_us if launch_us is None else launch_us) * 1e-6
    return KernelTime(total_s * 1e3, compute_s * 1e3, memory_s * 1e3, slots_per_sm, programs / slots, bound)


def _side_cycles(record: dict, side_loops: list, latency_cycles: float, gpu: GpuConstants) -> tuple[float, float]:
    """(cycles every program adds after its main loop, cycles of the programs that run loops of their own): each
    side loop's trips × the larger of its issue time and, when it loads from global memory, one latency per trip
    (as the main loop's, over its pipeline depth)."""
    loops = record.get("side_loops") or []
    if not loops:  # none compiled (e.g. Triton specialised a loop bound of 1 away): their code is outside's
        return 0.0, 0.0
    if len(side_loops) != len(loops):
        raise ValueError(f"offline model: {record.get('id')} has {len(loops)} loops besides its main one, its "
                         f"KernelModel side_loops names {len(side_loops)}")
    every = own = 0.0
    for (sass, loads), (trips, runners) in zip(loops, side_loops):
        cost = trips * max(sass * record["num_warps"] / gpu.issue_per_cycle, latency_cycles if loads else 0.0)
        if runners is None:
            every += cost
        else:
            own += cost
    return every, own


def predict_torch_op(nbytes: int, gpu: GpuConstants = H200) -> KernelTime:
    """A PyTorch memset, cast or copy: its bytes at HBM speed, plus a launch."""
    memory_ms = nbytes / (gpu.hbm_tbps * 1e12) * 1e3
    return KernelTime(memory_ms + gpu.launch_us * 1e-3, 0.0, memory_ms, 1, 0.0, "memory")


def simulate_pass(steps: list[tuple], gpu: GpuConstants = H200) -> float:
    """Time (ms) of a pass: ``steps`` in launch order, each ("work", stream, KernelTime) or ("record", stream,
    event), ("wait_event", stream, event), ("wait_stream", stream, other) (("host", ...) marks are ignored here).
    Streams run concurrently; the pass takes at least the sum of the steps' compute times and the sum of their memory
    times (shared SMs and HBM)."""
    clocks, events = {0: 0.0}, {}
    compute = memory = 0.0
    for kind, stream, value in steps:
        now = clocks.setdefault(stream, 0.0)
        if kind == "work":
            clocks[stream] = now + value.ms
            compute += value.compute_ms
            memory += value.memory_ms
        elif kind == "record":
            events[value] = now
        elif kind == "wait_event":
            clocks[stream] = max(now, events.get(value, 0.0))
        elif kind == "wait_stream":
            clocks[stream] = max(now, clocks.setdefault(value, 0.0))
    return max(max(clocks.values()), compute, memory)


# ----------------------------------------------------------------------------------------------------------------
# Peers


def _op_ms(flops: float, bytes_: float, gpu: GpuConstants) -> float:
    return (max(flops / (gpu.mma_tflops_16bit * 1e12), bytes_ / (gpu.hbm_tbps * 1e12)) + gpu.launch_us * 1e-6) * 1e3


def _gemm(M: int, N: int, K: int, a_bytes: int, b_bytes: int, out_bytes: int, gpu, accumulate: bool = False):
    """(M×K)·(K×N): operands read once, the output written once (read too with ``accumulate``: addmm)."""
    moved = M * K * a_bytes + K * N * b_bytes + M * N * out_bytes * (2 if accumulate else 1)
    return _op_ms(2.0 * M * N * K, moved, gpu)


def nf4_bytes(N: int, K: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of an NF4 weight as stored: packed codes, absmax (uint8 with double quantization), nested absmax."""
    blocks = -(-N * K // blocksize)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return (N * K + 1) // 2 + scales


def peer_pass(impl: str, pass_name: str, M: int, K: int, N: int, r: int, x_bytes: int = 2,
              gpu: GpuConstants = H200) -> dict:
    """{"ms": predicted time of one pass, "weight_read_bytes": bytes of the stored weight read} of a peer
    implementation (module docstring): a list of GEMMs and element-wise passes, each priced by ``_op_ms``."""
    ms, weight = [], nf4_bytes(N, K)
    reads = 2 if pass_name == "fwd_bwd" else 1

    def gemm(m, n, k, a_bytes, b_bytes, out_bytes, accumulate=False):
        ms.append(_gemm(m, n, k, a_bytes, b_bytes, out_bytes, gpu, accumulate))

    def elementwise(elements: int, in_bytes: int, out_bytes: int):
        ms.append(_op_ms(0.0, elements * (in_bytes + out_bytes), gpu))

    x = x_bytes
    if impl == "dense_cublas":
        gemm(M, N, K, x, x, x)
        if pass_name == "fwd_bwd":
            gemm(M, K, N, x, x, x)
        return {"ms": sum(ms), "weight_read_bytes": reads * N * K * x}
    # bitsandbytes' dequantize of a double-quant NF4 W, three kernels: absmax codes to fp32 (dequantize_blockwise),
    # absmax += offset, then the codes times their fp32 absmax (dequantize_4bit)
    blocks, packed = -(-N * K // 64), (N * K + 1) // 2
    dequantize = (_op_ms(0.0, weight - packed + 4 * blocks, gpu) + _op_ms(0.0, 8 * blocks, gpu)
                  + _op_ms(0.0, packed + 4 * blocks + N * K * x, gpu))
    if impl == "dequant_cublas":  # fused_lora.bench.impls: adapters in x's dtype (torch.mm needs one dtype)
        ms.append(dequantize)
        gemm(M, r, K, x, x, x)  # u = x·Aᵀ
        gemm(M, N, K, x, x, x)  # x·Wᵀ
        gemm(M, N, r, x, x, x, accumulate=True)  # addmm: y = x·Wᵀ + s·u·Bᵀ
        if pass_name == "fwd_bwd":
            ms.append(dequantize)
            gemm(M, r, N, x, x, x)  # v = g·B
            gemm(M, K, N, x, x, x)  # g·W
            gemm(M, K, r, x, x, x, accumulate=True)  # addmm: dx = g·W + s·v·A
            gemm(r, K, M, x, x, x)  # dA = vᵀ·x
            gemm(N, r, M, x, x, x)  # dB = gᵀ·u
            elementwise(r * K, x, x)  # dA·s
            elementwise(N * r, x, x)  # dB·s
        return {"ms": sum(ms), "weight_read_bytes": reads * weight}
    if impl != "peft_bnb":
        raise ValueError(f"offline model: unknown peer {impl!r}")
    # PEFT 0.21's Linear4bit as fused_lora.bench.impls builds it (adapters in x's dtype): result = base(x).clone();
    # result += lora_B(lora_A(x))·s, each output cast to x's dtype before the addition
    ms.append(dequantize)
    gemm(M, N, K, x, x, x)  # bnb: dequantize + F.linear
    elementwise(M * N, x, x)  # result.clone()
    gemm(M, r, K, x, x, x)  # lora_A
    gemm(M, N, r, x, x, x)  # lora_B
    elementwise(M * N, x, x)  # ·s
    elementwise(M * N, 2 * x, x)  # result + lora
    if pass_name == "fwd_bwd":
        elementwise(M * N, x, x)  # grad of ·s
        gemm(M, r, N, x, x, x)  # lora_B backward: g·B
        gemm(N, r, M, x, x, x)  # dB = gᵀ·u
        gemm(M, K, r, x, x, x)  # lora_A backward: v·A
        gemm(r, K, M, x, x, x)  # dA = vᵀ·x
        ms.append(dequantize)
        gemm(M, K, N, x, x, x)  # bnb backward: dequantize + g·W
        elementwise(M * K, 2 * x, x)  # autograd adds the two dx
    return {"ms": sum(ms), "weight_read_bytes": reads * weight}
