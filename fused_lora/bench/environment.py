"""What a results file records about the run's machine and code: device, torch / Triton / CUDA versions, and the
commit of the fused-lora source that was measured."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["source_checkout", "git_commit", "collect_env"]


def source_checkout() -> Path:
    """The folder that holds the ``fused_lora`` package being run (its checkout, for a source or editable install).

    It is only read (``git_commit`` asks git about it); results are never written there unless ``--output`` says so.
    """
    return Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """HEAD of the measured source (with '+dirty' when tracked files changed), else $FUSED_LORA_COMMIT, else 'unknown'.

    Git is asked only when ``source_checkout()`` itself holds ``.git``: a copy of the tree without it (what a GPU
    machine gets) placed inside some other repository must not record that repository's HEAD.
    """
    root = source_checkout()
    fallback = os.environ.get("FUSED_LORA_COMMIT") or "unknown"
    if not (root / ".git").exists():
        return fallback
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def collect_env(device: torch.device) -> dict:
    """The results file's ``env``: {"device", "torch", "triton" (None without Triton), "cuda" (None on a CPU build),
    "commit"}."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }
