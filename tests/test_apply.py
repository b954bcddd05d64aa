"""fl.apply_fused_lora(): the one line for transformers/PEFT users (tiny Llama, CPU, reference backend).

* after it, every PEFT LoRA layer built in the process is fused (get_peft_model, PeftModel.from_pretrained), a
  given model is converted, calling it twice changes nothing, and unapply_fused_lora() restores PEFT's factory;
* the classic QLoRA recipe (NF4 + double quant, prepare_model_for_kbit_training, gradient checkpointing,
  LoraConfig, transformers.Trainer with optim="paged_adamw_8bit") with the line added logs PEFT's losses, and so
  does the same recipe with fused_lora's PagedAdamW8bit over model.parameters().
(TRL's trainers with the line: tests/test_trl.py.)
"""

import math
import warnings

import pytest
import torch
from _peft_helpers import N_LINEAR, VOCAB, fused_layers, load_qlora_base, lora_config, make_peft, save_tiny_llama

import fused_lora as fl
from fused_lora import _ext

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_apply"))


def test_apply_fused_lora_fuses_every_lora_layer_built_afterwards(tiny_dir, tmp_path):
    from peft import PeftModel

    plain = make_peft(load_qlora_base(tiny_dir))
    assert not fused_layers(plain)
    try:
        assert fl.apply_fused_lora(plain) == N_LINEAR, "the given model is converted"
        assert fl.apply_fused_lora() == 0 and fl.apply_fused_lora(plain) == 0, "a second call changes nothing"
        built = make_peft(load_qlora_base(tiny_dir))
        assert len(fused_layers(built)) == N_LINEAR
        assert all(type(m).__name__ == "FusedPeftLinear4bit" for m in fused_layers(built))
        built.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(load_qlora_base(tiny_dir), tmp_path / "adapter", is_trainable=True)
        assert len(fused_layers(loaded)) == N_LINEAR
    finally:
        assert fl.peft.unapply_fused_lora(plain) == N_LINEAR
    assert not fused_layers(make_peft(load_qlora_base(tiny_dir))), "PEFT builds its own layers again"
    base = load_qlora_base(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a base model is fine: its LoRA layers are fused when PEFT builds them
        try:
            assert fl.apply_fused_lora(base) == 0
        finally:
            fl.peft.unapply_fused_lora()
    with pytest.raises(TypeError, match="apply_fused_lora: expected a PEFT model"):
        fl.apply_fused_lora("model")


def qlora_recipe_losses(path, fused: bool, optimizer: str, output_dir) -> list[float]:
    """The classic QLoRA recipe with transformers.Trainer, 4 steps; ``optimizer`` is "paged_adamw_8bit" (the
    Trainer's optim, bitsandbytes) or "fused_lora" (fl.optim.PagedAdamW8bit over model.parameters())."""
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    if fused:
        fl.apply_fused_lora()
    try:
        model = prepare_model_for_kbit_training(load_qlora_base(path), use_gradient_checkpointing=True)
        torch.manual_seed(1)
        model = get_peft_model(model, lora_config(task_type="CAUSAL_LM", lora_dropout=0.0))
    finally:
        fl.peft.unapply_fused_lora()
    assert len(fused_layers(model)) == (N_LINEAR if fused else 0)
    ids = torch.randint(3, VOCAB, (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-2, optim="paged_adamw_8bit", gradient_checkpointing=True, use_cpu=True,
                             logging_steps=1, report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0)
    optimizers = (None, None)
    if optimizer == "fused_lora":
        optimizers = (fl.optim.PagedAdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.0), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                          optimizers=optimizers)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "fused_lora"])
def test_one_line_qlora_recipe_with_trainer_matches_peft(tiny_dir, tmp_path, optimizer):
    if optimizer == "fused_lora" and not _ext.is_available():
        pytest.skip("fused_lora._C is not built")
    fused = qlora_recipe_losses(tiny_dir, True, optimizer, tmp_path)
    plain = qlora_recipe_losses(tiny_dir, False, "paged_adamw_8bit", tmp_path)
    assert len(fused) == 4 and all(math.isfinite(v) for v in fused)
    assert fused == pytest.approx(plain, rel=1e-5), "fp32 compute: the same losses as PEFT + bitsandbytes"


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_scalings_made_tensors_for_compiled_hotswap_keep_the_fused_path(tiny_dir, quantized, monkeypatch):
    """PEFT's prepare_model_for_compiled_hotswap turns every layer's scaling into a 0-d tensor (a hotswap then needs
    no recompile): patched layers raised "scaling must be a Python number". s is folded into B: PEFT's numbers,
    on the fused path, and the gradients of A and B as PEFT's."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    from _peft_helpers import count_calls, load_dense_base

    load = load_qlora_base if quantized else load_dense_base
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))}
    inputs["labels"] = inputs["input_ids"]
    models = []
    for fused in (False, True):
        model = make_peft(load(tiny_dir), lora_dropout=0.0)
        if fused:
            fl.patch_peft_model(model)
        prepare_model_for_compiled_hotswap(model, target_rank=16)
        models.append(model)
    assert all(isinstance(s, torch.Tensor) for m in fused_layers(models[1]) for s in m.scaling.values())
    counts = count_calls(monkeypatch, "lora_linear")
    losses = [m(**inputs).loss for m in models]
    assert counts["lora_linear"] == N_LINEAR
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * abs(losses[0].item())
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys()
    assert all(fl.testing.relative_error(grads[1][n], grads[0][n]) <= 1e-5 for n in grads[0])
