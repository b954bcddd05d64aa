"""Reading a layer's frozen base weight from a state dict, for ``FusedLoraLinear.load_state_dict``.

The base comes either as bitsandbytes' NF4 entries (``P+"weight"`` packed bytes, ``weight.absmax``,
``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4`` and, with double quantization,
``weight.nested_absmax`` and ``weight.nested_quant_map``) or as a dense ``P+"weight"``. Which one is decided by the
keys present, never by guessing from a shape: any NF4 entry makes it an NF4 checkpoint, whose missing entries are
then reported as missing keys (not as a size mismatch of the packed bytes). With ``strict``, every other
``weight.*`` key is unexpected, as torch reports for any other module. The base is converted to the layer's kind: a
dense checkpoint is quantized into an NF4 layer, an NF4 one dequantized into a dense layer.
"""

from __future__ import annotations

import torch

from .nf4 import NF4Weight, quantize_nf4

__all__ = ["NF4_KEYS", "NESTED_KEYS", "read_base"]

NF4_KEYS = ("absmax", "quant_map", "quant_state.bitsandbytes__nf4")  # after "weight."; with "weight" itself
NESTED_KEYS = ("nested_absmax", "nested_quant_map")  # double quantization: both or neither
_NF4_MARKERS = NF4_KEYS + NESTED_KEYS + ("quant_state.bitsandbytes__fp4",)


def read_base(state_dict, prefix: str, *, shape, nf4: NF4Weight | None, dtype, device, strict: bool,
              missing_keys: list, unexpected_keys: list, error_msgs: list):  # fmt: skip
    """The checkpoint's base for a layer of ``shape`` (out, in): an NF4Weight when ``nf4`` (the layer's current
    NF4 base, whose blocksize and double quantization a dense checkpoint is quantized with) is given, else a dense
    tensor in ``dtype`` for the layer's Parameter; None when the checkpoint has no usable base. ``device`` None
    keeps the checkpoint's (a layer on the meta device, loaded with assign=True). Problems go to
    ``missing_keys`` / ``unexpected_keys`` (only with ``strict``, as torch's own modules do; torch's
    load_state_dict always passes strict=True here and raises for them only when its own ``strict`` is True) and
    ``error_msgs`` (always raised).

    Example:
        >>> base = read_base(sd, "q_proj.", shape=(4096, 4096), nf4=layer.weight, dtype=torch.bfloat16,
        ...                  device="cuda", strict=True, missing_keys=[], unexpected_keys=[], error_msgs=[])
    """
    key = prefix + "weight"
    extra = sorted(k for k in state_dict if k.startswith(key + "."))
    if key + ".quant_state.bitsandbytes__fp4" in state_dict:  # always an error: the layer keeps no wrong base
        error_msgs.append(f"could not load {key}: the checkpoint holds bitsandbytes FP4; only NF4 is supported")
        return None
    if any(key + "." + suffix in state_dict for suffix in _NF4_MARKERS):
        nested = [key + "." + s for s in NESTED_KEYS]
        needed = [key] + [key + "." + s for s in NF4_KEYS] + (nested if any(k in state_dict for k in nested) else [])
        absent = [k for k in needed if k not in state_dict]
        if strict:
            unexpected_keys.extend(k for k in extra if k not in needed)
            # a dense layer's weight is a Parameter: torch reports it missing itself
            missing_keys.extend(k for k in absent if k != key or nf4 is not None)
        if absent:
            return None
    else:
        if strict:
            unexpected_keys.extend(extra)
        if key not in state_dict:
            if strict and nf4 is not None:  # a dense layer's weight is a Parameter: torch reports it
                missing_keys.append(key)
            return None
    try:
        if key + ".absmax" in state_dict:
            loaded = NF4Weight.from_state_dict(state_dict, prefix, device=device)
        else:
            loaded = state_dict[key]
            if not isinstance(loaded, torch.Tensor) or not loaded.is_floating_point():
                kind = loaded.dtype if isinstance(loaded, torch.Tensor) else type(loaded).__name__
                raise TypeError(f"a dense weight must be a floating-point tensor, got {kind}")
        if tuple(loaded.shape) != tuple(shape):
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has shape {tuple(loaded.shape)}, "
                f"the FusedLoraLinear expects {tuple(shape)}"
            )
            return None
        if nf4 is not None:
            if isinstance(loaded, NF4Weight):
                return loaded
            dense = loaded.detach() if device is None else loaded.detach().to(device)
            return quantize_nf4(dense, blocksize=nf4.blocksize, double_quant=nf4.double_quant)
        return loaded.dequantize(dtype) if isinstance(loaded, NF4Weight) else loaded
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        error_msgs.append(f"could not load {key}: {error}")
        return None
