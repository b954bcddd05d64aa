"""Backend selection of the optimizers on the CPU: the rules of lora_linear (fused_lora.backend), one test per value
of the backend argument and of FUSED_LORA_BACKEND, asserting which update ran (the Triton launcher or the PyTorch
update, both replaced by recorders here) or the error; "triton" without the interpreter and CUDA without Triton
give lora_linear's messages and fallback.

The test process runs with TRITON_INTERPRET=1 (tests/conftest.py), so "triton" on the CPU is a valid choice here.
"""

import warnings

import pytest
import torch
from _optim_helpers import make_params, train

from fused_lora import _common, backend
from fused_lora import optim as fo
from fused_lora.optim import update

pytest.importorskip("triton")
from fused_lora.kernels import adamw as kernels  # noqa: E402  (imports triton)

# (optimizer class, its constructor arguments besides backend, the kernel launcher of its update)
OPTIMIZERS = {
    "PagedAdamW": ({"page_min_bytes": 1 << 30}, "adamw32_update_"),
    "AdamW8bit": ({"min_8bit_size": 1}, "adamw8bit_update_"),
}

UNKNOWN_ENV = ValueError, "FUSED_LORA_BACKEND: unknown backend 'garbage'; expected one of 'auto', 'triton', 'cpu', 'reference'"

# (backend argument, FUSED_LORA_BACKEND or None) -> the path that runs, or (error type, message)
CASES = {
    ("auto", None): "reference",
    ("auto", "reference"): "reference",
    ("auto", "triton"): "triton",
    ("auto", "garbage"): UNKNOWN_ENV,
    ("reference", None): "reference",
    ("reference", "reference"): "reference",
    ("reference", "triton"): "reference",
    ("reference", "garbage"): "reference",  # an explicit argument wins; the variable is not read
    ("triton", None): "triton",
    ("triton", "reference"): "triton",
    ("triton", "triton"): "triton",
    ("triton", "garbage"): "triton",
}


@pytest.fixture
def recorder(monkeypatch):
    """Replace both update paths by recorders: ("triton", launcher name) or ("reference", update kind)."""
    calls = []
    for name in ("adamw32_update_", "adamw8bit_update_"):
        monkeypatch.setattr(kernels, name, lambda *args, _name=name, **kwargs: calls.append(("triton", _name)))
    monkeypatch.setattr(update, "reference_update_", lambda kind, *args: calls.append(("reference", kind.value)))
    return calls


def _set_env(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(backend.BACKEND_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(backend.BACKEND_ENV_VAR, value)


@pytest.mark.parametrize("cls", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: f"backend={case[0]}-env={case[1] or 'unset'}")
def test_backend_argument_and_env_var_choose_the_update_path(monkeypatch, recorder, cls, case):
    argument, env = case
    kwargs, launcher = OPTIMIZERS[cls]
    _set_env(monkeypatch, env)
    params = make_params([(37, 9)])
    opt = getattr(fo, cls)(params, backend=argument, **kwargs)
    expected = CASES[case]
    if isinstance(expected, tuple):
        error, message = expected
        with pytest.raises(error, match=message):
            train(params, opt, 1)
        assert not opt.state[params[0]], "a rejected step must not create or advance any state"
        assert recorder == []
    else:
        train(params, opt, 2)
        kind = "torch32" if cls == "PagedAdamW" else "bnb8"
        assert recorder == ([("triton", launcher)] * 2 if expected == "triton" else [("reference", kind)] * 2)


@pytest.mark.parametrize("argument, env", [("triton", None), ("auto", "triton")], ids=["argument", "env-var"])
@pytest.mark.parametrize("cls", list(OPTIMIZERS))
def test_triton_on_the_cpu_without_the_interpreter_is_lora_linears_error(monkeypatch, recorder, cls, argument, env):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _set_env(monkeypatch, env)
    with pytest.raises(RuntimeError) as expected:
        backend.resolve_backend(argument, torch.device("cpu"), caller="lora_linear")
    message = str(expected.value).replace("lora_linear", cls, 1)
    origin = " (set by FUSED_LORA_BACKEND='triton')" if env else ""  # the variable chose it: the error says so
    assert message.startswith(f"{cls}: backend='triton'{origin} got cpu tensors") and "TRITON_INTERPRET=1" in message
    params = make_params([(37, 9)])
    opt = getattr(fo, cls)(params, backend=argument, **OPTIMIZERS[cls][0])
    with pytest.raises(RuntimeError) as raised:
        train(params, opt, 1)
    assert str(raised.value) == message
    assert not opt.state[params[0]] and recorder == []


@pytest.mark.parametrize("cls", list(OPTIMIZERS))
def test_unknown_backend_argument_is_rejected_at_construction_like_lora_linear(cls):
    with pytest.raises(ValueError) as expected:
        backend.requested_backend("cuda", caller="lora_linear")
    with pytest.raises(ValueError) as raised:
        getattr(fo, cls)(make_params([(3,)]), backend="cuda")
    assert str(raised.value) == str(expected.value).replace("lora_linear", cls, 1)


def test_cuda_without_triton_auto_falls_back_once_and_triton_is_an_error(monkeypatch):
    """No CUDA here: the choice for a CUDA device is asked directly, with Triton made unimportable."""
    monkeypatch.delenv(backend.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_import_error", lambda: "triton is not importable (made up by this test)")
    monkeypatch.setattr(_common, "_warned", set())
    opt = fo.PagedAdamW(make_params([(3,)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert opt._takes_kernels(torch.device("cuda")) is False
        assert opt._takes_kernels(torch.device("cuda")) is False
    messages = [str(w.message) for w in caught]
    assert messages == ["PagedAdamW: falling back to the reference backend on CUDA because triton is not importable "
                        "(made up by this test)"]  # fmt: skip
    strict = fo.PagedAdamW(make_params([(3,)]), backend="triton")
    with pytest.raises(RuntimeError, match="PagedAdamW: backend='triton' needs Triton, but triton is not importable"):
        strict._takes_kernels(torch.device("cuda"))
