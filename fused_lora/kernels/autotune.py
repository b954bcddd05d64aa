"""Autotuning of the two GEMM kernels (forward y, backward dx/dA) on Hopper (sm90) and Ampere (sm80), made so that a
user does not notice it.

The tuning key buckets M to a power of two (``m_bucket``), so decode-size calls (M ≤ 16; on sm_90 the decode path takes
M ≤ 64 by default) and training-size calls (M in the thousands) get different tiles while every M inside a bucket reuses
one measurement. The key also holds HAS_LORA: without the low-rank epilogue (the frozen layer alone) a program needs
fewer registers, so the best tile can differ from the LoRA layer's. Under the Triton CPU interpreter nothing is tuned:
``INTERPRETER_CONFIG`` is used as is.

Unnoticed: for each bucket the pruning (``keep_tiles_for_m``) keeps at most ``MAX_CONFIGS_PER_BUCKET`` configs,
those whose BLOCK_M is nearest the bucket (the first training step compiles and times a handful, not a dozen);
the winners are cached on disk across runs (``cache_results``, Triton ≥ 3.4, in Triton's cache directory, keyed by
Triton, the GPU, the kernel's source, the key and the config list; a file that cannot be read or names a config
that is not a candidate, or a folder that cannot be written, costs a tuning and one warning: ``_CheckedDiskCache``);
and configs are timed by ``bench_without_flush``, which allocates nothing, instead of ``triton.testing.do_bench``,
which allocates a 256 MB buffer to flush the L2 cache before every timed call.
"""

import functools
import inspect
from typing import NamedTuple

import triton
import triton.runtime.autotuner
from triton.runtime.errors import OutOfResources

from .._common import warn_once

M_BUCKET_CAP = 8192

# One small fixed config for the CPU interpreter (slow, so the tiles are small; ragged shapes still cross tiles).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


class GemmTile(NamedTuple):
    """One autotune config of the GEMM kernels. ``block_out`` is the output-column tile (N for y, K for dx),
    ``block_reduce`` the reduction tile (K for y, N for dx); ``group_m`` row tiles share a column sweep (L2 reuse)."""

    block_m: int
    block_out: int
    block_reduce: int
    group_m: int
    num_warps: int
    num_stages: int


# Only for lora_dx_kernel over an NF4 W (keep_tiles_for_m drops it elsewhere): at middle M the 128×128 tiles launch too
# few programs to fill the GPU (64 at M = 256, K = 4096), and 64×128×64 decodes each W tile once per 64 rows of g, twice
# the decode per MMA of this tile, whose accumulator dxᵀ is 64 columns of dx by 128 rows (W_FIRST). sm_90a, K = 4096,
# N = 14336, M = 256: 299 SASS per iteration, 2.53x the dense loop, 53.9 us predicted, against 196, 1.54x, 42.1 us
# (bench/results/offline; 180, 1.42x, with lora_dx_kernel's REBASE since). Over a dense W (no decode to amortise) its
# DoRA MASK_DX variant waited for each wgmma at once.
NF4_DX_TILE = GemmTile(128, 64, 64, 8, 4, 4)


# Tiles with BLOCK_M ≤ 64 are for small M (decode, short batches).
_SM90_TILES = [
    GemmTile(128, 256, 64, 8, 8, 3),
    GemmTile(128, 128, 64, 8, 8, 4),
    GemmTile(128, 128, 128, 8, 8, 3),
    NF4_DX_TILE,
    GemmTile(256, 128, 64, 8, 8, 3),
    GemmTile(64, 256, 64, 8, 4, 4),
    GemmTile(64, 128, 64, 8, 4, 4),
    GemmTile(32, 128, 128, 4, 4, 4),
    GemmTile(16, 128, 128, 4, 4, 4),
    GemmTile(16, 64, 256, 4, 4, 3),
]
_SM80_TILES = [
    GemmTile(128, 256, 64, 8, 8, 3),
    GemmTile(128, 128, 64, 8, 4, 4),
    GemmTile(256, 128, 64, 8, 8, 3),
    GemmTile(64, 128, 64, 8, 4, 4),
    GemmTile(64, 64, 64, 8, 4, 4),
    GemmTile(32, 128, 64, 4, 4, 4),
    GemmTile(16, 128, 128, 4, 4, 3),
    GemmTile(16, 64, 128, 4, 4, 3),
]


