"""The optimizers where a checkpoint or a copy could lose or corrupt state silently (a read-only review's findings,
each a test that failed before its fix): moments of another shape with the same size, state read before a first
step, a refused allocation while loading, float64 parameters, copy.deepcopy and pickling, and the quantization
tables of loaded maps."""

import copy
import io
import pickle

import pytest
import torch
from _optim_helpers import assert_params_equal, make_params, needs_ext, refuse_nth_allocation, train

from fused_lora import optim as fo

pytestmark = needs_ext

OPTIMIZERS = {
    "paged": lambda ps: fo.PagedAdamW(ps, lr=1e-2, page_min_bytes=0),
    "paged8": lambda ps: fo.PagedAdamW8bit(ps, lr=1e-2, page_min_bytes=0, min_8bit_size=0),
    "adamw8": lambda ps: fo.AdamW8bit(ps, lr=1e-2, min_8bit_size=0),
}


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", ["paged", "torch"])
def test_moments_of_another_shape_with_the_same_size_are_refused(make):
    """LoRA's A (r, K) and B (K, r) have as many elements: a checkpoint listing them in another order loaded A's
    moments into B (reshaped) without a word; torch.optim.AdamW fails at its next step. Now refused, naming both
    shapes, with nothing changed."""
    a, b = make_params([(4, 8), (8, 4)])
    maker = OPTIMIZERS["paged"] if make == "paged" else (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    source = maker([a, b])
    train([a, b], source, 2)
    swapped = _roundtrip(source.state_dict())
    swapped["state"] = {0: swapped["state"][1], 1: swapped["state"][0]}
    target = OPTIMIZERS["paged"](make_params([(4, 8), (8, 4)]))
    message = r"exp_avg of parameter 0 has shape \(8, 4\), the parameter has shape \(4, 8\)"
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(swapped)
    assert not any(target.state.values())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_read_before_a_first_step_saves_and_loads(name):
    """Reading opt.state[p] (a logging callback) makes an empty entry in torch's defaultdict: state_dict() raised
    KeyError 'step', and a state dict with {} (torch's own writes it) was refused. {} is no state, as in torch."""
    ps = make_params([(64, 80), (10,)])
    opt = OPTIMIZERS[name](ps)
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()
    assert opt.state[ps[1]] == {}  # read: now an empty entry
    sd = _roundtrip(opt.state_dict())
    assert sd["state"][1] == {}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fresh = OPTIMIZERS[name](copies)
    fresh.load_state_dict(sd)
    assert not fresh.state[copies[1]] and fresh.state[copies[0]]["step"] == 1
    if name == "paged":
        torch_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
        torch_opt.load_state_dict(sd)
        back = OPTIMIZERS[name]([torch.nn.Parameter(p.detach().clone()) for p in ps])
        back.load_state_dict(_roundtrip(torch_opt.state_dict()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_refused_allocation_while_loading_leaves_the_old_state(name, monkeypatch):
    """load_state_dict released the old state before allocating the new: a refused managed allocation left the
    parameters after it with no state (training restarted at step 0 for them). Now the new state is made whole
    first: on failure every step, moment and the pager's bookkeeping are as they were."""
    ps = make_params([(64, 80), (37, 129), (200,)])
    opt = OPTIMIZERS[name](ps)
    train(ps, opt, 3)
    other = make_params([(64, 80), (37, 129), (200,)])
    donor = OPTIMIZERS[name](other)
    train(other, donor, 5, seed=9)
    sd = _roundtrip(donor.state_dict())
    before = _roundtrip(opt.state_dict())
    stats = opt.paging_stats()
    real = refuse_nth_allocation(monkeypatch, opt, 2)
    with pytest.raises(RuntimeError, match="refused"):
        opt.load_state_dict(sd)
    monkeypatch.setattr(opt, "_new_state", real)
    after = _roundtrip(opt.state_dict())
    for index in before["state"]:
        for key, value in before["state"][index].items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value)), (index, key)
    assert opt.paging_stats() == stats
    train(ps, opt, 2, start=3)  # and it trains on from its own state
    assert all(opt.state[p]["step"] == 5 for p in ps)


def test_float64_parameters_are_refused():
    """The update and its state are fp32: a float64 parameter was rounded to fp32 at every step (1e-8 per step at
    lr = 0). Refused, at construction and in add_param_group; a frozen float64 tensor is still skipped."""
    p64 = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    for make in OPTIMIZERS.values():
        with pytest.raises(ValueError, match="torch.float64"):
            make([p64])
    opt = OPTIMIZERS["paged"](make_params([(4, 4)]))
    with pytest.raises(ValueError, match="torch.float64"):
        opt.add_param_group({"params": [p64]})
    assert len(opt.param_groups) == 1
    OPTIMIZERS["paged"]([torch.zeros(3, dtype=torch.float64), *make_params([(4,)])])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_the_optimizer_trains_as_the_original(name, how):
    """torch.optim.Optimizer pickles defaults, state and param_groups only: a deep-copied (or pickled) optimizer had
    no pager, backend or chunk size, and its step raised AttributeError. The copy now has the original's settings,
    its paged state back in managed memory, and continues bit for bit as the original does."""
    ps = make_params([(64, 80), (200,)])
    opt = OPTIMIZERS[name](ps)
    train(ps, opt, 3)
    model = (ps, opt)
    twin_ps, twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert twin.chunk_bytes == opt.chunk_bytes and twin.backend == opt.backend
    train(ps, opt, 3, start=3)
    train(twin_ps, twin, 3, start=3)
    assert_params_equal(twin_ps, ps)
    assert twin.state_residency() == opt.state_residency() and twin.paging_stats() == opt.paging_stats()


def test_quantization_tables_of_replaced_maps_are_dropped():
    """Each loaded non-default 8-bit map gets its table (256 KiB-class lookup), kept while a state uses the map:
    loading 20 times kept 22 tables; now only those of the maps in use remain."""
    ps = make_params([(64, 80)])
    opt = OPTIMIZERS["adamw8"](ps)
    train(ps, opt, 1)
    for _ in range(20):
        sd = _roundtrip(opt.state_dict())
        for key in ("qmap1", "qmap2"):  # another map: the first value nudged (still sorted, in [-1, 1])
            sd["state"][0][key] = sd["state"][0][key].clone()
            sd["state"][0][key][0] = -0.999
        opt.load_state_dict(sd)
        train(ps, opt, 1)
    assert len(opt._luts) <= 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_shallow_copy_leaves_the_original_state_alone(name):
    """copy.copy hands the original's own state dict to the copy's __setstate__: the copy's state goes into a dict of
    its own, and the original keeps its tensors, backed by its own pager's blocks."""
    ps = make_params([(64, 80), (200,)])
    opt = OPTIMIZERS[name](ps)
    train(ps, opt, 2)
    before = {p: dict(opt.state[p]) for p in ps}
    twin = copy.copy(opt)
    assert twin.state is not opt.state
    for p in ps:
        assert all(opt.state[p][key] is value for key, value in before[p].items())
        if opt.pager is not None and opt.pager.is_paged(p):
            buffer = opt.pager.blocks[p].buffer
            moment = opt.state[p]["exp_avg" if name == "paged" else "state1"]
            assert moment.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    train(ps, opt, 1, start=2)
    assert all(opt.state[p]["step"] == 3 for p in ps) and all(twin.state[p]["step"] == 2 for p in ps)


def test_state_dropped_or_reset_gives_its_paged_block_back():
    """The pager held every parameter's block until load_state_dict: state dropped by the user (a group popped,
    del opt.state[p]) stayed allocated and counted as resident, and a reset state's new block was taken for resident
    and never prefetched. Dropped blocks now go back at the next step, and a reset state is paged in."""
    import gc

    from fused_lora import _ext

    ps = [torch.nn.Parameter(torch.randn(64, 1024)) for _ in range(3)]
    opt = fo.PagedAdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-3, gpu_budget_bytes=600_000)

    def step(params):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()

    step(ps)
    gc.collect()  # earlier tests' optimizers: their blocks go now, not between the two readings
    live = _ext.load().stats()["live_bytes"]
    opt.param_groups.pop()
    del opt.state[ps[2]]
    step(ps[:2])
    gc.collect()
    assert _ext.load().stats()["live_bytes"] == live - 64 * 1024 * 4 * 2  # exp_avg and exp_avg_sq of ps[2]
    assert opt.paging_stats()["paged_bytes"] == 2 * 64 * 1024 * 4 * 2
    opt.state[ps[0]].clear()
    step(ps[:2])
    assert opt.pager.residency(ps[0]) == "device"


