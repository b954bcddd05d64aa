"""Lazy loader for the compiled extension ``fused_lora._C`` (managed memory for paged optimizer state, and the
CPU backend's kernels: NF4 dequantization and the dropout mask, used by fused_lora/cpu.py).

``import fused_lora`` never loads the extension. :func:`load` imports it on first use; when it is missing,
:func:`load` returns a stand-in whose every attribute raises an error that says how to build it, so the failure
surfaces only when a paged feature is actually used.

Example::

    from fused_lora import _ext
    if _ext.is_available():
        buf = _ext.load().empty_managed(1024, 0)   # uint8 tensor of 1024 bytes in managed memory
"""

from __future__ import annotations


BUILD_COMMAND_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fused-lora checkout (a C++ compiler is "
    "needed; a CUDA toolkit and a CUDA build of torch give the CUDA version)"
)
_BUILD_HINT = (
    f"{BUILD_COMMAND_HINT}, or use the non-paged optimizers (fused_lora.optim.AdamW8bit, torch.optim.AdamW)"
)

_module = None


class MissingExtension:
    """Stands in for ``fused_lora._C`` when it could not be imported; any use raises with a build hint."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"fused_lora._C.{name} is needed for paged optimizer state, but the compiled extension could not be "
            f"loaded ({self._reason}); {_BUILD_HINT}"
        )


def load():
    """The extension module ``fused_lora._C``, or a :class:`MissingExtension` that raises when used."""
    global _module
    if _module is None:
        try:
            # an import statement, not importlib.import_module: torch.compile traces it (backend "auto" on the CPU
            # asks whether the extension is there while a model is being compiled)
            import fused_lora._C as _module
        except ImportError as error:
            _module = MissingExtension(f"{type(error).__name__}: {error}")
    return _module


def is_available() -> bool:
    """True when ``fused_lora._C`` imports."""
    return not isinstance(load(), MissingExtension)
