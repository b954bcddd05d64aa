"""Every kernel path of fused_lora/kernels on a CUDA device, at Llama-3-8B shapes in bf16 (and fp16, fp32 where the
rounding differs): decode (split-K; the forward's NF4 from the shared-memory pair table), middle (NF4 decoded in
registers in the GEMM: the pair table on sm_90, byte permutes elsewhere) and large M (slabs of W dequantized into the
workspace, then the dense GEMM), NF4 and dense, with and without the low-rank term, bias and dropout, each forced by
strategy.use_thresholds; the deterministic mode bitwise reproducible; the large path's workspace bounded. DESIGN's
tolerance rule against the float64 reference over bitsandbytes' dequantized W."""

import pytest
import torch
from test_kernels import LaunchRecorder
from test_kernels_gpu import SCALING, _assert_outputs_match_reference, _layer

import fused_lora as fl
from fused_lora.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

# Thresholds that send every call to one path (the large one with several overlapped slabs: 32 MiB of workspace).
PATHS = {
    "decode": {"decode_max_m": 64, "large_min_m": 10**9},
    "middle": {"decode_max_m": 0, "large_min_m": 10**9},
    "large": {"decode_max_m": 0, "large_min_m": 1, "workspace_bytes": 32 << 20, "slab_overlap": True},
}
SHAPES = [(4096, 14336), (14336, 4096)]


def _modules():
    from fused_lora.kernels import launch_decode, launch_gemm, launch_slab, lora, strategy

    return lora, strategy, launch_decode, launch_gemm, launch_slab


def _launchers_called(monkeypatch):
    """Names of the outermost launcher entry points called (launch_decode.forward, launch_slab.launch_y, ...)."""
    _, _, *modules = _modules()
    calls, depth = [], []
    for module in modules:
        for name in ("forward", "dx", "launch_y", "launch_dx"):
            real = getattr(module, name, None)
            if real is None:
                continue

            def spy(*args, _real=real, _name=f"{module.__name__.rsplit('.', 1)[-1]}.{name}", **kwargs):
                if not depth:
                    calls.append(_name)
                depth.append(_name)
                try:
                    return _real(*args, **kwargs)
                finally:
                    depth.pop()

            monkeypatch.setattr(module, name, spy)
    return calls


def _check(M, K, N, r, dtype, base, bias, p, path, monkeypatch, adapter_dtype=torch.float32):
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _layer(M, K, N, r, dtype, base, bias, seed=M + K + N, adapter_dtype=adapter_dtype)
    calls = _launchers_called(monkeypatch)
    with strategy.use_thresholds(**PATHS[path]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 4321)
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 4321, u, True, True, True, b is not None)
    expected = {"decode": "launch_decode", "middle": "launch_gemm", "large": "launch_slab"}[path]
    if path == "large" and base == "dense":
        expected = "launch_gemm"
    assert calls and all(c.startswith(expected) for c in calls), calls
    _assert_outputs_match_reference(lora, 4321, p, (x, w_compute, A, B, b, g), (y, u) + grads, dtype)


