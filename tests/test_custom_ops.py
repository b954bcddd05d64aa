"""lora_linear, frozen_linear and dora_linear as torch.library custom ops (fused_lora::lora_linear,
::lora_linear_backward, ::frozen_linear, ::frozen_linear_backward, ::dora_linear, ::dora_linear_backward), and
torch.compile over them.

* torch.library.opcheck of every op (schema, autograd registration, fake tensors, AOT dispatch with dynamic shapes)
  on every backend the machine runs: the reference, "cpu" (when the extension has its kernels) and the Triton kernels
  (under TRITON_INTERPRET=1 on the CPU), with an NF4 weight (dropout, bias) and a dense one;
* torch.compile(fullgraph=True) of a patched 4-bit PEFT Llama with LoRA dropout: no graph break (before the ops:
  45 with lora_dropout=0.05, from Tensor.item() on the dropout seed, the opaque NF4 object made inside the autograd
  Function and torch.Generator.manual_seed), and the compiled loss and LoRA gradients equal eager's bit for bit
  (aot_eager: the dropout seeds come from the same torch.randint calls in the same order);
* FusedLoraLinear (LoRA and DoRA) compiled with fullgraph=True matches eager, and second derivatives still raise.
"""

import pytest
import torch
from _peft_helpers import batch, fused_layers, load_qlora_base, lora_grads, make_peft, save_tiny_llama

import fused_lora as fl
from fused_lora import functional
from fused_lora.backend import cpu_kernels_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPS = ("lora_linear", "lora_linear_backward", "frozen_linear", "frozen_linear_backward", "dora_linear",
       "dora_linear_backward")


def _backends():
    out = ["reference", "triton"]
    if cpu_kernels_error() is None:
        out.append("cpu")
    return out


