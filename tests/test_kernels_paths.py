"""Every kernel path of fused_lora/kernels (decode, middle, large M; NF4 and dense; with and without the low-rank
term, bias, dropout) against the float64 reference under the CPU interpreter, with the M thresholds moved so that
each path runs at small ragged shapes (strategy.use_thresholds); and the deterministic mode.

The tolerance rule is DESIGN's (tests/test_kernels.py): kernel error ≤ 2 × plain PyTorch error in the same dtype +
atol, outputs poisoned with NaN.
"""

import pytest
import torch
import triton
import triton.language as tl

import fused_lora as fl
from fused_lora.kernels.nf4_fragment import fragment_k, fragment_rows
from fused_lora.testing import assert_close_to_reference, relative_error

from test_kernels import SCALING, LaunchRecorder, _check_all, _frozen_reference, _make_case, _reference

pytestmark = pytest.mark.usefixtures("interpret_triton")

# Thresholds that send every call of these tests to one path.
PATHS = {
    "decode": {"decode_max_m": 64, "large_min_m": 10**9},
    "middle": {"decode_max_m": 0, "large_min_m": 10**9},
    # a tiny workspace: several slabs in both passes, the last one partial
    "large": {"decode_max_m": 0, "large_min_m": 1, "workspace_bytes": 8 * 1024, "slab_overlap": False},
}
# ... and the forward split over K (launch_gemm.y_splits: 8 SMs under the interpreter, splits of at least one K step)
# on the middle path, where every case below splits, and on the large path's slabs
SPLIT_PATHS = {**PATHS, "split": {**PATHS["middle"], "split_k_min_steps": 1},
               "large-split": {**PATHS["large"], "split_k_min_steps": 1}}


def _calls_path(path, base):
    """The path whose launcher calls EXPECTED_CALLS lists for this call (a dense W has no slab path)."""
    if base == "dense" and path.startswith("large"):
        return "middle" if path == "large" else "split"
    return path


def _modules():
    from fused_lora.kernels import launch_decode, launch_gemm, launch_slab, lora, strategy

    return lora, strategy, launch_decode, launch_gemm, launch_slab