@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
@pytest.mark.parametrize("K, N", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
@pytest.mark.parametrize("path, M", [("decode", 1), ("decode", 16), ("decode", 64), ("middle", 256), ("large", 2048)],
                         ids=["decode-M1", "decode-M16", "decode-M64", "middle-M256", "large-M2048"])
def test_each_path_in_bf16_at_llama_shapes(path, M, K, N, base, monkeypatch, poison_empty):
    _check(M, K, N, 16, torch.bfloat16, base, bias=True, p=0.1, path=path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("M", [1, 16, 27])
def test_the_decode_forward_runs_the_pair_table(M, monkeypatch, poison_empty):
    """Where a block has the shared memory for it, the decode forward reads NF4 from the shared-memory pair table
    (LOOKUP "lds", nf4_lookup.py) and the block scales as bf16 pairs (SCALE_PAIRS, common.scale_pairs), neither run
    on a GPU before this test, and meets the tolerance rule, without falling back to the byte permutes; at BLOCK_M
    16 and 32 (M = 27: ragged rows in the taller tile)."""
    from fused_lora.backend import cuda_shared_optin
    from fused_lora.kernels import common, lora_decode

    _, _, launch_decode, *_ = _modules()
    if launch_decode.pair_table_shared(16, 4, True, 64, 16 if M <= 16 else 32) > cuda_shared_optin("cuda"):
        pytest.skip("this GPU gives a block too little shared memory for the pair table")
    launched = []
    monkeypatch.setattr(lora_decode, "lora_decode_fwd_kernel", LaunchRecorder(
        lora_decode.lora_decode_fwd_kernel, lambda grid, kw: launched.append((kw["LOOKUP"], kw["SCALE_PAIRS"]))))
    _check(M, 4096, 14336, 16, torch.bfloat16, "nf4-dq", bias=True, p=0.1, path="decode", monkeypatch=monkeypatch)
    assert ("lds", True) in launched and not common.PAIR_TABLE_FAILED, (launched, common.PAIR_TABLE_FAILED)


@pytest.mark.parametrize("M, N", [(256, 14336), (256, 1024), (300, 4096)], ids=["tiled", "split-K", "ragged-M"])
def test_the_middle_gemms_run_the_pair_table_without_masks(M, N, monkeypatch, poison_empty):
    """On sm_90 the middle path's NF4 GEMMs (forward, split forward, dx) read NF4 from the shared-memory pair table
    (launch_gemm.gemm_lookup: never run on a GPU before this test), with loads without masks where the blocks divide
    K and N (K_DIVISOR, N_DIVISOR; rows past M read as row M - 1 at M = 300), meet the tolerance rule and never
    fall back to the byte permutes."""
    from fused_lora.backend import cuda_capability
    from fused_lora.kernels import common

    if cuda_capability("cuda")[0] < 9:
        pytest.skip("the middle GEMMs take the pair table on sm_90 and later")
    launched, real = [], common.launch_lookup
    monkeypatch.setattr(common, "launch_lookup", lambda launch, lookup, key, what: (
        launched.append((key[0], lookup)), real(launch, lookup, key, what))[-1])
    _check(M, 4096, N, 16, torch.bfloat16, "nf4-dq", bias=True, p=0.1, path="middle", monkeypatch=monkeypatch)
    forward = "split forward" if N == 1024 else "forward GEMM"
    assert sorted(set(launched)) == sorted({(forward, "lds"), ("dx GEMM", "lds")}), launched
    assert not common.PAIR_TABLE_FAILED, common.PAIR_TABLE_FAILED


@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
def test_middle_split_k_forward_in_bf16_at_the_k_proj_shape(base, monkeypatch, poison_empty):
    """Llama-3-8B's k_proj (K=4096, N=1024) at M=256: 16 tiles of 128×128 would leave most SMs idle, so the middle
    forward splits K (launch_gemm.y_splits) and its epilogue adds the partial sums, the bias and the low-rank term."""
    _, strategy, _, launch_gemm, _ = _modules()
    split_calls = []
    real = launch_gemm._launch_y_split
    monkeypatch.setattr(launch_gemm, "_launch_y_split", lambda *a, **k: split_calls.append(1) or real(*a, **k))
    _check(256, 4096, 1024, 16, torch.bfloat16, base, bias=True, p=0.1, path="middle", monkeypatch=monkeypatch)
    assert split_calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("path, M", [("decode", 7), ("decode", 40), ("middle", 300), ("large", 1000)])
def test_each_path_in_fp16_and_fp32_with_ragged_shapes(path, M, dtype, monkeypatch, poison_empty):
    _check(M, 4160, 1000, 64, dtype, "nf4-dq", bias=False, p=0.2, path=path, monkeypatch=monkeypatch,
           adapter_dtype=dtype)


@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
@pytest.mark.parametrize("path, M", [("decode", 16), ("middle", 256), ("large", 2048)])
def test_each_path_of_the_frozen_layer_in_bf16(path, M, base, monkeypatch):
    from fused_lora.functional import frozen_linear

    _, strategy, *_ = _modules()
    x, weight, w_compute, _, _, b, g = _layer(M, 4096, 14336, 4, torch.bfloat16, base, True, seed=M)
    leaves = [x.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    with strategy.use_thresholds(**PATHS[path]):
        y = frozen_linear(leaves[0], weight, leaves[1], backend="triton")
        grads = torch.autograd.grad(y, leaves, g)

    def plain_torch(cast):
        copies = [cast(t).detach().requires_grad_(True) for t in leaves]
        out = torch.nn.functional.linear(copies[0], cast(w_compute), copies[1])
        return (out,) + torch.autograd.grad(out, copies, cast(g))

    ref, plain = plain_torch(lambda t: t.double()), plain_torch(lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "dx", "db"), (y,) + grads, plain, ref):
        assert_close_to_reference(name, ours, plain_t, ref_t, torch.bfloat16)


@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_dequantizes_bit_exactly_in_fp32(path):
    """x = I, g = I (fp32, IEEE dots, exact code values): y = deq(W)ᵀ and dx = deq(W) bit for bit on every path."""
    lora, strategy, *_ = _modules()
    K, N = 4096, 1024
    gen = torch.Generator(device="cuda").manual_seed(7)
    weight = fl.quantize_nf4(torch.randn(N, K, device="cuda", generator=gen), blocksize=64, double_quant=True)
    dense = weight.dequantize(torch.float32)
    rows = 16 if path == "decode" else 512
    with strategy.use_thresholds(**PATHS[path]):
        assert torch.equal(lora.frozen_forward(torch.eye(K, device="cuda")[:rows], weight, None), dense.t()[:rows])
        assert torch.equal(lora.frozen_backward(torch.eye(N, device="cuda")[:rows], weight, True, False)[0],
                           dense[:rows])  # fmt: skip


@pytest.mark.parametrize("path, M", [("decode", 16), ("middle", 256), ("large", 2048)])
def test_deterministic_mode_is_bitwise_reproducible(path, M):
    lora, strategy, *_ = _modules()
    x, weight, _, A, B, b, g = _layer(M, 4096, 14336, 16, torch.bfloat16, "nf4-dq", True, seed=3)

    def run():
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 99)
        return (y, u) + lora.backward(g, x, weight, A, B, SCALING, 0.1, 99, u, True, True, True, True)

    with strategy.use_thresholds(**PATHS[path]), strategy.use_deterministic(True):
        first, second = run(), run()
    for name, a, c in zip(("y", "u", "dx", "dA", "dB", "db"), first, second):
        assert torch.equal(a, c), f"{name} differs between two deterministic runs"
    with strategy.use_thresholds(**PATHS[path]):
        relaxed = run()  # relaxed atomics: the same values up to the order of the additions
    for name, a, c in zip(("y", "u", "dx", "dA", "dB", "db"), first, relaxed):
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_large_path_workspace_is_bounded_and_reused(monkeypatch):
    """4096 × 14336 bf16 W is 112 MiB; the workspace stays at its 32 MiB cap and the caching allocator hands every
    call the same block."""
    lora, strategy, *_ = _modules()
    x, weight, _, A, B, _, g = _layer(2048, 4096, 14336, 16, torch.bfloat16, "nf4-dq", False, seed=5)
    seen, real = [], strategy.workspace

    def workspace(device, nbytes):
        buffer = real(device, nbytes)
        seen.append((buffer.data_ptr(), buffer.numel()))  # not the buffer: holding it would keep its block in use
        return buffer

    monkeypatch.setattr(strategy, "workspace", workspace)
    with strategy.use_thresholds(**PATHS["large"]):
        y, u = lora.forward(x, weight, A, B, SCALING, None, 0.0, 0)
        first = len(seen)
        lora.backward(g, x, weight, A, B, SCALING, 0.0, 0, u, True, True, True, False)
        lora.forward(x, weight, A, B, SCALING, None, 0.0, 0)
    assert seen and all(numel <= 32 << 20 for _, numel in seen)
    assert seen[:first] == seen[-first:]  # the second forward got the first one's blocks back


@pytest.mark.parametrize("path, M, N", [("decode", 1, 14336), ("decode", 16, 4096), ("middle", 256, 1024)])
def test_programmatic_dependent_launch_changes_no_number(path, M, N, monkeypatch):
    """Kernels chained with PDL (kernels/pdl.py; on from sm_90) give the numbers they give launched one after the
    other: bitwise in the deterministic mode, and within the atomics' reordering with the relaxed accumulation (the
    zeroing kernel then the pass over g), run repeatedly so that a kernel reading too early would show."""
    lora, strategy, *_ = _modules()
    from fused_lora.kernels import pdl

    if not pdl.enabled(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    x, weight, _, A, B, b, g = _layer(M, 4096, N, 16, torch.bfloat16, "nf4-dq", True, seed=5)

    def run():
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 7)
        return (y, u) + lora.backward(g, x, weight, A, B, SCALING, 0.1, 7, u, True, True, True, True)

    with strategy.use_thresholds(**PATHS[path]):
        for deterministic in (True, False):
            with strategy.use_deterministic(deterministic):
                chained = [run() for _ in range(10)]
                monkeypatch.setenv(pdl.ENV_VAR, "0")
                plain = run()
                monkeypatch.delenv(pdl.ENV_VAR)
            for outputs in chained:
                for name, a, c in zip(("y", "u", "dx", "dA", "dB", "db"), outputs, plain):
                    if deterministic:
                        assert torch.equal(a, c), f"{name} differs with PDL"
                    else:
                        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("M", [1, 16])
def test_decode_path_replays_in_a_cuda_graph(M):
    """The decode path's chain (PDL launches on sm_90) captured in a CUDA graph and replayed gives the eager results
    bitwise (deterministic mode): what torch.compile's cudagraphs and decode loops rely on."""
    lora, strategy, *_ = _modules()
    x, weight, _, A, B, b, g = _layer(M, 4096, 14336, 16, torch.bfloat16, "nf4-dq", True, seed=11)

    def run():
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.0, 3)
        return (y, u) + lora.backward(g, x, weight, A, B, SCALING, 0.0, 3, u, True, True, True, True)

    with strategy.use_thresholds(**PATHS["decode"]), strategy.use_deterministic(True):
        eager = run()  # also warms every cache the launchers keep
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        graph.replay()
        torch.cuda.synchronize()
    for name, a, c in zip(("y", "u", "dx", "dA", "dB", "db"), eager, captured):
        assert torch.equal(a, c), f"{name} differs when replayed from a CUDA graph"


