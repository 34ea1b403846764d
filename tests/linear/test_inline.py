"""``inline``: InLine attention checked against independent computations (attnlab/entries/inline.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import native
from kernel_paths import graph_nodes, kernel_and_pytorch_gradients, same_noncausal

pytestmark = pytest.mark.usefixtures("single_thread")

IMPLS = ("parallel", "chunked", "recurrent")
PHI = {"identity": lambda x: x, "relu": torch.relu, "leakyrelu": lambda x: F.leaky_relu(x, 0.01),
       "exp": lambda x: torch.exp(0.2 * x)}


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(B=2, H=2, L=19, D=6, Dv=5, Lq=None, seed=0):
    return rnd(B, H, Lq or L, D, seed=seed), rnd(B, H, L, D, seed=seed + 1), rnd(B, H, L, Dv, seed=seed + 2)


def eq5(q, k, v, phi, scale):
    """The paper's eq. (5) term by term, φ(Q) scaled by scale/N as the official code:
    o_i = Σ_j [φq_i·φk_j − (1/N) Σ_s φq_i·φk_s + 1/N] v_j with φq_i = φ(q_i) scale / N."""
    B, H, Lq, _ = q.shape
    N = k.shape[2]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=q.dtype)
    for i in range(Lq):
        fq = phi(q[:, :, i]) * scale / N
        dots = [(fq * phi(k[:, :, s])).sum(-1) for s in range(N)]
        mean = sum(dots) / N
        for j in range(N):
            out[:, :, i] += (dots[j] - mean + 1 / N)[..., None] * v[:, :, j]
    return out


def official(q, k, v, phi, scale):
    """The official code's linear-time algebra: q @ kv + (1 - q @ k̄ᵀ scale) v̄, kv = (scale/N) Kᵀ V."""
    fq, fk, N = phi(q), phi(k), k.shape[2]
    kv = fk.transpose(-1, -2) @ v * (scale / N)
    return fq @ kv + (1 - fq @ fk.mean(2, keepdim=True).transpose(-1, -2) * scale) * v.mean(2, keepdim=True)


@pytest.mark.parametrize("fmap", sorted(PHI))
@pytest.mark.parametrize("Lq", [19, 7])
def test_noncausal_equals_eq5_and_the_official_algebra(fmap, Lq):
    m = attnlab.mechanism("inline")
    q, k, v = qkv(Lq=Lq)
    want = eq5(q, k, v, PHI[fmap], 6 ** -0.5)
    torch.testing.assert_close(official(q, k, v, PHI[fmap], 6 ** -0.5), want, atol=1e-12, rtol=0)
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, feature_map=fmap, impl=impl), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("Lq", [19, 8, 25])
def test_causal_is_inline_on_each_visible_prefix(Lq):
    """causal: N becomes the number of visible keys i' + 1; every row is eq. (5) on its prefix (zero without keys)."""
    m = attnlab.mechanism("inline")
    q, k, v = qkv(Lq=Lq)
    off = 19 - Lq
    rows = [eq5(q[:, :, i:i + 1], k[:, :, :i + off + 1], v[:, :, :i + off + 1], torch.relu, 0.3)[:, :, 0]
            if i + off >= 0 else torch.zeros_like(v[:, :, 0]) for i in range(Lq)]
    want = torch.stack(rows, dim=2)
    for impl in IMPLS:
        got = m(q, k, v, causal=True, feature_map="relu", scale=0.3, impl=impl, chunk_size=4)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_weights_sum_to_one():
    """Normalization by subtraction: every row's weights sum to 1, so constant values come back unchanged."""
    m = attnlab.mechanism("inline")
    q, k, _ = qkv()
    c = rnd(2, 2, 1, 5, seed=4).expand(-1, -1, 19, -1)
    for causal in (False, True):
        for impl in IMPLS:
            torch.testing.assert_close(m(q, k, c, causal=causal, feature_map="exp", impl=impl), c, atol=1e-12, rtol=0)