def test_load_state_dict_runs_torchs_load_hooks():
    """torch.optim.Optimizer's load_state_dict pre-hooks (which may replace the dict) and post-hooks ran for
    torch's optimizers and not for these."""
    params = make_params([(64, 48)])
    for name, make in OPTIMIZERS.items():
        opt = make(params)
        train(params, opt, steps=1)
        saved, calls = opt.state_dict(), []
        replaced = copy.deepcopy(saved)
        replaced["param_groups"][0]["lr"] = 0.5
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre") or replaced)
        opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
        opt.load_state_dict(saved)
        assert calls == ["pre", "post"] and opt.param_groups[0]["lr"] == 0.5, name


def test_pickled_or_copied_paged_state_is_a_host_copy():
    """copy.deepcopy of a paged optimizer copied the managed state tensors as they were: on CUDA, a clone of every
    block in device memory at once. The state handed to copy and pickle is now a host copy of the paged tensors."""
    params = make_params([(64, 48)])
    opt = OPTIMIZERS["paged"](params)
    train(params, opt, steps=1)
    p = params[0]
    handed = opt.__getstate__()["state"][p]
    own = opt.state[p]["exp_avg"]
    assert handed["exp_avg"].device.type == "cpu" and handed["exp_avg"].data_ptr() != own.data_ptr()
    assert torch.equal(handed["exp_avg"], opt.state[p]["exp_avg"])
    twin = copy.deepcopy(opt)
    assert torch.equal(twin.state[twin.param_groups[0]["params"][0]]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_inside_a_cuda_graph_capture_is_refused(name, monkeypatch):
    """The step count, learning rate and bias corrections are host values copied to the kernels at each step: a
    captured step would replay the first step's values forever. Refused, with nothing changed."""
    from fused_lora import _common

    params = make_params([(4, 8)])
    opt = OPTIMIZERS[name](params)
    train(params, opt, 1)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        opt.step()
    assert_params_equal(params, before)
