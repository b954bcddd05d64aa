"""DoRA and mixed-adapter batches: an offline prediction of GPU time (no GPU needed) and a CPU timing of the
reference paths.

    python -m fused_lora.bench.dora                   # the prediction tables (H200) and a timing (GPU, else CPU)
    python -m fused_lora.bench.dora --output DIR      # also DIR/dora-<YYYYmmdd-HHMM>.json
    python -m fused_lora.bench.dora --no-timing       # the prediction only

The timing (``timing``) runs PEFT's QLoRA layers over a bitsandbytes NF4 Linear4bit against the same layers patched
(DoRA and LoRA training steps; a mixed batch of 4 adapters, PEFT's adapter_names and PEFT's loop over set_adapter):
on a GPU in bf16 at Llama-3-8B shapes with triton.testing.do_bench, on the CPU in fp32 at a small shape.

The model (``predict``): an implementation is the list of GPU operations its code runs (read from PEFT's DoRA layer
and mixed-batch loop, peft/tuners/lora/{dora,variants,bnb}.py, and from fused_lora/dora.py, mixed.py), each with
its FLOPs and the HBM bytes it reads and writes; an operation takes max(FLOPs / rate, bytes / HBM) + one launch, and
an implementation the sum. Rates: bf16 tensor-core GEMMs at the measured cuBLAS rate, fp32 GEMMs and fp32
element-wise math at the fp32 CUDA-core rate, everything else memory-bound at the measured copy bandwidth
(``H200``; the same figures as the offline instrument's cost model). Every GEMM runs at that roofline, ours and
PEFT's alike, so the predictions are the best each implementation could do: they compare the bytes, FLOPs and
launches the implementations add, not kernel quality (the fused kernels' own efficiency is the offline
instrument's subject). Sizes: x and y bf16, W NF4 with double quantization (0.5 + 1/64 + 1/16384 bytes per
element), adapters and magnitude fp32 (PEFT's default), no bias (Llama), no dropout unless the name says so.

Implementations, one layer, a training step (forward + backward) unless said:

- ``peft_dora``: PEFT's DoRA over bitsandbytes' Linear4bit: bitsandbytes' dequantize + GEMM, the clone, x cast to
  fp32, lora_weight = B(A(I_K)) (a K×K identity through both adapters: N×K fp32), W dequantized again and cast to fp32,
  ‖W + s·lora_weight‖ over N×K fp32, lora_result = B(A(x)) in fp32, (c−1)⊙base + c⊙s·lora in fp32, the cast back;
  autograd's backward of each (fp32 M×N passes), bitsandbytes' backward (dequantize again + GEMM).
- ``peft_lora``: the same layer without DoRA (the DoRA overhead's baseline).
- ``fused_dora``: ``dora_linear`` on the Triton backend as built (NF4, K a multiple of the blocksize): W·Aᵀ by the
  frozen kernel over A's r rows (‖W_n‖² cached), the fused LoRA forward writing z and y = c⊙z from its epilogue (one
  extra M×N store, no extra pass), the LoRA backward kernels over (c⊙W, A, c⊙B) with c in the block scales, dmag by
  one column reduction of g⊙z.
- ``fused_dora_dropout`` / ``peft_dora_dropout``: the same with LoRA dropout in training (PEFT's second frozen
  product over the dropped input). Ours (fused_lora/kernels/lora.forward_scaled_dropout): u with the mask in its
  kernel, x_d = m⊙x written once, z_d = x_d·Wᵀ + s·u·Bᵀ by the fused GEMM, y by a second fused GEMM whose epilogue
  reads z_d; backward t = m⊙(((c−1)⊙g)·W) by the frozen dx GEMM and the LoRA dx GEMM adding t, c⊙B instead of the
  block scales. PEFT's: dropout(x), the DoRA base recomputed (dequantize W again + x_d·Wᵀ) and its backward GEMM,
  the two gradients of x_d summed, the dropout backward, the sum into dx.
- ``fused_lora``: ``lora_linear`` on the Triton backend (the plain LoRA baseline).
- ``dense_cublas``: the bf16 GEMMs x·Wᵀ and g·W alone (the roofline of any QLoRA layer).

Mixed batch of ``n`` adapters (forward, inference; each adapter M/n rows):

- ``peft_mixed``: PEFT's ``_mixed_batch_forward`` over Linear4bit (bitsandbytes' forward once, then per adapter:
  the rows gathered, A and B in fp32, the result rows updated with ``+=``).
- ``peft_loop``: one forward per adapter over its M/n rows (``set_adapter``), each dequantizing W.
- ``fused_mixed``: ``lora_linear_multi`` as built: groups of at least ``GROUP_ROWS`` rows run one fused LoRA pass each
  over their gathered rows (W read once per group, the rows of y written back); smaller groups share one frozen
  pass, then per adapter the rows gathered, u and the low-rank term in fp32, the rows of y updated.
- ``fused_grouped``: the target, not built: the low-rank term of each row group in the GEMM's epilogue (a plain
  fused LoRA pass plus the per-group reads of A and B).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..mixed import GROUP_ROWS
from ..testing import torch_threads

__all__ = ["H200", "Op", "predict", "dora_ops", "mixed_ops", "prediction_rows", "timing", "main"]


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str = "NVIDIA H200 (sm_90a)"
    bf16_tflops: float = 790.0  # measured: cuBLAS bf16 8192^3 (769-798 TFLOP/s), as in the offline cost model
    fp32_tflops: float = 60.0  # lead: fp32 CUDA-core rate (datasheet 67 TFLOP/s)
    hbm_tbps: float = 4.3  # measured: device-to-device copy, bytes read + written
    launch_us: float = 2.0  # lead: GPU time per launch on a busy stream


H200 = Gpu()
NF4_BYTES = 0.5 + 1 / 64 + 1 / 16384  # packed codes, 8-bit absmax per 64, fp32 nested absmax per 256 blocks


@dataclasses.dataclass(frozen=True)
class Op:
    """One GPU operation: FLOPs, HBM bytes and the rate its FLOPs run at ("bf16", "fp32")."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    rate: str = "fp32"

    def ms(self, gpu: Gpu = H200) -> float:
        tflops = gpu.bf16_tflops if self.rate == "bf16" else gpu.fp32_tflops
        return max(self.flops / (tflops * 1e9), self.bytes / (gpu.hbm_tbps * 1e9)) + gpu.launch_us * 1e-3


