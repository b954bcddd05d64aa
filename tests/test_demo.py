"""``python -m fused_lora demo`` on the CPU (few demo steps, to stay fast) and its data; ``info``, ``check`` and the
command dispatcher are in test_cli.py."""

import json
import os
import subprocess
import sys

# peft, transformers and bitsandbytes are test requirements: a failing import must fail here, not skip.
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401

from fused_lora.cli import demo, demo_data, demo_model, demo_train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny_llama(path, vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One real command-line run: 25 steps, in a scratch directory, default output folder."""
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "fused_lora", "demo", "--steps", "25", "--seed", "1"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FUSED_LORA_BACKEND": ""},
    )
    return result, workdir / "fused_lora_demo_out"


def test_demo_cli_succeeds_and_prints_the_summary(demo_run):
    result, _ = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in ("loss (train", "loss (held-out)", "[decreased]", "tokens/s", "peak memory", "14 layers fused"):
        assert expected in out, expected
    assert "parity vs PEFT+bitsandbytes" in out and "[OK at tolerance" in out
    if not torch.cuda.is_available():
        compared = next(line for line in out.splitlines() if line.strip().startswith("compared:"))
        assert "backend 'cpu'" in compared and "NOT the Triton kernels" in compared, "says what ran on the CPU"
        assert "bitsandbytes' dequantize_4bit" in compared
    assert "fine-tuning" in result.stderr, "tqdm progress bar"


def test_demo_metrics_show_loss_decrease_and_parity(demo_run):
    _, output = demo_run
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["loss_decreased"] is True
    assert metrics["eval_loss_after"] < demo.LOSS_DECREASE_FACTOR * metrics["eval_loss_before"]
    assert metrics["train_loss_end"] < metrics["train_loss_start"]
    assert metrics["parity_ok"] is True
    parity = metrics["parity"]
    assert parity["lora_grads_compared"] == 2 * 14
    assert parity["loss_abs_diff"] <= 1e-4 and parity["logits_rel_err"] <= 1e-4
    assert parity["lora_grad_rel_err_max"] <= 1e-4
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_mib"] > 0


def test_demo_adapter_reloads_with_plain_peft_to_the_same_loss(demo_run):
    from peft import PeftModel

    _, output = demo_run
    metrics = json.loads((output / "metrics.json").read_text())
    adapter = output / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == metrics["base_model"]

    base = demo_model.load_quantized_model(metrics["base_model"], torch.float32, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, adapter).train()
    tokenizer = demo_data.ByteTokenizer()
    encoded = [demo_data.encode_example(e, tokenizer, 96) for e in demo_data.load_instructions()]
    _, eval_set = demo_data.split_train_eval(encoded, 16)
    batches = [demo_data.collate(eval_set[i : i + 16], tokenizer.pad_id, "cpu") for i in range(0, len(eval_set), 16)]
    reloaded = demo_train.held_out_loss(model, batches)
    assert reloaded == pytest.approx(metrics["eval_loss_after"], rel=1e-5)


def test_demo_with_a_local_model_directory(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model", vocab_size=300)
    output = tmp_path / "out"
    threads = torch.get_num_threads()
    status = demo.main(["--model", str(model_dir), "--steps", "3", "--output", str(output), "--rank", "4"])
    assert status in (0, 1), "0 or 1 (3 steps need not lower the loss); 2 would mean bad arguments"
    assert torch.get_num_threads() == threads, "the demo restores torch's thread count"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["fused_layers"] == 14 and metrics["parity_ok"] is True
    assert metrics["base_model"] == str(model_dir)
    assert not (output / "base_model").exists(), "no generated base model with --model"
    assert (output / "adapter" / "adapter_model.safetensors").exists()


def save_bpe_tokenizer(path):
    """A small byte-level BPE tokenizer (trained here, no download) with <s> / </s>, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [demo_data.PROMPT_TEMPLATE.format(instruction=e["instruction"]) + e["response"]
             for e in demo_data.load_instructions()[:200]]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def test_demo_with_a_local_model_and_its_own_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    hf_tokenizer = save_bpe_tokenizer(model_dir)
    save_tiny_llama(model_dir, vocab_size=len(hf_tokenizer))
    tokenizer = demo_data.load_tokenizer(str(model_dir))
    assert isinstance(tokenizer, demo_data.HFTokenizer) and tokenizer.bos_id == hf_tokenizer.bos_token_id
    ids, labels = demo_data.encode_example({"instruction": "Repeat ba twice.", "response": "ba ba"}, tokenizer, 96)
    assert ids[0] == tokenizer.bos_id and ids[-1] == labels[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[1:-1]) == demo_data.PROMPT_TEMPLATE.format(instruction="Repeat ba twice.") + "ba ba"
    output = tmp_path / "out"
    assert demo.main(["--model", str(model_dir), "--steps", "2", "--output", str(output), "--rank", "4"]) in (0, 1)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["fused_layers"] == 14 and metrics["parity_ok"] is True


def test_demo_rejects_a_model_too_small_for_the_byte_tokenizer(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "model", vocab_size=100)
    assert demo.main(["--model", str(model_dir), "--steps", "1", "--output", str(tmp_path / "out")]) == 2
    assert "100 token embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "cuda:0"] if not torch.cuda.is_available() else ["tpu"])
def test_demo_rejects_an_unusable_device(device, tmp_path, capsys):
    assert demo.main(["--device", device, "--output", str(tmp_path)]) == 2
    assert "fused-lora demo: --device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [("--batch-size", "0", "--batch-size must be at least 1"), ("--rank", "0", "--rank must be at least 1"),
     ("--lr", "-1", "--lr must be a positive number"), ("--lr", "nan", "--lr must be a positive number"),
     ("--max-length", "0", "--max-length must be at least 2")],
    ids=["batch-size-0", "rank-0", "lr-negative", "lr-nan", "max-length-0"],
)
def test_demo_rejects_bad_numbers_with_a_usage_error(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([option, value, "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def demo_error(argv, tmp_path, capsys) -> str:
    """The one line the demo prints for unusable input (exit status 2), before any model is built."""
    assert demo.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # on stderr, as argparse's usage errors
    out = _last_line(err)
    assert out.startswith("fused-lora demo: ") and err.endswith(out + "\n"), err
    assert not (tmp_path / "out").exists(), "nothing is written for unusable input"
    return out


def test_demo_rejects_an_unusable_backend_override(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "bogus")
    assert "FUSED_LORA_BACKEND: unknown backend 'bogus'" in demo_error([], tmp_path, capsys)


def test_demo_rejects_a_max_length_that_cuts_off_every_response(tmp_path, capsys):
    out = demo_error(["--max-length", "20"], tmp_path, capsys)
    assert "--max-length 20 leaves no response token" in out and "use --max-length 65 or more" in out


def test_demo_rejects_a_missing_or_unreadable_model_directory(tmp_path, capsys):
    assert "is not a directory" in demo_error(["--model", str(tmp_path / "missing")], tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    assert "could not load --model" in demo_error(["--model", str(tmp_path / "empty")], tmp_path, capsys)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), ("", "no examples"), ('{"instruction": "a", "response": "b"}\n[1, 2]\n', ":2: expected"),
     ('{"instruction": "a", "response": "b"}\n{"instruction": \n', ":2: not valid JSON")],
    ids=["missing", "empty", "not-an-object", "bad-json"],
)
def test_demo_rejects_unusable_data(content, message, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    assert message in demo_error(["--data", str(path)], tmp_path, capsys)


def one_line_error(argv, capsys) -> str:
    """The one line (no traceback) the demo prints with exit status 2."""
    assert demo.main(argv) == 2
    captured = capsys.readouterr()
    line = _last_line(captured.err)
    assert line.startswith("fused-lora demo: ") and captured.err.endswith(line + "\n"), captured.err
    assert "Traceback" not in captured.out + captured.err
    return line


def _last_line(err: str) -> str:
    """The demo's one-line error: the last line of stderr (a model saved for the test may have drawn a progress bar
    there first, with carriage returns)."""
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


def test_demo_rejects_an_output_that_is_a_file(tmp_path, capsys):
    """--output naming an existing file printed a NotADirectoryError traceback and exited 1."""
    (tmp_path / "taken").write_text("mine")
    out = one_line_error(["--steps", "1", "--output", str(tmp_path / "taken")], capsys)
    assert "taken exists and is not a directory" in out
    out = one_line_error(["--steps", "1", "--output", str(tmp_path / "taken" / "sub")], capsys)
    assert "taken exists and is not a directory" in out
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("planted", ["metrics.json", "adapter", "adapter/adapter_config.json", "base_model"])
def test_demo_does_not_write_through_a_symlink_planted_in_its_output(planted, tmp_path, capsys):
    """A symbolic link at one of the demo's output paths (pointing at a file or folder elsewhere) was written
    through; now the demo refuses before it builds anything, and the link's target is untouched."""
    output, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    link = output / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target / "precious" if planted.endswith(".json") else target)
    out = one_line_error(["--steps", "1", "--output", str(output)], capsys)
    assert f"{link} is a symbolic link" in out
    assert sorted(p.name for p in target.iterdir()) == ["precious"] and (target / "precious").read_text() == "keep"


def test_demo_rejects_a_pickle_checkpoint_that_needs_more_than_weights_only(tmp_path, capsys):
    """A --model folder whose only checkpoint is a pickle that torch.load(weights_only=True) refuses printed an
    UnpicklingError traceback and exited 1."""
    import argparse

    model_dir = save_tiny_llama(tmp_path / "model", vocab_size=demo_data.ByteTokenizer.vocab_size)
    from safetensors.torch import load_file

    weights = load_file(model_dir / "model.safetensors")
    weights["extra"] = argparse.Namespace(note="pickled code")
    torch.save(weights, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    out = one_line_error(["--model", str(model_dir), "--steps", "1", "--output", str(tmp_path / "out")], capsys)
    assert "its pickle checkpoint does not load with torch.load(weights_only=True)" in out
    assert "argparse.Namespace" in out and "save the model as safetensors" in out


def save_tiny_opt(path, dropout):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=demo_data.ByteTokenizer.vocab_size, hidden_size=64, ffn_dim=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                       word_embed_proj_dim=64, dropout=dropout)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(path)
    return path


def test_demo_parity_holds_for_a_model_with_its_own_dropout(tmp_path, capsys):
    """A tiny OPT with dropout 0.1: the model's dropout was active during the parity check, so the two sides drew
    different masks and the demo reported a MISMATCH (exit 1). Parity now runs in eval mode with gradients."""
    model_dir = save_tiny_opt(tmp_path / "opt", dropout=0.1)
    demo.main(["--model", str(model_dir), "--steps", "2", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["parity_ok"] is True, out
    assert "[OK at tolerance" in out


def _avx512_dequantize_4bit(real):
    """bitsandbytes' dequantize_4bit as its AVX-512 CPU kernel computes it (rows, columns c..c+15 scaled by
    absmax[r·(cols // blocksize) + c // blocksize]) where bnb_cpu_dequantize_is_wrong holds; else ``real``."""
    from fused_lora import NF4Weight, nf4

    def dequantize_4bit(A, quant_state=None, *args, **kwargs):
        out = real(A, quant_state, *args, **kwargs)
        shape, blocksize = tuple(quant_state.shape), quant_state.blocksize
        if not nf4.bnb_cpu_dequantize_is_wrong(shape, blocksize):
            return out
        w = NF4Weight.from_bnb(A, quant_state)
        rows, cols = shape
        values = w.dequantize(torch.float32) / w.absmax_fp32().repeat_interleave(blocksize)[: rows * cols].view(shape)
        index = torch.arange(rows)[:, None] * (cols // blocksize) + (torch.arange(cols) // 16 * 16)[None, :] // blocksize
        return (values * w.absmax_fp32()[index]).to(out.dtype)

    return dequantize_4bit


def test_demo_says_when_bitsandbytes_cpu_dequantization_is_wrong_instead_of_failing(tmp_path, capsys, monkeypatch):
    """On a CPU with AVX-512F, bitsandbytes 0.50.2 dequantizes a weight with in_features 160 (not whole blocks of 64
    per row) wrongly, so PEFT's side of the parity check is wrong. Emulated here (this CPU's scalar kernel is
    right): the demo names the shape and does not call it a mismatch of fused-lora."""
    import bitsandbytes.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from fused_lora import bnb_compat

    monkeypatch.setattr(bnb_compat, "cpu_has_avx512f", lambda: True)
    monkeypatch.setattr(F, "dequantize_4bit", _avx512_dequantize_4bit(F.dequantize_4bit))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=demo_data.ByteTokenizer.vocab_size,
                         max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    demo.main(["--model", str(tmp_path / "model"), "--steps", "1", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["parity_ok"] is None, out
    assert metrics["bnb_cpu_dequantize_wrong"] == ["base_model.model.model.layers.0.mlp.down_proj.base_layer (64, 160), "
                                                   "blocksize 64"]  # fmt: skip
    assert "NOT JUDGED: bitsandbytes' CPU dequantization is wrong for this shape" in out


# ------------------------------------------------------------------------------------------------------- data


def test_shipped_data_is_the_generator_output():
    shipped = demo_data.load_instructions()
    assert shipped == demo_data.synthetic_instructions()
    assert len({e["instruction"] for e in shipped}) > 0.8 * len(shipped), "mostly distinct prompts"


def test_byte_tokenizer_round_trip_and_response_only_labels():
    tokenizer = demo_data.ByteTokenizer()
    text = "Spell zébu with dashes. ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert min(tokenizer.encode(text)) >= tokenizer.offset and max(tokenizer.encode(text)) < tokenizer.vocab_size
    ids, labels = demo_data.encode_example({"instruction": "Repeat ba twice.", "response": "ba ba"}, tokenizer, 96)
    response = tokenizer.encode("ba ba") + [tokenizer.eos_id]
    assert ids[0] == tokenizer.bos_id and ids[-len(response):] == response
    assert labels == [-100] * (len(ids) - len(response)) + response
    short_ids, short_labels = demo_data.encode_example({"instruction": "x" * 50, "response": "y"}, tokenizer, 17)
    assert len(short_ids) == len(short_labels) == 17


def test_collate_pads_right_and_masks_padding():
    encoded = [([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])]
    batch = demo_data.collate(encoded, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_load_instructions_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with string fields"):
        demo_data.load_instructions(path)
