"""NF4 code → value in registers, without a per-element memory gather.

Symbols: a packed byte holds two 4-bit codes, q_hi = byte >> 4 (the even element, first in memory) and
q_lo = byte & 15; code[q] is bitsandbytes' NF4 table (NF4_VALUES below, the same 16 fp32 numbers as
fused_lora.nf4.NF4_CODE; launchers use these lookups only for a weight whose ``code`` is that table).

    nf4_tree(q)            code[q] in fp32, exactly: a 4-level tl.where tree on the bits of q over the 16 values
                           as constants (15 selects; pure Triton, so the CPU interpreter runs it)
    nf4_prmt(bytes, DTYPE) (code[q_hi], code[q_lo]) rounded to DTYPE (bf16 or fp16), 4 bytes (8 codes) per
                           23 instructions: byte permutes (PRMT) over the 16 values' low and high bytes held in 8
                           registers; inline PTX, so GPU only (the interpreter runs no assembly)

How nf4_prmt decodes one 32-bit word x = bytes B0..B3 (B0 lowest): its low 16 bits are the nibbles
n0 = lo(B0), n1 = hi(B0), n2 = lo(B1), n3 = hi(B1). With s = x & 0x7777 and t = (x >> 3) & 0x1111,
    L = prmt(L0, L1, s) where n < 8, prmt(L2, L3, s) where n ≥ 8   (byte i = low byte of T[n_i]; the choice per
    H = the same over the high bytes H0..H3                          byte is a bit-select with the mask
    mask = prmt(0xFF00, 0, t)                                       byte i = 0xFF iff n_i ≥ 8)
then the two bf16 results of B0, B1's high nibbles are prmt(L, H, 0x7351) and of their low nibbles
prmt(L, H, 0x6240); the high 16 bits of x (B2, B3) the same way with s >> 16, t >> 16. T[j] is code[j] rounded
to DTYPE (round to nearest even); Lk/Hk hold the low/high bytes of T[4k..4k+3].
tests/test_kernels_lookup.py runs this PTX text through a small emulator of the five instructions it uses, for
every byte value, on the CPU.
"""

import struct

import triton
import triton.language as tl

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

C0 = tl.constexpr(NF4_VALUES[0])
C1 = tl.constexpr(NF4_VALUES[1])
C2 = tl.constexpr(NF4_VALUES[2])
C3 = tl.constexpr(NF4_VALUES[3])
C4 = tl.constexpr(NF4_VALUES[4])
C5 = tl.constexpr(NF4_VALUES[5])
C6 = tl.constexpr(NF4_VALUES[6])
C7 = tl.constexpr(NF4_VALUES[7])
C8 = tl.constexpr(NF4_VALUES[8])
C9 = tl.constexpr(NF4_VALUES[9])
C10 = tl.constexpr(NF4_VALUES[10])
C11 = tl.constexpr(NF4_VALUES[11])
C12 = tl.constexpr(NF4_VALUES[12])
C13 = tl.constexpr(NF4_VALUES[13])
C14 = tl.constexpr(NF4_VALUES[14])
C15 = tl.constexpr(NF4_VALUES[15])


def _fp32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


assert all(_fp32(v) == v for v in NF4_VALUES), "the NF4 values must be exact fp32 numbers"


def _half_bits(value: float, dtype: str) -> int:
    """The 16-bit pattern of ``value`` (an fp32 number) rounded to nearest even in "bf16" or "fp16"."""
    if dtype == "fp16":
        return struct.unpack("<H", struct.pack("<e", value))[0]
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even (no NaN here)


def prmt_tables(dtype: str) -> tuple[list[int], list[int]]:
    """([L0..L3], [H0..H3]): the low and high bytes of the 16 values in ``dtype``, four per 32-bit word."""
    bits = [_half_bits(v, dtype) for v in NF4_VALUES]
    low = [sum((bits[4 * k + i] & 0xFF) << (8 * i) for i in range(4)) for k in range(4)]
    high = [sum((bits[4 * k + i] >> 8) << (8 * i) for i in range(4)) for k in range(4)]
    return low, high


