"""PEFT integration: run PEFT's LoRA layers through ``fused_lora.functional.lora_linear``.

Three ways in, all keeping PEFT's module structure (``base_layer``, ``lora_A[adapter]`` / ``lora_B[adapter]`` as
``nn.Linear``, ``lora_dropout``, ``scaling``), so ``save_pretrained`` writes an ordinary PEFT adapter that plain
PEFT loads, and ``merge_and_unload``, ``disable_adapter()``, ``set_adapter`` and friends keep working:

* ``patch_peft_model(peft_model)`` converts the LoRA layers of an existing PEFT model in place. Each
  ``peft.tuners.lora.Linear`` / ``peft.tuners.lora.bnb.Linear4bit`` whose base is an ``nn.Linear`` or a
  bitsandbytes NF4 ``Linear4bit`` becomes a ``FusedPeftLinear`` / ``FusedPeftLinear4bit``: a subclass of the
  PEFT class that only replaces ``forward``. Parameters, buffers, adapter tensors and the packed NF4 bytes are
  the very same objects (the NF4 base is read through ``NF4Weight.from_bnb``, never requantized).
* ``register_fused_lora(lora_config)`` makes ``get_peft_model`` build the fused layers directly, through PEFT's
  custom-module registration.
* ``apply_fused_lora()`` (``fl.apply_fused_lora``, the one line for transformers/TRL users) does so for every LoRA
  layer PEFT builds afterwards in the process, including those TRL's trainers build from a ``peft_config``, by
  wrapping PEFT's LoRA layer factory; ``unapply_fused_lora()`` restores it.

The fused forward computes, for the single active adapter (symbols of fused_lora/reference.py),

    y = x·Wᵀ + b + s·((m⊙x)·Aᵀ)·Bᵀ,   W = base weight (NF4 or dense), A = lora_A.weight, B = lora_B.weight,
                                       s = scaling[adapter] (α/r or α/√r), m = LoRA dropout mask.

DoRA (``use_dora``, one active adapter), several active plain adapters (``set_adapter([...])``) and mixed batches
(``adapter_names=[...]``) run fused as well, through fused_lora/peft_routes.py (``dora_linear``,
``lora_linear_multi``); the PEFT fallback below covers what those cannot take (e.g. DoRA among several adapters).

A layer that computes its base alone (adapters disabled, e.g. the reference model of DPO/GRPO under
``disable_adapter()``; merged; no active adapter in this layer) runs ``frozen_linear``: y = x·Wᵀ + b with the same
NF4 decode, never bitsandbytes' forward. Cases the fused path does not cover run PEFT's own forward, with one
warning naming the case: LoRA variants other than DoRA (aLoRA, Arrow, ...), DoRA among several adapters,
``lora_bias``, a trainable base weight, an offloaded (meta) base weight, and several active adapters or mixed-batch
``adapter_names`` that include one of these. A weight that bitsandbytes repacked for its CPU inference kernel (an
eval, no-grad pass through bitsandbytes on a CPU with AVX512-BF16) is read back into the NF4 layout without changing
it, and merge/unmerge restore bitsandbytes' layout first. Layers over a 4-bit base that is not NF4
(FP4) are not converted at all.

Each fused layer runs ``lora_linear`` with ``backend=layer.fused_backend``: "auto" (the class default: the Triton
kernels for CUDA tensors, the reference on the CPU; ``FUSED_LORA_BACKEND`` overrides it), "triton" or "reference";
set it on one layer to override that layer.

PEFT's dropout and the fused dropout draw different masks (same distribution), so with ``lora_dropout > 0``
training-mode outputs match PEFT only in distribution; with dropout 0 or in eval mode they match closely.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
from torch import nn

from ._common import adapter_operand_dtype, side_dtypes, warn_once
from .functional import frozen_linear, lora_linear
from .nf4 import NF4Weight
from .peft_routes import fused_adapters_forward, scaled_operands

__all__ = [
    "apply_fused_lora",
    "unapply_fused_lora",
    "patch_peft_model",
    "unpatch_peft_model",
    "register_fused_lora",
    "FusedPeftLinear",
    "FusedPeftLinear4bit",
]

_FUSED_CLASS_NAMES = {"Linear": "FusedPeftLinear", "Linear4bit": "FusedPeftLinear4bit"}
_fused_classes: dict[str, type] = {}


def _warn_fallback_once(reason: str) -> None:
    warn_once(
        f"fused_lora: a PEFT LoRA layer uses PEFT's own forward because of {reason}; "
        "the fused path covers plain LoRA adapters (one, several active, or one per sample) and one DoRA adapter over "
        "an nn.Linear or NF4 Linear4bit base",
        stacklevel=4,
    )


def _bnb_linear4bit_type():
    """bitsandbytes.nn.Linear4bit if bitsandbytes is already imported (a model holding one has imported it)."""
    if "bitsandbytes" not in sys.modules:
        return None
    return sys.modules["bitsandbytes"].nn.Linear4bit


def _base_kind(base: nn.Module) -> str | None:
    """"nf4" for a bitsandbytes NF4 Linear4bit, "dense" for an nn.Linear that computes x·Wᵀ + b with a floating-point
    W (its own forward: not a subclass with a forward of its own, such as transformers' quantized linears, whose
    weight alone is not what they compute), None otherwise (FP4 included)."""
    linear4bit = _bnb_linear4bit_type()
    if linear4bit is not None and isinstance(base, linear4bit):
        state = _quant_state(base)
        quant_type = getattr(base.weight, "quant_type", None) or getattr(state, "quant_type", None)
        return "nf4" if quant_type == "nf4" else None
    if type(base).__module__.startswith("bitsandbytes"):
        return None
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return None
    return "dense" if base.weight.is_floating_point() else None


def _quant_state(base: nn.Module):
    """A Linear4bit's QuantState, or None before quantization. The weight's own when it is bitsandbytes' Params4bit,
    else the module's copy: FSDP2 (fully_shard) and DDP replace the Params4bit by a plain Parameter over the same
    packed bytes (sharded, then all-gathered as bytes), and bitsandbytes keeps the state on the module for that."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _FusedLoraForward:
    """Mixin placed before a PEFT LoRA class: ``forward`` runs ``lora_linear`` when one plain adapter is active,
    ``frozen_linear`` when the layer computes its base alone (adapters disabled, merged, or none active here), and
    PEFT's forward (with one warning naming the case) otherwise."""

    fused_backend = "auto"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = fused_adapters_forward(self, x, args, kwargs)  # DoRA, several adapters, adapter_names (peft_routes.py)
        if y is not None:
            return y
        route, value = self._route(args, kwargs)
        reason = None
        if route == "peft":  # a base the fused path cannot take is the reason whatever the adapters
            base = self.get_base_layer()
            reason = self._base_problem(base, _base_kind(base)) or value
        if route != "peft":
            if route == "frozen" and self.disable_adapters and self.merged:
                self.unmerge()  # as PEFT's forward does: a disabled layer computes the unmerged base
            frozen = self._frozen_base(x)
            if isinstance(frozen, str):
                reason = frozen
            elif route == "frozen":
                return self._frozen_forward(x, *frozen)
            else:
                reason = self._adapter_problem(value, frozen[1])
                if reason is None:
                    return self._fused_forward(x, value, *frozen)
        if reason is not None:
            _warn_fallback_once(reason)
        return super().forward(x, *args, **kwargs)

    def _route(self, args, kwargs) -> tuple[str, str | None]:
        """("lora", adapter) when one plain adapter is active; ("frozen", None) when PEFT would run the base layer
        alone; ("peft", reason) for a case the fused path skips."""
        if args or any(value is not None for key, value in kwargs.items() if key != "adapter_names"):
            return "peft", "extra forward arguments"
        if self.disable_adapters or self.merged:
            return "frozen", None
        if kwargs.get("adapter_names") is not None:  # fused_adapters_forward declined them
            return "peft", ("mixed-batch adapter_names with an adapter the fused path cannot run (a LoRA variant, "
                            "lora_bias, fan_in_fan_out, or adapter dtypes it refuses)")
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return "frozen", None
        if len(active) > 1:  # fused_adapters_forward declined them
            return "peft", ("several active adapters, one of which the fused path cannot run (DoRA among several, a "
                            "LoRA variant, lora_bias, fan_in_fan_out, or adapter dtypes it refuses)")
        adapter = active[0]
        variants = getattr(self, "lora_variant", {})
        if self.use_dora.get(adapter, False):  # before the variants: PEFT registers DoRA as one
            return "peft", ("DoRA with an option the fused DoRA path does not run (lora_bias, fan_in_fan_out, or "
                            "adapter dtypes it refuses)")
        if adapter in variants:
            return "peft", f"the LoRA variant {type(variants[adapter]).__name__}"
        if self.lora_bias.get(adapter, False):
            return "peft", "lora_bias=True"
        if getattr(self, "fan_in_fan_out", False):
            return "peft", "fan_in_fan_out=True"
        return "lora", adapter

    def _base_problem(self, base: nn.Module, kind: str | None) -> str | None:
        """Why the fused path cannot take the base layer ``base`` (of ``_base_kind`` ``kind``), or None."""
        if kind is None:
            return f"a base layer of type {type(base).__name__}"
        if base.weight.is_meta:  # e.g. accelerate's offloading: a hook loads it in the base layer's own forward
            return "a base weight on the meta device (offloaded: only the base layer's own forward loads it)"
        # the fused path reads these modules' weights and never calls them: hooks on them (DeepSpeed ZeRO-3's
        # parameter gathering, accelerate's device alignment, a user's) would not run
        modules = [("the base layer", base)] + [(f"{side}[{adapter!r}]", module) for side in ("lora_A", "lora_B")
                                                for adapter, module in getattr(self, side).items()]
        hooked = [name for name, module in modules if module._forward_pre_hooks or module._forward_hooks
                  or getattr(module, "_hf_hook", None) is not None]
        if hooked:
            return f"forward hooks on {', '.join(hooked)} (the fused path reads their weights without calling them)"
        if kind == "dense" and base.weight.requires_grad:
            return "a trainable base weight (lora_linear keeps W frozen)"
        if kind != "dense" and _quant_state(base) is None:
            return "a bitsandbytes weight that is not quantized yet (move the model to its device first)"
        return None

    def _frozen_base(self, x: torch.Tensor):
        """(weight, compute_dtype, bias, out_dtype) for lora_linear, or a string naming why the base is unsupported."""
        base = self.get_base_layer()
        kind = _base_kind(base)
        problem = self._base_problem(base, kind)
        if problem is not None:
            return problem
        if kind == "dense":
            compute_dtype = _autocast_dtype(x.device.type) or base.weight.dtype
            return base.weight.to(compute_dtype), compute_dtype, base.bias, compute_dtype
        quant_state = _quant_state(base)
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        # under autocast bitsandbytes' matmul runs in the autocast dtype (its F.linear is autocast), else in its own
        compute_dtype = _autocast_dtype(x.device.type) or base.compute_dtype or x.dtype
        return self._nf4_weight(base.weight, quant_state), compute_dtype, base.bias, x.dtype

    def _adapter_problem(self, adapter: str, compute_dtype: torch.dtype) -> str | None:
        for name, linear in (("lora_A", self.lora_A[adapter]), ("lora_B", self.lora_B[adapter])):
            if adapter_operand_dtype(linear.weight.dtype, compute_dtype) is None:
                return f"{name} in {linear.weight.dtype} with compute dtype {compute_dtype}"
        dropout = self.lora_dropout[adapter]
        if not isinstance(dropout, (nn.Identity, nn.Dropout)):
            return f"a LoRA dropout module of type {type(dropout).__name__}"
        return None

    def _nf4_weight(self, packed: torch.Tensor, quant_state):
        """NF4Weight over bitsandbytes' bytes, cached until the weight Parameter, its quant state or the state's
        absmax is replaced (merge, unmerge, a device move and bitsandbytes' CPU repack each replace one), or, outside
        torch.compile, the bytes move. A weight repacked for bitsandbytes' CPU inference kernel is read back into
        the canonical layout (``NF4Weight.from_bnb``), so the layer stays on the fused path and is not changed."""
        cached = self.__dict__.get("_fused_nf4")
        key = (packed, quant_state, quant_state.absmax)
        stale = cached is None or any(a is not b for a, b in zip(cached[0], key))
        if not stale and not torch.compiler.is_compiling():
            stale = cached[1] != (packed.data_ptr(), packed.device)
        if stale:
            cached = (key, (packed.data_ptr(), packed.device), NF4Weight.from_bnb(packed.data, quant_state))
            object.__setattr__(self, "_fused_nf4", cached)
        return cached[2]

    def _restore_bnb_layout(self) -> None:
        """Undo bitsandbytes' CPU inference repack of an NF4 base in place, as bitsandbytes itself does before it
        saves or moves the weight: PEFT's merge and unmerge dequantize the canonical layout."""
        base = self.get_base_layer()
        if _base_kind(base) != "nf4":
            return
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                base.weight.data, quant_state
            )

    def merge(self, *args, **kwargs):
        self._restore_bnb_layout()
        return super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        self._restore_bnb_layout()
        return super().unmerge(*args, **kwargs)

    def _run(self, function, x, compute_dtype, out_dtype, bias, **kwargs) -> torch.Tensor:
        """``function`` (lora_linear or frozen_linear) on x cast to the compute dtype, autocast off, the bias in a
        dtype the layer functions take; the result in ``out_dtype``."""
        if bias is not None and bias.dtype not in side_dtypes(compute_dtype):
            bias = bias.to(compute_dtype)
        autocast_off = _autocast_dtype(x.device.type) is not None
        with torch.autocast(x.device.type, enabled=False) if autocast_off else contextlib.nullcontext():
            y = function(x.to(compute_dtype), bias=bias, backend=self.fused_backend, **kwargs)
        return y.to(out_dtype)

    def _frozen_forward(self, x, weight, compute_dtype, bias, out_dtype) -> torch.Tensor:
        return self._run(frozen_linear, x, compute_dtype, out_dtype, bias, weight=weight)

    def _fused_forward(self, x, adapter, weight, compute_dtype, bias, out_dtype) -> torch.Tensor:
        dropout = self.lora_dropout[adapter]
        lora_A, lora_B, scaling = scaled_operands(self, adapter, compute_dtype)
        return self._run(
            lora_linear, x, compute_dtype, out_dtype, bias,
            weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=scaling,
            dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            training=dropout.training,
        )


