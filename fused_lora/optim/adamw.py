"""The optimizers: :class:`PagedAdamW`, :class:`PagedAdamW8bit`, :class:`AdamW8bit` and their shared base (argument
checks, state layout, chunked fused updates, paging through :class:`~fused_lora.optim.pager.PageManager`, state
dicts). The update arithmetic is in update.py (PyTorch) and fused_lora/kernels/adamw.py (Triton); which one runs
follows fused_lora.backend's rules, as for lora_linear.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import defaultdict
from itertools import chain

import torch

from .. import _common, codec
from ..backend import resolve_backend, validate_backend_name
from . import update
from .checkpoint import check_layout, check_state_dict
from .pager import PageManager
from .update import AdamWScalars, UpdateKind, adamw_scalars

__all__ = ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"]


@dataclasses.dataclass(eq=False)
class _Work:
    """One parameter's update: what PageManager.run pages (key, device) and what the update reads."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    kind: UpdateKind
    scalars: AdamWScalars
    fused: bool  # whether the update takes the Triton kernel (backend resolved for its device, contiguous tensors)

    @property
    def key(self):
        return self.param

    @property
    def device(self) -> torch.device:
        return self.param.device


def _is_real(value) -> bool:
    """A real Python or NumPy number (bools and strings are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
        try:
            backend = validate_backend_name(backend)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if params is None or isinstance(params, torch.Tensor):
            raise TypeError(
                f"{name}: params must be an iterable of parameters or parameter groups (e.g. model.parameters()), "
                f"got {type(params).__name__}"
            )
        for option, value, least in (("chunk_bytes", chunk_bytes, 1), ("min_8bit_size", min_8bit_size, 0),
                                     ("page_min_bytes", page_min_bytes, 0), ("gpu_budget_bytes", gpu_budget_bytes, 0)):
            if option == "gpu_budget_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name}: {option} must be an integer >= {least}, got {value!r}")
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
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = float(lr)
        for option, value in (("lr", lr), ("eps", group["eps"]), ("weight_decay", group["weight_decay"])):
            if not (_is_real(value) and math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name}: {option} must be a finite number >= 0, got {value!r}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0
                                                                              for b in betas):  # fmt: skip
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas!r}")
        for flag in ("amsgrad", "maximize"):
            if group.get(flag, False):
                raise ValueError(f"{name}: {flag}=True is not supported; use torch.optim.AdamW for it")
        if group.get("decoupled_weight_decay", True) is False and group["weight_decay"] != 0:
            raise ValueError(
                f"{name}: decoupled_weight_decay=False (torch.optim.Adam's L2 penalty) is not supported; "
                "this optimizer applies AdamW's decoupled weight decay"
            )
        for p in group["params"]:
            # Frozen tensors (a QLoRA model's packed uint8 NF4 weights, frozen bf16 bases) are accepted and never
            # updated, as bitsandbytes' optimizers do, so model.parameters() of a QLoRA model works as written.
            if p.requires_grad and (not p.is_floating_point() or p.is_complex()):
                raise ValueError(f"{name}: parameters must be real floating point, got {p.dtype}")
            if p.requires_grad and p.dtype == torch.float64:  # the update and its state are fp32
                raise ValueError(f"{name}: parameters must be fp32, fp16 or bf16 (the update runs in fp32 and would "
                                 "round a float64 parameter at every step), got torch.float64; use torch.optim.AdamW")

    def add_param_group(self, param_group: dict):
        """torch.optim.Optimizer.add_param_group, and the group's hyperparameters and parameters are checked."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            group["betas"] = tuple(group["betas"])
        except Exception:
            self.param_groups.pop()
            raise

    # -- state layout -------------------------------------------------------------------------------------------

    def _qmap_pair(self, device):
        if device not in self._qmaps:
            self._qmaps[device] = (codec.dynamic_map(True, device), codec.dynamic_map(False, device))
        return self._qmaps[device]

    def _luts_of(self, state):
        """Quantization tables of a state's two maps, built once per map tensor.

        Keyed by id(map) and holding the map, so the key cannot be reused by another tensor; keyed by address, a
        map loaded from a state dict could land where a freed map was and get the freed map's table.
        """
        out = []
        for code in (state["qmap1"], state["qmap2"]):
            if id(code) not in self._luts:
                self._luts[id(code)] = (code, codec.quantization_lut(code))
            out.append(self._luts[id(code)][1])
        return tuple(out)

    def _uses_8bit(self, p) -> bool:
        return self._EIGHT_BIT and p.numel() >= self.min_8bit_size

    def _state_specs(self, p, eight_bit: bool):
        if not self._EIGHT_BIT:
            return [("exp_avg", p.shape, torch.float32), ("exp_avg_sq", p.shape, torch.float32)]
        if not eight_bit:
            return [("state1", p.shape, torch.float32), ("state2", p.shape, torch.float32)]
        blocks = -(-p.numel() // codec.BLOCKSIZE)
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

    def _kind(self, state) -> UpdateKind:
        if not self._EIGHT_BIT:
            return UpdateKind.TORCH32
        return UpdateKind.BNB8 if state["state1"].dtype == torch.uint8 else UpdateKind.BNB32

    # -- step ---------------------------------------------------------------------------------------------------

    def _takes_kernels(self, device: torch.device) -> bool:
        """Whether updates on ``device`` run the Triton kernels: fused_lora.backend.resolve_backend's answer for
        self.backend (FUSED_LORA_BACKEND replaces "auto"), with its errors and its fallback warning."""
        return resolve_backend(self.backend, device, caller=type(self).__name__) == "triton"

    def _collect_work(self) -> list:
        """The step's work items. Every gradient and the backend of every device are checked before any state
        changes, so a rejected step leaves every parameter's step count and moments as they were."""
        name = type(self).__name__
        with_grad = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None or not p.is_floating_point():
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
        devices = {p.device for _, params in with_grad for p in params}
        kernels_on = {device: self._takes_kernels(device) for device in devices}
        for _, params in with_grad:  # every new state first: a refused allocation leaves every step count as it was
            for p in params:
                if not self.state[p]:  # (a reset state's old block went in _release_dropped_state)
                    self.state[p].update(self._new_state(p, self._uses_8bit(p)))
        work = []
        for group, params in with_grad:
            lr = float(group["lr"])
            for p in params:
                state = self.state[p]
                state["step"] += 1
                kind = self._kind(state)
                fused = kernels_on[p.device] and p.is_contiguous() and p.grad.is_contiguous()
                work.append(_Work(p, p.grad, state, kind, adamw_scalars(kind, lr, group, state["step"]), fused))
        return work

    def _chunks(self, work) -> list:
        """Split work into chunks that one kernel launch can update: same device, dtypes, kind and maps."""
        by_key: dict = {}
        for w in work:
            maps = (w.state["qmap1"].data_ptr(), w.state["qmap2"].data_ptr()) if w.kind is UpdateKind.BNB8 else None
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
                luts = self._luts_of(w.state) if kind is UpdateKind.BNB8 else (None, None)
                update.reference_update_(kind, w.param, w.grad, w.state, w.scalars, luts)
            return
        from ..kernels import adamw as kernels

        params, grads, scalars = [w.param for w in chunk], [w.grad for w in chunk], [w.scalars for w in chunk]
        if kind is UpdateKind.BNB8:
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
            m_name, v_name = kind.moments
            m, v = [w.state[m_name] for w in chunk], [w.state[v_name] for w in chunk]
            kernels.adamw32_update_(params, grads, m, v, scalars, bnb_order=kind.bnb_order)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns closure's loss when given."""
        loss = None
        if closure is not None and not callable(closure):
            raise TypeError(f"{type(self).__name__}.step: closure must be callable (returning the loss), got "
                            f"{type(closure).__name__}")  # fmt: skip
        if _common.cuda_graph_capturing():  # the step count, lr and bias corrections are host values copied per step
            raise RuntimeError(f"{type(self).__name__}.step inside a CUDA graph capture: every replay would repeat "
                               "the captured step's learning rate, bias corrections and step count; step the "
                               "optimizer outside the graph")  # fmt: skip
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pager is not None:
            self._release_dropped_state()
        chunks = self._chunks(self._collect_work())
        if self.pager is None:
            for chunk in chunks:
                self._update_chunk(chunk)
        else:
            self.pager.run(chunks, self._update_chunk)
        return loss

    def _release_dropped_state(self) -> None:
        """Give the pager's blocks back for state the user dropped (del opt.state[p], state.clear(), a param group
        popped) or reset (opt.state[p].clear(): its new block is paged in anew): the pager held them, counted as
        resident, and kept their parameters alive."""
        live = {id(p) for p in self._all_params() if self.state.get(p)}
        for key in [key for key in self.pager.blocks if id(key) not in live]:
            self.pager.release(key)

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
            if not sd["state"].get(index):  # none, or {} (state read before a first step): saved as torch saves it
                continue
            entry = self._host_copies(p, sd["state"][index])
            if not self._EIGHT_BIT:
                entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
            sd["state"][index] = entry
        return sd

    def _host_copies(self, p, state: dict) -> dict:
        """``state`` with its tensors as CPU copies when p's state is paged (managed memory), else as it is."""
        if self.pager is None or not self.pager.is_paged(p):
            return dict(state)
        return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def load_state_dict(self, state_dict):
        """Load a state dict of this class, of its paged / non-paged sibling, or of the matching reference
        optimizer (torch.optim.AdamW for PagedAdamW; bitsandbytes' AdamW8bit / PagedAdamW8bit for the 8-bit ones).

        All or nothing: the whole checkpoint is checked first (groups and their hyperparameters, and for every
        parameter its step, moments, absmax and quantization maps; see fused_lora/optim/checkpoint.py), and a
        problem raises ValueError / TypeError naming the parameter and the field with every state left as it was.
        The new state is then made whole before the old one is released (as torch.optim.Optimizer's: both are held
        for a moment), so a refused allocation also leaves every state as it was. An empty saved state ({}) is no
        state, as torch loads it.
        """
        name = type(self).__name__
        who = f"{name}.load_state_dict"
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # torch.optim.Optimizer's hooks
            replaced = pre_hook(self, state_dict)
            state_dict = state_dict if replaced is None else replaced
        check_layout(who, state_dict)
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError(f"{who}: parameter groups do not match the optimizer's")
        for group, saved in zip(groups, saved_groups):
            self._check_group({**group, **{k: v for k, v in saved.items() if k != "params"}})
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), self._all_params()))
        entries = check_state_dict(who, state_dict, id_map, self._EIGHT_BIT)
        # the new state is made whole before the old one goes (as torch.optim.Optimizer.load_state_dict: both are
        # held for a moment), so a refused allocation leaves the old state as it was
        taken = self.pager.detach(self._all_params()) if self.pager is not None else {}
        try:
            states = [(p, self._import_state(p, saved)) for p, saved in entries]
        except BaseException:
            if self.pager is not None:
                for p in self._all_params():  # the new blocks made so far
                    self.pager.release(p)
                self.pager.attach(taken)
            raise
        self.state.clear()
        self.state.update(states)
        self._luts = {key: lut for key, lut in self._luts.items()
                      if any(lut[0] is st.get(name) for st in self.state.values() for name in ("qmap1", "qmap2"))}
        for group, saved in zip(groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self):
        """torch.optim.Optimizer's pickled state (defaults, state, param_groups) and this optimizer's settings, so that
        copy.deepcopy and pickling give a working optimizer (torch's keeps only the first three)."""
        state = super().__getstate__()
        pager = self.pager
        # paged state as host copies: copy.deepcopy clones a CUDA storage on the device, which would put the whole
        # paged state in device memory at once; __setstate__ pages it again
        state["state"] = {p: self._host_copies(p, st) for p, st in state["state"].items()}
        state["_settings"] = {"min_8bit_size": self.min_8bit_size, "chunk_bytes": self.chunk_bytes,
                              "backend": self.backend,
                              "gpu_budget_bytes": pager.gpu_budget_bytes if pager is not None else None,
                              "page_min_bytes": pager.page_min_bytes if pager is not None else 1 << 16}
        return state

    def __setstate__(self, state):
        settings = state.pop("_settings", None)
        super().__setstate__(state)
        if settings is None:
            raise TypeError(f"{type(self).__name__}: unpickled from a state without its settings; rebuild it and "
                            "use load_state_dict")
        self.min_8bit_size, self.chunk_bytes = settings["min_8bit_size"], settings["chunk_bytes"]
        self.backend = settings["backend"]
        self.pager = PageManager(settings["gpu_budget_bytes"], settings["page_min_bytes"]) if self._PAGED else None
        self._qmaps, self._luts = {}, {}
        # the copied state tensors are ordinary ones: imported again, paged state goes back to managed memory, into
        # a dict of its own (copy.copy hands over the original's very dict: filling it would swap the original's
        # state for blocks of this copy's pager)
        fresh = defaultdict(dict)
        for p, st in self.state.items():
            fresh[p] = self._import_state(p, st) if st else {}
        self.state = fresh

    def _import_state(self, p, saved: dict) -> dict:
        """New state for p filled from a checked, flat saved state (see checkpoint.check_param_state)."""
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
        params: parameters or parameter groups (fp32, fp16 or bf16; CUDA or CPU; several devices allowed), e.g.
            ``model.parameters()`` of a QLoRA model: tensors that do not require grad or are not floating point
            (the packed NF4 bytes) are skipped, as bitsandbytes' optimizers skip them.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, default 1e-2); checked for
            every parameter group, including groups added later with add_param_group.
        amsgrad, maximize: accepted for torch.optim.AdamW's signature; True raises ValueError (not supported), and
            so does loading a state dict whose groups set them.
        gpu_budget_bytes: state bytes kept on each GPU after a step (None: all of it), at most what the GPU's free
            memory holds (then one warning).
        chunk_bytes: state bytes per fused update launch and per prefetch unit.
        page_min_bytes: parameters with less state than this keep ordinary (unpaged) state.
        backend: "auto", "triton" or "reference", by fused_lora.backend's rules (as lora_linear): "auto" runs
            the Triton kernels for CUDA parameters (PyTorch, with one warning, when Triton is missing) and PyTorch
            on the CPU; FUSED_LORA_BACKEND replaces "auto"; "triton" on CPU parameters needs TRITON_INTERPRET=1.
            Checked at construction (unknown names) and per device at each step.

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
