"""Checking an optimizer state dict before any of it is loaded, so that ``load_state_dict`` is all or nothing.

``check_state_dict`` validates the whole checkpoint of the optimizers in adamw.py (theirs, torch.optim.AdamW's for
PagedAdamW, or bitsandbytes' AdamW8bit / PagedAdamW8bit for the 8-bit ones) against the parameters it is loaded into
and returns each parameter's flat saved state; only then does the optimizer replace anything. Every problem is a
ValueError (TypeError for a wrong kind of object) naming the parameter index and the field:

* layout: a mapping with "state" (a mapping) and "param_groups" (a list of groups with "params" lists);
* step: present, a number (or a one-element tensor), finite, an integer value, >= 0 (a negative or NaN step would
  reach a ZeroDivisionError in the bias corrections, or a ValueError from int());
* moments: tensors of floating point (or uint8 for 8-bit state), of the parameter's shape (torch and bitsandbytes
  save them so; with the number of elements alone, the moments of an (r, K) adapter loaded into a (K, r) one in a
  checkpoint listing them in another order); state1 and state2 of the same kind;
* an empty state (torch's optimizers save ``{}`` for a parameter whose state was read before its first step) is
  no state: the parameter starts afresh, as torch loads it;
* 8-bit state: absmax1 / absmax2 floating point with one value per block of 256 (ceil(numel / 256)), finite;
  qmap1 / qmap2, when saved, 256 finite, sorted values in [-1, 1] (a map of another size fails later in step() with
  an IndexError, an unsorted one quantizes to the wrong codes);
* no tensor on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import codec

__all__ = ["check_state_dict", "check_layout"]


def check_layout(who: str, state_dict) -> None:
    """The outer structure of an optimizer state dict."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{who}: expected a state dict (a mapping), got {type(state_dict).__name__}")
    for key, kind in (("state", Mapping), ("param_groups", (list, tuple))):
        if key not in state_dict:
            raise ValueError(f"{who}: the state dict has no {key!r}; expected torch.optim's state_dict() layout")
        if not isinstance(state_dict[key], kind):
            raise TypeError(f"{who}: state_dict[{key!r}] is a {type(state_dict[key]).__name__}")
    for index, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(f"{who}: param_groups[{index}] is not a parameter group with a 'params' list")


def _check_step(who: str, where: str, step) -> None:
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.device.type == "meta":
            raise ValueError(f"{who}: step of {where} must be a number, got a tensor of shape {tuple(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"{who}: step of {where} must be a number, got {type(step).__name__}")
    if not (math.isfinite(step) and step >= 0 and float(step).is_integer()):
        raise ValueError(f"{who}: step of {where} is {step}; it must be a whole number >= 0")


def _check_tensor(who: str, where: str, key: str, value, kinds: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{who}: {key} of {where} must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{who}: {key} of {where} is on the meta device (no values)")
    if not (value.is_floating_point() or ("uint8" in kinds and value.dtype == torch.uint8)) or value.is_complex():
        raise ValueError(f"{who}: {key} of {where} must be {kinds}, got {value.dtype}")
    return value


def _check_qmap(who: str, where: str, key: str, value) -> None:
    _check_tensor(who, where, key, value, "a floating-point tensor")
    code = value.detach().reshape(-1).float().cpu()
    if code.numel() != 256:
        raise ValueError(f"{who}: {key} of {where} has {code.numel()} values; an 8-bit quantization map has 256")
    if not bool(torch.isfinite(code).all()) or not bool((code.abs() <= 1).all()):
        raise ValueError(f"{who}: {key} of {where} must hold finite values in [-1, 1]")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(f"{who}: {key} of {where} is not sorted; an 8-bit quantization map is sorted ascending")


def _check_moment_values(who: str, where: str, key: str, value: torch.Tensor, nonnegative: bool) -> None:
    """A 32-bit moment holds finite values (and the second moment none below 0), read in chunks of 2^24 (bounded
    temporaries for a large paged state)."""
    for chunk in value.detach().reshape(-1).split(1 << 24):
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"{who}: {key} of {where} holds NaN or inf")
        if nonnegative and bool((chunk < 0).any()):
            raise ValueError(f"{who}: {key} of {where} holds negative values; a second moment is >= 0")


def check_param_state(who: str, saved_id, param: torch.Tensor, saved, eight_bit: bool) -> dict:
    """One parameter's saved state, flat (bitsandbytes' wrapped quantization state unwrapped) and checked."""
    where = f"parameter {saved_id}"
    if not isinstance(saved, Mapping):
        raise TypeError(f"{who}: the state of {where} must be a mapping, got {type(saved).__name__}")
    saved = dict(saved)
    saved.update(saved.pop("__bnb_optimizer_quant_state__", {}))
    if eight_bit:
        moments, expected = ("state1", "state2"), "bitsandbytes' AdamW8bit or an 8-bit fused_lora optimizer"
        if isinstance(saved.get("state1"), torch.Tensor) and saved["state1"].dtype == torch.uint8:
            moments += ("absmax1", "absmax2")
    else:
        moments, expected = ("exp_avg", "exp_avg_sq"), "torch.optim.AdamW or PagedAdamW"
    missing = [key for key in ("step", *moments) if key not in saved]
    if missing:
        raise ValueError(
            f"{who}: the state of {where} has no {', '.join(missing)}; expected a state dict of {expected}"
        )
    _check_step(who, where, saved["step"])
    kinds = "uint8 or floating point" if eight_bit else "floating point"
    for index, key in enumerate(moments[:2]):
        value = _check_tensor(who, where, key, saved[key], kinds)
        if value.shape != param.shape:
            raise ValueError(
                f"{who}: {key} of {where} has shape {tuple(value.shape)}, the parameter has shape "
                f"{tuple(param.shape)} (a checkpoint of another model, or its parameters in another order)"
            )
        if value.dtype != torch.uint8:  # a 32-bit moment: values the next step would turn into NaN weights
            _check_moment_values(who, where, key, value, nonnegative=index == 1)
    if eight_bit and (saved["state1"].dtype == torch.uint8) != (saved["state2"].dtype == torch.uint8):
        raise ValueError(
            f"{who}: state1 and state2 of {where} must both be 8-bit (uint8) or both 32-bit, got "
            f"{saved['state1'].dtype} and {saved['state2'].dtype}"
        )
    if len(moments) == 4:
        blocks = -(-param.numel() // codec.BLOCKSIZE)
        for key in ("absmax1", "absmax2"):
            value = _check_tensor(who, where, key, saved[key], "a floating-point tensor")
            if value.numel() != blocks:
                raise ValueError(
                    f"{who}: {key} of {where} has {value.numel()} values; {param.numel()} elements in blocks of "
                    f"{codec.BLOCKSIZE} need {blocks}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{who}: {key} of {where} holds NaN or inf")
        for key in ("qmap1", "qmap2"):
            if key in saved:
                _check_qmap(who, where, key, saved[key])
    return saved


def check_state_dict(who: str, state_dict, id_map: dict, eight_bit: bool) -> list:
    """[(parameter, flat checked saved state)] for every saved state whose id ``id_map`` maps to a parameter."""
    return [
        (id_map[saved_id], check_param_state(who, saved_id, id_map[saved_id], saved, eight_bit))
        for saved_id, saved in state_dict["state"].items()
        if saved_id in id_map and not (isinstance(saved, Mapping) and len(saved) == 0)  # {}: no state
    ]
