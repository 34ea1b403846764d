"""Run metadata: what produced a result (code, versions, machine, settings), for the ``runs`` table,
and who writes a run (:func:`owner`, :func:`alive`: what lets a restarted command resume a killed run
without ever taking over one that is still being written)."""
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
ENV_VARS = ("ATTNLAB_FLEX_COMPILE", "ATTNLAB_NATIVE", "ATTNLAB_BENCH_MALLOC", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "TORCHINDUCTOR_CACHE_DIR", "TORCH_COMPILE_DISABLE", "TORCHINDUCTOR_FREEZING", "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")

#: glibc mallopt settings of a benchmark process (see :func:`tune_malloc`).
_MALLOC_SETTINGS = {"M_MMAP_THRESHOLD": (-3, 1 << 30), "M_TRIM_THRESHOLD": (-1, (1 << 31) - 1)}
_MALLOC: Dict[str, Any] = {}


def tune_malloc() -> Dict[str, Any]:
    """Make glibc keep freed memory for reuse instead of returning every large block to the OS.

    By default glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh
    mapping and unmaps it on free, so every call that allocates a large output pays a page fault
    per 4 KiB page: about 3-4 GB/s on this project's VM, which at L=32K costs more than some
    kernels' arithmetic. Production PyTorch CPU deployments avoid this with jemalloc/tcmalloc;
    the benchmark raises the thresholds instead (same effect, nothing to install), once for the
    whole run, so every case, the SDPA baseline included, is measured alike. The setting is
    recorded in the run's metadata; ``ATTNLAB_BENCH_MALLOC=default`` leaves glibc as it is.
    """
    if _MALLOC:
        return _MALLOC
    if os.environ.get("ATTNLAB_BENCH_MALLOC", "tuned") == "default":
        _MALLOC["mode"] = "default (ATTNLAB_BENCH_MALLOC=default)"
        return _MALLOC
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        done = {name: value for name, (param, value) in _MALLOC_SETTINGS.items() if libc.mallopt(param, value) == 1}
        _MALLOC.update(mode="tuned", **done)
    except (OSError, AttributeError):  # not glibc
        _MALLOC["mode"] = "default (no glibc mallopt)"
    return _MALLOC


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


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> Optional[int]:
    """A live process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None when
    there is no such process, it is a zombie (exited, not yet reaped), or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner() -> Dict[str, Any]:
    """Who writes a run: this machine (host name and boot id) and this process (pid and start time)."""
    return {"host": platform.node(), "boot_id": _boot_id(), "pid": os.getpid(), "pid_start": _start_time(os.getpid())}


def alive(who: Dict[str, Any]) -> bool:
    """Whether the writer ``who`` (an :func:`owner` record) may still be running.

    Dead for sure: same host, and another boot, or no such process, or a process with that pid
    that started at another time (the pid was reused). A writer on another host is taken as alive
    (nothing here can tell), so its run is never taken over from here."""
    if who.get("host") != platform.node():
        return True
    if who.get("boot_id") and _boot_id() and who["boot_id"] != _boot_id():
        return False
    pid = who.get("pid")
    if not isinstance(pid, int):
        return False
    if not os.path.isdir("/proc/self"):  # no procfs: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = _start_time(pid)
    return started is not None and (who.get("pid_start") is None or started == who["pid_start"])


def native_state() -> str:
    """Whether attnlab's C++ kernels were in use, or why not."""
    from attnlab import native

    return native.unavailable() or "built"


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
        # the environment variables that change measurements, and two settings of the process
        "env": {**{k: os.environ[k] for k in ENV_VARS if k in os.environ}, "malloc": dict(_MALLOC) or None,
                "attnlab_native": native_state()},
        "loadavg": loadavg(),
    }
