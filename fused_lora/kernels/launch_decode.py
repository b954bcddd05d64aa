"""Launchers of the decode path (M ≤ 64, all rows in one tile): the split-K kernels of lora_decode.py.

Symbols as in lora.py. The number of splits S is chosen so that (tiles of N or K)·S programs fill the GPU
(strategy.Thresholds.decode_programs_per_sm per SM); the partial sums ([S, M, N] or [S, M, K] fp32, a few MB at
most and read back at once, so mostly from L2) are summed in a fixed order by the epilogue kernels.
"""

from __future__ import annotations

import torch

from ..backend import cuda_shared_optin, interpreting
from . import common
from .common import FRAGMENT_BLOCK_K, dropout_args, rank_pad, strides
from .launch_gemm import _splits, epilogue_block_n


def supports(M: int, weight) -> bool:
    """Whether the decode kernels take this call: M ≤ 64 and, for NF4, whole blocks per row (one scale per
    (row, block), K a multiple of an even power-of-two blocksize)."""
    if M > 64:
        return False
    if not common.is_nf4(weight):
        return True
    return common.has_row_scales(weight, weight.shape[1])  # (not weight_args, which would decode the scales)


def _fragment(weight, K: int) -> bool:
    """Whether the forward kernel takes NF4 tiles in the wgmma fragment order (nf4_fragment.py): whole 128-column
    tiles (K a multiple of 128; supports() already asked for whole blocks per row)."""
    return common.is_nf4(weight) and K % FRAGMENT_BLOCK_K == 0


def scale_pairs_taken(weight, K: int, lookup: str, block_m: int) -> bool:
    """Whether the decode forward reads the block scales as pairs in the compute dtype (common.scale_pairs, SCALE_PAIRS:
    4 bytes for two blocks, half the fp32 scales' HBM bytes): tiles in the fragment order, blocks of at most 64 (two
    or more per tile row, so an even number per row), a lookup that rounds the scale to the compute dtype anyway
    ("prmt", "lds": the same values as the fp32 scales give; the interpreter's exact lookups keep fp32), and scales
    that can be cached (not inference tensors: the pairs would be rebuilt at every call, more bytes than they save).
    Not blocks of 32 at BLOCK_M 64, where the pairs' four scales per row and tile make the kernel spill (compiled,
    BLOCK_M 64: 88 B on sm_90, 216 B on sm_80, none with fp32 scales; blocks of 64 spill less with pairs: none
    instead of 84 B on sm_90)."""
    if not _fragment(weight, K):  # (a dense W has no scales)
        return False
    blocksize = int(weight.blocksize)
    return (blocksize <= 64 and (blocksize == 64 or block_m <= 32) and lookup in ("prmt", "lds")
            and common.scales_signature(weight) is not None)


def _block_m(M: int) -> int:
    return max(16, 1 << (max(M, 1) - 1).bit_length())


def _epilogue_warps(block_m: int) -> int:
    """Warps of the decode epilogues: 8 for 64-row tiles, where 4 spilled the fp32 tile beside the low-rank operands
    at r = 64 (60-88 B per thread on sm_90, compiled by tests/_compile_kernels.py)."""
    return 8 if block_m >= 64 else 4


# The forward's fragment-order config with the shared-memory pair table (LOOKUP "lds", nf4_lookup.py), taken at
# BLOCK_M 16 and 32 (M ≤ 32) where its shared memory fits the GPU (pair_table_shared): 5 pipeline stages (4 tiles of W
# in flight) beside the table's 32 KiB. Triton's dynamic share is over 48 KiB on purpose: only then does Triton's
# launcher opt in to more than 48 KiB per block, and the static table counts towards that limit
# (tests/test_kernels_compile.py checks both on the compiled kernels). Should a launch fail anyway (another Triton,
# another GPU), the device falls back to the byte permutes with one warning. At BLOCK_M 32 the byte permutes bound
# the loop by the ALU pipe (321 ALU of 585 SASS per iteration, sm_90a): the table makes it 96 of 441, a decode
# forward 20 % faster at M = 32 by the offline model (K=4096, N=14336).
PAIR_TABLE_STAGES = 5
# Triton's shared memory for the W loop at PAIR_TABLE_STAGES, blocksize 64 (the scales as pairs), per BLOCK_M (triton
# 3.9: 55808 B on sm_90 and 51200 B on sm_80 at 16, 76800 B and 67584 B at 32), rounded up; smaller blocks add their
# scales (pair_table_shared)
PAIR_TABLE_W_LOOP_SHARED = {16: 56 * 1024, 32: 76 * 1024}