def _spy(monkeypatch, module, name, calls, active=None):
    """Record module.name's calls in ``calls`` (only the outermost ones when ``active`` is a shared depth list)."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        if active is None or not active:
            calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{name}")
        if active is not None:
            active.append(name)
        try:
            return real(*args, **kwargs)
        finally:
            if active is not None:
                active.pop()

    monkeypatch.setattr(module, name, spy)


def _record_paths(monkeypatch, splits=None):
    """The launcher entry points called from lora.py, in order (not the GEMM launches inside the slab path); the
    split-K forwards of the middle path (launch_gemm._launch_y_split) in ``splits``."""
    _, _, launch_decode, launch_gemm, launch_slab = _modules()
    calls, active = [], []
    for module, names in ((launch_decode, ("forward", "dx")), (launch_gemm, ("launch_y", "forward_split", "launch_dx")),
                          (launch_slab, ("launch_y", "launch_dx"))):  # fmt: skip
        for name in names:
            _spy(monkeypatch, module, name, calls, active)
    _spy(monkeypatch, launch_gemm, "_launch_y_split", [] if splits is None else splits)
    return calls


def _check_split(path, splits, weight, x, required=True):
    """The split paths split the forward (the middle path's once, into 2 or more splits, when its rule splits this
    shape, or always with ``required``; an NF4 W's large path at least one of its slabs), and no other path did."""
    from fused_lora.kernels import launch_gemm, strategy

    if path == "large-split" and hasattr(weight, "packed"):
        assert splits and set(splits) == {"launch_gemm._launch_y_split"}, splits
        return
    (M, K), N = x.shape, weight.shape[0]
    with strategy.use_thresholds(**SPLIT_PATHS["split"]):
        plan = launch_gemm.y_splits(M, N, K, weight, x)
    split = path in ("split", "large-split") and plan is not None
    assert split or not required or path not in ("split", "large-split"), "the case does not split"
    assert splits == (["launch_gemm._launch_y_split"] if split else []), (path, splits)
    assert not split or plan.splits >= 2


EXPECTED_CALLS = {
    "decode": ["launch_decode.forward", "launch_decode.dx"],
    "middle": ["launch_gemm.launch_y", "launch_gemm.launch_dx"],
    "split": ["launch_gemm.forward_split", "launch_gemm.launch_dx"],  # the frozen layer's: launch_y splits
    "large": ["launch_slab.launch_y", "launch_slab.launch_dx"],
    "large-split": ["launch_slab.launch_y", "launch_slab.launch_dx"],
}

CASES = [
    # (M, K, N, r, dtype, base, adapter dtype, bias, dropout p, x layout, NF4 blocksize)
    (1, 64, 80, 4, torch.float32, "nf4-dq", torch.float32, True, 0.0, "contiguous", 64),
    (13, 128, 72, 8, torch.float16, "nf4-dq", torch.float32, False, 0.2, "transposed", 32),
    (29, 96, 50, 5, torch.float32, "nf4", torch.float32, True, 0.1, "sliced", 32),
    (17, 64, 40, 16, torch.float16, "dense", torch.float16, True, 0.3, "contiguous", 64),
    (7, 70, 33, 3, torch.float32, "dense", torch.float32, False, 0.0, "3d", 64),
    (5, 128, 40, 100, torch.float32, "nf4", torch.float32, True, 0.2, "contiguous", 32),  # two chunks of 64 ranks
]


def _id(case):
    M, K, N, r, dtype, base, _, bias, p, layout, bs = case
    return f"M{M}-K{K}-N{N}-r{r}-{str(dtype)[-7:]}-{base}-bs{bs}" + ("-bias" if bias else "") + (f"-p{p}" if p else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("path", list(SPLIT_PATHS))
def test_each_path_matches_the_reference(path, case, monkeypatch, poison_empty):
    M, K, N, r, dtype, base, adapter_dtype, bias, p, layout, blocksize = case
    if layout == "3d":
        M = 9
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, adapter_dtype, bias, layout, blocksize, M)
    splits = []
    calls = _record_paths(monkeypatch, splits)
    with strategy.use_thresholds(**SPLIT_PATHS[path]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 123)
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 123, u, True, True, True, b is not None)
    assert calls == EXPECTED_CALLS[_calls_path(path, base)]
    _check_split(path, splits, weight, x.reshape(-1, K))
    m = lora.dropout_mask(123, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, dtype)


FROZEN = [
    (1, 64, 48, torch.float32, "nf4", True, 64),
    (11, 96, 40, torch.float16, "nf4-dq", False, 32),
    (5, 32, 24, torch.float16, "dense", True, 64),
]


@pytest.mark.parametrize("case", FROZEN, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-{str(c[3])[-7:]}-{c[4]}")
@pytest.mark.parametrize("path", list(SPLIT_PATHS))
def test_each_path_of_the_frozen_layer_matches_the_reference(path, case, monkeypatch, poison_empty):
    M, K, N, dtype, base, bias, blocksize = case
    lora, strategy, *_ = _modules()
    x, weight, w_compute, _, _, b, g = _make_case(M, K, N, 4, dtype, base, dtype, bias, "contiguous", blocksize, 3)
    splits = []
    calls = _record_paths(monkeypatch, splits)
    with strategy.use_thresholds(**SPLIT_PATHS[path]):
        y = lora.frozen_forward(x, weight, b)
        dx, db = lora.frozen_backward(g, weight, True, b is not None)
    frozen = {"split": "middle", "large-split": "large"}  # the frozen layer's forward splits inside launch_y
    assert calls == EXPECTED_CALLS[frozen.get(_calls_path(path, base), _calls_path(path, base))]
    _check_split(path, splits, weight, x, required=False)
    ref = _frozen_reference(x, w_compute, b, g, lambda t: t.double())
    plain = _frozen_reference(x, w_compute, b, g, lambda t: t)
    for name, ours, plain_t, ref_t in zip(("y", "dx", "db"), (y, dx, db), plain, ref):
        if ref_t is None:
            assert ours is None
        else:
            assert_close_to_reference(name, ours, plain_t, ref_t, dtype)


def test_decode_path_falls_back_to_the_gemm_when_k_is_not_a_whole_number_of_blocks(monkeypatch, poison_empty):
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(3, 65, 30, 4, torch.float32, "nf4-dq", torch.float32, True,
                                                  "contiguous", 64, 1)
    calls = _record_paths(monkeypatch)
    with strategy.use_thresholds(**PATHS["decode"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.0, 0)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.0, 0, u, True, True, True, True)
    assert calls == EXPECTED_CALLS["middle"]
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, None, torch.float32)


