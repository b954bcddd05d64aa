"""PagedAdamW / PagedAdamW8bit / AdamW8bit on the CPU: trajectories vs torch.optim.AdamW and bitsandbytes'
AdamW8bit, resume, paging under a budget (host-memory build of the extension), argument checks, and the Triton
update kernels under the interpreter against the PyTorch path.

Tolerances. On the CPU the optimizers run the same PyTorch ops in the same order as torch.optim.AdamW
(foreach=False) and as bitsandbytes' CPU AdamW8bit, so trajectories are compared bit for bit (torch.equal). The
Triton kernels round differently only where they contract a·b + c or evaluate lerp in another order (a few fp32
ulps per step), so they are compared with the PyTorch path at relative error ≤ 1e-6 after 3 steps.
"""

import io
import warnings

import pytest
import torch

from fused_lora import _ext
from fused_lora import optim as fo

SHAPES = {"37x129": (37, 129), "200": (200,), "64x80": (64, 80), "3x7x41": (3, 7, 41)}


def make_params(shapes, dtype=torch.float32):
    return [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(100 + i)).to(dtype))
        for i, s in enumerate(shapes)
    ]


def train(params, opt, steps, seed=0, start=0):
    """`steps` steps with fresh random gradients drawn from (seed, step)."""
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return params


