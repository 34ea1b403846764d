"""Peak memory of one call on CPU, measured in the running process (no subprocess, no profiler).

Two numbers, both from one extra run of the case after the timed ones:

``saved_tensor_bytes`` (exact, forward+backward only)
    Bytes of the distinct tensor storages autograd keeps from the forward for the backward,
    recorded by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook (storages are counted
    once however many tensors view them; inputs that are saved count too). This is what an
    implementation holds between forward and backward: O(L) for FlashAttention-style kernels,
    O(L^2) for a materialized attention matrix.

``peak_rss_delta_bytes`` (coarse, both directions)
    The process's peak resident set size during the run minus its resident size just before
    (inputs already allocated). Before the run, freed heap memory is handed back to the OS
    (glibc ``malloc_trim(0)``) so that reused free memory does not hide new allocations. The
    peak is the kernel's high-water mark ``VmHWM`` (reset through ``/proc/self/clear_refs``)
    where Linux allows it, and at least the maximum of ``/proc/self/statm`` sampled every
    millisecond by a background thread (``peak_rss_sampled_delta_bytes``, which can miss spikes
    shorter than the sampling interval). It counts everything the process touches: the
    output, temporaries, allocator overhead and, on a first call, compiled code.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def rss_bytes() -> Optional[int]:
    """Current resident set size (``/proc/self/statm``), or None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory(freeze: bool = False):
    """Collect garbage and return freed heap pages to the OS (glibc only; a no-op elsewhere).

    ``freeze=True`` (between cases, when only long-lived state is alive: modules, caches, compiled
    kernels) then moves every surviving object out of the collector's reach (``gc.freeze``), so
    the next full collections scan only what was created since: after ``torch._dynamo`` is imported
    a full collection over millions of objects takes a large fraction of a second, several times per
    case. Frozen objects are still freed by reference counting (an evicted cache entry goes as usual);
    only a frozen object that later becomes part of a reference cycle would stay allocated."""
    gc.collect()
    if freeze:
        gc.freeze()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def thaw():
    """Undo :func:`release_free_memory`'s freezing (``gc.unfreeze``): after a run, everything is
    again subject to the cyclic collector."""
    gc.unfreeze()


class _Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes() or 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            r = rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


@contextmanager
def _saved_bytes_counter(sink: Dict[str, int]):
    seen = set()

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = (st.data_ptr(), st.nbytes())
            if ptr not in seen:
                seen.add(ptr)
                sink["bytes"] += st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            sink["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure(forward: Callable[[], Any], backward: Optional[Callable[[Any], None]] = None, *,
            interval: float = 0.001) -> Dict[str, Optional[int]]:
    """Run ``backward(forward())`` (or just ``forward()``) once and return ``peak_rss_delta_bytes``,
    ``peak_rss_sampled_delta_bytes`` and, with a backward, ``saved_tensor_bytes`` (counted
    during the forward only)."""
    release_free_memory()
    base = rss_bytes()
    hwm_ok = _reset_hwm()
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(interval / 2)  # let the sampler in promptly while Python code runs
    sampler = _Sampler(interval)
    sink = {"bytes": 0}
    sampler.start()
    try:
        if backward is not None:
            with _saved_bytes_counter(sink):
                out = forward()
            backward(out)
        else:
            forward()
        out = None
    finally:
        sampler.stop()
        sys.setswitchinterval(old_switch)
    end = rss_bytes()
    sampled = max(sampler.peak, end or 0)
    hwm = _hwm_bytes() if hwm_ok else None
    peak = max(sampled, hwm or 0)
    return {
        "peak_rss_delta_bytes": None if base is None else max(0, peak - base),
        "peak_rss_sampled_delta_bytes": None if base is None else max(0, sampled - base),
        "saved_tensor_bytes": sink["bytes"] if backward is not None else None,
    }
