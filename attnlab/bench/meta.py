"""Run metadata: what produced a result (code, versions, machine, settings), for the ``runs`` table."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

import attnlab

from .store import now

#: Environment variables that change what a benchmark measures.
ENV_VARS = ("ATTNLAB_FLEX_COMPILE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR",
            "TORCH_COMPILE_DISABLE", "TORCHINDUCTOR_FREEZING")


def git_state(path: Optional[Path] = None) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding attnlab, or (None, None) outside one."""
    path = path or Path(attnlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[str]:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def run_metadata(*, seed: int, preset: Optional[str], argv: Sequence[str], config: Dict[str, Any]) -> Dict[str, Any]:
    commit, dirty = git_state()
    return {
        "started": now(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else int(dirty),
        "attnlab_version": attnlab.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "preset": preset,
        "argv": list(argv),
        "config": config,
        "torch_config": torch.__config__.show(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "loadavg": loadavg(),
    }