def prmt_asm(dtype: str) -> str:
    """The PTX of nf4_prmt for one 32-bit word ($4) → hi-nibble values ($0: B0,B1; $1: B2,B3) and lo-nibble values
    ($2: B0,B1; $3: B2,B3), each register two ``dtype`` values (the first in the low half)."""
    low, high = prmt_tables(dtype)
    lines = [
        "{",
        ".reg .b32 s, t, m, l, h, la, lb, ha, hb;",
        "and.b32 s, $4, 0x77777777;",
        "shr.u32 t, $4, 3;",
        "and.b32 t, t, 0x11111111;",
    ]
    for half, (out_hi, out_lo) in enumerate((("$0", "$2"), ("$1", "$3"))):
        if half:
            lines += ["shr.u32 s, s, 16;", "shr.u32 t, t, 16;"]
        lines += [
            "prmt.b32 m, 0xFF00, 0, t;",
            f"prmt.b32 la, {low[0]:#010x}, {low[1]:#010x}, s;",
            f"prmt.b32 lb, {low[2]:#010x}, {low[3]:#010x}, s;",
            f"prmt.b32 ha, {high[0]:#010x}, {high[1]:#010x}, s;",
            f"prmt.b32 hb, {high[2]:#010x}, {high[3]:#010x}, s;",
            "and.b32 lb, lb, m;",
            "not.b32 m, m;",
            "and.b32 la, la, m;",
            "or.b32 l, la, lb;",
            "and.b32 ha, ha, m;",
            "not.b32 m, m;",
            "and.b32 hb, hb, m;",
            "or.b32 h, ha, hb;",
            f"prmt.b32 {out_hi}, l, h, 0x7351;",
            f"prmt.b32 {out_lo}, l, h, 0x6240;",
        ]
    return "\n".join(lines + ["}"])


PRMT_BF16 = tl.constexpr(prmt_asm("bf16"))
PRMT_FP16 = tl.constexpr(prmt_asm("fp16"))


@triton.jit
def nf4_tree(q):
    """code[q] in fp32 for int32 codes q in [0, 16): a select tree on the bits of q over the 16 constants."""
    b0 = (q & 1) != 0
    l0 = tl.where(b0, C1, C0)
    l1 = tl.where(b0, C3, C2)
    l2 = tl.where(b0, C5, C4)
    l3 = tl.where(b0, C7, C6)
    l4 = tl.where(b0, C9, C8)
    l5 = tl.where(b0, C11, C10)
    l6 = tl.where(b0, C13, C12)
    l7 = tl.where(b0, C15, C14)
    b1 = (q & 2) != 0
    m0 = tl.where(b1, l1, l0)
    m1 = tl.where(b1, l3, l2)
    m2 = tl.where(b1, l5, l4)
    m3 = tl.where(b1, l7, l6)
    b2 = (q & 4) != 0
    n0 = tl.where(b2, m1, m0)
    n1 = tl.where(b2, m3, m2)
    return tl.where((q & 8) != 0, n1, n0)


@triton.jit
def nf4_prmt(packed, DTYPE: tl.constexpr):
    """(code[q_hi], code[q_lo]) of every byte of ``packed`` (uint8), in DTYPE (bf16 or fp16); GPU only."""
    if DTYPE == tl.bfloat16:
        hi, lo = tl.inline_asm_elementwise(
            PRMT_BF16, "=r,=r,=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
        )
    else:
        hi, lo = tl.inline_asm_elementwise(
            PRMT_FP16, "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
    return hi, lo


@triton.jit
def nf4_values(packed, code_ptr, LOOKUP: tl.constexpr, DTYPE: tl.constexpr):
    """The two code values of every byte of ``packed`` (uint8 tile), interleaved along the last axis (element 2j from
    the high nibble of byte j, 2j+1 from its low nibble): fp32 for LOOKUP "tree" and "gather", DTYPE for "prmt"."""
    if LOOKUP == "prmt":
        hi, lo = nf4_prmt(packed, DTYPE)
        return tl.interleave(hi, lo)
    else:
        q = packed.to(tl.int32)
        q = tl.interleave(q >> 4, q & 15)
        if LOOKUP == "tree":
            return nf4_tree(q)
        else:
            return tl.load(code_ptr + q)
