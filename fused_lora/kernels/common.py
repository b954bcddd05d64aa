"""Helpers shared by the launchers of every kernel path (lora.py, launch_gemm.py, launch_slab.py, launch_decode.py).

Nothing here launches a kernel; Triton is imported lazily, so importing this module is cheap and never touches CUDA.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .._common import TensorCache, refuse_dropout_in_cuda_graph, tensor_state, warn_once
from ..backend import cuda_capability, cuda_sm_count, interpreting

MAX_RANK = 256
NESTED_BLOCKSIZE = 256
# R_PAD of the launches without a low-rank term (the kernels do not read it then); one fixed value, one variant.
FROZEN_R_PAD = 16
# Columns of an NF4 tile taken in the wgmma fragment order (nf4_fragment.py): 16 int32 words of 8 codes per row
FRAGMENT_BLOCK_K = 128
_INT32_MAX = 2**31 - 1


def is_nf4(weight) -> bool:
    return hasattr(weight, "packed") and hasattr(weight, "absmax")


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def rank_pad(r: int) -> int:
    """r rounded up to a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, 1 << (r - 1).bit_length())


def precisions(x, *adapters) -> dict:
    """Low-rank dtype (promotion of fp32, x and the adapters A, B: at least fp32, as the reference's) and dot
    precisions; see lora_fwd.py for the tf32 choice."""
    lowrank = torch.promote_types(x.dtype, torch.float32)
    for t in adapters:
        lowrank = torch.promote_types(lowrank, t.dtype)
    exact = x.dtype == torch.float32
    return {
        "BASE_PRECISION": "ieee" if exact else "tf32",
        "LOWRANK_DTYPE": tl_dtype(lowrank),
        "LOWRANK_PRECISION": "ieee" if exact else "tf32",
    }


# x dtypes whose low-rank dots in lora_u_kernel and lora_vdb_kernel split their fp32 operand in two
# (lora_fwd.split_wide):
# bf16 only, whose range is fp32's, so hi and lo never overflow (an fp16 hi would above 65504, and an fp16 lo
# flushes to zero below 6e-8). Tests add fp16 to run the split code under the CPU interpreter.
SPLIT_DTYPES = (torch.bfloat16,)


def lowrank_split(x, *operands) -> bool:
    """LOWRANK_SPLIT of the u and v/dB kernels: x's dtype in SPLIT_DTYPES and every low-rank operand (A, B, u; None
    skipped) fp32 or x's dtype."""
    return x.dtype in SPLIT_DTYPES and all(t.dtype in (torch.float32, x.dtype) for t in operands if t is not None)


# ---------------------------------------------------------------------------------------------- NF4 scales


# The scale of NF4 block b: absmax_fp32()[b] = absmax[b], or fl(fl(nested_code[absmax_q[b]]·nested_absmax[b // 256])
# + offset) with double quant, computed once by NF4Weight.absmax_fp32 (bitsandbytes' rounding, byte-exact) and kept
# beside the weight's absmax (N·K/blocksize·4 bytes: 1/8 of the packed bytes at blocksize 64) while it lives.
# In fp32 for every kernel but the decode forward: scales rounded to bf16 beforehand (the word lookups' rounding, half
# the bytes) were tried in every kernel; 2-byte loads cannot be asynchronous copies (4 bytes at least), so the decode
# forward's loop took a synchronous load, a shared-memory store and barriers per iteration, and sm_80's NF4 GEMMs and
# a DoRA epilogue spilled more. The decode forward, bound by the HBM, reads them as pairs instead (scale_pairs).
_SCALES = TensorCache()
_SCALE_PAIRS = {torch.bfloat16: TensorCache(), torch.float16: TensorCache()}  # one per dtype: a cache per anchor


def scales_signature(weight):
    """The state of an NF4 weight's scale tensors that its cached scales are keyed on (None for inference tensors:
    nothing can be cached for them)."""
    return tensor_state(weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset)


def decoded_scales(weight) -> torch.Tensor:
    """fp32 [n_blocks] scale of every NF4 block of ``weight`` (contiguous), decoded once and cached beside it;
    recomputed when one of its scale tensors is replaced or modified in place through PyTorch (its data pointer or
    version counter changes). A write PyTorch does not count (through ``.data``, a NumPy or DLPack alias) is not
    seen: docs/DESIGN.md."""
    return _SCALES.get(weight.absmax, scales_signature(weight), lambda: weight.absmax_fp32().float().contiguous())


