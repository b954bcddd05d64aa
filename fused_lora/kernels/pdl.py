"""Programmatic dependent launch (PDL, sm_90+): the next kernel of a chain launches during the previous one's last
wave instead of after it.

Why: the decode path and the backward's low-rank step are chains of short kernels (a split-K GEMM, then the epilogue
that sums its partials; the zeroing of the atomic accumulators, then the pass over g), each a few µs of work, and on
a stream every launch waits for the previous kernel to finish before it starts: about 2 µs of GPU time per launch
(bench/results/offline, ``GpuConstants.launch_us``), a fifth of a decode forward. With PDL (CUDA's programmatic
stream serialization, Hopper and later) a kernel launched with ``launch_pdl`` may start as soon as every program of
the kernel before it has executed ``griddepcontrol.launch_dependents``; it then blocks in ``griddepcontrol.wait``
until that kernel has completed and its memory writes are visible. So its launch and first instructions overlap the
previous kernel's tail, and it reads nothing early.

The rule, one for every kernel that takes part (a ``PDL`` constexpr and ``launch_args`` at its launch):

    wait_for_previous(PDL)   first statement of the kernel: griddepcontrol.wait, then launch_dependents (this kernel
                             reads and writes nothing before the previous kernel has finished; the next one may be
                             scheduled once all of this kernel's programs have started)

so a chain stays ordered exactly as without PDL, whatever kernel (ours or not) comes before. Off under the
interpreter, off the GPU, on GPUs before sm_90 (the PTX instructions need sm_90), with a Triton before 3.4, and with
FUSED_LORA_PDL=0 in the environment (``enabled``). The numbers are those of plain launches: bitwise in the
deterministic mode (strategy.py), and with the relaxed atomics' run-to-run order otherwise, as without PDL.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import cuda_capability, interpreting

try:  # grid dependency control and the launch_pdl option: Triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # an older Triton: PDL stays off (enabled), these are never reached
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENV_VAR = "FUSED_LORA_PDL"


def enabled(device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (module docstring): a CUDA (not ROCm)
    GPU of compute capability 9 or more, a Triton with grid dependency control, not the interpreter, and
    FUSED_LORA_PDL not "0"."""
    device = torch.device(device)
    if not HAS_GDC or interpreting() or device.type != "cuda" or os.environ.get(ENV_VAR, "1") == "0":
        return False
    return torch.version.hip is None and cuda_capability(device)[0] >= 9


def launch_args(device) -> dict:
    """Keyword arguments of a launch of a kernel with a ``PDL`` constexpr: the constexpr, and Triton's launch option
    ``launch_pdl`` when PDL is on."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the kernel launched before this one has completed (its writes visible), then let the
    next kernel launch. The first statement of every kernel that takes part."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
