"""Paging on the host-memory build of fused_lora._C: budgets, the furthest-next-use eviction order, skipped
parameters, groups added later, per-device budgets, unpaged small state, the CUDA-parameters-on-a-CPU-build warning,
freeing, and a missing extension."""

import gc
import warnings

import pytest
import torch
from _optim_helpers import SHAPES, assert_params_equal, make_params, needs_ext, train

from fused_lora import _common, _ext
from fused_lora import optim as fo

# The host-memory build pages CPU parameters; a CUDA build pages only CUDA ones (tests/test_optim_gpu.py).
pytestmark = pytest.mark.skipif(_ext.is_available() and _ext.load().is_cuda_build(),
                                reason="these tests page CPU parameters: the host-memory build of fused_lora._C only")


# ---------------------------------------------------------------------------------------------------------------
# Paging on the host-memory build
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit"])
def test_tiny_budget_evicts_every_state_and_result_is_unchanged(cls):
    shapes = list(SHAPES.values())
    free = make_params(shapes)
    train(free, getattr(fo, cls)(free, page_min_bytes=0), 5)
    tight = make_params(shapes)
    opt = getattr(fo, cls)(tight, page_min_bytes=0, gpu_budget_bytes=1, chunk_bytes=1)
    train(tight, opt, 5)
    assert_params_equal(tight, free)
    assert set(opt.state_residency().values()) == {"host"}
    stats = opt.paging_stats()
    assert stats["resident_bytes"] == {}
    assert stats["evictions"] == 5 * len(shapes) and stats["prefetches"] == 5 * len(shapes)


BLOCK = 2 * 64 * 64 * 4  # paged fp32 state (exp_avg + exp_avg_sq) of a 64x64 parameter


