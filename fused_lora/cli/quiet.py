"""The one place where the tooling silences third-party notices that every command would otherwise print.

bitsandbytes (0.47 and later), when imported on a CPU with AVX512-BF16, tries to load an optional CPU GEMM from the
Hugging Face hub (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``) and, when the ``kernels``
package is missing or the hub is unreachable, logs at WARNING on the logger ``bitsandbytes.backends.cpu.ops``:

    Failed to load CPU gemm_4bit_forward from kernels-community: ... Please make sure you already `pip install
    kernels` and the kernels >= 0.11.1

Nothing in fused-lora uses that kernel (bitsandbytes falls back to its own CPU code, and fused-lora's CPU path is
its reference backend), and the logger has no handler, so Python's last-resort handler writes the line to stderr
on every ``demo``, ``info``, ``check`` and ``bench``. ``quiet_third_party_notices`` attaches a logging filter for
exactly that message to exactly that logger; every other bitsandbytes message still shows. It does not touch
bitsandbytes itself. ``fused_lora/__main__.py`` calls it once before dispatching a command.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_third_party_notices", "BNB_CPU_LOGGER", "BNB_CPU_NOTICE"]

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    """Drops the records whose unformatted message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party_notices() -> None:
    """Hide bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (see the module
    docstring). Call it before bitsandbytes is imported (the warning comes at import); calling it again is a no-op.

    Example:
        >>> quiet_third_party_notices()
        >>> logging.getLogger(BNB_CPU_LOGGER).warning(BNB_CPU_NOTICE + ": no module named 'kernels'")  # prints nothing
    """
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.prefix == BNB_CPU_NOTICE for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_CPU_NOTICE))
