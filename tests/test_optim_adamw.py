"""PagedAdamW / PagedAdamW8bit / AdamW8bit on the CPU: trajectories vs torch.optim.AdamW and bitsandbytes'
AdamW8bit, torch.optim semantics and argument checks, and the Triton update kernels under the interpreter against
the PyTorch path. (Resume and state dicts: test_optim_state_dict.py; paging: test_optim_pager.py; backend
selection: test_optim_backend.py.)

Tolerances. On the CPU the optimizers run the same PyTorch ops in the same order as torch.optim.AdamW
(foreach=False) and as bitsandbytes' CPU AdamW8bit, so trajectories are compared bit for bit (torch.equal). The
Triton kernels round differently only where they contract a·b + c or evaluate lerp in another order (a few fp32
ulps per step), so they are compared with the PyTorch path at relative error ≤ 1e-6 after 3 steps.
"""

import pytest
import torch
from _optim_helpers import SHAPES, assert_params_equal, make_params, needs_ext, refuse_nth_allocation, train

from fused_lora import _ext
from fused_lora import optim as fo


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


def test_8bit_step_with_nan_and_inf_gradients_matches_bitsandbytes(bnb):
    """A NaN or inf gradient propagates into the parameter and the 8-bit state exactly as in bitsandbytes' AdamW8bit
    (its quantizer leaves NaN out of a block's absmax and gives NaN code 0); before, the step raised IndexError."""
    ref = make_params([(64, 80)])
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2)
    ours = make_params([(64, 80)])
    opt = fo.AdamW8bit(ours, lr=1e-2)
    for t in range(3):
        g = torch.randn(64, 80, generator=torch.Generator().manual_seed(t))
        g[t, 5], g[7, t] = float("nan"), float("inf")
        ref[0].grad, ours[0].grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    assert torch.equal(ours[0].isnan(), ref[0].isnan()) and ours[0].isnan().any()
    assert torch.equal(ours[0].nan_to_num(), ref[0].nan_to_num())
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(opt.state[ours[0]][key].nan_to_num(), ref_opt.state[ref[0]][key].nan_to_num()), key


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
        ({"lr": -1e-3}, "lr must be a finite number >= 0"),
        ({"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas must be two numbers in \[0, 1\)"),
        ({"eps": -1e-8}, "eps must be a finite number >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"backend": "cuda"}, "unknown backend 'cuda'; expected one of 'auto', 'triton', "),
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
        ({"lr": -1e-3}, "lr must be a finite number >= 0"),
        ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"amsgrad": True}, "amsgrad=True is not supported"),
        ({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))]}, "parameters must be real floating"),
    ],
    ids=["negative-lr", "beta2-above-one", "negative-eps", "amsgrad", "complex-params"],
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


@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"])
def test_model_parameters_of_a_qlora_model_are_accepted_and_frozen_ones_skipped(bnb, cls):
    """opt(model.parameters()) of a QLoRA model, as the README and bitsandbytes' optimizers allow: the packed uint8
    NF4 weight and a frozen float bias are skipped, and the adapters train exactly as with only them passed."""
    if cls != "AdamW8bit" and not _ext.is_available():
        pytest.skip("fused_lora._C is not built")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32).to("cpu"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in trainable]
    opt = getattr(fo, cls)(model.parameters(), lr=1e-2)
    ref_opt = getattr(fo, cls)(copies, lr=1e-2)
    train(trainable, opt, 3)
    train(copies, ref_opt, 3)
    assert_params_equal(trainable, copies)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
    assert len(opt.state_dict()["state"]) == len(trainable)


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


def test_refused_state_allocation_leaves_every_step_count_as_it_was(monkeypatch):
    """The first step allocates each parameter's state; when one allocation is refused (on a GPU: more managed
    memory than is free), no parameter's step count has moved, so a retry trains exactly like an unbroken run."""
    shapes = [(37, 129), (10, 3), (64,)]
    ref = make_params(shapes)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    ours = make_params(shapes)
    opt = fo.PagedAdamW(ours, lr=1e-2, page_min_bytes=1 << 30)
    real = refuse_nth_allocation(monkeypatch, opt, 2, "managed allocation of 120 bytes refused")
    with pytest.raises(RuntimeError, match="refused"):
        train(ours, opt, 1)
    assert all(opt.state[p].get("step", 0) == 0 for p in ours)
    monkeypatch.setattr(opt, "_new_state", real)
    train(ref, ref_opt, 2)
    train(ours, opt, 2)
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
