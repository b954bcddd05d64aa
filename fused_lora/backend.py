"""Backend selection, in one place for every entry point (lora_linear, frozen_linear, the NF4 (de)quantizers and
the optimizers).

Names:
    "reference"  plain PyTorch (fused_lora/reference.py, and the optimizers' update math); any device.
    "triton"     the Triton kernels in fused_lora/kernels/; CUDA tensors, or CPU tensors under Triton's interpreter
                 (TRITON_INTERPRET=1 set before triton is imported).
    "auto"       "triton" for CUDA tensors when Triton imports, "reference" otherwise (with one warning when CUDA
                 tensors meet a missing Triton).
The environment variable FUSED_LORA_BACKEND, when set, replaces "auto" (an explicit "triton" or "reference" argument
wins over it). Every misuse gets the same message wherever it happens: an unknown name lists the choices and names
the caller (or the variable); "triton" without Triton, or on a CPU without the interpreter, says what to do.

This module imports only torch and the standard library (Triton is looked up, never imported at module level), so
every layer of the package, the kernels included, may import it.
"""

from __future__ import annotations

import enum
import os

import torch

from ._common import warn_once

__all__ = [
    "Backend",
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "validate_backend_name",
    "resolve_backend",
    "interpreting",
    "triton_import_error",
    "cuda_available",
]

BACKEND_ENV_VAR = "FUSED_LORA_BACKEND"


class Backend(str, enum.Enum):
    """The backend names; a ``str`` enum, so ``Backend.TRITON == "triton"``."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


BACKENDS = tuple(b.value for b in Backend)


def validate_backend_name(name) -> str:
    """Return ``name`` (as a plain string) if it is a known backend, else raise ValueError listing the choices.

    Example:
        >>> validate_backend_name("triton")
        'triton'
    """
    if isinstance(name, Backend):
        return name.value
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return name


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1; it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else why not and how to fix it."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with `pip install triton`"
    return None


def cuda_available() -> bool:
    """torch.cuda.is_available(), False where querying CUDA itself fails (a driver torch cannot use)."""
    try:
        return torch.cuda.is_available()
    except RuntimeError:
        return False


def requested_backend(backend, caller: str) -> str:
    """``backend`` validated, with "auto" replaced by FUSED_LORA_BACKEND when that is set."""
    try:
        backend = validate_backend_name(backend)
    except ValueError as error:
        raise ValueError(f"{caller}: {error}") from None
    if backend == Backend.AUTO:
        override = os.environ.get(BACKEND_ENV_VAR)
        if override:
            try:
                backend = validate_backend_name(override)
            except ValueError as error:
                raise ValueError(f"{BACKEND_ENV_VAR}: {error}") from None
    return backend


def resolve_backend(backend, device: torch.device, caller: str = "lora_linear") -> str:
    """The concrete backend ("triton" or "reference") that ``backend`` selects for tensors on ``device``;
    ``caller`` names the public function in warnings and errors.

    Example:
        >>> resolve_backend("auto", torch.device("cpu"))      # without FUSED_LORA_BACKEND set
        'reference'
    """
    backend = requested_backend(backend, caller)
    device = torch.device(device)
    if backend == Backend.AUTO:
        if device.type != "cuda":
            return Backend.REFERENCE.value
        problem = triton_import_error()
        if problem is not None:
            warn_once(f"{caller}: falling back to the reference backend on CUDA because {problem}")
            return Backend.REFERENCE.value
        return Backend.TRITON.value
    if backend == Backend.TRITON:
        problem = triton_import_error()
        if problem is not None:
            raise RuntimeError(f"{caller}: backend='triton' needs Triton, but {problem}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{caller}: backend='triton' got {device.type} tensors; the kernels run on CUDA, or on the "
                "CPU only under Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
            )
    return backend
