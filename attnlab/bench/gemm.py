"""This machine's GEMM throughput, measured in the run: the denominator of "fraction of peak".

At the start of a run, for each dtype of the plan and the run's torch threads, a short
``torch.mm`` benchmark of square ``n x n`` matrices: ``n`` doubles from :data:`MIN_N` until one
call takes at least :data:`TARGET_S` (or reaches :data:`MAX_N`), then one untimed call and
:data:`REPEATS` timed ones. (Starting at 512 keeps thread start-up and call overhead, which
dominate small products, out of the number.) ``GEMM GFLOP/s = 2 n^3 / fastest / 1e9``: the
throughput the machine attains, so the fastest call, not the median (slow calls, from another
process or a clock change, moved the median on this project's 2-core machine between 101 and 196
GFLOP/s across runs; in six fresh processes the fastest of nine gave 185-192, the median 171-190).
A case's
``gemm_peak_fraction`` is its effective GFLOP/s (:mod:`attnlab.bench.flops`) over this number:
the share of the machine's dense matrix-multiply speed that the mechanism turns into useful
attention work. The samples, ``n`` and the threads are stored with the run (``calibration``).

The second roof is memory: :func:`bandwidth` copies a :data:`COPY_BYTES` buffer (far beyond any
last-level cache) with ``Tensor.copy_`` on the run's threads, :data:`REPEATS` timed calls after one
untimed, and takes ``bytes read + bytes written`` over the fastest. A case's
``roofline_fraction`` (:mod:`attnlab.bench.runner`) divides the time the two roofs allow,
``max(FLOPs / GEMM, bytes / bandwidth)``, by its measured time: for a mechanism with a few FLOPs
per byte (aaren's scan, RAT's short sequences) it says how near memory speed it runs, where the
GEMM fraction alone cannot (Williams, Waterman and Patterson's roofline model).
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

TARGET_S = 0.02
MIN_N = 512
MAX_N = 2048
REPEATS = 9
COPY_BYTES = 256 * 2 ** 20


def measure(dtype: torch.dtype, *, target_s: float = TARGET_S, max_n: int = MAX_N,
            repeats: int = REPEATS) -> Dict[str, Any]:
    """``{"gflops", "n", "samples", "threads"}`` of ``torch.mm`` at ``dtype`` on the current threads."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"gemm.measure: dtype must be a floating torch.dtype, got {dtype!r}")
    gen = torch.Generator().manual_seed(0)

    def timed(a, b) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t0

    with torch.no_grad():
        n = MIN_N
        while True:
            a = torch.randn(n, n, generator=gen).to(dtype)
            b = torch.randn(n, n, generator=gen).to(dtype)
            timed(a, b)  # first call: allocation, library warm-up
            if n >= max_n or timed(a, b) >= target_s:
                break
            n *= 2
        samples = [timed(a, b) for _ in range(repeats)]
    return {"gflops": 2.0 * n ** 3 / min(samples) / 1e9, "n": n, "samples": samples, "threads": torch.get_num_threads()}


def bandwidth(*, nbytes: int = COPY_BYTES, repeats: int = REPEATS) -> Dict[str, Any]:
    """``{"gbytes", "bytes", "samples", "threads"}``: memory copy GB/s (read + write) on the current threads."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"gemm.bandwidth: nbytes must be >= 4 and repeats >= 1, got {nbytes}, {repeats}")
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first call: pages faulted in

    def timed() -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0

    samples = [timed() for _ in range(repeats)]
    moved = 2 * src.numel() * 4
    return {"gbytes": moved / min(samples) / 1e9, "bytes": moved, "samples": samples,
            "threads": torch.get_num_threads()}


__all__ = ["measure", "bandwidth", "TARGET_S", "MIN_N", "MAX_N", "REPEATS", "COPY_BYTES"]
