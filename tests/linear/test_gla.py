"""``gla``: Gated Linear Attention (Yang et al. 2024) and ViG's bidirectional form (Liao et al. 2024),
checked against independent computations. Per-channel gates (``Dk`` of them per token) are checked
here: the conformance examples use one gate per head and token (see attnlab/entries/gla.py)."""
from __future__ import annotations

import re

import pytest
import torch

import attnlab
from attnlab.entries.gla import gate_log

pytestmark = pytest.mark.usefixtures("single_thread")

IMPLS = ("parallel", "chunked", "recurrent")
GLA = attnlab.mechanism("gla")


def qkv(B=2, H=2, L=23, D=6, Dv=5, seed=0, Lq=None, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Lq or L, D), r(B, Hkv or H, L, D), r(B, Hkv or H, L, Dv)


def gates(B=2, H=2, L=23, F=6, seed=1):
    return gate_log(torch.randn(B, H, L, F, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3,
                    normalizer=2.0)


def causal_loop(q, k, v, g, scale):
    """GLA's recurrence, token by token: S_t = Diag(exp g_t) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t
    (bottom-right: query i reads the state after key i + Lk - Lq)."""
    B, H, Lk, D = k.shape
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype)
    states = []
    for t in range(Lk):
        S = g[:, :, t].exp()[..., None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        states.append(S)
    off = Lk - q.shape[2]
    return torch.stack([scale * (q[:, :, i, None, :] @ states[i + off])[:, :, 0] for i in range(q.shape[2])], 2)


def test_gate_log_is_glas_normalized_logsigmoid():
    x = torch.randn(3, 4, dtype=torch.float64) * 5
    torch.testing.assert_close(gate_log(x), torch.nn.functional.logsigmoid(x) / 16, atol=0, rtol=0)
    assert bool((gate_log(x) <= 0).all())
    with pytest.raises(ValueError, match="normalizer"):
        gate_log(x, normalizer=0)


@pytest.mark.parametrize("Lq", [None, 9])
def test_per_channel_gates_match_the_recurrence(Lq):
    """Per-channel gates (B, H, L, Dk) in every form equal GLA's token-by-token recurrence, incl. causal cross."""
    q, k, v = qkv(Lq=Lq)
    g = gates()
    want = causal_loop(q, k, v, g, 6 ** -0.5)
    for impl in IMPLS:
        got = GLA(q, k, v, causal=True, impl=impl, log_gates=g, chunk_size=5)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_zero_gates_are_plain_causal_linear_attention():
    """g = 0 (forget gates 1): linear attention, identity feature map, no normalizer, same scale."""
    q, k, v = qkv()
    lin = attnlab.mechanism("linear")
    for Lq in (23, 11):
        want = lin(q[:, :, :Lq], k, v, causal=True, impl="parallel", feature_map="identity", normalize=False)
        for impl in IMPLS:
            for shape in ((1, 1, 23, 1), (2, 2, 23, 6)):
                got = GLA(q[:, :, :Lq], k, v, causal=True, impl=impl, log_gates=torch.zeros(shape, dtype=q.dtype),
                          chunk_size=4)
                torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_constant_per_head_gates_are_retention():
    """g_t = λ_h for every token (and channel): retention with per-head decay exp(λ_h)."""
    q, k, v = qkv(H=3)
    lam = -torch.tensor([0.05, 0.3, 1.2], dtype=torch.float64)
    ret = attnlab.mechanism("retention")
    want = ret(q, k, v, causal=True, impl="parallel", log_decay=lam)
    for impl in IMPLS:
        for F in (1, 6):
            g = lam.view(1, 3, 1, 1).expand(1, 3, 23, F).contiguous()
            torch.testing.assert_close(GLA(q, k, v, causal=True, impl=impl, log_gates=g, chunk_size=7), want,
                                       atol=1e-12, rtol=0)


def bidirectional_reference(q, k, v, g, b, scale):
    """ViG, written out pair by pair: o_i = ½ [Σ_{j<=i} Σ_f q_if k_jf exp(Σ_{p=j+1..i} g_pf) v_j
    + Σ_{j>=i} Σ_f q_if k_jf exp(Σ_{p=i..j-1} b_pf) v_j] · scale."""
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype)
    for i in range(L):
        for j in range(L):
            if j <= i:
                w = g[:, :, j + 1:i + 1].sum(2).exp()  # empty sum for j == i
                out[:, :, i] += 0.5 * scale * (q[:, :, i] * k[:, :, j] * w).sum(-1, keepdim=True) * v[:, :, j]
            if j >= i:
                w = b[:, :, i:j].sum(2).exp()
                out[:, :, i] += 0.5 * scale * (q[:, :, i] * k[:, :, j] * w).sum(-1, keepdim=True) * v[:, :, j]
    return out