def test_a_first_call_inside_a_cuda_graph_leaves_no_unwritten_cache():
    """A layer whose first call is captured in a CUDA graph (no warm-up): the scales it decodes are computed inside the
    graph, not cached unwritten (_common.cuda_graph_capturing), so an eager call before the graph's first replay reads
    no unwritten scales: it and the replay agree bit for bit (the decode path is deterministic) and match the
    reference."""
    from fused_lora import reference
    from fused_lora.testing import relative_error

    lora, strategy, *_ = _modules()
    with strategy.use_thresholds(**PATHS["decode"]):
        x, weight, _, A, B, b, _ = _layer(16, 4096, 4096, 16, torch.bfloat16, "nf4-dq", True, seed=1)
        lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)  # Triton compiles outside the capture, on another weight
        x, weight, w_compute, A, B, b, _ = _layer(16, 4096, 4096, 16, torch.bfloat16, "nf4-dq", True, seed=2)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph, _ = lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)
        y_eager, _ = lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)  # before any replay
        graph.replay()
        torch.cuda.synchronize()
    expected, _ = reference.lora_forward(x.double(), w_compute.double(), A.double(), B.double(), SCALING, b.double())
    assert torch.equal(y_eager, y_graph), relative_error(y_eager, y_graph)
    assert relative_error(y_eager, expected) < 2e-2


