"""Launchers of the GEMM kernels (lora_fwd.py, lora_bwd.py) and of the backward reductions (lora_reduce.py).

The middle-M path launches the GEMMs over the NF4 weight itself (decoded in registers in the main loop); the large-M
path (launch_slab.py) launches the same GEMMs over dense slabs of W; a dense W always takes them at M above the
decode path. Symbols as in lora.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..backend import cuda_capability, interpreting
from . import common, strategy
from .common import FROZEN_R_PAD, dropout_args, rank_pad, strides


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(total: int, block: int, other_programs: int, device, decode: bool = False,
            max_splits: int | None = None) -> tuple[int, int]:
    """(splits, elements per split) of a reduction axis of ``total`` elements in steps of ``block``.

    P = other_programs · splits programs of ceil(steps / splits) steps each, on ``sms`` SMs: the busiest SM runs
    ceil(P / sms) programs (those resident together share its issue slots), each costing its steps plus about one
    step of prologue and epilogue (partial sums written and read back). The rule: from the splits that launch between
    half and twice strategy.Thresholds.programs_per_sm programs per SM (decode_programs_per_sm for the decode
    kernels, ``decode``; fewer when there are fewer steps), take the one whose busiest SM costs least, and the fewest
    splits among equals (smaller partial-sum buffers), at most ``max_splits`` when given. Example: 224 tiles × 16
    steps on 132 SMs at 4 per SM takes 4 splits (7 programs of 4 + 1 steps on the busiest SM: 35), where 3 splits of
    6, 6 and 4 steps cost 6·(6 + 1) = 42.
    """
    sms = common.sm_count(device)
    steps = _cdiv(max(total, 1), block)
    other = max(other_programs, 1)
    wanted = strategy.thresholds(device).programs_per_sm_for(decode) * sms
    least, most = _cdiv(_cdiv(wanted, 2), other), _cdiv(2 * wanted, other)
    if max_splits is not None:
        least, most = min(least, max_splits), min(most, max_splits)

    def cost(splits: int) -> tuple[int, int]:
        per_split = _cdiv(steps, splits)
        return _cdiv(other * _cdiv(steps, per_split), sms) * (per_split + 1), splits

    splits = min(range(min(least, steps), min(most, steps) + 1), key=cost)
    per_split = _cdiv(steps, splits) * block
    return _cdiv(max(total, 1), per_split), per_split


def compute_u(x2d, A, dropout_p, seed, precisions, summed: bool = True, max_parts: int | None = None) -> torch.Tensor:
    """u = (m⊙x)·Aᵀ, (M, r) fp32: lora_u_kernel split over K so that the GPU is full even at small M, the splits
    summed in a fixed order; with ``summed`` False the (splits, M, r) partial sums, for a kernel that adds them."""
    import triton

    from .lora_fwd import lora_u_kernel
    from .pdl import launch_args

    M, K = x2d.shape
    r = A.shape[0]
    r_pad = rank_pad(r)
    split = common.lowrank_split(x2d, A)
    # With the split the dot is transposed, A's hi and lo rows first: a wgmma needs at least 64 of them
    block_r = 32 if split else min(r_pad, 64)
    block_m = 16 if interpreting() else min(64, max(16, triton.next_power_of_2(M)))
    block_k = 32 if interpreting() else 64
    programs = triton.cdiv(M, block_m) * triton.cdiv(r_pad, block_r)
    splits, k_per_split = _splits(K, block_k, programs, x2d.device, max_splits=max_parts)
    parts = torch.empty((splits, M, r), device=x2d.device, dtype=torch.float32)
    lora_u_kernel[(triton.cdiv(M, block_m), triton.cdiv(r_pad, block_r), splits)](
        x2d, A, parts, M, K, r, k_per_split,
        x2d.stride(0), x2d.stride(1), A.stride(0), A.stride(1), *parts.stride(),
        **dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0.0,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        LOWRANK_SPLIT=split, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
        **launch_args(x2d.device),
    )  # fmt: skip
    return common.fixed_order_sum(parts) if summed else parts


def m_bucket(M: int) -> int:
    from .autotune import m_bucket as bucket

    return bucket(M)


class YSplit(NamedTuple):
    """The split-K forward of a call whose output tiles would leave SMs idle (y_splits)."""

    meta: dict  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M (+ num_warps, num_stages on a GPU)
    tiles: int
    splits: int
    k_per_split: int


def y_splits(M: int, N: int, K: int, weight, x2d) -> YSplit | None:
    """The split-K plan of y = x·deq(W)ᵀ, or None to launch the tuned GEMM. Split when the split tile
    (autotune.split_tile) gives T = ⌈M/BLOCK_M⌉·⌈N/BLOCK_N⌉ programs with ⌊SMs / T⌋ ≥ 2: S = ⌊SMs / T⌋ splits (one
    program per SM, the partial sums S·M·N·4 bytes ≤ SMs·BLOCK_M·BLOCK_N·4, a few MB) of at least
    Thresholds.split_k_min_steps K steps each. E.g. Llama-3-8B's k_proj (K=4096, N=1024) at M=256: 16 tiles of
    128×128 on 132 SMs run 8 splits of 8 steps instead of 16 programs of 64. Not for an NF4 W without whole blocks
    per row (its tuned configs run with one pipeline stage, autotune.keep_tiles_for_m), and not with fp32 x on a GPU
    (the split tile then spills 2-29 KB per thread, compiled for sm_90 and sm_80 by tests/_compile_kernels.py)."""
    min_steps = strategy.thresholds(x2d.device).split_k_min_steps
    if min_steps <= 0 or M == 0 or N == 0 or (common.is_nf4(weight) and weight.shape[1] % int(weight.blocksize)):
        return None
    if interpreting():  # (fp32 runs here: the interpreter has no registers to spill)
        from .autotune import INTERPRETER_CONFIG

        meta = dict(INTERPRETER_CONFIG)
    elif x2d.element_size() == 4:  # the split tile with fp32 operands spills 2-29 KB per thread: the tuned GEMM
        return None
    else:
        from .autotune import split_tile

        t = split_tile(cuda_capability(x2d.device), M)
        meta = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_out, "BLOCK_K": t.block_reduce, "GROUP_M": t.group_m,
                "num_warps": t.num_warps, "num_stages": t.num_stages}  # fmt: skip
    tiles = _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])
    steps = _cdiv(K, meta["BLOCK_K"])
    splits = min(common.sm_count(x2d.device) // tiles, steps // min_steps)
    if splits < 2:
        return None
    k_per_split = _cdiv(steps, splits) * meta["BLOCK_K"]
    return YSplit(meta, tiles, _cdiv(K, k_per_split), k_per_split)


def forward_split(plan: YSplit, x2d, weight, A, B, scaling, bias, dropout_p, seed, y, precisions) -> torch.Tensor:
    """The LoRA forward of lora.forward on the middle path when its GEMM splits (y_splits gave ``plan``): u's split
    parts from lora_u_kernel, the split GEMM, then one epilogue that sums both (no separate sum of u). Returns u."""
    # The epilogue reads u's parts once per column tile: no more bytes than the partial sums of y it reads anyway
    # (C·U·M·r ≤ S·M·N with C = N / BLOCK_N column tiles), U ≤ S·BLOCK_N / r; lora_u_kernel's own split count fills
    # the GPU with its programs, 64 parts at K=4096 and M=256, which the epilogue of N=4096 read 32 times.
    max_parts = max(1, plan.splits * epilogue_block_n() // rank_pad(A.shape[0]))
    parts = compute_u(x2d, A, dropout_p, seed, precisions, summed=False, max_parts=max_parts)
    u = torch.empty(parts.shape[1:], device=parts.device, dtype=torch.float32)
    _launch_y_split(plan, x2d, weight, bias, y, precisions, parts, B, scaling, u_out=u)
    return u


def pow2_divisor(n: int) -> int:
    """The largest power of two that divides ``n``, at most 256 (every BLOCK_K and BLOCK_N of the GEMMs): the
    K_DIVISOR / N_DIVISOR of the GEMM kernels, whose main loops drop their masks when the block divides it."""
    return min(n & -n, 256) if n > 0 else 1


def k_divisor(K: int, device) -> int:
    """K_DIVISOR of lora_fwd_kernel: pow2_divisor(K), except on a GPU before sm_90 (1: the masked loads), where
    reading x's rows past M as row M - 1, as the unmasked loop does, made the 128x128x64 4-warp tile spill 64 B per
    thread (the large path's dense GEMM on sm_80; compiled by tests/_compile_kernels.py)."""
    device = torch.device(device)
    if not interpreting() and device.type == "cuda" and cuda_capability(device)[0] < 9:
        return 1
    return pow2_divisor(K)


def gemm_lookup(weight, x: torch.Tensor, key) -> str:
    """LOOKUP of an NF4 GEMM of the middle path (common.lookup_mode): the shared-memory pair table on sm_90 and later
    (nf4_lookup.py, "lds": 1.5 instructions per value instead of the byte permutes' 2.6, most of them off the ALU
    pipe), with whole blocks per row (the word lookups), where ``key`` was never refused (common.launch_lookup; the
    launchers key on what decides the shared memory of the tiles they may launch: the M bucket, rank, dtypes and
    epilogue variant).
    The table is 32 KiB of static shared memory that Triton does not count: a tile that no longer fits beside it
    (sm_90a, Triton 3.9: 256x128x64 forward at r = 64) is refused at launch and timed as infinite by the autotuner
    (autotune.bench_without_flush), which takes another. Not sm_80, whose 163 KiB leave no room beside its largest
    tiles."""
    table = (common.is_nf4(weight) and common.has_row_scales(weight, weight.shape[1]) and x.device.type == "cuda"
             and common.pair_table_allowed(key) and cuda_capability(x.device)[0] >= 9)
    return common.lookup_mode(weight, x.dtype, table)


def epilogue_block_n() -> int:
    """BLOCK_N of lora_decode_fwd_epilogue_kernel, the decode forward's epilogue and the split forward's."""
    return 32 if interpreting() else 128


def _launch_y_split(plan: YSplit, x2d, weight, bias, y, precisions, u_parts, B, scaling, u_out=None) -> None:
    """y = Σ_s y_part[s] + b + s·u·Bᵀ with u = Σ u_parts (stored to u_out when given): lora_fwd_kernel SPLIT_K into
    fp32 partial sums, then the decode path's epilogue kernel (the sums in a fixed order, the bias and the low-rank
    term)."""
    from .lora_decode import lora_decode_fwd_epilogue_kernel, u_parts_per_trip
    from .lora_fwd import lora_fwd_kernel
    from .pdl import launch_args

    M, K = x2d.shape
    N = y.shape[1]
    if bias is not None:
        bias = bias.contiguous()  # the epilogue reads b[n] at bias_ptr + n
    w = common.weight_args(weight, K, x2d.dtype)
    part = torch.empty((plan.splits, M, N), device=x2d.device, dtype=torch.float32)
    table_key = ("split forward", x2d.dtype, x2d.device)  # one tile (autotune.split_tile), no low-rank operands

    def launch(lookup: str) -> None:
        lora_fwd_kernel[(plan.tiles, plan.splits)](
            x2d, *w.pointers, None, None, None, part, None, None,
            M, N, K, 0, m_bucket(M), plan.k_per_split,
            x2d.stride(0), x2d.stride(1), w.stride_wn, w.stride_wk, 0, 0, 0, 0, part.stride(1), part.stride(2),
            part.stride(0), 0.0,
            **w.constexprs, LOOKUP=lookup, W_FIRST=common.w_first(weight, x2d.dtype),
            HAS_BIAS=False, HAS_LORA=False, COL_SCALE=False, ADD_Z=False, SPLIT_K=True, **precisions,
            R_PAD=FROZEN_R_PAD, R_CHUNK=FROZEN_R_PAD, **plan.meta, K_DIVISOR=k_divisor(K, x2d.device),
            **common.compile_options(weight), **launch_args(x2d.device),
        )  # fmt: skip

    common.launch_lookup(launch, gemm_lookup(weight, x2d, table_key), table_key, "the split forward")
    has_lora = u_parts is not None
    r = u_parts.shape[2] if has_lora else 0
    r_pad = rank_pad(r) if has_lora else FROZEN_R_PAD
    block_m, block_n = 16, epilogue_block_n()
    lora_decode_fwd_epilogue_kernel[(_cdiv(N, block_n), _cdiv(M, block_m))](
        part, u_parts, B, bias, y, u_out,
        M, N, r, plan.splits, u_parts.shape[0] if has_lora else 1, part.stride(0), part.stride(1),
        *(u_parts.stride()[:2] if has_lora else (0, 0)), *strides(B), y.stride(0), y.stride(1),
        u_out.stride(0) if u_out is not None else 0, float(scaling),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, STORE_U=u_out is not None,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"],
        LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"], R_PAD=r_pad, R_CHUNK=min(r_pad, 64), BLOCK_M=block_m,
        BLOCK_N=block_n, U_PER_TRIP=u_parts_per_trip(block_m, min(r_pad, 64)), num_warps=4,
        **launch_args(x2d.device),
    )  # fmt: skip


def launch_y(x2d, weight, bias, y, precisions, u=None, B=None, scaling=0.0, z=None, col_scale=None, z_in=False):
    """lora_fwd_kernel into y: y = x·deq(W)ᵀ + b, plus s·u·Bᵀ when u and B are given (HAS_LORA). ``weight`` is an
    NF4Weight (decoded in the main loop) or a dense (N, K) tensor, e.g. a slab of the large path; y may be a column
    slice of the layer's output. With ``z`` and ``col_scale`` (c, (N,) fp32; COL_SCALE): z = the sum before the bias
    and y = c⊙z + b, both from the kernel's epilogue; z has y's strides. With ``z_in`` (ADD_Z) z is read instead:
    y = (the sum) + b + c⊙z."""
    import triton

    from .lora_fwd import lora_fwd_kernel

    if bias is not None:
        bias = bias.contiguous()  # the kernel reads b[n] at bias_ptr + n; N elements, no copy when contiguous
    M, K = x2d.shape
    N = y.shape[1]
    if (z is None) != (col_scale is None) or (z is not None and z.stride() != y.stride()):
        raise ValueError("launch_y: z and col_scale come together, and z has y's strides")
    plan = None if (z is not None or z_in) else y_splits(M, N, K, weight, x2d)
    if plan is not None:
        u_parts = None if u is None else u.contiguous()[None]  # a whole u: one part
        return _launch_y_split(plan, x2d, weight, bias, y, precisions, u_parts, B, scaling)
    has_lora = u is not None
    r = u.shape[1] if has_lora else 0
    r_pad = rank_pad(r) if has_lora else FROZEN_R_PAD
    w = common.weight_args(weight, K, x2d.dtype)
    kernel, meta = common.gemm(lora_fwd_kernel, x2d, "BLOCK_N", "BLOCK_K")
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)  # noqa: E731
    # what decides whether a tile fits beside the table: the tuning key's M bucket and rank, the dtypes, the epilogue
    table_key = ("forward GEMM", m_bucket(M), r_pad, has_lora, col_scale is not None, z_in, x2d.dtype,
                 None if B is None else B.dtype, x2d.device)  # fmt: skip

    def launch(lookup: str) -> None:
        kernel[grid](
            x2d, *w.pointers, u, B, bias, y, z, col_scale,
            M, N, K, r, m_bucket(M), K,
            x2d.stride(0), x2d.stride(1), w.stride_wn, w.stride_wk,
            *strides(u), *strides(B), y.stride(0), y.stride(1), 0,
            float(scaling),
            **w.constexprs, LOOKUP=lookup, W_FIRST=common.w_first(weight, x2d.dtype), HAS_BIAS=bias is not None,
            HAS_LORA=has_lora, COL_SCALE=col_scale is not None and not z_in, ADD_Z=z_in, SPLIT_K=False, **precisions,
            R_PAD=r_pad, R_CHUNK=min(r_pad, 64), **meta, K_DIVISOR=k_divisor(K, x2d.device),
            **common.compile_options(weight),
        )  # fmt: skip

    common.launch_lookup(launch, gemm_lookup(weight, x2d, table_key), table_key, "the forward GEMM")


