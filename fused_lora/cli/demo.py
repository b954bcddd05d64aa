"""``python -m fused_lora demo``: QLoRA fine-tuning of a small Llama with the fused LoRA layers.

What it does, start to end:
  1. builds a small Llama-architecture model from a config (random init, no download), or loads ``--model PATH``
     (a local Hugging Face model directory), with its linear layers quantized to NF4 by bitsandbytes;
  2. wraps it with PEFT LoRA (all linear layers) and converts the LoRA layers with ``fl.patch_peft_model``, so
     training runs through ``fused_lora.functional.lora_linear`` (Triton kernels on CUDA, the "cpu" backend's C++
     NF4 decoding and BLAS GEMMs on a CPU);
  3. fine-tunes on a synthetic instruction set shipped with the package (``fused_lora/data/instructions.jsonl``,
     byte-level tokens: token = byte + 3 after <pad>, <bos>, <eos>), loss on the response tokens only;
  4. prints the loss at the start and end, tokens/s and peak memory, and checks parity against PEFT +
     bitsandbytes: the same model, weights and batch with the LoRA layers turned back into PEFT's own (on CUDA
     this compares the Triton kernels with bitsandbytes; on the CPU the fused side runs the "cpu" backend, so it
     checks its NF4 decoding, the LoRA math and its backward, not the Triton kernels; the output says which);
  5. saves the adapter with ``save_pretrained`` (an ordinary PEFT adapter) and a ``metrics.json`` under
     ``--output`` (default ./fused_lora_demo_out), next to ``base_model/`` (the generated base model in float32,
     which the adapter needs; absent with ``--model``).

Exit status 0 when the held-out loss fell below ``LOSS_DECREASE_FACTOR`` times its starting value and parity
holds (or is not judged because bitsandbytes' own CPU dequantization is wrong for a layer's shape, which the output
says), 1 otherwise, 2 for unusable arguments or files (one line, no traceback): an --output that is a file or not
writable, a symbolic link among the demo's outputs in it, a --model that does not load (a pickle checkpoint that
needs more than torch.load(weights_only=True) included). The held-out loss and the parity check run in eval mode,
so a model's own dropout (e.g. OPT's) does not draw different masks on the two sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch

from .._common import dtype_name
from ..backend import parse_device, resolve_backend
from ..testing import torch_threads
from .demo_data import (
    DATA_FILE,
    HFTokenizer,
    collate,
    encode_example,
    load_instructions,
    load_tokenizer,
    split_train_eval,
)
from .demo_model import build_base_model, qlora_model
from .demo_train import (
    bnb_wrong_layers,
    held_out_loss,
    parity_sides,
    parity_tolerance,
    parity_with_peft,
    peak_memory,
    train,
)

__all__ = ["LOSS_DECREASE_FACTOR", "DemoInputError", "main"]

# "The loss decreased" means the held-out loss after training is below this fraction of the loss before.
LOSS_DECREASE_FACTOR = 0.8


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fused_lora demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--model", default=None, help="local Hugging Face causal-LM directory (default: tiny Llama)")
    parser.add_argument("--data", default=None, help="JSONL of {instruction, response} (default: shipped set)")
    parser.add_argument("--output", default="fused_lora_demo_out", help="output directory (adapter + metrics)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the demo's matrices are too small to gain from more, and several "
        "spinning threads slow down badly on a busy machine)",
    )
    args = parser.parse_args(argv)
    for option, minimum in (("steps", 1), ("threads", 1), ("batch_size", 1), ("rank", 1), ("max_length", 2)):
        if getattr(args, option) < minimum:
            parser.error(f"--{option.replace('_', '-')} must be at least {minimum}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    return args


def _print(*values) -> None:
    print(*values, flush=True)


def _print_summary(metrics: dict) -> None:
    parity = metrics["parity"]
    _print(f"loss (train, mean of {metrics['loss_window']} steps): start {metrics['train_loss_start']:.4f} -> "
           f"end {metrics['train_loss_end']:.4f}")
    _print(f"loss (held-out): before {metrics['eval_loss_before']:.4f} -> after {metrics['eval_loss_after']:.4f}  "
           f"[{'decreased' if metrics['loss_decreased'] else 'DID NOT DECREASE'}]")
    _print(f"throughput: {metrics['tokens_per_s']:,.0f} tokens/s ({metrics['tokens']:,} tokens in "
           f"{metrics['train_seconds']:.1f} s)")
    _print(f"peak memory: {metrics['peak_memory_mib']:,.1f} MiB ({metrics['peak_memory_kind']})")
    _print(f"parity vs PEFT+bitsandbytes (same weights, same batch): |loss diff| {parity['loss_abs_diff']:.2e}, "
           f"logits rel err {parity['logits_rel_err']:.2e}, LoRA grad rel err (max of "
           f"{parity['lora_grads_compared']}) {parity['lora_grad_rel_err_max']:.2e}  "
           f"[{_verdict(metrics)}]")
    _print(f"  compared: {metrics['parity_sides']}")
    _print(f"adapter saved in PEFT format to {metrics['adapter_dir']}{os.sep} "
           f"(metrics in {Path(metrics['adapter_dir']).parent / 'metrics.json'})")


def _verdict(metrics: dict) -> str:
    """The parity line's verdict: OK, MISMATCH, or not judged where bitsandbytes' CPU dequantization is wrong."""
    tolerance = f"at tolerance {metrics['parity_tolerance']:.0e}"
    if metrics["parity_ok"] is None:
        wrong = metrics["bnb_cpu_dequantize_wrong"]
        return (f"NOT JUDGED: bitsandbytes' CPU dequantization is wrong for this shape ({wrong[0]}"
                f"{f' and {len(wrong) - 1} more layers' if len(wrong) > 1 else ''}); the PEFT side is the wrong one")
    return f"{'OK' if metrics['parity_ok'] else 'MISMATCH'} {tolerance}"


class DemoInputError(ValueError):
    """Unusable arguments or input files: the demo prints the message on one line and exits with status 2."""


# What the demo writes under --output (the adapter, its metrics, the generated base model).
OUTPUT_NAMES = ("adapter", "metrics.json", "base_model")


def _check_output(output: Path) -> None:
    """--output must be a directory that exists or can be created and written, and none of the demo's own output
    paths in it (OUTPUT_NAMES, or anything below them) a symbolic link: the demo would write through it."""
    for part in (output, *output.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise DemoInputError(f"--output {output}: {part} exists and is not a directory")
            if not os.access(part, os.W_OK | os.X_OK):
                raise DemoInputError(f"--output {output}: {part} is not writable")
            break
    for name in OUTPUT_NAMES:
        path = output / name
        if path.is_symlink():
            links = [path]
        else:
            links = sorted(p for p in path.rglob("*") if p.is_symlink()) if path.is_dir() else []
        if links:
            raise DemoInputError(
                f"--output {output}: {links[0]} is a symbolic link; the demo writes {name} there and does not write "
                "through links (remove it or choose another --output)"
            )


def _write_new_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` without following a symbolic link planted there (O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``argv`` as after ``python -m fused_lora demo`` (see ``--help``). Returns the exit status.

    Example:
        >>> status = main(["--steps", "50", "--output", "/tmp/demo"])   # 0: the loss fell and parity held
    """
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    with torch_threads(args.threads):
        try:
            return _run(args)
        except DemoInputError as error:
            print(f"fused-lora demo: {' '.join(str(error).split())}", file=sys.stderr)
            return 2


