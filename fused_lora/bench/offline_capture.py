"""What the launchers launch, found by running them: the kernel launches and device work of one pass of the LoRA
layer at a shape, on a target, without a GPU.

``capture_pass`` builds the layer's tensors on PyTorch's ``meta`` device (shapes and dtypes, no data) and runs the
pass through ``fused_lora.kernels.lora`` as the target GPU would see it (``fake_device``): meta tensors report the
device cuda:0, tensors the launchers create "on CUDA" are created on the meta device, device queries answer with
``TARGETS[arch]`` (compute capability, multiprocessor count, ...), CUDA streams and events are fakes whose waits are
recorded, and host copies of the weight's small tables (e.g. a check that the code table is NF4's) get their real
values. Every Triton launch (``kernel[grid](...)``) is recorded instead of run; an autotuned launch is resolved as the
autotuner resolves it (its ``prune_configs`` gives the configs it would time, each one candidate ``Launch``) and
``triton.heuristics`` values are filled in. Every PyTorch operation with device work (a memset, a cast, a sum) is
recorded with its bytes. The pass runs twice and the second run is kept, so work a launcher caches across calls
(e.g. decoded scales on the weight) is not charged to every pass.

So a new kernel, a new strategy per M or a new autotune config list is seen here without any change; only the cost
model needs one entry per new kernel (``fused_lora.bench.offline_kernels.KERNELS``).

Passes (``PASSES``): ``fwd`` = ``lora.forward``; ``fwd_bwd`` = ``lora.forward`` then ``lora.backward`` for dx,
dA and dB (no bias; dropout as the LayerSpec says), as the training step of a QLoRA layer runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable
from unittest import mock

import torch

from .. import backend
from ..nf4 import NF4Weight

__all__ = ["DeviceFacts", "TARGETS", "LayerSpec", "Launch", "TorchOp", "Step", "PASSES", "capture_pass",
           "weight_bytes", "torch_dtype_name"]


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the launchers may ask about the target GPU (``torch.cuda.get_device_properties`` fields)."""

    name: str
    major: int
    minor: int
    multi_processor_count: int
    L2_cache_size: int
    shared_memory_per_block_optin: int
    regs_per_multiprocessor: int = 65536
    max_threads_per_multi_processor: int = 2048
    warp_size: int = 32
    total_memory: int = 80 * 2**30