def assert_params_equal(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"parameter {i}: max |diff| {(x - y).abs().max().item():.3e}"


needs_ext = pytest.mark.skipif(not _ext.is_available(), reason="fused_lora._C is not built")


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


# ---------------------------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("budget", [None, 0], ids=["budget-all", "budget-0"])
def test_paged_adamw_matches_torch_adamw_bit_exact(budget):
    shapes = list(SHAPES.values())
    ref = make_params(shapes)
    ref_opt = torch.optim.AdamW(
        [{"params": ref[:2]}, {"params": ref[2:], "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False,
    )
    ours = make_params(shapes)
    opt = fo.PagedAdamW(
        [{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, gpu_budget_bytes=budget, page_min_bytes=0,
    )
    train(ref, ref_opt, 30)
    train(ours, opt, 30)
    assert_params_equal(ours, ref)
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_8bit_matches_bitsandbytes_adamw8bit_bit_exact(bnb, cls):
    if cls == "PagedAdamW8bit" and not _ext.is_available():
        pytest.skip("fused_lora._C is not built")
    # 37x129 = 4773 and 64x80 = 5120 elements take the 8-bit path, 200 and 3x7x41 = 861 stay 32-bit (min 4096).
    shapes = list(SHAPES.values())
    ref = make_params(shapes)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    ours = make_params(shapes)
    extra = {"page_min_bytes": 0, "gpu_budget_bytes": 4096} if cls == "PagedAdamW8bit" else {}
    opt = getattr(fo, cls)(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, **extra)
    train(ref, ref_opt, 30)
    train(ours, opt, 30)
    assert_params_equal(ours, ref)
    for p, q in zip(ours, ref):
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in ref_opt.state[q]:
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8
    assert opt.state[ours[1]]["state1"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_8bit_low_precision_parameters_match_bitsandbytes_bit_exact(bnb, dtype):
    shapes = [(37, 129), (200,)]  # one 8-bit, one 32-bit state
    ref = make_params(shapes, dtype)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2, weight_decay=0.05)
    ours = make_params(shapes, dtype)
    opt = fo.AdamW8bit(ours, lr=1e-2, weight_decay=0.05)
    train(ref, ref_opt, 8)
    train(ours, opt, 8)
    assert_params_equal(ours, ref)
    assert ours[0].dtype == dtype and opt.state[ours[1]]["state1"].dtype == torch.float32


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    params = make_params([(37, 9)])
    opt = fo.AdamW8bit(params, lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = (params[0] ** 2).sum()
        loss.backward()
        return loss

    before = params[0].detach().clone()
    loss = opt.step(closure)
    assert torch.equal(loss, (before**2).sum()) and not torch.equal(params[0], before)


def test_8bit_state_is_two_bytes_per_parameter():
    p = make_params([(64, 80)])
    opt = fo.AdamW8bit(p)
    train(p, opt, 1)
    state_bytes = sum(t.numel() * t.element_size() for k, t in opt.state[p[0]].items() if k[:5] in ("state", "absma"))
    assert state_bytes == 2 * 5120 + 2 * 4 * 20


def test_dynamic_maps_match_bitsandbytes(bnb):
    from bitsandbytes.functional import create_dynamic_map

    assert torch.equal(fo.dynamic_map(True), create_dynamic_map(signed=True))
    assert torch.equal(fo.dynamic_map(False), create_dynamic_map(signed=False))


@pytest.mark.parametrize("n", [37, 256, 1000, 4773])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_blockwise_matches_bitsandbytes(bnb, n, signed):
    code = fo.dynamic_map(signed)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
    x = x if signed else x * x
    if n >= 512:
        x[256:512] = 0.0  # an all-zero block
    q_ref, absmax_ref = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
    q, absmax = fo.quantize_blockwise(x, code)
    assert torch.equal(absmax, absmax_ref)
    assert torch.equal(q, q_ref)
    back = fo.dequantize_blockwise(q, absmax, code)
    assert torch.equal(back, torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Resume and state dicts
# ---------------------------------------------------------------------------------------------------------------


def _roundtrip(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


RESUME_CASES = {
    "paged-to-paged": (lambda ps: fo.PagedAdamW(ps, lr=1e-2, page_min_bytes=0, gpu_budget_bytes=0),) * 2,
    "paged-to-torch": (
        lambda ps: fo.PagedAdamW(ps, lr=1e-2, page_min_bytes=0),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    ),
    "torch-to-paged": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        lambda ps: fo.PagedAdamW(ps, lr=1e-2, page_min_bytes=0),
    ),
    "paged8-to-plain8": (
        lambda ps: fo.PagedAdamW8bit(ps, lr=1e-2, page_min_bytes=0, gpu_budget_bytes=0),
        lambda ps: fo.AdamW8bit(ps, lr=1e-2),
    ),
    "plain8-to-paged8": (
        lambda ps: fo.AdamW8bit(ps, lr=1e-2),
        lambda ps: fo.PagedAdamW8bit(ps, lr=1e-2, page_min_bytes=0),
    ),
}


@needs_ext
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_mid_training_is_bit_exact(case):
    make_first, make_second = RESUME_CASES[case]
    shapes = [(37, 129), (200,), (64, 80)]
    straight = make_params(shapes)
    opt = make_first(straight)
    train(straight, opt, 12)

    resumed = make_params(shapes)
    first = make_first(resumed)
    train(resumed, first, 6)
    saved = _roundtrip(first.state_dict())
    del first
    second = make_second(resumed)
    second.load_state_dict(saved)
    train(resumed, second, 6, start=6)
    assert_params_equal(resumed, straight)


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_loads_bitsandbytes_adamw8bit_state_dict(bnb, cls):
    if cls == "PagedAdamW8bit" and not _ext.is_available():
        pytest.skip("fused_lora._C is not built")
    shapes = [(37, 129), (200,)]
    ref = make_params(shapes)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=5e-3)
    train(ref, ref_opt, 5)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = getattr(fo, cls)(ours, lr=1.0)
    opt.load_state_dict(_roundtrip(ref_opt.state_dict()))
    assert opt.param_groups[0]["lr"] == 5e-3
    train(ref, ref_opt, 5, start=5)
    train(ours, opt, 5, start=5)
    assert_params_equal(ours, ref)


def test_loaded_quantization_maps_get_their_own_tables():
    """Each load brings a different qmap1; a table cached for an earlier, freed map must never serve a later one
    (freed 1 KiB maps are often reallocated at the same address)."""
    p = make_params([(37, 129)])
    opt = fo.AdamW8bit(p, lr=1e-2)
    train(p, opt, 1)
    for k in range(6):
        sd = opt.state_dict()
        state = dict(sd["state"][0], qmap1=fo.dynamic_map(True) * (0.5 + k / 10))
        sd = {"state": {0: state}, "param_groups": sd["param_groups"]}
        fresh_p = [torch.nn.Parameter(p[0].detach().clone())]
        fresh = fo.AdamW8bit(fresh_p, lr=1e-2)
        fresh.load_state_dict(sd)
        opt.load_state_dict(sd)
        del sd, state
        train(p, opt, 1, start=k + 1)
        train(fresh_p, fresh, 1, start=k + 1)
        assert torch.equal(opt.state[p[0]]["state1"], fresh.state[fresh_p[0]]["state1"]), f"load {k}"


def _torch_adamw_state_dict(shapes):
    params = make_params(shapes)
    opt = torch.optim.AdamW(params, foreach=False)
    train(params, opt, 1)
    return opt.state_dict()


def _adamw8bit_state_dict(shapes):
    params = make_params(shapes)
    opt = fo.AdamW8bit(params)
    train(params, opt, 1)
    return opt.state_dict()


@pytest.mark.parametrize(
    "cls, make_saved, message",
    [
        ("AdamW8bit", lambda: _torch_adamw_state_dict([(37, 129)]), "the state of parameter 0 has no state1, state2.*AdamW8bit"),
        ("PagedAdamW", lambda: _adamw8bit_state_dict([(37, 129)]), "the state of parameter 0 has no exp_avg, exp_avg_sq"),
        ("AdamW8bit", lambda: _adamw8bit_state_dict([(37, 128)]), "state1 of parameter 0 has 4736 elements, the "
         "parameter has 4773"),
    ],
    ids=["torch-into-8bit", "8bit-into-paged", "other-model"],
)
def test_state_dict_of_another_kind_is_rejected_and_nothing_changes(cls, make_saved, message):
    params = make_params([(37, 129)])
    opt = getattr(fo, cls)(params, page_min_bytes=1 << 30) if cls == "PagedAdamW" else fo.AdamW8bit(params)
    train(params, opt, 1)
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=f"{cls}.load_state_dict: {message}"):
        opt.load_state_dict(make_saved())
    assert opt.state[params[0]]["step"] == 1
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value), key


def test_load_state_dict_rejects_mismatched_groups():
    opt = fo.AdamW8bit(make_params([(5,), (7,)]))
    other = fo.AdamW8bit(make_params([(5,)]))
    with pytest.raises(ValueError, match="parameter groups do not match"):
        opt.load_state_dict(other.state_dict())


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
    peaks = []
    update = opt._update_chunk

    def recording_update(chunk):
        peaks.append(sum(opt.paging_stats()["resident_bytes"].values()))
        update(chunk)

    opt._update_chunk = recording_update
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
    monkeypatch.setattr(fo, "_warned_fallbacks", set())
    pager = fo.PageManager(gpu_budget_bytes=0)
    with pytest.warns(UserWarning, match="built without CUDA.*no paging, gpu_budget_bytes has no effect"):
        assert pager.paging_location(torch.device("cuda", 0)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pager.paging_location(torch.device("cuda", 1)) is None


@needs_ext
def test_optimizer_state_is_freed_with_the_optimizer():
    ext = _ext.load()
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


# ---------------------------------------------------------------------------------------------------------------
# torch.optim semantics and argument checks
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
def test_lr_scheduler_and_grad_clipping_match_torch():
    shapes = [(37, 129), (200,)]
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), lambda ps: fo.PagedAdamW(ps, lr=1e-2)):
        params = make_params(shapes)
        opt = make(params)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=12)
        for t in range(12):
            g = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = 5 * torch.randn(p.shape, generator=g)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            opt.step()
            sched.step()
        runs.append(params)
    assert_params_equal(*runs)


def test_parameters_without_gradient_are_untouched():
    params = make_params([(37,), (5000,)])
    before = params[1].detach().clone()
    opt = fo.AdamW8bit(params)
    params[0].grad = torch.randn(37)
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1e-3}, "lr must be a number >= 0"),
        ({"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas must be two numbers in \[0, 1\)"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"backend": "cuda"}, "backend must be"),
    ],
    ids=["negative-lr", "beta1-one", "beta2-negative", "negative-eps", "negative-wd", "bad-backend"],
)
@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"])
def test_bad_arguments_raise_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"{cls}: {message}"):
        getattr(fo, cls)(make_params([(3,)]), **kwargs)


