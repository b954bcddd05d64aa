"""End-to-end QLoRA training step: PEFT + bitsandbytes vs the same model after ``fl.patch_peft_model``.

The model is a Llama built from a config (no download), on CUDA the shape of Llama-3.2-1B: hidden 2048,
intermediate 8192, 16 layers, 32 heads (8 KV heads), vocabulary 128256, tied embeddings, ~1.24B parameters.
Every linear layer of the decoder (q, k, v, o, gate, up, down) is replaced by a ``bnb.nn.Linear4bit`` holding
NF4 (blocksize 64, double quantization) of its weight, which is what ``from_pretrained(..., load_in_4bit)`` builds,
and carries a PEFT LoRA adapter (r=16, α=32, fp32 adapters as PEFT keeps them). Gradient checkpointing is on
(non-reentrant). Compute dtype bf16 (float32 on a CPU). One training step is forward + backward +
``torch.optim.AdamW`` on the adapters, batch 2 × sequence 2048 of random tokens from a fixed seed.

Both variants are built from the same seed (same base weights, same adapter init, same batches) in the same run,
one after the other, so the reported ratios are same-run ratios:

* tokens/s: tokens per step ÷ median step time, the first ``WARMUP_STEPS`` steps (Triton autotuning, cuBLAS
  heuristics) excluded;
* peak memory: ``torch.cuda.max_memory_allocated`` while training (the resident model included; the transient
  fp32 initialisation of the weights before NF4 quantization excluded);
* loss agreement: max over steps of |loss_fused − loss_peft| / |loss_peft| (20 steps with ``--quick``, 40 without).

On a CPU the same code runs a tiny config (a few seconds) so that CI tests the tooling; memory is not measured
there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .._common import dtype_name
from ..backend import cuda_available, resolve_backend
from ..cli.quiet import quiet_third_party_notices
from ..peft import patch_peft_model
from .impls import make_linear4bit

__all__ = ["E2EConfig", "gpu_config", "cpu_config", "build_qlora_model", "run_e2e_bench", "main"]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_STEPS = 2


@dataclasses.dataclass
class E2EConfig:
    """Model and run shape of the end-to-end bench."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    steps: int
    r: int = 16
    lora_alpha: int = 32
    lr: float = 1e-3
    seed: int = 0


def gpu_config(quick: bool) -> E2EConfig:
    """~1.24B parameters (the Llama-3.2-1B shape); 40 steps, 20 with ``quick`` (the loss-agreement protocol needs
    20 steps, and bench/gpu_check.sh runs the quick variant)."""
    return E2EConfig(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, seq=2048,
                     batch=2, steps=20 if quick else 40)


def cpu_config(quick: bool) -> E2EConfig:
    """A tiny Llama for CPU runs of the tooling."""
    return E2EConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256, seq=32, batch=2,
                     steps=4 if quick else 6)