TARGETS = {
    90: DeviceFacts("NVIDIA H200 (offline)", 9, 0, 132, 60 * 2**20, 232448, total_memory=141 * 10**9),
    80: DeviceFacts("NVIDIA A100-SXM4-80GB (offline)", 8, 0, 108, 40 * 2**20, 166912),
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer shape and dtype variant: x (M, K) in ``x_dtype``, W (N, K) ``weight`` ("nf4dq": NF4 with double
    quantization, "nf4", "dense" in x's dtype; NF4 blocks of ``blocksize``), A (r, K) and B (N, r) in
    ``adapter_dtype``, dropout probability ``dropout_p`` on the low-rank input."""

    M: int
    K: int
    N: int
    r: int
    x_dtype: torch.dtype = torch.bfloat16
    adapter_dtype: torch.dtype = torch.float32
    weight: str = "nf4dq"
    dropout_p: float = 0.0
    blocksize: int = 64


@dataclasses.dataclass
class Launch:
    """One Triton launch (for an autotuned kernel: one candidate config of it)."""

    kernel: str  # the @triton.jit function's name
    module: str
    args: dict  # parameter name -> value at launch (meta tensors, ints, floats, constexprs, the config's too)
    options: dict  # num_warps, num_stages, enable_fp_fusion, ... as the launch passes them
    programs: int
    config: str = ""  # the autotune config ("" for a plain launch)
    tensor_bytes: int = 0  # bytes of the distinct tensors it is passed (each read or written once)
    weight_reads: int = 0  # 1 when it reads the layer's stored weight (its packed NF4 bytes or dense W)


@dataclasses.dataclass
class TorchOp:
    """A PyTorch operation with device work (memset, cast, copy), as bytes moved."""

    name: str
    bytes: int


@dataclasses.dataclass
class Step:
    """One step of the pass on CUDA stream ``stream`` (0: the current stream of the caller): a kernel launch with its
    candidate configs (one unless autotuned), a PyTorch op, or a synchronisation ``sync`` = ("record", stream,
    event), ("wait_event", stream, event), ("wait_stream", stream, other stream) or ("host", stream, None): the
    caller's other work runs here (between a forward and its backward), so no launch overlaps the one before it."""

    candidates: list = dataclasses.field(default_factory=list)  # list[Launch]
    torch_op: TorchOp | None = None
    sync: tuple | None = None
    stream: int = 0


def torch_dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
            torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.float64: "fp64"}[dtype]  # fmt: skip


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def make_weight(spec: LayerSpec):
    """The layer's W on the meta device: an NF4Weight (spec.blocksize) or a dense (N, K) tensor."""
    N, K = spec.N, spec.K
    if spec.weight == "dense":
        return _meta((N, K), spec.x_dtype)
    n, blocksize = N * K, spec.blocksize
    n_blocks = -(-n // blocksize)
    if spec.weight == "nf4dq":
        nested = dict(offset=_meta((), torch.float32), nested_absmax=_meta((-(-n_blocks // 256),), torch.float32),
                      nested_code=_meta((256,), torch.float32))  # fmt: skip
        absmax = _meta((n_blocks,), torch.uint8)
    elif spec.weight == "nf4":
        nested, absmax = {}, _meta((n_blocks,), torch.float32)
    else:
        raise ValueError(f"offline capture: unknown weight kind {spec.weight!r} (nf4dq, nf4, dense)")
    return NF4Weight(_meta(((n + 1) // 2, 1), torch.uint8), (N, K), spec.x_dtype, blocksize,
                     _meta((16,), torch.float32), absmax, **nested)  # fmt: skip


def weight_bytes(weight) -> int:
    """Bytes of W as stored: packed NF4 + absmax (+ nested absmax, code tables), or the dense tensor."""
    if isinstance(weight, NF4Weight):
        return sum(t.numel() * t.element_size() for t in weight._tensors().values())
    return weight.numel() * weight.element_size()


def _run_forward(spec: LayerSpec, tensors: dict):
    from ..kernels import lora

    return lora.forward(tensors["x"], tensors["W"], tensors["A"], tensors["B"], 2.0, None, spec.dropout_p, 1234)


def _run_forward_backward(spec: LayerSpec, tensors: dict):
    from ..kernels import lora

    _, u = _run_forward(spec, tensors)
    _active[-1].sync("host", _active[-1].current.index, None)  # other layers' work runs between the two passes
    g = _meta((spec.M, spec.N), spec.x_dtype)
    return lora.backward(g, tensors["x"], tensors["W"], tensors["A"], tensors["B"], 2.0, spec.dropout_p, 1234, u,
                         True, True, True, False)  # fmt: skip


PASSES: dict[str, Callable] = {"fwd": _run_forward, "fwd_bwd": _run_forward_backward}

# Aten operations that do no device work: allocation, metadata, views.
_NO_WORK = {"empty", "empty_strided", "new_empty", "new_empty_strided", "promote_types", "lift_fresh", "detach",
            "alias", "result_type", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "sym_numel"}
_FILLS = {"zeros", "ones", "full", "fill_", "zero_", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
          "new_full"}


_CUDA = torch.device("cuda", 0)
_real_device = torch._C.TensorBase.device
_real_is_cuda = torch._C.TensorBase.is_cuda
_inside_torch = [False]  # True while an aten op runs: PyTorch's own Python kernels see the real (meta) device


def _is_target(t: torch.Tensor) -> bool:
    return _real_device.__get__(t).type == "meta"


def _device_seen(t: torch.Tensor) -> torch.device:
    return _CUDA if _is_target(t) and not _inside_torch[0] else _real_device.__get__(t)


def _is_cuda_seen(t: torch.Tensor) -> bool:
    return (_is_target(t) and not _inside_torch[0]) or _real_is_cuda.__get__(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _known_contents(weight) -> dict:
    """Values of the weight's small tables (storage -> CPU tensor), for launchers that read them on the host (e.g.
    to check that the code table is NF4's): the NF4 code, the nested dynamic map, the offset 0."""
    from ..nf4 import dynamic_code, nf4_code

    if not isinstance(weight, NF4Weight):
        return {}
    known = {_storage_key(weight.code): nf4_code()}
    if weight.double_quant:
        known[_storage_key(weight.nested_code)] = dynamic_code()
        known[_storage_key(weight.offset)] = torch.zeros(())
    return known


class _TorchWork(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten operation with device work on the (meta) target tensors as a TorchOp step: bytes of its
    tensor inputs and outputs (of a fill: its output only). Copies of a meta tensor to the host get the values of
    ``known`` (storage -> CPU tensor), zeros for any other tensor."""

    def __init__(self, recorder, known: dict):
        super().__init__()
        self.recorder, self.known = recorder, known

    def _host_copy(self, t: torch.Tensor, dtype) -> torch.Tensor:
        data = self.known.get(_storage_key(t))
        if data is None:
            return torch.zeros(t.shape, dtype=dtype or t.dtype)
        flat = data.reshape(-1).to(dtype or t.dtype)
        return flat.as_strided(t.shape, t.stride(), t.storage_offset()).clone()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        meta_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and _is_target(t)]  # fmt: skip
        if name == "_to_copy" and meta_in and str(kwargs.get("device", "meta")) == "cpu":
            return self._host_copy(args[0], kwargs.get("dtype"))
        if name == "_local_scalar_dense" and meta_in:
            return self._host_copy(args[0], None).item()
        _inside_torch[0] = True
        try:
            out = func(*args, **kwargs)
        finally:
            _inside_torch[0] = False
        if getattr(func, "is_view", False) or name in _NO_WORK:
            return out
        outs = [t for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and _is_target(t)]  # fmt: skip
        if outs or (meta_in and name.endswith("_")):
            written = sum(map(_nbytes, outs)) or _nbytes(meta_in[0])
            moved = written + (0 if name in _FILLS else sum(map(_nbytes, meta_in)))
            self.recorder.add(Step(torch_op=TorchOp(name, moved)))
        return out


def _resolve(kernel, args: tuple, kwargs: dict, config: str = "") -> list[tuple]:
    """[(JITFunction, positional args, launch kwargs, config name)] a launch of ``kernel`` may run: every config an
    Autotuner keeps after its pruning (``prune_configs``, as it would time them), a Heuristics wrapper's values
    filled in."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    if isinstance(kernel, Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = kernel.prune_configs(kwargs)
        finally:
            kernel.nargs = None
        return [item for c in configs for item in _resolve(kernel.fn, args, {**kwargs, **c.all_kwargs()}, _name(c))]
    if isinstance(kernel, Heuristics):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        values = {name: heuristic(named) for name, heuristic in kernel.values.items()}
        return _resolve(kernel.fn, args, {**kwargs, **values}, config)
    return [(kernel, args, kwargs, config)]


def _name(config) -> str:
    """An autotune config as a short name: its BLOCK_* sizes in order, warps and stages (e.g. 128x256x64w8s3)."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks}w{config.num_warps}s{config.num_stages}"


def _launches(kernel, grid, args: tuple, kwargs: dict, weight_ids: set) -> list[Launch]:
    """The candidate Launches of one ``kernel[grid](*args, **kwargs)``."""
    found = []
    for jit, jit_args, jit_kwargs, config in _resolve(kernel, args, kwargs):
        params = jit.arg_names
        named = {**dict(zip(params, jit_args)), **{k: v for k, v in jit_kwargs.items() if k in params}}
        options = {k: v for k, v in jit_kwargs.items() if k not in params}
        shape = grid(named | options) if callable(grid) else grid
        programs = 1
        for extent in (shape,) if isinstance(shape, int) else shape:
            programs *= int(extent)
        tensors = {id(v): v for v in named.values() if isinstance(v, torch.Tensor)}
        found.append(Launch(
            kernel=jit.fn.__name__, module=jit.fn.__module__, args=named, options=options, programs=programs,
            config=config, tensor_bytes=sum(map(_nbytes, tensors.values())),
            weight_reads=int(bool(weight_ids & set(tensors))),
        ))  # fmt: skip
    return found


_active: list = []  # the recorder of the capture under way (streams a launcher cached across calls report to it)
_stream_count = [1]  # stream 0 is the caller's current stream; every stream made later gets the next number


class _Stream:
    """A CUDA stream of the target as the launchers see it: its waits are recorded as Steps of the active capture."""

    def __init__(self, index: int | None = None):
        if index is None:
            index, _stream_count[0] = _stream_count[0], _stream_count[0] + 1
        self.index = index

    def wait_stream(self, other) -> None:
        _active[-1].sync("wait_stream", self.index, other.index)

    def wait_event(self, event) -> None:
        _active[-1].sync("wait_event", self.index, event.index)

    def record_event(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    count = 0

    def __init__(self, *args, **kwargs):
        self.index, _Event.count = _Event.count, _Event.count + 1

    def record(self, stream=None) -> None:
        _active[-1].sync("record", (stream or _active[-1].current).index, self.index)

    def wait(self, stream=None) -> None:
        (stream or _active[-1].current).wait_event(self)

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Recorder:
    """The steps of one pass and the stream they are issued on."""

    def __init__(self):
        self.steps: list[Step] = []
        self.main = _Stream(0)
        self.current = self.main

    def sync(self, kind: str, stream: int, other: int) -> None:
        self.steps.append(Step(sync=(kind, stream, other), stream=stream))

    def add(self, step: Step) -> None:
        step.stream = self.current.index
        self.steps.append(step)

    @contextlib.contextmanager
    def use_stream(self, stream):
        previous, self.current = self.current, stream or self.current
        try:
            yield stream
        finally:
            self.current = previous


def _as_meta(value):
    """A CUDA device (object or string) as the meta device; anything else unchanged."""
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("meta")
    if isinstance(value, str) and value.split(":")[0] == "cuda":
        return "meta"
    return value


class _CudaOnMeta(torch.overrides.TorchFunctionMode):
    """Tensors the launchers create "on CUDA" are created on the meta device; ``record_stream`` does nothing."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "record_stream":
            return None
        if name == "cuda":
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _as_meta(kwargs["device"])
        if name == "to":
            args = tuple(_as_meta(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device(arch: int, recorder: _Recorder):
    """The launchers see the target GPU: meta tensors report device cuda:0, "cuda" tensors are created on the meta
    device, device queries answer with ``TARGETS[arch]``, streams and events are recorded (no CUDA is touched)."""
    facts = TARGETS[arch]
    properties = types.SimpleNamespace(**dataclasses.asdict(facts))
    patches = {
        "get_device_capability": lambda *a, **k: (facts.major, facts.minor),
        "get_device_properties": lambda *a, **k: properties,
        "current_device": lambda: 0, "device_count": lambda: 1, "is_available": lambda: True,
        "set_device": lambda *a: None, "synchronize": lambda *a: None, "is_current_stream_capturing": lambda: False,
        "device": lambda *a, **k: contextlib.nullcontext(),
        "current_stream": lambda *a, **k: recorder.current, "default_stream": lambda *a, **k: recorder.main,
        "Stream": lambda *a, **k: _Stream(), "Event": _Event,
        "stream": recorder.use_stream,
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        # backend.cuda_capability's per-device cache, answered for the target and left as it was
        stack.enter_context(mock.patch.object(backend, "_cuda_properties",
                                              lambda index: ((facts.major, facts.minor), facts.multi_processor_count,
                                                             facts.shared_memory_per_block_optin)))
        stack.enter_context(mock.patch.object(torch.Tensor, "device", property(_device_seen)))
        stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(_is_cuda_seen)))
        stack.enter_context(_CudaOnMeta())
        yield facts


def capture_pass(pass_name: str, spec: LayerSpec, arch: int) -> tuple[list[Step], dict]:
    """The steps of one ``pass_name`` over ``spec`` on target ``arch`` in launch order (kernel launches with their
    candidate configs, PyTorch ops with device work, stream synchronisations), and facts of the layer
    ({"weight_bytes": ...})."""
    from triton.runtime.jit import KernelInterface

    from ..backend import interpreting

    if interpreting():
        raise RuntimeError("offline capture: TRITON_INTERPRET=1 is set; run with TRITON_INTERPRET=0 (the launchers "
                           "would take the interpreter's path)")
    weight = make_weight(spec)
    tensors = {"x": _meta((spec.M, spec.K), spec.x_dtype), "W": weight,
               "A": _meta((spec.r, spec.K), spec.adapter_dtype), "B": _meta((spec.N, spec.r), spec.adapter_dtype)}
    weight_ids = {id(weight.packed)} if isinstance(weight, NF4Weight) else {id(weight)}
    known = _known_contents(weight)
    recorder = _Recorder()
    _active.append(recorder)

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            recorder.add(Step(candidates=_launches(kernel, grid, args, kwargs, weight_ids)))

        return launch

    try:
        with fake_device(arch, recorder), mock.patch.object(KernelInterface, "__getitem__", getitem), \
                _TorchWork(recorder, known):  # fmt: skip
            PASSES[pass_name](spec, tensors)  # warm: whatever the launchers cache across calls
            recorder.steps.clear()
            PASSES[pass_name](spec, tensors)
    finally:
        _active.pop()
    return recorder.steps, {"weight_bytes": weight_bytes(weight)}