def _gemm(name, m, n, k, a_bytes, b_bytes, c_bytes, rate="fp32") -> Op:
    """C (m×n) = A (m×k) · B (k×n), each operand read or written once."""
    return Op(name, 2.0 * m * n * k, m * k * a_bytes + k * n * b_bytes + m * n * c_bytes, rate)


def _pass(name, elements, bytes_per_element, flops_per_element=1.0) -> Op:
    """An element-wise pass (or reduction) over ``elements``, moving ``bytes_per_element`` each."""
    return Op(name, flops_per_element * elements, bytes_per_element * elements)


def predict(ops, gpu: Gpu = H200) -> dict:
    """{ms, gflop, hbm_gb, launches} of a list of Ops."""
    return {"ms": sum(op.ms(gpu) for op in ops), "gflop": sum(op.flops for op in ops) / 1e9,
            "hbm_gb": sum(op.bytes for op in ops) / 1e9, "launches": len(ops)}


def _bnb_forward(M, N, K):
    return [_pass("bnb dequantize W", N * K, NF4_BYTES + 2), _gemm("x·Wᵀ", M, N, K, 2, 2, 2, "bf16")]


def _bnb_backward(M, N, K):
    return [_pass("bnb dequantize W", N * K, NF4_BYTES + 2), _gemm("g·W", M, K, N, 2, 2, 2, "bf16")]


