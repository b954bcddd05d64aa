"""pytest-benchmark versions of the quick sweep cases (outside the default test run: testpaths is tests/).

    python -m pytest bench/test_bench_quick.py --benchmark-columns=median,iqr,rounds --benchmark-sort=name

On CUDA: the ``--quick`` cases of ``python -m fused_lora bench`` (Llama-3-8B shapes, M ∈ {16, 2048, 8192}, r=16)
for every implementation, fwd and fwd_bwd, each call followed by a device synchronize so that wall-clock time is
GPU time. On a CPU: ``reference`` and ``compiled_reference`` at the sweep's small CPU shapes. The implementations
and inputs are the sweep's own (fused_lora.bench.impls); the sweep CLI remains the source of committed results.
"""

import pytest
import torch

from fused_lora.bench import impls as bench_impls

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
SHAPES = bench_impls.LLAMA3_8B_SHAPES if ON_CUDA else bench_impls.CPU_SHAPES
TOKENS = bench_impls.QUICK_M if ON_CUDA else bench_impls.CPU_M
RANK = bench_impls.QUICK_R[0] if ON_CUDA else bench_impls.CPU_R[0]
IMPLS = bench_impls.GPU_IMPLS if ON_CUDA else bench_impls.CPU_IMPLS
NEEDS = {"dequant_cublas": ("bitsandbytes",), "peft_bnb": ("bitsandbytes", "peft")}


@pytest.fixture(scope="module")
def builder():
    return bench_impls.ImplBuilder("inductor")


@pytest.fixture(scope="module")
def weights_for():
    """weights_for((K, N)) -> the sweep's weights for that shape at rank RANK, built once per shape."""
    cache = {}

    def get(shape):
        if shape not in cache:
            cache.clear()
            K, N = shape
            W, nf4, W_deq = bench_impls.make_base_weight(K, N, DTYPE, DEVICE)
            A, B = bench_impls.make_adapters(K, N, RANK, DTYPE, DEVICE)
            cache[shape] = {"W": W, "W_deq": W_deq, "nf4": nf4, "A": A, "B": B}
        return cache[shape]

    return get


@pytest.mark.parametrize("pass_name", bench_impls.PASSES)
@pytest.mark.parametrize("M", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}")
def test_qlora_linear(benchmark, builder, weights_for, shape, impl, M, pass_name):
    for module in NEEDS.get(impl, ()):
        pytest.importorskip(module)
    K, N = shape
    layer, params = builder.build(impl, weights_for(shape))
    xs, gs = bench_impls.make_input_sets(M, K, N, DTYPE, DEVICE)
    run = bench_impls.pass_callable(layer, xs, gs, pass_name)
    grads = xs + list(params)

    def one_call():
        for t in grads:
            t.grad = None
        run()
        if ON_CUDA:
            torch.cuda.synchronize()

    flops = bench_impls.lora_layer_flops(M, K, N, RANK, pass_name)
    benchmark.extra_info.update({"M": M, "K": K, "N": N, "r": RANK, "pass": pass_name, "flops": flops})
    benchmark.pedantic(one_call, warmup_rounds=3, rounds=30 if ON_CUDA else 5, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable, where the case runs once as a smoke test
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
