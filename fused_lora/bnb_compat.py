"""What fused-lora relies on about bitsandbytes beyond its tensors, in one place: the non-tensor quant-state fields of
its NF4 state dicts (read and checked here for ``NF4Weight.from_state_dict``), where bitsandbytes' own CPU
``dequantize_4bit`` is wrong (``bnb_cpu_dequantize_is_wrong``, used by the tests and the demo's parity check), and
how to keep its CPU inference repack off a model that serves as the exact reference (``keep_bnb_cpu_layout``).

This module imports only torch and the standard library (it sits beside codec.py, below nf4.py), and never imports
bitsandbytes.
"""

from __future__ import annotations

import functools
import json
import math

import torch

from ._common import dtype_name
from .codec import BLOCKSIZE as NESTED_BLOCKSIZE

__all__ = ["quant_state_fields", "check_finite", "cpu_has_avx512f", "bnb_cpu_dequantize_is_wrong"]

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quant_state_fields(raw, who: str, key: str, double_quant: bool) -> dict:
    """The non-tensor fields of bitsandbytes' quant state, checked, as NF4Weight arguments: shape, dtype, blocksize,
    nested_blocksize and, with double quantization, offset (a float).

    ``raw`` is the state dict's ``weight.quant_state.bitsandbytes__nf4`` tensor (UTF-8 JSON as uint8), stored under
    ``key``; ``who`` names the caller in errors. Every problem is a ValueError naming the key and the field.

    Example:
        >>> quant_state_fields(sd["weight.quant_state.bitsandbytes__nf4"], "load", "weight.quant_state...", True)
        {'shape': [37, 129], 'dtype': torch.float32, 'blocksize': 64, 'nested_blocksize': 256, 'offset': 0.51}
    """
    try:
        fields = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{who}: {key} is not bitsandbytes' quant state (UTF-8 JSON as uint8): {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{who}: {key} holds {type(fields).__name__} JSON, not bitsandbytes' quant-state object")
    if fields.get("quant_type") != "nf4":
        raise ValueError(f"{who}: quant_type is {fields.get('quant_type')!r}; only 'nf4' is supported")
    required = ("shape", "dtype", "blocksize") + (("nested_offset",) if double_quant else ())
    missing = [name for name in required if name not in fields]
    if missing:
        raise ValueError(f"{who}: the quant state in {key} has no {', '.join(missing)}")
    names = {dtype_name(d): d for d in _INPUT_DTYPES}
    if fields["dtype"] not in names:
        raise ValueError(f"{who}: the quant state's dtype {fields['dtype']!r} is not one of {', '.join(names)}")
    out = dict(shape=fields["shape"], dtype=names[fields["dtype"]], blocksize=fields["blocksize"],
               nested_blocksize=fields.get("nested_blocksize", NESTED_BLOCKSIZE))  # fmt: skip
    if double_quant:
        offset = fields["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"{who}: the quant state's nested_offset is {offset!r}; it must be a finite number "
                             "(it is added to every block scale)")  # fmt: skip
        out["offset"] = float(offset)
    return out


def check_finite(who: str, name: str, t: torch.Tensor) -> None:
    """ValueError when a floating-point tensor of an NF4 weight (a code table or scales) holds NaN or inf."""
    if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{who}: {name} holds NaN or inf; every weight element it scales would be NaN")


def keep_bnb_cpu_layout(model) -> int:
    """Keep bitsandbytes from repacking the NF4 weights of ``model``'s ``Linear4bit`` layers for its CPU inference
    kernel; returns how many layers it set. bitsandbytes 0.50 does so, in place, at a layer's first forward in eval
    mode whose input does not require grad, on CPUs with AVX512-BF16 (``support_avx512bf16_for_cpu``): the codes
    in tiles of 32 rows and the block scales rounded to bf16, which its bf16 kernel then multiplies, so its output
    is no longer dequantize + matmul of the weight it was given (about 1e-3 relative on a tiny Llama, 5e-2 on
    logits through DoRA). The demo's PEFT side and the tests' bitsandbytes references need the exact computation
    on every CPU. fused-lora's own layers read a repacked weight too (NF4Weight.from_bnb), with its bf16 scales.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


@functools.lru_cache(maxsize=None)
def cpu_has_avx512f() -> bool:
    """Whether this CPU has AVX-512F, the feature bitsandbytes' CPU library checks (cpuid) before its AVX-512
    kernels; read from /proc/cpuinfo, else from torch's CPU capability."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def bnb_cpu_dequantize_is_wrong(shape, blocksize: int, avx512f: bool | None = None,
                                torch_avx512: bool | None = None) -> bool:
    """Whether bitsandbytes 0.50.2's CPU ``dequantize_4bit`` returns wrong values for an NF4 weight of ``shape``
    quantized in blocks of ``blocksize`` (our dequantization is right there: it is bitsandbytes' format).

    Its AVX-512 kernel (``dequantizeBlockwise4bitCpu``, taken when the CPU has AVX-512F, the last dimension
    ``cols`` is a multiple of 16 and the Python side does not fall back to PyTorch: odd ``cols``, or blocksize >= 2048
    with torch's AVX512 capability) scales row ``r``, columns ``c .. c+15`` by absmax[r·(cols // blocksize) +
    c // blocksize]. That is the right block only when the blocks start at every row, i.e. ``cols % blocksize == 0``;
    otherwise every row after the first that reaches another block is scaled by the wrong absmax (e.g. cols = 160
    or 32 with the default blocksize 64, several rows). Read from the library's disassembly; without AVX-512F the
    scalar kernel runs and is right. ``avx512f`` overrides the CPU check and ``torch_avx512`` torch's capability
    (for tests: a CPU with AVX-512F whose torch runs at AVX2, e.g. under ATEN_CPU_CAPABILITY=avx2, takes the native
    kernel at every blocksize).

    Example:
        >>> bnb_cpu_dequantize_is_wrong((37, 160), 64, avx512f=True), bnb_cpu_dequantize_is_wrong((37, 128), 64, True)
        (True, False)
    """
    shape = tuple(int(d) for d in shape)
    if avx512f is None:
        avx512f = cpu_has_avx512f()
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if torch_avx512 is None:
        torch_avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    python_fallback = cols % 2 != 0 or (blocksize >= 2048 and torch_avx512)  # bitsandbytes' own rule
    if not avx512f or python_fallback or cols % 16 != 0 or cols % blocksize == 0:
        return False
    return rows >= 2 and rows * cols - 16 >= blocksize
