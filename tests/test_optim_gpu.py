"""Paged optimizers on a CUDA device (marked gpu; skipped without one): Triton update kernels vs torch.optim.AdamW
and vs the PyTorch path, real residency under a budget (cudaMemRangeGetAttribute) with the first state in the
update order resident and the rest streamed, steps queued ahead of a busy GPU, no device or managed memory leak
over 1,000 steps, and the free-memory guard of the allocator.

Tolerances: the kernels contract a·b + c into FMAs and evaluate lerp in one order, so after 30 fp32 steps the
parameters agree with torch.optim.AdamW to a relative error of 1e-5 (a few hundred ulps of accumulated rounding
on O(1) values, far below any optimizer-visible difference); 8-bit codes may differ where an fp32 rounding moves
a value across a code boundary, which we bound at 1% of the codes.
"""

import gc

import pytest
import torch

from fused_lora import _ext
from fused_lora import optim as fo
from fused_lora.testing import relative_error

pytestmark = pytest.mark.gpu

SHAPES = [(37, 129), (4096, 16), (200,), (3, 7, 41), (1024, 1024)]


@pytest.fixture
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _ext.is_available() or not _ext.load().is_cuda_build():
        pytest.skip("fused_lora._C was built without CUDA; rebuild with a CUDA toolkit and a CUDA torch")
    return _ext.load()


def make_params(shapes, device="cuda", dtype=torch.float32):
    return [
        torch.nn.Parameter(
            torch.randn(s, generator=torch.Generator().manual_seed(100 + i)).to(device=device, dtype=dtype)
        )
        for i, s in enumerate(shapes)
    ]


def train(params, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        opt.step()
    return params


@pytest.mark.parametrize("budget", [None, 0, 16 << 20], ids=["budget-all", "budget-0", "budget-16MiB"])
def test_paged_adamw_matches_torch_adamw(ext, budget):
    ref = make_params(SHAPES)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    ours = make_params(SHAPES)
    opt = fo.PagedAdamW(ours, lr=1e-2, weight_decay=0.1, gpu_budget_bytes=budget, page_min_bytes=0)
    train(ref, ref_opt, 30)
    train(ours, opt, 30)
    for p, q in zip(ours, ref):
        assert relative_error(p, q) <= 1e-5
        assert relative_error(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]) <= 1e-5


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_8bit_cuda_matches_pytorch_path(ext, cls):
    kwargs = {"page_min_bytes": 0, "gpu_budget_bytes": 1 << 20} if cls == "PagedAdamW8bit" else {}
    cpu = make_params(SHAPES, device="cpu")
    cpu_opt = getattr(fo, cls)(cpu, lr=1e-2, weight_decay=0.05, backend="reference", **kwargs)
    gpu = make_params(SHAPES)
    gpu_opt = getattr(fo, cls)(gpu, lr=1e-2, weight_decay=0.05, **kwargs)
    train(cpu, cpu_opt, 10)
    train(gpu, gpu_opt, 10)
    for p, q in zip(gpu, cpu):
        assert relative_error(p, q) <= 1e-5
        s, r = gpu_opt.state[p], cpu_opt.state[q]
        if r["state1"].dtype == torch.uint8:
            mismatched = (s["state1"].cpu() != r["state1"]).float().mean().item()
            assert mismatched <= 0.01


def test_bf16_parameters_follow_fp32_adamw(ext):
    master = make_params(SHAPES)
    ref_opt = torch.optim.AdamW(master, lr=1e-3, foreach=False)
    ours = make_params(SHAPES, dtype=torch.bfloat16)
    opt = fo.PagedAdamW(ours, lr=1e-3, page_min_bytes=0)
    train(master, ref_opt, 10)
    train(ours, opt, 10)
    for p, q in zip(ours, master):
        assert p.dtype == torch.bfloat16
        assert relative_error(p, q) <= 1e-2  # bf16 keeps 8 mantissa bits: one rounding per step


def test_residency_follows_the_budget(ext):
    params = make_params([(1024, 1024)] * 4)  # 8 MiB of fp32 state each
    block = 8 << 20
    opt = fo.PagedAdamW(params, page_min_bytes=0, gpu_budget_bytes=2 * block, chunk_bytes=1)
    train(params, opt, 1)
    for t in range(1, 3):
        before = opt.paging_stats()
        train(params, opt, 1, start=t)
        after = opt.paging_stats()
        assert after["prefetches"] - before["prefetches"] == 2  # the first two stay, the last two stream
        assert after["evictions"] - before["evictions"] == 2
    torch.cuda.synchronize()
    assert opt.state_residency() == {0: "device", 1: "device", 2: "host", 3: "host"}
    assert opt.paging_stats()["resident_bytes"] == {0: 2 * block}


