"""Optimizer state dicts on the CPU: resume mid-training bit for bit (paged / plain / torch.optim.AdamW) through
torch.save / torch.load(weights_only=True), loading bitsandbytes' AdamW8bit state, fresh quantization tables per
loaded map, and state dicts of another kind or malformed ones rejected whole, with nothing changed."""

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
    """Save and load as a checkpoint is: with weights_only=True (torch.load's safe default), which every state dict
    of these optimizers, torch.optim.AdamW's and bitsandbytes' must pass."""
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


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
        ("AdamW8bit", lambda: _adamw8bit_state_dict([(37, 128)]), r"state1 of parameter 0 has shape \(37, 128\), "
         r"the parameter has shape \(37, 129\)"),
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
# All or nothing: a malformed checkpoint is rejected before anything is replaced
# ---------------------------------------------------------------------------------------------------------------


def _trained_8bit(steps=2, seed=0):
    params = make_params([(37, 129), (64, 80)])
    opt = fo.AdamW8bit(params, lr=1e-2)
    train(params, opt, steps, seed=seed)
    return params, opt


def _state_of(opt, params):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for p in params]


def _assert_state_equal(opt, params, before):
    for i, (p, saved) in enumerate(zip(params, before)):
        assert set(opt.state[p]) == set(saved), i
        for key, value in saved.items():
            now = opt.state[p][key]
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, (i, key)


def _malformed(change):
    """A checkpoint of the same two parameters (another run) with ``change`` applied to parameter 1's state."""
    _, other = _trained_8bit(steps=3, seed=7)
    sd = other.state_dict()
    sd["state"][1] = dict(sd["state"][1])
    change(sd["state"][1])
    return sd


MALFORMED = {
    "absmax1-size": (lambda s: s.update(absmax1=s["absmax1"][:-1]), ValueError,
                     "absmax1 of parameter 1 has 19 values; 5120 elements in blocks of 256 need 20"),
    "absmax2-nan": (lambda s: s.update(absmax2=s["absmax2"].clone().fill_(float("nan"))), ValueError,
                    "absmax2 of parameter 1 holds NaN or inf"),
    "qmap1-size": (lambda s: s.update(qmap1=s["qmap1"][:255]), ValueError,
                   "qmap1 of parameter 1 has 255 values; an 8-bit quantization map has 256"),
    "qmap2-unsorted": (lambda s: s.update(qmap2=s["qmap2"].flip(0)), ValueError, "qmap2 of parameter 1 is not sorted"),
    "qmap1-nan": (lambda s: s.update(qmap1=s["qmap1"].clone().index_fill_(0, torch.tensor([3]), float("nan"))),
                  ValueError,
                  "qmap1 of parameter 1 must hold finite values in \\[-1, 1\\]"),
    "step-negative": (lambda s: s.update(step=-1), ValueError, "step of parameter 1 is -1; it must be a whole number"),
    "step-nan": (lambda s: s.update(step=float("nan")), ValueError, "step of parameter 1 is nan"),
    "step-fraction": (lambda s: s.update(step=2.5), ValueError, "step of parameter 1 is 2.5"),
    "step-string": (lambda s: s.update(step="3"), TypeError, "step of parameter 1 must be a number, got str"),
    "state-kinds-mixed": (lambda s: s.update(state2=s["state2"].float()), ValueError,
                          "state1 and state2 of parameter 1 must both be 8-bit"),
    "moment-int": (lambda s: s.update(state1=s["state1"].to(torch.int32)), ValueError,
                   "state1 of parameter 1 must be uint8 or floating point, got torch.int32"),
    "moment-not-tensor": (lambda s: s.update(state1=[0] * 5120), TypeError,
                          "state1 of parameter 1 must be a tensor, got list"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_rejected_whole_naming_parameter_and_field(case):
    """Before: a wrong-sized absmax for parameter 1 raised an obscure error after parameter 0's state was already
    replaced (and every other state cleared), so a caller that caught it trained on from zero; a malformed map
    failed only in step() with an IndexError; a negative or NaN step reached a ZeroDivisionError."""
    change, error, match = MALFORMED[case]
    params, opt = _trained_8bit()
    before = _state_of(opt, params)
    with pytest.raises(error, match=f"AdamW8bit.load_state_dict: {match}"):
        opt.load_state_dict(_malformed(change))
    _assert_state_equal(opt, params, before)
    straight, straight_opt = _trained_8bit(steps=4)
    train(params, opt, 2, start=2)
    assert_params_equal(params, straight)


@pytest.mark.parametrize(
    "make, error, match",
    [(lambda sd: [sd], TypeError, "expected a state dict \\(a mapping\\), got list"),
     (lambda sd: {"param_groups": sd["param_groups"]}, ValueError, "the state dict has no 'state'"),
     (lambda sd: {**sd, "param_groups": [{"lr": 1.0}]}, ValueError, "param_groups\\[0\\] is not a parameter group"),
     (lambda sd: {**sd, "state": {0: "state"}}, TypeError, "the state of parameter 0 must be a mapping")],
    ids=["not-a-mapping", "no-state", "group-without-params", "state-not-a-mapping"],
)
def test_malformed_layout_is_rejected_whole(make, error, match):
    params, opt = _trained_8bit()
    before = _state_of(opt, params)
    with pytest.raises(error, match=match):
        opt.load_state_dict(make(opt.state_dict()))
    _assert_state_equal(opt, params, before)


@needs_ext
@pytest.mark.parametrize("key, value, match", [("exp_avg", float("nan"), "exp_avg of parameter 0 holds NaN or inf"),
                                               ("exp_avg_sq", -1e-3, "exp_avg_sq of parameter 0 holds negative")],
                         ids=["exp_avg-nan", "exp_avg_sq-negative"])
def test_paged_adamw_rejects_32_bit_moments_the_next_step_would_turn_into_nan(key, value, match):
    """A NaN first moment, or a negative second moment (its square root), would make every weight NaN at the next
    step: refused, naming the field, and the optimizer keeps its state."""
    params = make_params([(37, 129)])
    ref = torch.optim.AdamW(make_params([(37, 129)]), foreach=False)
    train(ref.param_groups[0]["params"], ref, 1)
    sd = _roundtrip(ref.state_dict())
    sd["state"][0][key] = sd["state"][0][key].clone().index_fill_(1, torch.tensor([5]), value)
    opt = fo.PagedAdamW(params, page_min_bytes=0)
    train(params, opt, 1)
    before = _state_of(opt, params)
    with pytest.raises(ValueError, match=f"PagedAdamW.load_state_dict: {match}"):
        opt.load_state_dict(sd)
    _assert_state_equal(opt, params, before)


@needs_ext
def test_paged_adamw_rejects_a_negative_step_from_a_torch_checkpoint():
    """torch.optim.AdamW saves step as a float tensor; a negative one must not reach 1 - beta**0 = 0."""
    params = make_params([(37, 129)])
    ref = torch.optim.AdamW(make_params([(37, 129)]), foreach=False)
    train(ref.param_groups[0]["params"], ref, 1)
    sd = _roundtrip(ref.state_dict())
    sd["state"][0]["step"] = torch.tensor(-1.0)
    opt = fo.PagedAdamW(params, page_min_bytes=0)
    train(params, opt, 1)
    with pytest.raises(ValueError, match="PagedAdamW.load_state_dict: step of parameter 0 is -1.0"):
        opt.load_state_dict(sd)
    assert opt.state[params[0]]["step"] == 1