def test_injective_where_linear_attention_is_not():
    """Han et al. 2024 (injectivity): division-normalized linear attention maps q and 2q (relu kernel: φ(2q) = 2φ(q))
    to one distribution; InLine distinguishes them. Weights are read with identity values (V = I)."""
    q, k, _ = qkv(B=1, H=1, L=12)
    eye = torch.eye(12, dtype=torch.float64).expand(1, 1, 12, 12)
    inline = attnlab.mechanism("inline")
    linear = attnlab.mechanism("linear")
    w_lin = [linear(x, k, eye, feature_map="relu", eps=0.0) for x in (q, 2 * q)]
    torch.testing.assert_close(w_lin[0], w_lin[1], atol=1e-12, rtol=0)
    w_in = [inline(x, k, eye, feature_map="relu") for x in (q, 2 * q)]
    assert (w_in[0] - w_in[1]).abs().amax(-1).min() > 1e-3  # every query's distribution changed
    torch.testing.assert_close(w_in[0].sum(-1), torch.ones(1, 1, 12, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_local_term_is_a_depthwise_convolution(causal):
    """local_i = Σ_t W[t, c] v_{i - p + t, c}: the official zero-padded depthwise convolution (cross-correlation),
    centred (p = (w - 1)/2) non-causal, over the last w positions causal; per batch, head and channel."""
    m = attnlab.mechanism("inline")
    q, k, v = qkv()
    B, H, L, Dv = v.shape
    w = 3 if not causal else 4
    W = rnd(B, H, w, Dv, seed=8)
    x = v.permute(0, 1, 3, 2).reshape(1, B * H * Dv, L)
    kern = W.permute(0, 1, 3, 2).reshape(B * H * Dv, 1, w)
    pad = (w - 1, 0) if causal else ((w - 1) // 2, (w - 1) // 2)
    conv = F.conv1d(F.pad(x, pad), kern, groups=B * H * Dv).reshape(B, H, Dv, L).permute(0, 1, 3, 2)
    base = m(q, k, v, causal=causal)
    for impl in IMPLS:
        got = m(q, k, v, causal=causal, local_weights=W, impl=impl, chunk_size=5)
        torch.testing.assert_close(got - base, conv, atol=1e-12, rtol=0)


def test_local_term_continues_across_segments_and_steps():
    """Per-channel kernels (the conformance examples share one per head): segments and steps carry the last w - 1
    values; gradients of every form (incl. the kernel) equal the parallel form's; gradcheck of the chunked form."""
    m = attnlab.mechanism("inline")
    q, k, v = qkv(B=1, L=11, D=4, Dv=3)
    W = rnd(1, 2, 4, 3, seed=6)
    whole = m(q, k, v, causal=True, local_weights=W)
    o1, s = m.scan(q[:, :, :2], k[:, :, :2], v[:, :, :2], local_weights=W, chunk_size=3)
    o2, s = m.scan(q[:, :, 2:7], k[:, :, 2:7], v[:, :, 2:7], s, local_weights=W, impl="recurrent")
    outs = [o1, o2]
    for t in range(7, 11):
        o, s = m.step(s, q[:, :, t], k[:, :, t], v[:, :, t], local_weights=W)
        outs.append(o[:, :, None])
    torch.testing.assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)
    assert s.floats == m.state_size(2, 4, 3, local_weights=W) == 2 * (4 * 4 + 3 + 3 * 3)
    G = rnd(1, 2, 11, 3, seed=12)
    for causal in (False, True):
        Wc = W if causal else W[:, :, :3]
        grads = {}
        for impl in IMPLS:
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, Wc)]
            out = m(*leaves[:3], local_weights=leaves[3], causal=causal, impl=impl, chunk_size=4)
            grads[impl] = torch.autograd.grad((out * G).sum(), leaves)
        for impl in ("chunked", "recurrent"):
            for g, r in zip(grads[impl], grads["parallel"]):
                torch.testing.assert_close(g, r, atol=1e-11, rtol=0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, W)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: m(a, b, c, local_weights=d, causal=True, impl="chunked", chunk_size=4), leaves)


def test_gqa_local_weights_per_kv_head():
    """A kernel per key/value head applies to every query head of its group (v is shared by the group)."""
    m = attnlab.mechanism("inline")
    q, _, _ = qkv(H=4)
    _, k, v = qkv(H=2)
    W = rnd(1, 2, 3, 5, seed=2)
    rep = lambda t: t.repeat_interleave(2, dim=1)  # noqa: E731
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, local_weights=W, impl=impl),
                                   m(q, rep(k), rep(v), local_weights=rep(W), impl="parallel"), atol=1e-12, rtol=0)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("fmap,Lq,local", [("identity", 150, False), ("relu", 70, True), ("exp", 150, True)])
def test_noncausal_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, fmap, Lq, local):
    """Non-causal (cross lengths too, with a local term): the centred C++ kernel equals the PyTorch path (the
    kernels turned off) and the parallel form, and so do its backward kernel's gradients (the mean value and
    the key sums reach every key and value); a NaN key makes every row of its head NaN on both paths."""
    m = attnlab.mechanism("inline")
    q, k, v = (t.to(dtype) for t in qkv(B=2, H=3, L=150, D=8, Dv=6, Lq=Lq, seed=4))
    params = {"feature_map": fmap, "chunk_size": 16, **({"local_weights": rnd(1, 3, 3, 6, seed=5).to(dtype)}
                                                        if local else {})}
    same_noncausal(m, q, k, v, tol, (1, 0, 40, 2), **params)
    G = rnd(2, 3, Lq, 6, seed=6).to(dtype)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = m(*leaves, causal=False, **params)
        return [out.detach(), *torch.autograd.grad((out * G).sum(), leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(grads, "NonCausalBackward", 10 * tol)


def test_bad_local_weights_raise_naming_them():
    m = attnlab.mechanism("inline")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="local_weights"):
        m(q, k, v, local_weights=rnd(1, 2, 4, 5))  # even window, non-causal
    with pytest.raises(ValueError, match="local_weights"):
        m(q, k, v, local_weights=rnd(1, 2, 3, 4))  # Dv 4 != 5
    with pytest.raises(ValueError, match="local_weights"):
        m(q, k, v, local_weights=rnd(3, 2, 3, 5))  # batch 3 != 2
    _, s = m.scan(q, k, v, local_weights=rnd(1, 2, 3, 5))
    with pytest.raises(ValueError, match="local_weights"):
        m.step(s, q[:, :, 0], k[:, :, 0], v[:, :, 0])  # the state carries a window of 3