def split_tile(capability: tuple[int, int], M: int) -> GemmTile:
    """The one tile of the middle path's split-K forward (launch_gemm.y_splits), not tuned: it serves grids too
    small to fill the GPU, where what matters is a GPU-filling program count from few partial sums (128 output
    columns), not the speed of one tile; 128 rows above M = 64 on sm_90, else 64 (sm_80's 128×128 tile has 4 warps
    and spilled 164 B of the NF4 decode when compiled by tests/_compile_kernels.py)."""
    tiles = _SM90_TILES if capability[0] >= 9 else _SM80_TILES
    block_m = 128 if M > 64 and capability[0] >= 9 else 64
    return next(t for t in tiles if (t.block_m, t.block_out, t.block_reduce) == (block_m, 128, 64))


def m_bucket(M: int) -> int:
    """M rounded up to a power of two, capped at 8192: the M part of the tuning key."""
    return min(triton.next_power_of_2(max(M, 1)), M_BUCKET_CAP)


def gemm_configs(capability: tuple[int, int], out_name: str, reduce_name: str) -> list:
    """triton.Config list for a GPU of compute ``capability``; ``out_name``/``reduce_name`` name the column and
    reduction block sizes of the kernel (e.g. "BLOCK_N"/"BLOCK_K" for y, "BLOCK_K"/"BLOCK_N" for dx)."""
    tiles = _SM90_TILES if capability[0] >= 9 else _SM80_TILES
    return [
        triton.Config(
            {"BLOCK_M": t.block_m, out_name: t.block_out, reduce_name: t.block_reduce, "GROUP_M": t.group_m},
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        for t in tiles
    ]


MAX_CONFIGS_PER_BUCKET = 3
# The BLOCK_M a bucket prefers: the bucket itself between 16 and 128 rows (taller tiles only add padding at small M,
# and at large M 128-row tiles fill the GPU with room for the low-rank epilogue).
_PREFERRED_BLOCK_M = (16, 128)


def _preferred_block_m(bucket: int) -> int:
    low, high = _PREFERRED_BLOCK_M
    return min(max(low, bucket), high)


# The NF4 forward from this bucket on also times a tile twice as tall as the preferred one (256×128×64 on sm_90), in
# place of the last of the others: its programs decode each W tile once per 256 rows, half the decode per MMA of
# the 128-row tiles. The offline model prices both bound by the MMA (the decode hidden under it), but the 128×256
# tile issues for 58 % of its MMA's cycles per iteration (400 SASS per warp, two warps per scheduler, against ~1390
# cycles of wgmma at 790 TFLOP/s), the 256×128 one for 41 % (284): more room when a GPU hides less of the decode than
# the model assumes (sm_90a, K=4096, N=14336: bench/results/offline/report.md). sm_80's
# 256-row tile spills the NF4 decode (44 B, bench/results/compile_report.md) and is only kept there as before, by
# distance. Not with ADD_Z (DoRA's forward that reads z): its z tile beside the accumulator spills 116 B there.
TALL_NF4_MIN_BUCKET = 256


# A dx tile with the low-rank term keeps acc, the low-rank tile, the dropout mask and x in shared memory: above
# BLOCK_M·BLOCK_K = 128·128 it needs 256 KiB on sm_90 (limit 227 KiB), so such tiles are never compiled.
DX_LORA_MAX_TILE = 128 * 128
# ... and its fp32 accumulator may hold at most this many values per thread (BLOCK_M·BLOCK_K / (32·num_warps)): at 128
# (64x256 with 4 warps on sm_90, 128x128 with 4 warps on sm_80) the accumulator, the low-rank operands and the NF4
# decode need more than 255 registers and ptxas spills 80-324 B (sm_90) and 176 B (sm_80) per thread
# (bench/results/compile_report.md).
DX_LORA_MAX_ACC_PER_THREAD = 64


def keep_tiles_for_m(configs, named_args, **kwargs):
    """The autotuner's early pruning, from the launch's arguments (positional in ``named_args``, the constexprs
    passed by keyword in ``kwargs``; either may hold any of them):

    - NF4_DX_TILE only for lora_dx_kernel over an NF4 W;
    - drop tiles with BLOCK_M far above M (all-padding rows); keep the smallest when none fits;
    - lora_dx_kernel (it has ``dx_ptr``) with HAS_LORA: drop tiles with BLOCK_M·BLOCK_K > DX_LORA_MAX_TILE or more
      than DX_LORA_MAX_ACC_PER_THREAD accumulator values per thread; with MASK_DX (DoRA's masked t, whose kept-mask
      tile lives through the loop beside the accumulator: 128 values per thread spilled 192–408 B on sm_90) the
      accumulator rule only;
    - keep at most MAX_CONFIGS_PER_BUCKET: the tiles whose BLOCK_M is nearest the bucket's preferred BLOCK_M (the
      bucket, clamped to 16..128), in the config list's order among equals; the NF4 forward (not ADD_Z) from
      TALL_NF4_MIN_BUCKET on with a 256-row tile in place of the last of them;
    - NF4 with K not a multiple of the blocksize (ROW_SCALES False): the element-wise scale gather makes every
      pipeline stage hold per-element scale tiles (180–650 KiB at 3–4 stages), so every config runs at
      num_stages=1 (36–80 KiB).
    """
    args = {**named_args, **kwargs}
    bucket = args["M_BUCKET"]
    dx = "dx_ptr" in args
    if not (dx and args.get("IS_NF4")):
        configs = [c for c in configs if _tile(c, dx) != NF4_DX_TILE]
    if dx and args.get("HAS_LORA"):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= DX_LORA_MAX_TILE
                   and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= DX_LORA_MAX_ACC_PER_THREAD * 32 * c.num_warps]
    elif dx and args.get("MASK_DX"):
        configs = [c for c in configs
                   if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= DX_LORA_MAX_ACC_PER_THREAD * 32 * c.num_warps]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * bucket)]
    kept = fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]
    preferred_rows = _preferred_block_m(bucket)
    preferred = preferred_rows.bit_length()
    kept = sorted(kept, key=lambda c: abs(c.kwargs["BLOCK_M"].bit_length() - preferred))[:MAX_CONFIGS_PER_BUCKET]
    if args.get("IS_NF4") and not dx and not args.get("ADD_Z") and bucket >= TALL_NF4_MIN_BUCKET:
        tall = [c for c in fitting if c.kwargs["BLOCK_M"] >= 2 * preferred_rows and c not in kept][:1]
        kept = kept[:MAX_CONFIGS_PER_BUCKET - len(tall)] + tall
    if args.get("IS_NF4") and not args.get("ROW_SCALES"):
        kept = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1) for c in kept]
    return kept