@pytest.mark.parametrize("path, M", [("decode", 16), ("middle", 256)])
def test_dropout_inside_a_cuda_graph_capture_raises(path, M):
    """The dropout seed is drawn on the host: a captured graph would replay one mask at every step, so dropout inside
    a capture raises (_common.refuse_dropout_in_cuda_graph) and leaves the graph's stream usable; after a warm-up
    with the same shapes the capture without dropout succeeds and its replay matches an eager call."""
    lora, strategy, *_ = _modules()
    x, weight, _, A, B, b, _ = _layer(M, 4096, 4096, 16, torch.bfloat16, "nf4-dq", True, seed=3)
    with strategy.use_thresholds(**PATHS[path]):
        for p in (0.1, 0.0):  # warm-up: Triton compiles and tunes outside the capture
            lora.forward(x, weight, A, B, SCALING, b, p, 5)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                lora.forward(x, weight, A, B, SCALING, b, 0.1, 5)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph, _ = lora.forward(x, weight, A, B, SCALING, b, 0.0, 5)
        graph.replay()
        y_eager, _ = lora.forward(x, weight, A, B, SCALING, b, 0.0, 5)
        torch.cuda.synchronize()
    torch.testing.assert_close(y_graph, y_eager, rtol=2e-2, atol=2e-2)