def _peft_lora_classes() -> dict[type, str]:
    """PEFT's LoRA layer classes that have a fused twin, mapped to the twin's name (imports PEFT)."""
    from peft.tuners.lora import layer as lora_layer

    classes = {lora_layer.Linear: "Linear"}
    lora_bnb = sys.modules.get("peft.tuners.lora.bnb")
    if lora_bnb is None and _bnb_linear4bit_type() is not None:
        import peft.tuners.lora.bnb as lora_bnb
    if lora_bnb is not None and hasattr(lora_bnb, "Linear4bit"):
        classes[lora_bnb.Linear4bit] = "Linear4bit"
    return classes


def _fused_class(peft_name: str) -> type:
    """The fused subclass of PEFT's ``Linear`` or ``bnb.Linear4bit``, created on first use (PEFT is imported lazily)."""
    if peft_name not in _fused_classes:
        peft_class = next(cls for cls, name in _peft_lora_classes().items() if name == peft_name)
        name = _FUSED_CLASS_NAMES[peft_name]
        doc = (
            f"PEFT's ``{peft_class.__module__}.{peft_class.__qualname__}`` with the fused forward of "
            "``fused_lora.functional.lora_linear``; same parameters, state dict, merge and unload."
        )
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc}
        cls = type(name, (_FusedLoraForward, peft_class), namespace)
        _fused_classes[peft_name] = cls
    return _fused_classes[peft_name]


