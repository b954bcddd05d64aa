"""Managed-memory optimizer state with a per-GPU byte budget: :class:`PageManager`.

Each parameter's state is one managed allocation (``fused_lora._C``). The manager keeps at most ``gpu_budget_bytes``
of it resident per GPU after a step, prefetches the next chunk's state on a side stream while the current chunk
updates, and evicts the state whose next use is furthest away (Belady's rule; see the class docstring). On a CPU
build of the extension the same code runs over host memory with a simulated page table, so budgets, residency and
eviction are observable in tests.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from itertools import chain

import torch

from .. import _ext
from .._common import warn_once

__all__ = ["PageManager"]

_ALIGN = 256  # byte alignment of each state tensor inside a parameter's allocation


@dataclasses.dataclass(eq=False)
class _PagedBlock:
    """One parameter's state: a single managed allocation and the bookkeeping of where it is."""

    buffer: torch.Tensor  # uint8 managed tensor; the state tensors are views of it
    location: int  # device index the state is paged to
    last_use: object = None  # CUDA event after the last update that read and wrote it
    last_move: object = None  # CUDA event after its last prefetch (to the GPU or to the host)
    nbytes: int = dataclasses.field(init=False)  # the buffer's size

    def __post_init__(self):
        self.nbytes = self.buffer.numel()


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
    the resident state is within the budget, and within the GPU's free memory less those two chunks.

    Args:
        gpu_budget_bytes: bytes of state kept resident per GPU after a step; None keeps everything resident. Either
            way capped at what the GPU holds (``_budget``): managed state is never oversubscribed.
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
                warn_once(
                    "fused_lora.optim: fused_lora._C was built without CUDA, so optimizer state of CUDA parameters "
                    "stays in ordinary device memory (no paging, gpu_budget_bytes has no effect); rebuild it with a "
                    "CUDA toolkit and a CUDA build of torch (pip install --no-build-isolation -e .)",
                    UserWarning,
                )
                return None
            if not ext.concurrent_managed_access(index):
                warn_once(
                    f"fused_lora.optim: cuda:{index} has no concurrent managed access; optimizer state stays in "
                    "ordinary device memory (no paging)",
                    UserWarning,
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

    def detach(self, keys) -> dict:
        """Take the blocks of ``keys`` out of the bookkeeping (their memory lives while their state tensors do), for
        ``attach`` to put back: a state replaced only once its successor is complete (load_state_dict)."""
        taken = {}
        for key in keys:
            block = self.blocks.get(key)
            if block is not None:
                taken[key] = (block, key in self.resident.get(block.location, {}))
                self.release(key)
        return taken

    def attach(self, taken: dict) -> None:
        """Put back blocks ``detach`` took, in place of any block allocated for their keys since."""
        for key, (block, resident) in taken.items():
            self.release(key)
            self.blocks[key] = block
            if resident:
                self.resident.setdefault(block.location, {})[key] = None
                self.resident_bytes[block.location] = self.resident_bytes.get(block.location, 0) + block.nbytes

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

    def _bytes_by_location(self, keys) -> dict[int, int]:
        """{location: bytes of the paged blocks of `keys` there}."""
        totals: dict[int, int] = {}
        for key in keys:
            block = self.blocks[key]
            totals[block.location] = totals.get(block.location, 0) + block.nbytes
        return totals

    def _budget(self, location, in_flight: int, paged: int) -> int | None:
        """Bytes of state that may stay resident on GPU `location` after an update: gpu_budget_bytes, capped at what
        the GPU holds now (its free memory plus the state resident there, less `in_flight`: room for the two chunks
        being updated and prefetched), so that managed memory is never oversubscribed whatever the budget says
        (None: everything that fits; `paged`: the bytes of all state paged to `location`). One warning when the cap,
        not the budget, decides."""
        free, _ = _ext.load().memory_info(location)
        fits = max(0, free + self.resident_bytes.get(location, 0) - in_flight)
        if self.gpu_budget_bytes is not None and self.gpu_budget_bytes <= fits:
            return self.gpu_budget_bytes
        if paged > fits:
            asked = "no budget" if self.gpu_budget_bytes is None else f"a budget of {self.gpu_budget_bytes} bytes"
            warn_once(
                f"fused_lora.optim: the paged optimizer state does not fit in the free memory of device {location} "
                f"({free} bytes free): keeping at most {fits} bytes resident there, not {asked} (managed memory "
                "beyond the free memory would be oversubscribed)",
                UserWarning,
                key=("paged state over the free memory", location),
            )
            return fits
        return self.gpu_budget_bytes

    def _evict(self, now, protect, in_flight: dict, paged: dict):
        """On every GPU, evict resident blocks furthest next use first (walking the order backwards from rank `now`,
        the block updated last) until the resident state other than the keys in `protect` fits the budget
        (``_budget``, with `in_flight` {location: bytes} held back for the chunks in flight; `paged` {location:
        bytes} of all state paged there)."""
        if not self.order:
            return
        period = len(self.order)
        for location, resident in self.resident.items():
            budget = self._budget(location, in_flight.get(location, 0), paged.get(location, 0))
            if budget is None:
                continue
            over = self.resident_bytes.get(location, 0) - budget
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
        paged = self._bytes_by_location(self.blocks)  # all paged state, per location
        in_flight: dict[int, int] = {}  # location -> twice its largest chunk of paged state (updated + prefetched)
        for chunk_keys in keys:
            for location, nbytes in self._bytes_by_location(chunk_keys).items():
                in_flight[location] = max(in_flight.get(location, 0), 2 * nbytes)
        now = self._rank[sequence[0]] - 1 if sequence else -1  # just before the step's first block
        ahead = keys[0] if keys else []
        self._evict(now, set(ahead), in_flight, paged)  # only evicts after a lowered budget or a step stopped midway
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
            self._evict(now, set(ahead), in_flight, paged)
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
