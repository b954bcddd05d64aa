"""TRL's trainers over a patched 4-bit model (tiny Llama, CPU, reference backend): SFTTrainer, DPOTrainer with
ref_model=None (the reference is the model under disable_adapter()) and GRPOTrainer (with a KL term, so it uses the
reference too), at 4-bit compute dtypes fp32 / fp16 / bf16, with the adapters in bf16 (TRL casts a quantized
model's adapters to bf16) or fp32, and once under TRL's default bf16 autocast.

Every fused run stays on the fused path (lora_linear for the policy, frozen_linear for the reference, no fallback
warning) and logs the same losses as the same trainer over plain PEFT + bitsandbytes:
* fp32 compute and fp32 adapters: both sides compute the same fp32 arithmetic; losses within 1e-5.
* otherwise PEFT runs its LoRA path in the adapter dtype and adds it to a base rounded to the compute dtype, while
  the fused layer accumulates the low-rank path in fp32 and rounds once. The losses are then compared by the
  project's rule (docs/DESIGN.md, "Numerics"): |fused − exact| ≤ 2·|PEFT − exact| + 5e-4, where "exact" is the
  same trainer over plain PEFT in fp32 / fp32 (DPO's loss near ln 2 amplifies the policy-reference margin, so
  16-bit differences of a few 1e-4 are normal on both sides).
DPO's first loss is ln 2 exactly (the policy equals the reference while lora_B = 0).
"""

import math
import warnings

import pytest
import torch
from _peft_helpers import count_calls, load_qlora_base, no_fallback_warning, save_char_tokenizer, save_tiny_llama

import fused_lora as fl

trl = pytest.importorskip("trl", reason="TRL is a test requirement (pip install trl)")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEPS = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    path = tmp_path_factory.mktemp("tiny_llama_trl")
    save_tiny_llama(path)
    save_char_tokenizer(path)
    return str(path)


def _datasets(kind):
    from datasets import Dataset

    prompts = ["the cat", "a dog", "one two", "hello"]
    if kind == "sft":
        return Dataset.from_dict({"text": ["the cat sat on the mat.", "a dog ran far away!", "one two three four",
                                           "hello world, hi there"]})
    if kind == "dpo":
        return Dataset.from_dict({"prompt": prompts, "chosen": [" sat.", " ran.", " three", " world"],
                                  "rejected": [" flew", " sang", " nine", " moon"]})
    return Dataset.from_dict({"prompt": prompts})


def _length_reward(completions, **kwargs):
    return [len(completion) / 10 for completion in completions]