@pytest.mark.parametrize(
    "group, message",
    [
        ({"lr": -1e-3}, "lr must be a number >= 0"),
        ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"amsgrad": True}, "amsgrad=True is not supported"),
        ({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)]}, "parameters must be real floating"),
    ],
    ids=["negative-lr", "beta2-above-one", "negative-eps", "amsgrad", "int-params"],
)
@pytest.mark.parametrize("cls", ["PagedAdamW", "AdamW8bit"])
def test_groups_are_checked_at_construction_and_when_added(cls, group, message):
    group = {"params": make_params([(3,)]), **group}
    with pytest.raises(ValueError, match=f"{cls}: {message}"):
        getattr(fo, cls)([group])
    opt = getattr(fo, cls)(make_params([(5,)]))
    with pytest.raises(ValueError, match=f"{cls}: {message}"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1


@needs_ext
def test_group_added_mid_training_matches_torch():
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), lambda ps: fo.PagedAdamW(ps, lr=1e-2)):
        first, later = make_params([(37, 129)]), make_params([(200,), (3, 7, 41)])
        opt = make(first)
        train(first, opt, 3)
        opt.add_param_group({"params": later, "lr": 3e-3, "weight_decay": 0.2})
        train(first + later, opt, 4, start=3)
        runs.append(first + later)
    assert_params_equal(*runs)


