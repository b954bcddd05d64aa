"""Backend selection, in one place for every entry point (lora_linear, frozen_linear, the NF4 (de)quantizers and
the optimizers).

Names:
    "reference"  plain PyTorch (fused_lora/reference.py, and the optimizers' update math); any device.
    "triton"     the Triton kernels in fused_lora/kernels/; CUDA tensors, or CPU tensors under Triton's interpreter
                 (TRITON_INTERPRET=1 set before triton is imported).
    "cpu"        the fast CPU path (fused_lora/cpu.py over the C++ kernels of fused_lora._C); CPU tensors. For the
                 NF4 quantizer and the optimizers, which have no CPU-specific code, it runs the reference code.
    "auto"       "triton" for CUDA tensors when Triton imports; "cpu" for CPU tensors when fused_lora._C has the CPU
                 kernels; "reference" otherwise (with one warning when CUDA tensors meet a missing Triton, or CPU
                 tensors a missing or stale extension).
The environment variable FUSED_LORA_BACKEND, when set, replaces "auto" (an explicit "triton", "cpu" or "reference"
argument wins over it). Every misuse gets the same message wherever it happens: an unknown name lists the choices
and names the caller (or the variable); "triton" without Triton, or on a CPU without the interpreter, and "cpu"
without the extension or on another device, say what to do.

This module imports only torch, the standard library and ``_ext`` (Triton is looked up, never imported at module
level; the extension is loaded only when a CPU backend is resolved), so every layer of the package, the kernels
included, may import it.
"""

from __future__ import annotations

import enum
import functools
import os

import torch

from . import _ext
from ._common import warn_once

__all__ = [
    "Backend",
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "validate_backend_name",
    "resolve_backend",
    "interpreting",
    "triton_import_error",
    "cpu_kernels_error",
    "cuda_available",
    "cuda_capability",
    "cuda_shared_optin",
    "cuda_sm_count",
]

BACKEND_ENV_VAR = "FUSED_LORA_BACKEND"


class Backend(str, enum.Enum):
    """The backend names; a ``str`` enum, so ``Backend.TRITON == "triton"``."""

    AUTO = "auto"
    TRITON = "triton"
    CPU = "cpu"
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


# The functions of fused_lora._C that the "cpu" backend calls (an older build of the extension lacks them).
CPU_KERNELS = ("nf4_dequantize_into", "dropout_keep", "dropout_apply_into")


def cpu_kernels_error() -> str | None:
    """None when fused_lora._C has the CPU backend's kernels, else why not and how to fix it. A constant to
    torch.compile: run, not traced (tracing the extension's first import guarded on it not being loaded, and the
    next compiled call recompiled everything)."""
    if not _ext.is_available():
        return f"the compiled extension fused_lora._C is not importable; {_ext.BUILD_COMMAND_HINT}"
    missing = [name for name in CPU_KERNELS if not hasattr(_ext.load(), name)]
    if missing:
        return (f"fused_lora._C is a stale build without {', '.join(missing)}; rebuild it "
                f"({_ext.BUILD_COMMAND_HINT})")
    return None


# torch.compiler.assume_constant_result's mark, set without importing torch._dynamo (and with it Triton) when the
# package is imported
cpu_kernels_error._dynamo_marked_constant = True


def cuda_available() -> bool:
    """torch.cuda.is_available(), False where querying CUDA itself fails (a driver torch cannot use)."""
    try:
        return torch.cuda.is_available()
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[tuple[int, int], int, int]:
    properties = torch.cuda.get_device_properties(index)
    optin = getattr(properties, "shared_memory_per_block_optin", 48 * 1024)
    return (properties.major, properties.minor), properties.multi_processor_count, optin


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_capability(device) -> tuple[int, int]:
    """torch.cuda.get_device_capability(device), asked of CUDA once per device (the launchers ask at every call; a
    device's properties do not change while the process runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.cuda.get_device_capability(device)
    return _cuda_properties(_cuda_index(device))[0]


def cuda_sm_count(device) -> int:
    """The streaming multiprocessors of a CUDA ``device``, asked of CUDA once per device."""
    return _cuda_properties(_cuda_index(torch.device(device)))[1]


def cuda_shared_optin(device) -> int:
    """The most shared memory one block of a CUDA ``device`` may use with the opt-in (bytes), asked once per device."""
    return _cuda_properties(_cuda_index(torch.device(device)))[2]


def parse_device(name: str | None) -> torch.device:
    """The device of a ``--device`` option (the commands' one rule): ``name``, by default the current CUDA device when
    there is one, else the CPU; a CUDA device always with its index. ValueError naming the problem otherwise.

    Example:
        >>> parse_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name or ("cuda" if cuda_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name} is not supported; use cpu or cuda[:index]")
    if device.type == "cuda":
        if not cuda_available():
            raise ValueError(f"--device {name} asked for CUDA, but CUDA is not available here (torch sees no CUDA "
                             "device; run without --device for the CPU)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


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
    """The concrete backend ("triton", "cpu" or "reference") that ``backend`` selects for tensors on ``device``;
    ``caller`` names the public function in warnings and errors.

    Example:
        >>> resolve_backend("auto", torch.device("cpu"))      # without FUSED_LORA_BACKEND set, extension built
        'cpu'
    """
    asked = backend
    backend = requested_backend(backend, caller)
    # an error about a backend the environment chose says so (the caller passed "auto", or nothing)
    from_env = validate_backend_name(asked) == Backend.AUTO and backend != Backend.AUTO
    origin = f" (set by {BACKEND_ENV_VAR}={backend!r})" if from_env else ""
    device = torch.device(device)
    if backend == Backend.AUTO:
        if device.type == "cpu":
            problem = cpu_kernels_error()
            if problem is not None:
                warn_once(f"{caller}: falling back to the reference backend on the CPU because {problem}",
                          key=("cpu-fallback", problem))
                return Backend.REFERENCE.value
            return Backend.CPU.value
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
            raise RuntimeError(f"{caller}: backend='triton'{origin} needs Triton, but {problem}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{caller}: backend='triton'{origin} got {device.type} tensors; the kernels run on CUDA, or on the "
                "CPU only under Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
            )
    if backend == Backend.CPU:
        if device.type != "cpu":
            advice = f"unset {BACKEND_ENV_VAR}" if origin else "use backend='auto'"
            raise RuntimeError(
                f"{caller}: backend='cpu'{origin} got {device.type} tensors; it runs on CPU tensors ({advice}, or "
                "'triton' for CUDA tensors)"
            )
        problem = cpu_kernels_error()
        if problem is not None:
            raise RuntimeError(f"{caller}: backend='cpu'{origin} needs the CPU kernels, but {problem}")
    return backend
