"""The NF4 register lookups of fused_lora/kernels/nf4_lookup.py on the CPU.

nf4_prmt and nf4_lds are inline PTX, which the Triton interpreter cannot run: their text is executed here by a small
emulator of the PTX instructions they use (and, or, not, lop3, shl, shr, mul.lo/hi, add, mov, prmt in the default
and sign-replicate modes, and a CTA's shared memory: declarations, ld.shared, st.shared.v4, bar.sync), for all 256
byte values in every byte position (and for nf4_lds every lane of a warp), and must give code[q] rounded to bf16 /
fp16; the tables they read are nf4_lut's and pair_table_chunks' (checked under the interpreter in fp16). nf4_tree
runs under the interpreter.
"""

import re

import pytest
import torch

from fused_lora.kernels.nf4_lookup import join8, nf4_lut, nf4_values, pair_table_chunks
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


def _lop3(a: int, b: int, c: int, table: int) -> int:
    """PTX lop3.b32 d, a, b, c, table: bit i of d is bit (4·a_i + 2·b_i + c_i) of ``table``."""
    return sum(((table >> (4 * (a >> i & 1) + 2 * (b >> i & 1) + (c >> i & 1))) & 1) << i for i in range(32))


class Shared:
    """A CTA's shared memory for the emulator: 32-bit words by byte address, the arrays the PTX declares at
    ``base`` onwards (their symbols' addresses), and the addresses read, in order."""

    def __init__(self, base: int = 0x400):
        self.base, self.words, self.symbols, self.reads = base, {}, {}, []

    def declare(self, line: str) -> None:
        m = re.fullmatch(r"\.shared \.align (\d+) \.b8 (\w+)\[(\d+)\]", line)
        assert m, f"the emulator does not know the declaration {line!r}"
        self.symbols[m.group(2)] = (self.base, int(m.group(3)))

    def check(self, address: int, width: int) -> None:
        assert address % 4 == 0 and any(b <= address and address + width <= b + n for b, n in self.symbols.values()), (
            f"shared access at {address:#x} outside the declared arrays {self.symbols}")


def run_ptx(text: str, operands: dict, shared: Shared | None = None, lane: int = 0) -> dict:
    """Execute ``text`` (one instruction per line, `.reg` declarations and braces ignored) on 32-bit registers;
    ``operands`` holds the input $-operands, ``shared`` the CTA's shared memory (declarations, ld/st.shared), ``lane``
    the thread's %laneid; returns every register."""
    regs = dict(operands)
    shared = shared if shared is not None else Shared()

    def value(token: str) -> int:
        token = token.strip()
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", token):
            return int(token, 0) & 0xFFFFFFFF
        if token == "%laneid":
            return lane
        if token in shared.symbols:
            return shared.symbols[token][0]
        return regs[token]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg") or line == "bar.sync 0":
            continue
        if line.startswith(".shared"):
            shared.declare(line)
            continue
        op, rest = line.split(None, 1)
        if op == "ld.shared.b32":  # ld.shared.b32 d, [a]
            dst, address = (t.strip() for t in rest.split(","))
            address = value(address.strip("[]"))
            shared.check(address, 4)
            shared.reads.append(address)
            regs[dst] = shared.words[address]
            continue
        if op == "st.shared.v4.b32":  # st.shared.v4.b32 [a], {v, v, v, v}
            address, values = rest.split(",", 1)
            address = value(address.strip("[] "))
            shared.check(address, 16)
            for i, token in enumerate(values.strip(" {}").split(",")):
                shared.words[address + 4 * i] = value(token)
            continue
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
        elif op == "mul.lo.u32":
            result = args[0] * args[1]
        elif op == "add.u32":
            result = args[0] + args[1]
        elif op in ("mov.u32", "mov.b32"):
            result = args[0]
        elif op == "lop3.b32":
            result = _lop3(*args)
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


def _rounded_codes(dtype: str) -> list[int]:
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    return [e & 0xFFFF for e in torch.tensor(NF4_CODE).to(torch_dtype).view(torch.int16).tolist()]