def scale_pairs(weight, dtype: torch.dtype) -> torch.Tensor:
    """int32 [n_blocks // 2]: the scales of NF4 blocks 2j (low 16 bits) and 2j + 1 (high 16 bits) of ``weight``
    rounded to ``dtype`` (bf16 or fp16, the word lookups' rounding of the scale: the same decoded values), cached
    beside the weight like ``decoded_scales`` (one cache per dtype; 1/16 of the packed bytes at blocksize 64, 1/8 at
    32) and built without it (for a weight without double quantization too, whose fp32 scales are absmax). Read by
    the decode forward (launch_decode.scale_pairs_taken), 4 bytes for two blocks: asynchronous copies at half the
    fp32 scales' bytes. Pairs never straddle two rows when every row holds an even number of blocks."""
    if dtype not in _SCALE_PAIRS:
        raise ValueError(f"scale_pairs: scales are paired in bf16 or fp16, not {dtype}")
    if weight.absmax.numel() % 2:
        raise ValueError(f"scale_pairs: an odd number of NF4 blocks ({weight.absmax.numel()}) has no pairs")
    return _SCALE_PAIRS[dtype].get(weight.absmax, scales_signature(weight),
                                   lambda: weight.absmax_fp32().to(dtype).contiguous().view(torch.int32))


class WeightArgs(NamedTuple):
    """How a launcher passes W to lora_fwd.load_weight_tile: the six pointer arguments (w_ptr, absmax_ptr, code_ptr,
    nested_absmax_ptr, nested_code_ptr, offset_ptr; None where absent), W's strides (dense W only; 0 for NF4) and
    the constexprs that select the layout."""

    pointers: tuple
    stride_wn: int
    stride_wk: int
    constexprs: dict


_STANDARD_CODE = TensorCache()


def has_standard_code(weight) -> bool:
    """Whether ``weight.code`` is bitsandbytes' NF4 table (the register lookups hold it as constants), checked once
    per code tensor (and again when it changes)."""
    from .nf4_lookup import NF4_VALUES

    def compute() -> bool:
        table = torch.tensor(NF4_VALUES, dtype=torch.float32)
        return bool(torch.equal(weight.code.detach().float().cpu().reshape(-1), table))

    return _STANDARD_CODE.get(weight.code, tensor_state(weight.code), compute)


def lookup_mode(weight, dtype: torch.dtype, pair_table: bool = False) -> str:
    """How the NF4 kernels turn a 4-bit code into its value (nf4_lookup.py): "prmt" (byte permutes in registers,
    inline PTX; bf16/fp16 on a GPU: code and scale rounded to the compute dtype, then multiplied), "lds" instead of
    "prmt" with ``pair_table`` (the same values from a 32 KiB table of value pairs in shared memory: the decode
    forward, launch_decode.pair_table_shared, and sm_90's middle GEMMs, launch_gemm.gemm_lookup), "tree" (a select
    tree over NF4's 16 fp32 values in registers: exact; the CPU interpreter, which runs no inline assembly, for a
    weight with NF4's table), or "gather" (a load from the 16-entry table: exact; fp32 on a GPU, and any other
    table under the interpreter)."""
    if not is_nf4(weight):
        return "gather"  # not read
    if interpreting():
        return "tree" if has_standard_code(weight) else "gather"
    if dtype not in (torch.float16, torch.bfloat16):
        return "gather"
    return "lds" if pair_table else "prmt"


# The keys (launch_lookup's ``key``: a kernel path, what sizes its shared memory, and the device) whose launch with
# the shared-memory pair table (LOOKUP "lds") was refused for its resources: they use the byte permutes from then on.
PAIR_TABLE_FAILED: set = set()


def pair_table_allowed(key) -> bool:
    """Whether a launch keyed ``key`` may use the shared-memory pair table: on a GPU, and not refused before."""
    return not interpreting() and key not in PAIR_TABLE_FAILED


def launch_lookup(launch, lookup: str, key, what: str) -> None:
    """``launch(lookup)``. The pair table (LOOKUP "lds") is 32 KiB of static shared memory that Triton does not see
    (nf4_lookup.py): should the launch be refused for its resources (another Triton, another GPU), ``launch("prmt")``
    instead (the same values), warn once and keep ``key`` off the table from then on (PAIR_TABLE_FAILED). Any other
    error is raised (e.g. a sticky illegal address is not the table's)."""
    from .autotune import is_resource_error

    if lookup != "lds":
        launch(lookup)
        return
    try:
        launch("lds")
    except Exception as error:  # noqa: BLE001 - filtered just below
        if not is_resource_error(error):
            raise
        launch("prmt")
        warn_once(f"fused_lora: {what}'s shared-memory NF4 table did not launch on {key[-1]} "
                  f"({(str(error).splitlines() or [''])[0][:200]}); it uses the byte-permute lookup from now on "
                  "(slower)", key=f"pair-table-{key}")  # fmt: skip
        PAIR_TABLE_FAILED.add(key)  # after the warning: with warnings as errors every call raises