def __getattr__(name):
    for peft_name, fused_name in _FUSED_CLASS_NAMES.items():
        if name == fused_name:
            return _fused_class(peft_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_module(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected a PEFT model (a torch.nn.Module), got {type(model).__name__}")


def patch_peft_model(peft_model: nn.Module) -> int:
    """Convert the PEFT LoRA layers of ``peft_model`` to fused layers in place; return how many were converted.

    Converts every ``peft.tuners.lora.Linear`` and ``peft.tuners.lora.bnb.Linear4bit`` whose base layer is an
    ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (NF4) by switching its class to the fused subclass, which
    only overrides ``forward``. Nothing is copied or requantized: adapter weights, dropout, scaling (rsLoRA
    included) and the packed NF4 bytes stay the same tensors, optimizers built before the patch keep working,
    and ``save_pretrained`` writes the same keys as before. Layers already fused, other LoRA layer types (Conv,
    Embedding, 8-bit) and LoRA layers over other bases (FP4 included) are left alone. ``unpatch_peft_model``
    reverses it.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module containing PEFT LoRA layers).
    Returns:
        the number of layers converted by this call.

    Example:
        >>> import fused_lora as fl
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(base_model, LoraConfig(r=16, target_modules="all-linear"))
        >>> fl.patch_peft_model(model)
        154
    """
    _check_module("patch_peft_model", peft_model)
    peft_classes = _peft_lora_classes()
    count = lora_layers = 0
    for module in peft_model.modules():
        lora_layers += isinstance(module, _FusedLoraForward) or hasattr(module, "lora_A")
        peft_name = peft_classes.get(type(module))
        if peft_name is None or _base_kind(module.get_base_layer()) is None:
            continue
        module.__class__ = _fused_class(peft_name)
        count += 1
    if not lora_layers:
        warnings.warn(
            f"patch_peft_model: {type(peft_model).__name__} has no PEFT LoRA layer, so nothing was converted; pass "
            "the model that peft.get_peft_model returns (a base model has none)", UserWarning, stacklevel=2
        )
    return count


def unpatch_peft_model(peft_model: nn.Module) -> int:
    """Turn fused layers of ``peft_model`` back into PEFT's own classes in place; return how many were changed.

    The layers are then exactly what PEFT built: same class, same attributes (the fused layer's NF4 cache and a
    per-layer ``fused_backend`` are dropped), same parameters.

    Args:
        peft_model: a module containing layers converted by ``patch_peft_model`` or ``register_fused_lora``.
    Returns:
        the number of layers turned back.

    Example:
        >>> fl.peft.unpatch_peft_model(model)   # after fl.patch_peft_model(model)
        154
    """
    _check_module("unpatch_peft_model", peft_model)
    count = 0
    for module in peft_model.modules():
        if isinstance(module, _FusedLoraForward):
            module.__class__ = next(cls for cls in type(module).__mro__[1:] if not issubclass(cls, _FusedLoraForward))
            for attribute in ("_fused_nf4", "fused_backend"):
                module.__dict__.pop(attribute, None)
            count += 1
    return count


def _create_fused_layer(target: nn.Module, adapter_name: str, config, **kwargs):
    """PEFT custom-module factory: a fused LoRA layer for an nn.Linear / NF4 Linear4bit target, else None (PEFT
    then falls through to its own dispatchers, e.g. for 8-bit layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = _base_kind(base)
    if kind == "nf4":
        return _fused_class("Linear4bit")(target, adapter_name, config=config, **kwargs)
    if kind == "dense":
        if config.fan_in_fan_out:
            warnings.warn("fused_lora: fan_in_fan_out=True does not apply to nn.Linear; setting it to False")
            config.fan_in_fan_out = False
        return _fused_class("Linear")(target, adapter_name, config=config, **kwargs)
    return None


def _fuse_created_module(create):
    """PEFT's ``LoraModel._create_new_module`` wrapped so that a LoRA layer it builds over an nn.Linear or NF4
    Linear4bit base comes out fused (its class switched as ``patch_peft_model`` does)."""

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = create(lora_config, adapter_name, target, **kwargs)
        peft_name = _peft_lora_classes().get(type(module))
        if peft_name is not None and _base_kind(module.get_base_layer()) is not None:
            module.__class__ = _fused_class(peft_name)
        return module

    _create_new_module.fused_lora_original = create
    return _create_new_module


def apply_fused_lora(model: nn.Module | None = None) -> int:
    """The one line for transformers/PEFT/TRL users: every PEFT LoRA layer built from now on in this process is
    fused, and the LoRA layers already in ``model`` (when given) are converted; returns how many of those were.

    "From now on" covers ``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``/``load_adapter`` on a new
    module, and the trainers that build the PEFT model themselves from a ``peft_config`` (TRL's SFTTrainer,
    DPOTrainer, GRPOTrainer): PEFT's LoRA factory (``LoraModel._create_new_module``) is wrapped so that each LoRA
    layer over an nn.Linear or NF4 Linear4bit base comes out as ``FusedPeftLinear(4bit)``, exactly what
    ``patch_peft_model`` makes. Saved adapters stay ordinary PEFT adapters. Calling it again changes nothing;
    ``unapply_fused_lora()`` stops it.

    Args:
        model: optional; a PEFT model (or any module holding PEFT LoRA layers) to convert now.
    Returns:
        the number of layers of ``model`` converted by this call (0 without a model).

    Example:
        >>> import fused_lora as fl
        >>> fl.apply_fused_lora()                       # before get_peft_model / SFTTrainer(peft_config=...)
        0
        >>> model = get_peft_model(base_model, LoraConfig(r=16, target_modules="all-linear"))   # fused layers
    """
    if model is not None:
        _check_module("apply_fused_lora", model)
    from peft.tuners.lora.model import LoraModel

    create = LoraModel._create_new_module
    if not hasattr(create, "fused_lora_original"):
        LoraModel._create_new_module = staticmethod(_fuse_created_module(create))
    if model is None or not any(hasattr(module, "lora_A") for module in model.modules()):
        return 0  # e.g. a base model that get_peft_model or a trainer wraps later: its LoRA layers come out fused
    return patch_peft_model(model)


def unapply_fused_lora(model: nn.Module | None = None) -> int:
    """Undo ``apply_fused_lora``: PEFT builds its own LoRA layers again, and the fused layers of ``model`` (when
    given) turn back into PEFT's; returns how many of those were turned back.

    Example:
        >>> fl.peft.unapply_fused_lora(model)
        154
    """
    if model is not None:
        _check_module("unapply_fused_lora", model)
    if "peft.tuners.lora.model" in sys.modules:
        from peft.tuners.lora.model import LoraModel

        create = LoraModel._create_new_module
        if hasattr(create, "fused_lora_original"):
            LoraModel._create_new_module = staticmethod(create.fused_lora_original)
    return unpatch_peft_model(model) if model is not None else 0


def register_fused_lora(lora_config):
    """Make ``get_peft_model(model, lora_config)`` create fused LoRA layers directly; returns ``lora_config``.

    Uses PEFT's custom-module registration (``LoraConfig._register_custom_module``): targets that are an
    ``nn.Linear`` or an NF4 ``bitsandbytes.nn.Linear4bit`` become ``FusedPeftLinear`` / ``FusedPeftLinear4bit``
    layers; anything else goes through PEFT's usual dispatch (FP4 and 8-bit layers included). The saved adapter
    is an ordinary PEFT adapter. Only this config object is changed: configs created later, and configs read back
    from a saved adapter, build PEFT's own layers unless they are registered too.

    Args:
        lora_config: a ``peft.LoraConfig``.
    Returns:
        the same config, for chaining.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> config = fl.peft.register_fused_lora(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        >>> model = get_peft_model(base_model, config)   # LoRA layers are FusedPeftLinear(4bit)
        >>> # a saved adapter, loaded straight into fused layers:
        >>> config = fl.peft.register_fused_lora(LoraConfig.from_pretrained("adapter_dir"))
        >>> model = PeftModel.from_pretrained(base_model, "adapter_dir", config=config, is_trainable=True)
    """
    if not hasattr(lora_config, "_register_custom_module"):
        raise TypeError(
            f"register_fused_lora: expected a peft.LoraConfig, got {type(lora_config).__name__} "
            "(or a PEFT too old to register custom modules; fused_lora needs peft >= 0.14)"
        )
    lora_config._register_custom_module({nn.Linear: _create_fused_layer})
    return lora_config
