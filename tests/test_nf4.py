"""NF4: byte-exact against bitsandbytes on the CPU (packed bytes, absmax, double quant, dequantized values),
for the PyTorch twin and the Triton kernels (under TRITON_INTERPRET=1 here), plus bitsandbytes interop."""

import io
import json

import pytest
import torch

import fused_lora as fl
from fused_lora import bnb_compat as fused_lora_bnb_compat
from fused_lora import codec, nf4

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ragged on purpose: odd element counts, counts that no blocksize divides, a single element, 1-D and 3-D, and rows
# that are not whole blocks.
# (5, 160): 160 columns are not whole blocks of 64 (bitsandbytes' AVX-512 CPU dequantizer gets it wrong, see
# test_bnb_cpu_dequantize_is_wrong_exactly_where_the_rule_says).
SHAPES = ((37, 129), (129,), (200, 37), (1,), (3, 5, 7), (5, 160))


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _random_weight(shape, dtype, seed):
    """Fresh normal weights with a different scale per row, so the per-block absmax values spread out."""
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    scale = torch.rand(rows, *([1] * (len(shape) - 1)), generator=gen) * 3 + 0.01
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _bnb_quantize(w, blocksize, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _bnb_dequantize(packed, state, dtype, shape):
    """bitsandbytes' dequantize_4bit in ``dtype``; its 1-D results come back as [1, n], so reshape. Where its CPU
    kernel is known to be wrong (``bnb_cpu_dequantize_is_wrong``: AVX-512 CPUs, rows not made of whole blocks) the
    test says so and stops there instead of failing."""
    if packed.device.type == "cpu" and nf4.bnb_cpu_dequantize_is_wrong(shape, state.blocksize):
        pytest.xfail(f"bitsandbytes' CPU dequantization is wrong for this shape ({tuple(shape)}, blocksize "
                     f"{state.blocksize}); our values are the right ones")
    original = state.dtype
    state.dtype = dtype
    try:
        return F.dequantize_4bit(packed, state).reshape(shape)
    finally:
        state.dtype = original


def _assert_same_format(ours: fl.NF4Weight, packed, state):
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape
    assert torch.equal(ours.packed, packed), f"{(ours.packed != packed).sum().item()} packed bytes differ"
    assert ours.absmax.dtype == state.absmax.dtype
    assert torch.equal(ours.absmax, state.absmax), "absmax differs"
    assert torch.equal(ours.code, state.code)
    assert ours.double_quant == state.nested
    if state.nested:
        assert torch.equal(ours.offset, state.offset), f"offset {ours.offset} vs {state.offset}"
        assert torch.equal(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.nested_blocksize == state.state2.blocksize == 256


def _cases():
    """Every blocksize bitsandbytes accepts, each input dtype, with and without double quant, ragged shapes."""
    for i, blocksize in enumerate(BLOCKSIZES):
        for j, dtype in enumerate(DTYPES):
            shape = SHAPES[(i + j) % len(SHAPES)]
            for dq in (False, True):
                case_id = f"{'x'.join(map(str, shape))}-bs{blocksize}-{_name(dtype)}-{'dq' if dq else 'plain'}"
                yield pytest.param(shape, blocksize, dtype, dq, id=case_id)


CASES = list(_cases())


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape,blocksize,dtype,double_quant", CASES)
def test_reference_matches_bitsandbytes(shape, blocksize, dtype, double_quant):
    w = _random_weight(shape, dtype, seed=blocksize + len(shape))
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    ours = fl.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, backend="reference")
    _assert_same_format(ours, packed, state)
    assert ours.shape == w.shape and ours.dtype == dtype and ours.blocksize == blocksize
    out = ours.dequantize(backend="reference")
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out, _bnb_dequantize(packed, state, dtype, w.shape))


@pytest.mark.parametrize("shape,blocksize,dtype,double_quant", CASES)
def test_triton_matches_bitsandbytes(interpret_triton, poison_empty, shape, blocksize, dtype, double_quant):
    w = _random_weight(shape, dtype, seed=blocksize + len(shape) + 1)
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    ours = fl.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, backend="triton")
    _assert_same_format(ours, packed, state)
    # The interpreter cannot round float32 to bfloat16 (it truncates); bfloat16 output is checked on the GPU.
    for out_dtype in (torch.float32, torch.float16):
        out = ours.dequantize(out_dtype, backend="triton")
        assert out.shape == w.shape and out.dtype == out_dtype
        assert torch.equal(out, _bnb_dequantize(packed, state, out_dtype, w.shape)), _name(out_dtype)


