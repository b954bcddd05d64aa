"""Small rules every layer of the package shares, each defined once: dtype names, the dtypes the layer functions
accept, the dtypes an adapter or bias may take beside x, warn-once, and a cache of values derived from a tensor.

This module imports only torch and the standard library; every other module of the package may import it.
"""

from __future__ import annotations

import warnings
import weakref

import torch

__all__ = ["COMPUTE_DTYPES", "TensorCache", "adapter_operand", "adapter_operand_dtype", "cuda_graph_capturing",
           "dtype_name", "dtype_names", "flush_deferred_warnings", "refuse_dropout_in_cuda_graph", "side_dtypes",
           "tensor_state", "warn_once"]

# The dtypes of x (and of a dense frozen W) that the layer functions accept; fp64 runs on the reference and CPU
# backends (not the Triton kernels).
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

_warned: set = set()
_deferred: dict = {}  # warn_once while torch.compile traced: key -> (message, category), issued at run time


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``; also the spelling bitsandbytes writes into its quant state.

    Example:
        >>> dtype_name(torch.float16)
        'float16'
    """
    return str(dtype).removeprefix("torch.")


def dtype_names(values, sep: str = ", ") -> str:
    """Dtypes (or other values) as a readable list for messages: ``"float32, float16"``.

    Example:
        >>> dtype_names((torch.float32, 64))
        'float32, 64'
    """
    return sep.join(dtype_name(v) if isinstance(v, torch.dtype) else str(v) for v in values)


def side_dtypes(x_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes an adapter (lora_A, lora_B) or the bias may have beside an x of ``x_dtype``: x's own dtype or
    fp32 (PEFT keeps adapters in fp32; accumulation is always at least fp32), and only fp64 beside fp64.

    Example:
        >>> side_dtypes(torch.bfloat16)
        (torch.bfloat16, torch.float32)
    """
    if x_dtype == torch.float64:
        return (torch.float64,)
    return tuple(dict.fromkeys((x_dtype, torch.float32)))


def adapter_operand_dtype(dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype in which an adapter tensor (lora_A, lora_B, a DoRA magnitude) of ``dtype`` reaches the layer
    functions beside x in ``compute_dtype``: its own when in side_dtypes, else fp32 where x takes fp32 beside it:
    for another 16-bit dtype exactly (e.g. TRL casts a QLoRA model's adapters to bf16 whatever its 4-bit compute
    dtype; the low-rank path accumulates in fp32 and the gradient is rounded back to the adapter's dtype), for fp64
    adapters at fp32 precision (not rounded to a 16-bit compute dtype); else None (fp32 or 16-bit adapters beside
    fp64 x: the layer functions cannot take them)."""
    allowed = side_dtypes(compute_dtype)
    if dtype in allowed:
        return dtype
    if dtype.is_floating_point and torch.float32 in allowed:
        return torch.float32
    return None


def adapter_operand(t: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in adapter_operand_dtype (``t`` itself when that is its dtype), or None."""
    dtype = adapter_operand_dtype(t.dtype, compute_dtype)
    return None if dtype is None else t.to(dtype)


def warn_once(message: str, category: type[Warning] = RuntimeWarning, key=None, stacklevel: int = 3) -> None:
    """Warn with ``message`` the first time ``key`` (default: the message itself) is seen in this process.

    The key is marked after the warning is issued: with warnings turned into errors, every call raises. While
    torch.compile traces, warnings.warn cannot be traced (fullgraph would fail, otherwise the graph would break), so
    the warning is kept and issued when the compiled code next runs a fused-lora custom op (flush_deferred_warnings).

    Example:
        >>> warn_once("lora_linear: the Triton kernels do not support r=300; using the reference backend")
    """
    key = message if key is None else key
    if torch.compiler.is_compiling():  # written, not read: the compiled code installs no guard on what was warned
        _deferred[key] = (message, category)
        return
    if key in _warned:
        return
    warnings.warn(message, category, stacklevel=stacklevel)
    _warned.add(key)


def flush_deferred_warnings() -> None:
    """Issue the warnings warn_once kept while torch.compile traced (each once); the custom ops call it first."""
    while _deferred:
        key, (message, category) = _deferred.popitem()
        warn_once(message, category, key, stacklevel=4)


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA). Work captured is not run until the
    graph replays, and its outputs live in the graph's memory pool: a value computed during capture (the first call
    of a layer inside torch.cuda.graph without a warm-up) must not be cached (TensorCache), and the host's work runs
    once for all replays (refuse_dropout_in_cuda_graph)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_dropout_in_cuda_graph(p: float) -> None:
    """Raise when dropout (p > 0) would be captured in a CUDA graph: the seed of its mask is drawn on the host at
    each call, so every replay of the graph would reuse the captured step's mask (training silently wrong)."""
    if p > 0.0 and cuda_graph_capturing():
        raise RuntimeError(
            f"fused_lora: LoRA dropout (p={p}) inside a CUDA graph capture: every replay would reuse the mask of the "
            "captured step, because the dropout seed is drawn on the host. Set the LoRA dropout to 0 for graphed "
            "training, or run without CUDA graphs (torch.compile mode='default' instead of 'reduce-overhead')"
        )


class TensorCache:
    """Values derived from a tensor while it lives, keyed on the tensor's identity and a signature of its state
    (tensor_state). Keyed on a tensor rather than an NF4Weight: the custom ops (functional.py) rebuild the NF4Weight
    around the same tensors at every call, so a weight-keyed cache would never hit there."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, anchor: torch.Tensor, signature, compute):
        """compute(), cached while ``anchor`` lives and ``signature`` (a function of the tensors' state, e.g.
        tensor_state's) holds; not cached when ``signature`` is None (an inference tensor). While a CUDA graph is
        being captured (``cuda_graph_capturing``) a value cached before (a warm-up call) is used, and one computed
        then is not kept: the graph computes it at each replay."""
        if signature is None:
            return compute()
        ident = id(anchor)
        entry = self._entries.get(ident)
        if entry is not None and entry[0]() is anchor and entry[1] == signature:
            return entry[2]
        value = compute()
        if cuda_graph_capturing():
            return value
        if value is anchor:  # nothing derived (e.g. the absmax of an NF4 weight without double quantization): a
            return value  # cached anchor would never die
        entries = self._entries
        entries[ident] = (weakref.ref(anchor, lambda _, ident=ident: entries.pop(ident, None)), signature, value)
        return value


def tensor_state(*tensors) -> tuple | None:
    """(address, version, device) of each tensor (None kept); None for an inference tensor (it has no version
    counter: nothing to key a cache on)."""
    try:
        return tuple((t.data_ptr(), t._version, t.device) if t is not None else None for t in tensors)
    except RuntimeError:
        return None
