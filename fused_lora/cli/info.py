"""``python -m fused_lora info``: which backends this machine has, and why any is missing.

One line per component: CUDA (device name and capability), Triton (version, interpreter mode), the compiled
extension ``fused_lora._C`` (paged optimizer state), bitsandbytes, PEFT, Transformers, and the backend that
``backend="auto"`` picks for CUDA and CPU tensors. ``--json`` prints the same as a JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import warnings

import torch

from .. import __version__, _ext
from ..backend import BACKEND_ENV_VAR, cuda_available, interpreting, resolve_backend


def _import_error(error: BaseException) -> str:
    return f"not importable ({type(error).__name__}: {error})"


def cuda_status() -> dict:
    """{"available": bool, "detail": str}: the devices torch sees, or why there are none (or why they cannot be
    queried).

    Example:
        >>> cuda_status()     # a CPU build of torch
        {'available': False, 'detail': 'torch 2.13.0+cpu is a build without CUDA'}
    """
    if torch.version.cuda is None:
        return {"available": False, "detail": f"torch {torch.__version__} is a build without CUDA"}
    if not cuda_available():
        detail = f"torch built for CUDA {torch.version.cuda}, but no CUDA device is visible"
        return {"available": False, "detail": detail}
    devices = []
    try:
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            memory_gib = torch.cuda.get_device_properties(index).total_memory / 2**30
            devices.append(
                f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor}, {memory_gib:.0f} GiB)"
            )
    except (RuntimeError, AssertionError) as error:
        detail = f"torch built for CUDA {torch.version.cuda} sees a device but cannot query it ({error})"
        return {"available": False, "detail": detail}
    return {"available": True, "detail": f"CUDA {torch.version.cuda}; " + "; ".join(devices)}


def triton_status() -> dict:
    """{"available": bool, "detail": str}: Triton's version and whether its CPU interpreter is on.

    Example:
        >>> triton_status()["detail"]
        '3.9.0, compiled kernels (needs a CUDA device; set TRITON_INTERPRET=1 before import to run on the CPU)'
    """
    try:
        import triton
    except Exception as error:  # a broken install can raise more than ImportError
        return {"available": False, "detail": _import_error(error)}
    mode = (
        "CPU interpreter on (TRITON_INTERPRET=1)"
        if interpreting()
        else "compiled kernels (needs a CUDA device; set TRITON_INTERPRET=1 before import to run on the CPU)"
    )
    return {"available": True, "detail": f"{triton.__version__}, {mode}"}


def extension_status() -> dict:
    """{"available": bool, "detail": str}: whether ``fused_lora._C`` loads, its build, or why it is missing.

    Example:
        >>> extension_status()["available"]     # after `pip install --no-build-isolation -e .`
        True
    """
    module = _ext.load()
    if not _ext.is_available():
        return {"available": False, "detail": f"missing: {module._reason}"}
    try:
        build = "CUDA managed memory" if module.is_cuda_build() else "host-memory C++ build (no CUDA)"
    except Exception as error:  # a stale or foreign build: anything it raises says why it is unusable
        detail = f"{module.__file__} is not a usable build ({type(error).__name__}: {error}); rebuild it"
        return {"available": False, "detail": detail}
    return {"available": True, "detail": f"loaded from {module.__file__} ({build})"}


def package_status(name: str) -> dict:
    """{"available": bool, "detail": str}: a Python package's version, or why it does not import.

    Example:
        >>> package_status("peft")
        {'available': True, 'detail': '0.21.2'}
    """
    try:
        module = importlib.import_module(name)
    except Exception as error:
        return {"available": False, "detail": _import_error(error)}
    return {"available": True, "detail": getattr(module, "__version__", "version unknown")}


def auto_backend() -> dict:
    """The backend that ``backend="auto"`` resolves to for CUDA tensors and for CPU tensors.

    Returns {"cuda": str, "cpu": str, "override": str or None}: a backend name, or "error: ..." when the choice is
    unusable (e.g. a bad ``FUSED_LORA_BACKEND``); "override" is the environment setting, if any.

    Example:
        >>> auto_backend()      # on a CPU-only machine with Triton and the extension installed, no override
        {'cuda': 'triton', 'cpu': 'cpu', 'override': None}
    """
    choice = {}
    for device_type in ("cuda", "cpu"):
        try:
            with warnings.catch_warnings():
                # "falling back to the reference backend because Triton is missing": the Triton line says so
                warnings.simplefilter("ignore", RuntimeWarning)
                choice[device_type] = resolve_backend("auto", torch.device(device_type), caller="info")
        except (RuntimeError, ValueError) as error:
            choice[device_type] = f"error: {error}"
    override = os.environ.get(BACKEND_ENV_VAR)
    choice["override"] = f"{BACKEND_ENV_VAR}={override}" if override else None
    return choice


def collect() -> dict:
    """Everything ``info`` prints, as a dict (also what ``--json`` writes): versions, and a status dict (see
    ``cuda_status``) per component under "cuda", "triton", "extension", "bitsandbytes", "peft", "transformers".

    Example:
        >>> collect()["auto_backend"]["cpu"]
        'cpu'
    """
    return {
        "fused_lora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": cuda_status(),
        "triton": triton_status(),
        "extension": extension_status(),
        "bitsandbytes": package_status("bitsandbytes"),
        "peft": package_status("peft"),
        "transformers": package_status("transformers"),
        "auto_backend": auto_backend(),
    }


def _format(report: dict) -> str:
    def line(label, status):
        mark = "yes" if status["available"] else "no "
        return f"  {label:<14} {mark}  {status['detail']}"

    backend = report["auto_backend"]
    cuda_note = "" if report["cuda"]["available"] else " (no CUDA device here)"
    override = f"; overridden by {backend['override']}" if backend["override"] else ""
    if backend["cuda"] == backend["cpu"] and backend["cpu"].startswith("error: "):
        auto_line = f'  backend "auto": {backend["cpu"]}{override}'
    else:
        auto_line = (f'  backend "auto": {backend["cuda"]} for CUDA tensors{cuda_note}, {backend["cpu"]} for CPU '
                     f"tensors{override}")
    lines = [
        f"fused-lora {report['fused_lora']}  (python {report['python']}, torch {report['torch']})",
        line("CUDA", report["cuda"]),
        line("Triton", report["triton"]),
        line("extension _C", report["extension"]),
        line("bitsandbytes", report["bitsandbytes"]),
        line("peft", report["peft"]),
        line("transformers", report["transformers"]),
        auto_line,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for JSON); returns 0. ``argv`` as after ``python -m fused_lora info``.

    Example:
        >>> main(["--json"])      # prints the JSON object of ``collect()``
        0
    """
    parser = argparse.ArgumentParser(prog="python -m fused_lora info", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0