def launch_dx(g, weight, dx, precisions, x2d=None, A=None, v=None, dA32=None, scaling=0.0, dropout_p=0.0, seed=0,
              mask_col0=0, mask_width=None, col_scale=None, mask_dx=False, t_add=None):  # fmt: skip
    """lora_dx_kernel: dx = g·deq(W) (when dx is given), plus s·m⊙(v·A) and dA32 += s·vᵀ·(m⊙x) when the low-rank
    operands x2d, A, v are given (HAS_LORA). For a column slab (the large path) x2d, A, dx, dA32 are the slab's
    column slices and (mask_col0, mask_width) place it in the layer's dropout mask. With ``col_scale`` (c, (N,)
    fp32; COL_SCALE) the GEMM reads c⊙g instead of g; with ``mask_dx`` (dropout_p > 0; MASK_DX) dx = m⊙(the sum);
    with ``t_add`` (dx's shape and strides; ADD_T) dx gets + t in the epilogue."""
    if (mask_dx and (dropout_p == 0.0 or dx is None)) or (
            t_add is not None and (dx is None or t_add.stride() != dx.stride())):
        raise ValueError("launch_dx: mask_dx needs dropout and dx; t_add needs dx and dx's strides")
    import triton

    from .lora_bwd import lora_dx_kernel

    M, N = g.shape
    K = weight.shape[1]
    has_lora = v is not None
    r = A.shape[0] if has_lora else 0
    r_pad = rank_pad(r) if has_lora else FROZEN_R_PAD
    w = common.weight_args(weight, K, g.dtype)
    kernel, meta = common.gemm(lora_dx_kernel, g, "BLOCK_K", "BLOCK_N", ("da_ptr",) if dA32 is not None else ())
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)  # noqa: E731
    table_key = ("dx GEMM", m_bucket(M), r_pad, has_lora, dA32 is not None, dropout_p > 0.0, col_scale is not None,
                 mask_dx, t_add is not None, g.dtype, None if A is None else A.dtype, g.device)  # as the forward's

    def launch(lookup: str) -> None:
        kernel[grid](
            g, *w.pointers, x2d, A, v, dx, dA32, col_scale, t_add,
            M, N, K, r, m_bucket(M),
            g.stride(0), g.stride(1), w.stride_wn, w.stride_wk,
            *strides(x2d), *strides(A), *strides(v), *strides(dx), *strides(dA32), float(scaling),
            **dropout_args(dropout_p, seed), mask_col0=int(mask_col0),
            mask_width=int(K if mask_width is None else mask_width),
            NEED_DX=dx is not None, NEED_DA=dA32 is not None, DROPOUT=dropout_p > 0.0, HAS_LORA=has_lora,
            COL_SCALE=col_scale is not None, MASK_DX=mask_dx, ADD_T=t_add is not None,
            **w.constexprs, LOOKUP=lookup, W_FIRST=common.w_first(weight, g.dtype),
            **precisions, R_PAD=r_pad, R_CHUNK=min(r_pad, 64), **meta, N_DIVISOR=pow2_divisor(N),
            K_DIVISOR=pow2_divisor(K), **common.compile_options(weight),
        )  # fmt: skip

    common.launch_lookup(launch, gemm_lookup(weight, g, table_key), table_key, "the dx GEMM")