def _peft_lora_path(M, N, K, r):
    """PEFT's LoRA term over fp32 adapters: x cast, A, B, ×s, cast back, added; and its backward."""
    fwd = [_pass("x to fp32", M * K, 6), _gemm("x·Aᵀ", M, r, K, 4, 4, 4), _gemm("u·Bᵀ", M, N, r, 4, 4, 4),
           _pass("×s", M * N, 8), _pass("to bf16", M * N, 6), _pass("result + lora", M * N, 6)]
    bwd = [_pass("g to fp32", M * N, 6), _pass("×s", M * N, 8), _gemm("dB = gᵀ·u", N, r, M, 4, 4, 4),
           _gemm("v = g·B", M, r, N, 4, 4, 4), _gemm("dA = vᵀ·x", r, K, M, 4, 4, 4),
           _gemm("v·A", M, K, r, 4, 4, 4), _pass("dx to bf16", M * K, 6), _pass("dx accumulate", M * K, 6)]
    return fwd, bwd


def _dropout_ops(impl: str, M: int, N: int, K: int, r: int) -> list[Op]:
    """``fused_dora_dropout`` / ``peft_dora_dropout`` (module docstring): the no-dropout step changed as each
    implementation's dropout path changes it."""
    if impl == "fused_dora_dropout":
        base = dora_ops("fused_dora", M, N, K, r)
        fwd = next(op for op in base if op.name == "fused fwd x·Wᵀ + s·u·Bᵀ")  # z stored beside y
        dx = next(op for op in base if op.name == "fused dx = g·W + s·v·A, dA")
        replaced = {
            "u = x·Aᵀ": [_gemm("u = (m⊙x)·Aᵀ (mask in the kernel)", M, r, K, 2, 4, 4),
                          _pass("x_d = m⊙x (bf16)", M * K, 4)],
            fwd.name: [dataclasses.replace(fwd, name="fused fwd z_d = x_d·Wᵀ + s·u·Bᵀ", flops=fwd.flops - M * N,
                                           bytes=fwd.bytes - 2.0 * M * N),
                       dataclasses.replace(fwd, name="fused fwd y = x·Wᵀ + s·u·Bᵀ + b + (c−1)⊙z_d")],  # reads z_d
            dx.name: [_gemm("t = m⊙(((c−1)⊙g)·W) (frozen dx GEMM)", M, K, N, 2, NF4_BYTES, 2, "bf16"),
                      dataclasses.replace(dx, name="fused dx = g·W + s·m⊙(v·A) + t, dA", bytes=dx.bytes + 2.0 * M * K)],
            "c into the block scales, c⊙B, c⊙dB": [Op("c⊙B, c⊙dB", 0, 4.0 * 4 * N * r)],
        }
        return [new for op in base for new in replaced.get(op.name, [op])]
    assert impl == "peft_dora_dropout", impl
    ops = [op for op in dora_ops("peft_dora", M, N, K, r) if op.name != "grads of result summed"]
    return ops + [
        _pass("dropout(x) (bf16, bool mask)", M * K, 5),
        _pass("dequantize W for base(x_d)", N * K, NF4_BYTES + 2), _gemm("x_d·Wᵀ", M, N, K, 2, 2, 2, "bf16"),
        _gemm("((c−1)⊙g)·W", M, K, N, 2, 2, 2, "bf16"), _pass("grads of x_d summed", M * K, 6),
        _pass("dropout backward", M * K, 5), _pass("dx += grad of x", M * K, 6),
    ]


