"""fused_lora.codec (bitsandbytes' 8-bit blockwise codec) against bitsandbytes itself on the CPU: the dynamic maps,
quantize_blockwise / dequantize_blockwise for signed and unsigned maps, ragged sizes, several blocksizes, zero
blocks, values on the LUT's cell boundaries, and every t = (u + 1) / 2 the quantizer can form (the index rule of the
codec's docstring). NF4 double quantization and the 8-bit optimizer state use this one codec; their bit-exactness
against bitsandbytes is tested in test_nf4.py and test_optim_adamw.py."""

import pytest
import torch

from fused_lora import codec, nf4
from fused_lora import optim as fo

SIGNED = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])


@pytest.fixture
def F():
    return pytest.importorskip("bitsandbytes").functional


def _bnb_quantize(F, x, code, blocksize):
    q, state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    return q, state.absmax


def _assert_codes_equal(q, q_ref):
    assert q.dtype == torch.uint8 and q.shape == q_ref.shape
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} of {q.numel()} codes differ"


def test_nf4_and_the_optimizers_use_this_codec():
    assert nf4.dynamic_code().equal(codec.dynamic_map(signed=True))
    for name in ("dynamic_map", "quantization_lut", "quantize_blockwise", "dequantize_blockwise"):
        assert getattr(fo, name) is getattr(codec, name), name


@SIGNED
def test_dynamic_maps_match_bitsandbytes(F, signed):
    assert torch.equal(codec.dynamic_map(signed), F.create_dynamic_map(signed=signed))
    assert codec.dynamic_map(signed).dtype == torch.float32


@SIGNED
@pytest.mark.parametrize("n", [1, 37, 255, 256, 257, 1000, 4773, 600 * 256 + 77])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_and_dequantize_match_bitsandbytes(F, signed, n, blocksize):
    gen = torch.Generator().manual_seed(n + blocksize)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4  # heavy-tailed: absmax varies per block
    x = x if signed else x * x
    if n >= 3 * blocksize:
        x[blocksize : 2 * blocksize] = 0.0  # an all-zero block
    code = codec.dynamic_map(signed)
    q_ref, absmax_ref = _bnb_quantize(F, x, code, blocksize)
    q, absmax = codec.quantize_blockwise(x, code, blocksize=blocksize)
    assert absmax.dtype == torch.float32 and torch.equal(absmax, absmax_ref)
    _assert_codes_equal(q, q_ref)
    back = codec.dequantize_blockwise(q, absmax, code, blocksize=blocksize)
    assert torch.equal(back, F.dequantize_blockwise(q_ref, absmax=absmax_ref, code=code, blocksize=blocksize))


@SIGNED
def test_shape_is_kept_and_a_given_lut_is_the_one_built(F, signed):
    x = torch.randn(7, 3, 41, generator=torch.Generator().manual_seed(3))
    code = codec.dynamic_map(signed)
    q, absmax = codec.quantize_blockwise(x, code, codec.dynamic_lut(signed))
    assert q.shape == x.shape and absmax.shape == (4,)
    assert torch.equal(codec.dynamic_lut(signed), codec.quantization_lut(code))
    _assert_codes_equal(q, _bnb_quantize(F, x, code, 256)[0])
    assert codec.dequantize_blockwise(q, absmax, code).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_input_is_widened_like_bitsandbytes(F, dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5)).to(dtype)
    code = codec.dynamic_map(True)
    q_ref, absmax_ref = _bnb_quantize(F, x, code, 256)
    q, absmax = codec.quantize_blockwise(x, code)
    assert torch.equal(absmax, absmax_ref.float())
    _assert_codes_equal(q, q_ref)