@pytest.mark.parametrize("K, blocksize", [(192, 64), (65, 64)], ids=["pairs-K192", "flat-K65"])
@pytest.mark.parametrize("path", list(SPLIT_PATHS))
def test_each_path_dequantizes_bit_exactly_in_fp32(path, K, blocksize, poison_empty):
    """x = I, g = I: y = deq(W)ᵀ and dx = deq(W) bit for bit on every path (fp32 compute: exact code values)."""
    lora, strategy, *_ = _modules()
    N = 40
    weight = fl.quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(K)), blocksize=blocksize)
    dense = weight.dequantize(torch.float32)
    thresholds = dict(SPLIT_PATHS[path])
    if path == "decode":
        thresholds["decode_max_m"] = 10**9  # decode's own limit (M ≤ 64) sends larger M to the GEMM
    with strategy.use_thresholds(**thresholds):
        for rows in (1, 7):  # one row (decode) and a few rows of the identity
            assert torch.equal(lora.frozen_forward(torch.eye(K)[:rows], weight, None), dense.t()[:rows])
            assert torch.equal(lora.frozen_backward(torch.eye(N)[:rows], weight, True, False)[0], dense[:rows])


def test_large_path_workspace_stays_under_its_cap_and_is_a_buffer_of_each_call(monkeypatch, poison_empty):
    """Every workspace the large path asks for is within its cap, and each call has its own (from the caching
    allocator, which on a GPU hands the same block back: tests/test_kernels_gpu_paths.py): a process-wide cache
    keyed by stream let two host threads on one stream dequantize into each other's slabs."""
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(10, 96, 70, 4, torch.float32, "nf4-dq", torch.float32, True,
                                                  "contiguous", 32, 2)
    cap, sizes, real = 6000, [], strategy.workspace
    monkeypatch.setattr(strategy, "workspace", lambda device, nbytes: sizes.append(nbytes) or real(device, nbytes))
    with strategy.use_thresholds(**{**PATHS["large"], "workspace_bytes": cap}):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.1, 5)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.1, 5, u, True, True, True, True)
    assert sizes and all(0 < n <= cap for n in sizes), sizes
    held = real("cpu", 64)
    assert real("cpu", 64).data_ptr() != held.data_ptr()  # a buffer in use is never handed out again
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, lora.dropout_mask(5, 10, 96, 0.1, "cpu"), torch.float32)


