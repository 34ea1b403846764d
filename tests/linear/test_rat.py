"""``rat``: intra-chunk recurrence + inter-chunk softmax attention, against a direct loop and its two limits."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab import native
from kernel_paths import graph_nodes, kernel_and_pytorch_gradients

pytestmark = pytest.mark.usefixtures("single_thread")
FORMS = ("parallel", "chunked", "recurrent")
M = attnlab.mechanism("rat")


def qkv(B=2, H=2, L=23, D=6, Dv=6, seed=0, Lq=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Lq or L, D), r(B, H, L, D), r(B, H, L, Dv)


def gates(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive(q, k, v, gk, gv, C, causal=True):
    """RAT as the paper writes it, one position at a time: the EMA restarted at each chunk, then a softmax
    over [finals of earlier chunks; own running summary] (non-causal: over every chunk's final)."""
    Lq, Lk = q.shape[2], k.shape[2]
    sk, sv = [], []
    for t in range(Lk):
        if t % C == 0:
            ck, cv = (1 - gk[:, :, t]) * k[:, :, t], (1 - gv[:, :, t]) * v[:, :, t]
        else:
            ck = gk[:, :, t] * ck + (1 - gk[:, :, t]) * k[:, :, t]
            cv = gv[:, :, t] * cv + (1 - gv[:, :, t]) * v[:, :, t]
        sk.append(ck)
        sv.append(cv)
    ends = [t for t in range(Lk) if t % C == C - 1 or t == Lk - 1]
    outs = []
    for i in range(Lq):
        p = i + Lk - Lq
        if causal:
            if p < 0:
                outs.append(torch.zeros_like(v[:, :, 0]))
                continue
            idx = [t for t in ends if t < (p // C) * C] + [p]
        else:
            idx = ends
        keys, vals = torch.stack([sk[j] for j in idx], 2), torch.stack([sv[j] for j in idx], 2)
        w = torch.softmax(torch.einsum("bhd,bhnd->bhn", q[:, :, i], keys) / math.sqrt(q.shape[-1]), -1)
        outs.append(torch.einsum("bhn,bhnd->bhd", w, vals))
    return torch.stack(outs, 2)


@pytest.mark.parametrize("causal,Lq", [(True, 23), (True, 9), (True, 30), (False, 23), (False, 9)])
def test_matches_the_direct_definition_forward_and_backward(causal, Lq):
    """Per-channel gates for keys and values (F = D + Dv), chunk 4 (not dividing 23): every form equals the
    direct loop, outputs and gradients w.r.t. q, k, v and the gates; causal cross both ways, non-causal."""
    q, k, v = qkv(Dv=5, Lq=Lq)
    g = gates(2, 2, 23, 11)
    m = attnlab.mechanism("rat")
    G = torch.randn(2, 2, Lq, 5, dtype=torch.float64)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, g)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad((out * G).sum(), leaves))

    want = run(lambda q_, k_, v_, g_: naive(q_, k_, v_, g_[..., :6], g_[..., 6:], 4, causal))
    for impl in FORMS:
        got = run(lambda q_, k_, v_, g_: m(q_, k_, v_, causal=causal, impl=impl, chunk=4, gates=g_))
        for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"{impl} {name}")


def test_gate_forms_shared_per_head_and_constant():
    """F = D (Dv == D: one gate per channel for keys and values, RAT's code), F = 1, and the constant gate."""
    q, k, v = qkv()
    m = attnlab.mechanism("rat")
    for g, gk in ((gates(1, 2, 23, 6), None), (gates(2, 1, 23, 1), None), (None, 0.3)):
        kw = {"gates": g} if g is not None else {"gate": gk}
        gg = g.expand_as(k) if g is not None else torch.full_like(k, gk)
        want = naive(q, k, v, gg, gg, 5)
        for impl in FORMS:
            torch.testing.assert_close(m(q, k, v, causal=True, impl=impl, chunk=5, **kw), want, atol=1e-12, rtol=0)