# ---------------------------------------------------------------------------------------------- v, dB, db, dA


class VdbTile(NamedTuple):
    """The tile of the v/dB pass on a GPU."""

    block_m: int
    block_n: int
    num_warps: int


def vdb_tile(M: int, r_pad: int) -> VdbTile:
    """The tile (BLOCK_M, BLOCK_N, num_warps) of the v/dB pass on a GPU (3 pipeline stages; 4, and BLOCK_N 32, with
    _vdb_wgmma). At R_PAD=256 the B tile is BLOCK_N·256 and the v accumulator BLOCK_M·256, so BLOCK_N is 32: at 64 the
    kernel needs 180224 B of shared memory, over the A100's 166912 B (tests/test_kernels_compile.py compiles it for
    sm_80/sm_90)."""
    import triton

    rows = 128 if r_pad <= 32 else 64 if r_pad <= 64 else 32
    block_m = min(rows, max(16, triton.next_power_of_2(M)))
    block_n = 32 if r_pad >= 256 else 64
    return VdbTile(block_m, block_n, 8 if block_m >= 128 else 4)


def _vdb_wgmma(block_m: int, device) -> bool:
    """Whether the v/dB pass runs g·B on wgmma (sm_90 and later, row tiles of at least 64): its tile is then 32
    columns wide, so that gᵀ·u (BLOCK_N rows) runs on mma.sync, and a split B comes from memory (lora_bwd.py)."""
    if interpreting() or torch.device(device).type != "cuda":
        return False
    return block_m >= 64 and cuda_capability(device)[0] >= 9