def test_slab_sizes_are_bounded_aligned_and_cover_the_weight():
    from fused_lora.kernels.launch_slab import _slab_size
    from fused_lora.kernels.strategy import Thresholds

    t = Thresholds()
    rows = _slab_size(14336, 4096, 2, t)  # Llama-3-8B up-projection in bf16
    assert rows % 256 == 0 and 2 * rows * 4096 * 2 <= t.workspace_bytes and rows <= -(-14336 // 4)
    assert _slab_size(100, 64, 2, Thresholds(slab_overlap=False)) == 100  # one slab when it fits
    assert _slab_size(10**6, 8192, 2, t) * 8192 * 2 * 2 <= t.workspace_bytes


def test_slab_count_follows_the_cost_of_the_slab_gemms():
    """launch_slab._slab_size on an H200 (132 SMs, M given): the count of least cost in rounds of 128×128 GEMM tiles
    (plus the dequantization left exposed and the launches). k_proj (K=4096, N=1024) at M=2048 takes one slab, not
    four of 32 tiles each; 4096×4096 two (four rounds either way, fewer launches); the up-projection's 14336 rows
    three of 4096 and one of 2048, the most half the workspace holds (14 rounds, against 16 with four of 3584: 448
    tiles, 3.4 rounds each). Every plan is aligned, fits half the workspace and costs no more than the largest
    slabs."""
    from fused_lora.kernels import launch_slab
    from fused_lora.kernels.strategy import Thresholds

    t = Thresholds()
    assert launch_slab._slab_size(1024, 4096, 2, t, 2048, 132) == 1024
    assert launch_slab._slab_size(4096, 4096, 2, t, 2048, 132) == 2048
    assert launch_slab._slab_size(14336, 4096, 2, t, 2048, 132) == 4096
    assert launch_slab._slab_size(14336, 4096, 2, t) == 3584  # without M: four overlapped slabs, as before
    for total, other, M in ((1024, 4096, 8192), (14336, 4096, 512), (5000, 4096, 2048), (70, 96, 16), (513, 64, 999)):
        for ws, overlap in ((8 << 20, True), (64 << 20, True), (8 << 10, False)):
            limits = Thresholds(workspace_bytes=ws, slab_overlap=overlap)
            size = launch_slab._slab_size(total, other, 4, limits, M, 132)
            fit = ws // 2 // (other * 4)
            assert size == total or (size % (256 if size > 256 else 4) == 0 and 4 <= size <= max(4, fit)), size
            cost = launch_slab._slab_cost(total, other, size, M, 132, limits)
            assert cost <= launch_slab._slab_cost(total, other, min(total, max(4, fit - fit % 4)), M, 132, limits)


# (base, K, N, decode_programs_per_sm, programs_per_sm) -> the decode kernels' grids (columns, splits): 8 SMs under
# the interpreter; the NF4 forward has 128×128 tiles and the dense one 32×64, plus u's column; the backward 32×32
DECODE_SPLITS = [
    (("nf4-dq", 1024, 300, 1, 8), [(4, 2), (32, 1)]),  # 3 + 1 columns × 8 K steps; dx 32 tiles × 10 N steps
    (("nf4-dq", 1024, 300, 8, 1), [(4, 8), (32, 1)]),
    (("nf4-dq", 256, 300, 1, 8), [(4, 2), (8, 1)]),  # dx 8 tiles × 10 N steps
    (("nf4-dq", 256, 300, 8, 1), [(4, 2), (8, 5)]),
    (("dense", 512, 96, 1, 8), [(4, 2), (16, 1)]),  # a dense W: 3 + 1 columns × 8 K steps; dx 16 tiles × 3 N steps
    (("dense", 512, 96, 8, 1), [(4, 8), (16, 2)]),
]


@pytest.mark.parametrize("case, expected", DECODE_SPLITS, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple)
                         else None)  # fmt: skip
def test_decode_launches_follow_decode_programs_per_sm(case, expected, monkeypatch, poison_empty):
    """The decode kernels take their split count from decode_programs_per_sm, not programs_per_sm, over an NF4 W
    and a dense one, and the numbers stay right at every count."""
    from fused_lora.kernels import lora_decode

    base, K, N, per_sm, other = case
    lora, strategy, *_ = _modules()
    M, r, dtype = 3, 4, torch.float32
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, torch.float32, True, "contiguous", 64, 5)
    grids = []
    for name in ("lora_decode_fwd_kernel", "lora_decode_dx_kernel"):
        monkeypatch.setattr(lora_decode, name, LaunchRecorder(getattr(lora_decode, name),
                                                              lambda grid, kwargs: grids.append(tuple(grid))))
    with strategy.use_thresholds(**PATHS["decode"], decode_programs_per_sm=per_sm, programs_per_sm=other):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.0, 7)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.0, 7, u, True, True, True, True)
    assert grids == expected, grids
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, None, dtype)