def test_chunk_one_is_softmax_attention():
    """chunk = 1: every summary is one gated token, so RAT is causal softmax attention over (1-g)k, (1-g)v —
    exactly the dense oracle for g = 0 (self and causal cross, GQA)."""
    q, k, v = qkv(H=4, Dv=5)
    k2, v2 = k[:, :2], v[:, :2]
    dense, m = attnlab.mechanism("dense"), attnlab.mechanism("rat")
    g = gates(2, 2, 23, 11)
    for Lq in (23, 8):
        qq = q[:, :, -Lq:]
        plain = dense(qq, k2, v2, causal=True)
        gated = dense(qq, (1 - g[..., :6]) * k2, (1 - g[..., 6:]) * v2, causal=True)
        for impl in FORMS:
            torch.testing.assert_close(m(qq, k2, v2, causal=True, impl=impl, chunk=1, gate=0.0), plain, atol=1e-12,
                                       rtol=0)
            torch.testing.assert_close(m(qq, k2, v2, causal=True, impl=impl, chunk=1, gates=g), gated, atol=1e-12,
                                       rtol=0)
    torch.testing.assert_close(m(q, k2, v2, chunk=1, gate=0.0), dense(q, k2, v2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [23, 100])
def test_chunk_of_the_whole_sequence_is_the_linear_recurrence(chunk):
    """chunk >= L: a single chunk, softmax over one summary, o_t = ṽ_t with ṽ_t = g_t ṽ_{t-1} + (1-g_t) v_t."""
    q, k, v = qkv(Dv=5)
    g = gates(2, 2, 23, 11)
    h, want = torch.zeros(2, 2, 5, dtype=torch.float64), []
    for t in range(23):
        h = g[:, :, t, 6:] * h + (1 - g[:, :, t, 6:]) * v[:, :, t]
        want.append(h)
    want = torch.stack(want, 2)
    m = attnlab.mechanism("rat")
    for impl in FORMS:
        torch.testing.assert_close(m(q, k, v, causal=True, impl=impl, chunk=chunk, gates=g), want, atol=1e-12, rtol=0)
        # non-causal: every query reads the one final summary
        torch.testing.assert_close(m(q, k, v, impl=impl, chunk=chunk, gates=g), want[:, :, -1:].expand_as(want),
                                   atol=1e-12, rtol=0)


def test_segments_with_per_channel_gates_continue_mid_chunk():
    """scan in pieces cut inside chunks (and on a boundary) equals the whole; chunked and recurrent states agree."""
    q, k, v = qkv(L=31, Dv=5)
    g = gates(2, 2, 31, 11)
    m = attnlab.mechanism("rat")
    whole = m(q, k, v, causal=True, impl="parallel", chunk=4, gates=g)
    for cuts in ((0, 6, 8, 31), (0, 8, 17, 31), (0, 1, 2, 31)):
        state, outs = None, []
        for (a, b), impl in zip(zip(cuts[:-1], cuts[1:]), ("chunked", "recurrent", "chunked")):
            o, state = m.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, impl=impl, chunk=4, gates=g[:, :, a:b])
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)
    _, s_chunk = m.scan(q, k, v, impl="chunked", chunk=4, gates=g)
    _, s_rec = m.scan(q, k, v, impl="recurrent", chunk=4, gates=g)
    for name in s_rec.tensors:
        torch.testing.assert_close(s_chunk[name], s_rec[name], atol=1e-12, rtol=0)


def test_state_holds_one_summary_per_finished_chunk():
    """After t tokens: ⌈t/C⌉ - 1 finished summaries + the running one; floats = state_size(length=t)."""
    q, k, v = qkv(B=1, L=40, D=4, Dv=3)
    m = attnlab.mechanism("rat")
    state = None
    for t in range(40):
        _, state = m.step(state, q[:, :, t], k[:, :, t], v[:, :, t], chunk=6)
        n = t + 1
        assert state["keys"].shape[2] == math.ceil(n / 6) - 1
        assert state.floats == m.state_size(2, 4, 3, length=n, chunk=6) == 2 * math.ceil(n / 6) * (4 + 3)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk,gates,Lq", [(16, None, 150), (7, "key+value", 70), (5, "per-head", 150),
                                           (200, None, 70)])
