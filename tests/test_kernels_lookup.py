"""The NF4 register lookups of fused_lora/kernels/nf4_lookup.py on the CPU.

nf4_prmt is inline PTX, which the Triton interpreter cannot run: its text is executed here by a small emulator of
the five PTX instructions it uses (and, or, not, shr, prmt with the default mode), for all 256 byte values in every
byte position, and must give code[q] rounded to bf16 / fp16. nf4_tree runs under the interpreter.
"""

import re

import pytest
import torch

from fused_lora.kernels.nf4_lookup import nf4_values
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
    expected = torch.tensor(NF4_CODE).to(torch_dtype).view(torch.int16).tolist()
    expected = [e & 0xFFFF for e in expected]
    asm = lookup.prmt_asm(dtype)
    gen = torch.Generator().manual_seed(0)
    words = [b * 0x01010101 for b in range(256)] + torch.randint(0, 2**32, (512,), generator=gen).tolist()
    for word in words:
        regs = run_ptx(asm, {"$4": word})
        got_hi = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        got_lo = [regs["$2"] & 0xFFFF, regs["$2"] >> 16, regs["$3"] & 0xFFFF, regs["$3"] >> 16]
        data = word.to_bytes(4, "little")
        assert got_hi == [expected[b >> 4] for b in data], hex(word)
        assert got_lo == [expected[b & 15] for b in data], hex(word)


def test_lookup_values_are_the_nf4_table():
    assert _lookup().NF4_VALUES == NF4_CODE


triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _tree_kernel(q_ptr, code_ptr, out_ptr, LOOKUP: tl.constexpr):
    packed = tl.load(q_ptr + tl.arange(0, 128))
    values = nf4_values(packed, code_ptr, LOOKUP, tl.float32)
    tl.store(out_ptr + tl.arange(0, 256), values)


@pytest.mark.parametrize("mode", ["tree", "gather"])
def test_tree_and_gather_give_every_code_exactly_under_the_interpreter(mode, interpret_triton):
    packed = torch.arange(128, dtype=torch.uint8) * 2 + torch.tensor([0, 1] * 64, dtype=torch.uint8)
    out = torch.empty(256)
    code = torch.tensor(NF4_CODE)
    _tree_kernel[(1,)](packed, code, out, LOOKUP=mode)
    expected = torch.stack((code[packed.long() >> 4], code[packed.long() & 15]), dim=1).reshape(-1)
    assert torch.equal(out, expected)
