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
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

TARGET_S = 0.02
MIN_N = 512
MAX_N = 2048
REPEATS = 9


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


__all__ = ["measure", "TARGET_S", "MIN_N", "MAX_N", "REPEATS"]
