"""NF4 weights, byte for byte compatible with bitsandbytes (``quantize_4bit(..., quant_type="nf4")``).

Format of an ``NF4Weight`` holding a weight of ``shape`` (n = shape.numel() elements, flattened row-major):

    packed        uint8 [(n + 1) // 2, 1]   two 4-bit code indices per byte; element 2p in the HIGH nibble of byte
                                             p, element 2p+1 in the low nibble (a missing last element is code 7, 0.0)
    code          float32 [16]               the NF4 table (bitsandbytes' ``get_4bit_type("nf4")``), sorted
    blocksize     int                        one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (default 64)
    absmax        float32 [n_blocks]         per-block max |w|, n_blocks = ceil(n / blocksize)     (no double quant)
                  uint8 [n_blocks]           8-bit codes of absmax − offset                          (double quant)
    offset        float32 []                 mean(absmax)                                             (double quant)
    nested_absmax float32 [ceil(n_blocks / 256)]  per-256-block max |absmax − offset|                (double quant)
    nested_code   float32 [256]              bitsandbytes' signed 8-bit dynamic map                  (double quant)

Quantization, per block b (float32 throughout; bf16/fp16 weights are widened first):
    r = w · fl(1 / absmax[b])  (w / absmax[b] in the last block when blocksize does not divide n; 0 if absmax is 0)
    r = clamp(r, −1, 1);  q = #{ i < 15 : r > (code[i] + code[i+1]) / 2 }        (strict >)
Double quantization of a = absmax − offset: bitsandbytes' 8-bit blockwise codec (``fused_lora.codec``, the signed
dynamic map, blocks of 256), whose arithmetic and index rule are written down there; a block whose nested_absmax is
0 gets codes 0.
Dequantization:
    s = absmax[b]  or  fl(fl(nested_code[absmax_q[b]] · nested_absmax[b // 256]) + offset)   (``absmax_fp32()``)
    w' = fl32(code[q] · s), then rounded once to the output dtype.

State dicts use bitsandbytes' ``Linear4bit`` key names (module prefix P): ``P+"weight"``, ``P+"weight.absmax"``,
``P+"weight.quant_map"``, ``P+"weight.nested_absmax"``, ``P+"weight.nested_quant_map"`` and
``P+"weight.quant_state.bitsandbytes__nf4"`` (a uint8 tensor holding the UTF-8 JSON of the non-tensor fields).

Backends: "reference" is plain PyTorch (any device), "triton" the kernels in fused_lora/kernels/nf4.py (CUDA, or
the CPU under TRITON_INTERPRET=1), "cpu" the C++ dequantizer of fused_lora/cpu.py (vectorised, threaded; the
quantizer runs the reference code), "auto" picks Triton for CUDA tensors and "cpu" for CPU tensors
(fused_lora/backend.py); FUSED_LORA_BACKEND overrides "auto".
The double quantization of the (small) absmax vector runs in PyTorch on the weight's device, except
offset = mean(absmax), which is taken on the CPU so that the bytes never depend on the device. Every output is
byte-exact with bitsandbytes' CPU implementation (bitsandbytes' own CUDA kernels may differ in rare last bits).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping

import torch

from ._common import dtype_name, dtype_names
from .backend import resolve_backend
from .bnb_compat import bnb_cpu_dequantize_is_wrong, check_finite, quant_state_fields
from .codec import dequantize_blockwise, dynamic_lut, dynamic_map, quantize_blockwise

__all__ = ["NF4Weight", "quantize_nf4", "dequantize_nf4", "NF4_CODE", "BLOCKSIZES", "bnb_cpu_dequantize_is_wrong"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"

# The NF4 data type (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], as float32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _tables:
        _tables[key] = build().to(device)
    return _tables[key]


def nf4_code(device="cpu") -> torch.Tensor:
    """The 16 NF4 values, float32 [16], sorted (a fresh copy)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _nf4_bounds(device) -> torch.Tensor:
    """Midpoints between consecutive NF4 values, float32 [15]."""

    def build():
        code = nf4_code()
        return (code[:-1] + code[1:]) / 2

    return _cached("nf4_bounds", device, build)


