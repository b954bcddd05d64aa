"""Several LoRA adapters over one frozen weight (fused_lora/mixed.py, fused_lora/peft_routes.py): per-row adapter
ids with "__base__" rows, several active adapters, output and every gradient against a float64 oracle on both
backends; PEFT's adapter_names and set_adapter([...]) on a patched tiny Llama (4-bit and dense) against PEFT; and
four adapters trained in one batch against separate PEFT runs, one per adapter."""

import re
import warnings

import pytest
import torch

import fused_lora as fl
from fused_lora import functional, mixed, reference
from fused_lora.mixed import Adapter
from fused_lora.testing import assert_close_to_reference, relative_error

TIGHT = 1e-5
VOCAB = 128
N_LINEAR = 2 * 7
RANKS = (3, 8, 5)


def _case(M=22, K=70, N=45, dtype=torch.float32, nf4=False, p=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g) / K**0.5
    weight = fl.quantize_nf4(W) if nf4 else W.to(dtype)
    adapters = [Adapter(torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g), 0.5 + i, p)
                for i, r in enumerate(RANKS)]
    b = torch.randn(N, generator=g).to(dtype)
    return x, weight, adapters, b


def _run_and_check(x, weight, adapters, b, ids, backend, leading=None, call_seed=5):
    dtype = x.dtype
    M, K = x.shape
    leaves = [x.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    leaves += [t.clone().requires_grad_(True) for a in adapters for t in (a.lora_A, a.lora_B)]
    ads = [Adapter(leaves[2 + 2 * i], leaves[3 + 2 * i], a.scaling, a.dropout_p) for i, a in enumerate(adapters)]
    xin = leaves[0] if leading is None else leaves[0].reshape(*leading, K)
    ids_in = ids if ids is None or leading is None else ids.reshape(leading[0], -1)[:, 0]
    torch.manual_seed(call_seed)
    y = mixed.lora_linear_multi(xin, weight, ads, adapter_ids=ids_in, bias=leaves[1], backend=backend)
    y = y.reshape(M, -1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(y, leaves, g, allow_unused=True)
    # the masks the call drew, expanded to (M, K) per adapter
    masks = None
    if any(a.dropout_p for a in adapters):
        rows = (mixed.adapter_rows(ids, len(adapters)) if ids is not None else [torch.arange(M)] * len(adapters))
        torch.manual_seed(call_seed)
        masks = []
        for r, a in zip(rows, adapters):
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            full = torch.zeros(M, K)
            full[r] = reference.dropout_mask((r.numel(), K), a.dropout_p, seed, "cpu")
            masks.append(full)
    W = weight.dequantize(dtype) if isinstance(weight, fl.NF4Weight) else weight

    def oracle(to):
        ls = [to(t).requires_grad_(True) for t in leaves]
        ads_ = [(ls[2 + 2 * i], ls[3 + 2 * i], a.scaling) for i, a in enumerate(adapters)]
        out = mixed.lora_linear_multi_naive(ls[0], to(W), ads_, ids, ls[1], masks)
        return out, torch.autograd.grad(out, ls, to(g))

    y64, ref = oracle(lambda t: t.detach().double())
    y_plain, plain = oracle(lambda t: t.detach().clone())
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    names = ["dx", "db"] + [f"{n}{i}" for i in range(len(adapters)) for n in ("dA", "dB")]
    for name, ours, pl, rf in zip(names, grads, plain, ref):
        if ours is None:  # an adapter without rows gets no gradient; the oracle's is zero
            assert rf.abs().max() == 0, name
            continue
        assert_close_to_reference(name, ours, pl, rf, dtype)


IDS = torch.tensor([0, -1, 2, 0, 1, 2, 2, -1, 0, 1, 0, 2, 1, 1, -1, 0, 2, 0, 1, 2, 0, -1])


# ------------------------------------------------------------------------------------------- functional


def test_adapter_rows_groups_rows_in_order():
    rows = mixed.adapter_rows(torch.tensor([1, -1, 0, 1, 1, -1]), 3)
    assert [r.tolist() for r in rows] == [[2], [0, 3, 4], []]


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("mode", ["mixed", "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_reference_backend_matches_float64(dtype, mode, p, nf4):
    x, weight, adapters, b = _case(dtype=dtype, nf4=nf4, p=p)
    _run_and_check(x, weight, adapters, b, IDS if mode == "mixed" else None, "reference")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("mode", ["mixed", "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_backend_matches_float64(dtype, mode, p, nf4, interpret_triton):
    x, weight, adapters, b = _case(dtype=dtype, nf4=nf4, p=p, K=67, N=41)
    _run_and_check(x, weight, adapters, b, IDS if mode == "mixed" else None, "triton")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_groups_through_the_fused_lora_kernels(dtype, p, nf4, monkeypatch, poison_empty, interpret_triton):
    """Every group at least GROUP_ROWS rows: each adapter's rows run the fused LoRA kernels (their own dropout, drawn
    from the group's seed), the base rows the frozen kernel; output and gradients against float64."""
    from fused_lora.kernels import lora as triton_lora

    monkeypatch.setattr(mixed, "GROUP_ROWS", 4)
    calls = []
    real = mixed._GroupedLoraFunction.forward
    monkeypatch.setattr(mixed._GroupedLoraFunction, "forward", staticmethod(
        lambda *a: calls.append(1) or real(*a)))
    x, weight, adapters, b = _case(dtype=dtype, nf4=nf4, p=p, K=128, N=41)
    M, K = x.shape
    leaves = [x.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    leaves += [t.clone().requires_grad_(True) for a in adapters for t in (a.lora_A, a.lora_B)]
    ads = [Adapter(leaves[2 + 2 * i], leaves[3 + 2 * i], a.scaling, a.dropout_p) for i, a in enumerate(adapters)]
    torch.manual_seed(5)
    y = mixed.lora_linear_multi(leaves[0], weight, ads, adapter_ids=IDS, bias=leaves[1], backend="triton")
    assert calls == [1]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(y, leaves, g)
    masks = None
    if p:
        torch.manual_seed(5)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,)).item()) for _ in adapters]
        masks = []
        for rows, seed in zip(mixed.adapter_rows(IDS, len(adapters)), seeds):
            full = torch.zeros(M, K)
            full[rows] = triton_lora.dropout_mask(seed, rows.numel(), K, p, "cpu")
            masks.append(full)
    W = weight.dequantize(dtype) if nf4 else weight

    def oracle(to):
        ls = [to(t).requires_grad_(True) for t in leaves]
        out = mixed.lora_linear_multi_naive(ls[0], to(W), [(ls[2 + 2 * i], ls[3 + 2 * i], a.scaling)
                                                           for i, a in enumerate(adapters)], IDS, ls[1], masks)
        return out, torch.autograd.grad(out, ls, to(g))

    y64, ref = oracle(lambda t: t.detach().double())
    y_plain, plain = oracle(lambda t: t.detach().clone())
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for name, ours, pl, rf in zip(["dx", "db", "dA0", "dB0", "dA1", "dB1", "dA2", "dB2"], grads, plain, ref):
        assert_close_to_reference(name, ours, pl, rf, dtype)


def test_small_groups_share_one_frozen_pass(monkeypatch, interpret_triton):
    calls = []
    real = mixed._GroupedLoraFunction.forward
    monkeypatch.setattr(mixed._GroupedLoraFunction, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    x, weight, adapters, b = _case(K=64, N=41)
    mixed.lora_linear_multi(x, weight, adapters, adapter_ids=IDS, bias=b, backend="triton")
    assert calls == []  # groups of 5-8 rows, below GROUP_ROWS


def test_one_id_per_sample_of_a_3d_input():
    x, weight, adapters, b = _case(M=4 * 6)
    ids = torch.tensor([2, -1, 0, 2]).repeat_interleave(6)
    _run_and_check(x, weight, adapters, b, ids, "reference", leading=(4, 6))


def test_base_rows_are_the_frozen_layer_and_get_no_adapter_gradient():
    x, weight, adapters, b = _case()
    A0 = adapters[0].lora_A.clone().requires_grad_(True)
    ads = [Adapter(A0, *adapters[0][1:])] + adapters[1:]
    ids = torch.full((x.shape[0],), -1)
    ids[3] = 1
    y = mixed.lora_linear_multi(x, weight, ads, adapter_ids=ids, bias=b, backend="reference")
    frozen = functional.frozen_linear(x, weight, b, backend="reference")
    rows = torch.arange(x.shape[0]) != 3
    torch.testing.assert_close(y[rows], frozen[rows], rtol=0, atol=0)
    assert not torch.allclose(y[3], frozen[3])
    (grad,) = torch.autograd.grad(y.sum(), A0, allow_unused=True)
    assert grad is None  # adapter 0 has no rows


def test_several_adapters_without_dropout_take_one_fused_call(monkeypatch):
    x, weight, adapters, b = _case()
    calls = []
    real = functional.lora_linear
    monkeypatch.setattr(functional, "lora_linear", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    mixed.lora_linear_multi(x, weight, adapters, bias=b, backend="reference")
    assert calls == [sum(RANKS)]


def test_argument_errors_name_lora_linear_multi():
    x, weight, adapters, b = _case()
    with pytest.raises(ValueError, match=r"lora_linear_multi: adapter_ids must be in \[-1, 2\]"):
        mixed.lora_linear_multi(x, weight, adapters, adapter_ids=torch.full((22,), 3))
    with pytest.raises(ValueError, match="lora_linear_multi: adapter_ids has shape"):
        mixed.lora_linear_multi(x, weight, adapters, adapter_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="lora_linear_multi: adapter_ids must hold integers"):
        mixed.lora_linear_multi(x, weight, adapters, adapter_ids=torch.zeros(22))
    with pytest.raises(TypeError, match="lora_linear_multi: adapter_ids must hold integers"):
        mixed.lora_linear_multi(x, weight, adapters, adapter_ids=[0.0] * 22)
    for empty in ([], torch.tensor([])):  # an empty batch's ids: no value to be an integer or not (torch: float32)
        assert mixed.lora_linear_multi(x[:0], weight, adapters, adapter_ids=empty).shape == (0, weight.shape[0])
    with pytest.raises(ValueError, match=r"lora_linear_multi: adapters\[1\].lora_B has shape"):
        mixed.lora_linear_multi(x, weight, [adapters[0], Adapter(adapters[1].lora_A, adapters[0].lora_B, 1.0)])
    with pytest.raises(TypeError, match="lora_linear_multi: adapters must be a non-empty sequence"):
        mixed.lora_linear_multi(x, weight, [])


# ------------------------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama_mixed")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def four_adapter_model(path, quantized):
    """A PEFT model over the tiny Llama with adapters a0..a3 of ranks 8, 4, 6, 2 (B != 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantized:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
        fl.bnb_compat.keep_bnb_cpu_layout(base)  # an exact bitsandbytes reference on CPUs with AVX512-BF16 too
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def config_of(r):
        return LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules="all-linear", init_lora_weights=False)

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base.train(), config_of(8), adapter_name="a0")
        for i, r in enumerate((4, 6, 2), start=1):
            model.add_adapter(f"a{i}", config_of(r))
    return model.train()


def tokens(seed, batch_size, length=19):
    return torch.randint(3, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def spy(monkeypatch, name):
    calls = []
    real = getattr(fl.peft_routes, name)
    monkeypatch.setattr(fl.peft_routes, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fl._common, "_warned", set())


pytestmark_peft = pytest.mark.usefixtures("one_torch_thread", "fresh_warnings")


@pytestmark_peft
@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_adapter_names_match_peft_without_fallback(tiny_llama_dir, quantized, monkeypatch):
    names = ["a2", "__base__", "a0", "a3", "a2", "a1"]
    ids = tokens(3, len(names))
    peft_model = four_adapter_model(tiny_llama_dir, quantized).eval()
    fused_model = four_adapter_model(tiny_llama_dir, quantized).eval()
    fl.patch_peft_model(fused_model)
    calls = spy(monkeypatch, "lora_linear_multi")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = fused_model(input_ids=ids, adapter_names=names).logits  # grad enabled: no bitsandbytes CPU repack
    assert not [w for w in record if "PEFT's own forward" in str(w.message)]
    assert len(calls) == N_LINEAR
    expected = peft_model(input_ids=ids, adapter_names=names).logits
    assert relative_error(fused, expected) <= TIGHT
    # the "__base__" sample is the base model's output
    with peft_model.disable_adapter():
        base = peft_model(input_ids=ids[1:2]).logits
    assert relative_error(fused[1:2], base) <= TIGHT


@pytestmark_peft
def test_adapter_names_with_dora_is_refused_as_peft_refuses_it(tiny_llama_dir):
    from peft import LoraConfig

    model = four_adapter_model(tiny_llama_dir, False).eval()
    model.add_adapter("dora", LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    fl.patch_peft_model(model)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(input_ids=tokens(4, 2), adapter_names=["dora", "a0"])


@pytestmark_peft
@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_several_active_adapters_match_peft_training_step(tiny_llama_dir, quantized, monkeypatch):
    peft_model = four_adapter_model(tiny_llama_dir, quantized)
    fused_model = four_adapter_model(tiny_llama_dir, quantized)
    fl.patch_peft_model(fused_model)
    for model in (peft_model, fused_model):
        model.base_model.set_adapter(["a0", "a2", "a3"])
    calls = spy(monkeypatch, "lora_linear_multi")
    ids = tokens(5, 3)
    results = []
    for model in (fused_model, peft_model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.logits.detach(), grads))
    assert len(calls) == N_LINEAR
    (loss_f, logits_f, grads_f), (loss_p, logits_p, grads_p) = results
    assert abs(loss_f.item() - loss_p.item()) <= TIGHT * abs(loss_p.item())
    assert relative_error(logits_f, logits_p) <= TIGHT
    assert grads_f.keys() == grads_p.keys() and len(grads_p) == 3 * 2 * N_LINEAR
    worst = max(relative_error(grads_f[n], g) for n, g in grads_p.items())
    assert worst <= TIGHT, worst


@pytestmark_peft
@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "dense"])
def test_four_adapters_trained_in_one_batch_match_separate_peft_runs(tiny_llama_dir, quantized):
    """One training step of a batch whose samples belong to a0..a3 (and one to none): each adapter's gradient equals
    PEFT's gradient from a run on its own samples alone. The loss is the sum of token losses, so the per-adapter
    runs add up to the batch."""
    names = ["a1", "a0", "a3", "__base__", "a2", "a0", "a3", "a1"]
    ids = tokens(6, len(names))

    def summed_loss(logits, ids_):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids_[:, 1:].reshape(-1),
                                                 reduction="sum")

    fused_model = four_adapter_model(tiny_llama_dir, quantized)
    fl.patch_peft_model(fused_model)
    with fl.peft_routes.mixed_adapter_batch(fused_model, names):
        logits = fused_model(input_ids=ids).logits
    summed_loss(logits, ids).backward()
    fused_grads = {n: p.grad for n, p in fused_model.named_parameters() if p.grad is not None}
    assert len(fused_grads) == 4 * 2 * N_LINEAR

    peft_model = four_adapter_model(tiny_llama_dir, quantized)
    worst = 0.0
    for adapter in ("a0", "a1", "a2", "a3"):
        peft_model.set_adapter(adapter)
        peft_model.zero_grad(set_to_none=True)
        rows = [i for i, name in enumerate(names) if name == adapter]
        summed_loss(peft_model(input_ids=ids[rows]).logits, ids[rows]).backward()
        peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
        assert len(peft_grads) == 2 * N_LINEAR and all(f".{adapter}." in n for n in peft_grads)
        for name, grad in peft_grads.items():
            worst = max(worst, relative_error(fused_grads[name], grad))
    assert worst <= TIGHT, worst
    assert all(re.search(r"\.a[0-3]\.", n) for n in fused_grads)


@pytestmark_peft
def test_mixed_adapter_batch_refuses_what_peft_refuses(tiny_llama_dir):
    """An unknown name (PEFT's adapter_names forward refuses it; the row would silently get the base), a string
    (it would be split into one name per character) and a model without fused layers are errors, before any hook."""
    model = four_adapter_model(tiny_llama_dir, False)
    with pytest.raises(ValueError, match="mixed_adapter_batch: the model has no fused PEFT LoRA layer"):
        with fl.peft_routes.mixed_adapter_batch(model, ["a0"]):
            pass
    fl.patch_peft_model(model)
    with pytest.raises(ValueError, match=r"no adapter named \['a9', 'b'\] in the model"):
        with fl.peft_routes.mixed_adapter_batch(model, ["a0", "a9", "__base__", "b"]):
            pass
    with pytest.raises(TypeError, match="adapter_names must be a list of names, one per sample"):
        with fl.peft_routes.mixed_adapter_batch(model, "a0"):
            pass
    assert all(not module._forward_pre_hooks for module in model.modules()), "no hook left behind"


@pytestmark_peft
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_mixed_adapter_batch_with_gradient_checkpointing(tiny_llama_dir, reentrant):
    """Gradient checkpointing runs the layers' forward again in backward: with backward() inside the block the
    gradients are those without checkpointing; with backward() after it the block refuses on exit (outside it the
    second forward would run without the names: wrong gradients, silently, with a reentrant checkpoint)."""
    names = ["a1", "a0", "__base__", "a1"]
    ids = tokens(8, len(names))

    def grads(checkpointing: bool):
        model = four_adapter_model(tiny_llama_dir, False)
        fl.patch_peft_model(model)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.base_model.model.enable_input_require_grads()
        with fl.peft_routes.mixed_adapter_batch(model, names):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * N_LINEAR
    assert max(relative_error(checkpointed[n], g) for n, g in plain.items()) <= TIGHT

    model = four_adapter_model(tiny_llama_dir, False)
    fl.patch_peft_model(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.base_model.model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match="call backward\\(\\) inside the block"):
        with fl.peft_routes.mixed_adapter_batch(model, names):
            model(input_ids=ids, labels=ids, use_cache=False)
    with torch.no_grad(), fl.peft_routes.mixed_adapter_batch(model, names):
        model(input_ids=ids, use_cache=False)  # no backward to come: no error


@pytestmark_peft
def test_mixed_adapter_batch_routes_layers_that_are_not_fused(tiny_llama_dir):
    """Every PEFT LoRA layer (here a LoRA Embedding, which stays PEFT's) and every modules_to_save wrapper gets the
    names, as PEFT's own adapter_names forward gives them: the same logits per sample."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def config():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"],
                          modules_to_save=["lm_head"], init_lora_weights=False)

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), config(),
                               adapter_name="a")
        model.add_adapter("b", config())
        with torch.no_grad():  # make b's saved head differ from a's
            model.base_model.model.lm_head.modules_to_save["b"].weight.mul_(1.5)
        fl.patch_peft_model(model)
    model.eval()
    names = ["a", "b", "__base__"]
    ids = tokens(9, len(names))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        with fl.peft_routes.mixed_adapter_batch(model, names):
            got = model(input_ids=ids).logits
    for i in range(len(names)):
        assert relative_error(got[i], expected[i]) <= TIGHT, names[i]


@pytestmark_peft
def test_a_mixed_batch_trains_the_modules_to_save_copies_it_routes_through(tiny_llama_dir):
    """Adapter b's samples run through b's own lm_head copy (modules_to_save): the block makes that copy trainable
    as it does b's LoRA weights, and its gradient is the one PEFT gives with b active alone (it stayed frozen and
    never trained before)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def model_with_two_adapters():
        def config():
            return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                              init_lora_weights=False)

        torch.manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                   config(), adapter_name="a")
            model.add_adapter("b", config())
        return model.train()

    ids = tokens(4, 2)
    reference = model_with_two_adapters()
    reference.set_adapter("b")
    reference(input_ids=ids, labels=ids).loss.backward()
    fused = model_with_two_adapters()
    fl.patch_peft_model(fused)
    with fl.peft_routes.mixed_adapter_batch(fused, ["b", "b"]):
        fused(input_ids=ids, labels=ids).loss.backward()
    head_b = [m.base_model.model.lm_head.modules_to_save["b"].weight for m in (reference, fused)]
    assert head_b[1].requires_grad and head_b[1].grad is not None
    assert relative_error(head_b[1].grad, head_b[0].grad) <= TIGHT
    assert fused.base_model.model.lm_head.original_module.weight.grad is None


@pytestmark_peft
def test_frozen_adapters_under_ddp_are_refused_and_warned_about(tiny_llama_dir, tmp_path):
    """DistributedDataParallel registers the parameters that need gradients when it is built: adapters the block
    would make trainable afterwards never had their gradients all-reduced (a single-rank gloo group: 0 of 28
    parameters). Refused for a DDP module; a warning when the model inside is passed under a process group; nothing
    when they are trainable already, or under no_grad (inference: nothing to synchronise)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = four_adapter_model(tiny_llama_dir, False)
    fl.patch_peft_model(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        with torch.no_grad(), fl.peft_routes.mixed_adapter_batch(ddp, ["a2", "a0"]):  # inference: no gradient
            pass
        with torch.no_grad(), fl.peft_routes.mixed_adapter_batch(ddp, ["a1", "a0"]):  # nor made trainable: it made
            pass  # a1 trainable for good, and the training block below then got past the refusal
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".a1." in n)
        with pytest.raises(RuntimeError, match=r"28 parameters of the named adapters are frozen.*\['a1'\]"):
            with fl.peft_routes.mixed_adapter_batch(ddp, ["a1", "a0"]):
                pass
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".a1." in n)  # left as they were
        with pytest.warns(RuntimeWarning, match="under DistributedDataParallel their gradients would not"):
            with fl.peft_routes.mixed_adapter_batch(model, ["a1", "a0"]):
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with fl.peft_routes.mixed_adapter_batch(ddp, ["a1", "a0"]):  # a1 is trainable now: nothing to say
                pass
    finally:
        dist.destroy_process_group()


def test_a_mixed_batch_inside_a_cuda_graph_capture_raises(monkeypatch):
    """The rows are grouped by adapter on the host (ids checked and counted there): inside a CUDA graph capture that
    is refused with a message naming the cause, not a CUDA error from a host copy. Without ids the call runs."""
    from fused_lora import _common

    torch.manual_seed(0)
    W = fl.quantize_nf4(torch.randn(24, 64), blocksize=64)
    adapters = [Adapter(torch.randn(4, 64), torch.randn(24, 4), 2.0),
                Adapter(torch.randn(2, 64), torch.randn(24, 2), 1.0)]
    x = torch.randn(3, 64)
    monkeypatch.setattr(_common, "cuda_graph_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        mixed.lora_linear_multi(x, W, adapters, adapter_ids=[0, -1, 1], backend="reference")
    mixed.lora_linear_multi(x, W, adapters, backend="reference")
