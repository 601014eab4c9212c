"""What machine a measurement ran on: written into every result file beside the numbers."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's model name (lscpu, then /proc/cpuinfo, then platform.processor())."""
    for line in _run(["lscpu"]).splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state(dirty_paths: list[str] | tuple[str, ...] | None = None) -> dict:
    """The commit of the checkout this package is imported from, and whether tracked files differ from it
    (only `dirty_paths`, relative to the checkout, when given). Empty outside a checkout (an installed
    package), so that no unrelated repository around site-packages is reported."""
    if not (_CHECKOUT / ".git").exists():
        return {}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=_CHECKOUT)
    if not commit:
        return {}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", *(dirty_paths or [])], cwd=_CHECKOUT)
    return {"git_commit": commit, "git_dirty": bool(status)}


def machine_info(torch_threads: int | None = None, dirty_paths: list[str] | tuple[str, ...] | None = None) -> dict:
    """CPU model, cores, torch threads (the current setting unless given), library versions, load average and,
    in a checkout, the git commit and whether the tree was dirty."""
    import numpy
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch_threads": int(torch_threads if torch_threads is not None else torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import zstandard

        info["zstandard"] = zstandard.__version__
    except ImportError:
        pass
    info.update(git_state(dirty_paths))
    return info
