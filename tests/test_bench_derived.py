"""Derived results of a run: CAB's efficiency length (quadratic fit to SDPA, linear fit to the
mechanism, their crossing) on cost curves with a known answer, and which configurations get one."""
from __future__ import annotations

import math

import pytest

from attnlab.bench import cases as bcases
from attnlab.bench.runner import Result, derived, efficiency_length, efficiency_lengths

LENGTHS = [1024, 2048, 4096, 8192]


def _dense(L):
    return 1e-6 * L * L + 1e-4 * L + 0.01


def test_crossing_of_exact_quadratic_and_line():
    mech = [5e-4 * L + 0.2 for L in LENGTHS]
    fit = efficiency_length(LENGTHS, [_dense(L) for L in LENGTHS], mech)
    # 1e-6 L^2 + (1e-4 - 5e-4) L + (0.01 - 0.2) = 0  ->  the positive root
    want = (4e-4 + math.sqrt(4e-4 ** 2 + 4 * 1e-6 * 0.19)) / (2 * 1e-6)
    assert fit["value"] == pytest.approx(want, rel=1e-6)
    assert not fit["within_measured"]  # ~680 tokens: below the measured 1K-8K, an extrapolation
    assert fit["dense_fit"] == pytest.approx([1e-6, 1e-4, 0.01], rel=1e-6, abs=1e-12)
    assert fit["mechanism_fit"] == pytest.approx([5e-4, 0.2], rel=1e-6)
    # a costlier line crosses later, inside the measured range
    fit = efficiency_length(LENGTHS, [_dense(L) for L in LENGTHS], [3e-3 * L + 0.5 for L in LENGTHS])
    assert 1024 < fit["value"] < 8192 and fit["within_measured"]
    assert _dense(fit["value"]) == pytest.approx(3e-3 * fit["value"] + 0.5, rel=1e-6)


def test_no_crossing_cases():
    dense = [_dense(L) for L in LENGTHS]
    always = efficiency_length(LENGTHS, dense, [1e-5 * L for L in LENGTHS])  # cheaper at every length
    assert always["value"] == 0.0 and "every length" in always["reason"]
    flat = efficiency_length(LENGTHS, [0.5 - 1e-9 * L * L for L in LENGTHS], [1e-4 * L for L in LENGTHS])
    assert flat["value"] is None and "not convex" in flat["reason"]


def _result(case, t, density=None):
    m = {"time_median_s": (t, "s")}
    if density is not None:
        m["density"] = (density, "fraction")
    return Result(case, metrics=m)


def test_which_configurations_get_an_efficiency_length():
    res = []
    for name, density, cost in (("sliding_window", 0.1, lambda L: 4e-4 * L), ("dense", 1.0, _dense),
                                ("tiled", 1.0, lambda L: 3 * _dense(L))):
        for c in bcases.expand([name], LENGTHS, ["fwd"], heads=2, head_dim=16):
            res.append(_result(c, cost(c.kv_len), density))
            res.append(_result(c.baseline(), _dense(c.kv_len), 1.0))
    res.append(_result(bcases.expand(["sliding_window"], [512], ["fwd"], heads=2, head_dim=16)[0], 1.0, 0.9))
    rows = efficiency_lengths(res)
    # only the mechanism computing at most half the pairs at its longest length; SDPA never against itself
    assert {(r["group"]["mechanism"], r["name"]) for r in rows} == {("sliding_window", "efficiency_length_time")}
    (row,) = rows
    assert row["detail"]["lengths"] == LENGTHS  # the 512-token case has no SDPA baseline: left out
    assert row["value"] == pytest.approx(efficiency_length(LENGTHS, [_dense(L) for L in LENGTHS],
                                                           [4e-4 * L for L in LENGTHS])["value"])
    assert row["unit"] == "tokens"
    # derived() = slopes + efficiency lengths; a time slope of SDPA's quadratic is close to 2 at long lengths
    slope = next(d for d in derived(res) if d["name"] == "slope_time_vs_L" and d["group"]["mechanism"] == "torch_sdpa")
    assert 1.5 < slope["value"] < 2.0
