"""bitsandbytes' 8-bit blockwise codec, the one implementation in the package: the NF4 double quantization
(fused_lora.nf4, the absmax vector) and the 8-bit optimizer state (fused_lora.optim, exp_avg / exp_avg_sq) use it.

Dynamic map (``dynamic_map(signed)``, bitsandbytes' ``create_dynamic_map``): 256 sorted fp32 codes in [-1, 1].

Quantization of a block of ``blocksize`` elements x (default 256; the last block may be shorter), fp32 throughout:

    a = max |x| over the non-NaN x                     (stored as the block's absmax; a block with a = 0 gets codes 0)
    u = clamp(x · fl(1 / a), -1, 1)
    t = fl(fl(u + 1) · 0.5)
    q = lut[trunc(t · 65535 + 0.5)]                    (the index rule, below)
    q = 0 where u is NaN                               (a NaN x; x = 0 or ±inf times an inf or 0 reciprocal)
    lut[i] = #{ j < 255 : mid_j < fl(fl(2i) / 65535) - 1 },   mid_j = fl(fl(code[j] + code[j+1]) · 0.5)

that is, lut[i] is the code nearest to the grid point u_i = 2i/65535 - 1 (a value exactly on a midpoint takes the
lower code), and q is the lut entry of the grid point nearest to u.

Extreme values, as bitsandbytes' CPU quantizer treats them (tests/test_codec.py checks each against it): an absmax
below 2^-128 (subnormal) has an inf reciprocal, so the block's positive elements get the top code (u = +inf clamped
to 1), its negative ones code 0 and its zeros code 0 (0 · inf is NaN); a block holding an inf has absmax inf and
reciprocal 0, so its finite elements get the code that 0 gets and the inf itself code 0; a NaN element is left out
of the absmax and gets code 0. Nothing raises: NaN optimizer moments propagate as in bitsandbytes.

The index rule. bitsandbytes 0.50.2's CPU quantizer (``quantize_cpu_impl<float>`` in libbitsandbytes_cpu.so, which
``bitsandbytes.functional.quantize_blockwise``, ``quantize_4bit(compress_statistics=True)`` and the CPU
``AdamW8bit`` all call) evaluates t · 65535 + 0.5 with one fused multiply-add (``vfmadd213ss``: a single rounding to
fp32), then truncates (``cvttss2si``). Here the same expression is evaluated as two fp32 operations (a rounded
product, then a rounded sum), which gives the same index for every t the quantizer can form: t = v / 2 where
v = fl(u + 1) is an fp32 multiple of 2^-24 in [0, 2], so t ranges over the 25,165,825 fp32 multiples of 2^-25 in
[0, 1], and for each of them trunc(fl(fl(t · 65535) + 0.5)) == trunc(fl(t · 65535 + 0.5)).
tests/test_codec.py checks that identity for all of them, and quantizes every such t with bitsandbytes itself.
The fp32 form is what the Triton update kernel (fused_lora/kernels/adamw.py) computes too, on any device.

Dequantization: x' = fl(code[q] · absmax of q's block).

This module imports only torch (it sits below nf4.py and the optimizers).

Example::

    code = dynamic_map(signed=True)
    q, absmax = quantize_blockwise(torch.randn(1000), code)          # uint8 (1000,), fp32 (4,)
    x = dequantize_blockwise(q, absmax, code)
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCKSIZE",
    "LUT_SIZE",
    "dynamic_map",
    "quantization_lut",
    "dynamic_lut",
    "quantize_blockwise",
    "dequantize_blockwise",
]

BLOCKSIZE = 256  # the default block: bitsandbytes' optimizer state and its nested (double) quantization
LUT_SIZE = 65536
_GRID = LUT_SIZE - 1  # 65535 intervals between the LUT's grid points u_i

_dynamic_luts: dict[tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool = True, device="cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map (``create_dynamic_map(signed)``): 256 sorted fp32 codes in
    [-1, 1], a fresh tensor on ``device``.

    Seven decades 10^-6 … 10^0; decade e holds the midpoints of a uniform (fp32 linspace) split of [0.1, 1] into
    2^e (signed, both signs) or 2^(e+1) (unsigned) intervals, scaled by 10^(e-6); plus 0 and 1.

    Example: ``dynamic_map(signed=True)[[127, 255]]`` → ``tensor([0., 1.])``
    """
    values = [torch.zeros(1), torch.ones(1)]
    for decade in range(7):
        intervals = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        level = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (decade - 6)
        values += [level, -level] if signed else [level]
    return torch.sort(torch.cat(values)).values.to(device)


def quantization_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table the quantizer looks codes up in (uint8, on code's device): entry i is the index of the
    code nearest to u_i = fl(fl(2i) / 65535) - 1, the number of code midpoints strictly below u_i (module docstring).
    """
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    u = (i + i) / float(_GRID) - 1.0
    code = code.float()
    midpoints = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(midpoints, u).clamp_(max=code.numel() - 1).to(torch.uint8)


def dynamic_lut(signed: bool = True, device="cpu") -> torch.Tensor:
    """``quantization_lut(dynamic_map(signed))`` on ``device``, built once per (signed, device) and shared: do not
    modify it."""
    key = (bool(signed), torch.device(device))
    if key not in _dynamic_luts:
        _dynamic_luts[key] = quantization_lut(dynamic_map(signed, device))
    return _dynamic_luts[key]


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] → [ceil(n / blocksize), blocksize], the last block padded with zeros."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)


def _check_blocksize(who: str, blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"{who}: blocksize must be a positive int, got {blocksize!r}")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, lut: torch.Tensor | None = None,
                       blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Blockwise 8-bit quantization with bitsandbytes' arithmetic, bit for bit (see the module docstring).

    Args:
        x: tensor of any shape (fp32; fp16 / bf16 are widened to fp32 first), flattened row-major into blocks.
        code: fp32 (256,) sorted map, e.g. ``dynamic_map(signed)``.
        lut: ``quantization_lut(code)`` on x's device (built here when None; pass it when quantizing often).
        blocksize: elements per absmax block (default 256).
    Returns:
        q uint8 with x's shape, absmax fp32 (ceil(numel / blocksize),).

    Example: ``q, absmax = quantize_blockwise(torch.randn(1000), dynamic_map(True))``
    """
    _check_blocksize("quantize_blockwise", blocksize)
    lut = quantization_lut(code) if lut is None else lut
    flat = x.reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    magnitude = blocks.abs()
    absmax = magnitude.masked_fill_(magnitude.isnan(), 0.0).amax(dim=1)  # NaN elements do not count (bitsandbytes)
    empty = (absmax == 0)[:, None]
    reciprocal = 1.0 / torch.where(empty[:, 0], torch.ones_like(absmax), absmax)  # inf for a subnormal absmax
    u = (blocks * reciprocal[:, None]).clamp_(-1.0, 1.0)
    t = (u + 1.0) * 0.5
    index = (t * float(_GRID) + 0.5).nan_to_num_(0.0).long()  # fp32 product and sum, truncation (docstring); NaN → 0
    q = lut[index].masked_fill_(empty, 0)
    return q.reshape(-1)[: flat.numel()].view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = BLOCKSIZE) -> torch.Tensor:  # fmt: skip
    """Inverse of :func:`quantize_blockwise`: fl(code[q] · absmax of q's block), fp32 with q's shape."""
    _check_blocksize("dequantize_blockwise", blocksize)
    values = code[q.reshape(-1).long()]
    scales = absmax.repeat_interleave(blocksize)[: values.numel()]
    return (values * scales).view(q.shape)
