"""Optimizer state dicts on the CPU: resume mid-training bit for bit (paged / plain / torch.optim.AdamW), loading
bitsandbytes' AdamW8bit state, fresh quantization tables per loaded map, and state dicts of another kind rejected
with nothing changed."""

import io

import pytest
import torch
from _optim_helpers import assert_params_equal, make_params, needs_ext, train

from fused_lora import _ext
from fused_lora import optim as fo


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


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
