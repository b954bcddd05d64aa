"""The demo's model: a small Llama built from a config (or a local Hugging Face model), loaded with its linear layers
quantized to NF4 by bitsandbytes, and wrapped with PEFT LoRA converted by ``patch_peft_model``.

transformers, PEFT and bitsandbytes are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..bnb_compat import keep_bnb_cpu_layout
from ..peft import patch_peft_model

__all__ = ["DEFAULT_MODEL_CONFIG", "OUTPUT_HEAD_SCALE", "build_base_model", "load_quantized_model", "qlora_model"]

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
        model = AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=config, dtype=compute_dtype, device_map={"": str(device)}
        )
    keep_bnb_cpu_layout(model)  # the parity check's PEFT side is bitsandbytes' exact dequantize + matmul, every CPU
    return model


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


def qlora_model(model_path, compute_dtype, device, rank: int):
    """NF4 model + PEFT LoRA on every linear layer, converted by patch_peft_model; (model, fused layer count)."""
    from peft import LoraConfig, get_peft_model

    model = load_quantized_model(model_path, compute_dtype, device)
    lora_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute that PEFT reads in get_peft_model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora_config)
    return model, patch_peft_model(model)
