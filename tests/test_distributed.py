"""DDP and FSDP2 (fully_shard) over a patched 4-bit PEFT model: 2 processes, gloo, CPU (torchrun runs
tests/_distributed_worker.py; both ranks run DDP and FSDP2, each plain and fused, three AdamW steps on
rank-specific batches).

* the fused model trains on the fused path under both wrappers (FSDP2 used to crash: AttributeError 'Parameter'
  object has no attribute 'quant_type', because fully_shard replaces bitsandbytes' Params4bit by a plain Parameter);
* its losses, first-step LoRA gradients and final adapters match plain PEFT + bitsandbytes under the same wrapper
  (fp32 on both sides: 1e-5), and under DDP are the same on both ranks;
* FSDP2 shards the NF4 weight as packed uint8 bytes (each rank holds half of them) and all-gathers a decoder
  layer's parameters as uint8 bytes (FSDP2 never casts a non-floating parameter, and a group of mixed dtypes goes as
  bytes): the 4-bit weight is never dequantized to bf16 for communication.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _peft_helpers import save_tiny_llama

from fused_lora.testing import relative_error

TESTS = Path(__file__).resolve().parent
TIGHT = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_dist"))
    out = tmp_path_factory.mktemp("dist_out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(TESTS / "_distributed_worker.py"), model_dir, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_fused_model_trains_like_plain_peft(results, mode):
    for rank, result in enumerate(results):
        plain, fused = result[(mode, False)], result[(mode, True)]
        assert fused["fused_layers"] == 14 and fused["lora_linear_calls"] > 0, "the fused path ran"
        assert plain["fused_layers"] == 0
        assert fused["losses"] == pytest.approx(plain["losses"], rel=TIGHT), (rank, fused["losses"], plain["losses"])
        assert fused["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) == 28
        for name, grad in plain["grads"].items():
            assert relative_error(fused["grads"][name], grad) <= TIGHT, (rank, name)
        for name, value in plain["adapters"].items():
            assert relative_error(fused["adapters"][name], value) <= TIGHT, (rank, name)


def test_ddp_ranks_agree(results):
    """DDP all-reduces the gradients of rank-specific batches: the ranks must hold the same gradients and adapters.
    (Under FSDP2 the worker records full tensors gathered from both ranks' shards, equal on both by construction;
    what FSDP2 computes is checked against plain PEFT under FSDP2 above.)"""
    first, second = results[0][("ddp", True)], results[1][("ddp", True)]
    assert first["losses"] != second["losses"], "the ranks saw different batches"
    for name, grad in first["grads"].items():
        torch.testing.assert_close(second["grads"][name], grad, rtol=0, atol=0)
    for name, value in first["adapters"].items():
        torch.testing.assert_close(second["adapters"][name], value, rtol=0, atol=0)


def test_fsdp2_shards_and_gathers_the_nf4_weight_as_packed_bytes(results):
    for result in results:
        kind, placements, dtype, local, total = result[("fsdp", True)]["nf4_shard"]
        assert kind == "DTensor" and "Shard(dim=0)" in placements
        assert dtype == torch.uint8 and total == 64 * 64 // 2 and local == total // 2
        # a decoder layer's group (packed uint8 NF4 + fp32 norms and adapters) goes as bytes; the root group
        # (embeddings, final norm, lm_head) and the gradient gathers of the test are fp32
        assert result[("fsdp", True)]["all_gather_dtypes"] == ["torch.float32", "torch.uint8"]
