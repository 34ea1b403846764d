"""``based``: BASED's Taylor feature map, its sliding window and its bounded state, checked against
independent computations (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff")."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.entries.based import banded_window, state_size, taylor_features

pytestmark = pytest.mark.usefixtures("single_thread")

IMPLS = ("parallel", "chunked", "recurrent")


def qkv(B=2, H=2, L=29, D=8, Dv=5, seed=0, Lq=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Lq or L, D), r(B, H, L, D), r(B, H, L, Dv)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_taylor_feature_inner_product_is_second_order_exp(d):
    """φ(q)·φ(k) = 1 + s + s²/2 with s = q'·k'/√d' (exactly), φ of dimension 1 + d' + d'²,
    reading the first d' channels."""
    q, k, _ = qkv(B=1, H=3, L=11, D=d + 2)
    fq, fk = taylor_features(q, d), taylor_features(k, d)
    assert fq.shape[-1] == 1 + d + d * d
    s = (q[..., :d] @ k[..., :d].transpose(-1, -2)) / math.sqrt(d)
    torch.testing.assert_close(fq @ fk.transpose(-1, -2), 1 + s + s * s / 2, atol=1e-12, rtol=1e-12)


def test_linear_part_is_normalized_taylor_attention():
    """window=0: o_i = Σ_j κ(i,j) v_j / Σ_j κ(i,j), κ = 1 + s + s²/2, over j <= i' (causal) or all j."""
    m = attnlab.mechanism("based")
    for Lq in (None, 17):
        q, k, v = qkv(Lq=Lq)
        s = (q[..., :4] @ k[..., :4].transpose(-1, -2)) / 2.0
        kappa = 1 + s + s * s / 2
        for causal in (False, True):
            w = kappa
            if causal:
                i = torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2]
                w = kappa * (torch.arange(k.shape[2])[None, :] <= i)
            want = (w @ v) / (w.sum(-1, keepdim=True) + 1e-12)
            for impl in IMPLS:
                got = m(q, k, v, causal=causal, impl=impl, feature_dim=4, window=0, chunk_size=6)
                torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_taylor_attention_approaches_softmax_for_small_scores():
    """The Taylor kernel is exp's 2nd-order expansion: for small q·k it approaches softmax attention
    with temperature 1/√d' (error O(s³))."""
    m = attnlab.mechanism("based")
    q, k, v = qkv(B=1, H=2, L=40, D=16)
    errs = []
    for eps in (0.5, 0.25, 0.125):
        exact = attnlab.mechanism("dense").reference(q * eps, k * eps, v, causal=True, scale=16 ** -0.5)
        errs.append(float((m(q * eps, k * eps, v, causal=True, window=0) - exact).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs
    assert errs[0] / errs[1] > 4 and errs[1] / errs[2] > 4, errs  # at least 2nd order (3rd expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq", [None, 13])
def test_window_part_equals_sliding_window(causal, Lq):
    """based(window=w) - based(window=0) is exactly attnlab's sliding_window(w), for every form."""
    m, sw = attnlab.mechanism("based"), attnlab.mechanism("sliding_window")
    q, k, v = qkv(Lq=Lq)
    for window in (1, 4, 40):
        want = sw.reference(q, k, v, causal=causal, window=window)
        for impl in IMPLS:
            kw = dict(causal=causal, impl=impl, feature_dim=4, chunk_size=5)
            got = m(q, k, v, window=window, **kw) - m(q, k, v, window=0, **kw)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Lk", [(23, 23), (9, 23), (23, 9), (1, 23)])
def test_banded_window_matches_the_dense_oracle(causal, Lq, Lk):
    """The chunked form's O(L w) band equals the sliding-window oracle (bottom-right alignment, rows
    without keys zero), forward and backward, for blocks that do not divide L."""
    sw = attnlab.mechanism("sliding_window")
    q, k, v = (x.requires_grad_() for x in qkv(B=1, H=2, L=Lk, Lq=Lq))
    g = torch.randn(1, 2, Lq, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for window in (1, 3, 30):
        want = sw.reference(q, k, v, causal=causal, window=window, scale=0.3)
        dwant = torch.autograd.grad((want * g).sum(), (q, k, v))
        for block in (1, 4, 64):
            got = banded_window(q, k, v, window=window, scale=0.3, causal=causal, block=block)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
            for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), dwant):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_segments_shorter_than_the_window_carry_the_cache():
    """Segments of 3, 5, 2 and 19 tokens with window 12: the KV cache spans several segments; chunked and
    recurrent scans continuing the state equal the parallel form, forward and backward."""
    m = attnlab.mechanism("based")
    q, k, v = (x.requires_grad_() for x in qkv())
    kw = dict(feature_dim=3, window=12, chunk_size=4)
    want = m(q, k, v, causal=True, impl="parallel", **kw)
    cuts, state, outs = [0, 3, 8, 10, 29], None, []
    for n, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        o, state = m.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, impl=("chunked", "recurrent")[n % 2], **kw)
        outs.append(o)
    got = torch.cat(outs, 2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    assert state.length == 29 and state["k"].shape[2] == 11
    torch.testing.assert_close(state["k"], k.detach()[:, :, -11:], atol=0, rtol=0)  # the last window - 1 keys


def test_state_size_formula():
    """H [(1 + d' + d'²)(Dv + 1) + (w - 1)(D + Dv)]: the linear state with its normalizer and the KV cache."""
    m = attnlab.mechanism("based")
    assert state_size(2, 16, 16) == 2 * (273 * 17 + 63 * 32) == 13314  # defaults d' = 16, w = 64
    assert m.state_size(4, 8, 6, feature_dim=3, window=5) == 4 * (13 * 7 + 4 * 14)
    assert m.state_size(4, 8, 6, feature_dim=3, window=0) == 4 * 13 * 7
    q, k, v = qkv(H=4, D=8, Dv=6)
    for window in (0, 1, 5):
        _, state = m.scan(q, k, v, feature_dim=3, window=window)
        assert state.floats == 2 * m.state_size(4, 8, 6, feature_dim=3, window=window)  # B = 2


def test_step_state_does_not_grow_with_context():
    """The recurrent state after 100 and after 1000 tokens holds the same number of floats (state_size),
    and a step after 1000 tokens still equals the parallel form's last row."""
    m = attnlab.mechanism("based")
    q, k, v = qkv(B=1, H=2, L=1001, D=16, Dv=8, seed=3)
    floats = []
    for L in (100, 1000):
        _, state = m.scan(q[:, :, :L], k[:, :, :L], v[:, :, :L])
        floats.append(state.floats)
        assert all(t.shape[2] in (273, 63) for t in state.tensors.values())
    assert floats[0] == floats[1] == m.state_size(2, 16, 8)
    o, _ = m.step(state, q[:, :, 1000], k[:, :, 1000], v[:, :, 1000])
    want = m(q[:, :, 1000:], k, v, causal=True, impl="parallel")[:, :, 0]
    torch.testing.assert_close(o, want, atol=1e-10, rtol=0)


def test_bad_feature_dim():
    m = attnlab.mechanism("based")
    q, k, v = qkv(D=8)
    with pytest.raises(ValueError, match="feature_dim"):
        m(q, k, v, feature_dim=9)
    with pytest.raises(ValueError, match="window"):
        m(q, k, v, window=-1)
