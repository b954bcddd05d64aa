"""The README's Python snippets run as written (on the CPU here: the "cpu" backend), in order and in one
namespace, as a reader runs them top to bottom (a block may continue the one before it). Each block is checked for
what it shows; a block that no check recognises fails, so a new block comes with its check."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pytest
import torch

import fused_lora as fl

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_a_python_snippet():
    assert python_blocks(), "README.md has no ```python block"


def fused_count(model) -> int:
    return sum(isinstance(m, fl.peft._FusedLoraForward) for m in model.modules())


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def check_use(ns):
    assert ns["y"].shape == (2, 64, 1024)
    assert ns["lora_A"].grad is not None and ns["n"] > 0


def check_recipe(ns):
    assert fused_count(ns["trainer"].model) == 14, "the one line fused every LoRA layer of the recipe"
    assert len(losses(ns["trainer"])) == 4 and all(math.isfinite(v) for v in losses(ns["trainer"]))


def check_trl(ns):
    assert fused_count(ns["sft"].model) == 14 and fused_count(ns["dpo"].model) == 14
    assert len(losses(ns["sft"])) == 2 and all(math.isfinite(v) for v in losses(ns["sft"]))
    assert losses(ns["dpo"])[0] == pytest.approx(math.log(2), abs=1e-6), "the policy starts equal to its reference"


def check_fsdp(ns):
    import torch.distributed as dist

    assert fused_count(ns["fsdp_model"]) == 14 and math.isfinite(ns["fsdp_loss"].item())
    weight = ns["fsdp_model"].base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert type(weight).__name__ == "DTensor" and weight.dtype == torch.uint8, "the packed NF4 bytes are sharded"
    assert not dist.is_initialized(), "the block destroys its process group"


def check_dora_mixed(ns):
    assert ns["y_dora"].shape == (2, 64, 1024) and "lora_magnitude_vector" in dict(ns["dora"].named_parameters())
    x, w, second = ns["x"], ns["w"], ns["second"]
    lora = ns["fl"].functional.lora_linear
    expected = [lora(x[:1], w, ns["lora_A"], ns["lora_B"], scaling=2.0, training=False),
                lora(x[1:], w, second.lora_A, second.lora_B, scaling=1.0, training=False)]
    for row, want in zip(ns["y_mixed"], expected):
        assert torch.allclose(row, want[0], rtol=1e-4, atol=1e-4), "each sample gets its own adapter's term"
    # the README's lora_B is PEFT's zero init, so adapter 0's term is checked again with a nonzero B
    B0 = torch.randn(ns["lora_B"].shape, generator=torch.Generator().manual_seed(0)).to(ns["lora_B"]) * 0.1
    mixed = ns["lora_linear_multi"](x, w, [ns["Adapter"](ns["lora_A"], B0, scaling=2.0), second], adapter_ids=[0, 1])
    want = lora(x[:1], w, ns["lora_A"], B0, scaling=2.0, training=False)
    assert not torch.allclose(want, expected[0], rtol=1e-4, atol=1e-4), "B0 changes adapter 0's term"
    assert torch.allclose(mixed[0], want[0], rtol=1e-4, atol=1e-4), "adapter 0's term and scaling"


CHECKS = {  # name -> check
    "y": check_use, "y_mixed": check_dora_mixed, "trainer": check_recipe, "dpo": check_trl, "fsdp_model": check_fsdp,
}


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """One namespace for all blocks; temporary folders the blocks make go under pytest's; apply_fused_lora undone."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("readme"))
    try:
        yield {}
    finally:
        tempfile.tempdir = previous
        fl.peft.unapply_fused_lora()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs_as_written(index, namespace, one_torch_thread):
    defined_before = set(namespace)
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    checks = [check for name, check in CHECKS.items() if name in namespace and name not in defined_before]
    assert checks, f"README python block {index} has no check in tests/test_readme.py CHECKS"
    for check in checks:
        check(namespace)