def zeroed_fp32(device, *shapes, split=None) -> list:
    """Zeroed fp32 tensors of the given shapes (None for a shape that is None), separate allocations (a returned
    gradient must not alias another) zeroed by one launch of lora_bwd.zero_fp32_kernel instead of a memset each.
    With ``split`` = (src, dst, r_pad) the same launch also writes lora_fwd.split_wide of the fp32 (N, r) ``src``
    into the contiguous (N, 2r) 16-bit ``dst`` (BLOCK_SPLIT)."""
    import triton

    from .lora_bwd import zero_fp32_kernel
    from .pdl import launch_args

    if len(shapes) > 4:
        raise ValueError(f"zeroed_fp32: at most 4 tensors per launch, got {len(shapes)}")
    tensors = [None if shape is None else torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes]
    present = [t for t in tensors if t is not None]
    largest = max((t.numel() for t in present), default=0)
    block, programs, split_args = 1024, triton.cdiv(largest, 1024), {}
    if split is not None:
        src, dst, r_pad = split
        rows = 16 if interpreting() else 64
        programs = max(programs, triton.cdiv(src.shape[0], rows))
        split_args = dict(src_ptr=src, dst_ptr=dst, N=src.shape[0], R=src.shape[1], stride_sn=src.stride(0),
                          stride_sr=src.stride(1), BLOCK_SPLIT=rows, R_PAD=r_pad)  # fmt: skip
    if programs > 0:
        dummy = present[0] if present else split[1]
        args = [a for t in tensors + [None] * (4 - len(tensors))
                for a in ((dummy, 0) if t is None else (t, t.numel()))]  # fmt: skip
        zero_fp32_kernel[(programs,)](*args, BLOCK=block, **split_args, num_warps=4, **launch_args(device))
    return tensors