# ---------------------------------------------------------------- split low-rank dots (bf16 x on a GPU)

SPLIT_CASES = [
    # (M, K, N, r, dtype, base, adapter dtype, bias, dropout p, x layout, NF4 blocksize)
    (13, 128, 72, 8, torch.float16, "nf4-dq", torch.float32, False, 0.2, "transposed", 32),
    (17, 64, 40, 16, torch.float16, "dense", torch.float16, True, 0.3, "contiguous", 64),
    (29, 96, 50, 20, torch.float16, "nf4", torch.float32, True, 0.0, "sliced", 32),  # r_pad 32: padded rank rows
    (5, 128, 40, 100, torch.float16, "nf4", torch.float32, False, 0.1, "contiguous", 32),  # two programs along r
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=_id)
@pytest.mark.parametrize("path", ["middle", "large"])
def test_split_lowrank_dots_match_the_reference(path, case, monkeypatch, poison_empty):
    """The u and v/dB kernels' split dots (lora_fwd.split_wide: 16-bit x or g times the hi and lo parts of the fp32
    operand, bf16 on a GPU) run here with fp16 added to common.SPLIT_DTYPES: every output and gradient within the
    tolerance rule, and the split taken by both kernels (lowrank_split answered True for u and for v/dB)."""
    from fused_lora.kernels import common

    M, K, N, r, dtype, base, adapter_dtype, bias, p, layout, blocksize = case
    lora, strategy, *_ = _modules()
    monkeypatch.setattr(common, "SPLIT_DTYPES", (torch.bfloat16, torch.float16))
    answers = []
    real = common.lowrank_split
    monkeypatch.setattr(common, "lowrank_split", lambda *t: answers.append(real(*t)) or answers[-1])
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, adapter_dtype, bias, layout, blocksize, M)
    with strategy.use_thresholds(**PATHS[path]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 77)
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 77, u, True, True, True, b is not None)
    assert answers == [True, True]
    m = lora.dropout_mask(77, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, dtype)
    # finer than the rule: the fp32 results keep the lo parts (measured 2e-7; hi alone, like tf32, gives 2-3e-4)
    ref = _reference(x, w_compute, A, B, b, g, None if m is None else m.double())
    for name, ours, expected in (("u", u, ref[1]), ("dB", grads[2], ref[4])):
        if ours.dtype == torch.float32:
            assert relative_error(ours, expected) < 1e-5, name


@pytest.mark.parametrize("case", SPLIT_CASES[:2] + SPLIT_CASES[3:], ids=_id)
def test_vdb_pass_with_b_split_in_memory(case, monkeypatch, poison_empty):
    """The v/dB pass as it runs on sm_90 with row tiles of 64 or more (launch_gemm._vdb_wgmma, forced here): B split
    once by the zeroing launch (zero_fp32_kernel BLOCK_SPLIT) and read by the pass from memory (B_SPLIT); v, dB and
    every other gradient within the tolerance rule, fp16 standing in for bf16 as above."""
    from fused_lora.kernels import common, launch_gemm, lora_bwd

    M, K, N, r, dtype, base, adapter_dtype, bias, p, layout, blocksize = case
    lora, strategy, *_ = _modules()
    monkeypatch.setattr(common, "SPLIT_DTYPES", (torch.bfloat16, torch.float16))
    monkeypatch.setattr(launch_gemm, "_vdb_wgmma", lambda block_m, device: True)
    seen = []
    monkeypatch.setattr(lora_bwd, "zero_fp32_kernel", LaunchRecorder(
        lora_bwd.zero_fp32_kernel, lambda grid, kwargs: seen.append(("zero", kwargs.get("BLOCK_SPLIT", 0)))))
    monkeypatch.setattr(lora_bwd, "lora_vdb_kernel", LaunchRecorder(
        lora_bwd.lora_vdb_kernel, lambda grid, kwargs: seen.append(("vdb", kwargs["B_SPLIT"]))))
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, adapter_dtype, bias, layout, blocksize, M)
    with strategy.use_thresholds(**PATHS["middle"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 77)
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 77, u, True, True, True, b is not None)
    assert seen == [("zero", 16), ("vdb", True)], seen  # B split by the zeroing launch, read split by the pass
    m = lora.dropout_mask(77, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, dtype)
    ref = _reference(x, w_compute, A, B, b, g, None if m is None else m.double())
    if grads[2].dtype == torch.float32:  # dB keeps the lo parts here too
        assert relative_error(grads[2], ref[4]) < 1e-5


