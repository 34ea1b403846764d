"""attnlab's C++ CPU kernels (attnlab/native.py) against the readable forms they fuse.

``range_attention`` (the ``native`` implementation of masked mechanisms) against the dense oracle,
output and log-sum-exp; ``linear_chunks`` (inside the chunked form of the linear entries) against the
quadratic parallel form and the recurrence's state. Both in float64 (to 1e-10) and float32. The
conformance suite runs ``native`` on every masked entry as well; here are the cases it does not
reach: rows that see no key, GQA with cross attention, long ranges split into several online-softmax
steps, chunk remainders, and which calls the kernels decline.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnlab
from attnlab import linear as K
from attnlab import conformance as C
from attnlab import native, reference
from attnlab.patterns import executor

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("Lq,Lk,Hq,Hkv", [(300, 300, 4, 4), (130, 257, 6, 2), (257, 100, 2, 1)])
def test_range_attention_equals_reference(dtype, tol, Lq, Lk, Hq, Hkv):
    """Random ranges (some empty, some longer than one online-softmax step) against the oracle."""
    q, k, v = _qkv(2, Hq, Hkv, Lq, Lk, 16, 8, dtype)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, Lk, (Lq,), generator=g)
    b = torch.randint(0, Lk + 1, (Lq,), generator=g)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    end[::7] = start[::7]  # rows that see nothing
    start[5], end[5] = 0, Lk  # a full row
    j = torch.arange(Lk)
    mask = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    ref, ref_lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    old = native.CHUNK
    try:
        for chunk in (old, 64):  # one step per row, and several online-softmax steps
            native.CHUNK = chunk
            out, lse = native.range_attention(q, k, v, start, end, 16 ** -0.5)
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
            torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    finally:
        native.CHUNK = old
    assert torch.all(out[:, :, ::7] == 0) and torch.all(lse[:, :, ::7] == float("-inf"))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_range_attention_two_ranges_per_query(dtype, tol):
    """Two disjoint ranges per row (sinks plus a window, in general position), some empty."""
    Lq, Lk = 190, 260
    q, k, v = _qkv(2, 4, 2, Lq, Lk, 16, 8, dtype)
    g = torch.Generator().manual_seed(5)
    cuts = torch.sort(torch.randint(0, Lk + 1, (Lq, 4), generator=g), dim=-1).values
    start, end = cuts[:, [0, 2]], cuts[:, [1, 3]]  # [c0, c1) and [c2, c3): disjoint, possibly empty
    start[::9, 1] = end[::9, 1]
    j = torch.arange(Lk)
    mask = torch.zeros(Lq, Lk, dtype=torch.bool)
    for r in range(2):
        mask |= (j[None, :] >= start[:, r, None]) & (j[None, :] < end[:, r, None])
    ref, ref_lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    out, lse = native.range_attention(q, k, v, start, end, 16 ** -0.5)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,params,causal,gqa", [
    ("sliding_window", {"window": 37}, True, True),
    ("sliding_window", {"window": 37}, False, True),
    ("neighborhood", {"kernel_size": 21}, False, False),
    ("neighborhood", {"kernel_size": 21, "is_causal": True}, False, False),
    ("prefix_lm", {"prefix": 50}, False, False),
    ("sink_window", {"sinks": 4, "window": 37}, True, True),
    ("document", {"document_lengths": (50, 120, 30)}, True, False),
])
def test_native_is_the_default_on_cpu_and_equals_reference(name, params, causal, gqa):
    m = attnlab.mechanism(name)
    q, k, v = _qkv(1, 4, 2 if gqa else 4, 200, 200, 32, 32, torch.float32)
    assert m.select(m.prepare(q, k, v, causal=causal, **params)).name == "native"
    out = m(q, k, v, causal=causal, **params)
    ref = m(q.double(), k.double(), v.double(), causal=causal, impl="reference", **params)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_native_declines_what_it_cannot_serve():
    sw, sink = attnlab.mechanism("sliding_window"), attnlab.mechanism("sink_window")
    q, k, v = _qkv(1, 2, 2, 64, 64, 16, 16, torch.float32)
    why = lambda m, *x, **p: executor.NATIVE.supports(m.prepare(*x, causal=True, **p))  # noqa: E731
    assert why(sw, q.clone().requires_grad_(), k, v) is None  # the range kernel has a backward
    q2 = torch.randn(1, 2, 8, 8, 16, requires_grad=True)  # a 2-D grid: the box kernel, forward only
    assert "forward-only" in executor.NATIVE.supports(attnlab.mechanism("neighborhood").prepare(
        q2, q2.detach(), q2.detach(), kernel_size=3))
    assert "float32 or float64" in why(sw, q.half(), k.half(), v.half())
    assert "at most 2 ranges" in why(attnlab.mechanism("strided"), q, k, v, stride=4)
    assert why(sink, q, k, v, sinks=2, window=8) is None  # two ranges: sinks and the window
    assert why(sw, q, k, v) is None


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("Hkv,Lk", [(4, 90), (2, 120)])
def test_range_attention_backward_equals_autograd_of_the_dense_form(dtype, tol, Hkv, Lk):
    """The range kernel's backward: dq, dk, dv (GQA groups summed) for a loss on the output and on the
    log-sum-exp, two ranges per row (sinks and a window, cross lengths), a row with none, against
    autograd through the masked dense softmax."""
    B, H, Lq, D, Dv, scale = 2, 4, 90, 8, 6, 0.4
    g = torch.Generator().manual_seed(10)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = (t.requires_grad_() for t in (rnd(B, H, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, Dv)))
    i, j = torch.arange(Lq) + (Lk - Lq), torch.arange(Lk)
    start = torch.stack([torch.zeros(Lq, dtype=torch.long), (i - 19).clamp(4, Lk)], 1)
    end = torch.stack([torch.full((Lq,), 4), (i + 1).clamp(4, Lk)], 1)
    start[5], end[5] = 0, 0
    G, Gl = rnd(B, H, Lq, Dv), rnd(B, H, Lq)
    visible = ((j >= start[:, :1]) & (j < end[:, :1])) | ((j >= start[:, 1:]) & (j < end[:, 1:]))

    def dense(q, k, v):
        s = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.where(visible, (s - torch.where(lse.isinf(), 0, lse)[..., None]).exp(), 0)
        return p @ v.repeat_interleave(H // Hkv, 1), lse

    def with_grads(o, lse):
        loss = (o * G).sum() + (torch.where(lse.isinf(), 0, lse) * Gl).sum()
        return [o, lse] + list(torch.autograd.grad(loss, (q, k, v)))

    got, want = with_grads(*native.range_attention(q, k, v, start, end, scale)), with_grads(*dense(q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _random_boxes(shape, g):
    """Random boxes (some empty) on a grid of 2-3 axes, as (N, 6) with axes padded in front to three."""
    N = int(torch.tensor(shape).prod())
    full = (1,) * (3 - len(shape)) + tuple(shape)
    a = torch.stack([torch.randint(0, n, (N,), generator=g) for n in full], -1)
    b = torch.stack([torch.randint(0, n + 1, (N,), generator=g) for n in full], -1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b) + 1
    hi = torch.minimum(hi, torch.tensor(full))
    hi[::5, -1] = lo[::5, -1]  # empty boxes
    return torch.cat([lo, hi], -1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape,tile,Hq,Hkv,D,Dv", [
    ((9, 13), (2, 2), 4, 2, 16, 8),  # Dv below one wide vector (float): the scalar tail
    ((5, 6, 7), (2, 2, 2), 2, 2, 16, 40),  # 2 wide vectors and a tail (float), 5 (double)
    ((3, 40), (1, 8), 2, 1, 64, 64),
    ((9, 13), (3, 1), 1, 1, 5, 24),  # partial tiles (9 = 3 x 3 rows; 13 columns)
    ((5, 6, 7), (1, 1, 5), 2, 1, 33, 48),
    ((4, 4), (1, 1), 1, 1, 8, 16)])
def test_box_attention_equals_reference(dtype, tol, shape, tile, Hq, Hkv, D, Dv):
    N = int(torch.tensor(shape).prod())
    q, k, v = _qkv(2, Hq, Hkv, N, N, D, Dv, dtype)
    boxes = _random_boxes(shape, torch.Generator().manual_seed(3))
    full = (1,) * (3 - len(shape)) + tuple(shape)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in full], indexing="ij")).reshape(3, -1)  # (3, N)
    mask = ((coords.T[None] >= boxes[:, None, :3]) & (coords.T[None] < boxes[:, None, 3:])).all(-1)
    ref, ref_lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    out, lse = native.box_attention(q, k, v, boxes, shape, tile, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    # the union bound the kernel sizes its buffers by, against a brute-force count per tile
    tiles = [torch.arange(N).view(full)[z:z + t0, y:y + t1, x:x + t2].flatten()
             for t0, t1, t2 in [(1,) * (3 - len(tile)) + tuple(tile)]
             for z in range(0, full[0], t0) for y in range(0, full[1], t1) for x in range(0, full[2], t2)]
    want = 0
    for rows in tiles:
        b = boxes[rows]
        b = b[((b[:, 3:] - b[:, :3]) > 0).all(-1)]
        if len(b):
            want = max(want, int((b[:, 3:].amax(0) - b[:, :3].amin(0)).prod()))
    assert native.box_union(boxes, shape, tile) == want


def test_box_tile_choice_and_bad_tile():
    m = attnlab.mechanism("neighborhood")
    chosen = {}
    for shape, kernel in [((64, 128), 23), ((16, 16, 32), 8), ((20, 24), 7)]:
        q = torch.randn(1, 1, *shape, 4)
        st, tile = executor._native_plan(m.prepare(q, q, q, kernel_size=kernel))
        chosen[len(shape), kernel] = tile
        # the plan's tile, and the union bound it declines giant neighbourhoods by
        assert executor._BOX_TILES[st] == (native.box_tile(st.boxes, shape), native.box_union(st.boxes, shape, tile))
    # the tiles measured fastest (module docstring): 2-D 23x23 and 7x7 in 2x2..4x2, 3-D 8x8x8 2x2x1
    assert chosen[2, 23] in {(2, 2), (3, 2), (4, 1), (4, 2)} and chosen[2, 7] in {(2, 2), (3, 2), (4, 1), (4, 2)}
    assert chosen[3, 8] == (2, 2, 1)
    q = torch.randn(1, 1, 16, 4)
    with pytest.raises(ValueError, match="tile: at most 8 queries"):
        native.box_attention(q, q, q, torch.tensor([[0, 0, 0, 1, 4, 4]] * 16), (4, 4), (3, 3))


@pytest.mark.parametrize("params", [dict(kernel_size=7), dict(kernel_size=(5, 9), stride=(2, 3)),
                                    dict(kernel_size=7, is_causal=(True, False))])
def test_neighborhood_2d_runs_the_box_kernel(params):
    m = attnlab.mechanism("neighborhood")
    q, k, v = (torch.randn(1, 2, 20, 24, 16) for _ in range(3))
    assert m.select(m.prepare(q, k, v, **params)).name == "native"
    out = m(q, k, v, **params)
    ref = m(q.double(), k.double(), v.double(), impl="reference", **params)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    reason = executor.NATIVE.supports(m.prepare(q, k, v, kernel_size=7, dilation=2))
    assert "box" in reason


def test_disabled_by_environment():
    code = "from attnlab import native; print(native.unavailable())"
    env = dict(os.environ, ATTNLAB_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ATTNLAB_NATIVE=0" in out.stdout


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", ["none", "head", "gates", "strong_gates"])
@pytest.mark.parametrize("L,chunk", [(200, 64), (64, 64), (37, 16)])
def test_linear_chunks_equal_parallel_form_and_recurrence(dtype, tol, decay, L, chunk):
    """Causal chunked linear attention (remainder chunk included), continuing a non-zero state; gates
    strong enough to take the pair-by-pair path in some chunks too."""
    B, H, F, Dv = 2, 3, 8, 5
    g = torch.Generator().manual_seed(2)
    fq, fk = (0.3 * torch.randn(B, H, 2 * L, F, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, 2 * L, Dv, generator=g, dtype=torch.float64)
    lam = -torch.rand(H, generator=g, dtype=torch.float64) if decay == "head" else None
    gates = None
    if decay.endswith("gates"):
        gates = -torch.rand(B, H, 2 * L, F, generator=g, dtype=torch.float64) * (0.2 if decay == "gates" else 20.0)
    fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
    lam, gates = (None if x is None else x.to(dtype) for x in (lam, gates))
    half = (lambda x: None if x is None else x[:, :, :L]), (lambda x: None if x is None else x[:, :, L:])
    S0 = torch.zeros(B, H, F, Dv, dtype=dtype)
    # first half through the Python recurrence, second half through the kernel, continuing its state
    _, S_half = K.scan_recurrent(fq[:, :, :L], fk[:, :, :L], v[:, :, :L], S0, log_decay=lam, log_gates=half[0](gates))
    S = S_half.clone()
    out = native.linear_chunks(fq[:, :, L:], fk[:, :, L:], v[:, :, L:], S, lam, chunk, half[1](gates))
    whole = K.parallel(fq, fk, v, causal=True, log_decay=lam, log_gates=gates)
    torch.testing.assert_close(out, whole[:, :, L:], atol=tol, rtol=tol)
    _, S_end = K.scan_recurrent(fq, fk, v, S0, log_decay=lam, log_gates=gates)
    torch.testing.assert_close(S, S_end, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", [False, True])
def test_linear_chunks_normalized_equal_parallel_form(dtype, tol, decay):
    """The normalizer inside the kernel (no column of ones on V) against the parallel form, finished."""
    B, H, L, F, Dv, eps = 2, 3, 150, 8, 5, 1e-3
    g = torch.Generator().manual_seed(4)
    fq, fk = (torch.rand(B, H, 2 * L, F, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(B, H, 2 * L, Dv, generator=g, dtype=torch.float64).to(dtype)
    lam = -torch.rand(H, generator=g, dtype=torch.float64).to(dtype) if decay else None
    vv = K.with_ones(v, True)
    _, S_half = K.scan_recurrent(fq[:, :, :L], fk[:, :, :L], vv[:, :, :L], torch.zeros(B, H, F, Dv + 1, dtype=dtype),
                                 log_decay=lam)
    S = S_half.clone()
    out = native.linear_chunks(fq[:, :, L:], fk[:, :, L:], v[:, :, L:], S, lam, 64, normalize_eps=eps)
    whole = K.finish(K.parallel(fq, fk, vv, causal=True, log_decay=lam), True, eps)
    torch.testing.assert_close(out, whole[:, :, L:], atol=tol, rtol=tol)
    _, S_end = K.scan_recurrent(fq, fk, vv, torch.zeros(B, H, F, Dv + 1, dtype=dtype), log_decay=lam)
    torch.testing.assert_close(S, S_end, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("feature", K.FEATURES)
@pytest.mark.parametrize("mode", ["raw", "normalized", "token_gates"])
def test_linear_chunks_map_features_and_scale_queries_themselves(dtype, tol, feature, mode):
    """φ (the Taylor map of the first 3 of 8 channels: 13 features) and the query factor applied
    chunk by chunk inside the kernel equal mapping first (PyTorch); gates of shape (B, H, L, 1)
    broadcast over the channels as an expanded copy would."""
    B, H, L, D, Dv, d = 2, 3, 150, 8, 5, 3
    F = 1 + d + d * d if feature == "taylor" else D
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64).to(dtype)
    gates = -0.1 * torch.rand(B, H, L, 1, generator=g, dtype=torch.float64).to(dtype) if mode == "token_gates" else None
    normalized, scale = mode == "normalized", (1.0 if mode == "normalized" else 0.37)
    S = torch.zeros(B, H, F, Dv + normalized, dtype=dtype)
    out = native.linear_chunks(q, k, v, S, None, 64, gates, normalize_eps=1e-3 if normalized else None,
                               feature=feature, q_scale=scale, feature_dim=d)
    fq, fk = K.feature_map(feature, q, d) * scale, K.feature_map(feature, k, d)
    full = None if gates is None else gates.expand(B, H, L, F)
    want = K.parallel(fq, fk, K.with_ones(v, normalized), causal=True, log_gates=full)
    torch.testing.assert_close(out, K.finish(want, normalized, 1e-3), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="feature: one of"):
        K.feature_map("tanh", q)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_linear_chunks_centred_equal_the_pytorch_form(dtype, tol):
    """InLine's centred finish inside the kernel, continuing a state and a value sum, against the
    PyTorch path."""
    B, H, L, F, Dv, count = 2, 3, 150, 8, 5, 40
    g = torch.Generator().manual_seed(6)
    fq, fk = (torch.randn(B, H, L, F, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64).to(dtype)
    S0 = torch.randn(B, H, F, Dv + 1, generator=g, dtype=torch.float64).to(dtype)
    vsum0 = torch.randn(B, H, Dv, generator=g, dtype=torch.float64).to(dtype)
    S_before, vsum_before = S0.clone(), vsum0.clone()
    got = K.chunked_centred(fq, fk, v, S0, vsum0, count, chunk=64, scale=0.3)
    with native.disabled():
        want = K.chunked_centred(fq, fk, v, S0, vsum0, count, chunk=64, scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert torch.equal(vsum0, vsum_before) and torch.equal(S0, S_before)  # the caller's tensors are not updated


@pytest.mark.parametrize("name", ["lightning", "linear", "gla", "based", "inline", "retention"])
def test_chunked_form_trains_through_the_kernels(name):
    """With autograd recording, the causal chunked form runs the C++ kernels forward and backward
    (whole calls, not spans) and equals the PyTorch path, output and every gradient (parameters too)."""
    m = attnlab.mechanism(name)
    ex = C.examples(m)[0]
    x = C.example_inputs(m, ex, "causal_self", dtype=torch.float32)
    params = {n: (t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t) for n, t in x.params.items()}
    leaves = [t.detach().clone().requires_grad_(True) for t in (x.q, x.k, x.v)]
    assert K.fused(m.prepare(*leaves, causal=True, **params))
    trained = [t for t in leaves + list(params.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    G = torch.randn(x.q.shape[:3] + (x.v.shape[-1],), generator=torch.Generator().manual_seed(3))

    def run():
        out = m(*leaves, causal=True, impl="chunked", **params)
        return [out] + list(torch.autograd.grad((out * G).sum(), trained))

    fast = run()
    with native.disabled():
        assert not K.fused(m.prepare(*leaves, causal=True, **params))
        slow = run()
    _close(fast, slow, 2e-4)


def _grads_both_paths(fn, leaves, outs_grads):
    """``fn(*leaves)`` and its gradients for ``Σ out * grad`` over its outputs, on the kernels and with
    them turned off (the PyTorch path)."""
    def run():
        outs = fn(*leaves)
        loss = sum((o * g).sum() for o, g in zip(outs, outs_grads))
        return list(outs) + list(torch.autograd.grad(loss, leaves))

    fast = run()
    with native.disabled():
        slow = run()
    return fast, slow


def _close(fast, slow, tol):
    """Equal within ``tol`` relative to each tensor's largest entry (a decay's gradient sums many
    weighted terms of both signs: float32 rounding shows against its scale, not its value)."""
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, float(b.detach().abs().max())), rtol=tol)


def _chunk_leaves(seed, dtype, B, H, L, F, Dv, decay):
    """``(rnd, [q, k, v, S0] + [the decay or gates])`` requiring grad, for the linear backward tests: decay
    ``none``, ``head`` (per head), ``token_gates`` (one per token), ``gates`` (per channel) or
    ``strong_gates`` (per channel, strong enough for the pair-by-pair path)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    leaves = [0.5 * rnd(B, H, L, F), 0.5 * rnd(B, H, L, F), rnd(B, H, L, Dv), rnd(B, H, F, Dv)]
    if decay == "head":
        leaves.append(-0.3 * torch.rand(H, generator=g, dtype=torch.float64).to(dtype))
    elif decay != "none":
        cols, size = (1, 0.3) if decay == "token_gates" else (F, 0.3 if decay == "gates" else 20.0)
        leaves.append(-size * torch.rand(B, H, L, cols, generator=g, dtype=torch.float64).to(dtype))
    return rnd, [t.requires_grad_() for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("decay", ["none", "head", "token_gates", "gates", "strong_gates"])
@pytest.mark.parametrize("L,chunk", [(150, 16), (64, 64), (7, 16)])
@pytest.mark.parametrize("feature", ["identity", "elu+1"])
def test_linear_chunks_backward_equals_autograd_of_the_pytorch_path(dtype, tol, decay, L, chunk, feature):
    """:class:`attnlab.linear.Chunks`' backward kernel: dq, dk, dv, the initial state's, the decay's and
    the gates' gradients (the gates' summed inside the kernel, through a feature map too), for a loss on
    the output and on the final state, against autograd through the PyTorch chunked form; a remainder
    chunk, one chunk, less than one; gates strong enough to take the pair-by-pair path in some
    chunks."""
    B, H, F, Dv = 2, 3, 8, 5
    rnd, leaves = _chunk_leaves(7, dtype, B, H, L, F, Dv, decay)

    def fn(q, k, v, S0, *extra):
        lam = extra[0] if decay == "head" else None
        gates = extra[0] if extra and decay != "head" else None
        return K.chunked(q, k, v, S0, chunk=chunk, log_decay=lam, log_gates=gates, feature=feature, q_scale=0.8)

    _close(*_grads_both_paths(fn, leaves, [rnd(B, H, L, Dv), rnd(B, H, F, Dv)]), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("feature", K.FEATURES)
@pytest.mark.parametrize("decay", ["none", "fixed", "learned"])
def test_linear_chunks_backward_through_feature_map_and_normalizer(dtype, tol, feature, decay):
    """The backward kernel maps the features and divides by the normalizer itself: gradients w.r.t. the
    raw q, k (Taylor of the first 3 of 8 channels), v and the initial state (with its normalizer
    column); a per-head decay that needs a gradient takes the features mapped in PyTorch."""
    B, H, L, D, Dv, d = 2, 3, 150, 8, 5, 3
    F = 1 + d + d * d if feature == "taylor" else D
    g = torch.Generator().manual_seed(8)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    leaves = [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, Dv), rnd(B, H, F, Dv + 1).abs()]
    if decay != "none":
        leaves.append(-0.3 * torch.rand(H, generator=g, dtype=torch.float64).to(dtype))
    for t in leaves[:4] + leaves[4:] * (decay == "learned"):
        t.requires_grad_()
    scale = 1.0 if feature in ("elu+1", "taylor") else 0.6  # positive features: a safe normalizer

    def fn(q, k, v, S0, *lam):
        return K.chunked_normalized(q, k, v, S0, chunk=16, log_decay=lam[0] if lam else None, normalize=True,
                                    eps=1e-3, feature=feature, q_scale=scale, feature_dim=d)

    trained = [t for t in leaves if t.requires_grad]
    _close(*_grads_both_paths(lambda *ts: fn(*ts, *leaves[4:] * (decay == "fixed")), trained,
                              [rnd(B, H, L, Dv), rnd(B, H, F, Dv + 1)]), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("decay", ["none", "head", "gates", "strong_gates"])
@pytest.mark.parametrize("strict", [False, True])
def test_linear_chunks_backward_read_backwards(dtype, tol, decay, strict):
    """The anti-causal half of the bidirectional forms (``reverse``, ``strict``) in the backward kernel:
    every gradient (the decay's and gates' too) equals autograd through the flipped causal form on the
    PyTorch path, the diagonal pair subtracted when strict."""
    B, H, L, F, Dv = 2, 3, 150, 8, 5
    rnd, leaves = _chunk_leaves(13, dtype, B, H, L, F, Dv, decay)
    form = K.Form(16, q_scale=0.7, reverse=True, strict=strict)

    def fn(q, k, v, S0, *extra):
        lam = extra[0] if decay == "head" else None
        gates = extra[0] if extra and decay != "head" else None
        if native.unavailable() is None:
            return K._through_kernels(q, k, v, S0, lam, gates, form)[:2]
        flip = lambda x: None if x is None else x.flip(2)  # noqa: E731
        out, S = K.chunked(flip(q) * 0.7, flip(k), flip(v), S0, chunk=16, log_decay=lam, log_gates=flip(gates))
        out = out.flip(2)
        return (out - ((q * 0.7 * k).sum(-1, keepdim=True) * v if strict else 0)), S

    _close(*_grads_both_paths(fn, leaves, [rnd(B, H, L, Dv), rnd(B, H, F, Dv)]), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_linear_chunks_backward_of_the_centred_form(dtype, tol):
    """InLine's centred finish in the backward kernel: gradients w.r.t. q, k, v, the initial state and
    the value sum before the segment, for a loss on the output, the final state and the final sum."""
    B, H, L, F, Dv, count = 2, 3, 150, 8, 5, 40
    g = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    leaves = [t.requires_grad_() for t in (rnd(B, H, L, F), rnd(B, H, L, F), rnd(B, H, L, Dv), rnd(B, H, F, Dv + 1),
                                           rnd(B, H, Dv))]

    def fn(q, k, v, S0, vsum0):
        return K.chunked_centred(q, k, v, S0, vsum0, count, chunk=16, scale=0.3)

    _close(*_grads_both_paths(fn, leaves, [rnd(B, H, L, Dv), rnd(B, H, F, Dv + 1), rnd(B, H, Dv)]), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("feature", K.FEATURES)
@pytest.mark.parametrize("mode,Lk", [("normalized", 150), ("raw", 150), ("normalized", 97), ("centred", 150),
                                     ("centred", 97)])
def test_linear_noncausal_backward_equals_autograd_of_the_pytorch_form(dtype, tol, feature, mode, Lk):
    """:class:`attnlab.linear.NonCausal`'s backward kernel (features mapped and the normalizer divided
    inside; cross lengths) against autograd through mapping, ``φq (φkᵀ [v, 1])`` and the division; centred,
    through InLine's ``φq (φkᵀ v - z ūᵀ) + ū``, whose mean value and key sums reach every key and value."""
    B, H, Lq, D, Dv, d, eps = 2, 3, 150, 8, 5, 3, 1e-3
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k = rnd(B, H, Lq, D), rnd(B, H, Lk, D)
    normalized = mode == "normalized"
    if normalized and feature in ("identity", "relu"):  # positive features: a denominator away from 0
        q, k = q.abs(), k.abs()
    leaves = [t.requires_grad_() for t in (q, k, rnd(B, H, Lk, Dv))]
    scale = 1.0 if feature in ("elu+1", "taylor") and normalized else 0.6
    eps_given = eps if normalized else None

    def fn(q, k, v):
        out = K.noncausal_fused(q, k, v, chunk=16, feature=feature, q_scale=scale, normalize_eps=eps_given,
                                feature_dim=d, centred=mode == "centred")
        if out is None:  # the kernels turned off: the PyTorch form
            fq, fk = K.feature_map(feature, q, d) * scale, K.feature_map(feature, k, d)
            if mode == "centred":
                ubar = v.mean(2, keepdim=True)
                out = fq @ (fk.transpose(-1, -2) @ v - fk.sum(2)[..., None] * ubar) + ubar
            else:
                out = K.finish(K.noncausal(fq, fk, K.with_ones(v, normalized)), normalized, eps)
        return (out,)

    _close(*_grads_both_paths(fn, leaves, [rnd(B, H, Lq, Dv)]), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("feature,q_scale", [("elu+1", 1.0), ("elu+1", 0.6), ("taylor", 1.0), ("relu", 1.0)])
@pytest.mark.parametrize("Lk", [150, 97])
def test_linear_noncausal_backward_with_rala_weights(dtype, tol, feature, q_scale, Lk):
    """RALA's weights in the backward kernel (the softmax over the keys and the global query's gradient,
    which reaches every query) against autograd through ``α = softmax(rala_scale q̄·φ(k))``, the weighted
    keys and the normalized read-out; logits spread enough that the online maximum moves."""
    B, H, Lq, D, Dv, d, eps, rala = 2, 3, 150, 8, 5, 3, 1e-3, 2.5
    g = torch.Generator().manual_seed(12)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k = rnd(B, H, Lq, D), rnd(B, H, Lk, D)
    if feature == "relu":  # positive features: a denominator away from 0
        q, k = q.abs(), k.abs()
    leaves = [t.requires_grad_() for t in (q, k, rnd(B, H, Lk, Dv))]

    def fn(q, k, v):
        out = K.noncausal_fused(q, k, v, chunk=16, feature=feature, q_scale=q_scale, normalize_eps=eps,
                                feature_dim=d, rala_scale=rala)
        if out is None:  # the kernels turned off: the PyTorch form
            fq, fk = K.feature_map(feature, q, d), K.feature_map(feature, k, d)
            alpha = torch.softmax(rala * (fq.mean(2, keepdim=True) @ fk.transpose(-1, -2)), dim=-1)
            fk = fk * alpha.transpose(-1, -2)
            out = K.finish(K.noncausal(fq * q_scale, fk, K.with_ones(v, True)), True, eps)
        return (out,)

    _close(*_grads_both_paths(fn, leaves, [rnd(B, H, Lq, Dv)]), tol)


def test_native_impl_listed():
    assert executor.NATIVE in executor.MASKED_IMPLS
    assert attnlab.mechanism("sliding_window").impl("native") is executor.NATIVE


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", ["head", "gates"])
def test_linear_chunks_read_backwards_equal_the_flipped_causal_form(dtype, tol, decay):
    """``reverse``: the flipped inputs' (and gates') causal form, flipped back, without flipping anything;
    ``strict`` leaves each token's own pair out; ``add_to`` adds the output into a tensor (the bidirectional
    forms of lightning, retention and gla, :func:`attnlab.linear.bidirectional`)."""
    q, k, v = _qkv(2, 3, 3, 75, 75, 8, 6, dtype, seed=4)
    lam = -torch.rand(3, dtype=dtype) if decay == "head" else None
    g = -torch.rand(2, 3, 75, 8, dtype=dtype) if decay == "gates" else None
    flip = lambda x: None if x is None else x.flip(2)  # noqa: E731
    zero = lambda: torch.zeros(2, 3, 8, 6, dtype=dtype)  # noqa: E731
    want = native.linear_chunks(flip(q), flip(k), flip(v), zero(), lam, 16, flip(g)).flip(2)
    got = native.linear_chunks(q, k, v, zero(), lam, 16, g, reverse=True)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    diag = (q * k).sum(-1, keepdim=True) * v  # a token's own pair: decay and gates are 1 there
    base = torch.randn(2, 3, 75, 6, dtype=dtype)
    added = native.linear_chunks(q, k, v, zero(), lam, 16, g, reverse=True, strict=True, add_to=base.clone())
    torch.testing.assert_close(added, base + want - diag, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("feature", K.FEATURES)
@pytest.mark.parametrize("mode", ["raw", "normalized", "rala", "centred"])
def test_linear_noncausal_equals_the_pytorch_form(dtype, tol, feature, mode):
    """The non-causal kernel (cross lengths, a remainder chunk) against mapping in PyTorch and the two GEMMs
    of :func:`attnlab.linear.noncausal`; RALA's weights (softmax over the keys of q̄·φ(k), q̄ the mean query
    feature) against their definition; InLine's centred form ``num - den ū + ū``; the feature maps alone
    (NaN kept)."""
    q, k, v = _qkv(2, 3, 3, 70, 150, 8, 6, dtype, seed=8)
    fq, fk = (K.feature_map(feature, x.clone().requires_grad_(), 4).detach() for x in (q, k))  # PyTorch maps
    weights = torch.ones(fk.shape[:3], dtype=dtype)
    if mode == "rala":
        weights = torch.softmax(0.3 * (fq.mean(2, keepdim=True) @ fk.transpose(-1, -2))[:, :, 0], -1)
    num = (0.5 * fq) @ ((fk * weights[..., None]).transpose(-1, -2) @ v)
    den = (0.5 * fq) @ (fk * weights[..., None]).sum(2)[..., None]
    ubar = v.mean(2, keepdim=True)
    want = {"raw": num, "centred": num - den * ubar + ubar}.get(mode, num / (den + 1e-3))
    got = native.linear_noncausal(q, k, v, 16, None if mode in ("raw", "centred") else 1e-3, feature, 0.5, 4,
                                  0.3 if mode == "rala" else 0.0,  # RALA's q̄ is the mean of φ(q), before q_scale
                                  centred=mode == "centred")
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    x = q.clone()
    x[0, 1, 3, 2] = float("nan")
    want = K.feature_map(feature, x.requires_grad_(), 4).detach()  # the PyTorch map (x requires grad)
    torch.testing.assert_close(native.map_features(x.detach(), feature, 4), want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("name,causal", [("aaren", True), ("aaren", False), ("rat", True), ("rat", False),
                                         ("agent", False), ("rala", False), ("titans", True)])
def test_backward_kernels_stay_finite_at_65536_tokens_in_bfloat16(name, causal):
    """Training at L = 65,536 in bfloat16 on random inputs (the kernels compute in float32): the output and
    every gradient are finite, and the kernel's backward is what ran."""
    from kernel_paths import graph_nodes

    g = torch.Generator().manual_seed(5)
    L = 65_536
    base = torch.randn(1, 2, 1 if name == "aaren" else L, 16, generator=g).to(torch.bfloat16).requires_grad_()
    q = base.expand(1, 2, L, 16) if name == "aaren" else base
    k, v = (torch.randn(1, 2, L, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = attnlab.mechanism(name)(q, k, v, causal=causal)
    kernels = {"aaren": "AarenScanBackward", "rat": "RatChunksBackward" if causal else "RatFinalsBackward",
               "agent": "AgentNonCausalBackward", "rala": "NonCausalBackward", "titans": "MemoryChunksBackward"}
    assert kernels[name] in graph_nodes(out.grad_fn)
    out.float().square().mean().backward()
    for t in (out, base.grad, k.grad, v.grad):
        assert t.dtype == torch.bfloat16 and bool(t.isfinite().all())


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("name,kw", [("sliding_window", {"window": 4}), ("linear", {}), ("titans", {}),
                                     ("rat", {}), ("agent", {"causal": False})])
def test_backward_kernels_refuse_a_second_derivative(name, kw):
    """The kernels' backwards are first derivatives only: differentiating a gradient through one (a gradient
    penalty, a Hessian-vector product) raises torch's once_differentiable error instead of leaving that term out."""
    from kernel_paths import graph_nodes

    kw = {"causal": True, **kw}
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attnlab.mechanism(name)(q, k, v, **kw)
    assert any(n.endswith("Backward") and n[:-8] in KERNEL_FUNCTIONS for n in graph_nodes(out.grad_fn))
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad  # (without the mark: a constant, so a penalty on it would add nothing, silently)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (out.sum() + dq.square().sum()).backward()


#: The autograd Functions around C++ backward kernels.
KERNEL_FUNCTIONS = ("RangeAttention", "Chunks", "NonCausal", "MemoryChunks", "RatChunks", "RatFinals",
                    "AgentNonCausal", "AarenScan")
