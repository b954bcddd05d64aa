"""``python -m fused_lora demo``: QLoRA fine-tuning of a small Llama with the fused LoRA layers.

What it does, start to end:
  1. builds a small Llama-architecture model from a config (random init, no download), or loads ``--model PATH``
     (a local Hugging Face model directory), with its linear layers quantized to NF4 by bitsandbytes;
  2. wraps it with PEFT LoRA (all linear layers) and converts the LoRA layers with ``fl.patch_peft_model``, so
     training runs through ``fused_lora.functional.lora_linear`` (Triton kernels on CUDA, the reference on CPU);
  3. fine-tunes on a synthetic instruction set shipped with the package (``fused_lora/data/instructions.jsonl``,
     byte-level tokens: token = byte + 3 after <pad>, <bos>, <eos>), loss on the response tokens only;
  4. prints the loss at the start and end, tokens/s and peak memory, and checks parity against PEFT +
     bitsandbytes: the same model, weights and batch with the LoRA layers turned back into PEFT's own (on CUDA
     this compares the Triton kernels with bitsandbytes; on the CPU the fused side runs the plain-PyTorch
     reference backend, so it checks the NF4 decoding, the LoRA math and its backward, not the kernels; the
     output says which);
  5. saves the adapter with ``save_pretrained`` (an ordinary PEFT adapter) and a ``metrics.json`` under
     ``--output`` (default ./fused_lora_demo_out), next to ``base_model/`` (the generated base model in float32,
     which the adapter needs; absent with ``--model``).

Exit status 0 when the held-out loss fell below ``LOSS_DECREASE_FACTOR`` times its starting value and parity
holds, 1 otherwise, 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

DATA_FILE = Path(__file__).parent / "data" / "instructions.jsonl"
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n"

DEFAULT_MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# A random output head with the usual init (std 0.02) cannot produce confident logits: after the final RMSNorm
# the largest reachable logit is about 0.02·hidden_size, so LoRA alone could not lower the loss much. The demo's
# frozen head is scaled up once at build time, standing in for a pretrained head.
OUTPUT_HEAD_SCALE = 10.0
# "The loss decreased" means the held-out loss after training is below this fraction of the loss before.
LOSS_DECREASE_FACTOR = 0.8


class ByteTokenizer:
    """Bytes as tokens: id = byte + 3; ids 0, 1, 2 are <pad>, <bos>, <eos>.

    Example:
        >>> ByteTokenizer().encode("Hi")
        [75, 108]
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind ByteTokenizer's interface (for ``--model PATH`` with its own tokenizer).

    pad falls back to eos, and eos to id 0, when the tokenizer has none; bos may be None (then none is added).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = HFTokenizer(AutoTokenizer.from_pretrained("path/to/model"))
        >>> tokenizer.decode(tokenizer.encode("Hi"))
        'Hi'
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------------- data

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _instruction(rng: random.Random) -> tuple[str, str]:
    word = _pseudo_word(rng)
    task = rng.randrange(8)
    if task == 0:
        return f"Reverse the letters of {word}.", word[::-1]
    if task == 1:
        return f"Write {word} in capitals.", word.upper()
    if task == 2:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} plus {b}?", str(a + b)
    if task == 3:
        return f"Repeat {word} twice.", f"{word} {word}"
    if task == 4:
        return f"Sort the letters of {word}.", "".join(sorted(word))
    if task == 5:
        return f"How many letters are in {word}?", str(len(word))
    if task == 6:
        letter = rng.choice("abcdefghijklmnopqrstuvwxy")
        return f"Which letter comes after {letter}?", chr(ord(letter) + 1)
    return f"Spell {word} with dashes.", "-".join(word)


def synthetic_instructions(n: int = 1200, seed: int = 0) -> list[dict]:
    """The shipped instruction set: ``n`` deterministic {"instruction", "response"} pairs over pseudo-words.

    Eight small tasks (reverse, capitals, addition, repeat, sort, count, next letter, spell with dashes).
    ``fused_lora/data/instructions.jsonl`` holds ``synthetic_instructions()`` one JSON object per line.

    Example:
        >>> synthetic_instructions(2)[1]
        {'instruction': 'What is 48 plus 6?', 'response': '54'}
    """
    rng = random.Random(seed)
    return [dict(zip(("instruction", "response"), _instruction(rng))) for _ in range(n)]