@pytest.mark.parametrize("r, b_dtype, need_dB", [(1, "fp32", True), (3, "fp32", False), (17, "fp16", True),
                                                (64, "fp32", True)])
def test_vdb_pass_with_b_split_keeps_the_lo_parts(r, b_dtype, need_dB, monkeypatch):
    """launch_vdb with B read split from memory (forced as above; fp16 for bf16): v = g·B and dB = s·gᵀ·u within
    1e-5 of float64 (the hi parts alone give about 1e-3), a strided B, an fp16 B, the dA accumulator zeroed too."""
    from fused_lora.kernels import common, launch_gemm

    monkeypatch.setattr(common, "SPLIT_DTYPES", (torch.bfloat16, torch.float16))
    monkeypatch.setattr(launch_gemm, "_vdb_wgmma", lambda block_m, device: True)
    gen = torch.Generator().manual_seed(r)
    M, N = 37, 101
    g = torch.randn(M, N, generator=gen).to(torch.float16)
    B = torch.randn(r + 3, N, generator=gen)[1 : r + 1].t()  # (N, r), strided
    B = B.to(torch.float16) if b_dtype == "fp16" else B
    u = torch.randn(M, r, generator=gen) if need_dB else None
    assert launch_gemm._vdb_plan(g, B, u, True).b_split
    v, dB, db, zeros = launch_gemm.launch_vdb(g, common.precisions(g, B), True, need_dB, True, B=B, u=u, scaling=2.0,
                                              also_zero=(5, 7))  # fmt: skip
    assert relative_error(v, g.double() @ B.double()) < 1e-5
    if need_dB:
        assert relative_error(dB, 2.0 * g.double().t() @ u.double()) < 1e-5
    else:
        assert dB is None
    torch.testing.assert_close(db.double(), g.double().sum(0), rtol=1e-5, atol=1e-3)
    assert bool((zeros == 0).all())


def test_the_zeroing_launch_splits_b():
    """zeroed_fp32's ``split``: dst column 2c = fp16(w), 2c + 1 = fp16(w − hi) for any strides of w and a ragged N
    over several programs, in the same launch that zeroes the accumulators (even a split with nothing to zero)."""
    from fused_lora.kernels import launch_gemm

    wide = torch.randn(37, 41, generator=torch.Generator().manual_seed(1))[:, 1:36:5]  # (37, 7), strided
    N, r = wide.shape
    out = torch.full((N, 2 * r), float("nan"), dtype=torch.float16)
    zeros = launch_gemm.zeroed_fp32("cpu", (5,), split=(wide, out, 16))
    hi = wide.to(torch.float16)
    lo = (wide - hi.float()).to(torch.float16)
    assert torch.equal(out[:, 0::2], hi) and torch.equal(out[:, 1::2], lo) and bool((zeros[0] == 0).all())
    out.fill_(float("nan"))
    assert launch_gemm.zeroed_fp32("cpu", split=(wide, out, 16)) == [] and torch.equal(out[:, 1::2], lo)