def dora_ops(impl: str, M: int, N: int, K: int, r: int) -> list[Op]:
    """The operations of one training step (forward + backward) of ``impl`` (module docstring)."""
    if impl.endswith("_dropout"):
        return _dropout_ops(impl, M, N, K, r)
    if impl == "dense_cublas":
        return [_gemm("x·Wᵀ", M, N, K, 2, 2, 2, "bf16"), _gemm("g·W", M, K, N, 2, 2, 2, "bf16")]
    if impl in ("fused_lora", "fused_dora"):
        ops = [_gemm("u = x·Aᵀ", M, r, K, 2, 4, 4),
               _gemm("fused fwd x·Wᵀ + s·u·Bᵀ", M, N, K, 2, NF4_BYTES, 2, "bf16"),
               _gemm("fused v, dB, db over g", M, r, N, 2, 4, 4),
               _gemm("fused dx = g·W + s·v·A, dA", M, K, N, 2, NF4_BYTES, 2, "bf16")]
        ops[1] = dataclasses.replace(ops[1], flops=ops[1].flops + 2.0 * M * N * r)
        ops[2] = dataclasses.replace(ops[2], flops=2 * ops[2].flops)  # v = g·B and dB = s·gᵀ·u in one pass
        ops[3] = dataclasses.replace(ops[3], flops=ops[3].flops + 4.0 * M * K * r, bytes=ops[3].bytes + 2.0 * M * K)
        if impl == "fused_dora":  # the forward's epilogue stores z beside y: one more M×N bf16 write, no launch
            ops[1] = dataclasses.replace(ops[1], flops=ops[1].flops + M * N, bytes=ops[1].bytes + 2.0 * M * N)
            ops += [Op("W·Aᵀ: frozen kernel over A's r rows", 2.0 * r * N * K, N * K * NF4_BYTES + 4 * r * (K + N)),
                    Op("A·Aᵀ, B·AAᵀ, row sums, norm, c", 2.0 * r * r * (K + N), 4.0 * (r * K + 3 * N * r + 4 * N)),
                    Op("c into the block scales, c⊙B, c⊙dB", 0, 4.0 * (N * K / 32 + 4 * N * r)),
                    _pass("dmag: column_dot(g, z)", M * N, 4, 2.0)]
        return ops
    lora_fwd, lora_bwd = _peft_lora_path(M, N, K, r)
    ops = _bnb_forward(M, N, K) + [_pass("result.clone()", M * N, 4)] + lora_fwd + lora_bwd + _bnb_backward(M, N, K)
    if impl == "peft_lora":
        return ops
    assert impl == "peft_dora", impl
    dora = [
        _pass("eye(K) fp32", K * K, 4), _gemm("lora_A(eye)", K, r, K, 4, 4, 4), _gemm("lora_B(..)", K, N, r, 4, 4, 4),
        _pass("dequantize W again", N * K, NF4_BYTES + 2), _pass("W to fp32", N * K, 6),
        _pass("s·lora_weight", N * K, 8), _pass("W + s·lora_weight", N * K, 12), _pass("row norm", N * K, 4, 2.0),
        _pass("(c−1)⊙base (fp32 out)", M * N, 6), _pass("c⊙lora", M * N, 8), _pass("sum", M * N, 12),
        _pass("result + dora (fp32)", M * N, 10), _pass("to bf16", M * N, 6),
        # backward of those: grads of base (×(c−1)), lora (×c), dmag = Σ g⊙base + Σ g⊙lora (products then sums)
        _pass("g to fp32", M * N, 6), _pass("g⊙(c−1) to bf16", M * N, 6), _pass("g⊙c", M * N, 8),
        _pass("g⊙base", M * N, 10), _pass("Σ_M", M * N, 4), _pass("g⊙lora", M * N, 12), _pass("Σ_M", M * N, 4),
        _pass("grads of result summed", M * N, 6),
    ]
    return ops + dora