def load_instructions(path: str | Path | None = None) -> list[dict]:
    """Read a JSONL file of {"instruction": str, "response": str} (default: the shipped synthetic set).

    Raises ValueError naming the file (and line) when it is missing, empty, or holds a line that is not such an
    object.

    Example:
        >>> load_instructions()[0]
        {'instruction': 'Which letter comes after j?', 'response': 'k'}
    """
    path = Path(path) if path is not None else DATA_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not (isinstance(example, dict) and isinstance(example.get("instruction"), str)
                    and isinstance(example.get("response"), str)):
                raise ValueError(f"{path}:{line_number}: expected an object with string fields 'instruction' and "
                                 "'response'")
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def encode_example(example: dict, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): <bos> prompt response <eos>, labels -100 on the prompt (loss on the response only).

    Both lists have the same length, at most ``max_length`` (the end is cut off).

    Example:
        >>> ids, labels = encode_example({"instruction": "Hi", "response": "ok"}, ByteTokenizer(), 96)
        >>> len(ids), labels[-3:]
        (38, [114, 110, 2])
    """
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(
        PROMPT_TEMPLATE.format(instruction=example["instruction"])
    )
    response = tokenizer.encode(example["response"]) + [tokenizer.eos_id]
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return ids, labels


def split_train_eval(encoded: list, batch_size: int) -> tuple[list, list]:
    """(train, held-out): the last min(10 %, 4 batches) of the examples are held out (at least one).

    Example:
        >>> train_set, eval_set = split_train_eval(list(range(1200)), batch_size=16)
        >>> len(train_set), len(eval_set)
        (1136, 64)
    """
    n_eval = max(1, min(len(encoded) // 10, 4 * batch_size))
    return encoded[:-n_eval], encoded[-n_eval:]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-pad a list of (ids, labels) into int64 input_ids / labels / attention_mask tensors of shape (batch, T),
    T the longest example; padding is ``pad_id`` in input_ids, -100 in labels and 0 in attention_mask.

    Example:
        >>> batch = collate([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])], pad_id=0, device="cpu")
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[1, 5, 6], [1, 7, 0]], [[-100, 5, 6], [-100, 7, -100]])
    """
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, target) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


# ---------------------------------------------------------------------------------------------------------- model