def _tile(config, dx: bool) -> GemmTile:
    """The GemmTile of a config of lora_dx_kernel (``dx``: output tile BLOCK_K, reduction BLOCK_N) or of
    lora_fwd_kernel."""
    out, reduce = ("BLOCK_K", "BLOCK_N") if dx else ("BLOCK_N", "BLOCK_K")
    kw = config.kwargs
    return GemmTile(kw["BLOCK_M"], kw[out], kw[reduce], kw["GROUP_M"], config.num_warps, config.num_stages)


def is_resource_error(error: BaseException) -> bool:
    """Whether a failed launch was refused for its resources: Triton's OutOfResources, CUDA's "too many resources
    requested for launch", or "invalid argument" for more dynamic shared memory than the function allows (as
    Triton's launcher words them)."""
    if isinstance(error, OutOfResources):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and "Triton Error [CUDA]" in text and (
        "resources" in text or "invalid argument" in text)


def bench_without_flush(kernel_call, quantiles=None, budget_ms: float = 5.0, max_reps: int = 20):
    """The autotuner's timer (its ``do_bench``): run ``kernel_call`` once (it compiles and warms up; a launch refused
    for its resources times as infinite, is_resource_error), then time 3..``max_reps`` calls (as many as fit
    ``budget_ms`` by a first timed call) with CUDA events; the ``quantiles`` of the times (nearest rank), or their
    median. No L2 flush between calls and no buffer allocated: the times are
    L2-warm, as a layer's GEMM after the previous layer is; configs are compared with each other, all timed alike.
    """
    import torch

    try:
        kernel_call()
    except Exception as error:  # noqa: BLE001 - filtered just below
        # refused for its resources: a config whose shared memory, with the 32 KiB pair table that Triton does not
        # count (launch_gemm.gemm_lookup), is over the GPU's; never the winner, as Triton's own OutOfResources
        if not is_resource_error(error):
            raise
        return float("inf") if quantiles is None else [float("inf")] * len(quantiles)
    torch.cuda.synchronize()
    first = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    first[0].record()
    kernel_call()
    first[1].record()
    torch.cuda.synchronize()
    reps = int(max(3, min(max_reps, budget_ms / max(first[0].elapsed_time(first[1]), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    if quantiles is None:
        return times[len(times) // 2]
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


def _disk_cache_option() -> dict:
    """``cache_results=True`` where triton.autotune has it (Triton ≥ 3.4; the GPU machines run 3.6, CI 3.9)."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# LOOKUP: the pair table's 32 KiB of shared memory can rule out a tile that fits without it (bench_without_flush)
TUNING_KEY = ("M_BUCKET", "N", "K", "R_PAD", "HAS_LORA", "MASK_DX", "IS_NF4", "DOUBLE_QUANT", "ROW_SCALES", "LOOKUP")


class _CheckedDiskCache(triton.runtime.autotuner.Autotuner):
    """Triton's Autotuner, with its disk cache read as a hint: Triton's own ``check_disk_cache`` raises on a
    truncated or malformed file (JSONDecodeError, KeyError, TypeError), on a cache directory it cannot create or
    write (OSError: also after tuning, losing the result), and uses whatever config a readable file names, even one
    the pruning never offered (e.g. a 256-row dx tile that needs more shared memory than an SM has). Here any of
    those tunes in memory, once, with one warning; the winner is always one of this key's candidates."""

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        benched = []

        def bench():  # an error of the tuning itself (not of the cache) is raised as it is, and not tuned again
            benched.append(True)
            bench_fn()

        try:
            hit = super().check_disk_cache(tuning_key, configs, bench)
        except Exception as error:  # noqa: BLE001 - a cache is never worth a failed step
            if benched and self.cache.get(tuning_key) is None:
                raise
            warn_once(f"fused_lora: the autotune disk cache cannot be used ({type(error).__name__}: {error}); "
                      "tuning in memory instead", RuntimeWarning, key="autotune disk cache")
            hit = False
        best = self.cache.get(tuning_key)
        if best is None or best not in configs:  # unread, or a config that is not a candidate
            self.cache.pop(tuning_key, None)
            bench_fn()
            hit = False
        return hit


@functools.cache
def autotuned(kernel, capability: tuple[int, int], out_name: str, reduce_name: str, reset_to_zero: tuple = ()):
    """``kernel`` wrapped in triton.autotune for ``capability``, keyed on the M bucket, N, K, r and the variant
    (low-rank term or not, DoRA's masked dx, NF4 layout: ``TUNING_KEY``, the names the kernel has): at most
    MAX_CONFIGS_PER_BUCKET configs timed per key by ``bench_without_flush``, the results cached on disk
    (``_CheckedDiskCache``: a bad cache costs a tuning, never the step)."""
    tuner = triton.autotune(
        configs=gemm_configs(capability, out_name, reduce_name),
        key=[name for name in TUNING_KEY if name in kernel.arg_names],
        prune_configs_by={"early_config_prune": keep_tiles_for_m},
        reset_to_zero=list(reset_to_zero) or None,
        do_bench=bench_without_flush,
        **_disk_cache_option(),
    )(kernel)
    tuner.__class__ = _CheckedDiskCache  # the same object, one method more careful (its constructor's signature
    return tuner  # differs between Triton 3.6 and 3.9; this does not)