def test_noncausal_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, chunk, gates, Lq):
    """Non-causal (cross lengths too): the chunks' finals by the C++ recurrence, then attention over them, equal
    the PyTorch path (the kernels turned off) and the definition, output and gradients (q, k, v, gates: the
    finals' backward kernel); a NaN key makes every row of its head NaN on both paths."""
    g = torch.Generator().manual_seed(11)
    B, H, L, D, Dv = 2, 3, 150, 8, 6
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(dtype) for d in (D, Dv))
    params = {"chunk": chunk}
    if gates is not None:
        shape = (1, H, L, 1) if gates == "per-head" else (B, H, L, D + Dv)
        params["gates"] = torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    fast = M(q, k, v, causal=False, **params)
    with native.disabled():
        torch.testing.assert_close(fast, M(q, k, v, causal=False, **params), atol=tol, rtol=tol)
    torch.testing.assert_close(fast, M(q, k, v, causal=False, impl="parallel", **params), atol=tol, rtol=tol)
    G = torch.randn(fast.shape, generator=g, dtype=torch.float64).to(dtype)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in [q, k, v] + list(params.values())[1:]]
        out = M(*leaves[:3], causal=False, chunk=chunk, **dict(zip(list(params)[1:], leaves[3:])))
        return [out.detach(), *torch.autograd.grad((out * G).sum(), leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(grads, "RatFinalsBackward", 10 * tol)
    k[1, 2, 60, 3] = float("nan")
    assert M(q, k, v, causal=False, **params)[1, 2].isnan().all()
    with native.disabled():
        assert M(q, k, v, causal=False, **params)[1, 2].isnan().all()


def test_flops_count_visible_pairs():
    """The attention term of the FLOP count uses the pairs the definition makes visible (counted by the loop)."""
    m = attnlab.mechanism("rat")
    for L, Lq, C, causal in ((37, 37, 4, True), (37, 23, 5, True), (20, 30, 3, True), (37, 23, 4, False)):
        q, k, v = qkv(B=1, H=1, L=L, D=4, Dv=3, Lq=Lq)
        call = m.prepare(q, k, v, causal=causal, chunk=C)
        ends = [t for t in range(L) if t % C == C - 1 or t == L - 1]
        pairs = sum((len([t for t in ends if t < (p // C) * C]) + 1 if causal else len(ends))
                    for p in (i + L - Lq for i in range(Lq)) if p >= 0 or not causal)
        scans = 3 * L * (4 + 3)  # g h + (1 - g) x per key and value channel and token
        assert m.flops(call) == scans + pairs * (2 * 4 + 2 * 3 + 3), (L, Lq, C, causal)


def test_bad_gates_raise_naming_gates():
    q, k, v = qkv()
    m = attnlab.mechanism("rat")
    for bad, what in ((gates(1, 2, 23, 1) + 1, r"\[0, 1\]"), (gates(1, 2, 23, 4), "D \\+ Dv = 12"),
                      (gates(1, 2, 22, 1), "Lk=23")):
        with pytest.raises(ValueError, match=f"gates.*{what}"):
            m(q, k, v, causal=True, gates=bad)
    with pytest.raises(ValueError, match="gate"):
        m(q, k, v, gate=1.5)
    with pytest.raises(ValueError, match="chunk"):
        m(q, k, v, chunk=0)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk,gates", [(4, "key+value"), (5, "per-head"), (3, None), (1, "shared"), (64, None),
                                         (16, "shared")])
def test_causal_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, chunk, gates):
    """The C++ kernel equals the PyTorch path (the kernels turned off), output and state, over segments that
    start and end inside chunks (more than one block of rows), for every gate shape; a NaN key makes the same
    outputs NaN on both paths."""
    g = torch.Generator().manual_seed(9)
    B, H, L, D, Dv = 2, 3, 150, 8, 8
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(dtype) for d in (D, D, Dv))
    F = {"key+value": D + Dv, "per-head": 1, "shared": D}
    params = {"chunk": chunk}
    if gates is not None:
        shape = (1, H, L, 1) if gates == "per-head" else (B, H, L, F[gates])
        params["gates"] = torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    cuts = [0, 3, 4, 11, 16, 90, L]

    def segments(q, k):
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = {n: (x[:, :, a:b] if n == "gates" else x) for n, x in params.items()}
            o, state = M.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, **seg)
            outs.append(o)
        return torch.cat(outs, 2), state

    fast, fast_state = segments(q, k)
    with native.disabled():
        slow, slow_state = segments(q, k)
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    for name in fast_state.tensors:
        torch.testing.assert_close(fast_state[name], slow_state[name], atol=tol, rtol=tol)
    k[1, 2, 70, 3] = float("nan")
    bad, _ = segments(q, k)
    with native.disabled():
        assert torch.equal(bad.isnan(), segments(q, k)[0].isnan())
    assert bad[1, 2, 70:].isnan().all() and not bad[1, 2, :70].isnan().any() and not bad[0].isnan().any()


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk,gates,cuts", [(4, "key+value", (0, 3, 4, 11, 16, 90, 150)), (5, "per-head", (0, 150)),
                                              (3, None, (0, 70, 150)), (16, "shared", (0, 7, 150)),
                                              (1, "shared", (0, 150)), (64, "key+value", (0, 100, 150))])
def test_causal_cpp_backward_equals_autograd_of_the_pytorch_path(dtype, tol, chunk, gates, cuts):
    """The kernel's backward (attention over the finals and the own summary, then the recurrences read
    backwards) equals autograd through the PyTorch path: q, k, v and the gates, over segments that carry the
    state (its finals and running summary reach the later segments' gradients), with a loss on the outputs and
    on the final state; the kernel's backward is what ran (one per segment)."""
    g = torch.Generator().manual_seed(11)
    B, H, L, D, Dv = 2, 3, 150, 8, 6
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(dtype) for d in (D, D, Dv))
    F = {"key+value": D + Dv, "per-head": 1, "shared": D}
    gate = None
    if gates is not None:
        shape = (1, H, L, 1) if gates == "per-head" else (B, H, L, F[gates])
        gate = torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    if gates == "shared":
        v = v[..., :1].expand(-1, -1, -1, D).contiguous() + torch.randn(B, H, L, D, generator=g).to(dtype)
    G = torch.randn(B, H, L, v.shape[-1], generator=g, dtype=torch.float64).to(dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v) + ((gate,) if gate is not None else ())]
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = {"chunk": chunk} if gate is None else {"chunk": chunk, "gates": leaves[3][:, :, a:b]}
            o, state = M.scan(*(x[:, :, a:b] for x in leaves[:3]), state, **seg)
            outs.append(o)
        out = torch.cat(outs, 2)
        loss = (out * G).sum() + sum((x * x.detach().cos()).sum() for x in state.tensors.values())
        return [out.detach(), *torch.autograd.grad(loss, leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(run, "RatChunksBackward", tol, times=len(cuts) - 1)  # one per segment
