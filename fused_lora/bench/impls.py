"""The QLoRA layer the benchmarks measure: shapes, the implementations compared, their FLOP count, and the inputs
one timed pass runs on (docs/DESIGN.md, "Benchmarks and results").

``qlora_linear`` is one LoRA layer y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ over a frozen NF4 weight W ∈ R^{N×K}, x ∈ R^{M×K},
A ∈ R^{r×K}, B ∈ R^{N×r}, bf16 activations and adapters, s = 2. Passes: ``fwd`` (the training forward: inputs
require grad, so whatever an implementation saves for backward is part of the cost) and ``fwd_bwd`` (forward, then
backward with a fixed upstream gradient g; dx, dA and dB are computed, W is frozen). Implementations:

- ``fused``: ``fused_lora.functional.lora_linear(..., backend="triton")`` over an ``fl.NF4Weight``.
- ``dense_cublas``: the roofline. The dense bf16 GEMMs of the same shape and nothing else: forward x·Wᵀ,
  backward g·W (``F.linear`` on a bf16 W, autograd computing dx only). No NF4, no LoRA: a QLoRA layer cannot
  beat it, and fused/dense_cublas says how close to it the fused kernels come.
- ``dequant_cublas``: the Unsloth-style path. bitsandbytes ``dequantize_4bit`` into a bf16 N×K buffer, cuBLAS
  for x·Wᵀ and g·W, the low-rank terms with ``addmm``; a handwritten autograd function that saves u = x·Aᵀ and
  dequantizes again in backward.
- ``peft_bnb``: PEFT's LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) over ``bnb.nn.Linear4bit``, built by
  ``get_peft_model``, adapters cast to bf16.
- ``compiled_reference``: ``torch.compile`` of ``fused_lora.reference.lora_linear_naive`` over the weight
  dequantized once to bf16 before timing (so it measures LoRA over a dense bf16 weight under Inductor).
- ``reference`` (CPU runs only): ``lora_linear_naive`` eagerly over the dequantized weight.

FLOP count (the LoRA layer's math, used for every implementation so that TFLOP/s compares like with like;
``dense_cublas`` does less work, so its "effective" TFLOP/s is the ceiling for the layer):

    fwd     = 2·M·N·K + 2·M·r·(K + N)                     (x·Wᵀ;  u = x·Aᵀ;  u·Bᵀ)
    fwd_bwd = fwd + 2·M·N·K + 4·M·r·(K + N)               (+ dx = g·W;  v = g·B;  v·A;  dA = vᵀ·x;  dB = gᵀ·u)

bitsandbytes and PEFT are imported inside the functions that build their layers, so ``--report`` (which reads the
constants here) needs neither.
"""

from __future__ import annotations

import itertools
import math

import torch

from .. import reference
from ..functional import lora_linear
from ..nf4 import quantize_nf4

__all__ = ["lora_layer_flops", "ImplBuilder", "layer_dtype", "make_base_weight", "make_adapters", "make_input_sets",
           "pass_callable", "make_linear4bit"]

LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))
LLAMA3_70B_SHAPES = ((8192, 28672),)
SHAPE_NAMES = {
    (4096, 4096): "8B q/o_proj",
    (4096, 14336): "8B gate/up_proj",
    (14336, 4096): "8B down_proj",
    (4096, 1024): "8B k/v_proj",
    (8192, 28672): "70B gate/up_proj",
}
FULL_M = (1, 16, 512, 2048, 8192, 16384)
FULL_R = (8, 16, 64)
QUICK_M = (16, 2048, 8192)
QUICK_R = (16,)
CPU_SHAPES = ((256, 256), (256, 704))
CPU_M = (16, 128)
CPU_R = (8,)
GPU_IMPLS = ("fused", "dense_cublas", "dequant_cublas", "peft_bnb", "compiled_reference")
CPU_IMPLS = ("reference", "compiled_reference")
ALL_IMPLS = GPU_IMPLS + ("reference",)
PASSES = ("fwd", "fwd_bwd")
LORA_SCALING = 2.0


