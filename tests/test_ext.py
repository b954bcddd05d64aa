"""fused_lora._C (managed memory) and its lazy loader, on whatever build is installed (the host-memory build on
CI): tensors own their memory, prefetch / residency bookkeeping, the free-memory guard, error messages."""

import subprocess
import sys

import pytest
import torch

from fused_lora import _ext

needs_ext = pytest.mark.skipif(not _ext.is_available(), reason="fused_lora._C is not built")


@pytest.fixture
def ext():
    if not _ext.is_available():
        pytest.skip("fused_lora._C is not built")
    return _ext.load()


def test_import_fused_lora_does_not_load_the_extension():
    code = "import sys, fused_lora; print('fused_lora._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_extension_stand_in_names_the_fix():
    stand_in = _ext.MissingExtension("ImportError: no module named fused_lora._C")
    with pytest.raises(RuntimeError, match=r"fused_lora\._C\.empty_managed .*pip install --no-build-isolation -e \."):
        stand_in.empty_managed(16, 0)


def test_empty_managed_is_zeroed_and_viewable(ext):
    buf = ext.empty_managed(4 * 37 * 129, 0)
    assert buf.dtype == torch.uint8 and buf.numel() == 4 * 37 * 129
    state = buf.view(torch.float32).view(37, 129)
    assert torch.count_nonzero(state) == 0
    state.fill_(1.5)
    assert state.sum().item() == 1.5 * 37 * 129


def test_tensors_own_their_memory_no_leak_over_thousands_of_allocations(ext):
    before = ext.stats()
    for i in range(3000):
        view = ext.empty_managed(1000 + 4 * i, 0)[8:].view(torch.float32 if i % 2 else torch.uint8)
        del view
    after = ext.stats()
    assert after["live_allocations"] == before["live_allocations"]
    assert after["live_bytes"] == before["live_bytes"]
    assert after["total_allocations"] - before["total_allocations"] == 3000
    assert after["total_frees"] - before["total_frees"] == 3000


def test_storage_outlives_the_original_tensor(ext):
    before = ext.stats()["live_allocations"]
    view = ext.empty_managed(4096, 0)[1024:2048]
    assert ext.stats()["live_allocations"] == before + 1
    view.fill_(7)
    assert int(view.sum()) == 7 * 1024
    del view
    assert ext.stats()["live_allocations"] == before


def test_prefetch_and_residency_of_tensor_and_byte_range(ext):
    buf = ext.empty_managed(64 * 1024, 0)
    assert ext.last_prefetch_location(buf) == ext.UNKNOWN_LOCATION
    ext.prefetch(buf, 0)
    assert ext.last_prefetch_location(buf) == 0
    ext.prefetch(buf, ext.HOST_LOCATION, 0, 0, 16 * 1024)
    assert ext.last_prefetch_location(buf, 0, 16 * 1024) == ext.HOST_LOCATION
    assert ext.last_prefetch_location(buf, 32 * 1024, 16 * 1024) == 0
    assert ext.last_prefetch_location(buf) == ext.UNKNOWN_LOCATION  # pages in two places
    calls = ext.stats()["prefetch_calls"]
    ext.advise_preferred_location(buf, ext.HOST_LOCATION)
    assert ext.stats()["prefetch_calls"] == calls


def test_byte_range_outside_the_tensor_is_rejected(ext):
    buf = ext.empty_managed(1000, 0)
    with pytest.raises(RuntimeError, match=r"byte range \[900, 1100\) is outside the tensor's 1000 bytes"):
        ext.prefetch(buf, 0, 0, 900, 200)


@pytest.mark.parametrize("offset", [-8, 1001, 5000], ids=["negative", "just-past-end", "far-past-end"])
def test_offset_outside_the_tensor_is_rejected_also_with_to_the_end_length(ext, offset):
    buf = ext.empty_managed(1000, 0)
    for call in (lambda: ext.prefetch(buf, 0, 0, offset, -1), lambda: ext.last_prefetch_location(buf, offset, -1)):
        with pytest.raises(RuntimeError, match=f"byte offset {offset} is outside the tensor's 1000 bytes"):
            call()


def test_allocation_larger_than_free_memory_is_refused(ext):
    free, total = ext.memory_info(0)
    assert 0 < free <= total
    live = ext.stats()["live_bytes"]
    with pytest.raises(RuntimeError, match="refused"):
        ext.empty_managed(free + (1 << 30), 0)
    assert ext.stats()["live_bytes"] == live



def test_free_host_memory_counts_the_page_cache_the_kernel_gives_back(ext):
    """The CPU build's free memory is MemAvailable: MemFree (sysconf's available pages) leaves out the page cache,
    most of memory after a model's files were read, and refused allocations the system had memory for."""
    import os
    import re

    if ext.is_cuda_build() or not os.path.exists("/proc/meminfo"):
        pytest.skip("the CPU build on Linux")
    free, _ = ext.memory_info(0)
    meminfo = {k: int(v) * 1024 for k, v in re.findall(r"(\w+):\s+(\d+) kB", open("/proc/meminfo").read())}
    assert abs(free - meminfo["MemAvailable"]) < 256 << 20

def test_negative_sizes_are_rejected(ext):
    with pytest.raises(RuntimeError, match="nbytes must be >= 0"):
        ext.empty_managed(-1, 0)


def test_cpu_build_reports_itself(ext):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    assert isinstance(ext.is_cuda_build(), bool)
    if not ext.is_cuda_build():
        assert ext.empty_managed(8, 0).device.type == "cpu"
        assert ext.concurrent_managed_access(0)
