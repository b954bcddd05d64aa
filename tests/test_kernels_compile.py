"""The launched kernels compile for real GPUs on a machine without one, and do not silently get slower: the CI subset
of the offline performance instrument (tests/_compile_kernels.py, fused_lora.bench.offline).

CI has no GPU, and the interpreter tests never take the GPU path through Triton's compiler and ptxas. Here every
launch the launchers make in the training step of the target layer (sm_90a; x bf16, NF4 double quant, K=4096,
N=14336, r=16, fp32 adapters; at one M per path: decode, middle, large), with every autotune config the autotuner
keeps, and the package's other kernels (sm_90a and sm_80), are compiled once in a subprocess with TRITON_INTERPRET=0.
Checked per compiled kernel:

- it compiles, and its shared memory fits the target (sm_80 163 KiB, sm_90 227 KiB);
- ptxas's spill stores and loads are exactly the RECORD's bytes: a launched config that starts to spill fails, and so
  does one whose spilling changed (more or less), so that RECORD stays the truth;
- a wgmma main loop keeps an MMA in flight (mma_pipelined) exactly as RECORD says: True must stay True; the configs
  that wait for each wgmma today are recorded False, and one that starts to overlap fails until RECORD says so;
- the set of compiled kernels is RECORD's: a new launch or config, or one gone, fails until RECORD is updated;
- the GEMMs' dots run on tensor cores (wgmma on sm_90 for tiles of 64 rows or more, mma.sync below);
- a GEMM that reads NF4 bytes loads them at least 32 bits at a time (widths printed with -s).

After a kernel change, regenerate RECORD (and look at what changed before pasting it):

    TRITON_INTERPRET=0 python tests/_compile_kernels.py --record
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("_compile_kernels.py")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# id -> (spill store bytes, spill load bytes, mma_pipelined: True / False / None for mma.sync or no MMA), as compiled
# by triton 3.9 with its ptxas (the decode forward in the fragment order of nf4_fragment.py). The entries
# are the numbers; a kernel change that moves any of them fails here until RECORD is regenerated with
# `TRITON_INTERPRET=0 python tests/_compile_kernels.py --record` and the change is explained in its commit.
RECORD = {
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd_epilogue-decode-nf4dq-bf16-Afp32-r16-16x128w4": (0, 0, None),
    "sm90-zero_fp32-lowrank-nf4dq-bf16-Afp32-r16-1024w4": (0, 0, None),
    "sm90-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-16x64w4": (0, 0, None),
    "sm90-lora_decode_dx-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4": (0, 0, True),
    "sm90-lora_decode_dx_epilogue-decode-nf4dq-bf16-Afp32-r16-16x128w4": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x32x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd_epilogue-decode-nf4dq-bf16-Afp32-r16-32x128w4": (0, 0, None),
    "sm90-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-32x64w4": (0, 0, None),
    "sm90-lora_decode_dx-decode-nf4dq-bf16-Afp32-r16-64x32x128x128w4": (0, 0, True),
    "sm90-lora_decode_dx_epilogue-decode-nf4dq-bf16-Afp32-r16-32x128w4": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x64x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd_epilogue-decode-nf4dq-bf16-Afp32-r16-64x128w8": (0, 0, None),
    "sm90-zero_fp32-lowrank-nf4dq-bf16-Afp32-r16-1024x64w4": (0, 0, None),
    "sm90-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-64x32w4": (0, 0, True),
    "sm90-lora_decode_dx-decode-nf4dq-bf16-Afp32-r16-64x64x128x128w4": (0, 0, True),
    "sm90-lora_decode_dx_epilogue-decode-nf4dq-bf16-Afp32-r16-64x128w8": (0, 0, None),
    "sm90-lora_u-lowrank-nf4dq-bf16-Afp32-r16-64x64x32w4": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x256x64w8s3": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x256x64w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x256x64w8s3-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-256x128x64w8s3": (0, 0, True),
    "sm90-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-256x128x64w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-128x32w8": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-ADD_T": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x64x64w4s4-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x128w8s3": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-ADD_T": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x64x64w4s4": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x64x64w4s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-inloop-nf4dq-bf16-Afp32-r16-128x64x64w4s4-dora-ADD_T": (0, 0, True),
    "sm90-nf4_slab-slab-nf4dq-bf16-Afp32-r16-64x16x256w4": (0, 0, None),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x256x64w8s3": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x256x64w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x256x64w8s3-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-ADD_Z": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3": (0, 0, True),
    "sm90-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-ADD_T": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x64w8s4-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x128x64w4s4-dora-MASK_DX": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-128x128x128w8s3-dora-ADD_T": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x128x64w4s4": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x128x64w4s4-dora-COL_SCALE": (0, 0, True),
    "sm90-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x128x64w4s4-dora-ADD_T": (0, 0, True),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd_epilogue-decode-nf4dq-bf16-Afp32-r16-16x128w4": (0, 0, None),
    "sm80-zero_fp32-lowrank-nf4dq-bf16-Afp32-r16-1024w4": (0, 0, None),
    "sm80-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-16x64w4": (0, 0, None),
    "sm80-lora_decode_dx-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4": (0, 0, None),
    "sm80-lora_decode_dx_epilogue-decode-nf4dq-bf16-Afp32-r16-16x128w4": (0, 0, None),
    "sm80-lora_u-lowrank-nf4dq-bf16-Afp32-r16-64x64x32w4": (0, 0, None),
    "sm80-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x256x64w8s3": (8, 4, None),
    "sm80-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-128x128x64w4s4": (104, 104, None),
    "sm80-lora_fwd-inloop-nf4dq-bf16-Afp32-r16-256x128x64w8s3": (44, 40, None),
    "sm80-lora_vdb-lowrank-nf4dq-bf16-Afp32-r16-128x64w8": (0, 0, None),
    "sm80-lora_dx-inloop-nf4dq-bf16-Afp32-r16-64x128x64w4s4": (0, 0, None),
    "sm80-lora_dx-inloop-nf4dq-bf16-Afp32-r16-64x64x64w4s4": (0, 0, None),
    "sm80-lora_dx-inloop-nf4dq-bf16-Afp32-r16-32x128x64w4s4": (0, 0, None),
    "sm80-nf4_slab-slab-nf4dq-bf16-Afp32-r16-64x16x256w4": (0, 0, None),
    "sm80-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x256x64w8s3": (0, 0, None),
    "sm80-lora_fwd-dense-nf4dq-bf16-Afp32-r16-128x128x64w4s4": (0, 0, None),
    "sm80-lora_fwd-dense-nf4dq-bf16-Afp32-r16-256x128x64w8s3": (0, 0, None),
    "sm80-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x128x64w4s4": (0, 0, None),
    "sm80-lora_dx-dense-nf4dq-bf16-Afp32-r16-64x64x64w4s4": (0, 0, None),
    "sm80-lora_dx-dense-nf4dq-bf16-Afp32-r16-32x128x64w4s4": (0, 0, None),
    "sm90-lora_fwd-inloop-split-nf4dq-bf16-Afp32-r16-64x128x128x64w8": (0, 0, True),
    "sm90-lora_decode_fwd_epilogue-split-nf4dq-bf16-Afp32-r16-16x128w4": (0, 0, None),
    "sm80-lora_fwd-inloop-split-nf4dq-bf16-Afp32-r16-64x64x128x64w4": (0, 0, None),
    "sm90-lora_decode_fwd-decode-dense-bf16-Afp32-r64-1x64x64x128w4": (0, 0, True),
    "sm90-lora_decode_fwd_epilogue-decode-dense-bf16-Afp32-r64-64x128w8": (0, 0, None),
    "sm90-zero_fp32-lowrank-dense-bf16-Afp32-r64-1024x64w4": (0, 0, None),
    "sm90-lora_vdb-lowrank-dense-bf16-Afp32-r64-64x32w4": (0, 0, True),
    "sm90-lora_decode_dx-decode-dense-bf16-Afp32-r64-1x64x128x128w4": (0, 0, True),
    "sm90-lora_decode_dx_epilogue-decode-dense-bf16-Afp32-r64-64x128w8": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-fp32-Afp32-r16-64x64x128x128w4": (8732, 14488, None),
    "sm90-lora_decode_fwd_epilogue-decode-nf4dq-fp32-Afp32-r16-64x128w8": (0, 0, None),
    "sm90-lora_vdb-lowrank-nf4dq-fp32-Afp32-r16-64x32w4": (0, 0, None),
    "sm90-lora_decode_dx-decode-nf4dq-fp32-Afp32-r16-64x64x128x128w4": (11068, 17520, None),
    "sm90-lora_decode_dx_epilogue-decode-nf4dq-fp32-Afp32-r16-64x128w8": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r64-dropout-64x16x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x16x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x16x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r64-dropout-64x32x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x32x128x128w4": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x32x128x128w4": (0, 0, True),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r64-dropout-64x16x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x16x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x16x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r64-dropout-64x32x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x32x128x128w4": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x32x128x128w4": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4-frozen": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x32x128x128w4-frozen": (0, 0, True),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4-frozen": (0, 0, None),
    "sm90-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x16x128x128w4-frozen": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x16x128x128w4-frozen": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x32x128x128w4-frozen": (0, 0, True),
    "sm90-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x32x128x128w4-frozen": (0, 0, True),
    "sm80-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x16x128x128w4-frozen": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x16x128x128w4-frozen": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-fp16-Abf16-r16-64x32x128x128w4-frozen": (0, 0, None),
    "sm80-lora_decode_fwd-decode-nf4dq-bf16-Abf16-r16-bs32-32x32x128x128w4-frozen": (0, 0, None),
    "sm90-dropout_mask": (0, 0, None),
    "sm90-nf4_quantize-bf16": (0, 0, None),
    "sm90-nf4_dequantize-nf4dq-bf16": (0, 0, None),
    "sm90-nf4_dequantize-nf4-fp16": (0, 0, None),
    "sm90-adamw32-torch-bf16": (0, 0, None),
    "sm90-adamw32-bnb-fp32": (0, 0, None),
    "sm90-adamw8bit-bf16": (0, 0, None),
    "sm80-dropout_mask": (0, 0, None),
    "sm80-nf4_quantize-bf16": (0, 0, None),
    "sm80-nf4_dequantize-nf4dq-bf16": (0, 0, None),
    "sm80-nf4_dequantize-nf4-fp16": (0, 0, None),
    "sm80-adamw32-torch-bf16": (0, 0, None),
    "sm80-adamw32-bnb-fp32": (0, 0, None),
    "sm80-adamw8bit-bf16": (0, 0, None),
}


def _ptxas_missing_reason() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"triton has no NVIDIA backend ({error})"
    for arch in SHARED_LIMIT:
        try:
            path = get_ptxas(arch).path
        except RuntimeError as error:
            return f"ptxas for sm_{arch} not found ({error})"
        if not os.access(path, os.X_OK):
            return f"ptxas for sm_{arch} not executable at {path}"
    return None


@pytest.fixture(scope="module")
def compiled() -> dict:
    """id -> the record of tests/_compile_kernels.py (compiled in parallel in a subprocess)."""
    reason = _ptxas_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=900, cwd=HELPER.parent.parent
    )
    assert proc.returncode == 0, f"{HELPER.name} failed:\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout)
    print(f"compiled {len(report['records'])} kernels in {report['seconds']} s")
    return {record["id"]: record for record in report["records"]}


def _record(compiled, case_id) -> dict:
    if case_id not in compiled:
        pytest.fail(f"{case_id} is in RECORD but no longer launched/compiled: update RECORD")
    record = compiled[case_id]
    if record["error"] is not None:
        pytest.fail(f"{case_id} did not compile:\n{record['error']}")
    return record


def test_the_compiled_set_is_the_recorded_one(compiled):
    new = sorted(set(compiled) - set(RECORD))
    gone = sorted(set(RECORD) - set(compiled))
    assert not new and not gone, (
        f"launched kernels/configs not in RECORD: {new}; in RECORD but not launched: {gone} (regenerate with "
        "`TRITON_INTERPRET=0 python tests/_compile_kernels.py --record`)"
    )


@pytest.mark.parametrize("case_id", sorted(RECORD))
def test_compiles_and_fits_shared_memory(compiled, case_id):
    """It fits the target; and _compile_kernels.shared_memory_problem finds nothing: a kernel with static shared
    memory of its own (nf4_lookup's pair table) either fits 48 KiB in all or asks Triton for more than 48 KiB of
    dynamic shared memory (only then does Triton's launcher opt in beyond 48 KiB, counting the static part), and a
    decode forward with the pair table stays within the bound its launcher assumed."""
    from _compile_kernels import shared_memory_problem

    record = _record(compiled, case_id)
    assert record["registers"] > 0
    assert record["shared"] <= SHARED_LIMIT[record["arch"]], (
        f"{case_id}: {record['shared']} B of shared memory > {SHARED_LIMIT[record['arch']]} B (OutOfResources)"
    )
    problem = shared_memory_problem(record)
    assert problem is None, f"{case_id}: {problem}"


def test_the_pair_table_is_where_the_launcher_takes_it(compiled):
    """The decode forward's fragment config takes LOOKUP "lds" at the CI's decode M on sm_90 and sm_80, its 32 KiB
    table is static shared memory, the launcher's bound was checked on each (r = 64 with dropout, fp16, frozen, on
    both); the middle path's NF4 GEMMs take it on sm_90 only (launch_gemm.gemm_lookup), every config they launch
    there; no other kernel declares shared memory of its own."""
    from fused_lora.kernels.nf4_lookup import PAIR_TABLE_BYTES

    with_table = sorted(i for i, r in compiled.items() if r["error"] is None and r["static_shared"])
    gemms = ("lora_fwd_kernel", "lora_dx_kernel")
    assert all(compiled[i]["static_shared"] == PAIR_TABLE_BYTES for i in with_table), with_table
    assert all(compiled[i]["facts"]["pair_table_bound"] for i in with_table if compiled[i]["kernel"] not in gemms)
    nf4_gemms = sorted(i for i, r in compiled.items() if r["kernel"] in gemms and "-inloop-" in i)
    assert nf4_gemms and all((i in with_table) == i.startswith("sm90") for i in nf4_gemms), nf4_gemms
    assert "sm90-lora_decode_fwd-decode-nf4dq-bf16-Afp32-r16-64x16x128x128w4" in with_table
    assert {i.split("-")[0] for i in with_table} == {"sm90", "sm80"}
    assert any("r64-dropout" in i for i in with_table) and any("fp16" in i for i in with_table)
    assert any(i.endswith("-frozen") for i in with_table)


@pytest.mark.parametrize("case_id", sorted(RECORD))
def test_spills_are_the_recorded_bytes(compiled, case_id):
    record = _record(compiled, case_id)
    stores, loads, _ = RECORD[case_id]
    got = (record["spill_stores"], record["spill_loads"])
    assert got == (stores, loads), (
        f"{case_id}: spills {got[0]} B stored / {got[1]} B loaded ({record['registers']} registers), recorded "
        f"{stores}/{loads}: " + ("a new spill" if stores == loads == 0 else "update RECORD if this is intended")
    )


@pytest.mark.parametrize("case_id", sorted(RECORD))
def test_mma_overlap_is_the_recorded_one(compiled, case_id):
    record = _record(compiled, case_id)
    expected = RECORD[case_id][2]
    got = record["mma_pipelined"]
    assert got == expected, (
        f"{case_id}: main loop {record['mma']} mma_pipelined={got} (TTGIR pendings {record['ttgir_pendings']}, SASS "
        f"DEPBAR min {record['depbar_min']}), recorded {expected}"
        + (": it now waits for each MMA" if expected else ": update RECORD")
    )


# fp32 x (ids "-fp32-A..."): IEEE fp32 dots, on the FMA pipes by design (no tensor-core format holds fp32 exactly)
GEMMS = sorted(case_id for case_id in RECORD
               if case_id.split("-")[1] in ("lora_fwd", "lora_dx", "lora_decode_fwd", "lora_decode_dx")
               and "-fp32-A" not in case_id)


@pytest.mark.parametrize("case_id", GEMMS)
def test_gemm_main_loops_run_on_tensor_cores(compiled, case_id):
    record = _record(compiled, case_id)
    block_m = record["facts"].get("block_m")
    print(f"{case_id}: main loop {record['mma']}, mma.sync {record['mma_sync']}, wgmma {record['wgmma']}")
    if record["arch"] == 90 and block_m is not None and block_m >= 64:
        assert record["mma"] == "HGMMA", f"{case_id}: main loop without wgmma ({record['mma']})"
    else:
        assert record["mma"] in ("HGMMA", "HMMA"), f"{case_id}: main loop without tensor cores ({record['mma']})"


@pytest.mark.parametrize("case_id", sorted(RECORD))
def test_nf4_weight_is_not_loaded_byte_by_byte(compiled, case_id):
    """Global load widths of the kernels that read NF4 bytes (printed); the packed bytes are read at least 32 bits
    at a time (an 8- or 16-bit load would be the packed weight read byte by byte)."""
    record = _record(compiled, case_id)
    if not record["facts"].get("reads_nf4"):
        pytest.skip("does not read the packed NF4 bytes")
    print(f"{case_id}: global loads {record['global_loads']}")
    assert record["narrowest_global_load_bits"] >= 32, record["global_loads"]


# the NF4 decode forwards feeding a wgmma (not a dense W, and not fp32 x, whose FMA dot has no fragment to match)
FRAGMENT_ORDER = sorted(case_id for case_id in RECORD if case_id.startswith("sm90-lora_decode_fwd-")
                        and "-dense-" not in case_id and "-fp32-A" not in case_id)


@pytest.mark.parametrize("case_id", FRAGMENT_ORDER)
def test_fragment_ordered_nf4_tiles_feed_the_mma_without_a_shared_memory_round_trip(compiled, case_id):
    """The decode forward takes NF4 tiles in the wgmma fragment order (fused_lora/kernels/nf4_fragment.py): its main
    loop stores nothing to shared memory and reads no MMA fragment from it (the decoded tile was moved through shared
    memory before: 16 STS.128, 16 LDSM and 8 barriers per iteration). A Triton whose layouts no longer match the
    module's bit map fails here: the numbers stay right, the conversion comes back."""
    record = _record(compiled, case_id)
    assert record["facts"]["fragment"], f"{case_id}: the launcher did not take the fragment order at K=4096"
    assert record["loop_shared_round_trip"] == 0, (
        f"{case_id}: {record['loop_shared_round_trip']} STS/LDSM per main-loop iteration ({record['sass_loop']} SASS)"
    )


def _pruned(arch: int, kernel: str, m_bucket: int, **constexprs) -> list[tuple]:
    """(BLOCK_M, BLOCK_OUT, BLOCK_REDUCE, num_stages) of the configs the autotuner keeps for a launch of ``kernel``
    (the launchers pass M_BUCKET and dx_ptr positionally, the constexprs by keyword)."""
    from fused_lora.kernels.autotune import gemm_configs, keep_tiles_for_m

    names = ("BLOCK_N", "BLOCK_K") if kernel == "lora_fwd_kernel" else ("BLOCK_K", "BLOCK_N")
    positional = {"M_BUCKET": m_bucket, **({"dx_ptr": object()} if kernel == "lora_dx_kernel" else {})}
    kept = keep_tiles_for_m(gemm_configs((arch // 10, arch % 10), *names), positional, **constexprs)
    return [(c.kwargs["BLOCK_M"], c.kwargs[names[0]], c.kwargs[names[1]], c.num_stages) for c in kept]


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_doras_masked_dx_keeps_at_most_64_accumulator_values_per_thread(arch):
    """The frozen dx that stores DoRA's t = m⊙(((c−1)⊙g)·W) (MASK_DX) holds the kept-mask tile through its loop: at
    128 fp32 accumulator values per thread (128x256, 8 warps) it spilled 192–408 B on sm_90."""
    from fused_lora.kernels.autotune import DX_LORA_MAX_ACC_PER_THREAD, gemm_configs

    masked = _pruned(arch, "lora_dx_kernel", 8192, HAS_LORA=False, MASK_DX=True, IS_NF4=True, ROW_SCALES=True)
    warps = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_stages): c.num_warps
             for c in gemm_configs((arch // 10, arch % 10), "BLOCK_K", "BLOCK_N")}
    assert masked and all(bm * bk <= DX_LORA_MAX_ACC_PER_THREAD * 32 * warps[(bm, bk, bn, st)]
                          for bm, bk, bn, st in masked), masked
    frozen = _pruned(arch, "lora_dx_kernel", 8192, HAS_LORA=False, IS_NF4=True, ROW_SCALES=True)
    assert any(bm * bk > DX_LORA_MAX_ACC_PER_THREAD * 32 * warps[(bm, bk, bn, st)] for bm, bk, bn, st in frozen)


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_dx_with_lowrank_term_never_tries_tiles_above_128x128(arch):
    """The sm_90 dx tiles 128x256x64 and 256x128x64 need 262144 B with the low-rank term (limit 232448 B)."""
    with_lora = _pruned(arch, "lora_dx_kernel", 8192, HAS_LORA=True, IS_NF4=True, ROW_SCALES=True)
    assert with_lora and all(bm * bk <= 128 * 128 for bm, bk, _, _ in with_lora), with_lora
    frozen = _pruned(arch, "lora_dx_kernel", 8192, HAS_LORA=False, IS_NF4=True, ROW_SCALES=True)
    assert (128, 256, 64, 3) in frozen
    fwd = _pruned(arch, "lora_fwd_kernel", 8192, HAS_LORA=True, IS_NF4=True, ROW_SCALES=True)
    assert (128, 256, 64, 3) in fwd