def dynamic_code(device="cpu") -> torch.Tensor:
    """The nested code of double quantization: bitsandbytes' signed 8-bit dynamic map, float32 [256], sorted
    (``fused_lora.codec.dynamic_map(signed=True)``)."""
    return dynamic_map(signed=True, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch twin of the kernels (any device); the oracle in tests.


def _quantize_reference(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] float → packed uint8 [(n + 1) // 2, 1], absmax float32 [n_blocks]."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat.float(), (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    if n % blocksize:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    scaled = scaled.clamp_(-1, 1).view(-1)[: 2 * ((n + 1) // 2)]
    q = torch.searchsorted(_nf4_bounds(flat.device), scaled, side="left").to(torch.uint8).view(-1, 2)
    return ((q[:, 0] << 4) | q[:, 1]).unsqueeze(1), absmax


def _absmax_from_nested(absmax_q, nested_absmax, nested_code, offset, blocksize: int = NESTED_BLOCKSIZE):
    """float32 [n_blocks]: fl(fl(nested_code[absmax_q] · nested_absmax[b // 256]) + offset)."""
    return dequantize_blockwise(absmax_q, nested_absmax, nested_code, blocksize) + offset


def _dequantize_reference(packed, absmax32, code, n: int, blocksize: int, dtype) -> torch.Tensor:
    """packed uint8 [(n + 1) // 2, 1] → [n] of ``dtype`` via fl32(code[q] · absmax) and one rounding."""
    flat = packed.view(-1)
    q = torch.stack((flat >> 4, flat & 0xF), dim=1).view(-1)
    n_blocks = absmax32.numel()
    q = torch.nn.functional.pad(q, (0, n_blocks * blocksize - q.numel()))[: n_blocks * blocksize]
    values = code[q.long()].view(n_blocks, blocksize) * absmax32.unsqueeze(1)
    return values.view(-1)[:n].to(dtype)


# ----------------------------------------------------------------------------------------------------------------


def _check_blocksize(who: str, blocksize) -> int:
    """``blocksize`` as a Python int (NumPy and other integers are accepted), or a ValueError naming the choices."""
    integer = isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool)
    if not integer or int(blocksize) not in BLOCKSIZES:
        shown = int(blocksize) if integer else repr(blocksize)
        raise ValueError(f"{who}: blocksize {shown} is not supported; bitsandbytes accepts {dtype_names(BLOCKSIZES)}")
    return int(blocksize)


def _check_shape(who: str, shape) -> torch.Size:
    """``shape`` (a sequence of integers >= 0) as a torch.Size, or a TypeError naming it."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__") or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TypeError(f"{who}: shape must be a sequence of integers >= 0, got {shape!r}")
    return torch.Size(int(d) for d in shape)


class NF4Weight:
    """A frozen weight in bitsandbytes' NF4 format (see the module docstring for the exact layout).

    Attributes: packed, shape, dtype, blocksize, code, absmax, offset, nested_absmax, nested_code,
    nested_blocksize. Build one with ``quantize_nf4``, ``NF4Weight.from_bnb`` or ``NF4Weight.from_state_dict``.

    Example:
        >>> w = quantize_nf4(torch.randn(37, 129))
        >>> w.dequantize().shape, w.packed.shape, w.absmax.dtype
        (torch.Size([37, 129]), torch.Size([2387, 1]), torch.uint8)
    """

    def __init__(
        self,
        packed: torch.Tensor,
        shape,
        dtype: torch.dtype,
        blocksize: int,
        code: torch.Tensor,
        absmax: torch.Tensor,
        offset: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        nested_blocksize: int = NESTED_BLOCKSIZE,
    ):
        self.packed = packed
        self.shape = _check_shape("NF4Weight", shape)
        self.dtype = dtype
        self.blocksize = _check_blocksize("NF4Weight", blocksize)
        self.code = code
        self.absmax = absmax
        self.offset = offset
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_blocksize = nested_blocksize
        self._validate()

    def _validate(self) -> None:
        who = "NF4Weight"
        for name in ("packed", "code", "absmax", "offset", "nested_absmax", "nested_code"):
            value = getattr(self, name)
            required = name in ("packed", "code", "absmax")
            if (value is not None or required) and not isinstance(value, torch.Tensor):
                raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(value).__name__}")
        nested = self.nested_blocksize
        if isinstance(nested, bool) or not isinstance(nested, numbers.Integral) or nested < 1:
            raise ValueError(f"{who}: nested_blocksize must be an integer >= 1, got {nested!r}")
        self.nested_blocksize = int(nested)
        n = self.shape.numel()
        if n == 0:
            raise ValueError(f"{who}: shape {tuple(self.shape)} has no elements")
        if self.dtype not in INPUT_DTYPES:
            raise TypeError(f"{who}: dtype must be one of {dtype_names(INPUT_DTYPES)}, got {self.dtype!r}")
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != ((n + 1) // 2, 1):
            raise ValueError(
                f"{who}: packed must be uint8 of shape ({(n + 1) // 2}, 1) for {n} elements, "
                f"got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        if self.code.dtype != torch.float32 or self.code.shape != (16,):
            raise ValueError(f"{who}: code must be float32 [16], got {self.code.dtype} {tuple(self.code.shape)}")
        n_blocks = -(-n // self.blocksize)
        nested = (self.offset, self.nested_absmax, self.nested_code)
        if any(t is None for t in nested) and not all(t is None for t in nested):
            raise ValueError(f"{who}: offset, nested_absmax and nested_code must be given together or not at all")
        absmax_dtype = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != absmax_dtype or self.absmax.shape != (n_blocks,):
            raise ValueError(
                f"{who}: absmax must be {dtype_name(absmax_dtype)} [{n_blocks}] for {n} elements in blocks of "
                f"{self.blocksize}, got {self.absmax.dtype} {tuple(self.absmax.shape)}"
            )
        if self.double_quant:
            n_nested = -(-n_blocks // self.nested_blocksize)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.shape != (n_nested,):
                raise ValueError(
                    f"{who}: nested_absmax must be float32 [{n_nested}], got "
                    f"{self.nested_absmax.dtype} {tuple(self.nested_absmax.shape)}"
                )
            if self.nested_code.dtype != torch.float32 or self.nested_code.shape != (256,):
                raise ValueError(f"{who}: nested_code must be float32 [256], got {tuple(self.nested_code.shape)}")
            if self.offset.dtype != torch.float32 or self.offset.dim() != 0:
                raise ValueError(f"{who}: offset must be a 0-d float32 tensor, got {tuple(self.offset.shape)}")
        devices = {t.device for t in self._tensors().values()}
        if len(devices) > 1:
            raise ValueError(f"{who}: all tensors must be on one device, got {sorted(map(str, devices))}")

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "code", "absmax", "offset", "nested_absmax", "nested_code")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={dtype_name(self.dtype)}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scale, float32 [n_blocks], as bitsandbytes dequantizes it (with double quant:
        fl(fl(nested_code[absmax[b]] · nested_absmax[b // 256]) + offset))."""
        if not self.double_quant:
            return self.absmax
        return _absmax_from_nested(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        """The weight in ``dtype`` (default: the original dtype), original shape; see ``dequantize_nf4``."""
        return dequantize_nf4(self, dtype, backend=backend)

    def to(self, device) -> "NF4Weight":
        """A new NF4Weight with every tensor on ``device`` (dtypes never change).

        Example:
            >>> quantize_nf4(torch.randn(8, 8)).to("cuda").packed.device.type
            'cuda'
        """
        if isinstance(device, torch.dtype):
            raise TypeError(
                f"NF4Weight.to: got the dtype {device}; an NF4Weight only moves between devices and its packed "
                "format never changes dtype (dequantize(dtype) returns a dense copy)"
            )
        try:
            device = torch.device(device) if isinstance(device, str) else device
        except RuntimeError as error:
            raise ValueError(f"NF4Weight.to: {device!r} is not a device ({error})") from None
        return self._with_tensors(lambda t: t.to(device))

    def clone(self) -> "NF4Weight":
        """A new NF4Weight with a copy of every tensor (the same device and dtypes)."""
        return self._with_tensors(torch.Tensor.clone)

    def _with_tensors(self, convert) -> "NF4Weight":
        """A new NF4Weight of the same format with ``convert(t)`` for every tensor t (to, clone)."""
        return NF4Weight(
            shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, nested_blocksize=self.nested_blocksize,
            **{name: convert(t) for name, t in self._tensors().items()},
        )

    # ---- bitsandbytes interop -----------------------------------------------------------------------------

    def to_bnb(self):
        """(packed, bitsandbytes.functional.QuantState) sharing this weight's tensors (no copy).

        Example:
            >>> packed, state = quantize_nf4(torch.randn(64, 64)).to_bnb()
            >>> bitsandbytes.functional.dequantize_4bit(packed, state).shape
            torch.Size([64, 64])
        """
        from bitsandbytes.functional import QuantState

        nested = None
        if self.double_quant:
            nested = QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize,
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize, quant_type="nf4",
            dtype=self.dtype, offset=self.offset, state2=nested,
        )
        return self.packed, state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' packed weight and QuantState without requantizing; the tensors are shared.

        ``packed`` may use another quant_storage dtype (e.g. bfloat16); it is viewed as uint8.

        Example:
            >>> packed, state = bitsandbytes.functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
            >>> NF4Weight.from_bnb(packed, state).packed.data_ptr() == packed.data_ptr()
            True
        """
        who = "NF4Weight.from_bnb"
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"{who}: packed must be the packed weight tensor, got {type(packed).__name__}")
        if not all(hasattr(quant_state, a) for a in ("quant_type", "absmax", "shape", "code", "blocksize", "nested")):
            raise TypeError(
                f"{who}: quant_state must be a bitsandbytes.functional.QuantState (a Linear4bit's "
                f"weight.quant_state), got {type(quant_state).__name__}"
            )
        if quant_state.quant_type != "nf4":
            raise ValueError(f"{who}: quant_type is {quant_state.quant_type!r}; only 'nf4' is supported")
        if quant_state.nested and (getattr(quant_state, "state2", None) is None or quant_state.offset is None):
            raise ValueError(f"{who}: the QuantState is nested (double quantization) but has no state2 or offset")
        if quant_state.nested and not torch.compiler.is_compiling():
            check_finite(who, "the QuantState's offset", quant_state.offset)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        if getattr(quant_state, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_packing(packed, quant_state)
        packed = packed.view(-1, 1)
        nested = quant_state.state2 if quant_state.nested else None
        return cls(
            packed=packed,
            shape=quant_state.shape,
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            code=quant_state.code,
            absmax=quant_state.absmax,
            offset=quant_state.offset if nested is not None else None,
            nested_absmax=nested.absmax if nested is not None else None,
            nested_code=nested.code if nested is not None else None,
            nested_blocksize=nested.blocksize if nested is not None else NESTED_BLOCKSIZE,
        )

    @classmethod
    def _from_bnb_cpu_packing(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Read a weight that bitsandbytes repacked for its CPU inference kernel (``packing_format_for_cpu``: an
        eval, no-grad forward of a Linear4bit on a CPU with AVX512-BF16) back into the canonical layout, without
        changing the layer. The repack keeps every 4-bit code but stores them as [N, K/2] in tiles of 32 rows and
        replaces the (double-quantized) absmax by its bf16 rounding, transposed to [K/blocksize, N]; the result has
        those bf16 scales as float32 absmax, no double quantization, and new tensors (nothing is shared)."""
        n_rows, n_cols = quant_state.shape
        tile = 32  # bitsandbytes' block_n
        low_high = packed.reshape(-1, tile)
        q = torch.cat((low_high & 0xF, low_high >> 4), dim=-1)  # the codes of 32 rows x 2 columns
        q = q.reshape(n_rows // tile, n_cols // 2, tile, 2).transpose(1, 2).reshape(-1, 2)
        canonical = ((q[:, 0] << 4) | q[:, 1]).reshape(-1, 1)
        absmax = quant_state.absmax.t().reshape(-1).to(torch.float32)
        return cls(
            packed=canonical, shape=quant_state.shape, dtype=getattr(quant_state, "original_dtype", quant_state.dtype),
            blocksize=quant_state.blocksize, code=quant_state.code, absmax=absmax,
        )

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The entries bitsandbytes' ``Linear4bit`` writes for its weight, under module prefix ``prefix``.

        Example:
            >>> sorted(quantize_nf4(torch.randn(8, 8)).state_dict("layer."))[:2]
            ['layer.weight', 'layer.weight.absmax']
        """
        fields = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        entries = {"weight": self.packed, "weight.absmax": self.absmax, "weight.quant_map": self.code}
        if self.double_quant:
            entries["weight.nested_absmax"] = self.nested_absmax
            entries["weight.nested_quant_map"] = self.nested_code.clone()
            fields.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=self.offset.item(),
            )
        packed_fields = torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)
        entries["weight." + _QUANT_STATE_KEY] = packed_fields
        return {prefix + key: value for key, value in entries.items()}

    @classmethod
    def from_state_dict(cls, state_dict, prefix: str = "", device=None) -> "NF4Weight":
        """Load the weight that bitsandbytes' ``Linear4bit`` (or ``state_dict``) saved under module ``prefix``.

        The tensors are used as they are (moved to ``device`` when given); nothing is requantized.

        Example:
            >>> layer = bitsandbytes.nn.Linear4bit(129, 37, quant_type="nf4").to("cpu")  # quantizes
            >>> w = NF4Weight.from_state_dict(layer.state_dict(prefix="q_proj."), "q_proj.")
            >>> w.shape
            torch.Size([37, 129])
        """
        who = "NF4Weight.from_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{who}: state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")

        def entry(key):
            if prefix + key not in state_dict:
                raise KeyError(f"{who}: missing key {prefix + key!r}")
            value = state_dict[prefix + key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{who}: {prefix + key} must be a tensor, got {type(value).__name__}")
            if key != "weight":  # the packed bytes are bytes whatever dtype stores them (bitsandbytes' quant_storage,
                check_finite(who, prefix + key, value)  # e.g. bf16 for FSDP): as floats, some read as NaN or inf
            return value if device is None else value.to(device)

        if prefix + "weight.quant_state.bitsandbytes__fp4" in state_dict:
            raise ValueError(f"{who}: {prefix}weight holds FP4, only NF4 is supported")
        # double quantization when any of its entries is there: a checkpoint missing one is named by entry()
        double_quant = any(prefix + k in state_dict for k in ("weight.nested_absmax", "weight.nested_quant_map"))
        key = "weight." + _QUANT_STATE_KEY
        fields = quant_state_fields(entry(key), who, prefix + key, double_quant)
        packed = entry("weight")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8).view(-1, 1)
        absmax = entry("weight.absmax")
        if not double_quant and absmax.dtype == torch.uint8:  # codes of a double-quantized weight's scales
            raise KeyError(f"{who}: missing key {prefix + 'weight.nested_absmax'!r} (weight.absmax holds uint8 codes "
                           "of double quantization)")
        if double_quant:
            fields["offset"] = torch.tensor(fields["offset"], dtype=torch.float32, device=absmax.device)
        return cls(
            packed=packed, code=entry("weight.quant_map"), absmax=absmax,
            nested_absmax=entry("weight.nested_absmax") if double_quant else None,
            nested_code=entry("weight.nested_quant_map") if double_quant else None, **fields,
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, backend: str = "auto"):
    """Quantize a weight to NF4 exactly as bitsandbytes' ``quantize_4bit(weight, quant_type="nf4")`` does.

    Args:
        weight: float32 / float16 / bfloat16 tensor of any shape (usually [out_features, in_features]), ≥ 1
            element, all finite. It is flattened row-major. Subnormal values quantize as in bitsandbytes; with
            double_quant, a weight whose block scales' float32 mean overflows (|weight| near 1e38) raises
            ValueError (bitsandbytes would store offset = inf and dequantize it to NaN).
        blocksize: elements per absmax block; one of 32, 64, 128, 256, 512, 1024, 2048, 4096.
        double_quant: also quantize the absmax values (bitsandbytes' ``compress_statistics=True``).
        backend: "auto", "triton", "cpu" or "reference" (see the module docstring; quantization has no CPU-specific
            code: "cpu" runs the reference quantizer).
    Returns:
        NF4Weight on weight's device; ``packed`` is uint8 [(n + 1) // 2, 1].

    Example:
        >>> weight = torch.randn(37, 129)
        >>> w = quantize_nf4(weight, blocksize=64)
        >>> w.packed.shape, w.absmax.shape, w.nested_absmax.shape
        (torch.Size([2387, 1]), torch.Size([75]), torch.Size([1]))
        >>> bool((w.dequantize() - weight).abs().max() <= 0.17 * weight.abs().max())
        True
    """
    who = "quantize_nf4"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in INPUT_DTYPES:
        raise TypeError(f"{who}: weight must be {dtype_names(INPUT_DTYPES)}, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{who}: weight of shape {tuple(weight.shape)} is empty")
    if weight.device.type == "meta":
        raise ValueError(f"{who}: weight is on the meta device (shapes only, no values); materialise it first")
    blocksize = _check_blocksize(who, blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"{who}: double_quant must be True or False, got {double_quant!r}")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{who}: weight contains NaN or inf")
    flat = weight.reshape(-1)
    if resolve_backend(backend, weight.device, who) == "triton":
        from .kernels import nf4 as nf4_kernels

        packed, absmax = nf4_kernels.nf4_quantize(flat.contiguous(), _nf4_bounds(weight.device), blocksize)
    else:
        packed, absmax = _quantize_reference(flat, blocksize)

    nested = {}
    if double_quant:
        # float32 mean on the CPU, as bitsandbytes computes it there: the bytes do not depend on the device.
        offset = absmax.cpu().mean().to(absmax.device)
        nested_code = dynamic_code(weight.device)
        absmax_q, nested_absmax = quantize_blockwise(absmax - offset, nested_code, dynamic_lut(True, weight.device),
                                                     NESTED_BLOCKSIZE)  # fmt: skip
        if not bool(torch.isfinite(_absmax_from_nested(absmax_q, nested_absmax, nested_code, offset)).all()):
            raise ValueError(
                f"{who}: double quantization cannot store the block scales of this weight (largest |weight| "
                f"{absmax.max().item():.4g}): their float32 mean or its sum with a scale overflows to inf; "
                "bitsandbytes stores such a weight anyway and dequantizes it to NaN. Use double_quant=False, or scale "
                "the weight down"
            )
        absmax = absmax_q
        nested = dict(offset=offset, nested_absmax=nested_absmax, nested_code=nested_code)
    return NF4Weight(
        packed=packed, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=nf4_code(weight.device),
        absmax=absmax, **nested,
    )


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantize an NF4Weight exactly as bitsandbytes' ``dequantize_4bit`` does: fl32(code[q]·absmax), rounded
    once to ``dtype``.

    Args:
        w: the NF4Weight.
        dtype: output dtype (float32, float16, bfloat16 or float64); default ``w.dtype``.
        backend: "auto", "triton", "cpu" (the C++ dequantizer of fused_lora/cpu.py) or "reference".
    Returns:
        Tensor of ``w.shape`` and ``dtype`` on ``w.device``.

    Example:
        >>> dequantize_nf4(quantize_nf4(torch.randn(8, 8)), torch.bfloat16).dtype
        torch.bfloat16
    """
    who = "dequantize_nf4"
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{who}: expected an NF4Weight, got {type(w).__name__}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{who}: dtype must be one of {dtype_names(OUTPUT_DTYPES)}, got {dtype!r}")
    n = w.numel()
    chosen = resolve_backend(backend, w.device, who)
    if chosen == "cpu":
        from . import cpu  # on first use (see functional._implementation)

        return cpu.dequantize_nf4(w, dtype).view(w.shape)
    if chosen == "triton":
        from .kernels import nf4 as nf4_kernels

        nested = {}
        if w.double_quant:
            nested = dict(nested_absmax=w.nested_absmax, nested_code=w.nested_code, offset=w.offset,
                          nested_blocksize=w.nested_blocksize)  # fmt: skip
        flat = nf4_kernels.nf4_dequantize(w.packed, w.absmax, w.code, n, w.blocksize, dtype, **nested)
    else:
        flat = _dequantize_reference(w.packed, w.absmax_fp32(), w.code, n, w.blocksize, dtype)
    return flat.view(w.shape)