@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"])
def test_unsupported_adamw_flags_are_rejected(cls, flag):
    with pytest.raises(ValueError, match=f"{cls}: {flag}=True is not supported"):
        getattr(fo, cls)(make_params([(3,)]), **{flag: True})
    getattr(fo, cls)(make_params([(3,)]), **{flag: False})  # torch.optim.AdamW's defaults are accepted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"amsgrad": True}, "amsgrad=True is not supported"),
        ({"maximize": True}, "maximize=True is not supported"),
        ({"decoupled_weight_decay": False, "weight_decay": 0.1}, "decoupled_weight_decay=False"),
    ],
    ids=["amsgrad", "maximize", "adam-l2-decay"],
)
def test_state_dict_with_unsupported_torch_flags_is_rejected_and_nothing_changes(kwargs, message):
    params = make_params([(37, 129)])
    ref_opt = torch.optim.Adam(params, lr=1e-2, foreach=False, **kwargs)
    train(params, ref_opt, 2)
    opt = fo.AdamW8bit(params, lr=5e-3)
    train(params, opt, 1)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=f"AdamW8bit: {message}"):
        opt.load_state_dict(ref_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 5e-3 and opt.state[params[0]]["step"] == before["step"]
    assert torch.equal(opt.state[params[0]]["state1"], before["state1"])


def test_rejected_step_leaves_every_state_as_it_was():
    shapes = [(37, 129), (10, 3)]
    ref = make_params(shapes)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    ours = make_params(shapes)
    opt = fo.PagedAdamW(ours, lr=1e-2, page_min_bytes=1 << 30)
    train(ours, opt, 1)
    ours[1].grad = torch.sparse_coo_tensor([[1, 4]], torch.randn(2, 3), (10, 3))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert opt.state[ours[0]]["step"] == 1
    train(ref, ref_opt, 2)
    train(ours, opt, 1, start=1)
    assert_params_equal(ours, ref)


def test_tensor_lr_is_read_once_per_group_and_step(monkeypatch):
    """A CUDA tensor lr costs a device synchronization per read, so the step must not read it per parameter."""
    params = make_params([(37,), (129,), (200,), (5, 7)])
    opt = fo.AdamW8bit(params, lr=1e-2)
    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or real_float(t))
    train(params, opt, 2)
    assert len(reads) == 2


@pytest.mark.parametrize("cls", ["PagedAdamW", "AdamW8bit"])
def test_sparse_gradients_are_rejected(cls):
    params = make_params([(10, 3)])
    opt = getattr(fo, cls)(params, page_min_bytes=1 << 30) if cls == "PagedAdamW" else fo.AdamW8bit(params)
    params[0].grad = torch.sparse_coo_tensor([[1, 4]], torch.randn(2, 3), (10, 3))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


# ---------------------------------------------------------------------------------------------------------------
# Triton update kernels (interpreter) vs the PyTorch path
# ---------------------------------------------------------------------------------------------------------------


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cls", ["PagedAdamW", "AdamW8bit"])
def test_triton_update_matches_pytorch_path(interpret_triton, cls, dtype):
    shapes = [(37, 9), (300,), (3, 7, 41)]
    results = []
    for backend in ("reference", "triton"):
        params = make_params(shapes, dtype)
        kwargs = {"min_8bit_size": 300} if cls == "AdamW8bit" else {"page_min_bytes": 1 << 30}
        opt = getattr(fo, cls)(params, lr=1e-2, weight_decay=0.1, backend=backend, **kwargs)
        train(params, opt, 3)
        results.append((params, opt))
    (ref, ref_opt), (out, opt) = results
    bound = 1e-6 if dtype == torch.float32 else 1e-3  # fp16 params: one fp16 rounding of an fp32 difference
    for p, q in zip(out, ref):
        assert _relative(p, q) <= bound
        for key, value in ref_opt.state[q].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert _relative(opt.state[p][key], value) <= 1e-5, key
            elif isinstance(value, torch.Tensor):
                mismatched = (opt.state[p][key] != value).float().mean().item()
                assert mismatched <= 0.01, f"{key}: {mismatched:.2%} of the 8-bit codes differ"


def test_one_kernel_launch_per_chunk(interpret_triton, monkeypatch):
    from fused_lora.kernels import adamw as kernels

    calls = []
    real = kernels.adamw32_update_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(kernels, "adamw32_update_", counting)
    params = make_params([(37,), (129,), (200,), (5, 7)])
    opt = fo.PagedAdamW(params, backend="triton", page_min_bytes=1 << 30)
    train(params, opt, 2)
    assert calls == [4, 4]
    small_chunks = fo.PagedAdamW(params, backend="triton", page_min_bytes=1 << 30, chunk_bytes=2000)
    calls.clear()
    train(params, small_chunks, 1)
    assert calls == [2, 2]