def step_transfers(opt, params, seed):
    """One step with fresh gradients; returns (blocks in, blocks out, bytes in, bytes out, extension prefetch calls)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    before, calls = dict(opt.paging_stats()), _ext.load().stats()["prefetch_calls"]
    opt.step()
    after = opt.paging_stats()
    moved = [after[k] - before[k] for k in ("prefetches", "evictions", "prefetched_bytes", "evicted_bytes")]
    return (*moved, _ext.load().stats()["prefetch_calls"] - calls)


def record_residency_peaks(opt) -> list:
    """The resident state bytes (all locations) before each chunk update of ``opt``, appended as steps run."""
    peaks, update = [], opt._update_chunk

    def recording_update(chunk):
        peaks.append(sum(opt.paging_stats()["resident_bytes"].values()))
        update(chunk)

    opt._update_chunk = recording_update
    return peaks


def device_resident(opt):
    return sorted(i for i, where in opt.state_residency().items() if where == "device")


@needs_ext
@pytest.mark.parametrize(
    "case",
    [(0, 1), (3, 1), (5, 1), (7, 1), (8, 1), (3, 2), (5, 3)],
    ids=lambda case: f"budget-{case[0]}of8-blocks-{case[1]}per-chunk",
)
def test_budget_keeps_the_first_blocks_resident_and_streams_only_the_rest(case):
    (k, per_chunk), n = case, 8
    free = make_params([(64, 64)] * n)
    free_opt = fo.PagedAdamW(free, lr=1e-2, page_min_bytes=0, chunk_bytes=per_chunk * BLOCK)
    params = make_params([(64, 64)] * n)
    opt = fo.PagedAdamW(params, lr=1e-2, page_min_bytes=0, gpu_budget_bytes=k * BLOCK, chunk_bytes=per_chunk * BLOCK)
    peaks = record_residency_peaks(opt)
    assert step_transfers(opt, params, 0)[:2] == (n, n - k)  # warm-up: every block comes in once
    step_transfers(free_opt, free, 0)
    for t in range(1, 4):
        moved = step_transfers(opt, params, t)
        step_transfers(free_opt, free, t)
        assert moved == (n - k, n - k, (n - k) * BLOCK, (n - k) * BLOCK, 2 * (n - k)), f"step {t}"
        assert opt.paging_stats()["resident_bytes"] == ({0: k * BLOCK} if k else {})
        assert device_resident(opt) == list(range(k))
    assert max(peaks) <= (k + 2 * per_chunk) * BLOCK  # within the budget plus the chunk updated and the one prefetched
    assert_params_equal(params, free)


@needs_ext
def test_a_smaller_block_after_the_streamed_one_stays_resident_when_it_fits():
    params = make_params([(64, 64)] * 3 + [(16, 64)])  # 32 KiB, 32 KiB, 32 KiB, 8 KiB of state
    opt = fo.PagedAdamW(params, page_min_bytes=0, gpu_budget_bytes=2 * BLOCK + BLOCK // 4 + 1000, chunk_bytes=1)
    step_transfers(opt, params, 0)
    for t in range(1, 3):
        assert step_transfers(opt, params, t)[:2] == (1, 1)
        assert device_resident(opt) == [0, 1, 3]


@needs_ext
def test_parameters_skipped_in_a_step_keep_their_place():
    n, k = 6, 3
    params = make_params([(64, 64)] * n)
    opt = fo.PagedAdamW(params, page_min_bytes=0, gpu_budget_bytes=k * BLOCK, chunk_bytes=1)
    step_transfers(opt, params, 0)
    for skipped, moved in ((0, n - k), (1, n - k), (4, n - k - 1), (None, n - k)):
        g = torch.Generator().manual_seed(10 + (skipped or 0))
        for i, p in enumerate(params):
            p.grad = None if i == skipped else torch.randn(p.shape, generator=g)
        before = opt.paging_stats()
        opt.step()
        after = opt.paging_stats()
        assert (after["prefetches"] - before["prefetches"], after["evictions"] - before["evictions"]) == (moved, moved)
        assert device_resident(opt) == list(range(k)), f"skipped parameter {skipped}"
    opt.pager.gpu_budget_bytes = BLOCK  # a lowered budget holds after the next step, skipped state included
    for i, p in enumerate(params):
        p.grad = None if i < k else torch.randn(p.shape)
    opt.step()
    assert opt.paging_stats()["resident_bytes"] == {0: BLOCK} and device_resident(opt) == [0]


@needs_ext
def test_group_added_later_joins_the_order_where_it_is_updated():
    first, later = make_params([(64, 64)] * 4), make_params([(64, 64)] * 2)
    opt = fo.PagedAdamW(first, page_min_bytes=0, gpu_budget_bytes=3 * BLOCK, chunk_bytes=1)
    step_transfers(opt, first, 0)
    opt.add_param_group({"params": later, "lr": 3e-3})
    assert step_transfers(opt, first + later, 1)[:2] == (3, 3)  # block 3 streams, the new blocks come in and go
    for t in range(2, 4):
        assert step_transfers(opt, first + later, t)[:2] == (3, 3)
        assert device_resident(opt) == [0, 1, 2]


@needs_ext
def test_each_device_keeps_its_own_budget(monkeypatch):
    # The host build simulates devices by location: blocks of odd parameters are paged to location 1.
    n, k = 8, 2
    free = make_params([(64, 64)] * n)
    free_opt = fo.PagedAdamW(free, page_min_bytes=0, chunk_bytes=1)
    params = make_params([(64, 64)] * n)
    opt = fo.PagedAdamW(params, page_min_bytes=0, gpu_budget_bytes=k * BLOCK, chunk_bytes=1)
    allocate, index = opt.pager.allocate, {p: i for i, p in enumerate(params)}

    def allocate_by_parity(key, specs, device):
        state = allocate(key, specs, device)
        opt.pager.blocks[key].location = index[key] % 2
        return state

    monkeypatch.setattr(opt.pager, "allocate", allocate_by_parity)
    for t in range(4):
        moved = step_transfers(opt, params, t)
        step_transfers(free_opt, free, t)
        assert moved[:2] == ((n, n - 2 * k) if t == 0 else (n - 2 * k, n - 2 * k))
        assert opt.paging_stats()["resident_bytes"] == {0: k * BLOCK, 1: k * BLOCK}
        assert [[index[p] for p in opt.pager.resident[loc]] for loc in (0, 1)] == [[0, 2], [1, 3]]
    assert_params_equal(params, free)


@needs_ext
@pytest.mark.parametrize("budget", [None, 10 * BLOCK], ids=["no-budget", "budget-above-capacity"])
def test_state_beyond_the_free_memory_is_paged_as_if_the_budget_were_what_fits(monkeypatch, budget):
    """A simulated GPU of 5 blocks holding nothing but this state (free = 5 blocks - resident): with no budget, or
    one above the capacity, 8 blocks of state are kept to 5 - 2 (the two chunks in flight) = 3 resident after each
    step and never more than 5 at any time, with one warning; the numbers are the unpaged run's."""
    capacity, n = 5 * BLOCK, 8
    free = make_params([(64, 64)] * n)
    free_opt = fo.PagedAdamW(free, lr=1e-2, page_min_bytes=1 << 30)  # not paged: the simulated GPU is opt's alone
    params = make_params([(64, 64)] * n)
    opt = fo.PagedAdamW(params, lr=1e-2, page_min_bytes=0, gpu_budget_bytes=budget, chunk_bytes=1)
    ext = _ext.load()
    monkeypatch.setattr(ext, "memory_info", lambda location: (capacity - opt.pager.resident_bytes.get(location, 0),
                                                               capacity))
    monkeypatch.setattr(_common, "_warned", set())
    peaks = record_residency_peaks(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            step_transfers(opt, params, t)
            step_transfers(free_opt, free, t)
            assert opt.paging_stats()["resident_bytes"] == {0: 3 * BLOCK}, t
    assert max(peaks) <= capacity
    messages = [str(w.message) for w in caught if "does not fit in the free memory of device 0" in str(w.message)]
    assert len(messages) == 1 and f"keeping at most {3 * BLOCK} bytes resident" in messages[0], messages
    assert_params_equal(params, free)


@needs_ext
def test_unlimited_budget_prefetches_each_state_once():
    params = make_params([(64, 64)] * 3)
    opt = fo.PagedAdamW(params, page_min_bytes=0)
    train(params, opt, 4)
    assert set(opt.state_residency().values()) == {"device"}
    assert opt.paging_stats()["prefetches"] == 3 and opt.paging_stats()["evictions"] == 0


@needs_ext
def test_small_state_is_not_paged():
    params = make_params([(4,), (64, 64)])
    opt = fo.PagedAdamW(params, page_min_bytes=1024)
    train(params, opt, 1)
    assert opt.state_residency() == {0: "not paged", 1: "device"}


@needs_ext
def test_cuda_parameters_with_a_cpu_build_warn_once_that_nothing_is_paged(monkeypatch):
    if _ext.load().is_cuda_build():
        pytest.skip("a CUDA build of fused_lora._C")
    monkeypatch.setattr(_common, "_warned", set())
    pager = fo.PageManager(gpu_budget_bytes=0)
    with pytest.warns(UserWarning, match="built without CUDA.*no paging, gpu_budget_bytes has no effect"):
        assert pager.paging_location(torch.device("cuda", 0)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pager.paging_location(torch.device("cuda", 1)) is None


@needs_ext
def test_optimizer_state_is_freed_with_the_optimizer():
    ext = _ext.load()
    # earlier tests' optimizers caught in reference cycles die whenever the collector runs: collect them first, or
    # a collection inside the loop frees them and the count drops below before + 2 (seen in CI: 10 == 40 + 2)
    gc.collect()
    before = ext.stats()["live_allocations"]
    for _ in range(5):
        params = make_params([(64, 64), (37, 129)])
        opt = fo.PagedAdamW8bit(params, page_min_bytes=0, min_8bit_size=1)
        train(params, opt, 1)
        assert ext.stats()["live_allocations"] == before + 2
        del opt
    assert ext.stats()["live_allocations"] == before


def test_missing_extension_raises_only_when_paging_is_used(monkeypatch):
    monkeypatch.setattr(_ext, "_module", _ext.MissingExtension("ImportError: test"))
    params = make_params([(64, 64)])
    opt = fo.PagedAdamW(params, page_min_bytes=0)
    plain = fo.AdamW8bit(make_params([(64, 64)]))
    train(plain.param_groups[0]["params"], plain, 1)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        train(params, opt, 1)