def test_bidirectional_is_vigs_forward_plus_backward():
    """Non-causal: ViG's direction-wise form, with separate backward gates and with shared ones (default)."""
    q, k, v = qkv(L=13)
    g, b = gates(L=13), gates(L=13, seed=2)
    for back in (b, None):
        want = bidirectional_reference(q, k, v, g, g if back is None else back, 6 ** -0.5)
        for impl in IMPLS:
            got = GLA(q, k, v, impl=impl, log_gates=g, log_gates_backward=back, chunk_size=4)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_bidirectional_zero_gates_halve_the_off_diagonal():
    """With g = b = 0, ViG's average counts the diagonal once and every other pair half: ½ (full + diag)."""
    q, k, v = qkv()
    s = (q @ k.transpose(-1, -2)) * 6 ** -0.5
    want = 0.5 * (s @ v + torch.diagonal(s, dim1=-2, dim2=-1)[..., None] * v)
    for impl in IMPLS:
        got = GLA(q, k, v, impl=impl, log_gates=torch.zeros(1, 1, 23, 1, dtype=q.dtype))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_wrt_gates_equal_the_parallel_forms(causal):
    """d/d log_gates (and log_gates_backward) of the chunked and recurrent forms equal the parallel form's."""
    q, k, v = qkv(L=19)
    g = gates(L=19).requires_grad_()
    b = gates(L=19, seed=5).requires_grad_()
    extra = {} if causal else {"log_gates_backward": b}
    leaves = (q, k, v, g) if causal else (q, k, v, g, b)
    for x in (q, k, v):
        x.requires_grad_()
    G = torch.randn(2, 2, 19, 5, dtype=torch.float64)
    grads = {}
    for impl in IMPLS:
        out = GLA(q, k, v, causal=causal, impl=impl, log_gates=g, chunk_size=6, **extra)
        grads[impl] = torch.autograd.grad((out * G).sum(), leaves)
    for impl in ("chunked", "recurrent"):
        for a, w in zip(grads[impl], grads["parallel"]):
            torch.testing.assert_close(a, w, atol=1e-11, rtol=0)
    assert float(grads["parallel"][3].abs().max()) > 1e-3  # the gates matter


def test_gradcheck_per_channel_gates():
    """torch.autograd.gradcheck of the chunked form w.r.t. q, k, v and both gate tensors (tiny shape)."""
    q, k, v = (x.requires_grad_() for x in qkv(B=1, H=1, L=7, D=3, Dv=2))
    g = gates(B=1, H=1, L=7, F=3).requires_grad_()
    b = gates(B=1, H=1, L=7, F=3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: GLA(*x[:3], causal=True, impl="chunked", log_gates=x[3],
                                                   chunk_size=3), (q, k, v, g))
    assert torch.autograd.gradcheck(lambda *x: GLA(*x[:3], impl="chunked", log_gates=x[3], log_gates_backward=x[4],
                                                   chunk_size=3), (q, k, v, g, b))


def test_per_channel_gates_through_steps_segments_and_documents():
    """Per-channel gates: m.step token by token, segments continuing the state, and packed documents
    (offsets) equal the parallel form; GQA gates given per kv head equal the repeated call."""
    q, k, v = qkv(H=4, Hkv=2)
    g = gates(H=2)  # per kv head
    rep = lambda x: x.repeat_interleave(2, dim=1)  # noqa: E731
    want = GLA(q, rep(k), rep(v), causal=True, impl="parallel", log_gates=rep(g))
    torch.testing.assert_close(GLA(q, k, v, causal=True, impl="parallel", log_gates=g), want, atol=1e-12, rtol=0)
    state, outs = None, []
    for t in range(23):
        o, state = GLA.step(state, q[:, :, t], k[:, :, t], v[:, :, t], log_gates=g[:, :, t])
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), want, atol=1e-12, rtol=0)
    assert state.floats == 2 * GLA.state_size(4, 6, 5) == 2 * 4 * 6 * 5
    state, outs = None, []
    for n, (a, b) in enumerate(((0, 5), (5, 6), (6, 23))):
        o, state = GLA.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, impl=("chunked", "recurrent")[n % 2],
                            log_gates=g[:, :, a:b], chunk_size=4)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want, atol=1e-12, rtol=0)
    for causal in (True, False):
        docs = [GLA(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal, log_gates=g[:, :, a:b], impl="parallel")
                for a, b in ((0, 8), (8, 9), (9, 23))]
        for impl in IMPLS:
            got = GLA(q, k, v, causal=causal, impl=impl, log_gates=g, offsets=[0, 8, 9])
            torch.testing.assert_close(got, torch.cat(docs, 2), atol=1e-12, rtol=0)


def test_bad_gates():
    q, k, v = qkv()
    g = gates()
    with pytest.raises(TypeError, match="log_gates"):
        GLA(q, k, v, causal=True)  # required
    for bad, what in ((g.abs() + 0.1, "<= 0"), (torch.full_like(g, float("-inf")), "finite"), (g[..., :4], "Dk")):
        with pytest.raises(ValueError, match="log_gates.*" + re.escape(what)):
            GLA(q, k, v, causal=True, log_gates=bad)
    with pytest.raises(ValueError, match="log_gates_backward"):
        GLA(q, k, v, causal=True, log_gates=g, log_gates_backward=g)
    with pytest.raises(ValueError, match="log_gates"):
        GLA(q, k, v, causal=True, log_gates=g[:, :, :20])
    with pytest.raises(ValueError, match="noncausal_cross"):
        GLA(q[:, :, :9], k, v, log_gates=g)


@pytest.mark.parametrize("strength", [0.05, 5.0])
def test_chunked_paths_for_weak_and_strong_gates(strength):
    """Weak gates take the one-GEMM intra-chunk path, strong ones (exp(-G) would overflow float32)
    the (C, C, F) path; both equal the parallel form, in float32 too."""
    from attnlab import linear as K

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64) for _ in range(3))
    log_gates = -strength * torch.rand(1, 2, 70, 8, generator=g, dtype=torch.float64)
    assert (strength * 32 > K.EXP_RANGE[torch.float32]) == (strength > 1)
    m = attnlab.mechanism("gla")
    ref = m(q, k, v, causal=True, impl="parallel", log_gates=log_gates)
    out = m(q, k, v, causal=True, impl="chunked", log_gates=log_gates, chunk_size=32)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    out32 = m(q.float(), k.float(), v.float(), causal=True, impl="chunked", log_gates=log_gates.float(),
              chunk_size=32)
    assert out32.isfinite().all()
    torch.testing.assert_close(out32.double(), ref, atol=1e-4, rtol=1e-4)
