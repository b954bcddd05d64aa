"""Several LoRA adapters over one frozen weight in one pass: ``lora_linear_multi``.

Symbols of fused_lora/reference.py, with adapters a = 0..n−1 (A_a, B_a, s_a, dropout p_a) and, per row i of x
(after flattening the leading dims), an adapter id t_i ∈ {−1, 0, .., n−1} (−1: no adapter, PEFT's "__base__"):

    mixed batch (adapter_ids given):   y_i = x_i·Wᵀ + b + s_t·((m⊙x_i)·A_tᵀ)·B_tᵀ     (t = t_i; nothing when t = −1)
    several active adapters (no ids):  y   = x·Wᵀ + b + Σ_a s_a·((m_a⊙x)·A_aᵀ)·B_aᵀ   (PEFT's set_adapter([...]))

The frozen product x·Wᵀ (and g·W backward) runs once for the whole batch on the chosen backend
(``frozen_forward`` / ``frozen_backward``: the Triton kernels with NF4 decoded in registers, or the reference); the
low-rank terms run per adapter on its rows only (rows grouped by adapter with one sort; index_select / index_copy)
in at least fp32, as the kernels accumulate them. Backward, per adapter on its rows R:
    v = g_R·B;  dx_R += s·m⊙(v·A);  dA = s·vᵀ·(m⊙x_R);  dB = s·g_Rᵀ·u
so each row's gradient reaches only its adapter (several adapters trained in one batch, as LoRAFusion does).
Several active adapters without dropout take one fused ``lora_linear`` call instead: their ranks concatenated
(A = [A_0; A_1; ..], B = [s_0·B_0, s_1·B_1, ..], s = 1), which is the same sum. A mixed batch whose adapter groups
all have at least ``GROUP_ROWS`` rows runs, on a kernel backend, each group through the fused LoRA kernels (forward
and backward, the low-rank term inside the GEMM) and the base rows through the frozen kernel: every row is computed
once, so the frozen FLOPs are those of one pass; W is read once per group, which costs nothing once a group is large
enough for the GEMM to be compute-bound (smaller groups share one frozen pass instead).

Each adapter draws its own dropout mask (from its own seed, regenerated in backward, never stored), as PEFT's
per-adapter ``nn.Dropout`` does: with torch's generator (reference.dropout_mask), except for a group that runs
through the fused kernels, whose backend draws it from the group's seed (the forward and the backward alike).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import _common, functional, reference
from .nf4 import NF4Weight

__all__ = ["Adapter", "lora_linear_multi", "adapter_rows", "lora_linear_multi_naive"]


# A mixed batch runs group by group through the fused LoRA kernels when every adapter group has this many rows
# (an NF4 GEMM on an H200 is compute-bound from about 50 rows: 0.52 bytes per weight against 2·rows FLOPs).
GROUP_ROWS = 128


class Adapter(NamedTuple):
    """One LoRA adapter of ``lora_linear_multi``: lora_A (r, K), lora_B (N, r), scaling s, dropout probability."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0


def _lowrank_dtype(x: torch.Tensor, adapters) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, torch.float32)
    for a in adapters:
        dtype = torch.promote_types(torch.promote_types(dtype, a.lora_A.dtype), a.lora_B.dtype)
    return dtype


