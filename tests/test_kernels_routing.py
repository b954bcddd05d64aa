"""Which kernel path and split a call takes (fused_lora/kernels/strategy.py, launch_gemm.y_splits and _splits, the
decode path's split counts): the thresholds by M and x's dtype, the split-K plans, and u's parts in the split forward.
The paths' numbers are in test_kernels_paths.py."""

import pytest
import torch

import fused_lora as fl
from fused_lora import reference
from fused_lora.testing import relative_error

from test_kernels import SCALING, _check_all, _make_case
from test_kernels_paths import EXPECTED_CALLS, SPLIT_PATHS, _modules, _record_paths


def test_split_k_forward_only_where_the_tiles_leave_sms_idle(monkeypatch):
    """launch_gemm.y_splits on an H200 (132 SMs, 128×128 split tiles): Llama-3-8B's k_proj at M=256 (16 tiles)
    runs 8 splits of 512 columns and o_proj (64 tiles) 2; the up-projection (224 tiles), a short K, M = 0, an NF4 W
    with ragged blocks, fp32 x and split_k_min_steps = 0 do not split."""
    from fused_lora.kernels import common, launch_gemm, strategy

    monkeypatch.setattr(launch_gemm, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(common, "sm_count", lambda device: 132)

    def plan(M, N, K, weight=None, dtype=torch.bfloat16, **thresholds):
        x = torch.zeros(M, K, dtype=dtype)
        with strategy.use_thresholds(strategy.Thresholds(**thresholds)):
            found = launch_gemm.y_splits(M, N, K, torch.zeros(N, K, dtype=dtype) if weight is None else weight, x)
        return None if found is None else (found.tiles, found.splits, found.k_per_split)

    assert plan(256, 1024, 4096) == (16, 8, 512)
    assert plan(256, 4096, 4096) == (64, 2, 2048)
    assert plan(64, 1024, 4096) == (8, 16, 256)  # 64-row tiles at M ≤ 64
    assert plan(256, 14336, 4096) is None and plan(256, 1024, 256) is None and plan(0, 1024, 4096) is None
    assert plan(256, 1024, 4096, split_k_min_steps=0) is None
    assert plan(256, 1024, 4096, dtype=torch.float32) is None  # fp32 operands: the split tile would spill
    assert plan(256, 1024, 4100, fl.quantize_nf4(torch.randn(1024, 4100), blocksize=64)) is None


@pytest.mark.parametrize("total, block, other", [(4096, 256, 224), (14336, 128, 32), (4096, 64, 1), (8192, 128, 112),
                                                 (100, 16, 3), (16, 16, 1), (1, 64, 5000)])  # fmt: skip
def test_splits_cover_the_axis_and_balance_the_busiest_sm(total, block, other, monkeypatch):
    """_splits: every split non-empty, whole steps, the axis covered once; on 132 SMs no worse than the old rule
    (enough splits for programs_per_sm programs per SM, steps shared as evenly as that count allows)."""
    from fused_lora.kernels import common, launch_gemm, strategy

    monkeypatch.setattr(common, "sm_count", lambda device: 132)
    splits, per_split = launch_gemm._splits(total, block, other, "cpu")
    steps = -(-total // block)
    assert per_split % block == 0 and 1 <= splits <= steps
    assert (splits - 1) * per_split < total <= splits * per_split

    def busiest(s, per):  # steps the busiest SM runs, one step of overhead per program
        return -(-other * s // 132) * (per // block + 1)

    wanted = strategy.Thresholds().programs_per_sm * 132
    old = max(1, min(steps, -(-wanted // other)))
    old_per = -(-steps // old) * block
    assert busiest(splits, per_split) <= busiest(-(-total // old_per), old_per)
    if (total, block, other) == (4096, 256, 224):  # the decode forward at K=4096, N=14336: 6, 6, 4 steps before
        assert (splits, per_split) == (4, 1024)
    capped, capped_per = launch_gemm._splits(total, block, other, "cpu", max_splits=2)
    assert 1 <= capped <= min(2, splits) and (capped - 1) * capped_per < total <= capped * capped_per


@pytest.mark.usefixtures("interpret_triton")  # CPU tensors through the kernels
def test_the_split_forward_caps_the_parts_of_u_its_epilogue_reads_per_column_tile(monkeypatch, poison_empty):
    """The split forward's epilogue re-reads u's split parts for every column tile: forward_split asks lora_u_kernel
    for at most S·BLOCK_N / r_pad parts (no more bytes than the y partial sums the epilogue reads), and the result
    is the reference's."""
    from fused_lora.kernels import common, launch_gemm, lora, strategy

    monkeypatch.setattr(common, "sm_count", lambda device: 132)  # lora_u_kernel would want 64 parts of K=2048
    got = []
    real = launch_gemm.compute_u
    monkeypatch.setattr(launch_gemm, "compute_u", lambda *a, **k: got.append((k, real(*a, **k))) or got[-1][1])
    gen = torch.Generator().manual_seed(5)
    M, K, N, r = 20, 2048, 96, 16
    x, A, B = (torch.randn(*s, generator=gen) for s in ((M, K), (r, K), (N, r)))
    weight = torch.randn(N, K, generator=gen) / 32
    with strategy.use_thresholds(**SPLIT_PATHS["split"]):
        plan = launch_gemm.y_splits(M, N, K, weight, x)
        y, u = lora.forward(x, weight, A, B, SCALING, None, 0.0, 0)
    (kwargs, parts), = got
    assert plan is not None and kwargs["max_parts"] == plan.splits * launch_gemm.epilogue_block_n() // 16
    assert 1 <= parts.shape[0] <= kwargs["max_parts"] < launch_gemm._splits(K, 32, 2, "cpu")[0]
    y_ref, u_ref = reference.lora_forward(x.double(), weight.double(), A.double(), B.double(), SCALING, None)
    assert relative_error(y, y_ref) < 1e-5 and relative_error(u, u_ref) < 1e-5


def test_decode_kernels_split_for_the_programs_an_sm_holds(monkeypatch):
    """On an H200 (sm_90 thresholds, 132 SMs) the decode forward of Llama-3-8B's up_proj (112 column tiles × 32 K
    steps) runs 2 splits of 16 steps (decode_programs_per_sm = 2: one wave of its 2-per-SM programs), where the rule
    of the split reductions (programs_per_sm = 4) would take 8 of 4."""
    from fused_lora.kernels import common, launch_gemm, strategy

    monkeypatch.setattr(common, "sm_count", lambda device: 132)
    with strategy.use_thresholds(strategy.THRESHOLDS["sm90"]):
        assert launch_gemm._splits(4096, 128, 112, "cpu", decode=True) == (2, 2048)
        assert launch_gemm._splits(4096, 128, 112, "cpu") == (8, 512)


def test_path_choice_follows_the_thresholds():
    _, strategy, *_ = _modules()
    t = strategy.Thresholds(decode_max_m=16, large_min_m=512)
    with strategy.use_thresholds(t):
        assert [strategy.path(M, True, "cpu") for M in (1, 16, 17, 511, 512, 10**5)] == (
            ["decode"] * 2 + ["middle"] * 2 + ["large"] * 2
        )
        assert [strategy.path(M, False, "cpu") for M in (16, 17, 10**5)] == ["decode", "middle", "middle"]
    with strategy.use_thresholds(decode_max_m=1000):
        assert strategy.path(65, True, "cpu") == "middle"  # the decode kernels hold at most 64 rows
    with strategy.use_thresholds(strategy.Thresholds(decode_max_m=16, large_min_m=512, large_min_m_fp32=128)):
        assert [strategy.path(200, True, "cpu", d) for d in (torch.float32, torch.bfloat16, torch.float16, None)] == (
            ["large", "middle", "middle", "middle"])
        assert strategy.path(100, True, "cpu", torch.float32) == "middle"
        assert strategy.path(200, False, "cpu", torch.float32) == "middle"  # a dense W has no large path
    with strategy.use_thresholds(strategy.Thresholds(large_min_m_fp32=128), large_min_m=1000):  # for every dtype
        assert strategy.path(200, True, "cpu", torch.float32) == "middle"
    assert strategy.THRESHOLDS["sm90"].large_min_for(torch.float32) == strategy.THRESHOLDS["sm90"].large_min_m_fp32
    assert strategy.Thresholds().large_min_for(torch.float32) == strategy.Thresholds().large_min_m  # None: the same
    with pytest.raises(ValueError, match="large_min_m_fp32"):
        strategy.Thresholds(large_min_m_fp32=0)


@pytest.mark.usefixtures("interpret_triton")  # CPU tensors through the kernels
@pytest.mark.parametrize("dtype, expected", [(torch.float32, "large"), (torch.float16, "middle")])
def test_fp32_x_takes_the_large_path_from_its_own_threshold(dtype, expected, monkeypatch, poison_empty):
    """lora.forward and backward route by x's dtype too (Thresholds.large_min_m_fp32): fp32 x at M = 40 takes the
    large path where fp16 x takes the middle one, and both match the reference."""
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(40, 128, 72, 4, dtype, "nf4-dq", torch.float32, True, "contiguous",
                                                  64, 40)  # fmt: skip
    calls = _record_paths(monkeypatch)
    with strategy.use_thresholds(decode_max_m=0, large_min_m=10**9, large_min_m_fp32=32):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, True)
    assert calls == EXPECTED_CALLS[expected]
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, lora.dropout_mask(5, 40, 128, 0.1, "cpu"), dtype)


def test_pow2_divisor_is_the_largest_block_that_divides():
    from fused_lora.kernels.launch_gemm import pow2_divisor

    assert [pow2_divisor(n) for n in (4096, 14336, 96, 80, 65, 1, 0)] == [256, 256, 32, 16, 1, 1, 1]


@pytest.mark.usefixtures("interpret_triton")  # CPU tensors through the kernels
@pytest.mark.parametrize("base", ["nf4-dq", "dense"])
@pytest.mark.parametrize("K, N", [(128, 96), (96, 80), (70, 64)], ids=["even", "ragged-N", "ragged-K"])
def test_the_gemms_drop_their_masks_only_where_the_blocks_divide_k_and_n(K, N, base, monkeypatch, poison_empty):
    """lora_fwd_kernel (K_DIVISOR) and lora_dx_kernel (K_DIVISOR, N_DIVISOR) load without masks where BLOCK_K
    divides K (and BLOCK_N divides N for dx; the interpreter's tiles are 32 wide): rows past M (here 37, ragged) are
    then read as row M - 1 (NF4 at K = 96 and 70, blocks split across rows: x unmasked, W's flat-index loads keep
    theirs). Every case, unmasked or not, meets the tolerance rule."""
    from fused_lora.kernels import lora_bwd, lora_fwd
    from test_kernels_paths import PATHS

    from test_kernels import LaunchRecorder

    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(37, K, N, 5, torch.float32, base, torch.float32, True,
                                                  "contiguous", 64, 7)  # fmt: skip
    seen = []
    for module, name in ((lora_fwd, "lora_fwd_kernel"), (lora_bwd, "lora_dx_kernel")):
        monkeypatch.setattr(module, name, LaunchRecorder(getattr(module, name), lambda grid, kw, _n=name: seen.append(
            (_n, kw["K_DIVISOR"] % kw["BLOCK_K"] == 0 and kw.get("N_DIVISOR", 32) % kw["BLOCK_N"] == 0))))
    with strategy.use_thresholds(**PATHS["middle"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, True)
    even = {"even": (True, True), "ragged-N": (True, False), "ragged-K": (False, False)}[
        {128: "even", 96: "ragged-N", 70: "ragged-K"}[K]]
    assert sorted(set(seen)) == [("lora_dx_kernel", even[1]), ("lora_fwd_kernel", even[0])], seen
    m = lora.dropout_mask(5, 37, K, 0.1, "cpu")
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, torch.float32)


@pytest.mark.usefixtures("interpret_triton")  # CPU tensors through the kernels
@pytest.mark.parametrize("base, K, N, even", [("nf4-dq", 128, 96, True), ("nf4-dq", 128, 80, False),
                                              ("dense", 80, 64, False)], ids=["even", "ragged-N", "ragged-K"])
def test_the_decode_dx_drops_its_masks_only_where_the_blocks_divide_k_and_n(base, K, N, even, monkeypatch,
                                                                            poison_empty):
    """lora_decode_dx_kernel loads without masks (EVEN) where BLOCK_N divides N and BLOCK_K divides K (32 each in
    the interpreter); each case meets the tolerance rule."""
    from fused_lora.kernels import lora_decode
    from test_kernels_paths import PATHS

    from test_kernels import LaunchRecorder

    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(5, K, N, 3, torch.float32, base, torch.float32, True,
                                                  "contiguous", 64, 11)  # fmt: skip
    seen = []
    monkeypatch.setattr(lora_decode, "lora_decode_dx_kernel", LaunchRecorder(
        lora_decode.lora_decode_dx_kernel, lambda grid, kw: seen.append(kw["EVEN"])))
    with strategy.use_thresholds(**PATHS["decode"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, True)
    assert seen == [even], seen
    m = lora.dropout_mask(5, 5, K, 0.1, "cpu")
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, torch.float32)


def test_a_refused_pair_table_launch_runs_the_byte_permutes_once_and_for_all(monkeypatch):
    """common.launch_lookup: a launch with LOOKUP "lds" refused for its resources runs again with "prmt", warns once
    and keeps its key off the table (common.pair_table_allowed); another key keeps it; any other error is raised;
    a lookup other than "lds" launches once as it is."""
    from triton.runtime.errors import OutOfResources

    from fused_lora import _common
    from fused_lora.kernels import common

    monkeypatch.setattr(common, "PAIR_TABLE_FAILED", set())
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_warned", set())
    for refusal in (RuntimeError("Triton Error [CUDA]: invalid argument"), OutOfResources(240000, 232448, "shared")):
        tried = []

        def launch(lookup, _error=refusal):
            tried.append(lookup)
            if lookup == "lds":
                raise _error

        key = ("forward GEMM", type(refusal).__name__, "cuda:0")
        with pytest.warns(RuntimeWarning, match="shared-memory NF4 table did not launch on cuda:0"):
            common.launch_lookup(launch, "lds", key, "the forward GEMM")
        assert tried == ["lds", "prmt"] and not common.pair_table_allowed(key)
    assert common.pair_table_allowed(("dx GEMM", "cuda:0"))

    def broken(lookup):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        common.launch_lookup(broken, "lds", ("dx GEMM", "cuda:0"), "the dx GEMM")
    assert common.pair_table_allowed(("dx GEMM", "cuda:0"))
    tried = []
    common.launch_lookup(tried.append, "prmt", ("dx GEMM", "cuda:0"), "the dx GEMM")
    assert tried == ["prmt"]


@pytest.mark.usefixtures("interpret_triton")  # CPU tensors through the kernels
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("path", ["decode", "middle"])
def test_a_layer_without_outputs_runs_every_path(path, deterministic):
    """N = 0 (a layer with no output features: a dense W, NF4 refuses to quantize an empty one) at M > 0: no split
    plan (launch_gemm.y_splits divided by the tile count) and no v/dB pass (launch_gemm.launch_vdb divided by N);
    y empty, dx and dA zeros, dB empty."""
    lora, strategy, *_ = _modules()
    from test_kernels_paths import PATHS

    x, A, B = torch.randn(5, 64), torch.randn(4, 64), torch.randn(0, 4)
    weight = torch.zeros(0, 64)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with strategy.use_thresholds(**PATHS[path]):
            y, u = lora.forward(x, weight, A, B, SCALING, None, 0.0, 1)
            dx, dA, dB, _ = lora.backward(torch.zeros(5, 0), x, weight, A, B, SCALING, 0.0, 1, u, True, True, True,
                                          False)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(before)
    assert y.shape == (5, 0) and dB.shape == (0, 4), (y.shape, dB.shape)
    assert torch.equal(dx, torch.zeros(5, 64)) and torch.equal(dA, torch.zeros(4, 64)), (dx, dA)
