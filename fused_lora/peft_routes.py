"""The fused forward of PEFT LoRA layers for DoRA, several active adapters and mixed-adapter batches.

``fused_lora.peft``'s layers call ``fused_adapters_forward`` first; it returns the layer's output for the cases
below, or None, and the layer then goes on as before (one plain adapter, the frozen base, or PEFT's forward with one
warning naming the case).

* DoRA (``use_dora=True``), one active adapter: ``fused_lora.dora.dora_linear`` with PEFT's magnitude
  (``lora_magnitude_vector[adapter].weight``); PEFT's formula, the dropped-input variant when the layer trains with
  dropout (PEFT's ``module.training`` and an ``nn.Dropout``).
* several active adapters (``set_adapter([...])``), none of them a variant: ``lora_linear_multi`` without ids, the
  terms added, each with its own dropout.
* ``adapter_names=[...]`` (one name per sample; "__base__" or a name this layer lacks: no adapter), after PEFT's own
  argument checks (length, merged layers, DoRA refused as PEFT refuses it): ``lora_linear_multi`` with per-sample
  ids, the frozen product once.
Anything else (a DoRA adapter among several, other variants, ``lora_bias``, ``fan_in_fan_out``, adapter dtypes the
layer functions refuse, unsupported bases) returns None.

PEFT accepts ``adapter_names=`` only in eval mode; ``mixed_adapter_batch`` gives every LoRA layer (fused or not) and
``modules_to_save`` wrapper one adapter per sample in training mode too, to train several adapters in one batch (each
sample's loss reaches only its adapter; with gradient checkpointing, backward inside the block).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._common import adapter_operand, side_dtypes, warn_once
from .dora import dora_linear
from .functional import frozen_linear
from .mixed import Adapter, lora_linear_multi

__all__ = ["fused_adapters_forward", "mixed_adapter_batch"]


def fused_adapters_forward(layer, x: torch.Tensor, args, kwargs) -> torch.Tensor | None:
    """The output of PEFT LoRA ``layer`` for DoRA / several adapters / ``adapter_names``, or None (module docstring).

    ``layer`` is a ``fused_lora.peft`` fused layer (it provides ``_frozen_base`` and ``_adapter_problem``).
    """
    if args or any(value is not None for key, value in kwargs.items() if key != "adapter_names"):
        return None
    if layer.disable_adapters:
        return None
    names = kwargs.get("adapter_names")
    if names is not None:
        layer._check_forward_args(x, adapter_names=names)  # PEFT's checks and errors, as its forward runs them
        return _mixed_batch(layer, x, list(names))
    if layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) > 1:
        return _several(layer, x, active)
    if len(active) == 1 and layer.use_dora.get(active[0], False):
        return _dora(layer, x, active[0])
    return None


@contextlib.contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names):
    """Inside the block, every PEFT LoRA layer of ``model`` (fused or not, and every ``modules_to_save`` wrapper, as
    PEFT's own ``adapter_names`` forward routes them) runs with ``adapter_names`` (one adapter name per sample,
    "__base__" for none), in training mode too, and, with gradients enabled, every adapter named becomes trainable in
    the LoRA layers and in the wrappers' copies (PEFT marks only the active ones) and stays so after the block (a
    backward after it still reaches them); PEFT's own ``model(..., adapter_names=...)`` refuses training mode.

    Call ``backward()`` inside the block: with gradient checkpointing the backward pass runs the layers' forward again,
    and outside the block that forward would not have the names (wrong gradients). So with gradient checkpointing on,
    a block entered in training mode with gradients enabled raises on exit when its layers ran and no backward
    pass ran them again inside it.

    Example:
        >>> with fl.peft_routes.mixed_adapter_batch(model, ["a", "b", "a", "__base__"]):
        ...     loss = model(**batch).loss          # rows 0, 2 reach adapter a only, row 1 adapter b
        ...     loss.backward()
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(adapter_names, str):
        raise TypeError(f"mixed_adapter_batch: adapter_names must be a list of names, one per sample, got the string "
                        f"{adapter_names!r}")
    names = list(adapter_names)
    wanted = set(names) - {"__base__"}
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    if not any(getattr(type(module), "fused_backend", None) is not None for module in layers):
        raise ValueError("mixed_adapter_batch: the model has no fused PEFT LoRA layer (call fl.patch_peft_model)")
    known = set().union(*(set(module.lora_A.keys()) | set(module.lora_embedding_A.keys()) for module in layers))
    unknown = wanted - known
    if unknown:  # PEFT's own adapter_names forward refuses them too
        raise ValueError(f"mixed_adapter_batch: no adapter named {sorted(unknown)} in the model")
    wrappers = [module for module in model.modules() if isinstance(module, AuxiliaryTrainingWrapper)]
    # gradient checkpointing in a block entered with gradients on (a reentrant checkpoint's first forward itself
    # runs without them): the block must see the backward's second forward
    recomputes = model.training and torch.is_grad_enabled() and any(
        getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
    seen = {"forward": False, "recomputed": False}

    def inject(module, args, kwargs):
        seen["recomputed" if torch._C._current_graph_task_id() != -1 else "forward"] = True
        return args, {**kwargs, "adapter_names": names}

    frozen = [(name, param) for module in layers for name in wanted
              for param in (*(c[name].weight for c in (module.lora_A, module.lora_B) if name in c),
                            *(c[name] for c in (module.lora_embedding_A, module.lora_embedding_B) if name in c))
              if not param.requires_grad]  # fmt: skip
    # the wrappers' copies of the named adapters (modules_to_save.<name>..., trainable tokens): their samples run
    # through them, so they train as they would with the adapter active (PEFT marks only the active one's)
    frozen += [(name, param) for module in wrappers for name in wanted
               for path, param in module.named_parameters()
               if name in path.split(".") and not path.startswith("original_module.") and not param.requires_grad]
    if torch.is_grad_enabled():
        _check_distributed(model, [param for _, param in frozen], sorted({name for name, _ in frozen}))
    else:  # inference: nothing to train, nothing to synchronise under DDP, and nothing made trainable (it would stay
        frozen = []  # so, and a later training block would get past _check_distributed)
    handles = []
    try:
        for module in layers + wrappers:
            handles.append(module.register_forward_pre_hook(inject, with_kwargs=True))
        for _, param in frozen:
            param.requires_grad_(True)
        yield model
        if recomputes and seen["forward"] and not seen["recomputed"]:
            raise RuntimeError("mixed_adapter_batch: the model uses gradient checkpointing, so its backward pass runs "
                               "the layers' forward again, and outside this block they would run without the adapter "
                               "names (wrong gradients): call backward() inside the block")
    finally:
        for handle in handles:
            handle.remove()


def _check_distributed(model: nn.Module, frozen: list, names: list) -> None:
    """Adapters the block makes trainable under data parallelism: DistributedDataParallel registers the parameters
    that need gradients when it is built, so it would never all-reduce theirs (each rank would train its own copy).
    Refused when ``model`` is a DDP module; a warning when a process group exists (DDP may wrap the model from
    outside; FSDP2's DTensor parameters are reduced whatever they needed at wrapping)."""
    if not frozen:
        return
    from torch.nn.parallel import DistributedDataParallel

    advice = (f"make the adapters {names} trainable before wrapping the model (e.g. set requires_grad on their "
              "lora_A/lora_B weights), so that DistributedDataParallel synchronises their gradients")
    if isinstance(model, DistributedDataParallel):
        raise RuntimeError(f"mixed_adapter_batch: {len(frozen)} parameters of the named adapters are frozen, and "
                           f"DistributedDataParallel would not synchronise their gradients; {advice}")
    from torch.distributed.tensor import DTensor

    if torch.distributed.is_available() and torch.distributed.is_initialized() and not all(
            isinstance(p, DTensor) for p in frozen):
        warn_once(f"mixed_adapter_batch: made {len(frozen)} frozen parameters of the named adapters trainable; under "
                  f"DistributedDataParallel their gradients would not be synchronised: {advice}",
                  key="mixed_adapter_batch-ddp")


def _base(layer, x):
    base = layer._frozen_base(x)
    return None if isinstance(base, str) else base


def scaled_operands(layer, adapter: str, compute_dtype) -> tuple | None:
    """(lora_A, lora_B, scaling) of an adapter as the layer functions take them (None when a dtype is not one they
    take). A scaling PEFT holds as a tensor (prepare_model_for_compiled_hotswap makes it one, so that swapping
    adapters does not recompile) is folded into B, with scaling 1: the same product, and still a graph input."""
    A = adapter_operand(layer.lora_A[adapter].weight, compute_dtype)
    B = adapter_operand(layer.lora_B[adapter].weight, compute_dtype)
    if A is None or B is None:
        return None
    scaling = layer.scaling[adapter]
    if isinstance(scaling, torch.Tensor):
        return A, B * scaling.to(device=B.device, dtype=B.dtype), 1.0
    return A, B, scaling


def _adapter_tensors(layer, adapter: str, compute_dtype) -> tuple | None:
    """(lora_A, lora_B, scaling) as scaled_operands gives them, or None when the adapter is not one the layer
    functions can run."""
    if layer.lora_bias.get(adapter, False) or getattr(layer, "fan_in_fan_out", False):
        return None
    if layer._adapter_problem(adapter, compute_dtype) is not None:
        return None
    return scaled_operands(layer, adapter, compute_dtype)


def _plain_adapter(layer, adapter: str, compute_dtype) -> Adapter | None:
    """The adapter as lora_linear_multi takes it, or None when it is not plain LoRA the layer functions accept."""
    if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
        return None
    tensors = _adapter_tensors(layer, adapter, compute_dtype)
    if tensors is None:
        return None
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return Adapter(*tensors, p)


def _call(layer, function, x, compute_dtype, out_dtype, bias, **kwargs) -> torch.Tensor:
    """``function`` on x in the compute dtype with autocast off and the bias in a dtype it takes; the result in
    ``out_dtype`` (as fused_lora.peft runs lora_linear)."""
    if bias is not None and bias.dtype not in side_dtypes(compute_dtype):
        bias = bias.to(compute_dtype)
    device_type = x.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        y = function(x.to(compute_dtype), bias=bias, backend=layer.fused_backend, **kwargs)
    return y.to(out_dtype)


def _dora(layer, x, adapter: str):
    base = _base(layer, x)
    if base is None:
        return None
    weight, compute_dtype, bias, out_dtype = base
    tensors = _adapter_tensors(layer, adapter, compute_dtype)
    magnitude = adapter_operand(layer.lora_magnitude_vector[adapter].weight, compute_dtype)
    if tensors is None or magnitude is None:
        return None
    dropout = layer.lora_dropout[adapter]
    # PEFT's DoRA takes its dropout branch when the layer trains and the dropout is not an Identity
    training = bool(layer.training) and isinstance(dropout, nn.Dropout) and dropout.training
    return _call(layer, dora_linear, x, compute_dtype, out_dtype, bias, weight=weight, lora_A=tensors[0],
                 lora_B=tensors[1], magnitude=magnitude, scaling=tensors[2],
                 dropout_p=dropout.p if training else 0.0, training=training)


def _several(layer, x, active: list[str]):
    base = _base(layer, x)
    if base is None:
        return None
    weight, compute_dtype, bias, out_dtype = base
    adapters = [_plain_adapter(layer, name, compute_dtype) for name in active]
    if any(adapter is None for adapter in adapters):
        return None
    return _call(layer, lora_linear_multi, x, compute_dtype, out_dtype, bias, weight=weight, adapters=adapters)


def _mixed_batch(layer, x, names: list[str]):
    base = _base(layer, x)
    if base is None:
        return None
    weight, compute_dtype, bias, out_dtype = base
    present = list(dict.fromkeys(name for name in names if name != "__base__" and name in layer.lora_A))
    if not present:
        return _call(layer, frozen_linear, x, compute_dtype, out_dtype, bias, weight=weight)
    adapters = [_plain_adapter(layer, name, compute_dtype) for name in present]
    if any(adapter is None for adapter in adapters):
        return None
    index = {name: i for i, name in enumerate(present)}
    ids = torch.tensor([index.get(name, -1) for name in names], device=x.device)
    return _call(layer, lora_linear_multi, x, compute_dtype, out_dtype, bias, weight=weight, adapters=adapters,
                 adapter_ids=ids)