def build_qlora_model(config: E2EConfig, device, dtype):
    """The PEFT QLoRA model: Llama from ``config``, decoder linears as NF4 Linear4bit, LoRA on all of them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        hidden_size=config.hidden, intermediate_size=config.intermediate, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.kv_heads, vocab_size=config.vocab,
        max_position_embeddings=max(config.seq, 128), tie_word_embeddings=True, rope_theta=500000.0,
        use_cache=False,
    )
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    model.to(dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGET_MODULES and isinstance(child, torch.nn.Linear):
                setattr(module, name, make_linear4bit(child.weight, dtype))
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed + 1)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _batches(config: E2EConfig, device):
    generator = torch.Generator().manual_seed(config.seed + 2)
    return [torch.randint(0, config.vocab, (config.batch, config.seq), generator=generator).to(device)
            for _ in range(config.steps)]


def _train(impl: str, config: E2EConfig, device, dtype) -> dict:
    """Build the model for ``impl`` ('peft_bnb' or 'fused'), train ``config.steps`` steps, return the measurements."""
    on_cuda = device.type == "cuda"
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    model = build_qlora_model(config, device, dtype)
    patched = None
    if impl == "fused":
        patched = patch_peft_model(model)
        if not patched:
            raise RuntimeError("patch_peft_model swapped no layer of the PEFT QLoRA model")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    if on_cuda:  # the peak of training with the model resident, not of building it (fp32 init, then NF4)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, step_seconds = [], []
    for input_ids in _batches(config, device):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
    peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, optimizer
    timed = step_seconds[WARMUP_STEPS:] or step_seconds
    return {"losses": losses, "step_s": statistics.median(timed), "peak_mem_mb": peak_mem_mb,
            "patched_layers": patched, "trainable_params": trainable}


def run_e2e_bench(quick: bool = False, device=None, config: E2EConfig | None = None):
    """Train PEFT+bitsandbytes and then the patched model; returns (rows, skipped).

    rows follow the results schema (bench "e2e_qlora_step", pass "train_step", M = tokens per step,
    K = hidden, N = intermediate) plus tokens_per_s, losses, steps and, in the fused row, loss_max_rel_diff.
    skipped lists {"impl", "reason"} for a variant that could not run.
    """
    device = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    config = config or (gpu_config(quick) if device.type == "cuda" else cpu_config(quick))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmuls are slow to warm up
    tokens = config.batch * config.seq
    rows, skipped, runs = [], [], {}
    for impl in ("peft_bnb", "fused"):
        try:
            runs[impl] = _train(impl, config, device, dtype)
        except Exception as exc:  # a missing piece (bitsandbytes, patch_peft_model) is reported, not raised
            skipped.append({"impl": impl, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        run = runs[impl]
        rows.append({
            "bench": "e2e_qlora_step", "impl": impl, "pass": "train_step", "M": tokens, "K": config.hidden,
            "N": config.intermediate, "r": config.r, "dtype": dtype_name(dtype),
            "median_ms": run["step_s"] * 1e3,
            "tflops": None, "peak_mem_mb": run["peak_mem_mb"], "tokens_per_s": tokens / run["step_s"],
            "steps": config.steps, "layers": config.layers, "losses": run["losses"],
            "trainable_params": run["trainable_params"], "patched_layers": run["patched_layers"],
            # the backend the patched layers ran ("auto": triton on a GPU, unless Triton is missing or
            # FUSED_LORA_BACKEND says otherwise), so a fallback is not reported as the fused kernels
            "backend": resolve_backend("auto", device) if impl == "fused" else None,
        })
    if "peft_bnb" in runs and "fused" in runs:
        diffs = [abs(f - p) / abs(p) for f, p in zip(runs["fused"]["losses"], runs["peft_bnb"]["losses"])]
        rows[-1]["loss_max_rel_diff"] = max(diffs)
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_lora.bench.e2e [--quick] [--json PATH]``: print tokens/s, memory and loss agreement."""
    quiet_third_party_notices()
    parser = argparse.ArgumentParser(prog="python -m fused_lora.bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows, skipped = run_e2e_bench(quick=args.quick, device=args.device)
    for row in rows:
        memory = "–" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f} MB"
        print(f"{row['impl']:>9}: {row['tokens_per_s']:9.0f} tokens/s  step {row['median_ms']:8.1f} ms  "
              f"peak {memory}  losses {row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}")
    if len(rows) == 2:
        fused, peft = rows[1], rows[0]
        print(f"fused / peft_bnb: tokens/s x{fused['tokens_per_s'] / peft['tokens_per_s']:.2f}, "
              f"max loss relative difference {fused['loss_max_rel_diff']:.2e}")
        if fused["peak_mem_mb"] and peft["peak_mem_mb"]:
            print(f"peak memory x{fused['peak_mem_mb'] / peft['peak_mem_mb']:.2f}")
    for entry in skipped:
        print(f"{entry['impl']}: skipped: {entry['reason']}")
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "skipped": skipped}, indent=1))
    return 0 if rows and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