def test_steps_queued_ahead_of_a_busy_gpu_keep_results_and_residency(ext):
    # The compute stream sleeps before each step, so the host queues three steps of prefetches, updates and
    # evictions on three streams ahead of the GPU: the result and the final residency show the events order them.
    grads = [[torch.randn(1024, 1024, device="cuda") for _ in range(4)] for _ in range(3)]
    runs = []
    for budget in (None, 2 * (8 << 20)):
        params = make_params([(1024, 1024)] * 4)
        opt = fo.PagedAdamW(params, lr=1e-2, page_min_bytes=0, gpu_budget_bytes=budget, chunk_bytes=1)
        torch.cuda.synchronize()
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            torch.cuda._sleep(20_000_000)
            opt.step()
        torch.cuda.synchronize()
        runs.append((params, opt.state_residency()))
    for p, q in zip(runs[1][0], runs[0][0]):
        assert torch.equal(p, q)
    assert runs[0][1] == {i: "device" for i in range(4)}
    assert runs[1][1] == {0: "device", 1: "device", 2: "host", 3: "host"}


def test_tiny_budget_evicts_everything_and_result_is_unchanged(ext):
    free = make_params(SHAPES)
    train(free, fo.PagedAdamW8bit(free, page_min_bytes=0), 5)
    tight = make_params(SHAPES)
    opt = fo.PagedAdamW8bit(tight, page_min_bytes=0, gpu_budget_bytes=0, chunk_bytes=1)
    train(tight, opt, 5)
    torch.cuda.synchronize()
    for p, q in zip(tight, free):
        assert torch.equal(p, q)
    assert set(opt.state_residency().values()) == {"host"}


@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit"])
def test_no_device_or_managed_memory_leak_over_1000_steps(ext, cls):
    params = make_params([(512, 512)] * 6 + [(300,)])
    grads = [torch.randn_like(p) for p in params]
    opt = getattr(fo, cls)(params, lr=1e-4, page_min_bytes=0, gpu_budget_bytes=3 << 20, chunk_bytes=2 << 20)

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    device_bytes, managed = torch.cuda.memory_allocated(), ext.stats()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == device_bytes
    after = ext.stats()
    assert after["live_bytes"] == managed["live_bytes"]
    assert after["live_allocations"] == managed["live_allocations"]
    assert after["prefetch_calls"] > managed["prefetch_calls"]  # the budget really pages state in and out
    del step, opt
    gc.collect()
    assert ext.stats()["live_allocations"] == managed["live_allocations"] - len(params)


def test_state_freed_while_updates_and_evictions_are_in_flight(ext, capfd):
    params = make_params([(1024, 1024)] * 4)
    opt = fo.PagedAdamW(params, page_min_bytes=0, gpu_budget_bytes=8 << 20, chunk_bytes=1)
    before = ext.stats()["live_allocations"]
    train(params, opt, 1)  # allocates the state and warms the pinned-memory cache (both may synchronize)
    assert ext.stats()["live_allocations"] == before + 4
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda._sleep(50_000_000)  # keeps the compute stream busy: the step below only queues its work
    opt.step()
    del opt
    gc.collect()
    assert ext.stats()["live_allocations"] == before
    torch.cuda.synchronize()
    assert "fused_lora._C" not in capfd.readouterr().err


def test_allocator_never_exceeds_free_device_memory(ext):
    device = torch.cuda.current_device()
    free, total = ext.memory_info(device)
    assert 0 < free <= total
    before = ext.stats()["live_bytes"]
    with pytest.raises(RuntimeError, match="refused"):
        ext.empty_managed(free + (1 << 30), device)
    assert ext.stats()["live_bytes"] == before
    small = ext.empty_managed(1 << 20, device)
    assert small.device.type == "cuda"
    ext.prefetch(small, device, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert ext.last_prefetch_location(small) == device
    ext.prefetch(small, ext.HOST_LOCATION, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert ext.last_prefetch_location(small) == ext.HOST_LOCATION


def test_resume_on_cuda_between_paged_and_plain_8bit_is_bit_exact(ext):
    straight = make_params(SHAPES)
    train(straight, fo.PagedAdamW8bit(straight, page_min_bytes=0, gpu_budget_bytes=0), 8)
    resumed = make_params(SHAPES)
    first = fo.PagedAdamW8bit(resumed, page_min_bytes=0, gpu_budget_bytes=0)
    train(resumed, first, 4)
    second = fo.AdamW8bit(resumed)
    second.load_state_dict(first.state_dict())
    train(resumed, second, 4, start=4)
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)


def test_scheduler_and_clipping_match_torch_on_cuda(ext):
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), lambda ps: fo.PagedAdamW(ps, lr=1e-2)):
        params = make_params(SHAPES[:3])
        opt = make(params)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        for t in range(10):
            g = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = 5 * torch.randn(p.shape, generator=g).cuda()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        runs.append(params)
    for p, q in zip(*runs):
        assert relative_error(p, q) <= 1e-5


def test_parameters_on_cpu_and_several_devices(ext):
    devices = ["cpu"] + [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2))]
    ref = [make_params([(37, 129)], device=d)[0] for d in devices]
    ours = [make_params([(37, 129)], device=d)[0] for d in devices]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    opt = fo.PagedAdamW(ours, lr=1e-2, page_min_bytes=0)
    train(ref, ref_opt, 5)
    train(ours, opt, 5)
    for p, q in zip(ours, ref):
        assert relative_error(p, q) <= 1e-5
    residency = opt.state_residency()
    assert residency[0] == "not paged" and all(residency[i] == "device" for i in range(1, len(devices)))
