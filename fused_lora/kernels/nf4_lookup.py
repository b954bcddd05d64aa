"""NF4 code → value in registers or from a shared-memory table, without a per-element global memory gather.

Symbols: a packed byte holds two 4-bit codes, q_hi = byte >> 4 (the even element, first in memory) and
q_lo = byte & 15; code[q] is the weight's 16-entry fp32 table (bitsandbytes' NF4 values, NF4_VALUES below, the same
numbers as fused_lora.nf4.NF4_CODE).

    nf4_tree(q)              code[q] in fp32, exactly: a 4-level tl.where tree on the bits of q over the 16 NF4
                             values as constants (15 selects; pure Triton, so the CPU interpreter runs it; used for
                             a weight whose code is NF4's, common.has_standard_code)
    nf4_prmt(words, lut, T)  the 8 values of each int32 word (4 packed bytes, 8 codes) rounded to T (bf16 or fp16),
                             in 21 instructions: byte permutes (PRMT) over the low and high bytes of the 16 rounded
                             values, held in 8 registers (lut = nf4_lut(code_ptr, T), computed once per program from
                             the table in memory, so any 16-entry table works); inline PTX, so GPU only
    nf4_lds(words, lane4, T) the same 8 values, in 12 instructions: per byte B of the word one multiply (IMAD pipe),
                             one LOP3 and one LDS from the pair table, (T[hi B], T[lo B]) for each of the 256 byte
                             values, copied 32 times so that each lane reads its own bank (nf4_pair_table fills it
                             once per program: 32 KiB of static shared memory; inline PTX, so GPU only)
    nf4_word_values(words, code_ptr, lut, LOOKUP, T)
                             the 8 values of each int32 word as 8 tensors in the words' own layout, by nf4_prmt,
                             nf4_lds or per nibble by the tree or the gather (nf4_fragment.py reorders them into the
                             MMA's fragment order); nf4_lookup_state(code_ptr, LOOKUP, T) makes the ``lut`` of either

How nf4_prmt decodes one 32-bit word x = bytes B0..B3 (B0 lowest): its low 16 bits are the nibbles
n0 = lo(B0), n1 = hi(B0), n2 = lo(B1), n3 = hi(B1). With s = x & 0x77777777,
    L = prmt(L0, L1, s) where n < 8, prmt(L2, L3, s) where n ≥ 8   (byte i = low byte of T[n_i]; the choice per
    H = the same over the high bytes H0..H3                          byte is a bit-select with the mask below)
    mask = prmt(x << 4, x, 0xD9C8)                                   (byte i = 0xFF iff n_i ≥ 8: the sign, i.e.
                                                                      bit 7, of the byte holding bit 3 of n_i,
                                                                      replicated by prmt's sign mode)
then (T[hi B0], T[lo B0]) = prmt(L, H, 0x4051) and (T[hi B1], T[lo B1]) = prmt(L, H, 0x6273); the high 16 bits of x
(B2, B3) the same way with s >> 16 and the mask selector 0xFBEA. The shifts are multiplies (x << 4 as IMAD.SHL, s >> 16
as mul.hi by 2^16, IMAD.HI): every other instruction of the lookup is an ALU one (PRMT, LOP3), and the ALU pipe, 16
lanes per scheduler, is what bounds a loop that decodes (fused_lora/bench/offline_model.py, alu_cycles); the IMAD
pipe beside it has room. T[j] is code[j] rounded to T (round to nearest even); Lk/Hk hold the low/high bytes of
T[4k..4k+3].
The pair table (LOOKUP "lds"): word 32·e + c (byte address 128·e + 4·c) holds the pair (T[e >> 4], T[e & 15]) of
byte value e, low half first, for c = 0..31. Lane l of a warp reads copy c = l, so its address is in bank l whatever
the byte: a warp's 32 lookups take one shared-memory cycle, where a single copy (1 KiB) would conflict about 3-4 ways
on random bytes. Per byte Bj: a = Bj·128 from the word x by x·128 (j = 0) or the high word of x·2^(31-8(j-1))
(j = 1..3; IMAD.HI, a right shift by 8j - 7), then a = (a & 0x7F80) | 4·l by one LOP3, and one LDS at the table's
address + a (ptxas folds the address into the LDS). 1.5 instructions per value instead of nf4_prmt's 2.6, of which
0.5 on the ALU pipe (nf4_prmt: 2.4): the decode forward's loop, which the ALU pipe bounded, becomes bound by issue
and the HBM (bench/results/offline). The table takes 32 KiB of static shared memory declared by the kernel itself
(a .shared array in inline PTX; Triton does not see it): a kernel that uses it must ask Triton for more than 48 KiB
of dynamic shared memory, or stay under 48 KiB in all, to launch (launch_decode.PAIR_TABLE_STAGES,
tests/test_kernels_compile.py). The decode forward uses it, and on sm_90 the middle path's NF4 GEMMs
(launch_gemm.gemm_lookup): their configs all ask Triton for more than 48 KiB, and one that does not fit beside the
table is refused at launch and skipped by the autotuner. With the table and loads without masks (K_DIVISOR) the
forward's loop at 256x128x64 takes 198 SASS per iteration instead of 284 (1.37x the dense loop instead of 1.96x) and
the dx loop at 64x128x64 299 instead of 394 (2.53x; sm_90a, K=4096, N=14336, bench/results/offline): the forward is
bound by the MMA either way in the offline model, dx by the shared-memory pipe instead of the ALU one (its W tile goes
through shared memory for the transposed operand). At middle M dx now takes autotune.NF4_DX_TILE, 128x64x64, with W's
pointers rebased per tile (lora_dx_kernel's REBASE): 180 SASS per iteration (1.42x), bound by the MMA. The decode dx
kernel keeps the byte permutes: with the table it became bound by the shared-memory pipe instead of the ALU, at the
same predicted time.

tests/test_kernels_lookup.py runs these PTX texts through a small emulator of the instructions they use, for every
byte value in every position (and every lane), on the CPU, and checks nf4_lut, pair_table_chunks and the element
order of join8 under the interpreter.
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


def prmt_asm() -> str:
    """The PTX of nf4_prmt for one 32-bit word $8 (bytes B0..B3, B0 lowest) → its 8 values $0..$7 (16-bit registers,
    in element order: $2j from the high nibble of Bj, $2j+1 from its low nibble, each consecutive pair one 32-bit
    register). $9..$12 are L0..L3 and $13..$16 H0..H3 (nf4_lut): operands loaded from memory rather than
    immediates, so that they stay in registers across a loop instead of being rematerialised for every word."""
    lines = [
        "{",
        ".reg .b32 s, x4, m, l, h, la, lb, ha, hb, o;",
        "and.b32 s, $8, 0x77777777;",
        "shl.b32 x4, $8, 4;",
    ]
    # mask byte i = 0xFF iff bit 3 of nibble i is set: the sign of the byte whose bit 7 is that bit (bytes of x4
    # for the low nibbles, of x for the high ones), replicated by prmt's sign mode (selector bit 3)
    for half, mask_selector in enumerate(("0xD9C8", "0xFBEA")):
        if half:
            lines.append("mul.hi.u32 s, s, 65536;")  # s >> 16 on the IMAD pipe (module docstring)
        first = 4 * half
        lines += [
            f"prmt.b32 m, x4, $8, {mask_selector};",
            "prmt.b32 la, $9, $10, s;",
            "prmt.b32 lb, $11, $12, s;",
            "prmt.b32 ha, $13, $14, s;",
            "prmt.b32 hb, $15, $16, s;",
            "and.b32 lb, lb, m;",
            "and.b32 hb, hb, m;",
            "not.b32 m, m;",
            "and.b32 la, la, m;",
            "and.b32 ha, ha, m;",
            "or.b32 l, la, lb;",
            "or.b32 h, ha, hb;",
            "prmt.b32 o, l, h, 0x4051;",  # (T[hi B0], T[lo B0]) of this half: two consecutive elements
            f"mov.b32 {{${first}, ${first + 1}}}, o;",
            "prmt.b32 o, l, h, 0x6273;",  # (T[hi B1], T[lo B1])
            f"mov.b32 {{${first + 2}, ${first + 3}}}, o;",
        ]
    return "\n".join(lines + ["}"])


PRMT_ASM = tl.constexpr(prmt_asm())
PRMT_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r")


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
def _half_bits_of(code_ptr, q, DTYPE: tl.constexpr):
    """The 16-bit pattern of code[q] rounded to DTYPE, in the low half of an int32."""
    return tl.load(code_ptr + q).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _lut_word(code_ptr, FIRST: tl.constexpr, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """Bytes SHIFT/8 of code[FIRST..FIRST+3] rounded to DTYPE, packed little-endian into one int32."""
    word = tl.full((), 0, tl.int32)
    for i in tl.static_range(4):
        word = word | (((_half_bits_of(code_ptr, FIRST + i, DTYPE) >> SHIFT) & 0xFF) << (8 * i))
    return word


@triton.jit
def nf4_lut(code_ptr, DTYPE: tl.constexpr):
    """The registers of nf4_prmt, (L0, L1, L2, L3, H0, H1, H2, H3) (see the module docstring), from the 16 fp32 code
    values at code_ptr rounded to DTYPE. Computed once per program, before its main loop: values loaded from memory
    stay in ordinary registers, where constants would be rematerialised from uniform registers for every word."""
    return (
        _lut_word(code_ptr, 0, 0, DTYPE), _lut_word(code_ptr, 4, 0, DTYPE),
        _lut_word(code_ptr, 8, 0, DTYPE), _lut_word(code_ptr, 12, 0, DTYPE),
        _lut_word(code_ptr, 0, 8, DTYPE), _lut_word(code_ptr, 4, 8, DTYPE),
        _lut_word(code_ptr, 8, 8, DTYPE), _lut_word(code_ptr, 12, 8, DTYPE),
    )  # fmt: skip


@triton.jit
def _eight_values(ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, operands, DTYPE: tl.constexpr):
    """The 8 DTYPE (bf16 or fp16) values the PTX ``ASM`` makes of each int32 word of operands[0] (as 8 tensors)."""
    if DTYPE == tl.bfloat16:
        values = tl.inline_asm_elementwise(
            ASM, CONSTRAINTS, operands, is_pure=False, pack=1,
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                   tl.bfloat16),
        )  # fmt: skip
    else:
        values = tl.inline_asm_elementwise(
            ASM, CONSTRAINTS, operands, is_pure=False, pack=1,
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
        )  # fmt: skip
    return values


@triton.jit
def nf4_prmt(words, lut, DTYPE: tl.constexpr):
    """The 8 values of every int32 word of packed bytes (8 tensors of ``words``' shape, element order), in DTYPE
    (bf16 or fp16), ``lut`` from nf4_lut; GPU only. Not marked pure, so that Triton decodes in the layout the words
    are loaded in (16 contiguous bytes per thread) and converts the decoded values, rather than moving the
    conversion up to the bytes (one byte-wide shared-memory load per byte)."""
    zero = tl.zeros_like(words)
    operands = [
        words, lut[0] + zero, lut[1] + zero, lut[2] + zero, lut[3] + zero, lut[4] + zero, lut[5] + zero,
        lut[6] + zero, lut[7] + zero,
    ]  # fmt: skip
    return _eight_values(PRMT_ASM, PRMT_CONSTRAINTS, operands, DTYPE)


PAIR_TABLE = "fused_lora_nf4_pairs"  # the PTX name of nf4_pair_table's shared-memory array
PAIR_COPIES = tl.constexpr(32)  # one copy of the table per shared-memory bank
PAIR_TABLE_BYTES = 256 * PAIR_COPIES.value * 4


def pair_declare_asm() -> str:
    """PTX: declare the pair table (static shared memory, one per kernel: nf4_pair_table runs once per program) and
    return the thread's lane."""
    return f".shared .align 16 .b8 {PAIR_TABLE}[{PAIR_TABLE_BYTES}];\nmov.u32 $0, %laneid;"


def pair_store_asm() -> str:
    """PTX: store the 32-bit value $2 four times (4 consecutive copies, 16 bytes) at byte offset $1 of the pair table
    ($0: a dummy result)."""
    return (f"{{\n.reg .b32 a;\nmov.u32 a, {PAIR_TABLE};\nadd.u32 a, a, $1;\n"
            "st.shared.v4.b32 [a], {$2, $2, $2, $2};\nmov.u32 $0, 0;\n}")


def lds_asm() -> str:
    """The PTX of nf4_lds for one 32-bit word $8 (bytes B0..B3, B0 lowest) → its 8 values $0..$7 in element order
    (as prmt_asm); $9 = 4·lane (nf4_pair_table). Byte Bj is moved to bits 7..14 by a multiply (IMAD pipe: ×128 for
    B0, the high word of ×2^31, ×2^23, ×2^15 for B1..B3), masked and combined with 4·lane by one LOP3 into the offset
    128·Bj + 4·lane of its pair in the thread's own bank, and read by one LDS (the table's address folds into it)."""
    lines = ["{", ".reg .b32 a, t, o;", f"mov.u32 t, {PAIR_TABLE};"]
    shifts = ("mul.lo.u32 a, $8, 128;", "mul.hi.u32 a, $8, 0x80000000;", "mul.hi.u32 a, $8, 0x800000;",
              "mul.hi.u32 a, $8, 0x8000;")  # fmt: skip
    for j, shift in enumerate(shifts):
        lines += [
            shift,
            "lop3.b32 a, a, 0x7F80, $9, 0xEA;",  # (a & 0x7F80) | 4·lane
            "add.u32 a, a, t;",
            "ld.shared.b32 o, [a];",
            f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, o;",  # (T[hi Bj], T[lo Bj])
        ]
    return "\n".join(lines + ["}"])


PAIR_DECLARE_ASM = tl.constexpr(pair_declare_asm())
PAIR_STORE_ASM = tl.constexpr(pair_store_asm())
LDS_ASM = tl.constexpr(lds_asm())
LDS_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r")


@triton.jit
def pair_table_chunks(code_ptr, DTYPE: tl.constexpr):
    """(offset, value) of every 16-byte chunk of the pair table, as two [256·PAIR_COPIES/4] int32 tensors: word
    PAIR_COPIES·e + c holds (T[e >> 4], T[e & 15]) as a DTYPE pair, low half first, for every byte value e and copy
    c, so chunk j (words 4j..4j+3, all of entry e = j // 8) holds that pair 4 times. In chunk order along the tensor:
    consecutive threads store consecutive chunks (no bank conflicts). Pure Triton, so the CPU interpreter checks it
    (tests/test_kernels_lookup.py)."""
    chunk = tl.arange(0, 256 * PAIR_COPIES // 4)
    e = chunk // (PAIR_COPIES // 4)
    pair = _half_bits_of(code_ptr, e >> 4, DTYPE) | (_half_bits_of(code_ptr, e & 15, DTYPE) << 16)
    return chunk * 16, pair


@triton.jit
def nf4_pair_table(code_ptr, DTYPE: tl.constexpr):
    """Declares, fills and publishes (bar.sync) the pair table of LOOKUP "lds"; returns 4·lane, the thread's column
    of it (nf4_lds's ``lut``). Call once per program, before the main loop, where every thread of the program
    arrives (a CTA barrier). GPU only."""
    lane = tl.inline_asm_elementwise(PAIR_DECLARE_ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    offset, value = pair_table_chunks(code_ptr, DTYPE)
    tl.inline_asm_elementwise(PAIR_STORE_ASM, "=r,r,r", [offset, value], dtype=tl.int32, is_pure=False, pack=1)
    # side-effecting asm keeps its order: the barrier follows every store of every thread
    return tl.inline_asm_elementwise("bar.sync 0;\nshl.b32 $0, $1, 2;", "=r,r", [lane], dtype=tl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def nf4_lds(words, lane4, DTYPE: tl.constexpr):
    """The 8 values of every int32 word of packed bytes (as nf4_prmt) from the pair table: 4 LDS, 4 LOP3 and 4
    multiplies per word; ``lane4`` from nf4_pair_table. GPU only."""
    operands = [words, lane4 + tl.zeros_like(words)]
    return _eight_values(LDS_ASM, LDS_CONSTRAINTS, operands, DTYPE)


@triton.jit
def nf4_lookup_state(code_ptr, LOOKUP: tl.constexpr, DTYPE: tl.constexpr):
    """What a word lookup keeps across the main loop (``lut``): nf4_lut's registers for "prmt", 4·lane after
    filling the pair table for "lds", None for the per-element lookups (by falling off the end: Triton 3.6 refuses
    ``return None`` there, "cannot convert None to tensor", and fp32 x on a GPU takes such a lookup)."""
    if LOOKUP == "prmt":
        return nf4_lut(code_ptr, DTYPE)
    elif LOOKUP == "lds":
        return nf4_pair_table(code_ptr, DTYPE)


@triton.jit
def nf4_word_values(words, code_ptr, lut, LOOKUP: tl.constexpr, DTYPE: tl.constexpr):
    """The 8 values of every int32 word of packed bytes, as 8 tensors of ``words``' shape in element order (value j
    from the high nibble of byte j // 2 for even j, its low nibble for odd j): in DTYPE for LOOKUP "prmt"
    (nf4_prmt), exact fp32 for "tree" and "gather"."""
    if LOOKUP == "prmt":
        return nf4_prmt(words, lut, DTYPE)
    elif LOOKUP == "lds":
        return nf4_lds(words, lut, DTYPE)
    else:
        q0 = (words >> 4) & 15
        q1 = words & 15
        q2 = (words >> 12) & 15
        q3 = (words >> 8) & 15
        q4 = (words >> 20) & 15
        q5 = (words >> 16) & 15
        q6 = (words >> 28) & 15
        q7 = (words >> 24) & 15
        if LOOKUP == "tree":
            return (nf4_tree(q0), nf4_tree(q1), nf4_tree(q2), nf4_tree(q3), nf4_tree(q4), nf4_tree(q5), nf4_tree(q6),
                    nf4_tree(q7))
        else:
            return (tl.load(code_ptr + q0), tl.load(code_ptr + q1), tl.load(code_ptr + q2), tl.load(code_ptr + q3),
                    tl.load(code_ptr + q4), tl.load(code_ptr + q5), tl.load(code_ptr + q6), tl.load(code_ptr + q7))


@triton.jit
def join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """[..., W] × 8 → [..., 8·W] with element 8w + j = v_j[w]."""
    joined = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(joined, (v0.shape[0], 8 * v0.shape[1]))


@triton.jit
def nf4_values(packed, code_ptr, lut, LOOKUP: tl.constexpr, DTYPE: tl.constexpr):
    """The code values of a 2-D tile of packed bytes, in element order along the last axis (element 2j from the high
    nibble of byte j, 2j+1 from its low nibble): ``packed`` is uint8 for LOOKUP "tree" and "gather" (values in fp32),
    int32 words of 4 bytes for "prmt" (values in DTYPE, ``lut`` from nf4_lut; None otherwise)."""
    if LOOKUP == "prmt" or LOOKUP == "lds":  # ``packed`` holds int32 words (4 bytes each) here
        v0, v1, v2, v3, v4, v5, v6, v7 = nf4_word_values(packed, code_ptr, lut, LOOKUP, DTYPE)
        return join8(v0, v1, v2, v3, v4, v5, v6, v7)
    else:
        q = packed.to(tl.int32)
        q = tl.interleave(q >> 4, q & 15)
        if LOOKUP == "tree":
            return nf4_tree(q)
        else:
            return tl.load(code_ptr + q)