@pytest.mark.parametrize("out_dtype", OUT := (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                         ids=[_name(d) for d in OUT])  # fmt: skip
def test_dequantize_rounds_once_from_float32(out_dtype):
    w = _random_weight((37, 129), torch.float32, seed=7)
    ours = fl.quantize_nf4(w, blocksize=64)
    fp32 = ours.dequantize(torch.float32)
    assert torch.equal(ours.dequantize(out_dtype), fp32.to(out_dtype))
    assert torch.equal(fl.dequantize_nf4(ours, out_dtype), fp32.to(out_dtype))
    if out_dtype != torch.float64:
        packed, state = ours.to_bnb()
        assert torch.equal(ours.dequantize(out_dtype), _bnb_dequantize(packed, state, out_dtype, w.shape))


def test_dequantize_is_code_times_absmax():
    w = _random_weight((9, 64), torch.float32, seed=3)
    ours = fl.quantize_nf4(w, blocksize=32, double_quant=True)
    q = torch.stack((ours.packed.view(-1) >> 4, ours.packed.view(-1) & 15), 1).view(-1)[: w.numel()]
    expected = ours.code[q.long()] * ours.absmax_fp32().repeat_interleave(32)
    assert torch.equal(ours.dequantize().view(-1), expected)
    assert (ours.dequantize() - w).abs().max() <= 0.17 * w.abs().max()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_midpoints_take_the_lower_code_and_first_element_is_the_high_nibble(backend):
    code = nf4.nf4_code()
    bounds = (code[:-1] + code[1:]) / 2
    # absmax is exactly 1 (the first element), so the scaled values are the inputs themselves.
    w = torch.cat([torch.tensor([1.0]), bounds, torch.nextafter(bounds, torch.ones(15)), code])
    ours = fl.quantize_nf4(w, blocksize=64, double_quant=False, backend=backend)
    q = torch.stack((ours.packed.view(-1) >> 4, ours.packed.view(-1) & 15), 1).view(-1)[: w.numel()]
    assert q[0] == 15
    assert torch.equal(q[1:16], torch.arange(15, dtype=torch.uint8)), "a value on a midpoint takes the lower code"
    assert torch.equal(q[16:31], torch.arange(1, 16, dtype=torch.uint8)), "just above a midpoint takes the upper code"
    assert torch.equal(q[31:], torch.arange(16, dtype=torch.uint8))
    packed, state = _bnb_quantize(w, 64, False)
    _assert_same_format(ours, packed, state)

    odd = fl.quantize_nf4(torch.tensor([1.0, -1.0, 0.6]), blocksize=64, double_quant=False, backend=backend)
    # 1.0 → 15 (high nibble), -1.0 → 0; 0.6 → 13 (nearest code 0.5626), the missing 4th element → code 7 (0.0).
    assert odd.packed.view(-1).tolist() == [0xF0, 0xD7]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_zero_blocks_match_bitsandbytes(double_quant):
    w = _random_weight((5, 64), torch.float32, seed=11)
    w[1] = 0.0  # a full zero block
    w = torch.cat([w.view(-1), torch.zeros(37)])  # a zero partial block (its absmax is stored as 1e-38)
    packed, state = _bnb_quantize(w, 64, double_quant)
    for backend in ("reference", "triton"):
        ours = fl.quantize_nf4(w, blocksize=64, double_quant=double_quant, backend=backend)
        _assert_same_format(ours, packed, state)
        assert torch.equal(ours.dequantize(backend=backend), _bnb_dequantize(packed, state, torch.float32, w.shape))


def test_single_block_double_quant_matches_bitsandbytes():
    # One block: absmax − offset is exactly 0, so the nested absmax is 0 and its codes are 0.
    w = _random_weight((3, 7), torch.float16, seed=5)
    packed, state = _bnb_quantize(w, 64, True)
    ours = fl.quantize_nf4(w, blocksize=64, double_quant=True)
    _assert_same_format(ours, packed, state)
    assert torch.equal(ours.dequantize(), _bnb_dequantize(packed, state, torch.float16, w.shape))


def test_nested_quantization_matches_bitsandbytes_quantize_blockwise():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(600 * 256 + 77, generator=gen) * torch.rand(600 * 256 + 77, generator=gen) ** 4
    expected_codes, expected_state = F.quantize_blockwise(values, code=F.create_dynamic_map(signed=True), blocksize=256)
    codes, absmax = codec.quantize_blockwise(values, nf4.dynamic_code(), blocksize=nf4.NESTED_BLOCKSIZE)
    assert torch.equal(codes, expected_codes), f"{(codes != expected_codes).sum().item()} codes differ"
    assert torch.equal(absmax, expected_state.absmax)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_absmax_fp32_matches_bitsandbytes(double_quant):
    w = _random_weight((300, 129), torch.bfloat16, seed=13)  # 605 blocks: 3 nested blocks, the last partial
    packed, state = _bnb_quantize(w, 64, double_quant)
    ours = fl.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    scale = ours.absmax_fp32()
    assert scale.dtype == torch.float32 and scale.shape == (ours.absmax.numel(),)
    if double_quant:
        expected = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(scale, expected)
        exact = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")[1].absmax
        assert (scale - exact).abs().max() <= 0.02 * exact.max(), "double quant should stay close to the absmax"
    else:
        assert torch.equal(scale, state.absmax)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_from_bnb_shares_bytes_and_to_bnb_round_trips(double_quant):
    w = _random_weight((37, 129), torch.float16, seed=17)
    packed, state = _bnb_quantize(w, 128, double_quant)
    ours = fl.NF4Weight.from_bnb(packed, state)
    assert ours.packed.data_ptr() == packed.data_ptr(), "from_bnb must not copy the packed bytes"
    assert ours.absmax.data_ptr() == state.absmax.data_ptr()
    assert torch.equal(ours.dequantize(), _bnb_dequantize(packed, state, torch.float16, w.shape))

    packed_back, state_back = ours.to_bnb()
    assert packed_back is ours.packed and state_back.absmax is ours.absmax
    assert state_back.nested == double_quant and state_back.quant_type == "nf4" and state_back.shape == w.shape
    assert torch.equal(F.dequantize_4bit(packed_back, state_back).reshape(w.shape), ours.dequantize())
    again = fl.NF4Weight.from_bnb(*ours.to_bnb())
    assert again.packed.data_ptr() == ours.packed.data_ptr()


def test_from_bnb_accepts_another_quant_storage():
    w = _random_weight((16, 64), torch.bfloat16, seed=19)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    ours = fl.NF4Weight.from_bnb(packed, state)
    assert ours.packed.dtype == torch.uint8 and ours.packed.data_ptr() == packed.data_ptr()
    assert torch.equal(ours.packed, fl.quantize_nf4(w, blocksize=64).packed)


def test_to_makes_a_new_weight_and_keeps_dtypes():
    ours = fl.quantize_nf4(_random_weight((37, 129), torch.bfloat16, seed=23), blocksize=64)
    moved = ours.to("meta")
    assert moved is not ours and moved.device.type == "meta" and ours.device.type == "cpu"
    for name, tensor in ours._tensors().items():
        assert getattr(moved, name).dtype == tensor.dtype, name
    copy = ours.to("cpu")
    assert copy is not ours and torch.equal(copy.dequantize(), ours.dequantize())
    assert (copy.shape, copy.dtype, copy.blocksize, copy.double_quant) == (ours.shape, ours.dtype, 64, True)
    assert ours.numel() == 37 * 129 and "NF4Weight(shape=(37, 129)" in repr(ours)
    with pytest.raises(TypeError, match=r"NF4Weight.to: got the dtype torch.float16; .*dequantize\(dtype\)"):
        ours.to(torch.float16)


def _bnb_linear4bit(weight, double_quant, blocksize=64):
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compress_statistics=double_quant,
                              quant_type="nf4", device="cpu")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4", module=layer)  # fmt: skip
    return layer.to("cpu")  # quantizes on the CPU


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_state_dict_written_by_bnb_linear4bit_loads_byte_exactly(double_quant):
    w = _random_weight((37, 129), torch.float32, seed=29)
    prefix = "model.layers.0.q_proj.base_layer."
    layer = _bnb_linear4bit(w, double_quant)
    sd = layer.state_dict(prefix=prefix)
    loaded = fl.NF4Weight.from_state_dict(sd, prefix)
    assert loaded.packed.data_ptr() == sd[prefix + "weight"].data_ptr(), "loading must not copy the bytes"
    _assert_same_format(loaded, layer.weight.data, layer.weight.quant_state)
    assert torch.equal(loaded.dequantize(), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))

    ours = fl.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    ours_sd = ours.state_dict(prefix)
    assert set(ours_sd) == {k for k in sd if not k.endswith("bias")}
    for key, value in ours_sd.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_our_state_dict_loads_into_bnb(double_quant):
    w = _random_weight((37, 129), torch.bfloat16, seed=31)
    ours = fl.quantize_nf4(w, blocksize=128, double_quant=double_quant)
    prefix = "q_proj."
    sd = ours.state_dict(prefix)
    fields = json.loads(bytes(sd[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert fields["quant_type"] == "nf4" and fields["shape"] == [37, 129] and fields["dtype"] == "bfloat16"

    stats = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix + "weight.")}
    layer = bnb.nn.Linear4bit(129, 37, bias=False, quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd[prefix + "weight"], stats, device="cpu", module=layer)
    state = layer.weight.quant_state
    assert state.blocksize == 128 and state.nested == double_quant and state.dtype == torch.bfloat16
    assert torch.equal(F.dequantize_4bit(layer.weight.data, state), ours.dequantize())
    x = torch.randn(3, 129, dtype=torch.bfloat16)
    assert torch.allclose(layer(x).float(), (x @ ours.dequantize().T).float(), rtol=2e-2, atol=2e-2)

    buffer = io.BytesIO()
    torch.save(sd, buffer)  # a checkpoint loads with weights_only=True: tensors only, the quant state as uint8 JSON
    buffer.seek(0)
    again = fl.NF4Weight.from_state_dict(torch.load(buffer, weights_only=True), prefix)
    assert torch.equal(again.dequantize(), ours.dequantize())


def test_from_state_dict_errors_name_the_problem():
    sd = fl.quantize_nf4(torch.randn(8, 64)).state_dict("layer.")
    with pytest.raises(KeyError, match="missing key 'other.weight"):
        fl.NF4Weight.from_state_dict(sd, "other.")
    sd_fp4 = dict(sd)
    sd_fp4["layer.weight.quant_state.bitsandbytes__fp4"] = sd_fp4.pop("layer.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="only NF4"):
        fl.NF4Weight.from_state_dict(sd_fp4, "layer.")
    sd_bad = dict(sd)
    sd_bad["layer.weight.absmax"] = sd["layer.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax must be uint8"):
        fl.NF4Weight.from_state_dict(sd_bad, "layer.")
    for nested in ("nested_absmax", "nested_quant_map"):  # a truncated double-quant checkpoint names what it lacks
        sd_cut = {k: v for k, v in sd.items() if k != f"layer.weight.{nested}"}
        with pytest.raises(KeyError, match=f"missing key 'layer.weight.{nested}'"):
            fl.NF4Weight.from_state_dict(sd_cut, "layer.")


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize 48 is not supported; bitsandbytes accepts 32, 64, 128"):
        fl.quantize_nf4(w, blocksize=48)
    with pytest.raises(ValueError, match="blocksize 16"):
        fl.quantize_nf4(w, blocksize=16)
    with pytest.raises(ValueError):
        _bnb_quantize(w, 48, False)  # bitsandbytes rejects it too
    with pytest.raises(TypeError, match="weight must be float32, float16, bfloat16, got torch.int32"):
        fl.quantize_nf4(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="got torch.float64"):
        fl.quantize_nf4(w.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fl.quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        fl.quantize_nf4(torch.empty(0, 64))
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fl.quantize_nf4(bad)
    with pytest.raises(ValueError, match="quantize_nf4: unknown backend 'cuda'"):
        fl.quantize_nf4(w, backend="cuda")
    ours = fl.quantize_nf4(w)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ours.dequantize(torch.int8)
    with pytest.raises(TypeError, match="expected an NF4Weight"):
        fl.dequantize_nf4(w)
    fields = dict(packed=ours.packed, shape=ours.shape, dtype=ours.dtype, blocksize=64, code=ours.code,
                  absmax=ours.absmax_fp32())  # fmt: skip
    for name in ("packed", "code", "absmax"):
        with pytest.raises(TypeError, match=f"NF4Weight: {name} must be a torch.Tensor, got NoneType"):
            fl.NF4Weight(**{**fields, name: None})
    with pytest.raises(TypeError, match="got 'float32'"):  # a string is not a dtype, and the message says so
        fl.NF4Weight(**{**fields, "dtype": "float32"})


def test_triton_kernels_count_bytes_of_the_largest_int32_element_count(interpret_triton):
    """n = 2^31 - 1 arrives in the kernels as int32: n + 1 would wrap, masking every byte off (dequantize wrote 0s,
    quantize left packed unwritten). One program of each kernel runs over the first 2048 elements."""
    from fused_lora import nf4
    from fused_lora.kernels.nf4 import nf4_dequantize_kernel, nf4_quantize_kernel

    weight = nf4.quantize_nf4(torch.randn(2048), blocksize=64, double_quant=False, backend="reference")
    n = 2**31 - 1
    out = torch.full((2048,), float("nan"))
    nf4_dequantize_kernel[(1,)](weight.packed, weight.absmax, weight.code, out, weight.absmax, weight.code,
                                weight.code, n, BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=False, PAIRS=1024)
    assert torch.equal(out, weight.dequantize(torch.float32, backend="reference"))
    packed, absmax = torch.zeros((1024, 1), dtype=torch.uint8), torch.empty(32)
    source = weight.dequantize(torch.float32, backend="reference")
    nf4_quantize_kernel[(1,)](source, packed, absmax, nf4._nf4_bounds("cpu"), n, -(-n // 64), BLOCKSIZE=64,
                              BLOCKS_PER_PROGRAM=32)
    assert torch.equal(packed, nf4.quantize_nf4(source, blocksize=64, double_quant=False, backend="reference").packed)


SUBNORMAL_WEIGHTS = {
    "subnormal": lambda gen: torch.randn(8, 64, generator=gen) * 1e-39,
    "subnormal-and-normal-rows": lambda gen: torch.cat([torch.randn(4, 64, generator=gen) * 1e-40,
                                                        torch.randn(4, 64, generator=gen)]),
    "near-smallest-normal": lambda gen: torch.randn(8, 64, generator=gen) * 1e-37,
    "huge-but-storable": lambda gen: torch.randn(3, 50, generator=gen) * 1e37,
}


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("name", list(SUBNORMAL_WEIGHTS))
def test_subnormal_and_huge_finite_weights_quantize_like_bitsandbytes(name, double_quant):
    """Weights whose block scales are subnormal (the nested absmax of double quantization then has an inf
    reciprocal) or near the top of float32: byte for byte what bitsandbytes stores, dequantized the same. Before,
    double quantization raised IndexError: index -9223372036854775808."""
    w = SUBNORMAL_WEIGHTS[name](torch.Generator().manual_seed(3))
    packed, state = _bnb_quantize(w, 64, double_quant)
    ours = fl.quantize_nf4(w, blocksize=64, double_quant=double_quant, backend="reference")
    _assert_same_format(ours, packed, state)
    assert torch.equal(ours.dequantize(), _bnb_dequantize(packed, state, torch.float32, w.shape))


@pytest.mark.parametrize("name", ["subnormal", "subnormal-and-normal-rows", "near-smallest-normal"])
def test_triton_quantizes_subnormal_weights_like_bitsandbytes(interpret_triton, name):
    """The kernel clamps a block's absmax to 1e-38 before its reciprocal, as bitsandbytes and the reference do (an
    inf reciprocal used to give every positive element of a subnormal block the top code)."""
    w = SUBNORMAL_WEIGHTS[name](torch.Generator().manual_seed(3))
    packed, state = _bnb_quantize(w, 64, False)
    _assert_same_format(fl.quantize_nf4(w, blocksize=64, double_quant=False, backend="triton"), packed, state)


@pytest.mark.parametrize("make", [lambda: torch.full((8, 64), 1e38),
                                  lambda: torch.cat([torch.full((4, 64), 1e38), torch.randn(4, 64)]),
                                  lambda: torch.full((8, 64), 3.4e38)], ids=["1e38", "1e38-rows", "float32-max"])
def test_double_quant_of_weights_near_float32_max_is_a_clear_error(make):
    """The float32 mean of the block scales overflows: bitsandbytes stores offset = inf and dequantizes the weight
    to NaN; quantize_nf4 says why and what to do instead, and quantizes it without double quantization."""
    w = make()
    packed, state = _bnb_quantize(w, 64, True)
    assert torch.isinf(state.offset) and torch.isnan(F.dequantize_4bit(packed, state)).all()
    with pytest.raises(ValueError, match="quantize_nf4: double quantization cannot store the block scales of this "
                       "weight .*overflows to inf.*Use double_quant=False"):
        fl.quantize_nf4(w, double_quant=True)
    plain_packed, plain_state = _bnb_quantize(w, 64, False)
    _assert_same_format(fl.quantize_nf4(w, double_quant=False), plain_packed, plain_state)


def test_numpy_integer_blocksize_is_accepted_and_meta_weights_and_non_bool_double_quant_are_named():
    """blocksize=np.int64(64) was refused with the self-contradictory "64 is not supported; accepts ... 64 ..."."""
    np = pytest.importorskip("numpy")
    w = _random_weight((8, 64), torch.float32, seed=2)
    ours = fl.quantize_nf4(w, blocksize=np.int64(64))
    assert ours.blocksize == 64 and type(ours.blocksize) is int
    assert torch.equal(ours.packed, fl.quantize_nf4(w, blocksize=64).packed)
    with pytest.raises(ValueError, match="blocksize 48 is not supported"):
        fl.quantize_nf4(w, blocksize=np.int64(48))
    with pytest.raises(ValueError, match="quantize_nf4: weight is on the meta device"):
        fl.quantize_nf4(torch.empty(8, 64, device="meta"))
    with pytest.raises(TypeError, match="quantize_nf4: double_quant must be True or False, got 'no'"):
        fl.quantize_nf4(w, double_quant="no")


def test_env_var_overrides_auto(monkeypatch, interpret_triton):
    w = _random_weight((37, 129), torch.float32, seed=37)
    expected = fl.quantize_nf4(w, backend="reference")
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    assert torch.equal(fl.quantize_nf4(w).packed, expected.packed)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND"):
        fl.quantize_nf4(w)


def test_weight_requiring_grad_and_non_contiguous_views_quantize_like_bnb():
    w = _random_weight((129, 37), torch.float32, seed=41).T.requires_grad_()  # [37, 129], non-contiguous
    packed, state = _bnb_quantize(w.detach().contiguous(), 64, True)
    for backend in ("reference", "triton"):
        _assert_same_format(fl.quantize_nf4(w, backend=backend), packed, state)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous view (every other element of a larger buffer)."""
    buffer = torch.zeros(t.numel(), 2, dtype=t.dtype)
    buffer[:, 0] = t.reshape(-1)
    return buffer[:, 0].view(t.shape) if t.dim() else buffer[0, 0]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_triton_dequantize_reads_non_contiguous_tensors_correctly(interpret_triton, double_quant):
    """An NF4Weight may hold strided views (a slice of a larger buffer); the kernel indexes flat arrays, so the
    launcher must make them contiguous instead of reading the wrong elements."""
    w = fl.quantize_nf4(_random_weight((37, 129), torch.float32, 4), blocksize=64, double_quant=double_quant)
    fields = {name: _strided_copy(t) for name, t in w._tensors().items()}
    strided = fl.NF4Weight(shape=w.shape, dtype=w.dtype, blocksize=w.blocksize, **fields)
    assert not strided.packed.is_contiguous() and not strided.code.is_contiguous()
    assert torch.equal(strided.dequantize(backend="triton"), w.dequantize(backend="reference"))



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=[_name(d) for d in DTYPES])
@pytest.mark.parametrize("blocksize", [32, 64, 4096], ids=lambda b: f"bs{b}")
def test_triton_on_gpu_matches_cpu_bitsandbytes(dtype, blocksize):
    w = _random_weight((4096, 1031), dtype, seed=43)
    packed, state = _bnb_quantize(w, blocksize, True)
    ours = fl.quantize_nf4(w.cuda(), blocksize=blocksize, double_quant=True)
    assert ours.device.type == "cuda"
    _assert_same_format(ours.to("cpu"), packed, state)
    for out_dtype in DTYPES:
        out = ours.dequantize(out_dtype)
        assert torch.equal(out.cpu(), _bnb_dequantize(packed, state, out_dtype, w.shape)), _name(out_dtype)
        assert torch.equal(out, ours.dequantize(out_dtype, backend="reference"))


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes' CPU dequantize_4bit: where it is wrong (fused_lora.bnb_compat.bnb_cpu_dequantize_is_wrong)
# ---------------------------------------------------------------------------------------------------------------

RULE_SHAPES = [(rows, cols) for rows in (1, 2, 3, 37) for cols in (16, 32, 48, 96, 128, 160, 200, 256, 320, 129)]


def _avx512_kernel_block_index(rows, cols, blocksize):
    """The absmax index bitsandbytes' AVX-512 kernel uses for each group of 16 columns of each row (read from its
    disassembly), next to the right one, (r·cols + c) // blocksize."""
    r = torch.arange(rows).repeat_interleave(-(-cols // 16))
    c = torch.arange(0, cols, 16).repeat(rows)
    return r * (cols // blocksize) + c // blocksize, (r * cols + c) // blocksize


@pytest.mark.parametrize("blocksize", BLOCKSIZES[:-2])
def test_bnb_cpu_dequantize_rule_is_the_avx512_kernels_indexing(blocksize):
    """The closed form of bnb_cpu_dequantize_is_wrong equals "some 16 columns get another block's absmax" under
    the AVX-512 kernel's indexing, for every shape here (and nothing is wrong without AVX-512F)."""
    for rows, cols in RULE_SHAPES:
        kernel, right = _avx512_kernel_block_index(rows, cols, blocksize)
        expected = cols % 16 == 0 and bool((kernel != right).any())
        assert nf4.bnb_cpu_dequantize_is_wrong((rows, cols), blocksize, avx512f=True) == expected, (rows, cols)
        assert not nf4.bnb_cpu_dequantize_is_wrong((rows, cols), blocksize, avx512f=False)
    assert nf4.bnb_cpu_dequantize_is_wrong((37, 160), 64, avx512f=True)
    # at blocksize >= 2048 bitsandbytes falls back to PyTorch when torch runs at AVX512, not otherwise
    assert not nf4.bnb_cpu_dequantize_is_wrong((37, 160), 2048, avx512f=True, torch_avx512=True)
    assert nf4.bnb_cpu_dequantize_is_wrong((37, 160), 2048, avx512f=True, torch_avx512=False)


def test_bnb_cpu_dequantize_is_wrong_exactly_where_the_rule_says():
    """On this CPU, bitsandbytes' dequantize_4bit differs from ours exactly where the rule says it is wrong (nowhere
    without AVX-512F). When a bitsandbytes release fixes its AVX-512 kernel this fails: update the rule."""
    differs, predicted = [], []
    for rows, cols in RULE_SHAPES:
        for blocksize in (32, 64, 256):
            w = _random_weight((rows, cols), torch.float32, seed=rows * 1000 + cols)
            packed, state = _bnb_quantize(w, blocksize, True)
            theirs = F.dequantize_4bit(packed, state).reshape(w.shape)
            ours = fl.quantize_nf4(w, blocksize=blocksize).dequantize()
            if not torch.equal(theirs, ours):
                differs.append((rows, cols, blocksize))
            if nf4.bnb_cpu_dequantize_is_wrong((rows, cols), blocksize):
                predicted.append((rows, cols, blocksize))
    assert differs == predicted, (
        f"bitsandbytes {bnb.__version__} on this CPU (AVX-512F: {fused_lora_bnb_compat.cpu_has_avx512f()}) "
        f"dequantizes these differently from ours: {differs}; the rule predicts {predicted}"
    )