def lora_layer_flops(M: int, K: int, N: int, r: int, pass_name: str) -> int:
    """FLOPs of one LoRA layer pass (formula in the module docstring).

    Example: ``lora_layer_flops(8192, 4096, 14336, 16, "fwd")`` = 2·8192·14336·4096 + 2·8192·16·(4096+14336).
    """
    forward = 2 * M * N * K + 2 * M * r * (K + N)
    if pass_name == "fwd":
        return forward
    if pass_name == "fwd_bwd":
        return forward + 2 * M * N * K + 4 * M * r * (K + N)
    raise ValueError(f"lora_layer_flops: unknown pass {pass_name!r}, expected 'fwd' or 'fwd_bwd'")


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def make_linear4bit(weight, compute_dtype):
    """A ``bnb.nn.Linear4bit`` (no bias) holding NF4(weight), blocksize 64, double quantization, on weight's device:
    the base layer of ``peft_bnb`` here and of every decoder linear in the end-to-end bench (``fused_lora.bench.e2e``).

    Args:
        weight: (out_features, in_features) floating tensor. compute_dtype: the dtype bitsandbytes computes in.
    Example:
        >>> layer = make_linear4bit(torch.randn(128, 64, dtype=torch.bfloat16), torch.bfloat16)
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to(compute_dtype).clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, blocksize=64)
    return layer.to(weight.device)


def _dequant_matmul_lora_function():
    """The Unsloth-style autograd function (built lazily: it needs bitsandbytes)."""
    import bitsandbytes.functional as bnbf

    class DequantMatmulLora(torch.autograd.Function):
        """y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ with W dequantized into a bf16 buffer, then cuBLAS; W frozen."""

        @staticmethod
        def forward(ctx, x, packed, quant_state, A, B, s):
            W = bnbf.dequantize_4bit(packed, quant_state)
            u = x @ A.t()
            y = torch.addmm(x @ W.t(), u, B.t(), alpha=s)
            ctx.save_for_backward(x, packed, A, B, u)
            ctx.quant_state, ctx.s = quant_state, s
            return y

        @staticmethod
        def backward(ctx, g):
            x, packed, A, B, u = ctx.saved_tensors
            s = ctx.s
            W = bnbf.dequantize_4bit(packed, ctx.quant_state)
            v = g @ B
            dx = torch.addmm(g @ W, v, A, alpha=s)
            dA = torch.mm(v.t(), x).mul_(s)
            dB = torch.mm(g.t(), u).mul_(s)
            return dx, None, None, dA, dB, None

    return DequantMatmulLora


def _peft_bnb_layer(W, A, B, s):
    """PEFT's LoRA layer over bnb.nn.Linear4bit holding NF4(W), adapters set to (A, B) in bf16."""
    from peft import LoraConfig, get_peft_model

    r = A.shape[0]
    base = make_linear4bit(W, W.dtype)

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    holder = OneLayer()
    holder.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=s * r, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].to(W.dtype)
        layer.lora_B["default"].to(W.dtype)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return layer, params


class ImplBuilder:
    """Builds each implementation's layer for one (W, A, B): a callable x -> y and the tensors it owns grads of."""

    def __init__(self, compile_backend: str = "inductor"):
        self.compile_backend = compile_backend
        self._compiled_reference = None

    def compiled_reference_fn(self):
        if self._compiled_reference is None:
            dynamo_config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            self._compiled_reference = torch.compile(reference.lora_linear_naive, backend=self.compile_backend)
        return self._compiled_reference

    def build(self, impl: str, weights: dict):
        """Returns (layer, params): layer(x) -> y (M, N); params are the adapter tensors that receive grads."""
        W, W_deq, A, B, s = weights["W"], weights["W_deq"], weights["A"], weights["B"], LORA_SCALING
        if impl == "fused":
            nf4 = weights["nf4"]
            return (lambda x: lora_linear(x, nf4, A, B, s, backend="triton")), [A, B]
        if impl == "dense_cublas":
            return (lambda x: torch.nn.functional.linear(x, W)), []
        if impl == "dequant_cublas":
            import bitsandbytes.functional as bnbf

            fn = _dequant_matmul_lora_function()
            packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            return (lambda x: fn.apply(x, packed, state, A, B, s)), [A, B]
        if impl == "peft_bnb":
            return _peft_bnb_layer(W, A, B, s)
        if impl == "reference":
            return (lambda x: reference.lora_linear_naive(x, W_deq, A, B, s)), [A, B]
        if impl == "compiled_reference":
            compiled = self.compiled_reference_fn()
            return (lambda x: compiled(x, W_deq, A, B, s)), [A, B]
        raise ValueError(f"benchmark: unknown implementation {impl!r}; known: {ALL_IMPLS}")


