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

Example::

    opt = fused_lora.optim.PagedAdamW(model.parameters(), lr=1e-4, weight_decay=0.01, gpu_budget_bytes=2 << 30)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from itertools import chain

import torch

from . import _ext

QBLOCK = 256
LUT_SIZE = 65536
_ALIGN = 256
_warned_fallbacks = set()

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


# ----------------------------------------------------------------------------------------------------------------
# 8-bit blockwise quantization (bitsandbytes' dynamic maps)
# ----------------------------------------------------------------------------------------------------------------


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map: 256 sorted fp32 codes in [-1, 1].

    Seven decades 10^-6 … 10^0; decade i holds the midpoints of a uniform split of [0.1, 1] into 2^i (signed, both
    signs) or 2^(i+1) (unsigned) intervals, scaled by 10^(i-6); plus 0 and 1.

    Example: ``dynamic_map(signed=True)[[127, 255]]`` → ``tensor([0., 1.])``
    """
    values = [torch.zeros(1), torch.ones(1)]
    for decade in range(7):
        intervals = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        level = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (decade - 6)
        values += [level, -level] if signed else [level]
    return torch.sort(torch.cat(values)).values


def quantization_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table bitsandbytes' blockwise quantizer looks codes up in (uint8, code's device).

    Entry i covers the normalized value u_i = -1 + 2i/65535 (fp32) and holds the number of code midpoints
    (code[j] + code[j+1]) / 2 strictly below u_i, i.e. the code nearest to u_i.
    """
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    u = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    code = code.float()
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, u).clamp_(max=255).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, lut: torch.Tensor | None = None):
    """Blockwise (256) 8-bit quantization with bitsandbytes' arithmetic (its CPU quantizer, bit for bit).

        a = max|x| over the block;  u = clamp(x · (1/a), -1, 1);  t = trunc(((u + 1) · 0.5) · 65535 + 0.5)
        q = lut[t]   (lut = quantization_lut(code));  q = 0 for blocks with a = 0

    Args: x: fp32 tensor, any shape; code: fp32 (256,) sorted map; lut: its quantization_lut (built if None).
    Returns: q uint8 with x's shape, absmax fp32 (ceil(numel/256),).
    Example: ``q, absmax = quantize_blockwise(torch.randn(1000), dynamic_map(True))``
    """
    lut = quantization_lut(code) if lut is None else lut
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = -(-n // QBLOCK)
    padded = torch.nn.functional.pad(flat, (0, blocks * QBLOCK - n)).view(blocks, QBLOCK)
    absmax = padded.abs().amax(dim=1)
    empty_block = (absmax == 0)[:, None]
    normed = (padded * (1.0 / absmax)[:, None]).clamp_(-1.0, 1.0).masked_fill_(empty_block, -1.0)
    t = (normed + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5
    q = lut[t.long()].masked_fill_(empty_block, 0)
    return q.reshape(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: code[q] · absmax of q's block, fp32 with q's shape."""
    values = code[q.reshape(-1).long()]
    n = values.numel()
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, blocks * QBLOCK - n)).view(blocks, QBLOCK)
    return (padded * absmax[:, None]).reshape(-1)[:n].view(q.shape)


# ----------------------------------------------------------------------------------------------------------------
# Update arithmetic in plain PyTorch (the CPU path and the oracle of the Triton kernels in fused_lora/kernels/adamw.py)
# ----------------------------------------------------------------------------------------------------------------


def _scalars(kind: str, lr: float, group: dict, step: int) -> tuple:
    """Per-tensor scalars in kernels.adamw.SCALAR_COLUMNS order (float64 here; the kernels round them to fp32).

    lr is group["lr"] read once per group (it may be a tensor, and reading a CUDA tensor synchronizes).
    """
    (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
    c1 = 1 - beta1**step
    decay = 1 - lr * wd if wd != 0 else 1.0
    if kind == "torch32":
        return (beta1, 1 - beta1, beta2, 1 - beta2, decay, -(lr / c1), (1 - beta2**step) ** 0.5, eps)
    c2 = math.sqrt(1 - beta2**step)
    if kind == "bnb32":
        return (beta1, 1 - beta1, beta2, 1 - beta2, decay, -lr * c2 / c1, c2, eps * c2)
    return (beta1, 1 - beta1, beta2, 1 - beta2, decay, -lr / c1, c2, eps)


def torch_adamw32_(p, g, exp_avg, exp_avg_sq, scalars):
    """torch.optim.AdamW's single-tensor update (same ops in the same order, so fp32 results are bit-identical)."""
    beta1, omb1, beta2, omb2, decay, step_scale, c2, eps = scalars
    p32 = p.float()
    p32.mul_(decay)
    exp_avg.lerp_(g.float(), omb1)
    exp_avg_sq.mul_(beta2).addcmul_(g.float(), g.float(), value=omb2)
    p32.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / c2).add_(eps), value=step_scale)
    if p32 is not p:
        p.copy_(p32)


def bnb_adamw32_(p, g, state1, state2, scalars):
    """bitsandbytes' 32-bit AdamW update (its CPU implementation's op order)."""
    beta1, omb1, beta2, omb2, decay, step_scale, _, eps_c2 = scalars
    g32, p32 = g.float(), p.float()
    state1.mul_(beta1).add_(g32, alpha=omb1)
    state2.mul_(beta2).addcmul_(g32, g32, value=omb2)
    p32.mul_(decay)
    p32.add_(state1 / (state2.sqrt() + eps_c2), alpha=step_scale)
    if p32 is not p:
        p.copy_(p32)


def bnb_adamw8bit_(p, g, state, scalars, luts=(None, None)):
    """bitsandbytes' blockwise 8-bit AdamW update: dequantize, update, requantize (its CPU op order).

    state holds state1/state2 (uint8), absmax1/absmax2, qmap1/qmap2; luts are the maps' quantization_lut.
    """
    beta1, omb1, beta2, omb2, decay, step_scale, c2, eps = scalars
    m = dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"])
    v = dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"])
    g32, p32 = g.float(), p.float()
    m.mul_(beta1).add_(g32, alpha=omb1)
    v.mul_(beta2).addcmul_(g32, g32, value=omb2)
    denom = (v.sqrt() / c2).add_(eps)
    p32.mul_(decay)
    p32.addcdiv_(m, denom, value=step_scale)
    if p32 is not p:
        p.copy_(p32)
    for name, x, code, lut in (("1", m, state["qmap1"], luts[0]), ("2", v, state["qmap2"], luts[1])):
        q, absmax = quantize_blockwise(x, code, lut)
        state["state" + name].copy_(q)
        state["absmax" + name].copy_(absmax)


# ----------------------------------------------------------------------------------------------------------------
# Page manager
# ----------------------------------------------------------------------------------------------------------------


def _warn_once(key, message: str):
    """Warn about a paging fallback once per process and cause (`key`)."""
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(message, stacklevel=4)


class _PagedBlock:
    """One parameter's state: a single managed allocation and the bookkeeping of where it is."""

    __slots__ = ("buffer", "nbytes", "location", "last_use", "last_move")

    def __init__(self, buffer, location):
        self.buffer = buffer  # uint8 managed tensor; the state tensors are views of it
        self.nbytes = buffer.numel()
        self.location = location  # device index the state is paged to
        self.last_use = None  # CUDA event after the last update that read and wrote it
        self.last_move = None  # CUDA event after its last prefetch (to the GPU or to the host)


class PageManager:
    """Managed-memory state with a per-GPU byte budget, chunked prefetch on side streams and eviction of the state
    whose next use is furthest away.

    Eviction policy. A step updates the paged blocks in the same order every step (the order of the parameters in
    param_groups, as the optimizer groups them into chunks), so the accesses are cyclic. For a cyclic order least
    recently used is the worst choice: the block it evicts is the one the step needs soonest, so with any budget
    below the total state every block is streamed in and out every step. The manager knows the order and evicts the
    resident block whose next use is furthest in the future (Belady's rule). With P blocks in the order and the
    block at rank ``now`` just updated, the block at rank r is next used ``(r - now - 1) mod P + 1`` updates later;
    walking the order backwards from ``now`` visits the blocks by decreasing next-use distance.

    Eviction runs after each chunk's update, down to the budget, not counting the chunk being prefetched for the next
    update. The block just updated is next used a full cycle later, the furthest of all, so it stays only if it
    fits beside the blocks updated before it. Hence the blocks that fit first in the order stay resident from step
    to step and every other block moves in once and out once per step: with N equal blocks and room for k, N - k
    each way, the least any policy can move when the budget holds between steps.

    Parameters skipped in a step (no gradient) keep their place in the order, so skipping one changes nothing else;
    parameters of groups added later join the order where the step first updates them. Budgets are per GPU: each
    GPU's blocks are a subsequence of the order and are evicted by the same rule.

    Streams and ordering. Prefetches to a GPU and evictions to the host run on two side streams per GPU, so the two
    directions of the link overlap. An eviction waits for the last update that used the block (and for its last
    transfer); the update of a chunk waits for the event of its prefetch; a prefetch waits for the evictions queued
    before it, so evicted memory is free before new state arrives and the GPU holds at most the budget plus two
    chunks (the one being updated and the one being prefetched). Nothing synchronizes the device. After ``step()``
    the resident state is within the budget.

    Args:
        gpu_budget_bytes: bytes of state kept resident per GPU after a step; None keeps everything resident.
        page_min_bytes: a parameter whose state is smaller stays in ordinary memory (not worth a managed page).

    Example::

        pm = PageManager(gpu_budget_bytes=1 << 30)
        state = pm.allocate(key=p, specs=[("exp_avg", p.shape, torch.float32)], device=p.device)
    """

    def __init__(self, gpu_budget_bytes: int | None = None, page_min_bytes: int = 1 << 16):
        if gpu_budget_bytes is not None and gpu_budget_bytes < 0:
            raise ValueError(f"PageManager: gpu_budget_bytes must be >= 0 or None, got {gpu_budget_bytes}")
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_min_bytes = page_min_bytes
        self.blocks: dict = {}  # key -> _PagedBlock
        self.resident: dict[int, dict] = {}  # location -> {key: None} of the blocks resident there
        self.resident_bytes: dict[int, int] = {}  # location -> bytes of those blocks
        self.order: list = []  # the cyclic update order of the paged keys
        self._rank: dict = {}  # key -> its index in self.order
        self._side_streams: dict[tuple, object] = {}  # (location, to_host) -> CUDA stream
        self._last_eviction: dict[int, object] = {}  # location -> CUDA event after the last eviction queued
        self.counters = {"prefetches": 0, "prefetched_bytes": 0, "evictions": 0, "evicted_bytes": 0}

    # -- allocation ---------------------------------------------------------------------------------------------

    def paging_location(self, device: torch.device):
        """The device index state of a parameter on `device` is paged to, or None when it is not paged."""
        ext = _ext.load()
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            if not ext.is_cuda_build():
                _warn_once(
                    "cpu-build",
                    "fused_lora.optim: fused_lora._C was built without CUDA, so optimizer state of CUDA parameters "
                    "stays in ordinary device memory (no paging, gpu_budget_bytes has no effect); rebuild it with a "
                    "CUDA toolkit and a CUDA build of torch (pip install --no-build-isolation -e .)",
                )
                return None
            if not ext.concurrent_managed_access(index):
                _warn_once(
                    index,
                    f"fused_lora.optim: cuda:{index} has no concurrent managed access; optimizer state stays in "
                    "ordinary device memory (no paging)",
                )
                return None
            return index
        if device.type == "cpu" and not ext.is_cuda_build():
            return 0  # the CPU build simulates one device
        return None

    def allocate(self, key, specs, device: torch.device) -> dict:
        """Zeroed state tensors {name: tensor} for `specs` [(name, shape, dtype)], paged when worthwhile."""
        sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in specs]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        location = self.paging_location(device) if total >= self.page_min_bytes else None
        if location is None:
            return {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape, dtype in specs}
        buffer = _ext.load().empty_managed(total, location)
        self.blocks[key] = _PagedBlock(buffer, location)
        return {
            name: buffer[offset : offset + size].view(dtype).view(shape)
            for (name, shape, dtype), offset, size in zip(specs, offsets, sizes)
        }

    def release(self, key):
        """Forget a parameter's paged block (its memory is freed when the state tensors die)."""
        block = self.blocks.pop(key, None)
        if block is not None and key in self.resident.get(block.location, {}):
            del self.resident[block.location][key]
            self.resident_bytes[block.location] -= block.nbytes

    def is_paged(self, key) -> bool:
        return key in self.blocks

    # -- update order -------------------------------------------------------------------------------------------

    def _learn_order(self, sequence):
        """Make `sequence` (this step's paged keys, in update order) the cyclic order. A paged key the step skips
        stays right after the key it followed before (or first, when it was first)."""
        if len(sequence) == len(self.order) and all(map(operator.is_, sequence, self.order)):
            return  # the usual case: the same order as the last step
        in_step = dict.fromkeys(sequence)
        skipped_after: dict = {}  # key of this step (None: the start) -> skipped keys that followed it
        anchor = None
        for key in self.order:
            if key in in_step:
                anchor = key
            elif key in self.blocks:
                skipped_after.setdefault(anchor, []).append(key)
        order = list(skipped_after.get(None, ()))
        for key in sequence:
            order.append(key)
            order.extend(skipped_after.get(key, ()))
        self.order = order
        self._rank = {key: rank for rank, key in enumerate(order)}

    # -- prefetch and eviction ----------------------------------------------------------------------------------

    def _side_stream(self, location, to_host: bool):
        """The side stream of GPU `location` for transfers in one direction (None on a CPU build)."""
        if not _ext.load().is_cuda_build():
            return None
        if (location, to_host) not in self._side_streams:
            self._side_streams[location, to_host] = torch.cuda.Stream(device=location)
        return self._side_streams[location, to_host]

    def _move(self, keys, target, location):
        """Prefetch the blocks of `keys` to `target` (a device index or HOST_LOCATION) on the side stream of
        `location` for that direction; returns the event after the last one (None on a CPU build, where prefetch is
        synchronous). An eviction waits for each block's last update and last transfer; a prefetch to the GPU waits
        for the last eviction from it (queued before, on the other side stream)."""
        ext = _ext.load()
        to_host = target == ext.HOST_LOCATION
        stream = self._side_stream(location, to_host)
        if stream is None:
            for key in keys:
                ext.prefetch(self.blocks[key].buffer, target, 0)
            return None
        with torch.cuda.stream(stream):
            if not to_host and location in self._last_eviction:
                stream.wait_event(self._last_eviction[location])
            for key in keys:
                block = self.blocks[key]
                for event in (block.last_use, block.last_move) if to_host else ():
                    if event is not None:
                        stream.wait_event(event)
                ext.prefetch(block.buffer, target, stream.cuda_stream)
            done = stream.record_event()
        for key in keys:
            self.blocks[key].last_move = done
        if to_host:
            self._last_eviction[location] = done
        return done

    def _bring_in(self, keys):
        """Start prefetching the non-resident blocks of the paged `keys` to their GPU; returns {location: event}."""
        by_location: dict[int, list] = {}
        for key in keys:
            location = self.blocks[key].location
            if key not in self.resident.setdefault(location, {}):
                by_location.setdefault(location, []).append(key)
        events = {}
        for location, missing in by_location.items():
            events[location] = self._move(missing, location, location)
            nbytes = sum(self.blocks[k].nbytes for k in missing)
            self.resident[location].update(dict.fromkeys(missing))
            self.resident_bytes[location] = self.resident_bytes.get(location, 0) + nbytes
            self.counters["prefetches"] += len(missing)
            self.counters["prefetched_bytes"] += nbytes
        return events

    def _evict(self, now, protect):
        """On every GPU, evict resident blocks furthest next use first (walking the order backwards from rank `now`,
        the block updated last) until the resident state other than the keys in `protect` fits the budget."""
        if self.gpu_budget_bytes is None or not self.order:
            return
        period = len(self.order)
        for location, resident in self.resident.items():
            over = self.resident_bytes.get(location, 0) - self.gpu_budget_bytes
            over -= sum(self.blocks[k].nbytes for k in protect if k in resident)
            victims = []
            for back in range(period):
                if over <= 0:
                    break
                key = self.order[(now - back) % period]
                if key in resident and key not in protect:
                    victims.append(key)
                    over -= self.blocks[key].nbytes
            if not victims:
                continue
            nbytes = sum(self.blocks[k].nbytes for k in victims)
            for key in victims:
                del resident[key]
            self.resident_bytes[location] -= nbytes
            self.counters["evictions"] += len(victims)
            self.counters["evicted_bytes"] += nbytes
            self._move(victims, _ext.load().HOST_LOCATION, location)

    def run(self, chunks, update):
        """Apply `update(chunk)` to every chunk in order: each chunk's state is prefetched while the previous one
        updates, and after each update the state beyond the budget is evicted, furthest next use first.

        A chunk is a list of work items whose ``.key`` identifies the parameter; ``.device`` its device.
        """
        keys = [[w.key for w in chunk if w.key in self.blocks] for chunk in chunks]
        sequence = list(chain.from_iterable(keys))
        self._learn_order(sequence)
        now = self._rank[sequence[0]] - 1 if sequence else -1  # just before the step's first block
        ahead = keys[0] if keys else []
        self._evict(now, set(ahead))  # only evicts after a lowered budget or a step that stopped midway
        ready = self._bring_in(ahead)
        for i, chunk in enumerate(chunks):
            device = chunk[0].device
            for event in ready.values():
                if event is not None:
                    torch.cuda.current_stream(device).wait_event(event)
            ahead = keys[i + 1] if i + 1 < len(chunks) else []
            upcoming = self._bring_in(ahead)
            update(chunk)
            if keys[i]:
                done = torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None
                for key in keys[i]:
                    self.blocks[key].last_use = done
                now = self._rank[keys[i][-1]]
            self._evict(now, set(ahead))
            ready = upcoming

    # -- observation --------------------------------------------------------------------------------------------

    def residency(self, key) -> str:
        """Where a parameter's state is according to the extension: "device", "host", "unknown" or "not paged"."""
        block = self.blocks.get(key)
        if block is None:
            return "not paged"
        ext = _ext.load()
        location = ext.last_prefetch_location(block.buffer)
        if location == ext.HOST_LOCATION:
            return "host"
        return "device" if location >= 0 else "unknown"

    def stats(self) -> dict:
        """Budget, paged bytes, resident bytes per location ({} when none) and the prefetch / eviction counters
        (blocks and bytes moved to the GPU and back to the host since the manager was made)."""
        return {
            "gpu_budget_bytes": self.gpu_budget_bytes,
            "paged_bytes": sum(b.nbytes for b in self.blocks.values()),
            "resident_bytes": {loc: n for loc, n in self.resident_bytes.items() if n},
            **self.counters,
        }