def adapter_rows(ids: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    """The rows of each adapter: ``ids`` (M,) integers in [-1, n_adapters) → n_adapters index tensors (int64,
    ascending), from one stable sort and one host sync (the group sizes).

    Example:
        >>> adapter_rows(torch.tensor([1, -1, 0, 1]), 2)
        [tensor([2]), tensor([0, 3])]
    """
    return _grouped_rows(ids, n_adapters)[1]


def _grouped_rows(ids: torch.Tensor, n_adapters: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(rows without an adapter, [rows of each adapter]) from one stable sort."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n_adapters + 1).tolist()
    starts = [sum(counts[:a]) for a in range(n_adapters + 2)]
    return order[: counts[0]], [order[starts[a + 1]: starts[a + 2]] for a in range(n_adapters)]


class _Plan(NamedTuple):
    """Per adapter: scaling, dropout probability (0 when not training), seed, rows (None: every row)."""

    scalings: tuple
    dropout_ps: tuple
    seeds: tuple
    rows: tuple


def _masked(x_rows: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """m⊙x over an adapter's rows in the low-rank dtype (the mask regenerated from ``seed``)."""
    m = reference.dropout_mask(x_rows.shape, p, seed, x_rows.device, dtype)
    return x_rows.to(dtype) if m is None else x_rows.to(dtype) * m


class _MultiLoraFunction(torch.autograd.Function):
    """Autograd of ``lora_linear_multi``'s general path: the frozen product once on the backend, the low-rank terms
    per adapter. Saved: x, a dense W (an NF4 one on ctx), each adapter's A, B and u; masks are regenerated."""

    @staticmethod
    def forward(ctx, x2d, dense_weight, bias, nf4_weight, plan, backend, *adapter_tensors):
        weight = nf4_weight if nf4_weight is not None else dense_weight
        impl = functional._implementation(backend)
        pairs = list(zip(adapter_tensors[0::2], adapter_tensors[1::2]))
        L = _lowrank_dtype(x2d, [Adapter(A, B, 0.0) for A, B in pairs])
        y = impl.frozen_forward(x2d, weight, bias)
        us = []
        every_row = all(rows is None for rows in plan.rows)
        acc = y.to(L) if every_row else None
        for (A, B), s, p, seed, rows in zip(pairs, plan.scalings, plan.dropout_ps, plan.seeds, plan.rows):
            x_rows = x2d if rows is None else x2d.index_select(0, rows)
            u = _masked(x_rows, p, seed, L) @ A.to(L).t()
            us.append(u)
            delta = s * (u @ B.to(L).t())
            if every_row:
                acc += delta
            elif rows.numel():
                y.index_copy_(0, rows, (y.index_select(0, rows).to(L) + delta).to(y.dtype))
        if every_row:
            y = acc.to(x2d.dtype)
        ctx.save_for_backward(x2d, dense_weight, *adapter_tensors, *us)
        ctx.nf4_weight = nf4_weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.plan, ctx.impl, ctx.n = plan, impl, len(pairs)
        return y

    @staticmethod
    def backward(ctx, g):
        functional._refuse_double_backward("lora_linear_multi")
        saved = ctx.saved_tensors
        x2d, dense_weight = saved[:2]
        n, plan = ctx.n, ctx.plan
        adapter_tensors, us = saved[2: 2 + 2 * n], saved[2 + 2 * n:]
        pairs = list(zip(adapter_tensors[0::2], adapter_tensors[1::2]))
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else dense_weight
        need_dx, _, need_db = ctx.needs_input_grad[:3]
        needs = ctx.needs_input_grad[6:]
        L = _lowrank_dtype(x2d, [Adapter(A, B, 0.0) for A, B in pairs])
        g = g.contiguous()
        dx = db = None
        with functional._autocast_off(g.device):
            if need_dx or need_db:
                dx, db = ctx.impl.frozen_backward(g, weight, need_dx, need_db)
        dx_acc = dx.to(L) if need_dx else None
        grads = []
        for i, ((A, B), u) in enumerate(zip(pairs, us)):
            s, p, seed, rows = plan.scalings[i], plan.dropout_ps[i], plan.seeds[i], plan.rows[i]
            need_dA, need_dB = needs[2 * i], needs[2 * i + 1]
            if rows is not None and rows.numel() == 0:
                grads += [None, None]
                continue
            g_rows = (g if rows is None else g.index_select(0, rows)).to(L)
            A_L, B_L = A.to(L), B.to(L)
            dA = dB = None
            if need_dx or need_dA:
                v = g_rows @ B_L
                m = reference.dropout_mask((g_rows.shape[0], A.shape[1]), p, seed, g.device, L)
                if need_dx:
                    term = s * (v @ A_L)
                    term = term if m is None else term * m
                    if rows is None:
                        dx_acc += term
                    else:
                        dx_acc.index_add_(0, rows, term)
                if need_dA:
                    x_rows = x2d if rows is None else x2d.index_select(0, rows)
                    x_rows = x_rows.to(L) if m is None else x_rows.to(L) * m
                    dA = (s * (v.t() @ x_rows)).to(A.dtype)
            if need_dB:
                dB = (s * (g_rows.t() @ u.to(L))).to(B.dtype)
            grads += [dA, dB]
        if need_dx:
            dx = dx_acc.to(x2d.dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return (dx, None, db, None, None, None, *grads)


class _GroupedLoraFunction(torch.autograd.Function):
    """Autograd of a mixed batch run group by group (module docstring): each adapter's rows through the backend's
    fused ``forward`` / ``backward`` (its dropout drawn by the backend from the group's seed), the base rows through
    ``frozen_forward`` / ``frozen_backward``. Saved: x, a dense W, each group's u."""

    @staticmethod
    def forward(ctx, x2d, dense_weight, bias, nf4_weight, plan, backend, base_rows, *adapter_tensors):
        weight = nf4_weight if nf4_weight is not None else dense_weight
        impl = functional._implementation(backend)
        pairs = list(zip(adapter_tensors[0::2], adapter_tensors[1::2]))
        y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
        if base_rows.numel():
            y.index_copy_(0, base_rows, impl.frozen_forward(x2d.index_select(0, base_rows), weight, bias))
        us = []
        for (A, B), s, p, seed, rows in zip(pairs, plan.scalings, plan.dropout_ps, plan.seeds, plan.rows):
            if rows.numel() == 0:
                us.append(None)
                continue
            y_rows, u = impl.forward(x2d.index_select(0, rows), weight, A, B, s, bias, p, seed)
            y.index_copy_(0, rows, y_rows)
            us.append(u)
        ctx.save_for_backward(x2d, dense_weight, base_rows, *adapter_tensors, *us)
        ctx.nf4_weight, ctx.plan, ctx.impl, ctx.n = nf4_weight, plan, impl, len(pairs)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        functional._refuse_double_backward("lora_linear_multi")
        saved = ctx.saved_tensors
        x2d, dense_weight, base_rows = saved[:3]
        n, plan = ctx.n, ctx.plan
        adapter_tensors, us = saved[3: 3 + 2 * n], saved[3 + 2 * n:]
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else dense_weight
        need_dx, _, need_db = ctx.needs_input_grad[:3]
        needs = ctx.needs_input_grad[7:]
        g = g.contiguous()
        dx = torch.empty_like(x2d) if need_dx else None
        db_parts, grads = [], []
        with functional._autocast_off(g.device):
            if base_rows.numel() and (need_dx or need_db):
                dx_rows, db_rows = ctx.impl.frozen_backward(g.index_select(0, base_rows), weight, need_dx, need_db)
                if need_dx:
                    dx.index_copy_(0, base_rows, dx_rows)
                db_parts.append(db_rows)
            for i in range(n):
                A, B, u, rows = adapter_tensors[2 * i], adapter_tensors[2 * i + 1], us[i], plan.rows[i]
                need_dA, need_dB = needs[2 * i], needs[2 * i + 1]
                if rows.numel() == 0:
                    grads += [None, None]
                    continue
                dx_rows, dA, dB, db_rows = ctx.impl.backward(
                    g.index_select(0, rows), x2d.index_select(0, rows), weight, A, B, plan.scalings[i],
                    plan.dropout_ps[i], plan.seeds[i], u, need_dx, need_dA, need_dB, need_db)
                if need_dx:
                    dx.index_copy_(0, rows, dx_rows)
                db_parts.append(db_rows)
                grads += [dA, dB]
        db = sum(db_parts[1:], db_parts[0]).to(ctx.bias_dtype) if need_db else None
        return (dx, None, db, None, None, None, None, *grads)


def _check_adapters(caller, x, out_features, in_features, adapters) -> list[Adapter]:
    if isinstance(adapters, (torch.Tensor, str)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"{caller}: adapters must be a non-empty sequence of fused_lora.mixed.Adapter "
                        f"(lora_A, lora_B, scaling, dropout_p), got {type(adapters).__name__}")
    checked = []
    for index, adapter in enumerate(adapters):
        if not isinstance(adapter, tuple) or not 3 <= len(adapter) <= 4:
            raise TypeError(f"{caller}: adapters[{index}] must be an Adapter(lora_A, lora_B, scaling, dropout_p), "
                            f"got {type(adapter).__name__}")
        adapter = Adapter(*adapter)
        where = f"adapters[{index}]"
        for name, t in ((f"{where}.lora_A", adapter.lora_A), (f"{where}.lora_B", adapter.lora_B)):
            functional._check_side_dtype(caller, name, t, x)
            functional._check_same_device(caller, name, t.device, x)
        A, B = adapter.lora_A, adapter.lora_B
        if A.dim() != 2 or A.shape[0] < 1 or A.shape[1] != in_features:
            raise ValueError(f"{caller}: {where}.lora_A must be (r, {in_features}) with r >= 1, "
                             f"got {tuple(A.shape)}")
        if tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"{caller}: {where}.lora_B has shape {tuple(B.shape)}, "
                             f"expected ({out_features}, {A.shape[0]})")
        functional._check_real(caller, f"{where}.scaling", adapter.scaling, "a Python number (alpha / r)")
        if not math.isfinite(float(adapter.scaling)):
            raise ValueError(f"{caller}: {where}.scaling must be finite, got {adapter.scaling}")
        functional._check_real(caller, f"{where}.dropout_p", adapter.dropout_p, "a probability in [0, 1)")
        if not 0.0 <= float(adapter.dropout_p) < 1.0:
            raise ValueError(f"{caller}: {where}.dropout_p must be in [0, 1), got {adapter.dropout_p}")
        checked.append(Adapter(A, B, float(adapter.scaling), float(adapter.dropout_p)))
    return checked


def _row_ids(caller, adapter_ids, x: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """adapter_ids (a tensor or list of ints over x's first leading dims) → (M,) int64 on x's device."""
    if _common.cuda_graph_capturing():  # the ids are checked and grouped on the host
        raise RuntimeError(f"{caller}: a mixed-adapter batch (adapter_ids) cannot be captured in a CUDA graph: its "
                           "rows are grouped by adapter on the host; run it outside the graph")
    if not isinstance(adapter_ids, torch.Tensor):
        adapter_ids = torch.as_tensor(adapter_ids)
    if adapter_ids.numel() == 0:  # an empty batch's ids ([] is float32 to torch): no value to check
        adapter_ids = adapter_ids.to(torch.int64)
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"{caller}: adapter_ids must hold integers (-1 for no adapter), got {adapter_ids.dtype}")
    leading = tuple(x.shape[:-1])
    k = adapter_ids.dim()
    if k < 1 or tuple(adapter_ids.shape) != leading[:k]:
        raise ValueError(f"{caller}: adapter_ids has shape {tuple(adapter_ids.shape)}; it must match x's leading "
                         f"dims {leading} or a prefix of them (one id per sample)")
    ids = adapter_ids.to(device=x.device, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n_adapters):
        raise ValueError(f"{caller}: adapter_ids must be in [-1, {n_adapters - 1}] (-1: no adapter), got values "
                         f"from {int(ids.min())} to {int(ids.max())}")
    return ids.reshape(ids.shape + (1,) * (len(leading) - k)).expand(leading).reshape(-1)


def lora_linear_multi(
    x: torch.Tensor,
    weight,
    adapters: Sequence[Adapter],
    adapter_ids=None,
    bias: torch.Tensor | None = None,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Several LoRA adapters over one frozen weight in one pass (module docstring).

    Args:
        x: (..., K) input, bf16 / fp16 / fp32 (fp64 on the reference backend).
        weight: frozen W, an ``NF4Weight`` (N, K) or a dense (N, K) tensor in x's dtype.
        adapters: a sequence of ``Adapter(lora_A, lora_B, scaling, dropout_p)``; A (r_a, K), B (N, r_a) in x's dtype
            or fp32 (ranks may differ).
        adapter_ids: None (every adapter adds its term to every row: several active adapters), or integers, one per
            row of x's first ``k`` leading dims (e.g. one per sample of a (batch, seq, K) input), in [-1, n):
            the adapter of that row, -1 for none (PEFT's "__base__").
        bias: optional (N,). training: whether dropout is active. backend: as for ``lora_linear``.
    Returns:
        y: (..., N) in x's dtype. Gradients flow to x, every lora_A / lora_B (each from its own rows only) and bias.

    Example:
        >>> W = fl.quantize_nf4(torch.randn(80, 64))
        >>> ads = [Adapter(torch.randn(8, 64), torch.randn(80, 8), 2.0),
        ...        Adapter(torch.randn(4, 64), torch.randn(80, 4), 1.0)]
        >>> lora_linear_multi(torch.randn(3, 5, 64), W, ads, adapter_ids=[0, -1, 1]).shape
        torch.Size([3, 5, 80])
    """
    caller = "lora_linear_multi"
    out_features, in_features = functional._check_x_and_weight(caller, x, weight, "the adapters and bias are trained")
    functional._check_bias(caller, x, bias, out_features)
    if not isinstance(training, bool):
        raise TypeError(f"{caller}: training must be True or False, got {training!r}")
    adapters = _check_adapters(caller, x, out_features, in_features, adapters)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    ps = tuple(a.dropout_p if training else 0.0 for a in adapters)
    if adapter_ids is None and not any(ps):
        # several active adapters, no dropout: one fused call over the concatenated ranks
        side = _lowrank_dtype(x, adapters)  # fp32 (fp64 beside fp64 x): a side dtype lora_linear accepts
        A = torch.cat([a.lora_A.to(side) for a in adapters])
        B = torch.cat([a.scaling * a.lora_B.to(side) for a in adapters], dim=1)
        return functional.lora_linear(x, weight, A, B, 1.0, bias=bias, training=training, backend=backend)
    rows, base_rows = (None,) * len(adapters), None
    if adapter_ids is not None:
        base_rows, rows = _grouped_rows(_row_ids(caller, adapter_ids, x, len(adapters)), len(adapters))
        rows = tuple(rows)
    seeds = tuple(int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0.0 else 0 for p in ps)
    plan = _Plan(tuple(a.scaling for a in adapters), ps, seeds, rows)
    chosen = functional._choose_backend(backend, x2d, weight, None, None, bias, 0.0, caller)
    nf4_weight, dense_weight = (weight, None) if isinstance(weight, NF4Weight) else (None, weight)
    tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    grouped = base_rows is not None and chosen == "triton" and all(
        r.numel() == 0 or r.numel() >= GROUP_ROWS for r in rows)
    if grouped:
        from .kernels import lora as triton_lora

        grouped = all(triton_lora.unsupported_reason(x2d, weight, a.lora_A, a.lora_B, bias, p) is None
                      for a, p in zip(adapters, ps))
    with functional._autocast_off(x2d.device):
        if grouped:
            y = _GroupedLoraFunction.apply(x2d, dense_weight, bias, nf4_weight, plan, chosen, base_rows, *tensors)
        else:
            y = _MultiLoraFunction.apply(x2d, dense_weight, bias, nf4_weight, plan, chosen, *tensors)
    return y.reshape(*leading, out_features)


def lora_linear_multi_naive(x, W, adapters, row_ids=None, b=None, masks=None):
    """The oracle: for each row, its adapters' terms by plain autograd, no grouping. ``row_ids`` (M,) or None (every
    adapter on every row); ``masks`` one (M, K) dropout mask per adapter or None. x is 2-D.

    Example:
        >>> y = lora_linear_multi_naive(x.double(), W.double(), ads64, torch.tensor([0, -1, 1]))
    """
    F = torch.nn.functional
    y = F.linear(x, W, b)
    L = _lowrank_dtype(x, [Adapter(*a) for a in adapters])
    total = y.to(L)
    for index, adapter in enumerate(adapters):
        A, B, s = adapter[0], adapter[1], adapter[2]
        xd = x.to(L) if masks is None or masks[index] is None else x.to(L) * masks[index].to(L)
        term = s * F.linear(F.linear(xd, A.to(L)), B.to(L))
        if row_ids is not None:
            term = term * (row_ids == index).to(L).unsqueeze(1)
        total = total + term
    return total.to(x.dtype)
