import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before triton is
# first imported, which is why it lives here rather than in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_lora.testing import torch_threads  # noqa: E402  (after TRITON_INTERPRET: nothing may import triton first)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled tensors so an unwritten output element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def interpret_triton():
    """Tests that run the Triton kernels on CPU tensors, in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
    triton imports; this conftest sets it on a machine without CUDA, where anything else is a failure). On a GPU
    machine without the interpreter they skip: the gpu-marked tests run the kernels there, and
    ``TRITON_INTERPRET=1 pytest -m "not gpu"`` runs these."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if not torch.cuda.is_available():
            pytest.fail("Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported")
        pytest.skip("a CPU-interpreter test (CPU tensors): run it with TRITON_INTERPRET=1")
    pytest.importorskip("triton")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread. For tiny models one thread is as fast, and spinning worker threads
    on a busy 2-core machine made single tests 10-40x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with torch_threads(1):
        yield
