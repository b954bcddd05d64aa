"""Programmatic dependent launch (fused_lora/kernels/pdl.py): which launches take part, that every kernel taking part
waits for the previous kernel before it touches memory, and what the offline model charges for such a launch.

PDL runs only on a Hopper GPU: here the launches are captured as the launchers make them for sm_90 and sm_80
(fused_lora.bench.offline_capture, no GPU), one kernel is compiled for sm_90a to read its PTX, and the GPU test
(tests/test_kernels_gpu_paths.py) checks that the numbers are bitwise the same with PDL on and off.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_lora.bench.offline import launches_early
from fused_lora.bench.offline_capture import Launch, Step, TorchOp
from fused_lora.bench.offline_model import H200, predict_kernel
from fused_lora.kernels import pdl

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = ["lora_decode.py", "lora_fwd.py", "lora_bwd.py"]


def _kernels_with_pdl() -> dict[str, ast.FunctionDef]:
    found = {}
    for name in KERNEL_FILES:
        tree = ast.parse((REPO / "fused_lora" / "kernels" / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(a.arg == "PDL" for a in node.args.args):
                found[node.name] = node
    return found


def test_every_kernel_with_pdl_waits_first():
    """The PDL rule: wait_for_previous(PDL) is each such kernel's first statement (after its docstring), so nothing is
    read or written before the previous kernel has finished."""
    kernels = _kernels_with_pdl()
    assert set(kernels) == {"lora_decode_fwd_kernel", "lora_decode_fwd_epilogue_kernel", "lora_decode_dx_kernel",
                            "lora_decode_dx_epilogue_kernel", "lora_u_kernel", "lora_fwd_kernel", "zero_fp32_kernel",
                            "lora_vdb_kernel"}  # fmt: skip
    for name, node in kernels.items():
        body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
            else node.body  # fmt: skip
        first = body[0]
        assert isinstance(first, ast.Expr) and ast.unparse(first) == "wait_for_previous(PDL)", name


def test_pdl_is_off_without_a_hopper_gpu(monkeypatch):
    assert not pdl.enabled("cpu") and pdl.launch_args("cpu") == {"PDL": False}
    monkeypatch.setattr(pdl, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pdl.launch_args("cuda") == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv(pdl.ENV_VAR, "0")
    assert pdl.launch_args("cuda") == {"PDL": False}
    monkeypatch.delenv(pdl.ENV_VAR)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert pdl.launch_args("cuda") == {"PDL": False}  # ROCm: the instructions are PTX
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(pdl, "HAS_GDC", False)
    assert pdl.launch_args("cuda") == {"PDL": False}  # a Triton without grid dependency control
    monkeypatch.setattr(pdl, "HAS_GDC", True)
    monkeypatch.setattr(pdl, "cuda_capability", lambda device: (8, 0))
    assert pdl.launch_args("cuda") == {"PDL": False}  # griddepcontrol needs sm_90


OLD_TRITON = """
import sys, types
import triton.language.extra.cuda
real = sys.modules["triton.language.extra.cuda"]
old = types.ModuleType(real.__name__)  # the module as in a Triton before 3.4: no gdc_wait, gdc_launch_dependents
old.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("gdc_")})
sys.modules[real.__name__] = old
import torch
from fused_lora.kernels import launch_gemm, pdl
assert not pdl.HAS_GDC and not pdl.enabled("cpu")
v, db = launch_gemm.zeroed_fp32("cpu", (3, 4), (5,))
assert bool((v == 0).all()) and bool((db == 0).all())
print("ok")
"""


def test_the_kernels_work_with_a_triton_before_grid_dependency_control():
    """Without triton.language.extra.cuda.gdc_* (Triton 3.2, 3.3: setup.py allows them) the package imports, PDL is
    off and the kernels run (interpreter, in a subprocess)."""
    proc = subprocess.run([sys.executable, "-c", OLD_TRITON], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


CAPTURE = """
import json, sys
from fused_lora.bench.offline_capture import LayerSpec, capture_pass
out = {}
for arch in (90, 80):
    for M, N in ((1, 14336), (256, 1024), (8192, 14336)):
        steps, _ = capture_pass("fwd_bwd", LayerSpec(M, 4096, N, 16), arch)
        out[f"{arch}-{M}"] = [[c.kernel, bool(c.options.get("launch_pdl")), c.args.get("PDL")]
                              for s in steps if s.candidates for c in s.candidates[:1]]
