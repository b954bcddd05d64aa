"""One rank of tests/test_distributed.py, launched with torchrun (gloo, CPU): DDP and FSDP2 (fully_shard) over a
tiny 4-bit PEFT model, plain and patched, three AdamW steps each on rank-specific batches. Writes
``rank<r>.pt`` to the output folder: per (mode, fused) the losses, the first step's LoRA gradients and the final
adapters (full tensors, gathered from the shards), and for FSDP2 how one NF4 weight is sharded and the dtypes
FSDP2 all-gathered.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_distributed_worker.py MODEL_DIR OUT_DIR
"""

import os
import re
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _peft_helpers import batch, fused_layers, load_qlora_base, make_peft  # noqa: E402

import fused_lora as fl  # noqa: E402

STEPS = 3


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (gathered from every rank: all ranks must call it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_name(name: str) -> str:
    return re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name.removeprefix("module."))


def record_all_gathers(log: list) -> dict:
    """Record the dtype of every all-gather input (what FSDP2 sends: all_gather_single in torch 2.13,
    all_gather_into_tensor before); returns the originals for restore_all_gathers."""
    originals = {}
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)

            def recorded(output, input, *args, _original=originals[name], **kwargs):
                log.append(input.dtype)
                return _original(output, input, *args, **kwargs)

            setattr(dist, name, recorded)
    return originals


def run(mode: str, fused: bool, model_dir: str, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_peft(load_qlora_base(model_dir), seed=1)  # the same adapters on every rank
    if fused:
        assert fl.patch_peft_model(model) == 14
    info = {}
    gathers: list = []
    if mode == "fsdp":
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        info["nf4_shard"] = (type(weight).__name__, str(weight.placements), weight.to_local().dtype,
                             weight.to_local().numel(), weight.numel())
        originals = record_all_gathers(gathers)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], {}
    counts = {"lora_linear": 0}
    if fused:
        real = fl.peft.lora_linear

        def counted(*args, **kwargs):
            counts["lora_linear"] += 1
            return real(*args, **kwargs)

        fl.peft.lora_linear = counted
    try:
        for step in range(STEPS):
            loss = model(**batch(seed=100 + 10 * step + rank)).loss
            loss.backward()
            if step == 0:
                grads = {lora_name(n): full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        if fused:
            fl.peft.lora_linear = real
        if mode == "fsdp":
            for name, function in originals.items():
                setattr(dist, name, function)
    adapters = {lora_name(n): full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    info["fused_layers"] = len(fused_layers(model))
    info["lora_linear_calls"] = counts["lora_linear"]
    return {"losses": losses, "grads": grads, "adapters": adapters, "all_gather_dtypes": sorted(set(map(str, gathers))),
            **info}


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {(mode, fused): run(mode, fused, model_dir, rank) for mode in ("ddp", "fsdp") for fused in (False, True)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
