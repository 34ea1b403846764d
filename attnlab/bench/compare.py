"""``attnlab bench compare RUN_A RUN_B``: which cases got slower (or faster) beyond noise.

Cases of the two runs are matched by their case key (the same mechanism, impl, pattern,
direction, dtype, shapes and parameters); cases of only one run, or not ok in either, are listed
as such. For a matched pair, with ``a`` and ``b`` the raw timed samples of run A and run B:

- ``ratio`` = median(b) / median(a) (above 1: B is slower);
- ``noise`` = the pooled relative spread, ``sqrt(sa^2 + sb^2)`` with ``s = (q3 - q1) / 2 / median``
  of each run's samples (half the interquartile range, relative);
- ``p`` = the one-sided Mann-Whitney U test of "B's samples tend to be larger" (regression) or
  "smaller" (improvement): the exact permutation distribution of U when there are at most
  20,000 ways to split the pooled samples (e.g. up to 8 + 8 samples), else the normal
  approximation with tie correction.

**Rule.** A pair is a *regression* when ``ratio - 1 > max(threshold, noise)`` and ``p < alpha``,
an *improvement* when ``1 / ratio - 1 > max(threshold, noise)`` and its ``p < alpha``, otherwise
*same* (defaults: threshold 5%, alpha 0.05). Both conditions matter: the median must move by more
than the threshold and than the runs' own spread, and the samples must be separated, not just
their medians. With 3 + 3 samples the smallest possible p is 0.05, so at least 4 samples a side
(``--repeats 4``) are needed to flag anything.

``relative=True`` compares each repeat's ratio to the SDPA call timed just before it (the samples
``sdpa_paired_time_s`` stored with every case) instead of raw times, so a change of the whole
machine's speed between the runs cancels (SDPA rows themselves are then skipped).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .store import Store

EXACT_LIMIT = 20_000


@dataclass
class Row:
    key: str
    label: str
    verdict: str  # regression / improvement / same / only in A / only in B / not ok / no samples
    a_median: Optional[float] = None
    b_median: Optional[float] = None
    ratio: Optional[float] = None
    noise: Optional[float] = None
    p: Optional[float] = None
    n: tuple = (0, 0)
    detail: str = ""


def _u(x: Sequence[float], y: Sequence[float]) -> float:
    """Mann-Whitney U of ``y`` over ``x``: pairs with y > x, ties counted 1/2."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    d = ys[None, :] - xs[:, None]
    return float((d > 0).sum() + 0.5 * (d == 0).sum())


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value of "``y`` tends to be larger than ``x``" (Mann-Whitney U).

    Exact (all splits of the pooled samples) when there are at most :data:`EXACT_LIMIT` splits,
    else the normal approximation with tie correction and continuity correction."""
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError(f"mann_whitney_greater needs samples on both sides, got {m} and {n}")
    u = _u(x, y)
    pooled = list(x) + list(y)
    if math.comb(m + n, n) <= EXACT_LIMIT:
        idx = range(m + n)
        hits = total = 0
        for ys in itertools.combinations(idx, n):
            yset = set(ys)
            xs_ = [pooled[i] for i in idx if i not in yset]
            total += 1
            hits += _u(xs_, [pooled[i] for i in ys]) >= u - 1e-12
        return hits / total
    ties = np.unique(pooled, return_counts=True)[1]
    N = m + n
    mean = m * n / 2
    var = m * n / 12 * ((N + 1) - float((ties ** 3 - ties).sum()) / (N * (N - 1)))
    if var <= 0:
        return 1.0
    z = (u - mean - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def _spread(s: Sequence[float]) -> float:
    q1, med, q3 = np.percentile(np.asarray(s, dtype=float), [25, 50, 75])
    return float((q3 - q1) / 2 / med) if med > 0 else 0.0


def judge(a: Sequence[float], b: Sequence[float], threshold: float = 0.05, alpha: float = 0.05) -> Dict[str, Any]:
    """``{"verdict", "ratio", "noise", "p"}`` of samples ``b`` against ``a`` (the module's rule)."""
    ratio = float(np.median(b) / np.median(a))
    noise = math.hypot(_spread(a), _spread(b))
    bar = max(threshold, noise)
    if ratio - 1 > bar:
        p = mann_whitney_greater(a, b)
        verdict = "regression" if p < alpha else "same"
    elif 1 / ratio - 1 > bar:
        p = mann_whitney_greater(b, a)
        verdict = "improvement" if p < alpha else "same"
    else:
        p = min(mann_whitney_greater(a, b), mann_whitney_greater(b, a))
        verdict = "same"
    return {"verdict": verdict, "ratio": ratio, "noise": noise, "p": p}


def _samples(case: Dict[str, Any], relative: bool) -> List[float]:
    t = case["samples"].get("time_s", {}).get("values", [])
    if not relative:
        return list(t)
    base = case["samples"].get("sdpa_paired_time_s", {}).get("values", [])
    n = min(len(t), len(base))
    return [t[i] / base[i] for i in range(n) if base[i] > 0]


def _label(c: Dict[str, Any]) -> str:
    mech = "SDPA (baseline)" if c["mechanism"] == "torch_sdpa" else c["mechanism"]
    if c["grid"]:
        mech += f" {len(c['grid'])}d"
    impl = c["impl_used"] or c["impl"]
    L = f"{c['q_len']}/{c['kv_len']}" if c["q_len"] != c["kv_len"] else str(c["kv_len"])
    return f"{mech} [{impl}] {c['pattern']} {c['direction']} {c['dtype']} L={L}"


def compare(store: Store, run_a: int, run_b: int, *, threshold: float = 0.05, alpha: float = 0.05,
            relative: bool = False) -> List[Row]:
    """One :class:`Row` per case key of either run (see the module doc for the rule)."""
    if not (threshold >= 0 and 0 < alpha < 1):
        raise ValueError(f"threshold must be >= 0 and alpha in (0, 1), got {threshold} and {alpha}")
    a = {c["case_key"]: c for c in store.cases(run_a)}
    b = {c["case_key"]: c for c in store.cases(run_b)}
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        ca, cb = a.get(key), b.get(key)
        c = ca or cb
        if relative and c["mechanism"] == "torch_sdpa":
            continue
        label = _label(c)
        if ca is None or cb is None:
            rows.append(Row(key, label, "only in B" if ca is None else "only in A"))
            continue
        if ca["status"] != "ok" or cb["status"] != "ok":
            rows.append(Row(key, label, "not ok", detail=f"A: {ca['status']}, B: {cb['status']}"))
            continue
        sa, sb = _samples(ca, relative), _samples(cb, relative)
        if not sa or not sb:
            rows.append(Row(key, label, "no samples"))
            continue
        j = judge(sa, sb, threshold, alpha)
        rows.append(Row(key, label, j["verdict"], float(np.median(sa)), float(np.median(sb)), j["ratio"], j["noise"],
                        j["p"], (len(sa), len(sb))))
    return rows


__all__ = ["Row", "compare", "judge", "mann_whitney_greater", "EXACT_LIMIT"]
