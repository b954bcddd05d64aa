"""``python -m fused_lora check``: run the active backend against the float64 reference on this device.

For a few shapes (ragged, decode-size and Llama-3-8B-size on a GPU; small ones on the CPU), NF4 and dense bases,
it runs ``lora_linear`` forward and backward through autograd and compares y, dx, dA, dB and db with
``fused_lora.reference`` in float64 under DESIGN's tolerance rule (error ≤ 2 × plain PyTorch error in the same
dtype + atol). It prints one row per case and exits with 1 if any case fails.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .. import functional, reference
from .._common import dtype_name
from ..backend import BACKENDS, parse_device, resolve_backend
from ..nf4 import quantize_nf4
from ..testing import ATOL, relative_error

SCALING = 2.0
NAMES = ("y", "dx", "dA", "dB", "db")


def _cases(device: torch.device, backend: str):
    """(M, K, N, r) shapes for this device: real sizes on a GPU, interpreter-sized ones on the CPU."""
    if device.type == "cuda":
        return [(37, 192, 200, 8), (1, 4096, 4096, 16), (2048, 4096, 14336, 16)]
    if backend == "triton":
        return [(37, 64, 80, 8), (5, 192, 40, 4)]
    return [(37, 192, 200, 8), (129, 256, 80, 16)]


def _layer(M, K, N, r, dtype, base, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=gen).to(dtype)
    w = (torch.randn(N, K, device=device, generator=gen) / K**0.5).to(dtype)
    weight = quantize_nf4(w, blocksize=64, double_quant=True) if base == "nf4" else w
    w_compute = weight.dequantize(dtype) if base == "nf4" else w
    A = torch.randn(r, K, device=device, generator=gen) / K**0.5
    B = torch.randn(N, r, device=device, generator=gen) / r**0.5
    b = torch.randn(N, device=device, generator=gen).to(dtype)
    g = torch.randn(M, N, device=device, generator=gen).to(dtype)
    return x, weight, w_compute, A, B, b, g


def _outputs(fn, x, A, B, b, g):
    """y and the gradients (dx, dA, dB, db) of ``fn(x, A, B, b)`` for upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, b)]
    y = fn(*leaves)
    return (y.detach(),) + torch.autograd.grad(y, leaves, g.to(y.dtype))


def _check_case(M, K, N, r, dtype, base, device, backend):
    """Relative errors of the backend, their bounds, and the fallback warnings raised for this case."""
    x, weight, w_compute, A, B, b, g = _layer(M, K, N, r, dtype, base, device, seed=M + K + N + r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _outputs(
            lambda x_, A_, B_, b_: functional.lora_linear(x_, weight, A_, B_, SCALING, bias=b_, backend=backend),
            x, A, B, b, g,
        )  # fmt: skip
    ref = _outputs(
        lambda x_, A_, B_, b_: reference.lora_linear_naive(x_, w_compute.double(), A_, B_, SCALING, b_),
        x.double(), A.double(), B.double(), b.double(), g.double(),
    )  # fmt: skip
    plain = _outputs(
        lambda x_, A_, B_, b_: reference.lora_linear_naive(x_, w_compute, A_, B_, SCALING, b_), x, A, B, b, g
    )
    errors = [relative_error(o, rf) for o, rf in zip(ours, ref)]
    bounds = [2.0 * relative_error(p, rf) + ATOL[dtype] for p, rf in zip(plain, ref)]
    return errors, bounds, [str(w.message) for w in caught]


def main(argv: list[str] | None = None) -> int:
    """Print a pass/fail table of the active backend against the reference; return 1 on any failure, 2 (one line,
    no traceback) for an unusable --device or backend."""
    parser = argparse.ArgumentParser(prog="python -m fused_lora check", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="backend to check")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    try:
        device = parse_device(args.device)
        backend = resolve_backend(args.backend, device)
    except (RuntimeError, ValueError) as error:
        print(f"fused_lora check: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    dtypes = [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32, torch.float16]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"fused_lora check: backend {backend!r} on {name}; relative error vs float64 reference (bound)")
    header = f"{'case':<34}" + "".join(f"{n:>22}" for n in NAMES) + "  result"
    print(header)
    failed = 0
    for M, K, N, r in _cases(device, backend):
        for dtype in dtypes:
            for base in ("nf4", "dense"):
                case = f"M{M}-K{K}-N{N}-r{r}-{dtype_name(dtype)}-{base}"
                errors, bounds, notes = _check_case(M, K, N, r, dtype, base, device, backend)
                ok = all(e <= bd for e, bd in zip(errors, bounds))
                failed += not ok
                cells = "".join(f"{f'{e:.1e} ({bd:.1e})':>22}" for e, bd in zip(errors, bounds))
                print(f"{case:<34}{cells}  {'pass' if ok else 'FAIL'}")
                for note in notes:
                    print(f"    note: {note}")
    print(f"fused_lora check: {'all passed' if not failed else f'{failed} case(s) FAILED'}")
    return 1 if failed else 0
