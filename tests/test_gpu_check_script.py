"""bench/gpu_check.sh, read on the CPU: the GPU machine's one short run must not be lost to a mistake a CPU can see.

* The GPU tests are named file by file (GPU_TESTS), and the list is every test file that has a gpu-marked test:
  pytest imports each module it collects before ``-m gpu`` deselects anything, so running ``tests`` whole on a
  machine without bitsandbytes stopped at the first module importing it (3 collection errors, 0 GPU tests run).
* No listed file imports bitsandbytes at module level (the GPU image has peft and transformers, not it).
* Each step is stopped with SIGINT first: pytest then prints its failures and summary (SIGTERM printed nothing).
"""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def gpu_tests() -> list[str]:
    match = re.search(r"^GPU_TESTS=\((.*?)\)", SCRIPT.read_text(), flags=re.S | re.M)
    assert match, "gpu_check.sh defines GPU_TESTS=(...)"
    return match.group(1).split()


def module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_script_names_every_file_with_gpu_tests():
    with_gpu_tests = {f"tests/{p.name}" for p in sorted((ROOT / "tests").glob("test_*.py"))
                      if re.search(r"pytest\.mark\.gpu\b", p.read_text())}  # fmt: skip
    listed = gpu_tests()
    assert len(listed) == len(set(listed))
    assert set(listed) == with_gpu_tests


@pytest.mark.parametrize("name", gpu_tests())
def test_no_listed_file_needs_bitsandbytes_to_import(name):
    imported = module_level_imports(ROOT / name)
    # a test module's own helpers (test_kernels_gpu_paths imports test_kernels_gpu) are read as well
    for helper in [n for n in imported if (ROOT / "tests" / f"{n}.py").exists()]:
        imported |= module_level_imports(ROOT / "tests" / f"{helper}.py")
    assert not imported & {"bitsandbytes"}, f"{name} imports bitsandbytes at module level"


def test_steps_are_interrupted_before_they_are_killed():
    text = SCRIPT.read_text()
    assert re.search(r"timeout -s INT --kill-after=\d+ ", text)
    assert "timeout --kill-after" not in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tee") is None, reason="needs bash and tee")
def test_a_run_stopped_from_outside_has_already_left_its_log_in_out(tmp_path):
    """The device tool returns what is under $OUT when it stops a command: the log is written there from the first
    line, not copied at the end (a run stopped mid-way returned nothing). The script runs from a copy, with a
    Python that only sleeps, and is killed after its first lines."""
    import os
    import signal
    import time

    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "bench" / "gpu_check.sh")
    sleeper = tmp_path / "python3"
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(sleeper), "FUSED_LORA_COMMIT": "test"}
    proc = subprocess.Popen(["bash", str(root / "bench" / "gpu_check.sh")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "gpu_check.log"
    try:
        for _ in range(100):
            if log.exists() and "=== gpu_check:" in log.read_text():
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "=== gpu_check:" in log.read_text()
