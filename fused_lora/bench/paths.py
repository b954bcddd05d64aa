"""The fused layer on every kernel path at every M, and the M thresholds the times suggest: ``bench --paths``.

Why: strategy.Thresholds (decode_max_m, large_min_m per GPU family, fused_lora/kernels/strategy.py) come from the
offline cost model until a GPU measures where the paths cross. This run forces each path with
``strategy.use_thresholds`` at every M it can take (decode: M ≤ 64, the decode kernels' limit; middle: any M;
large: any M over an NF4 W), times the benchmark layer (fused_lora.bench.impls: ``lora_linear`` on the Triton
backend, NF4 with double quantization, bf16 x and adapters, r = 16 unless ``--r``) in fwd_bwd and fwd, and suggests,
from the fwd_bwd times (training's pass) of each shape:

    decode_max_m  the largest measured M ≤ 64 such that decode is no slower than middle at every measured M' ≤ M
                  (0 when decode loses already at the first M measured on both)
    large_min_m   the smallest measured M such that large is no slower than middle at every measured M' ≥ M
                  (None when large never wins from some M on: keep a threshold above the largest M measured)

and, over several shapes, the smallest decode_max_m and the largest large_min_m (a path change that is right for
every shape measured). The rows are bench ``qlora_paths``, impl ``fused-<path>``; the suggestion, with the GPU
family's current values beside it, goes to the results' ``suggested_thresholds`` and is printed, for a person to
copy into strategy.THRESHOLDS (the times are one GPU's; nothing is changed automatically).
"""

from __future__ import annotations

import math
import time

import torch

from .._common import dtype_name
from ..functional import lora_linear
from ..kernels import strategy
from .impls import (
    LORA_SCALING,
    PASSES,
    layer_dtype,
    lora_layer_flops,
    make_adapters,
    make_base_weight,
    make_input_sets,
    pass_callable,
)

__all__ = ["PATH_M", "PATHS", "forced_thresholds", "suggest_thresholds", "run_path_bench", "path_table"]

PATH_M = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PATHS = ("decode", "middle", "large")
DECODE_LIMIT = 64  # the decode kernels hold every row of one tile (launch_decode.supports)


def forced_thresholds(path: str) -> dict:
    """The strategy.use_thresholds changes that send every call to ``path``."""
    return {"decode": {"decode_max_m": DECODE_LIMIT, "large_min_m": 10**9},
            "middle": {"decode_max_m": 0, "large_min_m": 10**9},
            "large": {"decode_max_m": 0, "large_min_m": 1}}[path]


def _times(rows, K, N, path, pass_name="fwd_bwd") -> dict[int, float]:
    return {row["M"]: row["median_ms"] for row in rows if row["bench"] == "qlora_paths" and row["K"] == K
            and row["N"] == N and row["impl"] == f"fused-{path}" and row["pass"] == pass_name}


def _suggest_one(rows, K, N, large_margin: float) -> dict:
    decode, middle, large = (_times(rows, K, N, path) for path in PATHS)
    decode_max_m = 0
    for M in sorted(set(decode) & set(middle)):
        if not decode[M] < math.inf or decode[M] > middle[M]:  # an ineligible (infinite) decode never wins
            break
        decode_max_m = M
    large_min_m = None
    for M in sorted(set(large) & set(middle), reverse=True):
        if not large[M] < math.inf or large[M] > middle[M] * (1.0 + large_margin):
            break
        large_min_m = M
    return {"decode_max_m": decode_max_m, "large_min_m": large_min_m}


def suggest_thresholds(rows: list[dict], large_margin: float = 0.0) -> dict:
    """{"per_shape": {"KxN": {decode_max_m, large_min_m}}, "decode_max_m", "large_min_m"} from the fwd_bwd rows of
    every shape measured (module docstring); {} when no shape has two paths measured at a common M. With
    ``large_margin`` > 0 the large path also counts as no slower where it is within that fraction of the middle
    path's time (the offline model's suggestion, offline_paths.py: a margin for the model's error). An infinite time
    (a path the offline suggestion found ineligible) never counts as no slower, even against another infinite one.

    Example:
        >>> row = lambda path, M, ms: {"bench": "qlora_paths", "impl": f"fused-{path}", "pass": "fwd_bwd", "M": M,
        ...                            "K": 8, "N": 8, "median_ms": ms}
        >>> suggest_thresholds([row("decode", 16, 1.0), row("middle", 16, 2.0), row("decode", 64, 3.0),
        ...                     row("middle", 64, 2.0)])["decode_max_m"]
        16
    """
    shapes = sorted({(row["K"], row["N"]) for row in rows if row["bench"] == "qlora_paths"})
    per_shape = {f"{K}x{N}": _suggest_one(rows, K, N, large_margin) for K, N in shapes}
    if not per_shape:
        return {}
    large = [s["large_min_m"] for s in per_shape.values()]
    return {"per_shape": per_shape, "decode_max_m": min(s["decode_max_m"] for s in per_shape.values()),
            "large_min_m": None if None in large else max(large)}


