"""The demo's data: tokenizers (byte-level, or a local model's own) and the instruction set.

The shipped set ``fused_lora/data/instructions.jsonl`` (a package resource) holds ``synthetic_instructions()``, one
{"instruction", "response"} JSON object per line. Byte-level tokens: token = byte + 3 after <pad>, <bos>, <eos>.
An example is encoded as <bos> prompt response <eos> with the loss on the response only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

__all__ = ["DATA_FILE", "PROMPT_TEMPLATE", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "synthetic_instructions",
           "load_instructions", "encode_example", "split_train_eval", "collate"]

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "instructions.jsonl"
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n"


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
