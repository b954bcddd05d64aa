"""The demo's training and measurements: the training loop, the held-out loss, peak memory, and the parity check
of the fused model against PEFT + bitsandbytes on the same weights and batch.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time

import torch

from ..nf4 import bnb_cpu_dequantize_is_wrong
from ..peft import patch_peft_model, unpatch_peft_model
from ..testing import relative_error
from .demo_data import collate

__all__ = ["train", "held_out_loss", "peak_memory", "eval_mode", "bnb_wrong_layers", "parity_with_peft", "parity_sides",
           "parity_tolerance"]


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): CUDA max allocated on a GPU, the process's peak RSS on the CPU.

    Example:
        >>> peak_memory(torch.device("cpu"))[1]
        'process peak RSS'
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _loss_logits_grads(model, batch) -> tuple[float, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), out.logits.detach().float(), grads


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for a block (its own dropout, e.g. OPT's 0.1, and LoRA dropout off), each module's
    training flag restored after. bitsandbytes would repack its layers' weights for its CPU inference kernel here
    (a base layer's input does not require grad); load_quantized_model keeps it from doing so
    (bnb_compat.keep_bnb_cpu_layout)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def bnb_wrong_layers(model) -> list[str]:
    """The model's bitsandbytes 4-bit layers whose weights bitsandbytes' own CPU dequantize_4bit gets wrong
    (``fused_lora.nf4.bnb_cpu_dequantize_is_wrong``), as "name (out, in), blocksize b"; empty off the CPU.

    Example:
        >>> bnb_wrong_layers(model)          # on a CPU with AVX-512F, a model with in_features 160
        ['base_model.model.model.layers.0.mlp.down_proj.base_layer (64, 160), blocksize 64', ...]
    """
    wrong = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")  # the Linear4bit itself, not a PEFT layer that forwards .weight
        state = getattr(weight, "quant_state", None)
        if state is None or weight.device.type != "cpu" or getattr(state, "shape", None) is None:
            continue
        if bnb_cpu_dequantize_is_wrong(state.shape, state.blocksize):
            wrong.append(f"{name} {tuple(state.shape)}, blocksize {state.blocksize}")
    return wrong


def parity_with_peft(model, batch) -> dict:
    """Loss, logits and LoRA gradients of the fused model and of PEFT + bitsandbytes on one batch.

    The PEFT side is the same model with its LoRA layers turned back into PEFT's classes
    (``unpatch_peft_model``): same NF4 bytes, same adapter tensors, same batch. Both sides run in eval mode with
    gradients (``eval_mode``), so neither the model's own dropout nor LoRA dropout draws different masks on the two
    sides. ``parity_sides`` says which code computes each side; ``bnb_wrong_layers`` where the PEFT side's
    bitsandbytes CPU dequantization is known to be wrong.

    Returns:
        {"fused_loss", "peft_bnb_loss", "loss_abs_diff", "logits_rel_err" (‖fused − peft‖/‖peft‖ over the
        logits), "lora_grad_rel_err_max" (the largest such error over the LoRA gradients), "lora_grads_compared"}.

    Example:
        >>> parity_with_peft(model, collate(eval_set[:16], pad_id=0, device="cpu"))["logits_rel_err"] < 1e-4
        True
    """
    with eval_mode(model):
        fused_loss, fused_logits, fused_grads = _loss_logits_grads(model, batch)
        unpatch_peft_model(model)
        try:
            peft_loss, peft_logits, peft_grads = _loss_logits_grads(model, batch)
        finally:
            patch_peft_model(model)
    grad_errors = [relative_error(fused_grads[name], peft_grads[name]) for name in peft_grads]
    return {
        "fused_loss": fused_loss,
        "peft_bnb_loss": peft_loss,
        "loss_abs_diff": abs(fused_loss - peft_loss),
        "logits_rel_err": relative_error(fused_logits, peft_logits),
        "lora_grad_rel_err_max": max(grad_errors),
        "lora_grads_compared": len(grad_errors),
    }


def parity_sides(backend: str) -> str:
    """What the parity check compares: which code computes each side on ``backend`` ("triton", "cpu" or
    "reference").

    Example:
        >>> parity_sides("triton")[:38]
        'fused: the Triton kernels (NF4 decoded'
    """
    peft_side = "PEFT+bitsandbytes: PEFT's LoRA layers over bitsandbytes' dequantize_4bit + matmul"
    if backend == "triton":
        return f"fused: the Triton kernels (NF4 decoded inside the GEMM, LoRA term fused); {peft_side}"
    if backend == "cpu":
        return (
            f"fused: backend 'cpu', the CPU kernels (fused_lora._C's NF4 dequantization into the GEMM's dtype, BLAS "
            f"GEMMs with the LoRA term and bias added in place), NOT the Triton kernels, which run on CUDA; "
            f"{peft_side}. Both sides decode the same NF4 bytes to the same weights; the GEMMs sum in another order"
        )
    return (
        f"fused: backend {backend!r}, plain PyTorch (fused_lora's own NF4 dequantization + matmul, its explicit LoRA "
        f"backward), NOT the Triton kernels, which run on CUDA; {peft_side}. Both sides decode the same NF4 bytes to "
        "the same weights, so the forward may agree to the last bit"
    )


def parity_tolerance(compute_dtype) -> float:
    """The largest parity error (loss difference, logits and LoRA-gradient relative errors) the demo accepts: 1e-4
    in float32, 1e-8 in float64, 5e-2 in half precision (bf16/fp16 rounding differs between the two sides).

    Example:
        >>> parity_tolerance(torch.float32)
        0.0001
    """
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(compute_dtype, 5e-2)


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    """Mean loss over ``batches`` in eval mode (no dropout of the model's own or LoRA's), without grad.

    Example:
        >>> loss = held_out_loss(model, [collate(eval_set[:16], pad_id=0, device="cpu")])   # a float
    """
    with eval_mode(model):
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def train(model, train_set: list, pad_id: int, device, steps: int, batch_size: int, lr: float, seed: int):
    """AdamW on the trainable (LoRA) parameters with a cosine schedule, reshuffling ``train_set`` each epoch.

    Returns (per-step losses, number of non-pad tokens seen, seconds).

    Example:
        >>> losses, tokens, seconds = train(model, train_set, pad_id=0, device=torch.device("cpu"), steps=300,
        ...                                 batch_size=16, lr=3e-3, seed=0)
    """
    from tqdm import tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    order = torch.Generator().manual_seed(seed)
    permutation, cursor = [], 0
    losses, tokens = [], 0
    progress = tqdm(range(steps), desc="fine-tuning", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    for _ in progress:
        if cursor + batch_size > len(permutation):
            permutation, cursor = torch.randperm(len(train_set), generator=order).tolist(), 0
        batch = collate([train_set[i] for i in permutation[cursor : cursor + batch_size]], pad_id, device)
        cursor += batch_size
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    progress.close()
    return losses, tokens, elapsed