def mixed_ops(impl: str, M: int, N: int, K: int, r: int, n: int) -> list[Op]:
    """The operations of one forward (inference) over a batch of M rows split evenly over n adapters."""
    Ma = M / n
    if impl == "peft_loop":
        ops = []
        for _ in range(n):
            fwd, _ = _peft_lora_path(Ma, N, K, r)
            ops += _bnb_forward(Ma, N, K) + [_pass("result.clone()", Ma * N, 4)] + fwd
        return ops
    if impl == "fused_grouped":
        op = _gemm("grouped fused fwd", M, N, K, 2, NF4_BYTES, 2, "bf16")
        return [_gemm("u per group", M, r, K, 2, 4, 4), dataclasses.replace(
            op, flops=op.flops + 2.0 * M * N * r, bytes=op.bytes + n * 4.0 * N * r)]
    if impl == "peft_mixed":
        ops = _bnb_forward(M, N, K) + [_pass("x to fp32", M * K, 6)]
        for _ in range(n):
            ops += [_pass("x[rows]", Ma * K, 8), _gemm("x·Aᵀ", Ma, r, K, 4, 4, 4), _gemm("u·Bᵀ", Ma, N, r, 4, 4, 4),
                    _pass("×s", Ma * N, 8), _pass("to bf16", Ma * N, 6), _pass("result[rows] +=", Ma * N, 8)]
        return ops
    assert impl == "fused_mixed", impl
    if Ma >= GROUP_ROWS:
        ops = [_pass("x.index_select", M * K, 4)]
        for _ in range(n):
            op = _gemm("fused fwd x·Wᵀ + s·u·Bᵀ", Ma, N, K, 2, NF4_BYTES, 2, "bf16")
            ops += [_gemm("u", Ma, r, K, 2, 4, 4), dataclasses.replace(op, flops=op.flops + 2.0 * Ma * N * r),
                    _pass("y.index_copy_", Ma * N, 4)]
        return ops
    ops = [_gemm("frozen fwd x·Wᵀ", M, N, K, 2, NF4_BYTES, 2, "bf16")]
    for _ in range(n):
        ops += [_pass("x.index_select", Ma * K, 4), _pass("to fp32", Ma * K, 6), _gemm("u", Ma, r, K, 4, 4, 4),
                _gemm("u·Bᵀ", Ma, N, r, 4, 4, 4), _pass("×s", Ma * N, 8), _pass("y.index_select", Ma * N, 4),
                _pass("+ (fp32)", Ma * N, 14), _pass("to bf16", Ma * N, 6), _pass("y.index_copy_", Ma * N, 4)]
    return ops


DORA_IMPLS = ("dense_cublas", "fused_lora", "fused_dora", "peft_lora", "peft_dora", "fused_dora_dropout",
              "peft_dora_dropout")
MIXED_IMPLS = ("fused_grouped", "fused_mixed", "peft_mixed", "peft_loop")
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): Llama-3-8B q/o, gate/up, down
M_VALUES = (16, 2048, 8192)


def prediction_rows(shapes=SHAPES, m_values=M_VALUES, r: int = 16, n_adapters: int = 4, gpu: Gpu = H200):
    rows = []
    for (K, N) in shapes:
        for M in m_values:
            for impl in DORA_IMPLS:
                rows.append({"bench": "dora_linear", "pass": "fwd_bwd", "impl": impl, "M": M, "K": K, "N": N, "r": r,
                             **predict(dora_ops(impl, M, N, K, r), gpu)})
            for impl in MIXED_IMPLS:
                rows.append({"bench": "mixed_batch", "pass": "fwd", "impl": impl, "adapters": n_adapters, "M": M,
                             "K": K, "N": N, "r": r, **predict(mixed_ops(impl, M, N, K, r, n_adapters), gpu)})
    return rows


def _table(rows, bench: str, baseline: str) -> str:
    lines = [f"| K×N | M | impl | predicted ms | ×{baseline} | GFLOP | HBM GB | launches |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["K"], r["N"], r["M"]): r["ms"] for r in rows if r["bench"] == bench and r["impl"] == baseline}
    for r in rows:
        if r["bench"] == bench:
            ratio = r["ms"] / base[(r["K"], r["N"], r["M"])]
            lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['impl']} | {r['ms']:.3f} | {ratio:.2f} | "
                         f"{r['gflop']:.1f} | {r['hbm_gb']:.3f} | {r['launches']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- timing


def _median_ms(fn, repeats: int, device) -> float:
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _qlora_model(K, N, dtype, device, configs):
    """A one-layer PEFT model over a bitsandbytes NF4 Linear4bit (double quant), PEFT's QLoRA layer, with the
    adapters of ``configs`` ({name: LoraConfig}, the first active)."""
    import warnings

    import bitsandbytes as bnb
    from peft import get_peft_model

    linear = torch.nn.Linear(K, N, bias=False)
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    base = torch.nn.Sequential(q.to(device))
    base.is_loaded_in_4bit = True  # PEFT then builds its bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit)
    names = list(configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, configs[name])
    return model.to(device)