def run_path_bench(shapes, ms, ranks, device, timer, results, deadline: float, l2_bytes: int) -> None:
    """Time every (shape, r, M, path, pass) case into ``results`` (bench "qlora_paths"), skipping with a reason what
    fails or finds no time left; then store the suggestion (``results.data["suggested_thresholds"]``)."""
    dtype = layer_dtype(device)
    for K, N in shapes:
        _, nf4, _ = make_base_weight(K, N, dtype, device)
        for r in ranks:
            A, B = make_adapters(K, N, r, dtype, device)
            layer = lambda x: lora_linear(x, nf4, A, B, LORA_SCALING, backend="triton")  # noqa: E731
            for M in ms:
                xs, gs = make_input_sets(M, K, N, dtype, device, l2_bytes)
                for path in PATHS:
                    if path == "decode" and M > DECODE_LIMIT:
                        continue
                    for pass_name in PASSES[::-1]:
                        what = {"bench": "qlora_paths", "impl": f"fused-{path}", "pass": pass_name, "M": M, "K": K,
                                "N": N, "r": r}
                        if time.monotonic() >= deadline:
                            results.skip(what, "time budget (--max-seconds) spent")
                            continue
                        try:
                            with strategy.use_thresholds(**forced_thresholds(path)):
                                median_ms = timer.median_ms(pass_callable(layer, xs, gs, pass_name),
                                                            grad_to_none=xs + [A, B])
                        except Exception as exc:
                            results.skip(what, f"{type(exc).__name__}: {str(exc)[:300]}")
                            continue
                        flops = lora_layer_flops(M, K, N, r, pass_name)
                        results.add({**what, "dtype": dtype_name(dtype), "median_ms": median_ms,
                                     "tflops": flops / (median_ms * 1e-3) / 1e12, "peak_mem_mb": None,
                                     "flops": flops})
                xs = gs = None
        del nf4
    current = strategy.thresholds(device)
    results.data["suggested_thresholds"] = {**suggest_thresholds(results.data["results"]),
                                            "current": {"decode_max_m": current.decode_max_m,
                                                        "large_min_m": current.large_min_m}}
    results.flush()


def path_table(data: dict) -> str:
    """Markdown: ms per path at each (shape, r, M, pass), the fastest marked, and the suggested thresholds."""
    rows = [row for row in data["results"] if row["bench"] == "qlora_paths"]
    cases = sorted({(row["K"], row["N"], row["r"], row["pass"], row["M"]) for row in rows})
    lines = ["| K | N | r | pass | M | " + " | ".join(PATHS) + " |", "|---" * (5 + len(PATHS)) + "|"]
    for K, N, r, pass_name, M in cases:
        times = {row["impl"].removeprefix("fused-"): row["median_ms"] for row in rows
                 if (row["K"], row["N"], row["r"], row["pass"], row["M"]) == (K, N, r, pass_name, M)}
        best = min(times, key=times.get)
        cells = [(f"**{times[p]:.4g}**" if p == best else f"{times[p]:.4g}") if p in times else "–" for p in PATHS]
        lines.append(f"| {K} | {N} | {r} | {pass_name} | {M} | " + " | ".join(cells) + " |")
    suggested = data.get("suggested_thresholds") or {}
    if suggested.get("per_shape"):
        current = suggested.get("current", {})
        lines += ["", f"Suggested (fwd_bwd): decode_max_m = {suggested['decode_max_m']} (now "
                  f"{current.get('decode_max_m')}), large_min_m = {suggested['large_min_m']} (now "
                  f"{current.get('large_min_m')}); per shape: "
                  + ", ".join(f"{shape}: {s['decode_max_m']} / {s['large_min_m']}"
                              for shape, s in suggested["per_shape"].items())]
    return "\n".join(lines)
