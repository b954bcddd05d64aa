"""The NF4 register lookups of fused_lora/kernels/nf4_lookup.py on the CPU.

nf4_prmt is inline PTX, which the Triton interpreter cannot run: its text is executed here by a small emulator of
the PTX instructions it uses (and, or, not, shl, shr, mul.hi, mov into two halves, prmt in the default and
sign-replicate modes), for all 256 byte values in every byte position, and must give code[q] rounded to bf16 / fp16;
the tables it reads are nf4_lut's (checked under the interpreter in fp16). nf4_tree runs under the interpreter.
"""

import re

import pytest
import torch

from fused_lora.kernels.nf4_lookup import join8, nf4_lut, nf4_values
from fused_lora.nf4 import NF4_CODE


def _lookup():
    from fused_lora.kernels import nf4_lookup

    return nf4_lookup


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 d, a, b, c (default mode): byte i of d is byte c[4i+2:4i] of the 8 bytes b:a, or that byte's
    sign replicated when c[4i+3] is set."""
    source = ((b & 0xFFFFFFFF) << 32) | (a & 0xFFFFFFFF)
    d = 0
    for i in range(4):
        selector = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (selector & 7))) & 0xFF
        if selector & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        d |= byte << (8 * i)
    return d


def run_ptx(text: str, operands: dict) -> dict:
    """Execute ``text`` (one instruction per line, `.reg` declarations and braces ignored) on 32-bit registers;
    ``operands`` holds the input $-operands; returns every register."""
    regs = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", token):
            return int(token, 0) & 0xFFFFFFFF
        return regs[token]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if rest.startswith("{"):  # mov.b32 {lo, hi}, src: split a 32-bit register into two 16-bit ones
            halves, src = rest[1:].split("}")
            lo, hi = (t.strip() for t in halves.split(","))
            word = value(src.strip(" ,"))
            regs[lo], regs[hi] = word & 0xFFFF, word >> 16
            continue
        dst, *srcs = [t.strip() for t in rest.split(",")]
        args = [value(s) for s in srcs]
        if op == "and.b32":
            result = args[0] & args[1]
        elif op == "or.b32":
            result = args[0] | args[1]
        elif op == "not.b32":
            result = ~args[0]
        elif op == "shr.u32":
            result = args[0] >> args[1]
        elif op == "mul.hi.u32":
            result = (args[0] * args[1]) >> 32
        elif op == "shl.b32":
            result = args[0] << args[1]
        elif op == "prmt.b32":
            result = _prmt(*args)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dst] = result & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_prmt_asm_decodes_every_byte_in_every_position(dtype):
    lookup = _lookup()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    expected = [e & 0xFFFF for e in torch.tensor(NF4_CODE).to(torch_dtype).view(torch.int16).tolist()]
    low, high = lookup.prmt_tables(dtype)
    tables = {f"${9 + i}": t for i, t in enumerate(low + high)}
    asm = lookup.prmt_asm()
    gen = torch.Generator().manual_seed(0)
    words = [b * 0x01010101 for b in range(256)] + torch.randint(0, 2**32, (512,), generator=gen).tolist()
    for word in words:
        regs = run_ptx(asm, {"$8": word, **tables})
        got = [regs[f"${j}"] for j in range(8)]
        data = word.to_bytes(4, "little")
        assert got == [expected[q] for byte in data for q in (byte >> 4, byte & 15)], hex(word)


def test_prmt_asm_reads_no_register_it_does_not_define_or_receive():
    """Every $-operand the PTX reads is an input ($8..$16) and every output $0..$7 is written."""
    import re

    asm = _lookup().prmt_asm()
    written = set(re.findall(r"\{(\$\d+), (\$\d+)\}", asm))
    assert {r for pair in written for r in pair} == {f"${j}" for j in range(8)}
    read = set(re.findall(r"\$\d+", asm)) - {f"${j}" for j in range(8)}
    assert read == {f"${j}" for j in range(8, 17)}


def test_lookup_values_are_the_nf4_table():
    assert _lookup().NF4_VALUES == NF4_CODE


triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _lut_kernel(code_ptr, out_ptr, DTYPE: tl.constexpr):
    lut = nf4_lut(code_ptr, DTYPE)
    for i in tl.static_range(8):
        tl.store(out_ptr + i, lut[i])


def test_lut_holds_the_low_and_high_bytes_of_the_rounded_codes(interpret_triton):
    """nf4_lut (pure Triton, from the fp32 table in memory) gives the registers the PTX above was checked with; fp16
    only: the interpreter cannot round to bf16 (prmt_tables' bf16 rounding is checked against torch above)."""
    out = torch.empty(8, dtype=torch.int32)
    _lut_kernel[(1,)](torch.tensor(NF4_CODE), out, DTYPE=tl.float16)
    low, high = _lookup().prmt_tables("fp16")
    assert [w & 0xFFFFFFFF for w in out.tolist()] == low + high


@triton.jit
def _join8_kernel(out_ptr):
    w = tl.arange(0, 4)[None, :] + 4 * tl.arange(0, 2)[:, None]  # [2, 4]: word index
    out = join8(8 * w, 8 * w + 1, 8 * w + 2, 8 * w + 3, 8 * w + 4, 8 * w + 5, 8 * w + 6, 8 * w + 7)
    tl.store(out_ptr + tl.arange(0, 2)[:, None] * 32 + tl.arange(0, 32)[None, :], out)


def test_join8_puts_the_eight_values_of_a_word_in_element_order(interpret_triton):
    out = torch.empty(2, 32, dtype=torch.int32)
    _join8_kernel[(1,)](out)
    assert torch.equal(out.reshape(-1), torch.arange(64, dtype=torch.int32))


@triton.jit
def _tree_kernel(q_ptr, code_ptr, out_ptr, LOOKUP: tl.constexpr):
    packed = tl.load(q_ptr + tl.arange(0, 128))
    values = nf4_values(packed, code_ptr, None, LOOKUP, tl.float32)
    tl.store(out_ptr + tl.arange(0, 256), values)


@pytest.mark.parametrize("mode", ["tree", "gather"])
def test_tree_and_gather_give_every_code_exactly_under_the_interpreter(mode, interpret_triton):
    code = torch.tensor(NF4_CODE)
    for first in (0, 128):  # every byte value: each (high, low) pair of codes
        packed = torch.arange(first, first + 128, dtype=torch.uint8)
        out = torch.empty(256)
        _tree_kernel[(1,)](packed, code, out, LOOKUP=mode)
        expected = torch.stack((code[packed.long() >> 4], code[packed.long() & 15]), dim=1).reshape(-1)
        assert torch.equal(out, expected), first
