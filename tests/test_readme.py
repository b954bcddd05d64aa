"""The README's Python snippets run as written (on the CPU here: the reference backend)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_a_python_snippet():
    assert python_blocks(), "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs_as_written(index, one_torch_thread):
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    assert namespace["y"].shape == (2, 64, 1024)
    assert namespace["lora_A"].grad is not None and namespace["n"] > 0