def layer_dtype(device) -> torch.dtype:
    """The activations' and adapters' dtype of the measured layer: bf16 on a GPU, fp32 on a CPU (where the numbers
    only exercise the tooling)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_base_weight(K: int, N: int, dtype, device):
    """(W, NF4Weight of W, W dequantized back to dtype): W (N, K) ~ N(0, 1/K), seeded; every LoRA implementation
    computes with NF4(W) (``dense_cublas`` with W itself)."""
    torch.manual_seed(0)
    W = (torch.randn(N, K, device=device, dtype=torch.float32) / math.sqrt(K)).to(dtype)
    nf4 = quantize_nf4(W, blocksize=64, double_quant=True)
    return W, nf4, nf4.dequantize(dtype)


def make_adapters(K: int, N: int, r: int, dtype, device):
    """A (r, K) and B (N, r), random (B is not zero, so the low-rank path counts), requiring grad."""
    A = (torch.randn(r, K, device=device, dtype=torch.float32) / math.sqrt(K)).to(dtype).requires_grad_(True)
    B = (torch.randn(N, r, device=device, dtype=torch.float32) / math.sqrt(r)).to(dtype).requires_grad_(True)
    return A, B


# ----------------------------------------------------------------------------------------------------------------
# Inputs and passes


def make_input_sets(M, K, N, dtype, device, l2_bytes=50 * 2**20):
    """Several (x, g) pairs to cycle through between timed calls: x (M, K) requiring grad, g (M, N).

    As many pairs as make 4 × ``l2_bytes`` together, clamped to [2, 8] (2 when that would pass 4 GiB); small-M
    pairs stay inside the L2 cache even eight at a time, which is why ``do_bench`` also flushes it before every
    call. Seeded by M, so every implementation of a case sees the same inputs (the accuracy check relies on it).
    """
    torch.manual_seed(M)
    pair_bytes = (M * K + M * N) * torch.finfo(dtype).bits // 8
    count = int(min(8, max(2, math.ceil(4 * l2_bytes / max(pair_bytes, 1)))))
    if pair_bytes * count > 4 * 2**30:
        count = 2
    xs = [torch.randn(M, K, device=device, dtype=dtype).requires_grad_(True) for _ in range(count)]
    gs = [torch.randn(M, N, device=device, dtype=dtype) for _ in range(count)]
    return xs, gs


def pass_callable(layer, xs, gs, pass_name):
    """A no-argument callable for do_bench that runs one pass on the next input set (x_i, g_i), cycling.

    ``fwd``: y = layer(x_i). ``fwd_bwd``: layer(x_i).backward(g_i), so dx lands in x_i.grad and the adapters'
    gradients in theirs (the timer sets them to None between calls).
    """
    if pass_name not in PASSES:
        raise ValueError(f"pass_callable: unknown pass {pass_name!r}; expected one of {PASSES}")
    cycle = itertools.cycle(range(len(xs)))
    if pass_name == "fwd":
        return lambda: layer(xs[next(cycle)])

    def forward_backward():
        i = next(cycle)
        layer(xs[i]).backward(gs[i])

    return forward_backward