def _device(name: str | None) -> torch.device:
    """The torch device for ``--device`` (backend.parse_device: default the current CUDA device, else the CPU)."""
    try:
        return parse_device(name)
    except ValueError as error:
        raise DemoInputError(str(error)) from None


def _encoded_data(args, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The examples of ``--data`` as (ids, labels); each must keep a response token within ``--max-length``."""
    try:
        examples = load_instructions(args.data)
    except ValueError as error:
        raise DemoInputError(str(error)) from None
    if len(examples) < 2:
        raise DemoInputError("the data set needs at least 2 examples (one to train on, one held out)")
    encoded = [encode_example(example, tokenizer, args.max_length) for example in examples]
    cut = sum(all(label == -100 for label in labels) for _, labels in encoded)
    if cut:
        longest_prompt = max(len(encode_example({**e, "response": ""}, tokenizer, 2**31)[0]) - 1 for e in examples)
        raise DemoInputError(
            f"--max-length {args.max_length} leaves no response token in {cut} of {len(encoded)} examples (the "
            f"longest prompt is {longest_prompt} tokens); use --max-length {longest_prompt + 1} or more"
        )
    return encoded


def _checked_model(args, model_path, compute_dtype, device, tokenizer):
    """``qlora_model`` for ``model_path``, with a DemoInputError when it cannot load, has no layer the fused path
    covers, or has fewer token embeddings than the tokenizer needs."""
    try:
        model, n_fused = qlora_model(model_path, compute_dtype, device, args.rank)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
                      str(error).splitlines()[0] if str(error) else type(error).__name__)  # fmt: skip
        raise DemoInputError(
            f"could not load --model {model_path}: its pickle checkpoint does not load with torch.load("
            f"weights_only=True) ({detail}); the demo runs no pickled code: save the model as safetensors"
        ) from None
    except (OSError, ValueError) as error:
        raise DemoInputError(f"could not load --model {model_path} as a causal LM ({error})") from None
    if n_fused == 0:
        raise DemoInputError(
            f"{model_path} has no LoRA layer that fused-lora can run (it needs nn.Linear or NF4 Linear4bit bases)"
        )
    embeddings = model.get_input_embeddings().num_embeddings
    if embeddings < tokenizer.vocab_size:
        tokenizer_name = "its tokenizer" if isinstance(tokenizer, HFTokenizer) else "the byte-level tokenizer"
        raise DemoInputError(
            f"{model_path} has {embeddings} token embeddings; {tokenizer_name} needs {tokenizer.vocab_size}"
        )
    return model, n_fused


def _run(args) -> int:
    device = _device(args.device)
    try:
        backend = resolve_backend("auto", device)
    except (RuntimeError, ValueError) as error:
        raise DemoInputError(str(error)) from None
    if args.model is not None and not Path(args.model).is_dir():
        raise DemoInputError(f"--model {args.model} is not a directory (give a local Hugging Face model directory)")
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    output = Path(args.output)
    _check_output(output)
    torch.manual_seed(args.seed)

    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as error:
        raise DemoInputError(f"could not load the tokenizer of --model {args.model} ({error})") from None
    train_set, eval_set = split_train_eval(_encoded_data(args, tokenizer), args.batch_size)
    eval_batches = [
        collate(eval_set[i : i + args.batch_size], tokenizer.pad_id, device)
        for i in range(0, len(eval_set), args.batch_size)
    ]

    model_path = args.model or build_base_model(output.resolve() / "base_model", tokenizer.vocab_size, args.seed)
    model, n_fused = _checked_model(args, model_path, compute_dtype, device, tokenizer)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    source = args.model or f"tiny Llama from config (random init, saved to {model_path})"
    _print(f"fused-lora demo: {source} on {device} ({compute_dtype}), NF4 base via bitsandbytes")
    _print(f"  LoRA r={args.rank} on {n_fused} layers fused by patch_peft_model, backend {backend}; "
           f"trainable {trainable:,} of {total:,} parameters")
    _print(f"  data: {len(train_set)} training / {len(eval_set)} held-out examples from {args.data or DATA_FILE.name}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_before = held_out_loss(model, eval_batches)
    losses, tokens, elapsed = train(
        model, train_set, tokenizer.pad_id, device, args.steps, args.batch_size, args.lr, args.seed
    )
    eval_after = held_out_loss(model, eval_batches)
    memory_mib, memory_kind = peak_memory(device)
    parity = parity_with_peft(model, eval_batches[0])
    tolerance = parity_tolerance(compute_dtype)
    window = max(1, min(10, len(losses) // 5))

    wrong_layers = bnb_wrong_layers(model)
    within = max(parity["loss_abs_diff"], parity["logits_rel_err"], parity["lora_grad_rel_err_max"]) <= tolerance

    _check_output(output)  # again: nothing may have planted a link while the model trained
    adapter_dir = output / "adapter"
    model.save_pretrained(adapter_dir)
    metrics = {
        "device": str(device),
        "compute_dtype": dtype_name(compute_dtype),
        "backend": backend,
        "fused_layers": n_fused,
        "steps": args.steps,
        "loss_window": window,
        "train_loss_start": sum(losses[:window]) / window,
        "train_loss_end": sum(losses[-window:]) / window,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "loss_decreased": eval_after < LOSS_DECREASE_FACTOR * eval_before,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "train_seconds": elapsed,
        "peak_memory_mib": memory_mib,
        "peak_memory_kind": memory_kind,
        "parity": parity,
        "parity_tolerance": tolerance,
        "parity_sides": parity_sides(backend),
        "parity_ok": None if wrong_layers and not within else within,
        "bnb_cpu_dequantize_wrong": wrong_layers,
        "adapter_dir": str(adapter_dir),
        "base_model": str(model_path),
    }
    _write_new_file(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _print_summary(metrics)
    return 0 if metrics["loss_decreased"] and metrics["parity_ok"] is not False else 1
