"""The large-M path: W dequantized in slabs into a bounded, reused workspace, each slab followed by the dense GEMM.

Symbols as in lora.py. The workspace (strategy.workspace) holds two slabs of at most
Thresholds.workspace_bytes / 2 bytes each, in the compute dtype:

    forward   for each row slab S = [n0, n1) of W:     slab = deq(W[S, :])              (nf4_slab.py, exact)
                                                       y[:, S] = x·slabᵀ + b[S] + s·u·B[S]ᵀ   (lora_fwd_kernel, dense)
    backward  for each column slab C = [k0, k1) of W:  slab = deq(W[:, C])
                                                       dx[:, C] = s·m⊙(v·A[:, C]) + g·slab  (lora_dx_kernel, dense;
                                                       dA[:, C] += s·vᵀ·(m⊙x)[:, C] there too, unless deterministic)

The GEMM is the one a dense W takes (overlapped wgmma main loop), with the low-rank term, bias and dropout in it; no
copy of the whole W exists when W is larger than the workspace. With Thresholds.slab_overlap the slabs are
dequantized on a side CUDA stream, alternating between the two halves of the workspace, so the dequantization of
slab i+1 runs while slab i's GEMM does; events order each slab's GEMM after its dequantization and the reuse of a
half after the GEMM that read it.
"""

from __future__ import annotations

import torch

from ..backend import interpreting
from . import common, strategy

_SLAB_ALIGN = 256  # slab sizes are multiples of the largest GEMM tile (whole tiles, a stable autotune key)
_MIN_SLABS = 4  # slabs when M is unknown, with overlap; the counts tried above the least otherwise
_GEMM_TILE = 128  # the large path's GEMM tiles are 128 rows by 128 or 256 columns (autotune.py)
_side_streams: dict = {}


