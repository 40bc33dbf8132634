"""What a run folder records about where it came from: git commit, package versions, device."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata

from pathlib import Path

PACKAGES = ("torch", "torchvision", "numpy", "pandas", "papermill", "hdkdlib")


def code_root() -> Path:
    """The checkout this code runs from (HDKD_ROOT may put run folders and data elsewhere: not the code)."""
    return Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The commit of the code that runs (+dirty when its files differ from it), or "unknown" outside a checkout."""
    try:
        root = code_root()
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        # results/ holds metrics that runs write into a checkout: they do not make the code a run used dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device) -> str:
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
