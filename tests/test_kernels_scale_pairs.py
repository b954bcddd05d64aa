"""The decode forward's block scales as pairs in the compute dtype (common.scale_pairs, SCALE_PAIRS of
lora_decode_fwd_kernel): the cached tensor's layout and lifetime, where the launcher takes it, and the kernel under the
CPU interpreter against the float64 reference (forced there: the interpreter's exact lookups keep the fp32 scales)."""

import pytest
import torch

import fused_lora as fl
from test_kernels import SCALING, LaunchRecorder, _check_all, _make_case
from test_kernels_paths import PATHS

pytestmark = pytest.mark.usefixtures("interpret_triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_scale_pairs_hold_blocks_2j_and_2j_plus_1_in_the_compute_dtype(dtype, double_quant):
    from fused_lora.kernels import common

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(48, 256), blocksize=64, double_quant=double_quant)
    pairs = common.scale_pairs(w, dtype)
    assert pairs.dtype == torch.int32 and pairs.shape == (w.absmax.numel() // 2,) and pairs.is_contiguous()
    halves = common.decoded_scales(w).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(pairs & 0xFFFF, halves[0::2]) and torch.equal((pairs >> 16) & 0xFFFF, halves[1::2])


def test_scale_pairs_refuse_what_they_cannot_hold():
    from fused_lora.kernels import common

    w = fl.quantize_nf4(torch.randn(3, 64), blocksize=64)  # 3 blocks
    with pytest.raises(ValueError, match="odd number of NF4 blocks"):
        common.scale_pairs(w, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        common.scale_pairs(fl.quantize_nf4(torch.randn(4, 64), blocksize=64), torch.float32)


def test_scale_pairs_are_cached_per_dtype_and_rebuilt_after_a_change():
    from fused_lora.kernels import common

    torch.manual_seed(0)
    w = fl.quantize_nf4(torch.randn(16, 128), blocksize=64, double_quant=True)
    first = common.scale_pairs(w, torch.bfloat16)
    half = common.scale_pairs(w, torch.float16)
    assert not torch.equal(half, first)  # the same scales, other bits
    # one cache per dtype: alternating dtypes rebuilds nothing
    assert common.scale_pairs(w, torch.bfloat16) is first and common.scale_pairs(w, torch.float16) is half
    with torch.no_grad():
        w.nested_absmax.mul_(2)  # every scale changes (offset aside)
    changed = common.scale_pairs(w, torch.bfloat16)
    assert torch.equal(changed, common.decoded_scales(w).to(torch.bfloat16).view(torch.int32))
    assert not torch.equal(changed, first)


@pytest.mark.parametrize("lookup, blocksize, K, block_m, expected", [
    ("prmt", 64, 256, 16, True), ("lds", 32, 384, 16, True), ("lds", 64, 256, 16, True), ("prmt", 64, 256, 64, True),
    ("prmt", 32, 256, 32, True), ("prmt", 32, 256, 64, False),  # blocks of 32 at BLOCK_M 64: the pairs spill
    ("prmt", 128, 256, 16, False),  # one block per tile row: no pair in a tile
    ("prmt", 64, 192, 16, False),  # not the fragment order (K % 128)
    ("tree", 64, 256, 16, False), ("gather", 64, 256, 16, False),  # exact lookups keep the exact fp32 scales
])  # fmt: skip
def test_scale_pairs_are_taken_where_the_lookup_rounds_the_scale_anyway(lookup, blocksize, K, block_m, expected):
    from fused_lora.kernels import launch_decode

    w = fl.quantize_nf4(torch.randn(8, K), blocksize=blocksize)
    assert launch_decode.scale_pairs_taken(w, K, lookup, block_m) is expected
    assert not launch_decode.scale_pairs_taken(torch.randn(8, K), K, "prmt", 16)  # a dense W has no scales


def test_scale_pairs_are_not_taken_for_inference_tensors():
    """Nothing can be cached on inference tensors: the pairs would be rebuilt at every call (more bytes than they
    save), so such a weight keeps the fp32 scales (absmax itself without double quantization)."""
    from fused_lora.kernels import launch_decode

    with torch.inference_mode():
        w = fl.quantize_nf4(torch.randn(8, 256), blocksize=64)
    assert not launch_decode.scale_pairs_taken(w, 256, "prmt", 16)


PAIR_CASES = [
    # (M, K, N, r, base, NF4 blocksize, bias, dropout p)
    (1, 128, 200, 4, "nf4-dq", 64, True, 0.0),  # N not a multiple of the 128-row tile
    (16, 384, 130, 8, "nf4", 32, False, 0.2),  # three splits of K, two words of pairs per tile row
    (5, 256, 96, 16, "nf4-dq", 64, True, 0.1),
    (40, 256, 70, 4, "nf4-dq", 64, False, 0.0),  # BLOCK_M 64
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-bs{c[5]}")
def test_decode_forward_with_scale_pairs_matches_the_reference(case, monkeypatch, poison_empty):
    """The decode forward reading fp16 scale pairs (taken here whatever the lookup) meets the tolerance rule for
    every output and gradient, and builds no fp32 scales for it."""
    from fused_lora.kernels import common, launch_decode, lora, lora_decode, strategy

    M, K, N, r, base, blocksize, bias, p = case
    dtype = torch.float16  # the interpreter computes bf16 on raw bit patterns: bf16 runs in the GPU tests
    x, weight, w_compute, A, B, b, g = _make_case(M, K, N, r, dtype, base, torch.float32, bias, "contiguous",
                                                  blocksize, M)  # fmt: skip
    real_taken = launch_decode.scale_pairs_taken
    monkeypatch.setattr(launch_decode, "scale_pairs_taken", lambda w, k, lookup, bm: real_taken(w, k, "prmt", bm))
    launched, fp32_scales = [], []
    monkeypatch.setattr(lora_decode, "lora_decode_fwd_kernel", LaunchRecorder(
        lora_decode.lora_decode_fwd_kernel, lambda grid, kwargs: launched.append(kwargs["SCALE_PAIRS"])))
    real_scales = common.decoded_scales
    monkeypatch.setattr(common, "decoded_scales", lambda w: fp32_scales.append(1) or real_scales(w))
    with strategy.use_thresholds(**PATHS["decode"]):
        y, u = lora.forward(x, weight, A, B, SCALING, b, p, 7)
        assert launched == [True] and not fp32_scales
        grads = lora.backward(g, x, weight, A, B, SCALING, p, 7, u, True, True, True, b is not None)
    m = lora.dropout_mask(7, M, K, p, "cpu") if p > 0 else None
    _check_all((y, u) + grads, x, w_compute, A, B, b, g, m, dtype)