def pair_table_shared(r_pad: int, a_bytes: int, has_lora: bool, blocksize: int, block_m: int = 16) -> int:
    """An upper bound of the decode forward's shared memory per block with the pair table at ``block_m`` (a key of
    PAIR_TABLE_W_LOOP_SHARED; bytes): the static table, plus Triton's rings: the larger of the W loop's (with the
    scale pairs of blocks smaller than 64: 128 rows · 64 / blocksize words per tile) and the u column's
    (PAIR_TABLE_STAGES - 1 tiles of x, counted in fp32 as the low-rank dot takes it, and of min(r_pad, 64) rows of
    A; the two loops are in different branches and share the space). tests/test_kernels_compile.py checks it
    against the compiled kernels."""
    from .nf4_lookup import PAIR_TABLE_BYTES

    small_blocks = max(0, 64 // blocksize - 1) * 128 * 4
    w_loop = PAIR_TABLE_W_LOOP_SHARED[block_m] + (PAIR_TABLE_STAGES - 1) * small_blocks
    u_tiles = block_m * FRAGMENT_BLOCK_K * 4 + min(r_pad, 64) * FRAGMENT_BLOCK_K * a_bytes if has_lora else 0
    return PAIR_TABLE_BYTES + max(w_loop, (PAIR_TABLE_STAGES - 1) * u_tiles)


def _w_args(weight, K: int, dtype, pairs: bool = False) -> tuple:
    """(w_ptr, scale_ptr, code_ptr, stride_wn, stride_wk, IS_NF4, BLOCKSIZE); the scales as pairs with ``pairs``."""
    w = common.weight_args(weight, K, dtype, pairs)
    pointers = w.pointers
    return (pointers[0], pointers[1], pointers[2], w.stride_wn, w.stride_wk, w.constexprs["IS_NF4"],
            w.constexprs["BLOCKSIZE"])  # fmt: skip


def forward(x2d, weight, y, precisions, A=None, B=None, scaling=0.0, bias=None, dropout_p=0.0, seed=0):
    """y = x·deq(W)ᵀ + b (+ s·u·Bᵀ); returns u = (m⊙x)·Aᵀ (M, r) fp32 when A is given, else None."""
    import triton

    from .lora_decode import lora_decode_fwd_epilogue_kernel, lora_decode_fwd_kernel, u_parts_per_trip
    from .pdl import launch_args

    M, K = x2d.shape
    N = y.shape[1]
    has_lora = A is not None
    r = A.shape[0] if has_lora else 0
    r_pad = rank_pad(r) if has_lora else common.FROZEN_R_PAD
    block_m = _block_m(M)
    fragment = _fragment(weight, K)
    # a 32-row tile needs more shared memory than a 16-row one: a refused launch of one leaves the other's table
    table_key = ("decode forward", block_m, x2d.device)
    pair_table = (fragment and block_m in PAIR_TABLE_W_LOOP_SHARED and common.pair_table_allowed(table_key)
                  and pair_table_shared(r_pad, A.element_size() if has_lora else 0, has_lora, int(weight.blocksize),
                                        block_m) <= cuda_shared_optin(x2d.device))  # fmt: skip
    if fragment:
        block_n, block_k, warps = (128, FRAGMENT_BLOCK_K, 4)
    else:
        # a dense W: 256 columns per K step, 128 for 64-row tiles (256 spilled x's tile: 208-392 B on sm_90)
        block_n, block_k, warps = (32, 64, 4) if interpreting() else (64, 256 if block_m < 64 else 128, 4)
    splits, k_per_split = _splits(K, block_k, triton.cdiv(N, block_n) + has_lora, x2d.device, decode=True)
    y_part = torch.empty((splits, M, N), device=x2d.device, dtype=torch.float32)
    u_part = torch.empty((splits, M, r), device=x2d.device, dtype=torch.float32) if has_lora else None
    lookup = common.lookup_mode(weight, x2d.dtype, pair_table)
    pairs = scale_pairs_taken(weight, K, lookup, block_m)
    w_ptr, scale_ptr, code_ptr, stride_wn, stride_wk, is_nf4, blocksize = _w_args(weight, K, x2d.dtype, pairs)

    def launch(lookup: str) -> None:
        stages = {"num_stages": PAIR_TABLE_STAGES} if lookup == "lds" else {}
        lora_decode_fwd_kernel[(triton.cdiv(N, block_n) + has_lora, splits)](  # + u's column
            x2d, w_ptr, scale_ptr, code_ptr, A, y_part, u_part,
            M, N, K, r, k_per_split,
            x2d.stride(0), x2d.stride(1), stride_wn, stride_wk, *strides(A),
            y_part.stride(0), y_part.stride(1), *(u_part.stride()[:2] if has_lora else (0, 0)),
            **dropout_args(dropout_p, seed),
            IS_NF4=is_nf4, BLOCKSIZE=blocksize, LOOKUP=lookup, FRAGMENT=fragment, SCALE_PAIRS=pairs, HAS_LORA=has_lora,
            DROPOUT=dropout_p > 0.0, **precisions,
            R_PAD=r_pad, R_CHUNK=min(r_pad, 64), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            **stages, **common.compile_options(weight), **launch_args(x2d.device),
        )  # fmt: skip

    common.launch_lookup(launch, lookup, table_key, f"the decode forward at {block_m} rows")
    u = torch.empty((M, r), device=x2d.device, dtype=torch.float32) if has_lora else None
    if bias is not None:
        bias = bias.contiguous()
    epilogue_n = epilogue_block_n()
    lora_decode_fwd_epilogue_kernel[(triton.cdiv(N, epilogue_n),)](
        y_part, u_part, B, bias, y, u,
        M, N, r, splits, splits, y_part.stride(0), y_part.stride(1), *(u_part.stride()[:2] if has_lora else (0, 0)),
        *strides(B), y.stride(0), y.stride(1), u.stride(0) if has_lora else 0, float(scaling),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, STORE_U=has_lora, LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"],
        LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"], R_PAD=r_pad, R_CHUNK=min(r_pad, 64), BLOCK_M=block_m,
        BLOCK_N=epilogue_n, U_PER_TRIP=u_parts_per_trip(block_m, min(r_pad, 64)), num_warps=_epilogue_warps(block_m),
        **launch_args(x2d.device),
    )  # fmt: skip
    return u


def dx(g, weight, dx_out, precisions, x2d=None, A=None, v=None, need_dA=False, scaling=0.0, dropout_p=0.0, seed=0):
    """dx_out = g·deq(W) (+ s·m⊙(v·A)) when dx_out is given; returns dA = s·vᵀ·(m⊙x) (r, K) fp32 when need_dA."""
    import triton

    from .lora_decode import lora_decode_dx_epilogue_kernel, lora_decode_dx_kernel
    from .pdl import launch_args

    M, N = g.shape
    K = weight.shape[1]
    has_lora = v is not None
    r = A.shape[0] if has_lora else 0
    r_pad = rank_pad(r) if has_lora else common.FROZEN_R_PAD
    block_m = _block_m(M)
    dx_part, splits = None, 1
    if dx_out is not None:
        block_n, block_k, warps = (32, 32, 4) if interpreting() else (128, 128, 4)
        splits, n_per_split = _splits(N, block_n, triton.cdiv(K, block_k), g.device, decode=True)
        dx_part = torch.empty((splits, M, K), device=g.device, dtype=torch.float32)
        w_ptr, scale_ptr, code_ptr, stride_wn, stride_wk, is_nf4, blocksize = _w_args(weight, K, g.dtype)
        even = N % block_n == 0 and K % block_k == 0  # (n_per_split is a multiple of block_n)
        lora_decode_dx_kernel[(triton.cdiv(K, block_k), splits)](
            g, w_ptr, scale_ptr, code_ptr, dx_part,
            M, N, K, n_per_split, g.stride(0), g.stride(1), stride_wn, stride_wk, dx_part.stride(0), dx_part.stride(1),
            IS_NF4=is_nf4, BLOCKSIZE=blocksize, LOOKUP=common.lookup_mode(weight, g.dtype), EVEN=even,
            BASE_PRECISION=precisions["BASE_PRECISION"], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **common.compile_options(weight), **launch_args(g.device),
        )  # fmt: skip
    dA32 = torch.empty((r, K), device=g.device, dtype=torch.float32) if need_dA else None
    epilogue_k = 32 if interpreting() else 128
    lora_decode_dx_epilogue_kernel[(triton.cdiv(K, epilogue_k),)](
        dx_part, x2d, A, v, dx_out, dA32,
        M, K, r, splits, *(dx_part.stride()[:2] if dx_part is not None else (0, 0)),
        *strides(x2d), *strides(A), *strides(v), *strides(dx_out), *strides(dA32), float(scaling),
        **dropout_args(dropout_p, seed),
        NEED_DX=dx_out is not None, NEED_DA=need_dA, HAS_LORA=has_lora, DROPOUT=dropout_p > 0.0,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        R_PAD=r_pad, R_CHUNK=min(r_pad, 64), BLOCK_M=block_m, BLOCK_K=epilogue_k, num_warps=_epilogue_warps(block_m),
        **launch_args(g.device),
    )  # fmt: skip
    return dA32