print(json.dumps(out))
"""


def _capture(extra_env: dict) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", **extra_env}
    proc = subprocess.run([sys.executable, "-c", CAPTURE], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_the_launchers_chain_the_short_kernels_on_hopper_only():
    """On sm_90 the decode path's kernels, the split-K forward (k_proj at M=256), u and the backward's zeroing and
    pass over g launch with PDL, the constexpr and the launch option together; autotuned GEMMs never do; nothing
    does on sm_80, or with FUSED_LORA_PDL=0."""
    expected_on = {"lora_decode_fwd_kernel", "lora_decode_fwd_epilogue_kernel", "lora_decode_dx_kernel",
                   "lora_decode_dx_epilogue_kernel", "lora_u_kernel", "zero_fp32_kernel", "lora_vdb_kernel"}
    got = _capture({})
    for key, launches in got.items():
        arch = int(key.split("-")[0])
        for kernel, launch_pdl, constexpr in launches:
            assert launch_pdl == bool(constexpr), (key, kernel)  # the option never without the constexpr
            if arch == 80:
                assert not launch_pdl, (key, kernel)
            elif kernel in expected_on:
                assert launch_pdl, (key, kernel)
    on = {kernel for kernel, launch_pdl, _ in got["90-1"] if launch_pdl}
    assert on == expected_on - {"lora_u_kernel"}, on  # the decode path: the whole chain of six launches
    split = [(kernel, launch_pdl) for kernel, launch_pdl, _ in got["90-256"]]
    assert ("lora_fwd_kernel", True) in split and ("lora_decode_fwd_epilogue_kernel", True) in split, split
    assert ("lora_dx_kernel", False) in split  # autotuned: no PDL
    off = _capture({pdl.ENV_VAR: "0"})
    assert not any(launch_pdl for launches in off.values() for _, launch_pdl, _ in launches)


def test_a_pdl_kernel_waits_before_its_first_memory_access():
    """Compiled for sm_90a in a subprocess without the interpreter (no GPU needed), as the launchers launch them on
    the decode path's backward and the v/dB pass with B split (M=256): griddepcontrol.wait comes before the first
    global load, store or atomic of the PTX, then launch_dependents. (The two decode GEMMs are left out for time:
    they call the same first statement, test_every_kernel_with_pdl_waits_first.)"""
    proc = subprocess.run([sys.executable, "-c", COMPILE], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout)
    assert {"lora_decode_fwd_epilogue_kernel", "zero_fp32_kernel", "lora_vdb_kernel",
            "lora_decode_dx_epilogue_kernel"} <= {kernel for kernel, _ in compiled}, [k for k, _ in compiled]
    for kernel, ptx in compiled:
        lines = [line.strip() for line in ptx.splitlines()]
        wait = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait"))
        trigger = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.launch_dependents"))
        memory = [i for i, line in enumerate(lines) if MEMORY_OP.search(line)]
        assert memory and wait < trigger < min(memory), (kernel, wait, trigger, [lines[i] for i in memory[:3]])


MEMORY_OP = re.compile(r"\b(ld\.global|st\.global|atom\.global|red\.global|cp\.async)\b")
COMPILE = """
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_lora.bench import offline, offline_compile as oc
from fused_lora.bench.offline_capture import LayerSpec, capture_pass
out, seen = [], set()
for M in (1, 256):
    spec = LayerSpec(M, 4096, 14336, 16)
    steps, _ = capture_pass("fwd_bwd", spec, 90)
    for launch in (s.candidates[0] for s in steps if s.candidates):
        if not launch.options.get("launch_pdl") or launch.kernel in ("lora_decode_fwd_kernel", "lora_decode_dx_kernel"):
            continue
        job = offline.launch_job(launch, spec, 90)
        if job.id in seen:
            continue
        seen.add(job.id)
        fn = getattr(importlib.import_module(job.module), job.kernel)
        signature, constexprs, attrs = oc.specialise(fn, job.args)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(job.options))
        out.append((launch.kernel, compiled.asm["ptx"]))
print(json.dumps(out))
"""


def test_the_model_charges_a_chained_launch_less():
    record = {"num_warps": 4, "registers": 32, "shared": 0, "sass_loop": None, "sass_total": 100, "unroll": 1,
              "loop_mma_flops": {}, "rest_mma_flops": {}, "mma": None, "mma_pipelined": None, "loop_membar": 0,
              "rest_membar": 0, "smem_ring_depth": None}  # fmt: skip
    alone = predict_kernel(record, 132, 0, 0)
    chained = predict_kernel(record, 132, 0, 0, launch_us=H200.pdl_launch_us)
    assert alone.ms - chained.ms == pytest.approx((H200.launch_us - H200.pdl_launch_us) * 1e-3)


def _launch(pdl_on: bool):
    return Step(candidates=[Launch("k", "m", {}, {"launch_pdl": True} if pdl_on else {}, 1)])


def test_which_launches_the_model_lets_start_early():
    """Only a PDL launch right after a PDL launch on the same stream; a PyTorch op, a stream wait and the host's
    work between a forward and its backward break the chain."""
    steps = [_launch(True), _launch(True), _launch(False), _launch(True), _launch(True),
             Step(torch_op=TorchOp("sum", 4)), _launch(True), _launch(True),
             Step(sync=("host", 0, None)), _launch(True), _launch(True),
             Step(sync=("wait_event", 0, 3)), _launch(True)]  # fmt: skip
    assert launches_early(steps) == [False, True, False, False, True, False, False, True, False, False, True, False,
                                     False]  # fmt: skip
    side = [_launch(True), Step(candidates=_launch(True).candidates, stream=1), _launch(True)]
    assert launches_early(side) == [False, False, True]  # chains are per stream