# ----------------------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------------------


class _Work:
    """One parameter's update: what PageManager.run pages (key, device) and what the update reads."""

    __slots__ = ("key", "device", "param", "grad", "state", "kind", "scalars", "fused")

    def __init__(self, param, grad, state, kind, scalars):
        self.key = param
        self.device = param.device
        self.param, self.grad, self.state, self.kind, self.scalars = param, grad, state, kind, scalars
        self.fused = False  # set by _chunks: whether the chunk takes the Triton kernel


class _AdamWBase(torch.optim.Optimizer):
    """Shared machinery of the three optimizers: argument checks, state layout, chunked fused updates, paging."""

    _EIGHT_BIT = False
    _PAGED = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        min_8bit_size: int = 4096,
        gpu_budget_bytes: int | None = None,
        chunk_bytes: int = 64 << 20,
        page_min_bytes: int = 1 << 16,
        backend: str = "auto",
    ):
        name = type(self).__name__
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"{name}: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        if chunk_bytes <= 0:
            raise ValueError(f"{name}: chunk_bytes must be > 0, got {chunk_bytes}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)  # checks every group through add_param_group
        self.min_8bit_size = min_8bit_size
        self.chunk_bytes = chunk_bytes
        self.backend = backend
        self.pager = PageManager(gpu_budget_bytes, page_min_bytes) if self._PAGED else None
        self._qmaps: dict = {}
        self._luts: dict = {}

    # -- parameter groups ---------------------------------------------------------------------------------------

    def _check_group(self, group: dict):
        """Raise ValueError naming the problem when a group's hyperparameters or parameters are not supported."""
        name = type(self).__name__
        lr, betas = group["lr"], group["betas"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"{name}: lr must be a number >= 0, got {lr}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"{name}: eps must be >= 0, got {group['eps']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']}")
        for flag in ("amsgrad", "maximize"):
            if group.get(flag, False):
                raise ValueError(f"{name}: {flag}=True is not supported; use torch.optim.AdamW for it")
        if group.get("decoupled_weight_decay", True) is False and group["weight_decay"] != 0:
            raise ValueError(
                f"{name}: decoupled_weight_decay=False (torch.optim.Adam's L2 penalty) is not supported; "
                "this optimizer applies AdamW's decoupled weight decay"
            )
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"{name}: parameters must be real floating point, got {p.dtype}")

    def add_param_group(self, param_group: dict):
        """torch.optim.Optimizer.add_param_group, and the group's hyperparameters and parameters are checked."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["betas"] = tuple(group["betas"])
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    # -- state layout -------------------------------------------------------------------------------------------

    def _qmap_pair(self, device):
        if device not in self._qmaps:
            self._qmaps[device] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
        return self._qmaps[device]

    def _luts_of(self, state):
        """Quantization tables of a state's two maps, built once per map tensor.

        Keyed by id(map) and holding the map, so the key cannot be reused by another tensor; keyed by address, a
        map loaded from a state dict could land where a freed map was and get the freed map's table.
        """
        out = []
        for code in (state["qmap1"], state["qmap2"]):
            if id(code) not in self._luts:
                self._luts[id(code)] = (code, quantization_lut(code))
            out.append(self._luts[id(code)][1])
        return tuple(out)

    def _uses_8bit(self, p) -> bool:
        return self._EIGHT_BIT and p.numel() >= self.min_8bit_size

    def _state_specs(self, p, eight_bit: bool):
        if not self._EIGHT_BIT:
            return [("exp_avg", p.shape, torch.float32), ("exp_avg_sq", p.shape, torch.float32)]
        if not eight_bit:
            return [("state1", p.shape, torch.float32), ("state2", p.shape, torch.float32)]
        blocks = -(-p.numel() // QBLOCK)
        return [
            ("state1", p.shape, torch.uint8),
            ("state2", p.shape, torch.uint8),
            ("absmax1", (blocks,), torch.float32),
            ("absmax2", (blocks,), torch.float32),
        ]

    def _new_state(self, p, eight_bit: bool) -> dict:
        specs = self._state_specs(p, eight_bit)
        if self.pager is not None:
            tensors = self.pager.allocate(p, specs, p.device)
        else:
            tensors = {name: torch.zeros(shape, dtype=dtype, device=p.device) for name, shape, dtype in specs}
        state = {"step": 0, **tensors}
        if eight_bit:
            state["qmap1"], state["qmap2"] = self._qmap_pair(p.device)
        return state

    def _kind(self, state) -> str:
        if not self._EIGHT_BIT:
            return "torch32"
        return "bnb8" if state["state1"].dtype == torch.uint8 else "bnb32"

    # -- step ---------------------------------------------------------------------------------------------------

    def _use_triton(self, device) -> bool:
        backend = self.backend
        if backend == "auto":
            backend = os.environ.get("FUSED_LORA_BACKEND", "auto")
        if backend == "reference":
            return False
        if backend == "triton":
            return True
        return device.type == "cuda"

    def _collect_work(self) -> list:
        """The step's work items. Every gradient is checked before any state changes, so a rejected step leaves
        every parameter's step count and moments as they were."""
        name = type(self).__name__
        with_grad = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                params.append(p)
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{name} does not support sparse gradients (group {gi}, parameter {pi}); "
                        "use torch.optim.SparseAdam"
                    )
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"{name}: gradient shape {tuple(p.grad.shape)} != parameter {tuple(p.shape)}")
            if params:
                with_grad.append((group, params))
        work = []
        for group, params in with_grad:
            lr = float(group["lr"])
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p, self._uses_8bit(p)))
                state["step"] += 1
                kind = self._kind(state)
                work.append(_Work(p, p.grad, state, kind, _scalars(kind, lr, group, state["step"])))
        return work

    def _chunks(self, work) -> list:
        """Split work into chunks that one kernel launch can update: same device, dtypes, kind and maps."""
        by_key: dict = {}
        for w in work:
            w.fused = self._use_triton(w.device) and w.param.is_contiguous() and w.grad.is_contiguous()
            maps = (w.state["qmap1"].data_ptr(), w.state["qmap2"].data_ptr()) if w.kind == "bnb8" else None
            by_key.setdefault((w.device, w.param.dtype, w.grad.dtype, w.kind, maps, w.fused), []).append(w)
        chunks = []
        for items in by_key.values():
            current, size = [], 0
            for w in items:
                nbytes = sum(t.numel() * t.element_size() for t in w.state.values() if isinstance(t, torch.Tensor))
                if current and size + nbytes > self.chunk_bytes:
                    chunks.append(current)
                    current, size = [], 0
                current.append(w)
                size += nbytes
            chunks.append(current)
        return chunks

    def _update_chunk(self, chunk: list):
        kind = chunk[0].kind
        if not chunk[0].fused:
            for w in chunk:
                if kind == "torch32":
                    torch_adamw32_(w.param, w.grad, w.state["exp_avg"], w.state["exp_avg_sq"], w.scalars)
                elif kind == "bnb32":
                    bnb_adamw32_(w.param, w.grad, w.state["state1"], w.state["state2"], w.scalars)
                else:
                    bnb_adamw8bit_(w.param, w.grad, w.state, w.scalars, self._luts_of(w.state))
            return
        from .kernels import adamw as kernels

        params, grads, scalars = [w.param for w in chunk], [w.grad for w in chunk], [w.scalars for w in chunk]
        if kind == "bnb8":
            s = [w.state for w in chunk]
            kernels.adamw8bit_update_(
                params,
                grads,
                [x["state1"] for x in s],
                [x["state2"] for x in s],
                [x["absmax1"] for x in s],
                [x["absmax2"] for x in s],
                s[0]["qmap1"],
                s[0]["qmap2"],
                *self._luts_of(s[0]),
                scalars,
            )
        else:
            m_name, v_name = ("exp_avg", "exp_avg_sq") if kind == "torch32" else ("state1", "state2")
            mode = kernels.MODE_TORCH if kind == "torch32" else kernels.MODE_BNB
            kernels.adamw32_update_(
                params, grads, [w.state[m_name] for w in chunk], [w.state[v_name] for w in chunk], scalars, mode
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns closure's loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunks = self._chunks(self._collect_work())
        if self.pager is None:
            for chunk in chunks:
                self._update_chunk(chunk)
        else:
            self.pager.run(chunks, self._update_chunk)
        return loss

    # -- observation --------------------------------------------------------------------------------------------

    def _all_params(self):
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def state_residency(self) -> dict[int, str]:
        """{parameter index (over all groups): "device" | "host" | "unknown" | "not paged"} for initialised state."""
        out = {}
        for index, p in enumerate(self._all_params()):
            if p in self.state and self.state[p]:
                out[index] = self.pager.residency(p) if self.pager is not None else "not paged"
        return out

    def paging_stats(self) -> dict:
        """The page manager's counters (see PageManager.stats); empty for non-paged optimizers."""
        return self.pager.stats() if self.pager is not None else {}

    # -- state dict ---------------------------------------------------------------------------------------------

    def state_dict(self):
        """torch.optim.Optimizer.state_dict; paged state is returned as CPU copies (saving never pages it in).

        PagedAdamW writes torch.optim.AdamW's keys (step as a float tensor, exp_avg, exp_avg_sq); the 8-bit
        optimizers write bitsandbytes' keys (step, state1, state2, absmax1, absmax2, qmap1, qmap2).
        """
        sd = super().state_dict()
        for index, p in enumerate(self._all_params()):
            if index not in sd["state"]:
                continue
            paged = self.pager is not None and self.pager.is_paged(p)
            entry = {}
            for name, value in sd["state"][index].items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().to("cpu", copy=True) if paged else value
                entry[name] = value
            if not self._EIGHT_BIT:
                entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
            sd["state"][index] = entry
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict of this class, of its paged / non-paged sibling, or of the matching reference
        optimizer (torch.optim.AdamW for PagedAdamW; bitsandbytes' AdamW8bit / PagedAdamW8bit for the 8-bit ones).
        """
        name = type(self).__name__
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError(f"{name}.load_state_dict: parameter groups do not match the optimizer's")
        for group, saved in zip(groups, saved_groups):
            self._check_group({**group, **{k: v for k, v in saved.items() if k != "params"}})
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), self._all_params()))
        entries = [
            (id_map[saved_id], self._flat_saved_state(saved_id, id_map[saved_id], saved))
            for saved_id, saved in state_dict["state"].items()
            if saved_id in id_map
        ]
        for p in self._all_params():
            if self.pager is not None:
                self.pager.release(p)
        self.state.clear()
        for p, saved in entries:
            self.state[p] = self._import_state(p, saved)
        for group, saved in zip(groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value

    def _flat_saved_state(self, saved_id, p, saved: dict) -> dict:
        """One parameter's saved state with bitsandbytes' wrapped quantization state unwrapped, checked before
        anything is loaded: the keys this optimizer needs are there and the moments have p's number of elements."""
        name = type(self).__name__
        saved = dict(saved)
        saved.update(saved.pop("__bnb_optimizer_quant_state__", {}))
        if self._EIGHT_BIT:
            moments, expected = ("state1", "state2"), "bitsandbytes' AdamW8bit or an 8-bit fused_lora optimizer"
            if isinstance(saved.get("state1"), torch.Tensor) and saved["state1"].dtype == torch.uint8:
                moments += ("absmax1", "absmax2")
        else:
            moments, expected = ("exp_avg", "exp_avg_sq"), "torch.optim.AdamW or PagedAdamW"
        missing = [key for key in ("step", *moments) if key not in saved]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: the state of parameter {saved_id} has no {', '.join(missing)}; "
                f"expected a state dict of {expected}"
            )
        for key in moments[:2]:
            if saved[key].numel() != p.numel():
                raise ValueError(
                    f"{name}.load_state_dict: {key} of parameter {saved_id} has {saved[key].numel()} elements, "
                    f"the parameter has {p.numel()}"
                )
        return saved

    def _import_state(self, p, saved: dict) -> dict:
        """New state for p filled from a checked, flat saved state (see _flat_saved_state)."""
        eight_bit = self._EIGHT_BIT and saved["state1"].dtype == torch.uint8
        state = self._new_state(p, eight_bit)
        for key, value in saved.items():
            if key == "step":
                state["step"] = int(value.item() if isinstance(value, torch.Tensor) else value)
            elif key in ("qmap1", "qmap2"):
                own = state[key]
                value = value.to(device=p.device, dtype=torch.float32)
                state[key] = own if torch.equal(own, value) else value
            elif key in state:
                state[key].copy_(value.reshape(state[key].shape))
        return state


class PagedAdamW(_AdamWBase):
    """AdamW (torch.optim.AdamW's update) with fp32 state paged between GPU and host memory.

    fp16 / bf16 parameters keep fp32 moments (torch.optim.AdamW keeps them in the parameter's dtype); the update
    runs in fp32 and is rounded once to the parameter's dtype, as bitsandbytes does. For fp32 parameters the
    result is torch.optim.AdamW's, bit for bit on the CPU.

    Args:
        params: parameters or parameter groups (fp32, fp16 or bf16; CUDA or CPU; several devices allowed).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, default 1e-2); checked for
            every parameter group, including groups added later with add_param_group.
        amsgrad, maximize: accepted for torch.optim.AdamW's signature; True raises ValueError (not supported), and
            so does loading a state dict whose groups set them.
        gpu_budget_bytes: state bytes kept on each GPU after a step (None: all of it).
        chunk_bytes: state bytes per fused update launch and per prefetch unit.
        page_min_bytes: parameters with less state than this keep ordinary (unpaged) state.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "reference"; FUSED_LORA_BACKEND overrides
            "auto".

    Example::

        opt = PagedAdamW(model.parameters(), lr=1e-4, gpu_budget_bytes=512 << 20)
    """


class PagedAdamW8bit(_AdamWBase):
    """bitsandbytes-compatible AdamW8bit with blockwise 8-bit state paged between GPU and host memory.

    Args: as :class:`PagedAdamW`, plus min_8bit_size (default 4096): smaller tensors keep fp32 state.

    Example::

        opt = PagedAdamW8bit(model.parameters(), lr=2e-4, gpu_budget_bytes=256 << 20)
    """

    _EIGHT_BIT = True


class AdamW8bit(_AdamWBase):
    """bitsandbytes-compatible AdamW8bit (blockwise 8-bit state, 2 bytes per parameter + absmax), not paged.

    Example::

        opt = AdamW8bit(model.parameters(), lr=2e-4, weight_decay=0.0)
    """

    _EIGHT_BIT = True
    _PAGED = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, min_8bit_size=4096, backend="auto"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         min_8bit_size=min_8bit_size, backend=backend)
