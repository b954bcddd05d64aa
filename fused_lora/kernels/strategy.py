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

The thresholds are a ``Thresholds`` per GPU family, recalibrated from measurements (bench sweeps) by editing
``THRESHOLDS`` or, for one process, with ``use_thresholds``. Before any GPU run they come from the offline cost
model (compiled SASS, sm_90a, 128×128×64 tiles): the middle path's NF4 main loop issues about 283 instructions per
warp and K step against the dense loop's 100, i.e. its decode adds ~0.1-0.4 of the dense GEMM time at every M (it is
repeated for every BLOCK_M rows); the large path adds one pass over W (read N·K/2 bytes plus scales, write N·K·2:
~37 µs for 14336×4096 on an H200), of which the side stream hides all but the first slab. The two
cross near M = 512 on an H200 (dense GEMM of 14336×4096 at M=512: ~80 µs); an A100's MMA is 3× slower against its
ALUs, so the in-loop decode stays cheap longer there (1024). Decode: the split-K partial sums cost S·M·N·4 bytes
(mostly in L2): at K=4096, N=14336 the forward takes S = 2 on an H200 (launch_gemm._splits at
decode_programs_per_sm = 2), 6 % of the NF4 bytes at M=16 and 12.5 % at 32.

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

from ..backend import interpreting


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The M thresholds of the three paths and the large path's workspace.

    decode_max_m: largest M of the decode path (split-K); at most 64 (the decode kernels hold every row of an M
        tile of ≤ 64 rows).
    large_min_m: smallest M of the large path (NF4 only).
    workspace_bytes: cap of the large path's workspace (two slabs of W in the compute dtype); never a whole N×K
        copy of a larger layer.
    slab_overlap: dequantize the next slab on a side CUDA stream while the current slab's GEMM runs.
    programs_per_sm: programs per SM the split reductions aim for: launch_gemm._splits takes between half and
        twice as many, the count that leaves the busiest SM the least work.
    decode_programs_per_sm: the same for the decode path's split-K kernels (launch_decode.py). Their programs
        are issue-bound (the NF4 decode), so a second wave only adds a prologue, an epilogue and a partial sum per
        program: aim for what an SM holds at once. On sm_90 their NF4 kernels use 187-202 registers × 128 threads,
        2 per SM (bench/results/offline): 2 splits of 16 K steps instead of 8 of 4 for Llama-3-8B's up_proj, a
        forward 9-14 % faster at M ≤ 16 by the offline model. Elsewhere programs_per_sm until measured.
    split_k_min_steps: the middle path's forward splits K when its tiles would leave at least half the SMs idle
        (launch_gemm.y_splits), into at most one program per SM, each of at least this many K steps; 0: never.
    """

    decode_max_m: int = 16
    large_min_m: int = 512
    workspace_bytes: int = 64 << 20
    slab_overlap: bool = True
    programs_per_sm: int = 4
    decode_programs_per_sm: int = 4
    split_k_min_steps: int = 4


# Per GPU family (compute capability major); "default" for others and for the CPU interpreter.
THRESHOLDS: dict[str, Thresholds] = {
    "default": Thresholds(),
    "sm90": Thresholds(decode_max_m=16, large_min_m=512, decode_programs_per_sm=2),
    "sm80": Thresholds(decode_max_m=16, large_min_m=1024),
}

_override: list[Thresholds] = []
_deterministic_override: list[bool] = []


def thresholds(device) -> Thresholds:
    """The thresholds for ``device``: an active ``use_thresholds`` override, else THRESHOLDS by GPU family."""
    if _override:
        return _override[-1]
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return THRESHOLDS["default"]
    major = torch.cuda.get_device_capability(device)[0]
    return THRESHOLDS.get(f"sm{major}0", THRESHOLDS["default"])


@contextlib.contextmanager
def use_thresholds(t: Thresholds | None = None, **changes):
    """Use ``t`` (or the current thresholds with ``changes``) for every launch inside the block.

    Example:
        >>> with use_thresholds(decode_max_m=0, large_min_m=1):   # every NF4 call takes the large path
        ...     y, u = lora.forward(x, w, A, B, 2.0, None, 0.0, 0)
    """
    base = t if t is not None else (_override[-1] if _override else THRESHOLDS["default"])
    _override.append(dataclasses.replace(base, **changes))
    try:
        yield _override[-1]
    finally:
        _override.pop()


def deterministic() -> bool:
    """Whether the kernels must be bitwise reproducible (see the module docstring)."""
    if _deterministic_override:
        return _deterministic_override[-1]
    if torch.are_deterministic_algorithms_enabled():
        return True
    return os.environ.get("FUSED_LORA_DETERMINISTIC", "0") not in ("", "0")


@contextlib.contextmanager
def use_deterministic(flag: bool = True):
    """Force the deterministic mode on (or off) inside the block, whatever torch's setting."""
    _deterministic_override.append(bool(flag))
    try:
        yield
    finally:
        _deterministic_override.pop()


def path(M: int, weight_is_nf4: bool, device) -> str:
    """"decode", "middle" or "large" for a call with M rows."""
    t = thresholds(device)
    if M <= min(t.decode_max_m, 64):
        return "decode"
    if weight_is_nf4 and M >= t.large_min_m:
        return "large"
    return "middle"


# ---------------------------------------------------------------------------------------------- the workspace

# One workspace per device and stream, allocated at its first use and reused by every layer: the slabs are produced
# and consumed in that stream's order, so layers never overlap in it.
_WORKSPACES: dict = {}


def workspace(device, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of at least ``nbytes`` on ``device`` for the current stream, kept for reuse (grown when a
    larger one is asked for)."""
    device = torch.device(device)
    stream = getattr(torch.cuda.current_stream(device), "cuda_stream", 0) if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < nbytes:
        _WORKSPACES.pop(key, None)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _WORKSPACES[key] = buffer
    return buffer


def release_workspaces() -> None:
    """Free the cached workspaces (they are allocated again at the next large-M call)."""
    _WORKSPACES.clear()