def launch_vdb(g, precisions, need_v: bool, need_dB: bool, need_db: bool, B=None, u=None, scaling=0.0,
               also_zero=None):
    """(v, dB32, db, zeros): (g·B, s·gᵀ·u, Σ_M g), fp32, each None unless asked for: one pass over g with relaxed
    atomics, or in the deterministic mode split reductions summed in a fixed order (lora_reduce.py). The atomic
    accumulators are zeroed by one launch (zeroed_fp32), which also zeroes ``zeros``, an fp32 tensor of shape
    ``also_zero`` for the caller (the dx GEMM's dA accumulator), and splits B when the pass takes it split
    (``VdbPlan.b_split``); ``zeros`` is None without it or in the deterministic mode."""
    M, N = g.shape
    r = B.shape[1] if B is not None else 0
    device = g.device
    if N == 0:  # a layer without outputs: v = g·B is zero, dB and db are empty (the passes would divide by N)
        atomic = not strategy.deterministic()
        v, dB32, db, zeros = zeroed_fp32(device, (M, r) if need_v else None, (0, r) if need_dB else None,
                                         (0,) if need_db else None, also_zero if atomic else None)  # fmt: skip
        return v, dB32, db, zeros
    if not strategy.deterministic():
        plan = _vdb_plan(g, B, u, need_v)
        b_split = torch.empty((N, 2 * r), device=device, dtype=g.dtype) if plan.b_split else None
        v, dB32, db, zeros = zeroed_fp32(
            device, (M, r) if need_v else None, (N, r) if need_dB else None, (N,) if need_db else None, also_zero,
            split=(B, b_split, plan.r_pad) if plan.b_split else None,
        )
        _launch_vdb_atomic(plan, g, precisions, v, dB32, db, B if b_split is None else b_split, r, u, scaling)
        return v, dB32, db, zeros
    v = _v_split(g, B, precisions) if need_v else None
    dB32, db = _db_split(g, u, precisions, need_dB, need_db, scaling) if (need_dB or need_db) else (None, None)
    return v, dB32, db, None