def test_split_wide_keeps_sixteen_bits_of_the_wide_operand():
    """hi + lo of split_wide, in bf16, is within 2^-16 of the fp32 value (tf32 keeps 2^-11), checked on the CPU by
    the same two roundings the kernel does."""
    wide = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4096)
    hi = wide.to(torch.bfloat16)
    lo = (wide - hi.float()).to(torch.bfloat16)
    assert ((hi.float() + lo.float() - wide).abs() <= wide.abs() * 2.0**-16).all()


# ---------------------------------------------------------------- deterministic mode


@pytest.mark.parametrize("path", ["middle", "split", "large", "decode"])
def test_deterministic_mode_uses_no_atomic_kernel_and_matches_the_reference(path, monkeypatch, poison_empty):
    lora, strategy, launch_decode, launch_gemm, launch_slab = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(21, 64, 48, 8, torch.float32, "nf4-dq", torch.float32, True,
                                                  "contiguous", 64, 8)
    atomic, splits = [], []
    _spy(monkeypatch, launch_gemm, "_launch_vdb_atomic", atomic)
    _spy(monkeypatch, launch_gemm, "_launch_y_split", splits)
    dx_launches = []
    real_dx = launch_gemm.launch_dx

    def dx_spy(*args, **kwargs):
        dx_launches.append(kwargs.get("dA32"))
        return real_dx(*args, **kwargs)

    monkeypatch.setattr(launch_gemm, "launch_dx", dx_spy)
    with strategy.use_thresholds(**SPLIT_PATHS[path]), strategy.use_deterministic(True):
        y, u = lora.forward(x, weight, A, B, SCALING, b, 0.2, 9)
        grads = lora.backward(g, x, weight, A, B, SCALING, 0.2, 9, u, True, True, True, True)
    assert atomic == [] and all(dA is None for dA in dx_launches) and bool(splits) == (path == "split")
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, lora.dropout_mask(9, 21, 64, 0.2, "cpu"), torch.float32)


def test_deterministic_mode_follows_torch_and_the_environment(monkeypatch):
    _, strategy, *_ = _modules()
    monkeypatch.delenv("FUSED_LORA_DETERMINISTIC", raising=False)
    assert not strategy.deterministic()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert strategy.deterministic()
        with strategy.use_deterministic(False):
            assert not strategy.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv("FUSED_LORA_DETERMINISTIC", "1")
    assert strategy.deterministic()


def test_default_mode_accumulates_with_relaxed_atomics_only():
    """Every tl.atomic_add in the kernel sources asks for sem="relaxed" (no acq_rel fence)."""
    import inspect

    from fused_lora.kernels import lora_bwd

    source = inspect.getsource(lora_bwd)
    calls = source.count("tl.atomic_add(")
    assert calls == 4 and source.count('sem="relaxed"') == calls


def test_split_u_matches_and_is_reproducible(poison_empty):
    """u = (m⊙x)·Aᵀ split over K in several programs, summed in a fixed order."""
    _, _, _, launch_gemm, _ = _modules()
    from fused_lora.kernels.common import precisions

    x, _, _, A, _, _, _ = _make_case(9, 300, 8, 6, torch.float32, "dense", torch.float32, False, "contiguous", 64, 4)
    u = launch_gemm.compute_u(x, A, 0.0, 0, precisions(x, A))
    assert relative_error(u, x.double() @ A.double().t()) < 1e-6
    assert torch.equal(u, launch_gemm.compute_u(x, A, 0.0, 0, precisions(x, A)))


FRAGMENT_CASES = [
    # (M, K, N, r, dtype, base, NF4 blocksize, bias, dropout p, code table): K % 128 == 0 takes the fragment order
    (1, 128, 200, 4, torch.float32, "nf4-dq", 64, True, 0.0, "nf4"),  # N not a multiple of the 128-row tile
    (16, 384, 130, 8, torch.float16, "nf4", 32, False, 0.2, "nf4"),  # three splits of K, 4 scales per tile row
    (5, 256, 64, 16, torch.float32, "nf4", 128, True, 0.1, "nf4"),
    (3, 256, 96, 4, torch.float16, "nf4-dq", 256, False, 0.0, "nf4"),  # one scale across two tiles
    (9, 128, 40, 4, torch.float32, "nf4", 64, True, 0.0, "halved"),  # a table of its own: LOOKUP "gather"
    # BLOCK_M 32 and 64 (the decode path's default up to M = 64 on sm_90): ragged rows in the taller tiles
    (27, 256, 136, 4, torch.float16, "nf4-dq", 64, True, 0.1, "nf4"),
    (17, 128, 64, 8, torch.float32, "nf4", 32, False, 0.0, "halved"),
    (40, 128, 72, 4, torch.float32, "nf4", 64, True, 0.2, "nf4"),
]


