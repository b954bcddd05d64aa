"""Shared helpers of the integration tests over tiny transformers models (test_peft_frozen, test_trl,
test_apply, test_distributed, test_custom_ops): a tiny Llama saved once per session, loaded dense or 4-bit (NF4,
double quant) at a chosen compute dtype, a PEFT model over it, token batches, and spies on the layer functions.

Sizes: hidden 64, 2 layers, vocab 128, so a training step of the whole model takes milliseconds on the CPU. Every
in_features is a multiple of 64 (bitsandbytes 0.50.2's CPU dequantize_4bit is wrong for in_features % 16 == 0 but
% 64 != 0) and every out_features a multiple of 32 (bitsandbytes' CPU repack needs N % 32 == 0)."""

from __future__ import annotations

import contextlib
import re
import warnings

import torch

import fused_lora as fl

VOCAB = 128
N_LINEAR = 2 * 7  # q, k, v, o, gate, up, down per layer


def save_tiny_llama(path, num_hidden_layers=2) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def bnb_config(compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_qlora_base(path, compute_dtype=torch.float32, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(compute_dtype), dtype=dtype)
    fl.bnb_compat.keep_bnb_cpu_layout(model)  # an exact bitsandbytes reference on CPUs with AVX512-BF16 too
    return model.train()


def load_dense_base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).train()


def lora_config(**overrides):
    from peft import LoraConfig

    # init_lora_weights=False gives B != 0, so the LoRA path contributes to the output and to every gradient.
    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    options.update(overrides)
    return LoraConfig(**options)


def make_peft(base, seed=1, **overrides):
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecates an attribute PEFT reads
        return get_peft_model(base, lora_config(**overrides)).train()


def batch(seed=2, batch_size=2, length=23):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    return {"input_ids": ids, "labels": ids}


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, fl.peft._FusedLoraForward)]


def lora_grads(model) -> dict:
    """The LoRA gradients keyed by parameter name without the adapter name."""
    return {re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name): p.grad.clone()
            for name, p in model.named_parameters() if p.grad is not None}


def count_calls(monkeypatch, *names) -> dict:
    """Count calls of fused_lora.peft's layer functions (``lora_linear``, ``frozen_linear``) and of bitsandbytes'
    ``Linear4bit.forward`` (``bnb_forward``) from now until the test ends; returns the counter dict."""
    import bitsandbytes as bnb

    counts = dict.fromkeys(names, 0)

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    for name in names:
        if name == "bnb_forward":
            monkeypatch.setattr(bnb.nn.Linear4bit, "forward", counted(name, bnb.nn.Linear4bit.forward))
        else:
            monkeypatch.setattr(fl.peft, name, counted(name, getattr(fl.peft, name)))
    return counts


@contextlib.contextmanager
def no_fallback_warning():
    """Fail when a fused layer hands a forward to PEFT ("uses PEFT's own forward") inside the block. Call it with
    fused_lora._common._warned reset (the warning is issued once per process)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in record if "PEFT's own forward" in str(w.message)]
    assert not fallbacks, fallbacks


def save_char_tokenizer(path):
    """A character-level fast tokenizer (no download): <pad>=0, <s>=1, </s>=2, <unk>=3, then printable characters,
    VOCAB ids in all, saved beside the model so TRL's trainers can load it."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + " .,?!:'-" + string.ascii_uppercase
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast
