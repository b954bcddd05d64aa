"""``FusedLoraLinear``: a LoRA layer over a frozen base weight, NF4-quantized or dense.

    y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ          (symbols: fused_lora/reference.py)

W is frozen: an ``NF4Weight`` (quant="nf4", bitsandbytes' format byte for byte) or a dense frozen Parameter in the
compute dtype. A = ``lora_A`` (r, in_features) and B = ``lora_B`` (out_features, r) are the trainable adapters,
fp32 by default as PEFT keeps them. The bias b is a frozen Parameter; set ``layer.bias.requires_grad_(True)`` to
train it. The forward pass is ``fused_lora.functional.lora_linear``.

State dict keys: ``weight`` and, for an NF4 base, bitsandbytes' ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``; then ``bias``,
``lora_A``, ``lora_B``. The base keys are exactly those of a ``bitsandbytes.nn.Linear4bit`` (or ``nn.Linear``).
With ``use_dora=True`` (PEFT's DoRA, ``fused_lora.dora.dora_linear``) the key ``lora_magnitude_vector`` (mag, (N,))
scales each output row: y = (mag / ‖W + s·B·A‖_row)⊙(x·Wᵀ + s·u·Bᵀ) + b, the norm detached; merge folds that scale in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings

import torch
from torch import nn

from . import functional
from .dora import dora_linear, dora_row_norm_naive
from ._common import COMPUTE_DTYPES, adapter_operand, dtype_name, dtype_names
from .backend import validate_backend_name
from .checkpoint import read_base
from .nf4 import BLOCKSIZES, NF4Weight, quantize_nf4
from .reference import lora_scaling
from .testing import relative_error

__all__ = ["FusedLoraLinear", "LayerOptions"]

QUANT_TYPES = ("nf4", None)


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The hyper-parameters of a ``FusedLoraLinear`` besides its shape (see the class docstring for each)."""

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    quant: str | None = "nf4"
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    double_quant: bool = True
    use_rslora: bool = False
    backend: str = "auto"
    adapter_dtype: torch.dtype = torch.float32
    use_dora: bool = False

    def validate(self, in_features: int, out_features: int) -> None:
        """Raise ValueError naming the first bad value."""
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", self.r)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"FusedLoraLinear: {name} must be an integer >= 1, got {value!r}")
        for name, value in (("lora_alpha", self.lora_alpha), ("lora_dropout", self.lora_dropout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"FusedLoraLinear: {name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(float(self.lora_alpha)):
            raise ValueError(f"FusedLoraLinear: lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"FusedLoraLinear: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name, value in (("double_quant", self.double_quant), ("use_rslora", self.use_rslora),
                            ("use_dora", self.use_dora)):
            if not isinstance(value, bool):
                raise TypeError(f"FusedLoraLinear: {name} must be True or False, got {value!r}")
        if self.quant not in QUANT_TYPES:
            raise ValueError(f"FusedLoraLinear: quant must be 'nf4' or None, got {self.quant!r}")
        if self.quant == "nf4" and (isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES):
            raise ValueError(
                f"FusedLoraLinear: blocksize {self.blocksize!r} is not supported; bitsandbytes accepts "
                f"{dtype_names(BLOCKSIZES)}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"FusedLoraLinear: compute_dtype must be one of {dtype_names(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )
        if self.adapter_dtype not in COMPUTE_DTYPES:  # an 8-bit float would fail deep in the initialisation
            raise ValueError(
                f"FusedLoraLinear: adapter_dtype must be a floating-point dtype, one of {dtype_names(COMPUTE_DTYPES)}, "
                f"got {self.adapter_dtype!r}"
            )
        try:
            validate_backend_name(self.backend)
        except ValueError as error:
            raise ValueError(f"FusedLoraLinear: {error}") from None


def _nn_linear_init(out_features: int, in_features: int, bias: bool, device):
    """nn.Linear's default initialisation, in fp32: the base of a layer built from scratch."""
    weight = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if not bias:
        return weight, None
    bound = 1.0 / math.sqrt(in_features)
    return weight, torch.empty(out_features, device=device, dtype=torch.float32).uniform_(-bound, bound)


class FusedLoraLinear(nn.Module):
    """LoRA over a frozen (optionally NF4-quantized) linear layer, computed by ``functional.lora_linear``.

    Args:
        in_features, out_features: K and N, both >= 1.
        r: LoRA rank (>= 1). lora_alpha: α; the scaling is s = α/r, or α/√r with ``use_rslora``.
        lora_dropout: dropout probability on the adapter input, in [0, 1); active only in training mode.
        bias: whether the base layer has a bias (a frozen Parameter in the compute dtype).
        quant: "nf4" for a bitsandbytes-compatible NF4 base, None for a dense base in the compute dtype.
        compute_dtype: bf16, fp16 or fp32 (fp64 for testing). The input is cast to it (as bitsandbytes'
            Linear4bit does) and the output is cast back to the input's dtype; under ``torch.autocast`` the
            autocast dtype is used instead and the output stays in it.
        blocksize, double_quant: NF4 quantization parameters (bitsandbytes' rules; ignored when quant=None).
        backend: "auto", "triton", "cpu" or "reference" (see ``functional.lora_linear``).
        device: where parameters are created.
        adapter_dtype: dtype of lora_A / lora_B: bf16, fp16, fp32 or fp64 (fp32 by default, like PEFT).
        use_dora: DoRA (PEFT's ``use_dora``): a trainable ``lora_magnitude_vector`` (out_features,) in the adapter
            dtype, initialised to the row norms ‖W + s·B·A‖ (‖W‖ for a fresh layer), scales each output row.

    The base weight of a layer built this way is nn.Linear's random initialisation; use ``from_linear`` or
    ``from_bnb`` to wrap an existing layer. lora_A is initialised kaiming-uniform(a=√5) and lora_B with zeros,
    so a fresh layer computes exactly its base.

    Example:
        >>> import torch, fused_lora as fl
        >>> layer = fl.FusedLoraLinear(64, 80, r=8, lora_alpha=16, compute_dtype=torch.float32)
        >>> layer(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 80])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        bias: bool = False,
        quant: str | None = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        use_rslora: bool = False,
        backend: str = "auto",
        device=None,
        adapter_dtype: torch.dtype = torch.float32,
        use_dora: bool = False,
    ):
        super().__init__()
        options = LayerOptions(r, lora_alpha, lora_dropout, quant, compute_dtype, blocksize, double_quant,
                               use_rslora, backend, adapter_dtype, use_dora)
        self._configure(in_features, out_features, options, device)
        if not isinstance(bias, bool):
            raise TypeError(f"FusedLoraLinear: bias must be True or False, got {bias!r}")
        weight, bias_values = _nn_linear_init(out_features, in_features, bias, device)
        self._set_base(weight, bias_values)

    # ------------------------------------------------------------------ construction

    def _configure(self, in_features: int, out_features: int, options: LayerOptions, device):
        """Validate the hyper-parameters and create the adapters (the base is set by ``_set_base``)."""
        options.validate(in_features, out_features)
        r = int(options.r)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = r
        self.lora_alpha = options.lora_alpha
        self.lora_dropout = float(options.lora_dropout)
        self.use_rslora = bool(options.use_rslora)
        self.scaling = lora_scaling(r, options.lora_alpha, self.use_rslora)
        self.quant = options.quant
        self.compute_dtype = options.compute_dtype
        self.blocksize = options.blocksize
        self.double_quant = bool(options.double_quant)
        self.backend = validate_backend_name(options.backend)
        self._adapter_enabled = True
        self._unmerged_base = None
        self.merge_error = None

        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=options.adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=options.adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.use_dora = bool(options.use_dora)
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's magnitude, set by _set_base

    def _set_base(self, weight, bias):
        """Install the frozen base: ``weight`` is an NF4Weight or a dense (out, in) tensor (quantized here when
        quant="nf4"); ``bias`` is None or an (out,) tensor, stored as a frozen Parameter in the compute dtype."""
        if isinstance(weight, NF4Weight):
            base = weight
        elif self.quant == "nf4":
            if weight.device.type == "meta":
                raise ValueError(
                    "FusedLoraLinear: quant='nf4' quantizes the weight's values and the meta device has none; build "
                    "the layer on a real device, or with quant=None on meta and load a checkpoint after to_empty()"
                )
            base = quantize_nf4(weight.detach(), blocksize=self.blocksize, double_quant=self.double_quant)
        else:
            base = weight.detach().to(self.compute_dtype, copy=True)
        self._install_weight(base)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(self.compute_dtype, copy=True), requires_grad=False)
        self.bias = bias
        if self.use_dora:  # DoRA's magnitude starts at the row norms ‖W + s·B·A‖ of W as stored (as PEFT's)
            norm = dora_row_norm_naive(self._dense_base(torch.float32), self.lora_A, self.lora_B, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def _install_weight(self, base):
        """Make ``base`` (an NF4Weight or a dense tensor) the module's ``weight``; an NF4 base also sets the layer's
        blocksize and double_quant."""
        if "weight" in self._parameters:
            del self._parameters["weight"]
        if isinstance(base, NF4Weight):
            self.weight = base
            self.blocksize = base.blocksize
            self.double_quant = bool(base.double_quant)
        else:
            self.__dict__.pop("weight", None)
            self.weight = nn.Parameter(base, requires_grad=False)

    @classmethod
    def _empty(cls, in_features: int, out_features: int, options: LayerOptions, device) -> "FusedLoraLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(in_features, out_features, options, device)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    quant: str | None = "nf4", compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                    double_quant: bool = True, use_rslora: bool = False, backend: str = "auto",
                    adapter_dtype: torch.dtype = torch.float32, use_dora: bool = False) -> "FusedLoraLinear":
        """Wrap an ``nn.Linear``: its weight is copied (quantized to NF4 when quant="nf4") and its bias copied.

        The device follows the linear layer, and so does the compute dtype unless ``compute_dtype`` is given.
        The adapters are freshly initialised (lora_B = 0), so the new layer computes what ``linear`` does (up to
        NF4 rounding). A quantized NF4 ``bitsandbytes.nn.Linear4bit`` is handed to ``from_bnb`` (its bytes are
        reused, blocksize and double_quant are its own); other bitsandbytes layers raise a TypeError naming it.

        Example:
            >>> lin = torch.nn.Linear(64, 80)
            >>> layer = FusedLoraLinear.from_linear(lin, r=8, quant=None)
            >>> x = torch.randn(3, 64)
            >>> torch.allclose(layer(x), lin(x), atol=1e-6)
            True
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLoraLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if type(linear).__module__.startswith("bitsandbytes"):
            # a bitsandbytes layer (an nn.Linear subclass over packed bytes): an NF4 Linear4bit goes to from_bnb
            if quant == "nf4" and hasattr(linear.weight, "quant_state"):  # a Linear4bit (from_bnb checks it is NF4)
                return cls.from_bnb(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                    compute_dtype=compute_dtype, use_rslora=use_rslora, backend=backend,
                                    adapter_dtype=adapter_dtype, use_dora=use_dora)
            raise TypeError(
                f"FusedLoraLinear.from_linear: got a bitsandbytes {type(linear).__name__}, whose weight is packed "
                "bytes; wrap a quantized NF4 Linear4bit with FusedLoraLinear.from_bnb (it reuses the bytes; "
                "from_linear does so for quant='nf4'), or pass an nn.Linear with a floating-point weight"
            )
        weight = linear.weight
        if compute_dtype is None:
            compute_dtype = weight.dtype
        options = LayerOptions(r, lora_alpha, lora_dropout, quant, compute_dtype, blocksize, double_quant,
                               use_rslora, backend, adapter_dtype, use_dora)
        layer = cls._empty(linear.in_features, linear.out_features, options, weight.device)
        layer._set_base(weight, linear.bias)
        return layer

    @classmethod
    def from_bnb(cls, linear4bit, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 compute_dtype: torch.dtype | None = None, use_rslora: bool = False, backend: str = "auto",
                 adapter_dtype: torch.dtype = torch.float32, use_dora: bool = False) -> "FusedLoraLinear":
        """Wrap a quantized ``bitsandbytes.nn.Linear4bit`` (quant_type="nf4") without requantizing.

        The NF4Weight shares the Linear4bit's packed bytes and quantization statistics; the bias is copied.
        The compute dtype defaults to the Linear4bit's ``compute_dtype``, else the dtype the weight was
        quantized from.

        Example:
            >>> import bitsandbytes as bnb
            >>> q = bnb.nn.Linear4bit(64, 80, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
            >>> layer = FusedLoraLinear.from_bnb(q, r=8)
            >>> layer.weight.packed.data_ptr() == q.weight.data_ptr()
            True
        """
        params = getattr(linear4bit, "weight", None)
        quant_state = getattr(params, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                f"FusedLoraLinear.from_bnb: {type(linear4bit).__name__} has no quantized weight; bitsandbytes "
                "quantizes a Linear4bit when it is moved with .to(device) or .cuda(), so do that first"
            )
        if quant_state.quant_type != "nf4":
            raise ValueError(
                f"FusedLoraLinear.from_bnb: only NF4 is supported, got quant_type={quant_state.quant_type!r}"
            )
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "FusedLoraLinear.from_bnb: this Linear4bit was repacked by bitsandbytes' CPU inference path (an eval, "
                "no-grad forward on a CPU with AVX512-BF16), which rounds its absmax to bf16; wrap the layer before "
                "running it in eval mode, or reload it from its state dict"
            )
        weight = NF4Weight.from_bnb(params.data, quant_state)
        out_features, in_features = weight.shape
        if compute_dtype is None:
            compute_dtype = getattr(linear4bit, "compute_dtype", None) or quant_state.dtype
        options = LayerOptions(r, lora_alpha, lora_dropout, "nf4", compute_dtype, weight.blocksize,
                               weight.double_quant, use_rslora, backend, adapter_dtype, use_dora)
        layer = cls._empty(in_features, out_features, options, weight.device)
        layer._set_base(weight, linear4bit.bias)
        return layer

    # ------------------------------------------------------------------ adapters on/off, merge

    @property
    def adapter_enabled(self) -> bool:
        """Whether forward adds the LoRA term (False computes only x·Wᵀ + b)."""
        return self._adapter_enabled

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the LoRA term on or off (off: the layer is its frozen base, e.g. an RL reference model; a merged
        layer then computes with the unmerged base it keeps).

        Example:
            >>> layer.enable_adapters(False); assert not layer.adapter_enabled
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"FusedLoraLinear.enable_adapters: enabled must be True or False, got {enabled!r}")
        self._adapter_enabled = enabled

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the layer computes only x·Wᵀ + b with the original W (also while merged);
        the previous state is restored after.

        Example:
            >>> with layer.disable_adapter():
            ...     y_base = layer(x)
        """
        previous = self._adapter_enabled
        self._adapter_enabled = False
        try:
            yield self
        finally:
            self._adapter_enabled = previous

    @property
    def merged(self) -> bool:
        """Whether s·B·A is folded into the base weight (forward then skips the LoRA term)."""
        return self._unmerged_base is not None

    def _dense_base(self, dtype) -> torch.Tensor:
        if isinstance(self.weight, NF4Weight):
            return self.weight.dequantize(dtype)
        return self.weight.detach().to(dtype)

    def _exact_merged(self) -> torch.Tensor:
        """W + s·B·A in float64 (W as stored: dequantized when NF4)."""
        delta = self.lora_B.detach().to(torch.float64) @ self.lora_A.detach().to(torch.float64)
        merged = self._dense_base(torch.float64) + self.scaling * delta
        if self.use_dora:  # (mag / ‖W + s·B·A‖_row)⊙(W + s·B·A), as PEFT's DoRA merge
            norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
            merged = self.lora_magnitude_vector.detach().to(torch.float64).unsqueeze(1) / norm * merged
        return merged

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense merged weight W + s·B·A, (out_features, in_features), in ``dtype`` (default: compute dtype).

        The layer is not changed. When the layer is already merged this is its (merged) base.

        Example:
            >>> dense = layer.merged_weight(torch.bfloat16)   # e.g. to export a merged checkpoint
        """
        dtype = self.compute_dtype if dtype is None else dtype
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"FusedLoraLinear.merged_weight: dtype must be one of {dtype_names(COMPUTE_DTYPES)}, "
                            f"got {dtype!r}")
        if self.merged:  # a copy: never the layer's own weight, which unmerge() writes the original back into
            base = self._dense_base(dtype)
            return base if isinstance(self.weight, NF4Weight) else base.clone()
        return self._exact_merged().to(dtype)

    def merge(self, requantize: bool = True) -> float:
        """Fold s·B·A into the base weight; returns (and stores in ``merge_error``) the rounding error.

        Dense base: the merged weight is written in place, rounded to the compute dtype.
        NF4 base: with ``requantize=True`` the merged weight is quantized to NF4 again (same blocksize and double
        quantization); with ``requantize=False`` the base becomes a dense weight in the compute dtype.
        The error is ‖W_stored − (W + s·B·A)‖ / ‖W + s·B·A‖ computed in float64; NF4 rounding is typically
        about 0.1, usually much larger than the adapter's contribution, so requantized merges lose most of a
        small adapter. ``unmerge()`` restores the original base exactly (a copy is kept while merged).
        While merged, forward computes x·W_mergedᵀ + b only (x·Wᵀ + b with the adapter disabled), and
        ``state_dict()`` still holds the original base and the adapters, so a checkpoint saved while merged loads
        into an unmerged layer unchanged; export the merged weight with ``merged_weight()``.

        Example:
            >>> error = layer.merge()          # NF4: requantized; error ≈ 0.1
            >>> layer.unmerge()                # the original NF4 bytes are back
        """
        if not isinstance(requantize, bool):
            raise TypeError(f"FusedLoraLinear.merge: requantize must be True or False, got {requantize!r}")
        if self.merged:
            warnings.warn("FusedLoraLinear.merge: already merged; call unmerge() first", RuntimeWarning, stacklevel=2)
            return self.merge_error
        exact = self._exact_merged()
        original = self.weight
        if isinstance(original, NF4Weight) and requantize:
            merged = quantize_nf4(exact.to(original.dtype), blocksize=original.blocksize,
                                  double_quant=original.double_quant)
            self._unmerged_base = original
            self._install_weight(merged)
            stored = merged.dequantize(torch.float64)
        elif isinstance(original, NF4Weight):
            merged = exact.to(self.compute_dtype)
            self._unmerged_base = original
            self._install_weight(merged)
            stored = merged
        else:
            self._unmerged_base = original.detach().clone()
            with torch.no_grad():
                original.copy_(exact)
            stored = original
        self.merge_error = relative_error(stored, exact)
        return self.merge_error

    def unmerge(self) -> None:
        """Restore the base weight saved by ``merge()`` (bit for bit)."""
        if not self.merged:
            warnings.warn("FusedLoraLinear.unmerge: not merged; nothing to do", RuntimeWarning, stacklevel=2)
            return
        original = self._unmerged_base
        if isinstance(original, NF4Weight):
            self._install_weight(original)
        else:
            with torch.no_grad():
                self.weight.copy_(original)
        self._unmerged_base = None
        self.merge_error = None

    # ------------------------------------------------------------------ forward

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedLoraLinear: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"FusedLoraLinear: x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"FusedLoraLinear: x is a 0-d tensor; expected shape (..., {self.in_features})")
        if x.device.type == "meta":
            raise ValueError("FusedLoraLinear: x is on the meta device (shapes only, no data); materialise the model "
                             "first, e.g. model.to_empty(device=...) and load its weights")  # fmt: skip
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FusedLoraLinear: x has {x.shape[-1]} features, expected {self.in_features}")
        if x.device != self.lora_A.device:
            raise ValueError(
                f"FusedLoraLinear: x is on {x.device} but the layer is on {self.lora_A.device}; "
                f"move one of them, e.g. layer.to({str(x.device)!r})"
            )

    @staticmethod
    def _operand(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """An adapter or bias as lora_linear accepts it: as it is in the compute dtype or fp32 (fp64 with fp64 x),
        in fp32 from another floating dtype where x takes fp32 (_common.adapter_operand, as the PEFT layers do),
        else cast to the compute dtype."""
        if t is None:
            return None
        operand = adapter_operand(t, dtype)
        return t.to(dtype) if operand is None else operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ for x of shape (..., in_features); returns (..., out_features).

        x is cast to the compute dtype (the autocast dtype under ``torch.autocast``); the result is returned in
        x's original dtype, or in the autocast dtype under autocast.
        """
        self._check_input(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            out_dtype = dtype
        else:
            dtype = self.compute_dtype
            out_dtype = x.dtype
        x = x.to(dtype)
        base = self._unmerged_base if self.merged and not self._adapter_enabled else self.weight
        weight = base if isinstance(base, NF4Weight) else base.to(dtype)
        bias = self._operand(self.bias, dtype)
        with torch.autocast(device_type, enabled=False):
            if self.merged or not self._adapter_enabled:
                y = self._base_forward(x, weight, bias)
            elif self.use_dora:
                y = dora_linear(
                    x, weight, self._operand(self.lora_A, dtype), self._operand(self.lora_B, dtype),
                    self._operand(self.lora_magnitude_vector, dtype), self.scaling,
                    bias=bias, dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
                )
            else:
                y = functional.lora_linear(
                    x, weight, self._operand(self.lora_A, dtype), self._operand(self.lora_B, dtype), self.scaling,
                    bias=bias, dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
                )
        return y.to(out_dtype)

    def _base_forward(self, x, weight, bias):
        """x·Wᵀ + b in x's dtype through ``functional.frozen_linear`` on the layer's backend: the fused kernels
        never dequantize the whole NF4 weight; the reference rounds the product, then adds the bias."""
        return functional.frozen_linear(x, weight, bias, backend=self.backend)

    # ------------------------------------------------------------------ device moves and state dict

    def _apply(self, fn, recurse=True):
        # Parameters follow fn (device moves and dtype casts). The NF4 base only follows the device: its bytes
        # and absmax never change dtype. A floating-point cast (e.g. .half()) also changes the compute dtype.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.lora_A.device))
        super()._apply(fn, recurse)
        if probe.dtype in COMPUTE_DTYPES:
            self.compute_dtype = probe.dtype
        device = self.lora_A.device
        if isinstance(self.weight, NF4Weight):
            self.weight = self.weight.to(device)
        if isinstance(self._unmerged_base, NF4Weight):
            self._unmerged_base = self._unmerged_base.to(device)
        elif self._unmerged_base is not None:
            self._unmerged_base = fn(self._unmerged_base)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The base is saved unmerged (a merged layer writes the original it keeps), as _load_from_state_dict
        # expects: saving the merged W next to the adapters would apply them twice after loading.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        base = self._unmerged_base if self.merged else self.weight
        if isinstance(base, NF4Weight):
            destination.pop(prefix + "weight", None)
            for key, value in base.state_dict(prefix).items():
                destination[key] = value if keep_vars else value.detach()
        elif self.merged:
            destination[prefix + "weight"] = base if keep_vars else base.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The base may come as an NF4 checkpoint (bitsandbytes' keys) or a dense weight; either is converted to
        # the layer's kind by checkpoint.read_base, which also reports missing NF4 entries and unexpected weight.*
        # keys. A merged layer is unmerged first: a checkpoint holds an unmerged base.
        if self.merged:
            self.unmerge()
        weight_key = prefix + "weight"
        rest = {k: v for k, v in state_dict.items() if k != weight_key and not k.startswith(weight_key + ".")}
        nf4 = self.weight if isinstance(self.weight, NF4Weight) else None
        device = None if self.lora_A.device.type == "meta" else self.lora_A.device  # meta: torch's assign=True load
        loaded = read_base(state_dict, prefix, shape=(self.out_features, self.in_features), nf4=nf4,
                           dtype=self.compute_dtype, device=device, strict=strict,
                           missing_keys=missing_keys, unexpected_keys=unexpected_keys, error_msgs=error_msgs)
        if nf4 is not None:
            if loaded is not None:  # copied as torch copies into parameters, unless load_state_dict(assign=True):
                if not local_metadata.get("assign_to_params_buffers", False):  # the layer never shares the dict's
                    loaded = loaded.clone()  # memory (an mmap-loaded checkpoint file saved over again, say)
                self._install_weight(loaded)
        elif weight_key in state_dict:
            rest[weight_key] = self.weight if loaded is None else loaded
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        quant = self.quant
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"r={self.r}",
            f"lora_alpha={self.lora_alpha}",
            f"scaling={self.scaling:.4g}",
            f"quant={quant}",
        ]
        if quant == "nf4":
            parts.append(f"blocksize={self.blocksize}")
            parts.append(f"double_quant={self.double_quant}")
        parts += [
            f"compute_dtype={dtype_name(self.compute_dtype)}",
            f"lora_dropout={self.lora_dropout}",
            f"bias={self.bias is not None}",
            f"backend={self.backend!r}",
        ]
        if self.use_rslora:
            parts.append("use_rslora=True")
        if self.use_dora:
            parts.append("use_dora=True")
        if not self._adapter_enabled:
            parts.append("adapter_enabled=False")
        if self.merged:
            parts.append("merged=True")
        return ", ".join(parts)
