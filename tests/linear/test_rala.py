"""``rala``: Rank-Augmented Linear Attention checked against independent computations (attnlab/entries/rala.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab

pytestmark = pytest.mark.usefixtures("single_thread")

IMPLS = ("parallel", "chunked", "recurrent")


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(B=2, H=3, L=21, D=8, Dv=5, Lq=None, seed=0):
    return rnd(B, H, Lq or L, D, seed=seed), rnd(B, H, L, D, seed=seed + 1), rnd(B, H, L, Dv, seed=seed + 2)


def official(q, k, v, scale, eps=1e-6):
    """The official RAVLT layer's algebra without RoPE, LePE and the output gate: keys reweighted by α N,
    z = 1 / (φq · mean(k') + eps), kv = (k' N^-½)ᵀ (v N^-½), out = φq kv z."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    N = k.shape[2]
    eff = torch.softmax(scale * q.mean(2, keepdim=True) @ k.transpose(-1, -2), dim=-1).transpose(-1, -2)
    k = k * eff * N
    z = 1 / (q @ k.mean(2, keepdim=True).transpose(-1, -2) + eps)
    kv = (k.transpose(-1, -2) * N ** -0.5) @ (v * N ** -0.5)
    return q @ kv * z


@pytest.mark.parametrize("Lq", [21, 9])
def test_equals_the_official_algebra(Lq):
    m = attnlab.mechanism("rala")
    q, k, v = qkv(Lq=Lq)
    for scale, eps in ((8 ** -0.5, 1e-6), (1.3, 0.0)):
        want = official(q, k, v, scale, eps)
        for impl in IMPLS:
            torch.testing.assert_close(m(q, k, v, scale=scale, eps=eps, impl=impl), want, atol=1e-12, rtol=0)


def test_uniform_key_weights_reduce_to_elu_linear_attention():
    """With α uniform (scale -> 0) RALA is the Linear Transformer (elu+1, normalized), its eps scaled by N."""
    m = attnlab.mechanism("rala")
    q, k, v = qkv()
    want = attnlab.mechanism("linear")(q, k, v, feature_map="elu+1", eps=21 * 1e-6, scale=1.0)
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, scale=1e-300, impl=impl), want, atol=1e-12, rtol=0)
    assert (m(q, k, v) - want).abs().max() > 1e-3  # the default scale does reweight the keys


def test_context_aware_through_the_mean_query():
    """α depends on every query through q̄: changing query 0 changes every other row (plain linear attention's row i
    depends on q_i only), and permuting the queries permutes the rows (q̄ is order-free)."""
    m, lin = attnlab.mechanism("rala"), attnlab.mechanism("linear")
    q, k, v = qkv()
    q2 = q.clone()
    q2[:, :, 0] += 1.0
    for mech, changes in ((m, True), (lin, False)):
        diff = (mech(q2, k, v, impl="chunked") - mech(q, k, v, impl="chunked"))[:, :, 1:].abs().max()
        assert (diff > 1e-6) == changes, (mech.name, float(diff))
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(1))
    for impl in IMPLS:
        torch.testing.assert_close(m(q[:, :, perm], k, v, impl=impl), m(q, k, v, impl=impl)[:, :, perm],
                                   atol=1e-12, rtol=0)


def test_causal_is_not_declared():
    """Non-causal only (q̄ averages every query; a prefix-mean q̄ has no constant-size state): causal calls, scan and
    step raise naming the supported patterns."""
    m = attnlab.mechanism("rala")
    q, k, v = qkv()
    assert m.patterns == ("noncausal_self", "noncausal_cross")
    for call in (lambda: m(q, k, v, causal=True), lambda: m(q[:, :, :5], k, v, causal=True),
                 lambda: m.scan(q, k, v), lambda: m.step(None, q[:, :, 0], k[:, :, 0], v[:, :, 0])):
        with pytest.raises(ValueError, match="noncausal_self, noncausal_cross"):
            call()


def test_nan_query_reaches_every_row():
    m = attnlab.mechanism("rala")
    q, k, v = qkv()
    q[:, :, 3] = float("nan")
    for impl in IMPLS:
        assert m(q, k, v, impl=impl).isnan().all()


def test_long_bfloat16_stays_finite():
    """L = 65,536 in bfloat16: the chunked form on the whole sequence; the recurrent and parallel forms for the last
    64 queries against every key (non-causal cross)."""
    m = attnlab.mechanism("rala")
    q, k, v = (rnd(1, 2, 65_536, 16, seed=s).to(torch.bfloat16) for s in range(3))
    whole = m(q, k, v, impl="chunked")
    assert whole.dtype == torch.bfloat16 and whole.isfinite().all()
    last = m(q[:, :, -64:], k, v, impl="chunked")
    for impl in ("parallel", "recurrent"):
        out = m(q[:, :, -64:], k, v, impl=impl)
        assert out.isfinite().all(), impl
        torch.testing.assert_close(out.float(), last.float(), atol=2e-2, rtol=2e-2)
    assert m.state_size(2, 16, 16) == 2 * (16 * 17 + 16 + 2)
