"""The offline performance instrument (fused_lora.bench.offline*) on made-up compiled code and made-up records: how it
reads SASS, PTX and TTGIR, the cost model's arithmetic, the peers, the report and the join with GPU results; and, in
a subprocess without the interpreter, that it sees what the launchers launch.

The compiled figures of the real kernels are checked by tests/test_kernels_compile.py (the CI subset)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_lora.bench.offline_compile import analyse_sass, analyse_ttgir
from fused_lora.bench.offline_kernels import KERNELS
from fused_lora.bench.offline_model import H200, occupancy, peer_pass, predict_kernel, simulate_pass

REPO = Path(__file__).resolve().parents[1]


def _sass(loop_body: list[str], prologue=("MOV R1, R2;",), epilogue=("STG.E [R2], R4;", "EXIT;")) -> str:
    """Triton's SASS listing (ctrl<TAB>instruction, LBBn: labels) around one loop; it ends with the BRA-to-itself
    trap that follows EXIT in every kernel."""
    lines = ["Function:k"] + [f"--:-:-:-:1\t{s}" for s in prologue] + ["LBB0:"]
    lines += [f"--:-:-:-:1\t{s}" for s in loop_body] + ["--:-:-:-:1\t@P0 BRA LBB0;"]
    lines += [f"--:-:-:-:1\t{s}" for s in epilogue] + ["LBB1:", "--:-:-:Y:0\tBRA LBB1;"]
    return "\n".join(lines)


def _ptx(mma_per_iteration: int) -> str:
    return "\n".join(["$L__BB0_1:", *["wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};"]
                      * mma_per_iteration, "@%p1 bra $L__BB0_1;", "ret;"])  # fmt: skip


HGMMA = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0;"


def test_sass_main_loop_mma_and_overlap():
    body = ["LDGSTS.E.BYPASS.128 [R5], desc[UR6][R8.64];", "LDG.E.U8 R3, desc[UR4][R2.64];", "WARPGROUP.ARRIVE;",
            HGMMA, HGMMA, "WARPGROUP.DEPBAR.LE gsb0, 0x1;", "IADD3 R1, R1, 0x1, RZ;"]
    got = analyse_sass(_sass(body), _ptx(2), num_warps=8)
    assert got["sass_loop"] == len(body) + 1  # the body and its branch
    assert got["unroll"] == 1 and got["mma"] == "HGMMA" and got["mma_pipelined"] is True and got["depbar_min"] == 1
    assert got["loop_mma_flops"] == {"16bit": 2 * (2 * 64 * 128 * 16) * 2}  # 2 HGMMA × 2 warpgroups
    assert got["loop_load_bytes"] == (16 + 1) * 32 * 8
    assert got["sass_total"] == 1 + len(body) + 1 + 2 + 1
    assert got["side_loops"] == []
    # a second loop after the main one (e.g. u's): its SASS per iteration and whether it loads, in code order
    side = _sass(["LDG.E R3, desc[UR4][R2.64];", "FADD R4, R4, R3;"]).replace("LBB0", "LBB7").replace("LBB1", "LBB8")
    got = analyse_sass(_sass(body).replace("Function:k", "") + "\n" + side.replace("Function:k", ""), _ptx(2), 8)
    assert got["sass_loop"] == len(body) + 1 and got["side_loops"] == [[3, True]]  # (not the trap after EXIT)
    # a later loop with more MMA (the decode forward's u at r = 64) is the main one unless the registry names it
    more = _sass([HGMMA] * 4).replace("LBB0", "LBB7").replace("LBB1", "LBB8").replace("Function:k", "")
    listing = _sass(body).replace("Function:k", "") + "\n" + more
    assert analyse_sass(listing, _ptx(4), 8)["sass_loop"] == 5
    named = analyse_sass(listing, _ptx(2), 8, main_loop=0)
    assert named["sass_loop"] == len(body) + 1 and named["side_loops"] == [[5, False]]


def test_sass_serial_wgmma_and_unrolled_loop():
    body = ["WARPGROUP.ARRIVE;", HGMMA, "WARPGROUP.DEPBAR.LE gsb0, 0x0;"] * 2 + ["IADD3 R1, R1, 0x1, RZ;"]
    got = analyse_sass(_sass(body), _ptx(1), num_warps=4)
    assert got["unroll"] == 2 and got["sass_loop"] == round((len(body) + 1) / 2)
    assert got["mma_pipelined"] is False and got["depbar_min"] == 0


def test_sass_half_rate_pipe_counts():
    """ALU (logic, shifts, byte permutes, selects, moves, integer adds; predicated or not) and IMAD (its MOV/SHL/WIDE
    forms) per main-loop iteration and outside it; uniform-datapath, memory and MMA instructions are neither."""
    body = ["PRMT R4, R5, R6, R7;", "@!P6 LOP3.LUT R1, R2, 0x7777, RZ, 0xc0, !PT;", "SHF.R.U32.HI R1, RZ, 0x10, R1;",
            "@UP0 SEL R2, RZ, 0x4, P6;", "IADD3 R1, R1, 0x1, RZ;", "ISETP.GE.AND P6, PT, R1, R2, PT;",
            "IMAD.MOV.U32 R48, RZ, RZ, R16;", "IMAD.SHL.U32 R13, R4, 0x10, RZ;", "IMAD.WIDE R4, R13, 0x2, R112;",
            "UIADD3 UR7, UR7, 0x1, URZ;", "ULOP3.LUT UR4, UR4, 0x3, URZ, 0xc0, !UPT;", "HMUL2.BF16_V2 R4, R4, R5;",
            "LDS.128 R4, [R16];", HGMMA, "VIADD R1, R1, 0x1;"]
    got = analyse_sass(_sass(body, prologue=("MOV R1, R2;", "IMAD R3, R4, R5, R6;")), _ptx(1), num_warps=4)
    assert got["loop_alu"] == 6 and got["loop_imad"] == 3  # the loop's branch is neither
    assert got["rest_alu"] == 1 and got["rest_imad"] == 1


def test_sass_shared_memory_bytes():
    """Bytes a warp moves through shared memory per instruction: 4 per lane by default, the width suffix otherwise,
    ldmatrix by its matrix count; global loads and copies into shared memory (LDGSTS) are not shared-memory pipe
    instructions."""
    body = ["LDS R4, [R5+UR4];", "@P0 LDS.128 R8, [R70+0x10];", "STS.64 [R34], R32;", "STS [R3+UR4], R20;",
            "LDSM.16.M88.4 R32, [R16+UR8+0x4000];", "LDSM.16.MT88.2 R28, [R19];", "LDSM.16.M88 R2, [R3];",
            "LDS.U8 R1, [R2];", "LDGSTS.E.BYPASS.128 [R5], desc[UR6][R8.64];", "LDG.E R3, desc[UR4][R2.64];"]
    got = analyse_sass(_sass(body, prologue=("STS.128 [R1], R4;",)), _ptx(1), num_warps=4)
    assert got["loop_shared_bytes"] == 128 + 512 + 256 + 128 + 512 + 256 + 128 + 32
    assert got["rest_shared_bytes"] == 512


def test_ptxas_static_shared_memory():
    """The static shared memory ptxas reports (a kernel's own ``.shared`` arrays), not the constant banks."""
    from fused_lora.bench.offline_compile import _PTXAS_STATIC_SHARED

    log = ("ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill "
           "loads\nptxas info    : Used 80 registers, used 1 barriers, 32768 bytes smem, 568 bytes cmem[0]\n")
    assert int(_PTXAS_STATIC_SHARED.search(log).group(1)) == 32768
    assert _PTXAS_STATIC_SHARED.search("ptxas info    : Used 80 registers, used 1 barriers, 568 bytes cmem[0]") is None


def test_sass_mma_forms_of_every_operand_type():
    """fp16 operands print without a suffix of their own (HGMMA.64x16x16.F32): they were not seen as MMA at all."""
    body = ["HGMMA.64x16x16.F32 R24, gdesc[UR8], R24, gsb0;", "HMMA.16816.F32 R4, R8, R12, R4;",
            "HMMA.1688.F32.TF32 R4, R8, R12, R4;", "QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24;"]
    got = analyse_sass(_sass(body), _ptx(4), num_warps=4)
    assert got["mma"] == "HGMMA" and got["unroll"] == 1
    assert got["loop_mma_flops"] == {"16bit": 2 * 64 * 16 * 16 + 2 * 16 * 8 * 16 * 4, "tf32": 2 * 16 * 8 * 8 * 4,
                                     "fp8": 2 * 64 * 64 * 32}


def test_sass_kernel_without_loop_and_mma_sync():
    got = analyse_sass(_sass([], prologue=("HMMA.16816.F32.BF16 R4, R8, R12, R4;",)).replace(
        "--:-:-:-:1\t@P0 BRA LBB0;", "--:-:-:-:1\tNOP;"), "", num_warps=4)
    assert got["sass_loop"] is None and got["mma"] is None and got["mma_pipelined"] is None
    assert got["rest_mma_flops"] == {"16bit": 2 * 16 * 8 * 16 * 4}


TTGIR = """
    %x_75 = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable> loc(#loc1)
    %w_76 = ttg.local_alloc : () -> !ttg.memdesc<2x128x64xbf16, #shared, #smem, mutable> loc(#loc2)
    %t_77 = ttg.local_alloc %v : (tensor<64x64xbf16>) -> !ttg.memdesc<64x64xbf16, #shared, #smem> loc(#loc3)
    %acc:3 = scf.for %k = %c0_i32 to %K step %c64_i32 iter_args(%a = %cst) -> (tensor<128x128xf32, #mma>) : i32 {
      %d = ttng.warp_group_dot %x, %w, %a {isAsync = true} : tensor<...>
      %e:2 = ttng.warp_group_dot_wait %d, %x {pendings = 1 : i32} : tensor<...>
      scf.yield %e
    } loc(#loc4)
    %f = ttng.warp_group_dot_wait %acc#0 {pendings = 0 : i32} : tensor<...>
"""


def test_ttgir_ring_depth_and_pendings_of_the_main_loop():
    got = analyse_ttgir(TTGIR)
    assert got["ring_depths"] == {"x": 3, "w": 2} and got["smem_ring_depth"] == 2
    assert got["ttgir_pendings"] == 1  # the wait after the loop (pendings 0) is not the main loop's


def _record(**changes) -> dict:
    record = {"num_warps": 8, "registers": 168, "shared": 100_000, "sass_loop": 400, "sass_total": 1000, "unroll": 1,
              "mma": "HGMMA", "mma_pipelined": True, "loop_mma_flops": {"16bit": 2 * 128 * 128 * 64},
              "rest_mma_flops": {}, "loop_membar": 0, "rest_membar": 0, "loop_load_bytes": 0,
              "smem_ring_depth": 3}  # fmt: skip
    return {**record, **changes}


def test_occupancy_from_registers_and_shared_memory():
    assert occupancy(_record(registers=168, shared=100_000)) == 1  # 168·256 regs: one program of 8 warps
    assert occupancy(_record(num_warps=4, registers=128, shared=40_000)) == 4  # 65536 / (128·128)
    assert occupancy(_record(num_warps=4, registers=64, shared=100_000)) == 2  # shared memory bound


def test_a_loop_that_waits_for_its_mma_pays_issue_plus_mma():
    issue = 400 * 8 / 4
    mma = 2 * 128 * 128 * 64 / H200.mma_flops_per_cycle("HGMMA", "16bit")
    programs, trips = 132 * 10, 64  # ten full waves of one program per SM
    overlapped = predict_kernel(_record(), programs, trips, 0)
    serial = predict_kernel(_record(mma_pipelined=False), programs, trips, 0)
    outside = 10 * (1000 - 400) * 8 / 4
    assert overlapped.compute_ms == pytest.approx((10 * trips * max(issue, mma) + outside) / H200.clock_hz * 1e3)
    assert serial.compute_ms == pytest.approx((10 * trips * (issue + mma) + outside) / H200.clock_hz * 1e3)
    assert serial.bound == "serial" and overlapped.bound == "issue"  # 800 issue cycles > 694 MMA cycles


def test_a_loop_of_alu_instructions_runs_at_the_alu_pipe_rate():
    """16 ALU lanes per scheduler: a loop whose ALU (or IMAD) instructions × 2 exceed its SASS count takes that many
    cycles per warp; the same holds outside the loop."""
    programs, trips = 132 * 10, 64
    plain = predict_kernel(_record(loop_mma_flops={}), programs, trips, 0)
    alu = predict_kernel(_record(loop_mma_flops={}, loop_alu=300), programs, trips, 0)
    imad = predict_kernel(_record(loop_mma_flops={}, loop_imad=250), programs, trips, 0)
    outside = 10 * (1000 - 400) * 8 / 4
    assert plain.bound == "issue" and alu.bound == "alu" and imad.bound == "alu"
    assert alu.compute_ms == pytest.approx((10 * trips * 600 * 8 / 4 + outside) / H200.clock_hz * 1e3)
    assert imad.compute_ms == pytest.approx((10 * trips * 500 * 8 / 4 + outside) / H200.clock_hz * 1e3)
    assert predict_kernel(_record(loop_mma_flops={}, loop_alu=150), programs, trips, 0).ms == pytest.approx(plain.ms)
    rest = predict_kernel(_record(loop_mma_flops={}, rest_alu=500), programs, trips, 0)  # 1000 cycles > 600 SASS
    assert rest.compute_ms == pytest.approx((10 * trips * 800 + 10 * 1000 * 8 / 4) / H200.clock_hz * 1e3)


def test_a_loop_of_shared_memory_accesses_runs_at_the_shared_pipe_rate():
    """One shared-memory pipe per SM, 128 bytes per cycle: p programs of w warps each moving S bytes per iteration
    take p·w·S/128 cycles when that exceeds their issue time (bound "shared"); outside the loop as well."""
    programs, trips = 132 * 10, 64
    plain = predict_kernel(_record(loop_mma_flops={}), programs, trips, 0)
    shared = predict_kernel(_record(loop_mma_flops={}, loop_shared_bytes=128 * 128), programs, trips, 0)
    outside = 10 * (1000 - 400) * 8 / 4
    assert plain.bound == "issue" and shared.bound == "shared"  # 8 warps · 128 cycles > 400 SASS · 8 / 4
    assert shared.compute_ms == pytest.approx((10 * trips * 128 * 8 + outside) / H200.clock_hz * 1e3)
    half = predict_kernel(_record(loop_mma_flops={}, loop_shared_bytes=64 * 128), programs, trips, 0)
    assert half.ms == pytest.approx(plain.ms)  # 512 cycles < 800
    rest = predict_kernel(_record(loop_mma_flops={}, rest_shared_bytes=200 * 128), programs, trips, 0)
    assert rest.compute_ms == pytest.approx((10 * trips * 800 + 10 * 200 * 8) / H200.clock_hz * 1e3)


def test_an_underfilled_grid_pays_one_program_and_memory_bound_kernels_stream():
    one_wave = predict_kernel(_record(), 112, 32, 0)
    assert one_wave.waves < 1
    streaming = predict_kernel(_record(sass_loop=10, loop_mma_flops={}), 132 * 8, 4, 4.3e9)  # 4.3 GB
    assert streaming.bound == "memory" and streaming.memory_ms == pytest.approx(1.0)
    assert streaming.ms == pytest.approx(1.0 + H200.launch_us * 1e-3)


def test_side_loops_add_to_every_program_or_bound_their_own_programs():
    """A loop every program runs after its main loop adds its trips (issue, or one latency per trip when it loads)
    to each program; loops that a few programs run instead (the decode forward's u) bound the kernel by those
    programs' time; none compiled (a bound specialised away): nothing; a count that disagrees: refused."""
    latency = H200.hbm_latency_ns * 1e-9 * H200.clock_hz / 2  # ring of 3: two loads ahead
    base = predict_kernel(_record(), 132, 8, 0)
    every = predict_kernel(_record(side_loops=[[50, True]]), 132, 8, 0, side_loops=[(4, None)])
    assert every.compute_ms - base.compute_ms == pytest.approx(4 * latency / H200.clock_hz * 1e3)
    own = predict_kernel(_record(side_loops=[[50, False]]), 132, 8, 0, side_loops=[(100_000, 1)])
    assert own.compute_ms == pytest.approx((100_000 * 50 * 8 / 4 + (1000 - 400) * 8 / 4) / H200.clock_hz * 1e3)
    assert predict_kernel(_record(side_loops=[]), 132, 8, 0, side_loops=[(4, None)]).ms == base.ms
    with pytest.raises(ValueError, match="1 loops besides its main one, its KernelModel side_loops names 2"):
        predict_kernel(_record(side_loops=[[50, True]]), 132, 8, 0, side_loops=[(4, None)] * 2)


class _T:  # a KernelTime stand-in for simulate_pass
    def __init__(self, ms, compute, memory):
        self.ms, self.compute_ms, self.memory_ms = ms, compute, memory


def test_a_side_stream_overlaps_but_shares_the_gpu():
    steps = [("work", 1, _T(1.0, 0.1, 1.0)), ("record", 1, 0), ("wait_event", 0, 0), ("work", 0, _T(2.0, 2.0, 0.1)),
             ("work", 1, _T(1.0, 0.1, 1.0)), ("record", 1, 1), ("wait_event", 0, 1), ("work", 0, _T(2.0, 2.0, 0.1))]
    assert simulate_pass(steps) == pytest.approx(5.0)  # dequantize 1, then GEMM 2 ‖ dequantize 1, then GEMM 2
    serial = [("work", 0, _T(1.0, 0.5, 0.5))] * 3
    assert simulate_pass(serial) == pytest.approx(3.0)
    contended = [("work", 1, _T(1.0, 0.0, 1.0)), ("work", 0, _T(1.0, 0.0, 1.0))]
    assert simulate_pass(contended) == pytest.approx(2.0)  # two streams on one HBM


def test_peers_at_training_size():
    M, K, N, r = 8192, 4096, 14336, 16
    dense = peer_pass("dense_cublas", "fwd", M, K, N, r)["ms"]
    assert dense == pytest.approx(2 * M * N * K / 790e12 * 1e3 + H200.launch_us * 1e-3)
    dequant = peer_pass("dequant_cublas", "fwd_bwd", M, K, N, r)["ms"] / peer_pass("dense_cublas", "fwd_bwd", M, K, N,
                                                                                r)["ms"]  # fmt: skip
    peft = peer_pass("peft_bnb", "fwd_bwd", M, K, N, r)["ms"] / peer_pass(
        "dense_cublas", "fwd_bwd", M, K, N, r)["ms"]  # fmt: skip
    # PEFT as the bench builds it: adapters in x's dtype, its output cloned, then added (1.35 at the target shape)
    assert 1.0 < dequant < 1.3 and 1.2 < peft < 1.6, (dequant, peft)
    # at M=1 the GEMMs are reads of W: bitsandbytes' double-quant dequantize (three kernels: the absmax codes to
    # fp32, plus the offset, then the codes; 7.4 µs over one pass) is what separates dequant+cuBLAS from cuBLAS
    blocks = K * N // 64
    dequantize_us = ((blocks + 4 * blocks // 256 + 4 * blocks) + 8 * blocks + (K * N // 2 + 4 * blocks + 2 * K * N)) \
        / 4.3e12 * 1e6 + 3 * H200.launch_us  # fmt: skip
    gap_us = 1e3 * (peer_pass("dequant_cublas", "fwd", 1, K, N, r)["ms"] - peer_pass("dense_cublas", "fwd", 1, K, N,
                                                                                      r)["ms"])  # fmt: skip
    assert gap_us > dequantize_us
    decode = peer_pass("dense_cublas", "fwd", 1, K, N, r)
    assert decode["weight_read_bytes"] / (decode["ms"] * 1e-3) / 4.3e12 > 0.9  # a GEMV at copy speed


def _kernel_functions() -> set:
    names = set()
    for path in (REPO / "fused_lora" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_registered_kernel_exists():
    assert set(KERNELS) <= _kernel_functions(), set(KERNELS) - _kernel_functions()


def _total(impl, M, ms, pass_name="fwd_bwd"):
    return {"impl": impl, "kernel": "total", "pass": pass_name, "arch": 90, "M": M, "K": 4096, "N": 14336, "r": 16,
            "weight": "nf4dq", "x_dtype": "bf16", "adapter_dtype": "fp32", "predicted_ms": ms,
            "predicted_ratio_vs_cublas": ms, "predicted_hbm_fraction": 0.5, "path": impl, "chosen": True}


def test_measured_gpu_rows_join_the_predictions(tmp_path):
    from fused_lora.bench.offline import join_measured

    gpu = tmp_path / "nvidia-h200"
    gpu.mkdir()
    rows = [{"bench": "qlora_linear", "impl": impl, "pass": "fwd_bwd", "M": 8192, "K": 4096, "N": 14336, "r": 16,
             "dtype": "bfloat16", "adapter_dtype": "float32", "median_ms": ms}
            for impl, ms in (("fused", 3.0), ("dense_cublas", 2.5))]  # fmt: skip
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "commit": "abc"}
    (gpu / "20261201-1200.json").write_text(json.dumps({"env": env, "results": rows}))
    (gpu / "20261202-1200.json").write_text(json.dumps({"env": {}, "results": []}))  # another schema: not read
    (tmp_path / "offline").mkdir()
    predicted = [_total("fused", 8192, 2.7), _total("dense_cublas", 8192, 2.4), _total("fused", 2048, 0.8)]
    assert join_measured(predicted, tmp_path) == [str(gpu / "20261201-1200.json")]
    assert predicted[0]["measured_ms"] == 3.0 and predicted[0]["measured_ratio_vs_cublas"] == 1.2
    assert "measured_ms" not in predicted[2]


def test_targets_and_report_render():
    from fused_lora.bench.offline_report import offline_report, target_checks

    rows = [_total("fused", 8192, 1.1), _total("fused", 2048, 1.3), _total("fused", 1, 0.02, "fwd"),
            _total("dense_cublas", 8192, 1.0)]
    kernel = {**_total("fused", 8192, 0.5), "kernel": "lora_fwd_kernel", "path": "dense", "config": "128x128x64w8s4",
              "spill_bytes": 80, "mma": "HGMMA", "mma_pipelined": True, "sass_ratio": None}
    checks = {c["target"]: c for c in target_checks(rows + [kernel])}
    spills = next(c for t, c in checks.items() if t.startswith("no config"))
    assert not spills["met"] and "spill 80 B" in spills["value"]
    assert next(c for t, c in checks.items() if "M=8192" in t)["met"]
    assert not next(c for t, c in checks.items() if "M=2048" in t)["met"]
    env = {"command": "python -m fused_lora.bench.offline", "runtime_s": 1.0, "cpu_count": 2, "triton": "3.9",
           "torch": "2.13", "commit": "abc"}
    text = offline_report({"env": env, "constants": {"sms": 132}, "gpu_results": [], "rows": rows + [kernel]}, "x.json")
    assert "## Targets" in text and "lora_fwd_kernel" in text and "## Cost model" in text
    assert "did not compile" not in text
    broken = {**kernel, "arch": 90, "error": "CompilationError: at 60:14:\n    lut = nf4_lookup_state(...)"}
    text = offline_report({"env": env, "constants": {"sms": 132}, "gpu_results": [], "rows": rows + [broken]}, "x")
    assert "**1 launched kernel configs did not compile" in text
    assert "- sm_90 lora_fwd_kernel 128x128x64w8s4: CompilationError: at 60:14:" in text


CAPTURE = """
import json
from fused_lora.bench.offline_capture import LayerSpec, capture_pass
from fused_lora.bench.offline_kernels import KERNELS
from fused_lora.kernels.autotune import MAX_CONFIGS_PER_BUCKET
from fused_lora.bench import offline_capture
made = []  # streams the launchers make (the recorder's own are made with an index)
class Counted(offline_capture._Stream):
    def __init__(self, index=None):
        made.append(index is None)
        super().__init__(index)
offline_capture._Stream = Counted
out = {}
for M in (1, 256, 8192, 8192):
    steps, facts = capture_pass("fwd_bwd", LayerSpec(M, 4096, 14336, 16), 90)
    launches = [s for s in steps if s.candidates]
    out[M] = {"kernels": [c.kernel for s in launches for c in s.candidates],
              "max_candidates": max(len(s.candidates) for s in launches),
              "streams": sorted({s.stream for s in steps}), "syncs": sum(1 for s in steps if s.sync),
              "torch_ops": [s.torch_op.name for s in steps if s.torch_op], "weight_bytes": facts["weight_bytes"],
              "unregistered": sorted({c.kernel for s in launches for c in s.candidates} - set(KERNELS)),
              "cap": MAX_CONFIGS_PER_BUCKET}
out["streams_made"] = sum(made)
print(json.dumps(out))
"""


def test_capture_sees_the_launches_streams_and_device_work():
    """In a subprocess without the interpreter (the launchers take their GPU paths): every launch is a registered
    kernel, an autotuned launch brings the configs the autotuner keeps, side-stream work and its events are seen."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", CAPTURE], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout)
    for M, seen in got.items():
        if M == "streams_made":
            continue
        assert seen["unregistered"] == [], (M, seen["unregistered"])
        assert 1 <= seen["max_candidates"] <= seen["cap"], (M, seen)
        assert seen["weight_bytes"] == 4096 * 14336 // 2 + 4096 * 14336 // 64 + 4 * -(-4096 * 14336 // 64 // 256) \
            + 4 * (16 + 256 + 1)  # packed, absmax codes, nested absmax, code tables, offset
    assert got["8192"]["max_candidates"] > 1  # the GEMMs are autotuned
    # the large path dequantizes slabs on a side stream, ordered by events
    assert len(got["8192"]["streams"]) > 1 and got["8192"]["syncs"] > 0, got["8192"]
    assert got["streams_made"] == 1  # one side stream for all four large-path calls of the two passes


LOOKUPS = """
import dataclasses, json, torch
from fused_lora.bench import offline_capture
from fused_lora.bench.offline_capture import LayerSpec, capture_pass
from fused_lora.kernels import strategy
out, targets = {}, dict(offline_capture.TARGETS)
cases = (("h200", 90, 16, 4096, 16, None), ("h200 r64", 90, 16, 4096, 64, None), ("a100 r64", 80, 16, 4096, 64, None),
         ("a100", 80, 16, 4096, 16, None), ("64KiB", 90, 16, 4096, 16, 64 * 1024), ("ragged K", 90, 16, 4032, 16, None),
         ("M=32", 90, 32, 4096, 16, None), ("a100 M=32", 80, 32, 4096, 16, None),
         ("a100 M=32 r64", 80, 32, 4096, 64, None), ("M=33", 90, 33, 4096, 16, None))
for name, arch, M, K, r, optin in cases:
    offline_capture.TARGETS.update(targets)
    if optin is not None:
        offline_capture.TARGETS[arch] = dataclasses.replace(targets[arch], shared_memory_per_block_optin=optin)
    with strategy.use_thresholds(decode_max_m=64):
        steps, _ = capture_pass("fwd", LayerSpec(M, K, 1024, r, torch.bfloat16, torch.float32), arch)
    decode = [c for s in steps for c in s.candidates if c.kernel == "lora_decode_fwd_kernel"]
    out[name] = [(c.args["LOOKUP"], c.options.get("num_stages")) for c in decode]
print(json.dumps(out))
"""


def test_the_decode_forward_takes_the_pair_table_where_it_fits():
    """In a subprocess without the interpreter: the decode forward's fragment config at M ≤ 32 (BLOCK_M 16 and 32)
    reads the shared-memory pair table with launch_decode.PAIR_TABLE_STAGES stages where a block has room for it (an
    H200 at r = 16 and 64, an A100 at r = 16: launch_decode.pair_table_shared), and the byte permutes with Triton's
    default stages where it has not (an A100 at r = 64 with fp32 adapters: 192 KiB > 163 KiB at M=16, 224 KiB at
    M=32; 64 KiB per block), for a K that is not whole 128-column tiles, and at M > 32 (BLOCK_M 64)."""
    from fused_lora.kernels.launch_decode import PAIR_TABLE_STAGES

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", LOOKUPS], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout)
    lds, prmt = [["lds", PAIR_TABLE_STAGES]], [["prmt", None]]
    assert got == {"h200": lds, "h200 r64": lds, "a100 r64": prmt, "a100": lds, "64KiB": prmt, "ragged K": prmt,
                   "M=32": lds, "a100 M=32": lds, "a100 M=32 r64": prmt, "M=33": prmt}


BROKEN = """
import sys
from fused_lora.bench import offline
offline.run_jobs = lambda jobs, cache=None: [{"id": j.id, "kernel": j.kernel, "arch": j.arch, "error": "Boom: no"}
                                             for j in jobs]
sys.exit(offline.main(["--quick", "--output", sys.argv[1]]))
"""


def test_a_kernel_that_does_not_compile_fails_the_instrument(tmp_path):
    """Predictions without a launched kernel are wrong (it once reported a decode at 0 % of HBM, quietly): the
    report says which kernels failed and the command exits 1."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", BROKEN, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "did not compile" in proc.stderr and "lora_decode_fwd_kernel" in proc.stderr
    assert "did not compile" in (tmp_path / "offline" / "report.md").read_text()


PATHS_RUN = """
import json, math, sys
from pathlib import Path
from fused_lora.bench import offline, offline_compile, offline_paths
MS = {"decode": {16: 1.0, 64: 1.5}, "middle": {16: 2.0, 64: 2.0, 256: 3.0, 4096: 10.0},
      "large": {16: 9.0, 64: 9.0, 256: 9.0, 4096: 10.5}}
seen = []
def evaluate(captured, records, gpu):  # made-up prices, keyed by the path the launches show
    (variant, steps, facts), = captured
    kernels = {c.kernel for s in steps for c in s.candidates}
    path = ("large" if "nf4_slab_kernel" in kernels else
            "decode" if "lora_decode_fwd_kernel" in kernels else "middle")
    s = variant.spec
    x = str(s.x_dtype).split(".")[-1]
    seen.append([path, s.M, s.weight, s.r, x])
    spill = 208 if (path, s.M, s.weight) == ("decode", 64, "dense") or x == "float32" else 0
    shared = 300000 if (path, s.M, s.weight, s.r) == ("middle", 256, "dense", 64) else 1000
    ms = MS[path][s.M] * (0.3 if x == "float32" and path == "large" else 1.0)
    return [{"impl": "fused", "kernel": "lora_decode_fwd_kernel", "config": "c", "chosen": True, "spill_bytes": spill,
             "shared": shared},
            {"impl": "fused", "kernel": "lora_fwd_kernel", "config": "d", "chosen": False, "spill_bytes": 99},
            {"impl": "fused", "kernel": "total", "predicted_ms": ms}]
offline.evaluate = evaluate
offline_compile.run_jobs = lambda jobs, cache_dir=None: [{} for _ in jobs]
rows = offline_paths.path_rows(shapes=((4096, 1024),), ms=(16, 64, 256, 4096))
suggested = offline_paths.suggest(rows)
current = {d: {"decode_max_m": 16, "large_min_m": 512} for d in offline_paths.X_DTYPES}
table = offline_paths.predicted_path_table(rows, suggested, current)
print(json.dumps({"seen": seen, "rows": [[r["dtype"], r["impl"], r["M"], r["predicted_ms"], r["median_ms"],
                                          r["problems"]] for r in rows], "suggested": suggested, "table": table}))
"""


def test_offline_paths_force_each_path_and_suggest_thresholds_from_predictions():
    """``python -m fused_lora.bench.offline_paths``, with made-up prices in a subprocess without the interpreter: every
    path is really forced (the captured launches show it) for bf16 x over NF4 and a dense W at r = 16 and 64 and fp32
    x over NF4 at r = 16 (decode up to M = 64, large for NF4 only); the rows are NF4 at r = 16 per x dtype; a chosen
    config that spills on a path at an M (here the dense decode at M = 64) makes that path ineligible there for bf16
    x, an unchosen one does not, and fp32 x (whose configs all spill) is priced by time; a chosen config with more
    shared memory than the GPU has makes the path ineligible (the middle path at M = 256, so the large path takes
    it, and 4096 within LARGE_MARGIN of the middle one); for fp32 x the large path takes every M where it is faster."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", PATHS_RUN], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout)
    layers = [(w, r, "bfloat16") for w in ("nf4dq", "dense") for r in (16, 64)] + [("nf4dq", 16, "float32")]
    expected = {(path, M, w, r, x) for M in (16, 64, 256, 4096) for path in ("decode", "middle", "large")
                for w, r, x in layers if (path != "decode" or M <= 64) and (path != "large" or w == "nf4dq")}
    assert sorted(map(tuple, got["seen"])) == sorted(expected)
    rows = {(d, impl, M): (ms, median, spills) for d, impl, M, ms, median, spills in got["rows"]}
    assert len(rows) == len(got["rows"]) == 20
    assert rows[("bf16", "fused-decode", 64)][:2] == (1.5, float("inf"))
    assert rows[("bf16", "fused-decode", 64)][2] == ["lora_decode_fwd_kernel c (dense, r=16: spills 208 B)",
                                                     "lora_decode_fwd_kernel c (dense, r=64: spills 208 B)"]
    # more shared memory than the GPU has (here a dense W at r = 64): not eligible either, whatever the dtype
    assert rows[("bf16", "fused-middle", 256)][1:] == (float("inf"), [
        "lora_decode_fwd_kernel c (dense, r=64: 300000 B of shared memory)"])
    assert rows[("bf16", "fused-decode", 16)] == (1.0, 1.0, [])
    assert rows[("fp32", "fused-decode", 64)] == (1.5, 1.5, [])  # fp32: spills do not rule a path out
    bf16, fp32 = got["suggested"]["bf16"], got["suggested"]["fp32"]
    assert (bf16["decode_max_m"], bf16["large_min_m"]) == (16, 256)  # the middle path not eligible at 256
    assert (fp32["decode_max_m"], fp32["large_min_m"]) == (64, 256)  # large at 0.3 of the price: from 256 on
    assert "## x bf16" in got["table"] and "## x fp32" in got["table"]
    assert "| 4096 | 1024 | 16 | **1** | 2 | 9 |" in got["table"]
    assert "| 4096 | 1024 | 64 | 1.5 (not eligible) | **2** | 9 |" in got["table"]
    assert "| 4096 | 1024 | 256 | – | 3 (not eligible) | **9** |" in got["table"]
    assert "x bf16, over every shape: decode_max_m = 16, large_min_m = 256" in got["table"]
    assert "x fp32, over every shape: decode_max_m = 64, large_min_m = 256" in got["table"]


PATHS_BROKEN = """
import sys
from fused_lora.bench import offline, offline_compile, offline_paths
def evaluate(captured, records, gpu):  # every pass has a launch that did not compile (the constants given, named)
    return [{"impl": "fused", "kernel": "total", "predicted_ms": None, "chosen": True,
             "error": f"1 launches did not compile on {gpu.sms} SMs"}]
offline.evaluate = evaluate
offline_compile.run_jobs = lambda jobs, cache_dir=None: [{} for _ in jobs]
offline_paths.path_rows.__defaults__ = (((4096, 1024),), (16, 256), None, None)
sys.exit(offline_paths.main(["--output", sys.argv[1], "--no-cache", "--constants", "sms=100"]))
"""


def test_offline_paths_command_fails_when_a_launch_did_not_compile(tmp_path):
    """A path without a time is not merely slower: the command names the passes and exits 1, and paths.md lists them
    among the reasons a path is not eligible."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", PATHS_BROKEN, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "passes with launches that did not compile" in proc.stderr and "bf16 4096x1024 M=16" in proc.stderr
    assert "on 100 SMs" in proc.stderr  # --constants reached the pricing
    assert "did not compile" in (tmp_path / "offline" / "paths.md").read_text()


OVERSIZED = """
import json, sys, torch
from fused_lora.bench import offline
from fused_lora.bench.offline_capture import LayerSpec
variant = offline.Variant(90, "fwd", LayerSpec(256, 4096, 14336, 16, torch.bfloat16, torch.float32, "nf4dq"))
captured, jobs = offline.plan([variant])
base = dict(error=None, registers=128, shared=100000, sass_loop=1000, loop_alu=10, loop_imad=5,
            loop_mma_flops={"16bit": 1e6}, mma="HGMMA", mma_pipelined=True, loop_membar=0, loop_shared_bytes=0,
            sass_total=3000, unroll=1, rest_alu=0, rest_imad=0, rest_shared_bytes=0, rest_mma_flops={}, rest_membar=0,
            loop_load_bytes=0, smem_ring_depth=3, spill_stores=0, spill_loads=0, ttgir_pendings=1,
            narrowest_global_load_bits=128, side_loops=[], static_shared=0)
def record(job):  # lora_fwd_kernel's 128x256 tile: the fastest by far, but over sm_90's shared memory (or all, argv)
    oversized = job.kernel == "lora_fwd_kernel" and ("128x256" in job.id or sys.argv[1] == "all")
    return {**base, "num_warps": job.options.get("num_warps", 4), "id": job.id, "kernel": job.kernel,
            "arch": job.arch, **({"shared": 240000, "sass_loop": 10} if oversized else {})}
records = {key: record(job) for key, job in jobs.items()}
rows = offline.evaluate(captured, records)
fwd = [r for r in rows if r["kernel"] == "lora_fwd_kernel"]
total = next(r for r in rows if r["kernel"] == "total" and r["impl"] == "fused")
print(json.dumps({"chosen": [r["config"] for r in fwd if r["chosen"]], "candidates": [r["config"] for r in fwd],
                  "total_ms": total["predicted_ms"], "error": total.get("error")}))
"""


def test_the_predicted_pick_is_a_config_that_fits_the_shared_memory():
    """A config with more shared memory than the GPU has (the autotuner's launch of it fails, and it is skipped) is
    never the predicted pick, however fast its loop; with none that fits, the pass has no time and says why."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    got = []
    for which in ("one", "all"):
        proc = subprocess.run([sys.executable, "-c", OVERSIZED, which], env=env, capture_output=True, text=True,
                              timeout=300, cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(json.loads(proc.stdout))
    one, every = got
    assert any("128x256" in c for c in one["candidates"]) and len(one["chosen"]) == 1
    assert "128x256" not in one["chosen"][0] and one["total_ms"] is not None and one["error"] is None
    assert every["chosen"] == [] and every["total_ms"] is None and "fit the shared memory" in every["error"]
