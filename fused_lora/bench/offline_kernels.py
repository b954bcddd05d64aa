"""The kernels the offline instrument can price: one ``KernelModel`` per @triton.jit kernel the launchers launch.

The instrument finds launches by running the launchers (offline_capture.py), so a new kernel, strategy or autotune
config needs no change there. What it cannot read from the compiled code is how many main-loop iterations a program
runs and which strategy a kernel belongs to; that is this registry. A launch of a kernel that is not here stops the
instrument with a message naming it.

To add a kernel (one entry, e.g. for a split-K decode kernel with K_PER_SPLIT columns per program):

    "lora_decode_kernel": KernelModel(path="decode", trips=lambda a: cdiv(a["K_PER_SPLIT"], a["BLOCK_K"])),

``trips`` receives the launch's arguments by parameter name (sizes, constexprs, the autotune config's BLOCK_*;
tensors as shape-only meta tensors); it returns the iterations of the kernel's main loop (the innermost SASS loop with
the most MMA, then loads) per program, 1 for a kernel without a loop. ``baseline`` names the tile of a GEMM main loop so the report can set it beside a plain Triton bf16 GEMM
compiled at the same tile and operand layout (offline_baseline.py). ``hbm_bytes`` replaces the default estimate of
the bytes a launch moves (each tensor it is passed, read or written once) for kernels that touch only part of a
tensor they are passed (e.g. a slab of W), and ``weight_share`` the share of the stored weight such a kernel reads
(for the HBM-bandwidth fraction on the NF4 bytes; by default a launch reads all of W if it is passed W's packed
bytes or dense tensor, none of it otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

__all__ = ["KernelModel", "GemmTileNames", "KERNELS", "cdiv"]


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclasses.dataclass(frozen=True)
class GemmTileNames:
    """Which constexprs of a GEMM kernel are the output rows, output columns and reduction step of its main loop,
    and whether its B operand is W read row by row as Wᵀ (``b_transposed``: y = x·Wᵀ) or W itself (dx = g·W)."""

    rows: str
    cols: str
    step: str
    b_transposed: bool


@dataclasses.dataclass(frozen=True)
class KernelModel:
    """What the cost model needs to know about a kernel beyond its compiled code."""

    path: str | Callable[[dict], str]  # the strategy it belongs to: "lowrank", "inloop", "dense", "decode", ...
    trips: Callable[[dict], int]  # main-loop iterations per program (1 for a kernel without a loop)
    baseline: GemmTileNames | None = None  # GEMM tile for the dense Triton GEMM baseline
    hbm_bytes: Callable[[dict], int] | None = None  # bytes the launch moves, when not every tensor it is passed
    weight_share: Callable[[dict], float] | None = None  # share of the stored W it reads, when not all of it
    # the other innermost loops in code order (offline_compile's side_loops): (trips, programs that run it; None:
    # every program, after its main loop; a number: that many programs of their own, beside the others)
    side_loops: Callable[[dict], list[tuple[int, int | None]]] | None = None
    # which innermost loop is the main one, by position in code order (None: the one with the most MMA, then loads);
    # for kernels whose other loops can out-count the main one (the decode forward's u at r = 64)
    main_loop: int | None = None

    def path_of(self, args: dict) -> str:
        return self.path(args) if callable(self.path) else self.path


def _partial_trips(args: dict) -> int:
    """Trips of the decode epilogues' loop over the S split partials (lora_decode.sum_partials' unroll)."""
    from ..kernels.lora_decode import PARTIALS_PER_TRIP

    return cdiv(max(1, args["S"]), PARTIALS_PER_TRIP.value)


def _decode_u_loops(args: dict) -> list[tuple[int, int | None]]:
    """The decode forward's u: one loop per R_CHUNK ranks, as many K steps as the W programs, run by one column of
    programs of its own (S of them)."""
    if not args["HAS_LORA"]:
        return []
    trips = cdiv(min(args["K_PER_SPLIT"], args["K"]), args["BLOCK_K"])
    splits = cdiv(args["K"], args["K_PER_SPLIT"])
    return [(trips, splits)] * cdiv(args["R_PAD"], args["R_CHUNK"])


def _epilogue_u_loops(args: dict) -> list[tuple[int, int | None]]:
    """The decode epilogue's sums of u's parts (one loop per R_CHUNK ranks), in every program after y's."""
    if not args["HAS_LORA"]:
        return []
    return [(cdiv(max(1, args["U_SPLITS"]), args["U_PER_TRIP"]), None)] * cdiv(args["R_PAD"], args["R_CHUNK"])