def w_first(weight, dtype: torch.dtype) -> bool:
    """Whether the GEMM kernels take W's tile as the first (register) operand of the dot (W_FIRST): for an NF4 W
    decoded in registers. On sm_90 the decoded tile then feeds wgmma from registers, so the loop keeps one MMA in
    flight (as the second operand it is stored to shared memory and each MMA is waited for at once); on sm_80 it
    needs fewer instructions and registers than the second-operand form too (compiled: 651 vs 671 SASS per
    iteration, 104 vs 140 B spilled at 128×128×64, 4 warps)."""
    return lookup_mode(weight, dtype) != "gather"


def has_row_scales(weight, K: int) -> bool:
    """Whether every row of the NF4 ``weight`` (K input features) holds whole blocks: one scale per (row, block), K a
    multiple of an even power-of-two blocksize (ROW_SCALES)."""
    blocksize = int(weight.blocksize)
    return blocksize >= 2 and blocksize & (blocksize - 1) == 0 and K % blocksize == 0


def weight_args(weight, K: int, dtype: torch.dtype, pairs: bool = False) -> WeightArgs:
    """The W arguments of the GEMM kernels for a dense or NF4 weight with K input features, computing in ``dtype``.

    NF4 weights are passed with their decoded fp32 scales (``decoded_scales``) as absmax and DOUBLE_QUANT False:
    the kernels read one fp32 scale per (row, block) and never decode the double-quant chain themselves; with
    ``pairs`` (the decode forward's SCALE_PAIRS) the scales as pairs in ``dtype`` instead (``scale_pairs``)."""
    if not is_nf4(weight):
        return WeightArgs(
            pointers=(weight, None, None, None, None, None), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            constexprs={"IS_NF4": False, "DOUBLE_QUANT": False, "BLOCKSIZE": 1, "NESTED_BLOCKSIZE": 1,
                        "ROW_SCALES": False},
        )  # fmt: skip
    blocksize = int(weight.blocksize)
    # The kernels index every NF4 tensor as contiguous: packed bytes are W-sized, and unsupported_reason sends
    # non-contiguous ones to the reference; the code table is made contiguous here (no copy when it already is).
    row_scales = has_row_scales(weight, K)
    return WeightArgs(
        pointers=(weight.packed, scale_pairs(weight, dtype) if pairs else decoded_scales(weight),
                  weight.code.contiguous(), None, None, None),
        stride_wn=K // 2 if row_scales else 0, stride_wk=1 if row_scales else 0,
        constexprs={"IS_NF4": True, "DOUBLE_QUANT": False, "BLOCKSIZE": blocksize,
                    "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "ROW_SCALES": row_scales},
    )  # fmt: skip


def compile_options(weight) -> dict:
    """Triton compile options of the GEMM kernels for this W. NF4: no FP contraction (a decoded weight is a multiply
    of two exact fp32 values, never fused with an add; the option is kept so that a double-quant scale decoded in a
    kernel would round like bitsandbytes, see lora_fwd.py); the interpreter ignores it. Dense: contraction on
    (stated explicitly, because triton 3.9 warns when the option is left to its changing default)."""
    return {"enable_fp_fusion": not is_nf4(weight)}


def strides(t) -> tuple[int, int]:
    """t's two strides, or (0, 0) for an operand that is absent (None) and never read."""
    return (0, 0) if t is None else t.stride()


def dropout_args(dropout_p: float, seed: int) -> dict:
    """The dropout arguments of a kernel launch (dropout.py); refused inside a CUDA graph capture."""
    refuse_dropout_in_cuda_graph(dropout_p)
    return {"seed": int(seed), "p": float(dropout_p), "keep_scale": 1.0 / (1.0 - dropout_p)}


def gemm(kernel, x, out_name: str, reduce_name: str, reset_to_zero: tuple = ()):
    """The GEMM kernel to launch and the fixed meta-parameters: autotuned on a GPU, one small config when
    interpreting."""
    if interpreting():
        from .autotune import INTERPRETER_CONFIG

        return kernel, dict(INTERPRETER_CONFIG)
    from .autotune import autotuned

    capability = cuda_capability(x.device)
    return autotuned(kernel, capability, out_name, reduce_name, reset_to_zero), {}


def device_guard(x):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def int32_columns(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it when a column offset (column index · column stride) would overflow int32.

    The kernels compute row offsets in int64 and the column offsets of x and g in int32 (cheaper, and exact for any
    tensor whose last dimension is contiguous); only a huge transposed x or g needs the copy. A dense W is read with
    int64 column offsets (a transposed view of a large W is not copied).
    """
    if t.shape[1] > 0 and (t.shape[1] - 1) * abs(t.stride(1)) > _INT32_MAX:
        return t.contiguous()
    return t


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (8 under the interpreter: enough programs to cross every split)."""
    if interpreting() or torch.device(device).type != "cuda":
        return 8
    return cuda_sm_count(device)


def fixed_order_sum(parts: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 of the partial results of a split reduction. torch's reduction kernels use no atomics: the
    order of the additions depends only on the shape and the device, so the result is bitwise reproducible."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)
