"""Helpers for comparing fast paths with the reference (the tolerance rule of docs/DESIGN.md).

    err(t) = ‖t − ref‖ / ‖ref‖, with ref computed in float64.
    A kernel passes when err(kernel) ≤ 2 · err(plain PyTorch in the same dtype) + atol,
    atol = 1e-6 (fp32), 1e-2 (fp16), 5e-2 (bf16). NaN never passes. (fp32 was 1e-4, about 1,000x the errors the
    tests observe; docs/DESIGN.md, "Numerics and tolerances", has the measurement behind 1e-6.)

Also ``torch_threads``, the CPU thread-count context manager shared by the tests and the command-line tooling.
"""

from __future__ import annotations

import contextlib

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (‖out − ref‖ when ref is 0); inf when out has any NaN or inf.

    Args: out and ref of the same shape, any floating dtype and device.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float64))
        0.0
    """
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: {tuple(out64.shape)} vs reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_reference(name: str, out: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, dtype):
    """Assert the tolerance rule for one tensor.

    Args:
        name: what is compared (used in the message), e.g. "dx".
        out: the fast path's result. plain: plain PyTorch's result in the same dtype. ref: float64 reference.
        dtype: the compute dtype that selects atol.
    Returns:
        The fast path's relative error (raises AssertionError with both errors and the bound when it fails).

    Example:
        >>> assert_close_to_reference("y", y_kernel, y_plain_fp16, y_float64, torch.float16)
    """
    err = relative_error(out, ref)
    plain_err = relative_error(plain, ref)
    bound = 2.0 * plain_err + ATOL[dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e} (plain PyTorch {plain_err:.3e})"
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating-point tensor with NaN in place (other dtypes are left alone) and return it, so that an
    output element a kernel never writes fails the comparison.

    Example:
        >>> out = poison_(torch.empty(37, 80))    # every element NaN until the kernel writes it
    """
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run a block with torch's intra-op CPU thread count set to ``threads``, restoring the previous count after
    (the demo's ``--threads``, and the tests' one-thread fixture: tiny matrices gain nothing from more threads, and
    spinning threads slow down badly on a busy machine).

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