def _epilogue_path(args: dict) -> str:
    """The decode forward's epilogue (every row in one tile), or the same kernel after the middle path's split-K
    GEMM (launch_gemm._launch_y_split: 16-row tiles, and the middle path starts above M = 16)."""
    return "decode" if args["M"] <= args["BLOCK_M"] else "split"


def _weight_path(args: dict) -> str:
    """NF4 decoded inside the GEMM main loop ("inloop"), or a dense W (or a dense slab of W: the large-M path); with
    "-split" for the middle path's split-K forward (lora_fwd_kernel SPLIT_K)."""
    return ("inloop" if args.get("IS_NF4") else "dense") + ("-split" if args.get("SPLIT_K") else "")


def _slab_elements(args: dict) -> int:
    return int(args["ROWS"]) * int(args["COLS"])


def _slab_bytes(args: dict) -> int:
    """A window of W: its packed bytes and fp32 scales read, the dequantized slab written."""
    elements = _slab_elements(args)
    return elements // 2 + elements // int(args["BLOCKSIZE"]) * 4 + elements * args["slab_ptr"].element_size()


KERNELS: dict[str, KernelModel] = {
    # u = (m⊙x)·Aᵀ over K (split over K when the launcher passes K_PER_SPLIT)
    "lora_u_kernel": KernelModel("lowrank", lambda a: cdiv(a.get("K_PER_SPLIT", a["K"]), a["BLOCK_K"])),
    # y = x·deq(W)ᵀ + b + s·u·Bᵀ (with SPLIT_K: K_PER_SPLIT columns per program, partial sums of x·deq(W)ᵀ only)
    "lora_fwd_kernel": KernelModel(_weight_path, lambda a: cdiv(min(a["K_PER_SPLIT"], a["K"]), a["BLOCK_K"]),
                                   GemmTileNames("BLOCK_M", "BLOCK_N", "BLOCK_K", b_transposed=True)),
    # v = g·B, dB = s·gᵀ·u, db = Σ g over N_PER_SPLIT columns per program
    "lora_vdb_kernel": KernelModel("lowrank", lambda a: cdiv(min(a["N_PER_SPLIT"], a["N"]), a["BLOCK_N"])),
    # the backward's atomic accumulators (v, dB, db, dA) zeroed by one launch, B split for the v/dB pass (no loop)
    "zero_fp32_kernel": KernelModel("lowrank", lambda a: 1),
    # dx = g·deq(W) + s·m⊙(v·A), dA += s·vᵀ·(m⊙x)
    "lora_dx_kernel": KernelModel(_weight_path, lambda a: cdiv(a["N"], a["BLOCK_N"]),
                                  GemmTileNames("BLOCK_M", "BLOCK_K", "BLOCK_N", b_transposed=False)),
    # large M: one window of W dequantized into the workspace (no loop: one tile per program)
    "nf4_slab_kernel": KernelModel("slab", lambda a: 1, hbm_bytes=_slab_bytes,
                                   weight_share=lambda a: _slab_elements(a) / (2 * a["packed_ptr"].numel())),
    # decode: split-K partial sums of yᵀ (and u), then their sum with bias and the low-rank term
    "lora_decode_fwd_kernel": KernelModel("decode", lambda a: cdiv(min(a["K_PER_SPLIT"], a["K"]), a["BLOCK_K"]),
                                          side_loops=_decode_u_loops, main_loop=0),
    "lora_decode_fwd_epilogue_kernel": KernelModel(_epilogue_path, _partial_trips, side_loops=_epilogue_u_loops,
                                                   main_loop=0),
    "lora_decode_dx_kernel": KernelModel("decode", lambda a: cdiv(min(a["N_PER_SPLIT"], a["N"]), a["BLOCK_N"])),
    "lora_decode_dx_epilogue_kernel": KernelModel("decode", _partial_trips),
    # deterministic mode: split reductions of v, dB and dA (summed in a fixed order afterwards)
    "lora_v_split_kernel": KernelModel("lowrank", lambda a: cdiv(min(a["N_PER_SPLIT"], a["N"]), a["BLOCK_N"])),
    "lora_db_split_kernel": KernelModel("lowrank", lambda a: cdiv(min(a["M_PER_SPLIT"], a["M"]), a["BLOCK_M"])),
    "lora_da_split_kernel": KernelModel("lowrank", lambda a: cdiv(min(a["M_PER_SPLIT"], a["M"]), a["BLOCK_M"])),
}  # fmt: skip