def op_cases(backend: str, kind: str) -> dict:
    """Arguments of each op for one small case: M=7 (3-D input flattened), K=64, N=48, r=4, fp32; with NF4 a
    transposed x (the fake backward returned dx with x's strides, the op a contiguous dx: Inductor failed)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 7).t() if kind == "nf4" else torch.randn(7, 64)).requires_grad_(True)
    dense = torch.randn(48, 64) / 8
    weight = fl.quantize_nf4(dense, blocksize=64, double_quant=True) if kind == "nf4" else dense
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    bias = torch.randn(48, requires_grad=True) if kind == "nf4" else None
    seed, p = (torch.tensor([1234]), 0.25) if kind == "nf4" else (None, 0.0)
    w = functional._weight_args(weight)
    y, u = torch.ops.fused_lora.lora_linear(x, *w, A, B, bias, seed, 2.0, p, backend)
    g = torch.randn_like(y)
    mag = (torch.rand(48) + 0.5).requires_grad_(True)
    _, norm, u_dora, z = torch.ops.fused_lora.dora_linear(x, *w, A, B, mag, bias, seed, 2.0, p, backend, True)
    return {
        "lora_linear": (x, *w, A, B, bias, seed, 2.0, p, backend),
        "lora_linear_backward": (g, x.detach(), *w, A.detach(), B.detach(), u.detach(), seed, 2.0, p, backend,
                                 True, True, True, bias is not None),
        "frozen_linear": (x, *w, bias, backend),
        "frozen_linear_backward": (g, *w, backend, True, bias is not None),
        "dora_linear": (x, *w, A, B, mag, bias, seed, 2.0, p, backend, True),
        "dora_linear_backward": (g, x.detach(), *w, A.detach(), B.detach(), mag.detach(), norm.detach(),
                                 u_dora.detach(), z.detach(), seed, 2.0, p, backend, True, True, True, True,
                                 bias is not None),
    }


# opcheck's AOT test compiles each op (seconds per op on a busy 2-core machine): it runs once per op and weight kind,
# on the reference; the other backends get the schema, autograd-registration and fake-tensor tests (the fake
# implementation is shared, so what differs per backend is whether the real outputs match it).
FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("kind", ["nf4", "dense"])
@pytest.mark.parametrize("backend", _backends())
def test_opcheck_every_op(backend, kind, interpret_triton):
    cases = op_cases(backend, kind)
    assert set(cases) == set(OPS)
    utils = torch.library._OPCHECK_DEFAULT_UTILS if backend == "reference" else FAST_UTILS
    for name in OPS:
        result = torch.library.opcheck(getattr(torch.ops.fused_lora, name).default, cases[name], test_utils=utils)
        assert set(result) == set(utils) and set(result.values()) == {"SUCCESS"}, (name, result)


def test_ops_give_lora_linears_results(interpret_triton):
    """The op is what lora_linear runs: its y and the autograd gradients equal the reference formulas."""
    from fused_lora import reference

    x, *rest = op_cases("reference", "nf4")["lora_linear"]
    w, (A, B, bias, seed, s, p, _) = rest[:11], rest[11:]
    y, u = torch.ops.fused_lora.lora_linear(x, *w, A, B, bias, seed, s, p, "reference")
    m = reference.dropout_mask(x.shape, p, int(seed), "cpu")
    W = functional._weight_of(*w).dequantize(torch.float32)
    expected = reference.lora_linear_naive(x, W, A, B, s, bias, m)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(y.sum(), (x, A, B, bias))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (x, A, B, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_compile"), num_hidden_layers=1)


def test_compiled_qlora_peft_llama_with_dropout_has_no_graph_break_and_eager_numbers(one_layer_llama):
    model = make_peft(load_qlora_base(one_layer_llama), lora_dropout=0.05)
    assert fl.patch_peft_model(model) == 7
    inputs = batch(seed=4)

    graphs = []

    def counting_aot_eager(graph_module, example_inputs):  # fullgraph=True already fails on any graph break
        graphs.append(graph_module)
        return torch._dynamo.backends.debugging.aot_eager(graph_module, example_inputs)

    def step(m, seed):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = m(**inputs).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_aot_eager, fullgraph=True)
    for seed in (0, 1):
        compiled_loss, compiled_grads = step(compiled, seed)
        eager_loss, eager_grads = step(model, seed)
        assert compiled_loss == eager_loss
        assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 14
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=0)
    assert len(graphs) == 1, "one graph, compiled once for both seeds"
    assert step(model, 0)[0] != step(model, 1)[0], "dropout is active: another seed, another loss"
    assert len(fused_layers(model)) == 7


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("quant", ["nf4", None])
def test_compiled_fused_lora_linear_matches_eager(quant, dora):
    """Compiled whole (fullgraph=True; DoRA too: before its custom ops, the autograd function's opaque NF4 object and
    the seed's .item() broke the graph) and equal to eager bit for bit, the magnitude's gradient included."""
    torch.manual_seed(0)
    layer = fl.FusedLoraLinear(64, 48, r=4, lora_alpha=8, lora_dropout=0.1, quant=quant, bias=True,
                               compute_dtype=torch.float32, use_dora=dora)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 64)
    trained = [layer.lora_A, layer.lora_B] + ([layer.lora_magnitude_vector] if dora else [])
    results = []
    torch._dynamo.reset()
    for module in (torch.compile(layer, backend="aot_eager", fullgraph=True), layer):
        torch.manual_seed(7)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        grads = torch.autograd.grad(y.square().sum(), [xi] + trained)
        results.append((y.detach(), *grads))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with layer.disable_adapter():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x),
                                   rtol=0, atol=0)


def test_second_derivatives_still_raise():
    W = fl.quantize_nf4(torch.randn(48, 64))
    x = torch.randn(3, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    y = functional.lora_linear(x, W, A, B, 2.0, backend="reference")
    with pytest.raises(RuntimeError, match="lora_linear: second derivatives are not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    y = functional.frozen_linear(x, W, backend="reference")
    with pytest.raises(RuntimeError, match="frozen_linear: second derivatives are not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("shifted", [False, True], ids=["aligned", "odd-address"])
def test_an_nf4_layer_compiles_whole_on_the_triton_backend(shifted, interpret_triton, monkeypatch):
    """torch.compile(fullgraph=True) of lora_linear over an NF4 weight on the Triton backend (the backend check read
    the packed bytes' address, which a traced tensor does not have: the graph broke there); the same numbers, also
    with packed bytes one byte past a 4-byte boundary (eager sends them to the reference; the compiled op copies
    them to an aligned tensor)."""
    torch.manual_seed(0)
    weight = fl.quantize_nf4(torch.randn(48, 64) / 8, blocksize=64, double_quant=True)
    if shifted:
        packed = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8)[1:].view(weight.packed.shape)
        packed.copy_(weight.packed)
        weight.packed = packed
        assert weight.packed.data_ptr() % 4
    from fused_lora.kernels import lora

    addresses, real_forward = [], lora.forward
    monkeypatch.setattr(lora, "forward", lambda x2d, w, *a: (addresses.append(w.packed.data_ptr() % 4),
                                                             real_forward(x2d, w, *a))[1])
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    x = torch.randn(2, 3, 64, requires_grad=True)

    def step(x):
        return fl.functional.lora_linear(x, weight, A, B, 2.0, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(x)
    grads = torch.autograd.grad(got.sum(), (x, A, B))
    assert addresses == [0]  # the Triton forward ran, on aligned bytes
    expected = step(x)
    for ours, theirs in zip((got, *grads), (expected, *torch.autograd.grad(expected.sum(), (x, A, B)))):
        if shifted:  # the Triton kernels against the reference
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(ours, theirs)



def test_a_compiled_model_compiles_once_when_the_extension_loads_during_tracing(monkeypatch, tmp_path):
    """backend "auto" on the CPU asks whether fused_lora._C has its kernels while a patched PEFT model is traced;
    when that first loads the extension, the graph must not be guarded on it being unloaded (the next step
    recompiled the whole model)."""
    from torch._dynamo.utils import counters

    from _peft_helpers import batch, load_qlora_base, make_peft, save_tiny_llama
    from fused_lora import _ext

    model = make_peft(load_qlora_base(save_tiny_llama(str(tmp_path), num_hidden_layers=1)))
    fl.patch_peft_model(model)
    monkeypatch.setattr(_ext, "_module", None)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for seed in range(3):
        compiled(**batch(seed=seed)).loss.backward()
    assert _ext._module is not None and counters["stats"]["unique_graphs"] == 1
    # backend.py sets the decorator's mark by hand (no torch._dynamo import with the package): still its name
    assert torch._dynamo.assume_constant_result(lambda: None)._dynamo_marked_constant is True


@pytest.mark.parametrize("op", ["lora_linear", "frozen_linear"])
def test_a_fallback_met_while_compiling_keeps_fullgraph_and_still_warns_once(op, interpret_triton, monkeypatch):
    """A case the Triton kernels do not take (fp64 x) falls back to the reference: warnings.warn cannot be traced,
    so the warning met while torch.compile traces is kept and issued by the next custom op the compiled code runs
    (the second call: the first one's ops ran before the traced code's side effects were applied). It failed
    fullgraph compilation before ("Dynamo does not know how to trace the Python builtin _warnings.warn")."""
    import warnings

    monkeypatch.setattr(fl._common, "_warned", set())
    monkeypatch.setattr(fl._common, "_deferred", {})
    torch._dynamo.reset()
    x, W = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    A, B = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    if op == "lora_linear":
        def f(x):
            return functional.lora_linear(x, W, A, B, 2.0, backend="triton")
    else:
        def f(x):
            return functional.frozen_linear(x, W, backend="triton")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outputs = [compiled(x) for _ in range(3)]
    fallbacks = [w for w in record if "cannot run this call" in str(w.message)]
    assert len(fallbacks) == 1 and "float64" in str(fallbacks[0].message)
    expected = f(x)
    assert all(torch.equal(y, expected) for y in outputs)


def test_a_fallback_warning_turned_into_an_error_raises_every_time(interpret_triton, monkeypatch):
    """With warnings as errors the first fallback raised and the identical second call then ran silently (the key
    was marked before warnings.warn raised)."""
    import warnings

    monkeypatch.setattr(fl._common, "_warned", set())
    x, W = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(RuntimeWarning, match="cannot run this call"):
                functional.frozen_linear(x, W, backend="triton")