def _slab_size(total: int, other: int, element_bytes: int, t: strategy.Thresholds, M: int = 0, sms: int = 0) -> int:
    """Rows (or columns) of W per slab (``total`` of them, ``other`` long: the GEMM's reduction): for a count of
    slabs, ⌈total / count⌉ rounded up to a multiple of _SLAB_ALIGN when larger, else of 4 (a column slab starts on a
    group of four dropout columns, dropout.py), at most half the workspace, at least 4 even if that holds fewer.

    The count: at least as many slabs as half the workspace requires; of that count up to _MIN_SLABS more, and of
    slabs as large as half the workspace holds, the plan of least _slab_cost for an M-row GEMM on ``sms`` SMs
    (rounds of GEMM tiles, the dequantization no GEMM hides, the launches); without M, _MIN_SLABS slabs when they
    overlap (the first slab's dequantization is the part that no GEMM hides)."""
    fit = max(1, t.workspace_bytes // 2 // (other * element_bytes))
    least = -(-total // fit)

    def size_of(count: int) -> int:
        size = -(-total // count)
        align = _SLAB_ALIGN if size > _SLAB_ALIGN else 4
        size = -(-size // align) * align
        if size > fit:
            size = fit - fit % (_SLAB_ALIGN if fit > _SLAB_ALIGN else 4)
        return max(4, min(size, total))

    if M > 0 and sms > 0:  # the counts from the least, and the largest slabs (the last one shorter)
        counts = range(least, least + (_MIN_SLABS if t.slab_overlap else 1) + 1)
        sizes = [size_of(c) for c in counts] + [size_of(1)]
        return min(sizes, key=lambda size: (_slab_cost(total, other, size, M, sms, t), -size))
    return size_of(max(least, _MIN_SLABS) if t.slab_overlap else least)


# The cost of a slab plan in rounds of 128×128 GEMM tiles (one tile per SM, over the GEMM's reduction of length L):
# leads from the H200 constants of the offline cost model (bench/offline_model.py), to recalibrate on a GPU. A round
# takes L·2·128² FLOPs / (790 TFLOP/s / 132 SMs) = L·5.5 ns; dequantizing one row (column) of W, L long, reads L/2
# bytes and writes 2·L at 4.3 TB/s = L·0.58 ps, so _ROUND_ROWS rows per round; a launch takes 2 µs = 364 / L rounds.
_ROUND_ROWS = 9400
_LAUNCH_ROUNDS_TIMES_L = 2e-6 / 5.5e-9


def _slab_cost(total: int, other: int, size: int, M: int, sms: int, t: strategy.Thresholds) -> float:
    """Rounds of GEMM tiles of the slabs (each slab's ⌈M/128⌉·⌈slab/128⌉ tiles over ``sms`` SMs, rounded up), plus
    the dequantization that no GEMM hides (the first slab's with overlap, else all of it) and the launches (a
    dequantization and a GEMM per slab), in rounds."""
    row_tiles = -(-M // _GEMM_TILE)
    slabs = [min(size, total - start) for start in range(0, total, size)]
    rounds = sum(-(-(row_tiles * -(-slab // _GEMM_TILE)) // sms) for slab in slabs)
    exposed = slabs[0] if t.slab_overlap and len(slabs) > 1 else total
    return rounds + exposed / _ROUND_ROWS + len(slabs) * 2 * _LAUNCH_ROUNDS_TIMES_L / other


def _dequantize_window(weight, slab, n0: int, k0: int) -> None:
    """slab[:, :] = deq(W[n0 : n0 + rows, k0 : k0 + cols]) (nf4_slab.py)."""
    import triton

    from .nf4_slab import nf4_slab_kernel

    rows, cols = slab.shape
    K = weight.shape[1]
    block_r, block_c = (16, 32) if interpreting() else (16, 256)
    nf4_slab_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
        weight.packed, common.decoded_scales(weight), weight.code.contiguous(), slab,
        K, n0, k0, rows, cols, slab.stride(0), K // 2, k0 // 2,
        BLOCKSIZE=int(weight.blocksize), PAIRS=K % 2 == 0 and k0 % 2 == 0, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4,
    )  # fmt: skip


def _pipeline(device, count: int, dequantize, gemm, overlap: bool) -> None:
    """For i in range(count): dequantize(i, half) then gemm(i, half), half = i % 2; with ``overlap`` the
    dequantizations run on a side stream, ordered by events."""
    if not (overlap and device.type == "cuda" and count > 1):
        for i in range(count):
            dequantize(i, i % 2)
            gemm(i, i % 2)
        return
    main = torch.cuda.current_stream(device)
    side = _side_streams.get(device)
    if side is None:  # one side stream per device, made at its first use (a Stream made per call costs a CUDA call)
        side = _side_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(main)  # the inputs, and the previous users of the workspace, are ready
    dequantized = [torch.cuda.Event() for _ in range(count)]
    consumed = [torch.cuda.Event() for _ in range(count)]
    for i in range(count):
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(consumed[i - 2])  # the GEMM that read this half is done
            dequantize(i, i % 2)
            dequantized[i].record(side)
        main.wait_event(dequantized[i])
        gemm(i, i % 2)
        consumed[i].record(main)


def _halves(device, dtype, shape) -> torch.Tensor:
    """The workspace as two slabs of ``shape`` in ``dtype``."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    count = 2 * shape[0] * shape[1]
    buffer = strategy.workspace(device, count * element_bytes)
    return buffer[: count * element_bytes].view(dtype).view(2, *shape)


def launch_y(x2d, weight, bias, y, precisions, u=None, B=None, scaling=0.0, z=None, col_scale=None,
             z_in=False) -> None:  # fmt: skip
    """y = x·deq(W)ᵀ + b (+ s·u·Bᵀ) through row slabs of W (module docstring); with z and col_scale, z = the sum
    before the bias and y = c⊙z + b, or with z_in y = (the sum) + b + c⊙z (launch_gemm.launch_y)."""
    from .launch_gemm import launch_y as gemm_y

    K = x2d.shape[1]
    N = y.shape[1]
    t = strategy.thresholds(x2d.device)
    rows = _slab_size(N, K, x2d.element_size(), t, x2d.shape[0], common.sm_count(x2d.device))
    halves = _halves(x2d.device, x2d.dtype, (rows, K))
    starts = list(range(0, N, rows))

    def dequantize(i, half):
        n0 = starts[i]
        _dequantize_window(weight, halves[half, : min(rows, N - n0)], n0, 0)

    def gemm(i, half):
        n0 = starts[i]
        n1 = min(n0 + rows, N)
        gemm_y(x2d, halves[half, : n1 - n0], None if bias is None else bias[n0:n1], y[:, n0:n1], precisions,
               u=u, B=None if B is None else B[n0:n1], scaling=scaling, z=None if z is None else z[:, n0:n1],
               col_scale=None if col_scale is None else col_scale[n0:n1], z_in=z_in)  # fmt: skip

    _pipeline(x2d.device, len(starts), dequantize, gemm, t.slab_overlap)


def launch_dx(g, weight, dx, precisions, x2d=None, A=None, v=None, dA32=None, scaling=0.0, dropout_p=0.0,
              seed=0, col_scale=None, mask_dx=False, t_add=None) -> None:  # fmt: skip
    """dx = g'·deq(W) (+ s·m⊙(v·A)), dA32 += s·vᵀ·(m⊙x) when given, through column slabs of W (module docstring);
    g' = g, or c⊙g with ``col_scale`` c; m⊙dx with ``mask_dx``; + t with ``t_add`` (launch_gemm.launch_dx)."""
    from .launch_gemm import launch_dx as gemm_dx

    N, K = weight.shape
    t = strategy.thresholds(g.device)
    cols = _slab_size(K, N, g.element_size(), t, g.shape[0], common.sm_count(g.device))
    halves = _halves(g.device, g.dtype, (N, cols))
    starts = list(range(0, K, cols))

    def dequantize(i, half):
        k0 = starts[i]
        _dequantize_window(weight, halves[half, :, : min(cols, K - k0)], 0, k0)

    def gemm(i, half):
        k0 = starts[i]
        k1 = min(k0 + cols, K)
        part = slice(k0, k1)
        gemm_dx(g, halves[half, :, : k1 - k0], None if dx is None else dx[:, part], precisions,
                x2d=None if x2d is None else x2d[:, part], A=None if A is None else A[:, part], v=v,
                dA32=None if dA32 is None else dA32[:, part], scaling=scaling, dropout_p=dropout_p, seed=seed,
                mask_col0=k0, mask_width=K, col_scale=col_scale, mask_dx=mask_dx,
                t_add=None if t_add is None else t_add[:, part])  # fmt: skip

    _pipeline(g.device, len(starts), dequantize, gemm, t.slab_overlap)
