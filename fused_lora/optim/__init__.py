"""AdamW with optimizer state paged between GPU and host memory, and bitsandbytes-compatible 8-bit AdamW.

* :class:`PagedAdamW`: fp32 state, the update of ``torch.optim.AdamW``; state in managed (unified) memory.
* :class:`PagedAdamW8bit`: blockwise 8-bit state (blocksize 256, signed dynamic map for ``exp_avg``, unsigned for
  ``exp_avg_sq``, one fp32 absmax per block) with the arithmetic of ``bitsandbytes.optim.AdamW8bit``; tensors with
  fewer than ``min_8bit_size`` elements keep 32-bit state, as bitsandbytes does. State in managed memory.
* :class:`AdamW8bit`: the same 8-bit optimizer with ordinary (non-paged) state.

Paging. Each parameter's state is one managed allocation (``fused_lora._C``). A :class:`PageManager` keeps at most
``gpu_budget_bytes`` of it resident per GPU after a step (default: no limit, everything resident after the first
step). A step updates parameters in chunks (about ``chunk_bytes`` of state each, one fused kernel launch per chunk on
CUDA): while chunk i is updated on the compute stream, chunk i+1's state is prefetched on a side stream; the compute
stream waits only on that prefetch's event. After each update, state beyond the budget is prefetched back to the
host on a second side stream, after an event that marks its last update, so evictions overlap prefetches; a
prefetch waits for the evictions queued before it. Nothing synchronizes the device.

Which state is evicted: the one whose next use is furthest away. The update order is the same every step, and for
such a cyclic order least-recently-used eviction is the worst case (it evicts exactly the state needed next, so any
budget below the total streams all of it every step). Evicting by furthest next use (Belady's rule) keeps the state
that comes first in the order resident from step to step and streams only the rest: with N equal blocks of state
and a budget of k, each step moves N - k blocks in and N - k out. During a step the GPU holds at most the budget
plus two chunks (the one updated and the one prefetched); after ``step()`` the resident state is within it.

On a CPU build of the extension the same code runs over host memory: prefetches are recorded in a simulated page
table, so budgets, residency and eviction are observable in tests (``state_residency()``, ``paging_stats()``).
A GPU without concurrent managed access gets ordinary device tensors instead, with one warning.

Layout (imports point down only): ``update.py`` the update arithmetic in PyTorch (and the per-tensor scalars),
``pager.py`` the PageManager, ``adamw.py`` the optimizers; the 8-bit codec is ``fused_lora.codec`` and the Triton
update kernels are ``fused_lora.kernels.adamw``. Backend selection is fused_lora.backend's, as for lora_linear.

Example::

    opt = fused_lora.optim.PagedAdamW(model.parameters(), lr=1e-4, weight_decay=0.01, gpu_budget_bytes=2 << 30)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from ..codec import dequantize_blockwise, dynamic_map, quantization_lut, quantize_blockwise
from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit
from .pager import PageManager

__all__ = [
    "PagedAdamW",
    "PagedAdamW8bit",
    "AdamW8bit",
    "PageManager",
    "dynamic_map",
    "quantization_lut",
    "quantize_blockwise",
    "dequantize_blockwise",
]
