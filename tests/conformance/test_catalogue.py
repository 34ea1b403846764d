"""The conformance suite: every registered catalogue entry, every check group (attnlab/conformance.py).

Parametrized over ``attnlab.mechanisms()`` at collection time, so registering an entry enrolls it.
A failure message lists each failing check with its measured error and tolerance.
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch

import attnlab
from attnlab import conformance as C
from attnlab import native
from attnlab import reference as R
from attnlab.catalogue import PATTERNS, Implementation, Mechanism, Param
from attnlab.patterns import executor

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = [m.name for m in attnlab.mechanisms()]


@functools.lru_cache(maxsize=None)
def results(name: str, group: str) -> tuple:
    return tuple(C.run_checks(attnlab.mechanism(name), groups=[group]))


def _failures(rs) -> str:
    bad = [r for r in rs if not r.ok]
    return "\n".join(f"  {r.name}: {r.detail}" for r in bad[:40]) + (f"\n  ... {len(bad) - 40} more" if len(bad) > 40
                                                                       else "")


@pytest.mark.parametrize("group", C.GROUPS)
@pytest.mark.parametrize("name", NAMES)
def test_conformance(name, group):
    rs = results(name, group)
    assert rs, f"{name}: the {group} checks produced no result at all"
    assert all(r.ok for r in rs), f"{name}: {group} checks failed:\n{_failures(rs)}"
    m = attnlab.mechanism(name)
    if (group == "causality" and not any(p.startswith("causal") for p in m.patterns)
            or group == "forms" and m.recurrence is None):
        assert len(rs) == 1 and rs[0].skipped
        pytest.skip(rs[0].detail)
    assert any(not r.skipped for r in rs), f"{name}: every {group} check was skipped:\n" + "\n".join(
        f"  {r.name}: {r.detail}" for r in rs[:10])


@pytest.mark.parametrize("name", NAMES)
def test_enrolled(name):
    """Examples, a reference, and for every declared pattern at least one check that really ran."""
    m = attnlab.mechanism(name)
    assert m.examples, f"{name} has no examples, so the conformance suite cannot check it"
    assert m.reference_impl in m.impl_names, f"{name} has no reference implementation '{m.reference_impl}'"
    assert m.patterns, f"{name} declares no pattern"
    fwd = results(name, "forward")
    for pattern in m.patterns:
        ran = [r for r in fwd if r.pattern == pattern and not r.skipped]
        assert ran, f"{name}: every forward check of the declared pattern {pattern} was skipped"
        fast = [r for r in ran if r.impl != m.reference_impl]
        assert fast or m.impl_names == (m.reference_impl,), (
            f"{name}: no implementation besides the reference was checked on {pattern}")


@pytest.mark.parametrize("name", [n for n in NAMES if attnlab.mechanism(n).spec is not None])
def test_small_blocks(name, monkeypatch):
    """The block-sparse paths with many tiles: the examples (L <= 128) fit one 128-block otherwise."""
    monkeypatch.setattr(executor, "BLOCK", 8)
    m = attnlab.mechanism(name)
    impls = [i for i in ("tiled", "flex") if i in m.impl_names]
    rs = C.run_checks(m, groups=["forward", "gradients"], impls=impls)
    assert all(r.ok for r in rs), f"{name} with 8x8 blocks:\n{_failures(rs)}"
    assert any(r.impl == "tiled" and r.group == "gradients" and not r.skipped for r in rs)


# --------------------------------------------------------------------------------------------
# The checks themselves: contract, inputs, and that they catch broken implementations
# --------------------------------------------------------------------------------------------
def test_example_inputs_contract():
    m = attnlab.mechanism("relative_bias")
    x = C.example_inputs(m, 0, "noncausal_self")
    q, k, v, params = x
    assert q.shape == (2, 4, 37, 8) and k.shape == (2, 2, 37, 8) and v.shape == (2, 2, 37, 6)
    assert q.dtype == torch.float64 and not x.causal
    assert params["table"].shape == (4, 9) and params["table"].dtype == torch.float64  # callable got Hq = 4
    x = C.example_inputs(m, 0, "causal_cross", dtype=torch.float32, gqa=False)
    assert x.q.shape == (2, 4, 23, 8) and x.k.shape == (2, 4, 37, 8) and x.causal and x.q.dtype == torch.float32
    # same seed, same numbers whatever the dtype
    a = C.example_inputs(m, 0, "noncausal_self", seed=3)
    b = C.example_inputs(m, 0, "noncausal_self", dtype=torch.float32, seed=3)
    assert torch.equal(a.q.float(), b.q) and torch.equal(a.params["table"].float(), b.params["table"])
    assert not torch.equal(a.q, C.example_inputs(m, 0, "noncausal_self", seed=4).q)
    s = C.example_inputs(attnlab.mechanism("neighborhood"), 1, "noncausal_self")
    assert s.q.shape == (2, 4, 6, 7, 8) and s.spatial == (6, 7)
    assert C.example_inputs(attnlab.mechanism("document"), 0, "noncausal_self").q.shape[2] == 37
    with pytest.raises(ValueError, match="cross"):
        C.example_inputs(attnlab.mechanism("window"), 0, "noncausal_cross")


def test_run_checks_contract():
    rs = C.run_checks("prefix_lm", groups=["forward", "bad_input"], impls=["tiled"])
    assert rs and all(isinstance(r, C.CheckResult) for r in rs)
    assert {r.group for r in rs} == {"forward", "bad_input"}
    assert {r.impl for r in rs if r.group == "forward"} == {"tiled"}
    for r in rs:
        assert isinstance(r.name, str) and isinstance(r.ok, bool) and r.detail and isinstance(r.skipped, bool)
    fwd = [r for r in rs if r.group == "forward"]
    assert all("tol" in r.detail for r in fwd)
    order = [C.GROUPS.index(r.group) for r in rs]
    assert order == sorted(order)  # grouped in GROUPS order
    before = os.environ.get("ATTNLAB_FLEX_COMPILE")
    rs = C.run_checks("prefix_lm", groups=["determinism"], impls=["flex"], flex_compile=False)
    assert rs and all(r.ok and not r.skipped for r in rs)
    assert os.environ.get("ATTNLAB_FLEX_COMPILE") == before
    with pytest.raises(ValueError, match="impls must be among"):
        C.run_checks("prefix_lm", impls=["bogus"])
    with pytest.raises(ValueError, match="groups must be among"):
        C.run_checks("prefix_lm", groups=["bogus"])


def test_skipped_checks_say_why():
    rs = C.run_checks("alibi", groups=["gradients"], impls=["sdpa", "flex"])
    assert rs and all(r.skipped and r.ok for r in rs)
    assert all("score modifier" in r.detail or "inference-only" in r.detail for r in rs)


def _broken(run, name="broken", **kw) -> Mechanism:
    return Mechanism(name=name, family="test", paper="-", summary="-", formula="-", layout="sequence",
                     patterns=PATTERNS, impls=(Implementation("fast", run), executor.REFERENCE), **kw)


def test_checks_catch_a_future_leak():
    """An implementation that ignores causal=True fails forward and both causality checks."""
    leaky = _broken(lambda call, q, k, v: R.attention(q, k, v, scale=call.scale))
    rs = C.run_checks(leaky, groups=["forward", "causality"], impls=["fast"])
    failed = {r.name.split("/")[0] for r in rs if not r.ok}
    assert {"forward.float64", "causality.prefix", "causality.perturb"} <= failed
    assert all(r.ok for r in rs if r.pattern.startswith("noncausal"))


def test_checks_catch_wrong_gqa_and_nan_swallowing():
    def wrong_gqa(call, q, k, v):  # repeat instead of repeat_interleave, and NaN rows turned into zeros
        g = q.shape[1] // k.shape[1]
        out = R.attention(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), causal=call.causal, scale=call.scale)
        return torch.nan_to_num(out)

    rs = C.run_checks(_broken(wrong_gqa), groups=["gqa", "nan"], impls=["fast"])
    failed = {r.name.split("/")[0] for r in rs if not r.ok}
    assert {"gqa.gqa", "nan.query_row"} <= failed
    assert all(r.ok for r in rs if r.name.startswith("gqa.mha"))


def test_checks_catch_missing_validation_and_batch_mixing():
    def batch_mix(call, q, k, v):
        out = R.attention(q, k, v, causal=call.causal, scale=call.scale)
        return out + 1e-6 * out.mean(0, keepdim=True)

    m = _broken(batch_mix, params=(Param("window", "int", 3, "a window", ge=1),), examples=({"window": 2},))
    rs = C.run_checks(m, groups=["batch", "bad_input"], impls=["fast"])
    assert any(not r.ok for r in rs if r.group == "batch")
    assert all(r.ok for r in rs if r.group == "bad_input"), _failures(rs)
    assert any(r.name.startswith("bad_input.ge_window") for r in rs)


def test_entry_without_examples_or_reference_fails():
    rs = C.run_checks(_broken(lambda call, q, k, v: q, examples=()))
    assert len(rs) == 1 and not rs[0].ok and "no examples" in rs[0].detail
    m = Mechanism(name="noref", family="test", paper="-", summary="-", formula="-", layout="sequence",
                  patterns=PATTERNS, impls=(Implementation("fast", lambda call, q, k, v: q),))
    rs = C.run_checks(m)
    assert len(rs) == 1 and not rs[0].ok and "reference" in rs[0].detail


# --------------------------------------------------------------------------------------------
# The public catalogue API
# --------------------------------------------------------------------------------------------
def test_mechanisms_listing_and_filters():
    ms = attnlab.mechanisms()
    names = [m.name for m in ms]
    assert len(names) == len(set(names))
    for must in ("dense", "tiled", "sliding_window", "neighborhood", "gna", "window", "shifted_window", "halo",
                 "grid", "sink_window", "shifted_sparse", "head_sharded", "strided", "prefix_lm", "document",
                 "tile3d", "segment_stream", "alibi", "relative_bias", "softcap"):
        assert must in names
    families = {m.family for m in ms}
    for fam in families:
        got = attnlab.mechanisms(family=fam)
        assert got and all(m.family == fam for m in got)
        assert {m.name for m in got} == {m.name for m in ms if m.family == fam}
    for pattern in PATTERNS:
        got = attnlab.mechanisms(pattern=pattern)
        assert {m.name for m in got} == {m.name for m in ms if pattern in m.patterns}
    both = attnlab.mechanisms(family="structured", pattern="causal_cross")
    assert both and all(m.family == "structured" and "causal_cross" in m.patterns for m in both)
    assert "neighborhood" not in {m.name for m in both}
    with pytest.raises(ValueError, match="family must be one of.*structured"):
        attnlab.mechanisms(family="bogus")
    with pytest.raises(ValueError, match="pattern must be one of.*noncausal_self"):
        attnlab.mechanisms(pattern="causal")


def test_mechanism_lookup_errors():
    assert attnlab.mechanism("neighborhood").name == "neighborhood"
    with pytest.raises(KeyError, match="neighborhood"):
        attnlab.mechanism("neighbourhood")
    with pytest.raises(KeyError, match="sliding_window"):
        attnlab.mechanism("sliding_windw")
    with pytest.raises(KeyError, match="no mechanism named"):
        attnlab.mechanism("zzzzzzzz")
    with pytest.raises(TypeError, match="string"):
        attnlab.mechanism(3)


@pytest.mark.parametrize("name", NAMES)
def test_capability_data(name):
    m = attnlab.mechanism(name)
    assert isinstance(m.name, str) and m.name == name
    assert isinstance(m.family, str) and m.family
    assert isinstance(m.paper, str) and m.paper
    assert m.formula and m.summary
    assert m.layout in ("sequence", "spatial")
    assert m.patterns and set(m.patterns) <= set(PATTERNS)
    assert all(isinstance(p, Param) and p.name and p.kind and p.describe() for p in m.params)
    assert len({p.name for p in m.params}) == len(m.params)
    assert m.impl_names and len(set(m.impl_names)) == len(m.impl_names)
    json.dumps(m.as_dict())  # capability data is plain data


def test_impl_choice_errors():
    m = attnlab.mechanism("sliding_window")
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="impl must be one of.*tiled"):
        m(q, q, q, impl="bogus", window=4)
    with pytest.raises(TypeError, match="impl"):
        m(q, q, q, impl=1, window=4)
    # an explicit implementation that cannot serve the call raises instead of falling back
    qg = q.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="impl='flex' cannot serve.*inference-only"):
        m(qg, q, q, impl="flex", window=4)
    with pytest.raises(ValueError, match="impl='sdpa' cannot serve.*log-sum-exp"):
        m(q, q, q, impl="sdpa", return_lse=True, window=4)
    with pytest.raises(ValueError, match="impl='flex' cannot serve.*float64"):
        m(q.double(), q.double(), q.double(), impl="flex", window=4)
    with pytest.raises(ValueError, match="impl='sdpa' cannot serve.*score modifier"):
        attnlab.mechanism("softcap")(q, q, q, impl="sdpa", cap=5.0)
    # the automatic choice serves the call with the first capable implementation, and says which
    assert m.select(m.prepare(qg, q, q, window=4)).name == ("native" if native.unavailable() is None else "tiled")
    soft = attnlab.mechanism("softcap")  # a score modifier: neither C++ kernel serves it, flex is inference-only
    assert soft.select(soft.prepare(qg, q, q, cap=5.0)).name == "tiled"
    out, lse = m(q, q, q, return_lse=True, window=4)
    assert lse.shape == (1, 2, 16) and out.shape == q.shape
