"""fused-lora: fused Triton kernels for LoRA / QLoRA over NF4 weights, and paged optimizer state.

``import fused_lora`` never initialises CUDA, compiles anything or loads the compiled extension: Triton kernels,
bitsandbytes, PEFT and ``fused_lora._C`` are imported lazily, when a feature that needs them is used.
"""

from . import functional, reference
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .modules import FusedLoraLinear
from .peft import apply_fused_lora, patch_peft_model

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "FusedLoraLinear",
    "functional",
    "reference",
    "patch_peft_model",
    "apply_fused_lora",
    "optim",
    "__version__",
]


def __getattr__(name):
    # fused_lora.optim pulls in the paged-state machinery; load it on first use.
    if name == "optim":
        import importlib

        return importlib.import_module(".optim", __name__)
    raise AttributeError(f"module 'fused_lora' has no attribute {name!r}")
