"""The stateful API shared by every linear/recurrent entry (attnlab/recurrent.py).

Parametrized over the catalogue entries that have a recurrence, so a new one is enrolled automatically:
long bfloat16 sequences stay finite in every form, the state does not grow with the context,
and misuse of ``scan``/``step`` raises errors naming the argument.
"""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.recurrent import State, token_params

pytestmark = pytest.mark.usefixtures("single_thread")

#: Entries with a causal recurrence (scan/step continue causal sequences; non-causal-only entries such as
#: rala test their long-sequence behaviour in their own files).
STATEFUL = [m.name for m in attnlab.mechanisms() if m.recurrence is not None and "causal_self" in m.patterns]
LONG = 65_536


def _params(m, B, H, L, D, seed=0):
    """Per-token tensors an entry needs at length L (``extras['random_params']``), else its defaults."""
    make = m.extras.get("random_params")
    return make(B, H, L, D, torch.Generator().manual_seed(seed)) if make else {}


def _qkv(B, H, L, D, dtype, seed=0, m=None):
    """Random q, k, v; one query per (batch, head) repeated along L for entries declaring ``shared_query``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3)]
    if m is not None and m.extras.get("shared_query"):
        q = q[:, :, :1].expand_as(q)
    return q, k, v


def test_enrolled():
    assert {"linear", "lightning", "retention"} <= set(STATEFUL)


@pytest.mark.parametrize("name", STATEFUL)
def test_long_bfloat16_stays_finite(name):
    """Issue 3: no NaN or Inf at L = 65,536 in bfloat16 on random inputs, for every form."""
    m = attnlab.mechanism(name)
    B, H, D, tail = 1, 2, 16, 96
    q, k, v = _qkv(B, H, LONG, D, torch.bfloat16, m=m)
    params = _params(m, B, H, LONG, D)
    whole, state = m.scan(q, k, v, impl="chunked", **params)
    assert whole.dtype == torch.bfloat16 and whole.isfinite().all(), f"{name}: chunked form not finite"
    assert state.length == LONG
    assert all(t.isfinite().all() for t in state.tensors.values())
    # The recurrent form continues the chunked state over the tail.
    head, rest = token_params(m, params, slice(0, LONG - tail)), token_params(m, params, slice(LONG - tail, None))
    _, mid = m.scan(q[:, :, :-tail], k[:, :, :-tail], v[:, :, :-tail], impl="chunked", **head)
    out_tail, _ = m.scan(q[:, :, -tail:], k[:, :, -tail:], v[:, :, -tail:], mid, impl="recurrent", **rest)
    assert out_tail.isfinite().all(), f"{name}: recurrent form not finite after {LONG - tail} tokens"
    torch.testing.assert_close(out_tail.float(), whole[:, :, -tail:].float(), atol=0.1, rtol=0.1)
    # The parallel form on the last queries against every key (causal cross, bottom-right).
    if "causal_cross" in m.patterns:
        last = m(q[:, :, -64:], k, v, causal=True, impl="parallel", **params)
        assert last.isfinite().all(), f"{name}: parallel form not finite"
        torch.testing.assert_close(last.float(), whole[:, :, -64:].float(), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", STATEFUL)
def test_state_does_not_grow(name):
    """The recurrent state after 1,000 tokens holds as many numbers as after 100 (unless declared)."""
    m = attnlab.mechanism(name)
    sizes = []
    for L in (100, 1000):
        q, k, v = _qkv(1, 2, L, 16, torch.float32, m=m)
        _, state = m.scan(q, k, v, impl="chunked", **_params(m, 1, 2, L, 16))
        sizes.append(state.floats)
    if m.extras.get("state_grows"):
        pytest.skip(f"{name}: {m.extras['state_grows']}")
    assert sizes[0] == sizes[1], f"{name}: state grew from {sizes[0]} to {sizes[1]} floats"
    assert m.state_size(2, 16, 16, **{p.name: p.default for p in m.params if p.default is not None}) >= 1


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_misuse_raises_naming_the_argument(name):
    m = attnlab.mechanism(name)
    q, k, v = _qkv(2, 2, 12, 16, torch.float64, m=m)
    params = _params(m, 2, 2, 12, 16)
    _, state = m.scan(q, k, v, **params)
    tok = token_params(m, params, 0)
    with pytest.raises(TypeError, match="state"):
        m.step({"S": 1}, q[:, :, 0], k[:, :, 0], v[:, :, 0], **tok)
    with pytest.raises(ValueError, match="state"):
        m.step(State("not-" + name, state.tensors, 3), q[:, :, 0], k[:, :, 0], v[:, :, 0], **tok)
    with pytest.raises(ValueError, match="state"):  # batch 1 against a batch-2 state
        m.step(state, q[:1, :, 0], k[:1, :, 0], v[:1, :, 0],
               **{n: x[:1] if isinstance(x, torch.Tensor) and x.shape[0] == 2 else x for n, x in tok.items()})
    with pytest.raises(ValueError, match="q_t"):
        m.step(state, q, k[:, :, 0], v[:, :, 0], **tok)
    with pytest.raises(ValueError, match="causal"):
        m.scan(q, k, v, causal=False, **params)
    with pytest.raises(ValueError, match="impl"):
        m.scan(q, k, v, impl="parallel", **params)
    if any(p.name == "offsets" for p in m.params):
        with pytest.raises(ValueError, match="offsets"):
            m(q, k, v, causal=True, offsets=[0, 5, 5], **params)
        with pytest.raises(ValueError, match="offsets"):
            m(q, k, v, causal=True, offsets=[1, 5], **params)
        with pytest.raises(ValueError, match="offsets"):
            m(q[:, :, :6], k, v, causal=True, offsets=[0, 5], **params)


def test_entries_without_recurrence_have_no_step():
    with pytest.raises(TypeError, match="no recurrent form.*linear"):
        attnlab.mechanism("dense").step(None, *torch.randn(3, 1, 1, 4))


@pytest.mark.parametrize("name", STATEFUL)
def test_chunked_spans_equal_the_parallel_form(name):
    """Causal chunked calls longer than a span (recurrent.SPAN tokens) run span by span with the state
    carried; the result is the parallel form's, in float64, with a remainder span too."""
    from attnlab import recurrent

    m = attnlab.mechanism(name)
    L = 2 * recurrent.SPAN + 77
    q, k, v = _qkv(1, 2, L, 16, torch.float64, m=m)
    params = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for n, x in _params(m, 1, 2, L, 16).items()}
    ref = m(q, k, v, causal=True, impl="parallel", **params)
    out = m(q, k, v, causal=True, impl="chunked", **params)
    torch.testing.assert_close(out, ref, atol=1e-9 * max(1.0, float(ref.abs().max())), rtol=0)
