"""Which kernel path a call takes, by the number of rows M, the weight and the GPU; and the deterministic mode.

Decoding NF4 inside a GEMM costs O(M·N·K) (each W tile is decoded once per BLOCK_M rows), decoding once O(N·K).
Three paths (docs/DESIGN.md, "The math"):

    decode  M ≤ decode_max_m                 split-K kernels that stream W once and fill every SM, the reduction
                                             over the splits and the low-rank term and bias in a small epilogue
                                             kernel (launch_decode.py)
    middle  decode_max_m < M < large_min_m   one GEMM kernel per pass, NF4 decoded in registers in its main loop;
                                             a forward whose tiles leave SMs idle splits K, its epilogue kernel
                                             adds the partial sums (launch_gemm.py, y_splits)
    large   M ≥ large_min_m (NF4 only)       W dequantized in slabs into a bounded, reused workspace, each slab
                                             followed by the dense GEMM, which keeps the low-rank term, bias and
                                             dropout (launch_slab.py)

A dense W takes the decode path at small M and the GEMM otherwise (middle and large are the same GEMM for it).

The thresholds are a ``Thresholds`` per GPU family, recalibrated from measurements by editing ``THRESHOLDS`` or, for one
process, with ``use_thresholds``: ``python -m fused_lora bench --paths`` times every path at each M on the GPU it runs
on and prints the decode_max_m and large_min_m its times suggest (fused_lora/bench/paths.py). Before any GPU run the
sm_90 values come from the offline cost model by the same rules: ``python -m fused_lora.bench.offline_paths``
(fused_lora/bench/offline_paths.py) predicts each path's fwd_bwd at each M for Llama-3-8B's shapes, bf16 and fp32 x, and
writes bench/results/offline/paths.md. With today's kernels the decode path is predicted faster than the middle one up
to M = 64, the decode kernels' limit, at every shape (bf16: the middle path 1.2-2.3x slower at M = 32, 1.06-2.0x at 64:
the decode path's split-K kernels stream W once and fill the GPU, where the middle path's tiles leave SMs idle or repeat
the decode): decode_max_m = 64. For bf16 x the middle path is predicted faster than the large one at every M measured
(1-4096): the large path 31-72 % slower at M = 512, 7-12 % at 2048, 3-6 % at 4096 (the middle loops are bound by the
MMA, the decode hidden under it, where the large path adds a pass over W). The large path keeps M ≥ 4096 only by the
margin: there the two are within 10 % (offline_paths.LARGE_MARGIN: the middle path's time rests on the decode staying
hidden, the large path's on a memory pass). fp32 x is another matter (large_min_m_fp32 = 1024, from the offline model
only: bench --paths times bf16): its GEMMs run on the FMA pipes, the decode in the middle path's loop competes with the
math, and the large path is predicted 1.1-2.7x faster at M = 1024-2048 on the two large shapes. sm_80 keeps its earlier
values (the cost model prices sm_90a only): an A100's MMA is 3× slower against its ALUs, so the in-loop decode stays
cheap longer there. Decode: the split-K partial sums cost S·M·N·4 bytes (mostly in L2): at K=4096, N=14336 the forward
takes S = 2 on an H200 (launch_gemm._splits at decode_programs_per_sm = 2), 6 % of the NF4 bytes at M=16, 12.5 % at 32
and 25 % at 64.

Deterministic mode (``deterministic()``): torch.are_deterministic_algorithms_enabled(), or FUSED_LORA_DETERMINISTIC=1
in the environment, or ``use_deterministic(True)``. Then no kernel accumulates with atomics: every cross-program
reduction (v, dA, dB, db, and the decode path's split-K) writes partial results to a [splits, ...] fp32 buffer that
is summed in a fixed order, so gradients are bitwise reproducible. Otherwise dA, dB, v and db are accumulated with
relaxed fp32 atomics (no memory fence; the order, and so the last bits, can differ run to run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from ..backend import cuda_capability, interpreting


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The M thresholds of the three paths and the large path's workspace.

    decode_max_m: largest M of the decode path (split-K); at most 64 (the decode kernels hold every row of an M
        tile of ≤ 64 rows).
    large_min_m: smallest M of the large path (NF4 only).
    large_min_m_fp32: the same for fp32 x, None: large_min_m. fp32 GEMMs run in IEEE fp32 on the FMA pipes, where the
        middle path's decode in the main loop competes with the math instead of hiding under an MMA: the large path
        (one decode pass, then the GEMM) pays from smaller M (``large_min_for``).
    workspace_bytes: cap of the large path's workspace (two slabs of W in the compute dtype); never a whole N×K
        copy of a larger layer.
    slab_overlap: dequantize the next slab on a side CUDA stream while the current slab's GEMM runs.
    programs_per_sm: programs per SM the split reductions aim for: launch_gemm._splits takes between half and
        twice as many, the count that leaves the busiest SM the least work.
    decode_programs_per_sm: the same for the decode path's split-K kernels (launch_decode.py), None: programs_per_sm.
        Their NF4 programs are bound by the decode (the ALU pipe with the byte permutes, issue and the HBM with the pair
        table), so a second wave only adds a prologue, an epilogue and a partial sum per program: aim for what an SM
        holds at once. On sm_90 they use 167-255 registers × 128 threads (255 for the forward with the pair table at
        BLOCK_M 32), 2 per SM (bench/results/offline): 2 splits of 16 K steps instead of 8 of 4 for Llama-3-8B's
        up_proj, a forward 9-14 % faster at M ≤ 16 by the offline model when this was set.
        The dense decode forward holds one program per SM but streams W: fewer programs cost it less too (46 of the 48
        dense decode rows of the offline sweep faster, 2 slower by under 1 %). Elsewhere None until measured.
    split_k_min_steps: the middle path's forward splits K when its tiles would leave at least half the SMs idle
        (launch_gemm.y_splits), into at most one program per SM, each of at least this many K steps; 0: never.
    """

    decode_max_m: int = 16
    large_min_m: int = 512
    large_min_m_fp32: int | None = None
    workspace_bytes: int = 64 << 20
    slab_overlap: bool = True
    programs_per_sm: int = 4
    decode_programs_per_sm: int | None = None
    split_k_min_steps: int = 4

    def __post_init__(self):
        least = {"decode_max_m": 0, "large_min_m": 1, "large_min_m_fp32": 1, "workspace_bytes": 1,
                 "programs_per_sm": 1, "decode_programs_per_sm": 1, "split_k_min_steps": 0}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if value is None and name in ("decode_programs_per_sm", "large_min_m_fp32"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Thresholds.{name} must be an integer ≥ {low}, got {value!r}")
        if not isinstance(self.slab_overlap, bool):
            raise ValueError(f"Thresholds.slab_overlap must be True or False, got {self.slab_overlap!r}")

    def large_min_for(self, x_dtype) -> int:
        """The smallest M of the large path for x of ``x_dtype`` (large_min_m_fp32 for fp32 when set)."""
        if x_dtype == torch.float32 and self.large_min_m_fp32 is not None:
            return self.large_min_m_fp32
        return self.large_min_m

    def programs_per_sm_for(self, decode: bool) -> int:
        """The programs per SM launch_gemm._splits aims for: decode_programs_per_sm for the decode kernels
        (``decode``) when set, else programs_per_sm."""
        if decode and self.decode_programs_per_sm is not None:
            return self.decode_programs_per_sm
        return self.programs_per_sm


# Per GPU family (compute capability major); "default" for others and for the CPU interpreter.
THRESHOLDS: dict[str, Thresholds] = {
    "default": Thresholds(),
    # decode_max_m, large_min_m and large_min_m_fp32 from python -m fused_lora.bench.offline_paths
    "sm90": Thresholds(decode_max_m=64, large_min_m=4096, large_min_m_fp32=1024, decode_programs_per_sm=2),
    "sm80": Thresholds(decode_max_m=16, large_min_m=1024),
}

# Active use_thresholds blocks, outermost first: a whole Thresholds, or a dict of changes to what applies without
# it. Process-wide, as torch.use_deterministic_algorithms is (autograd runs backward kernels on its own threads).
_override: list = []
_deterministic_override: list[list[bool]] = []


def _family(device) -> Thresholds:
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return THRESHOLDS["default"]
    major = cuda_capability(device)[0]
    return THRESHOLDS.get(f"sm{major}0", THRESHOLDS["default"])


def thresholds(device) -> Thresholds:
    """The thresholds for ``device``: THRESHOLDS by GPU family, with the active ``use_thresholds`` blocks applied."""
    t = _family(device)
    for entry in _override:
        t = entry if isinstance(entry, Thresholds) else dataclasses.replace(t, **entry)
    return t


def _remove(stack: list, entry) -> None:
    """Remove ``entry`` itself (not an equal one) from ``stack``: blocks may end in any order across threads."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entry:
            del stack[i]
            return


@contextlib.contextmanager
def use_thresholds(t: Thresholds | None = None, **changes):
    """Use ``t`` (with ``changes``), or the thresholds that apply without this block with ``changes`` (each GPU
    family keeps its own other values), for every launch inside the block; yields the thresholds of the current
    device (the current CUDA device, else the CPU's). A change of large_min_m without one of large_min_m_fp32 is
    for every x dtype (large_min_m_fp32 then follows it).

    Example:
        >>> with use_thresholds(decode_max_m=0, large_min_m=1):   # every NF4 call takes the large path
        ...     y, u = lora.forward(x, w, A, B, 2.0, None, 0.0, 0)
    """
    if "large_min_m" in changes and "large_min_m_fp32" not in changes:
        changes = {**changes, "large_min_m_fp32": None}
    checked = dataclasses.replace(t or THRESHOLDS["default"], **changes)  # unknown names and bad values raise here
    entry = checked if t is not None else dict(changes)
    _override.append(entry)
    try:
        yield thresholds(torch.device("cuda") if torch.cuda.is_available() else "cpu")
    finally:
        _remove(_override, entry)


def deterministic() -> bool:
    """Whether the kernels must be bitwise reproducible (see the module docstring)."""
    if _deterministic_override:
        return _deterministic_override[-1][0]
    if torch.are_deterministic_algorithms_enabled():
        return True
    return os.environ.get("FUSED_LORA_DETERMINISTIC", "0") not in ("", "0")


@contextlib.contextmanager
def use_deterministic(flag: bool = True):
    """Force the deterministic mode on (or off) inside the block, whatever torch's setting."""
    entry = [bool(flag)]  # a list of its own, so that the block removes exactly its entry
    _deterministic_override.append(entry)
    try:
        yield
    finally:
        _remove(_deterministic_override, entry)


def path(M: int, weight_is_nf4: bool, device, x_dtype=None) -> str:
    """"decode", "middle" or "large" for a call with M rows of x in ``x_dtype`` (None: a 16-bit dtype)."""
    t = thresholds(device)
    if M <= min(t.decode_max_m, 64):
        return "decode"
    if weight_is_nf4 and M >= t.large_min_for(x_dtype):
        return "large"
    return "middle"


# ---------------------------------------------------------------------------------------------- the workspace


def workspace(device, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` on ``device`` for one large-path call (launch_slab.py), from PyTorch's caching
    allocator: on a GPU it hands the same block back call after call (bounded by ``workspace_bytes``, reused), and
    it orders reuse by stream and is safe across host threads. A process-wide cache keyed by (device, stream) was
    neither: two host threads issuing on one stream (e.g. two server threads on the default stream) dequantized into
    each other's slabs, and it kept a buffer for every stream handle ever seen (external streams, graph captures)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)