class VdbPlan(NamedTuple):
    """The v/dB pass's launch: its tile, the rank padding, whether the low-rank dots split (common.lowrank_split),
    whether g·B is a wgmma (_vdb_wgmma) and whether B is read split from memory (B_SPLIT)."""

    block_m: int
    block_n: int
    n_per_split: int
    warps: int
    r_pad: int
    split: bool
    wgmma: bool
    b_split: bool


def _vdb_plan(g, B, u, need_v: bool) -> VdbPlan:
    """The launch of the v/dB pass over g (M, N). Tall row tiles keep the dB atomics ((M / BLOCK_M)·N·r adds) few;
    N is split across programs until the GPU is full."""
    import triton

    M, N = g.shape
    r_pad = rank_pad(B.shape[1]) if B is not None else FROZEN_R_PAD
    if interpreting():
        block_m, block_n, warps, programs_wanted = 16, 32, 4, 2 * triton.cdiv(M, 16)
    else:
        block_m, block_n, warps = vdb_tile(M, r_pad)
        programs_wanted = 2 * common.sm_count(g.device)
    wgmma = _vdb_wgmma(block_m, g.device)
    if wgmma:
        block_n = 32
    n_tiles = triton.cdiv(N, block_n)
    splits = max(1, min(n_tiles, programs_wanted // triton.cdiv(M, block_m)))
    split = common.lowrank_split(g, B, u)
    return VdbPlan(block_m, block_n, triton.cdiv(n_tiles, splits) * block_n, warps, r_pad, split, wgmma,
                   split and need_v and wgmma)  # fmt: skip


def _launch_vdb_atomic(plan: VdbPlan, g, precisions, v, dB32, db, b_operand, r: int, u, scaling):
    """lora_vdb_kernel over g; ``b_operand`` is B (N, r), or its split (N, 2r) when plan.b_split."""
    import triton

    from .lora_bwd import lora_vdb_kernel
    from .pdl import launch_args

    M, N = g.shape
    grid = (triton.cdiv(M, plan.block_m), triton.cdiv(N, plan.n_per_split))
    lora_vdb_kernel[grid](
        g, b_operand, u, v, dB32, db,
        M, N, r, plan.n_per_split,
        g.stride(0), g.stride(1), *strides(b_operand), *strides(u), *strides(v), *strides(dB32), float(scaling),
        NEED_V=v is not None, NEED_DB_LORA=dB32 is not None, NEED_DB_BIAS=db is not None,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        LOWRANK_SPLIT=plan.split, R_PAD=plan.r_pad, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, num_warps=plan.warps,
        B_SPLIT=plan.b_split,
        num_stages=4 if plan.wgmma else 3,  # 32-column tiles: one more in flight keeps the loop on HBM bandwidth
        **launch_args(g.device),
    )  # fmt: skip


def _reduce_blocks(M: int, r_pad: int) -> tuple[int, int, int]:
    """(rows, columns, num_warps) of a split-reduction tile."""
    if interpreting():
        return 16, 32, 4
    block_m, block_n, warps = vdb_tile(M, r_pad)
    return block_m, block_n, warps


def _v_split(g, B, precisions) -> torch.Tensor:
    import triton

    from .lora_reduce import lora_v_split_kernel

    M, N = g.shape
    r = B.shape[1]
    r_pad = rank_pad(r)
    block_m, block_n, warps = _reduce_blocks(M, r_pad)
    splits, n_per_split = _splits(N, block_n, triton.cdiv(M, block_m), g.device)
    parts = torch.empty((splits, M, r), device=g.device, dtype=torch.float32)
    lora_v_split_kernel[(triton.cdiv(M, block_m), splits)](
        g, B, parts, M, N, r, n_per_split, g.stride(0), g.stride(1), *B.stride(), *parts.stride(),
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return common.fixed_order_sum(parts)


def _db_split(g, u, precisions, need_dB: bool, need_db: bool, scaling: float):
    import triton

    from .lora_reduce import lora_db_split_kernel

    M, N = g.shape
    r = u.shape[1] if need_dB else 0
    r_pad = rank_pad(r) if need_dB else FROZEN_R_PAD
    block_m, block_n, warps = _reduce_blocks(M, r_pad)
    block_m = min(block_m, 64)
    splits, m_per_split = _splits(M, block_m, triton.cdiv(N, block_n), g.device)
    dB_parts = torch.empty((splits, N, r), device=g.device, dtype=torch.float32) if need_dB else None
    db_parts = torch.empty((splits, N), device=g.device, dtype=torch.float32) if need_db else None
    lora_db_split_kernel[(triton.cdiv(N, block_n), splits)](
        g, u if need_dB else None, dB_parts, db_parts, M, N, r, m_per_split,
        g.stride(0), g.stride(1), *(u.stride() if need_dB else (0, 0)),
        *(dB_parts.stride() if need_dB else (0, 0, 0)), db_parts.stride(0) if need_db else 0, float(scaling),
        NEED_DB_LORA=need_dB, NEED_DB_BIAS=need_db,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    dB32 = common.fixed_order_sum(dB_parts) if need_dB else None
    db = common.fixed_order_sum(db_parts) if need_db else None
    return dB32, db


def da_split(x2d, v, r: int, precisions, scaling: float, dropout_p: float, seed: int) -> torch.Tensor:
    """dA32 = s·vᵀ·(m⊙x), (r, K) fp32, without atomics (the deterministic mode)."""
    import triton

    from .lora_reduce import lora_da_split_kernel

    M, K = x2d.shape
    r_pad = rank_pad(r)
    block_m, block_k, warps = (16, 32, 4) if interpreting() else (64, 64 if r_pad <= 64 else 32, 4)
    splits, m_per_split = _splits(M, block_m, triton.cdiv(K, block_k), x2d.device)
    parts = torch.empty((splits, r, K), device=x2d.device, dtype=torch.float32)
    lora_da_split_kernel[(triton.cdiv(K, block_k), splits)](
        x2d, v, parts, M, K, r, m_per_split, x2d.stride(0), x2d.stride(1), *v.stride(), *parts.stride(),
        float(scaling), **dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0.0,
        LOWRANK_DTYPE=precisions["LOWRANK_DTYPE"], LOWRANK_PRECISION=precisions["LOWRANK_PRECISION"],
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return common.fixed_order_sum(parts)