@pytest.mark.parametrize("case", FRAGMENT_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-bs{c[6]}-{c[9]}")
def test_decode_forward_in_fragment_order_matches_the_reference(case, monkeypatch, poison_empty):
    """The decode forward with NF4 tiles in the wgmma fragment order (nf4_fragment.py: k permuted for W and x alike,
    the rows of W permuted on the store): y and u against float64, and the launch took that order."""
    from fused_lora.kernels import lora_decode

    M, K, N, r, dtype, base, blocksize, bias, p, code = case
    lora, strategy, *_ = _modules()
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, torch.float32, bias, "contiguous",
                                                  blocksize, M)  # fmt: skip
    if code == "halved":
        weight.code.mul_(0.5)
        w_compute = weight.dequantize(dtype)
    launched = []
    monkeypatch.setattr(lora_decode, "lora_decode_fwd_kernel", LaunchRecorder(
        lora_decode.lora_decode_fwd_kernel, lambda grid, kwargs: launched.append(kwargs["FRAGMENT"])))
    with strategy.use_thresholds(**PATHS["decode"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 7)
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 7, u, True, True, True, b is not None)
    assert launched == [True]
    m = lora.dropout_mask(7, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, dtype)


def test_fragment_order_maps_rows_and_columns_one_to_one():
    """fragment_rows and fragment_k (nf4_fragment.py), run by the interpreter: permutations of the tile's rows and
    columns, with the columns in pairs of consecutive ones (what the 4-byte loads of x rely on)."""
    for block_n in (64, 128):
        rows, cols = torch.empty(block_n, dtype=torch.int32), torch.empty(128, dtype=torch.int32)
        _store_fragment_order[(1,)](rows, cols, BLOCK_N=block_n)
        assert sorted(rows.tolist()) == list(range(block_n))
        assert sorted(cols.tolist()) == list(range(128))
        assert torch.equal(cols[1::2], cols[0::2] + 1) and bool((cols[0::2] % 2 == 0).all())


def test_backward_accumulators_are_zeroed_by_one_launch(monkeypatch, poison_empty):
    """launch_gemm.zeroed_fp32: every tensor zero (torch.empty poisoned with NaN), separate storages (a custom op may
    not return aliases), None kept, sizes past one block, and one kernel launch for all of them."""
    from fused_lora.kernels import launch_gemm, lora_bwd

    launches = []
    monkeypatch.setattr(lora_bwd, "zero_fp32_kernel",
                        LaunchRecorder(lora_bwd.zero_fp32_kernel, lambda grid, kwargs: launches.append(grid)))
    tensors = launch_gemm.zeroed_fp32("cpu", (3000,), None, (17, 5), (1,))
    assert launches == [(3,)] and tensors[1] is None
    assert [tuple(t.shape) for t in tensors if t is not None] == [(3000,), (17, 5), (1,)]
    assert all(bool((t == 0).all()) for t in tensors if t is not None)
    assert len({t.untyped_storage().data_ptr() for t in tensors if t is not None}) == 3


@triton.jit
def _store_fragment_order(rows_ptr, cols_ptr, BLOCK_N: tl.constexpr):
    tl.store(rows_ptr + tl.arange(0, BLOCK_N), fragment_rows(BLOCK_N))
    tl.store(cols_ptr + tl.arange(0, 128), fragment_k())