def _with_unit_absmax(values: torch.Tensor) -> torch.Tensor:
    """Blocks of 256 whose first element is 1.0, so each block's absmax is 1 and u is the value itself."""
    per = 255
    n_blocks = -(-values.numel() // per)
    body = torch.nn.functional.pad(values, (0, n_blocks * per - values.numel())).view(n_blocks, per)
    return torch.cat([torch.ones(n_blocks, 1), body], dim=1).reshape(-1)


@SIGNED
def test_values_on_the_lut_cell_boundaries_match_bitsandbytes(F, signed):
    """Every LUT grid point u_i, every u whose t·65535 + 0.5 is a whole number, every code and code midpoint, and
    the fp32 neighbours of each: the values where a different rounding would change the code."""
    code = codec.dynamic_map(signed)
    i = torch.arange(codec.LUT_SIZE, dtype=torch.float32)
    grid = (i + i) / 65535.0 - 1.0
    k = torch.arange(codec.LUT_SIZE + 1, dtype=torch.float64)
    integer_points = ((k - 0.5) / 65535.0 * 2 - 1).float()
    midpoints = (code[:-1] + code[1:]) * 0.5
    values = torch.cat([grid, integer_points, midpoints, code])
    up, down = torch.nextafter(values, torch.tensor(2.0)), torch.nextafter(values, torch.tensor(-2.0))
    values = torch.cat([values, up, down])
    values = values.clamp(-1, 1)
    x = _with_unit_absmax(values if signed else values.abs())
    q_ref, absmax_ref = _bnb_quantize(F, x, code, 256)
    q, absmax = codec.quantize_blockwise(x, code)
    assert torch.equal(absmax, absmax_ref)
    _assert_codes_equal(q, q_ref)


def test_a_grid_point_exactly_on_a_midpoint_takes_the_lower_code_like_bitsandbytes(F):
    """No LUT grid point falls on a midpoint of the dynamic maps, so a made-up map places one there."""
    i = 40000
    g = ((torch.tensor(float(i)) * 2) / 65535.0 - 1.0).item()  # the fp32 grid point u_i
    code = torch.linspace(-1, 1, 256, dtype=torch.float32)
    j = int(torch.searchsorted(code, torch.tensor(g))) - 1
    code[j], code[j + 1] = g - 2.0**-12, g + 2.0**-12
    assert ((code[j] + code[j + 1]) * 0.5).item() == g and bool((code[1:] > code[:-1]).all())
    x = _with_unit_absmax(torch.tensor([g]))
    q, _ = codec.quantize_blockwise(x, code)
    assert codec.quantization_lut(code)[i] == j and q[1] == j
    _assert_codes_equal(q, _bnb_quantize(F, x, code, 256)[0])


@pytest.fixture(scope="module")
def every_reachable_u() -> torch.Tensor:
    """u = v - 1 for every fp32 v = fl(u + 1) the quantizer can form: the fp32 multiples of 2^-24 in [0, 2] (each
    such u is exact in fp32 and u + 1 gives v back). t = v / 2 then takes each of its 25,165,825 possible values."""
    k = torch.arange(2**25 + 1, dtype=torch.float64) * 2.0**-24
    v = k.float()
    v = v[v.double() == k]
    u = v - 1.0
    assert torch.equal(u + 1.0, v) and v.numel() == 25_165_825
    return u


@pytest.mark.slow
def test_index_rule_fp32_product_and_sum_equal_one_rounding_for_every_reachable_t(every_reachable_u):
    """bitsandbytes rounds t·65535 + 0.5 once (an fma); the codec rounds the product and then the sum. For every t
    the quantizer can form the truncated index is the same (float64 holds t·65535 + 0.5 exactly: t has at most 25
    significant bits)."""
    t = (every_reachable_u + 1.0) * 0.5
    two_roundings = (t * 65535.0 + 0.5).long()
    one_rounding = (t.double() * 65535.0 + 0.5).float().long()
    assert torch.equal(two_roundings, one_rounding)


@pytest.mark.slow
@SIGNED
def test_every_reachable_t_quantizes_like_bitsandbytes(F, every_reachable_u, signed):
    x = _with_unit_absmax(every_reachable_u)
    code = codec.dynamic_map(signed)
    q_ref, absmax_ref = _bnb_quantize(F, x, code, 256)
    q, absmax = codec.quantize_blockwise(x, code, codec.dynamic_lut(signed))
    assert torch.equal(absmax, absmax_ref)
    _assert_codes_equal(q, q_ref)


def test_bad_blocksize_is_a_clear_error():
    with pytest.raises(ValueError, match="quantize_blockwise: blocksize must be a positive int, got 0"):
        codec.quantize_blockwise(torch.ones(3), codec.dynamic_map(), blocksize=0)
    with pytest.raises(ValueError, match="dequantize_blockwise: blocksize must be a positive int"):
        codec.dequantize_blockwise(torch.zeros(3, dtype=torch.uint8), torch.ones(1), codec.dynamic_map(), 2.0)


def _extreme_blocks() -> torch.Tensor:
    """Blocks of 256 that reach every extreme branch of bitsandbytes' quantizer: a subnormal absmax (inf
    reciprocal; positive, negative and zero elements), a normal but tiny absmax, an inf element (reciprocal 0), a
    NaN element (left out of the absmax), a block of NaN only, and an ordinary block."""
    gen = torch.Generator().manual_seed(5)
    subnormal = torch.randn(256, generator=gen) * 1e-40
    subnormal[::7] = 0.0
    tiny = torch.randn(256, generator=gen) * 1e-37
    with_inf = torch.randn(256, generator=gen)
    with_inf[[3, 100]] = torch.tensor([float("inf"), -float("inf")])
    with_nan = torch.randn(256, generator=gen)
    with_nan[[0, 17]] = float("nan")
    all_nan = torch.full((256,), float("nan"))
    return torch.cat([subnormal, tiny, with_inf, with_nan, all_nan, torch.randn(100, generator=gen)])


@SIGNED
def test_extreme_values_quantize_like_bitsandbytes_without_raising(F, signed):
    """Subnormal absmax (its reciprocal is inf), inf and NaN elements: the codes and absmax of bitsandbytes' CPU
    quantizer; before, the NaN of 0 · inf became index -2^63 and raised an IndexError (NF4 double quantization of
    subnormal-range weights, an 8-bit optimizer step with a NaN gradient)."""
    x = _extreme_blocks()
    code = codec.dynamic_map(signed)
    q_ref, absmax_ref = _bnb_quantize(F, x, code, 256)
    q, absmax = codec.quantize_blockwise(x, code, codec.dynamic_lut(signed))
    assert torch.equal(absmax.nan_to_num(), absmax_ref.nan_to_num()) and not absmax.isnan().any()
    _assert_codes_equal(q, q_ref)
