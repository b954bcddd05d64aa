"""The results file of ``python -m fused_lora bench``: its schema, how it is found, and how it is written.

Schema (docs/DESIGN.md, "Benchmarks and results"): ``{"env": {device, torch, triton, cuda, commit}, "results":
[rows]}``; every row has ``bench, impl, pass, M, K, N, r, dtype, median_ms, tflops, peak_mem_mb`` and may carry
extra fields. The sweep also writes ``config``, ``roofline``, ``skipped`` and ``wall_s``. Files are
``<results root>/<device-name-slug>/<YYYYmmdd-HHMM>.json``; the results root is always passed in (the command
decides it, see ``fused_lora.bench.command``): nothing here guesses where a checkout is.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

__all__ = ["ENV_KEYS", "ROW_KEYS", "row_problem", "validate_env", "validate_results", "ResultsFile",
           "device_slug", "results_path", "find_newest_results"]

ENV_KEYS = ("device", "torch", "triton", "cuda", "commit")
ROW_KEYS = ("bench", "impl", "pass", "M", "K", "N", "r", "dtype", "median_ms", "tflops", "peak_mem_mb")
RESULTS_STEM = r"\d{8}-\d{4}(-\d+)?"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def results_path(root: Path, device_name: str, stamp: str) -> Path:
    """``root/<device slug>/<stamp>.json``, or ``<stamp>-1.json``, ``-2``, ... when that file exists already."""
    out_dir = Path(root) / device_slug(device_name)
    path, suffix = out_dir / f"{stamp}.json", 1
    while path.exists():
        path, suffix = out_dir / f"{stamp}-{suffix}.json", suffix + 1
    return path


def _is_results_file(path: Path) -> bool:
    """Whether ``path`` holds a results file of this schema (its env valid), not e.g. the offline instrument's JSON
    that shares the name pattern (bench/results/offline/)."""
    try:
        validate_env(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError, TypeError):  # not JSON (JSONDecodeError), or not an object
        return False
    return True


def find_newest_results(path: Path) -> Path:
    """The newest results JSON: ``path`` itself if it is a file, else the newest ``YYYYmmdd-HHMM[-N].json`` under it
    that is a results file of this schema (by stamp, then N as a number, then modification time)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [p for p in path.rglob("*.json") if re.fullmatch(RESULTS_STEM, p.stem)] if path.is_dir() else []
    candidates = [p for p in candidates if _is_results_file(p)]
    if not candidates:
        raise FileNotFoundError(f"no results JSON (YYYYmmdd-HHMM.json) under {path}; run `python -m fused_lora bench "
                                "--output DIR` to write one")

    def order(p: Path):
        stamp, _, suffix = p.stem.partition("-")[2].partition("-")
        return p.stem[:8], stamp, int(suffix or 0), p.stat().st_mtime

    return max(candidates, key=order)


# ----------------------------------------------------------------------------------------------------------------
# Schema


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_problem(row: dict) -> str | None:
    """What makes one results row break the schema of DESIGN.md, or None when it follows it."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        return f"({row.get('bench')}/{row.get('impl')}) lacks {missing}"
    for key in ("bench", "impl", "pass", "dtype"):
        if not isinstance(row[key], str):
            return f"{key} must be a string, got {row[key]!r}"
    for key in ("M", "K", "N", "r"):
        if not isinstance(row[key], int) or isinstance(row[key], bool):
            return f"{key} must be an int, got {row[key]!r}"
    for key in ("median_ms", "tflops", "peak_mem_mb"):
        if row[key] is not None and not (_is_number(row[key]) and math.isfinite(row[key])):
            return f"{key} must be a finite number or null, got {row[key]!r}"
    if row["median_ms"] is None or row["median_ms"] <= 0:
        return f"median_ms must be positive, got {row['median_ms']!r}"
    return None


def validate_env(data: dict) -> None:
    """Raise ValueError when the env or the results list of ``data`` does not follow the schema: env has exactly
    the keys of ``ENV_KEYS``, each a string (or null where the run had no Triton or no CUDA)."""
    env = data.get("env")
    if not isinstance(env, dict) or set(env) != set(ENV_KEYS):
        got = sorted(env) if isinstance(env, dict) else env
        raise ValueError(f"results: env must have exactly the keys {list(ENV_KEYS)}; got {got}")
    wrong = [k for k, v in env.items() if not (isinstance(v, str) or (v is None and k in ("triton", "cuda")))]
    if wrong:
        raise ValueError(f"results: env values must be strings; {wrong} are not")
    if not isinstance(data.get("results"), list):
        raise ValueError("results: 'results' must be a list of rows")


def validate_results(data: dict) -> None:
    """Raise ValueError when ``data`` does not follow the results schema of DESIGN.md."""
    validate_env(data)
    for i, row in enumerate(data["results"]):
        problem = row_problem(row)
        if problem:
            raise ValueError(f"results row {i}: {problem}")


def _strict_json(value):
    """``value`` with every non-finite float (extra fields such as rel_err or losses can hold one) written as the
    string 'nan', 'inf' or '-inf', so that the file is strict JSON (json.dumps would write NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


class ResultsFile:
    """The run's results: with a ``path``, a JSON file rewritten after every row so that an interrupted run keeps its
    measurements; with ``path=None``, kept in memory only (``data``) and never written."""

    def __init__(self, path: Path | None, env: dict, config: dict):
        validate_env({"env": env, "results": []})
        self.path = Path(path) if path is not None else None
        self.data = {"env": env, "config": config, "roofline": {}, "results": [], "skipped": []}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, row: dict):
        """Append ``row``; a row that breaks the schema goes to ``skipped`` with the problem instead."""
        problem = row_problem(row)
        if problem:
            what = {k: row.get(k) for k in ("bench", "impl", "pass", "M", "K", "N", "r") if k in row}
            self.skip(what, f"row breaks the results schema: {problem}")
            return
        self.data["results"].append(row)
        self.flush()

    def skip(self, what: dict, reason: str):
        self.data["skipped"].append({**what, "reason": reason})
        self.flush()

    def flush(self):
        if self.path is None:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_strict_json(self.data), indent=1, allow_nan=False))
        tmp.replace(self.path)