def make_trainer(kind, path, compute_dtype, bf16=False, output_dir=None):
    """A TRL trainer of ``kind`` over the 4-bit tiny Llama; TRL builds the PEFT model from the LoraConfig (and casts
    its adapters to bf16)."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    common = dict(output_dir=output_dir, max_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True, bf16=bf16,
                  learning_rate=1e-2, save_strategy="no", seed=0, dataloader_num_workers=0)
    model = load_qlora_base(path, compute_dtype=compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    data = _datasets(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "sft":
            args = trl.SFTConfig(per_device_train_batch_size=2, max_length=32, **common)
            return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                  peft_config=peft_config)
        if kind == "dpo":
            args = trl.DPOConfig(per_device_train_batch_size=2, max_length=32, **common)
            return trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data,
                                  processing_class=tokenizer, peft_config=peft_config)
        args = trl.GRPOConfig(per_device_train_batch_size=4, num_generations=2, max_completion_length=6, beta=0.1,
                              **common)
        return trl.GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=data,
                               processing_class=tokenizer, peft_config=peft_config)


def cast_adapters(model, dtype):
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def train_losses(trainer):
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


_plain_runs: dict = {}


def plain_losses(kind, path, compute, adapters, bf16, tmp_path):
    key = (kind, compute, adapters, bf16)
    if key not in _plain_runs:
        trainer = make_trainer(kind, path, DTYPES[compute], bf16, str(tmp_path / "plain"))
        cast_adapters(trainer.model, DTYPES[adapters])
        _plain_runs[key] = train_losses(trainer)
    return _plain_runs[key]


def fused_losses(kind, path, compute, adapters, bf16, tmp_path, monkeypatch):
    trainer = make_trainer(kind, path, DTYPES[compute], bf16, str(tmp_path / "fused"))
    cast_adapters(trainer.model, DTYPES[adapters])
    assert fl.patch_peft_model(trainer.model) == 14
    counts = count_calls(monkeypatch, "lora_linear", "frozen_linear")
    monkeypatch.setattr(fl._common, "_warned", set())
    with no_fallback_warning():
        losses = train_losses(trainer)
    return losses, counts


CASES = [(kind, compute, adapters) for kind in ("sft", "dpo") for compute in DTYPES for adapters in ("bf16", "fp32")]
CASES += [("grpo", "fp16", "bf16"), ("grpo", "bf16", "fp32")]  # GRPO generates: slower, two cases


@pytest.mark.parametrize("kind, compute, adapters", CASES, ids=["-".join(c) for c in CASES])
def test_trainer_runs_fused_with_peft_losses(tiny_dir, tmp_path, monkeypatch, kind, compute, adapters):
    losses, counts = fused_losses(kind, tiny_dir, compute, adapters, False, tmp_path, monkeypatch)
    assert counts["lora_linear"] > 0, "the policy runs the fused layers"
    if kind != "sft":
        assert counts["frozen_linear"] > 0, "the reference (disable_adapter) runs frozen_linear"
    peft = plain_losses(kind, tiny_dir, compute, adapters, False, tmp_path)
    assert len(losses) == len(peft) == STEPS and all(math.isfinite(v) for v in losses)
    if kind == "dpo":
        assert losses[0] == peft[0] == pytest.approx(math.log(2), abs=1e-7)
    if (compute, adapters) == ("fp32", "fp32"):
        assert losses == pytest.approx(peft, rel=1e-5, abs=1e-6)
        return
    exact = plain_losses(kind, tiny_dir, "fp32", "fp32", False, tmp_path)
    assert len(exact) == STEPS
    for step, (fused, plain, reference) in enumerate(zip(losses, peft, exact)):
        assert abs(fused - reference) <= 2 * abs(plain - reference) + 5e-4, (step, losses, peft, exact)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_under_bf16_autocast_runs_fused(tiny_dir, tmp_path, monkeypatch, kind):
    """TRL's default (bf16=True: bf16 autocast, also on the CPU): the fused layers compute in the autocast dtype."""
    out_dtypes = []
    inner = fl.peft.lora_linear

    def recording(*args, **kwargs):
        y = inner(*args, **kwargs)
        out_dtypes.append(y.dtype)
        return y

    monkeypatch.setattr(fl.peft, "lora_linear", recording)
    losses, counts = fused_losses(kind, tiny_dir, "fp32", "bf16", True, tmp_path, monkeypatch)
    assert counts["lora_linear"] > 0 and set(out_dtypes) == {torch.bfloat16}, set(out_dtypes)
    peft = plain_losses(kind, tiny_dir, "fp32", "bf16", True, tmp_path)
    exact = plain_losses(kind, tiny_dir, "fp32", "fp32", False, tmp_path)
    assert len(losses) == len(peft) == len(exact) == STEPS
    for step, (fused, plain, reference) in enumerate(zip(losses, peft, exact)):
        assert abs(fused - reference) <= 2 * abs(plain - reference) + 5e-4, (step, losses, peft, exact)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_apply_fused_lora_line_covers_the_layers_trl_builds(tiny_dir, tmp_path, monkeypatch, kind):
    """fl.apply_fused_lora() before the trainer: TRL's own get_peft_model builds fused layers."""
    fl.apply_fused_lora()
    try:
        trainer = make_trainer(kind, tiny_dir, torch.float32, False, str(tmp_path / "fused"))
    finally:
        fl.peft.unapply_fused_lora()
    assert fl.patch_peft_model(trainer.model) == 0, "already fused"
    counts = count_calls(monkeypatch, "lora_linear", "frozen_linear")
    monkeypatch.setattr(fl._common, "_warned", set())
    with no_fallback_warning():
        losses = train_losses(trainer)
    assert counts["lora_linear"] > 0 and (kind == "sft" or counts["frozen_linear"] > 0)
    peft = plain_losses(kind, tiny_dir, "fp32", "bf16", False, tmp_path)
    exact = plain_losses(kind, tiny_dir, "fp32", "fp32", False, tmp_path)
    assert len(losses) == len(peft) == len(exact) == STEPS
    for step, (fused, plain, reference) in enumerate(zip(losses, peft, exact)):
        assert abs(fused - reference) <= 2 * abs(plain - reference) + 5e-4, (step, losses, peft, exact)