def _spec_chunks(dtype: str) -> list[tuple[int, int]]:
    """(byte offset, value) of every 16-byte chunk of the pair table, as its docstring specifies it."""
    lookup, codes = _lookup(), _rounded_codes(dtype)
    per_entry = lookup.PAIR_COPIES.value // 4
    return [(16 * j, codes[(j // per_entry) >> 4] | codes[(j // per_entry) & 15] << 16)
            for j in range(256 * per_entry)]  # fmt: skip


def _filled_table(chunks) -> Shared:
    """A CTA's shared memory after nf4_pair_table's PTX: the declaration, then the store of every chunk."""
    lookup, shared = _lookup(), Shared()
    run_ptx(lookup.pair_declare_asm(), {}, shared)
    for offset, value in chunks:
        run_ptx(lookup.pair_store_asm(), {"$1": offset, "$2": value}, shared)
    return shared


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_pair_table_lookup_reads_every_byte_from_the_threads_own_bank(dtype):
    """nf4_lds's PTX gives code[q] rounded to the dtype for every byte value in every position and every lane of a
    warp, from the table nf4_pair_table's PTX stores (every word written once); and each lane reads only its own
    bank, (address / 4) mod 32 = lane, so that a warp's 32 lookups never conflict."""
    lookup, expected = _lookup(), _rounded_codes(dtype)
    shared = _filled_table(_spec_chunks(dtype))
    (base, size), = shared.symbols.values()
    assert size == lookup.PAIR_TABLE_BYTES and sorted(shared.words) == list(range(base, base + size, 4))
    asm = lookup.lds_asm()
    gen = torch.Generator().manual_seed(1)
    words = [b * 0x01010101 for b in range(256)] + torch.randint(0, 2**32, (64,), generator=gen).tolist()
    for lane in range(32):
        lane4 = run_ptx("mov.u32 $0, %laneid;\nbar.sync 0;\nshl.b32 $0, $0, 2;", {}, shared, lane)["$0"]
        for word in words if lane in (0, 31) else words[::17]:
            shared.reads.clear()
            regs = run_ptx(asm, {"$8": word, "$9": lane4}, shared, lane)
            data = word.to_bytes(4, "little")
            assert [regs[f"${j}"] for j in range(8)] == [expected[q] for b in data for q in (b >> 4, b & 15)], hex(word)
            assert len(shared.reads) == 4 and all((a // 4) % 32 == lane for a in shared.reads), (lane, hex(word))


def test_pair_table_ptx_reads_only_its_operands():
    """The lookup reads $8 (the word) and $9 (4·lane) and writes $0..$7; the store reads $1 and $2."""
    lookup = _lookup()
    asm = lookup.lds_asm()
    assert set(re.findall(r"\$\d+", asm)) - {f"${j}" for j in range(8)} == {"$8", "$9"}
    assert {r for pair in re.findall(r"\{(\$\d+), (\$\d+)\}", asm) for r in pair} == {f"${j}" for j in range(8)}
    assert set(re.findall(r"\$\d+", lookup.pair_store_asm())) == {"$0", "$1", "$2"}


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
def _pair_chunks_kernel(code_ptr, offset_ptr, value_ptr, DTYPE: tl.constexpr):
    offset, value = pair_table_chunks(code_ptr, DTYPE)
    tl.store(offset_ptr + tl.arange(0, offset.shape[0]), offset)
    tl.store(value_ptr + tl.arange(0, value.shape[0]), value)


def test_pair_table_chunks_are_the_table_under_the_interpreter(interpret_triton):
    """pair_table_chunks (pure Triton) gives the chunks the PTX above was checked with; fp16 only, as nf4_lut."""
    n = 256 * _lookup().PAIR_COPIES.value // 4
    offsets, values = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    _pair_chunks_kernel[(1,)](torch.tensor(NF4_CODE), offsets, values, DTYPE=tl.float16)
    got = [(o, v & 0xFFFFFFFF) for o, v in zip(offsets.tolist(), values.tolist())]
    assert got == _spec_chunks("fp16")


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