def timing(device=None, K=512, N=768, M=256, r=16, n_adapters=4, repeats=5) -> list[dict]:
    """Median ms of: a training step (forward + backward) of PEFT's DoRA and LoRA QLoRA layers (bitsandbytes NF4
    Linear4bit, fp32 adapters) and of the same layers patched (``patch_peft_model``: dora_linear / lora_linear);
    a forward (inference) of a batch mixing ``n_adapters`` adapters, patched and PEFT's, and PEFT's loop over the
    adapters. On a GPU: bf16, triton.testing.do_bench; on the CPU: fp32, the CPU backends, time.perf_counter (CPU
    numbers, on one thread, exercise the code paths; they say nothing about GPU speed)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # many small ops: spinning worker threads make a busy machine's numbers meaningless
        with torch_threads(1):
            return _timing(device, K, N, M, r, n_adapters, repeats)
    return _timing(device, K, N, M, r, n_adapters, repeats)


def _timing(device, K, N, M, r, n_adapters, repeats) -> list[dict]:
    import copy

    from peft import LoraConfig

    from ..peft import patch_peft_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype)
    g = torch.randn(M, N, device=device, dtype=dtype)
    shape = {"M": M, "K": K, "N": N, "r": r, "device": device.type, "dtype": str(dtype)[6:]}
    rows = []
    for use_dora in (True, False):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)
        peft_model = _qlora_model(K, N, dtype, device, {"default": config}).train()
        fused_model = copy.deepcopy(peft_model)
        patch_peft_model(fused_model)
        kind = "dora" if use_dora else "lora"
        x_train = x.clone().requires_grad_(True)
        for impl, model in ((f"fused_{kind}", fused_model), (f"peft_{kind}", peft_model)):
            def step(model=model):
                model(x_train).backward(g)
                model.zero_grad(set_to_none=True)
                x_train.grad = None
            rows.append({"bench": "dora_linear", "pass": "fwd_bwd", "impl": impl, **shape,
                         "median_ms": _median_ms(step, repeats, device)})
    names = [f"a{i}" for i in range(n_adapters)]
    configs = {name: LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
               for name in names}
    peft_model = _qlora_model(K, N, dtype, device, configs).eval()
    fused_model = copy.deepcopy(peft_model)
    patch_peft_model(fused_model)
    per_row = [names[i * n_adapters // M] for i in range(M)]
    groups = {name: [i for i, n in enumerate(per_row) if n == name] for name in names}

    def peft_loop():
        for name, rows_ in groups.items():
            peft_model.base_model.set_adapter(name)
            peft_model(x[rows_])

    with torch.no_grad():
        for impl, fn in (("fused_mixed", lambda: fused_model(x, adapter_names=per_row)),
                         ("peft_mixed", lambda: peft_model(x, adapter_names=per_row)), ("peft_loop", peft_loop)):
            rows.append({"bench": "mixed_batch", "pass": "fwd", "impl": impl, "adapters": n_adapters, **shape,
                         "median_ms": _median_ms(fn, repeats, device)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lora.bench.dora", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="write DIR/dora-<YYYYmmdd-HHMM>.json")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing (GPU when there is one, else CPU)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = prediction_rows(r=args.r, n_adapters=args.adapters)
    print(f"Predicted on {H200.name} (roofline model of fused_lora/bench/dora.py)\n")
    print("DoRA training step (fwd+bwd), one layer\n\n" + _table(rows, "dora_linear", "dense_cublas") + "\n")
    print(f"Mixed batch of {args.adapters} adapters (fwd)\n\n" + _table(rows, "mixed_batch", "peft_loop") + "\n")
    measured = [] if args.no_timing else (
        [row for K, N in ((4096, 4096), (4096, 14336)) for M in (2048, 8192)
         for row in timing("cuda", K, N, M, args.r, args.adapters)] if torch.cuda.is_available()
        else timing("cpu", r=args.r, n_adapters=args.adapters))
    for row in measured:
        print(f"{row['device']} {row['bench']:12s} {row['impl']:12s} M={row['M']} K={row['K']} N={row['N']} "
              f"r={row['r']} {row['dtype']}: {row['median_ms']:.3f} ms")
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        path = args.output / time.strftime("dora-%Y%m%d-%H%M.json")
        env = {"torch": torch.__version__, "gpu_model": dataclasses.asdict(H200)}
        path.write_text(json.dumps({"env": env, "predicted": rows, "measured": measured}, indent=1))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