def build_base_model(directory: Path, vocab_size: int, seed: int) -> Path:
    """Save the demo's base model, a Llama built from ``DEFAULT_MODEL_CONFIG`` (random init from ``seed``, output
    head scaled by ``OUTPUT_HEAD_SCALE``), to ``directory`` in float32; returns the directory.

    The saved model is what the adapter was trained on: reload it with a ``BitsAndBytesConfig`` and apply the
    adapter with ``peft.PeftModel.from_pretrained``.

    Example:
        >>> path = build_base_model(Path("out/base_model"), ByteTokenizer.vocab_size, seed=0)
        >>> model = load_quantized_model(path, torch.float32, torch.device("cpu"))
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **DEFAULT_MODEL_CONFIG))
    with torch.no_grad():
        model.lm_head.weight.mul_(OUTPUT_HEAD_SCALE)
    with _quiet_transformers():
        model.save_pretrained(directory)
    return directory


def load_quantized_model(model_path: str | Path, compute_dtype, device):
    """The causal LM at ``model_path`` with its linear layers quantized to NF4 by bitsandbytes (``Linear4bit``,
    double quantization, ``compute_dtype``); embeddings, norms and the output head stay dense, in ``compute_dtype``.
    The whole model is placed on ``device``.

    Example:
        >>> model = load_quantized_model("path/to/model", torch.bfloat16, torch.device("cuda", 0))
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=config, dtype=compute_dtype, device_map={"": str(device)}
        )


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-file progress bars (the demo has its own) for the duration of a block."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load_tokenizer(model_path: str | None):
    """The model's own tokenizer (an ``HFTokenizer``) when ``model_path`` has one, else the byte-level tokenizer.

    Example:
        >>> load_tokenizer(None).vocab_size
        259
    """
    if model_path is not None and any(
        (Path(model_path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(model_path))
    return ByteTokenizer()


# ------------------------------------------------------------------------------------------------------- measures


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


def parity_with_peft(model, batch) -> dict:
    """Loss, logits and LoRA gradients of the fused model and of PEFT + bitsandbytes on one batch.

    The PEFT side is the same model with its LoRA layers turned back into PEFT's classes
    (``unpatch_peft_model``): same NF4 bytes, same adapter tensors, same batch. Run in training mode (LoRA
    dropout must be 0 for an exact comparison). ``parity_sides`` says which code computes each side.

    Returns:
        {"fused_loss", "peft_bnb_loss", "loss_abs_diff", "logits_rel_err" (‖fused − peft‖/‖peft‖ over the
        logits), "lora_grad_rel_err_max" (the largest such error over the LoRA gradients), "lora_grads_compared"}.

    Example:
        >>> parity_with_peft(model, collate(eval_set[:16], pad_id=0, device="cpu"))["logits_rel_err"] < 1e-4
        True
    """
    from .peft import patch_peft_model, unpatch_peft_model
    from .testing import relative_error

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
    """What the parity check compares: which code computes each side on ``backend`` ("triton" or "reference").

    Example:
        >>> parity_sides("triton")[:38]
        'fused: the Triton kernels (NF4 decoded'
    """
    peft_side = "PEFT+bitsandbytes: PEFT's LoRA layers over bitsandbytes' dequantize_4bit + matmul"
    if backend == "triton":
        return f"fused: the Triton kernels (NF4 decoded inside the GEMM, LoRA term fused); {peft_side}"
    return (
        f"fused: backend {backend!r}, plain PyTorch (fused_lora's own NF4 dequantization + matmul, its explicit LoRA "
        f"backward), NOT the Triton kernels, which run on CUDA; {peft_side}. Both sides decode the same NF4 bytes to "
        "the same weights, so the forward may agree to the last bit"
    )


def _parity_tolerance(compute_dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(compute_dtype, 5e-2)


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    """Mean loss over ``batches`` (model kept in its current mode; LoRA dropout off in the demo), without grad.

    Example:
        >>> loss = held_out_loss(model, [collate(eval_set[:16], pad_id=0, device="cpu")])   # a float
    """
    return sum(model(**batch).loss.item() for batch in batches) / len(batches)


# ----------------------------------------------------------------------------------------------------------- main


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


def _qlora_model(model_path, compute_dtype, device, rank: int):
    """NF4 model + PEFT LoRA on every linear layer, converted by patch_peft_model; (model, fused layer count)."""
    from peft import LoraConfig, get_peft_model

    from .peft import patch_peft_model

    model = load_quantized_model(model_path, compute_dtype, device)
    lora_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute that PEFT reads in get_peft_model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora_config)
    return model, patch_peft_model(model)


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
           f"[{'OK' if metrics['parity_ok'] else 'MISMATCH'} at tolerance {metrics['parity_tolerance']:.0e}]")
    _print(f"  compared: {metrics['parity_sides']}")
    _print(f"adapter saved in PEFT format to {metrics['adapter_dir']}{os.sep} "
           f"(metrics in {Path(metrics['adapter_dir']).parent / 'metrics.json'})")


class DemoInputError(ValueError):
    """Unusable arguments or input files: the demo prints the message on one line and exits with status 2."""


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
            _print(f"fused-lora demo: {error}")
            return 2


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run a block with torch's intra-op CPU thread count set to ``threads``, restoring the previous count after.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device(name: str | None) -> torch.device:
    """The torch device for ``--device`` (default: the current CUDA device if there is one, else the CPU)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise DemoInputError(f"--device {name!r} is not a device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoInputError(f"--device {name} asked for CUDA, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise DemoInputError(f"--device {name} is not supported; use cpu or cuda[:index]")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
    """``_qlora_model`` for ``model_path``, with a DemoInputError when it cannot load, has no layer the fused path
    covers, or has fewer token embeddings than the tokenizer needs."""
    try:
        model, n_fused = _qlora_model(model_path, compute_dtype, device, args.rank)
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
    from .functional import resolve_backend

    device = _device(args.device)
    try:
        backend = resolve_backend("auto", device)
    except (RuntimeError, ValueError) as error:
        raise DemoInputError(str(error)) from None
    if args.model is not None and not Path(args.model).is_dir():
        raise DemoInputError(f"--model {args.model} is not a directory (give a local Hugging Face model directory)")
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    output = Path(args.output)
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
    tolerance = _parity_tolerance(compute_dtype)
    window = max(1, min(10, len(losses) // 5))

    adapter_dir = output / "adapter"
    model.save_pretrained(adapter_dir)
    metrics = {
        "device": str(device),
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
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
        "parity_ok": max(parity["loss_abs_diff"], parity["logits_rel_err"], parity["lora_grad_rel_err_max"])
        <= tolerance,
        "adapter_dir": str(adapter_dir),
        "base_model": str(model_path),
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _print_summary(metrics)
    return 0 if metrics["loss_decreased"] and metrics["parity_ok"] else 1
