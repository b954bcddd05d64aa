"""The command line apart from the demo (test_demo.py): ``python -m fused_lora check`` (the active backend against
the float64 reference), ``info`` (what is available) and the dispatcher. Moved here from test_kernels.py and
test_demo.py, where they sat beside kernel and demo tests."""

import json
import os
import sys
import warnings

import pytest
import torch

from fused_lora.cli import check, info

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------------ check


def test_check_command_passes_on_the_kernels_and_fails_on_a_wrong_backend(interpret_triton, monkeypatch, capsys):
    from fused_lora import functional

    assert check.main(["--backend", "triton"]) == 0
    assert "all passed" in capsys.readouterr().out
    real = functional.lora_linear
    monkeypatch.setattr(functional, "lora_linear", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    assert check.main(["--backend", "triton"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("gpu0", "--device 'gpu0' is not a device"),
                                             ("meta", "--device meta is not supported")])
def test_check_command_reports_an_unusable_device_without_a_traceback(device, message, capsys):
    """An unusable --device is one line and exit status 2 (a usage error; 1 means a comparison failed)."""

    assert check.main(["--device", device]) == 2
    captured = capsys.readouterr()  # on stderr, as argparse's usage errors: a redirected stdout still shows it
    out = captured.err
    assert out.startswith("fused_lora check: ") and message in out and out.count("\n") == 1 and not captured.out


# ------------------------------------------------------------------------------------------------------- info


def test_info_prints_every_component(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for label in ("CUDA", "Triton", "extension _C", "bitsandbytes", "peft", "transformers", 'backend "auto"'):
        assert label in out, label
    if not torch.cuda.is_available():
        assert "cpu for CPU tensors" in out  # "auto" runs the CPU backend (the extension is built for the tests)
        cuda_line = next(line for line in out.splitlines() if line.strip().startswith("CUDA"))
        assert " no " in cuda_line and ("without CUDA" in cuda_line or "no CUDA device" in cuda_line)


def test_info_json_has_a_reason_for_every_component(capsys):
    info.main(["--json"])
    report = json.loads(capsys.readouterr().out)
    for name in ("cuda", "triton", "extension", "bitsandbytes", "peft", "transformers"):
        assert isinstance(report[name]["available"], bool) and report[name]["detail"], name
    assert report["bitsandbytes"]["available"] and report["peft"]["available"]
    assert report["auto_backend"]["cpu"] == "cpu" or os.environ.get("FUSED_LORA_BACKEND")


def test_info_explains_a_missing_extension(monkeypatch):
    from fused_lora import _ext

    monkeypatch.setattr(_ext, "_module", _ext.MissingExtension("ImportError: no module named fused_lora._C"))
    status = info.extension_status()
    assert status == {"available": False, "detail": "missing: ImportError: no module named fused_lora._C"}


def test_info_explains_a_package_that_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    status = info.package_status("bitsandbytes")
    assert not status["available"] and "not importable" in status["detail"]


def test_info_shows_the_backend_override(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    choice = info.auto_backend()
    assert choice["cuda"] == "reference" and choice["override"] == "FUSED_LORA_BACKEND=reference"


def test_info_without_triton_reports_it_once_and_warns_nothing(monkeypatch, capsys):
    from fused_lora import _common

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(_common, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning from resolve_backend would raise here
        assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "Triton         no   not importable" in out
    assert 'backend "auto": reference for CUDA tensors' in out


def test_info_names_a_bad_backend_override_once(monkeypatch, capsys):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "bogus")
    assert info.main([]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if 'backend "auto"' in line)
    assert line.count("unknown backend 'bogus'") == 1 and "FUSED_LORA_BACKEND=bogus" in line


def test_info_survives_a_cuda_device_that_cannot_be_queried(monkeypatch, capsys):
    """torch can see a device yet fail to query it (driver mismatch, a GPU with no memory left for a context)."""

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    status = info.cuda_status()
    assert status["available"] is False and "CUDA error: out of memory" in status["detail"]


def test_info_survives_an_extension_without_its_functions(monkeypatch):
    from fused_lora import _ext

    stale = type(sys)("fused_lora._C")
    stale.__file__ = "/stale/_C.so"
    monkeypatch.setattr(_ext, "_module", stale)
    status = info.extension_status()
    assert status["available"] is False and "is_cuda_build" in status["detail"]


# ------------------------------------------------------------------------------------------------ command line


def test_every_command_of_the_dispatcher_has_a_main():
    import importlib

    from fused_lora.__main__ import COMMANDS

    assert set(COMMANDS) == {"demo", "bench", "check", "info"}
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_the_bitsandbytes_cpu_kernel_notice_is_silenced_and_nothing_else(caplog):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on AVX512-BF16 CPUs
    without the `kernels` package; the commands drop exactly that record, every other one still shows."""
    import logging

    from fused_lora.cli.quiet import BNB_CPU_LOGGER, BNB_CPU_NOTICE, quiet_third_party_notices

    quiet_third_party_notices()
    quiet_third_party_notices()  # idempotent: one filter
    logger = logging.getLogger(BNB_CPU_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning(BNB_CPU_NOTICE + ": %s. Please make sure you already `pip install kernels`", "no module")
        logger.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
