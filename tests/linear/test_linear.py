"""``linear``, ``lightning`` and ``retention``: the definitions, checked against independent formulas."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.entries.linear import favor_projection

pytestmark = pytest.mark.usefixtures("single_thread")


def qkv(B=2, H=3, L=21, D=8, Dv=5, seed=0, Lq=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Lq or L, D), r(B, H, L, D), r(B, H, L, Dv)


def test_elu_linear_transformer_formula():
    """Katharopoulos et al. eq. (3)/(5): o_i = φ(q_i) Σ_j φ(k_j) v_jᵀ / φ(q_i) Σ_j φ(k_j), φ = elu + 1."""
    q, k, v = qkv()
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    m = attnlab.mechanism("linear")
    for causal in (False, True):
        s = phi(q) @ phi(k).transpose(-1, -2)
        if causal:
            s = s.tril()
        want = (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)
        for impl in ("parallel", "chunked", "recurrent"):
            torch.testing.assert_close(m(q, k, v, causal=causal, impl=impl), want, atol=1e-12, rtol=0)


def test_favor_approximates_softmax_attention():
    """FAVOR+ is an unbiased estimator of the softmax kernel: more features, closer to softmax attention."""
    q, k, v = (x * 0.5 for x in qkv(B=1, H=2, L=64, D=8, Dv=4))
    exact = attnlab.mechanism("dense").reference(q, k, v)
    m = attnlab.mechanism("linear")
    errs = [float((m(q, k, v, feature_map="favor+", features=f, impl="chunked") - exact).abs().mean())
            for f in (16, 256, 4096)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02, errs


def test_favor_projection_is_orthogonal_in_blocks():
    W = favor_projection(16, 8, seed=3)
    block = W[:8] / W[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(W, favor_projection(16, 8, seed=3)) and not torch.equal(W, favor_projection(16, 8, seed=4))


def test_cosformer_reweighting():
    """cosFormer: relu(q_i)·relu(k_j) cos(π/2 · (i - j)/M), normalized (the decomposition must equal this)."""
    q, k, v = qkv(L=30)
    M = 40
    i = torch.arange(30, dtype=torch.float64)
    w = torch.cos(math.pi / 2 * (i[:, None] - i[None]) / M)
    m = attnlab.mechanism("linear")
    for causal in (False, True):
        s = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * w
        if causal:
            s = s.tril()
        want = (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)
        for impl in ("parallel", "chunked", "recurrent"):
            got = m(q, k, v, causal=causal, impl=impl, feature_map="cosformer", horizon=M)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="horizon"):
        m(q, k, v, feature_map="cosformer")


def test_retention_matches_retnet_recurrence():
    """RetNet: S_n = γ S_{n-1} + k_nᵀ v_n, o_n = q_n S_n, γ_h = 1 - 2^(-5-h); q scaled by `scale`."""
    q, k, v = qkv(H=4)
    gamma = 1 - 2.0 ** (-5 - torch.arange(4, dtype=torch.float64))
    S = torch.zeros(2, 4, 8, 5, dtype=torch.float64)
    outs = []
    for n in range(q.shape[2]):
        S = gamma[:, None, None] * S + k[:, :, n, :, None] * v[:, :, n, None, :]
        outs.append((q[:, :, n, None, :] * 8 ** -0.5 @ S)[:, :, 0])
    want = torch.stack(outs, 2)
    m = attnlab.mechanism("retention")
    for impl in ("parallel", "chunked", "recurrent"):
        torch.testing.assert_close(m(q, k, v, causal=True, impl=impl, chunk_size=4), want, atol=1e-12, rtol=0)
    # Bidirectional: γ^|i - j|.
    i = torch.arange(q.shape[2], dtype=torch.float64)
    w = gamma[:, None, None] ** (i[:, None] - i[None]).abs()
    want = ((q * 8 ** -0.5 @ k.transpose(-1, -2)) * w) @ v
    for impl in ("parallel", "chunked", "recurrent"):
        torch.testing.assert_close(m(q, k, v, impl=impl, chunk_size=4), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 21, 64])
def test_lightning_chunk_size_changes_nothing(chunk):
    q, k, v = qkv()
    m = attnlab.mechanism("lightning")
    ref = m(q, k, v, causal=True, impl="parallel")
    torch.testing.assert_close(m(q, k, v, causal=True, impl="chunked", chunk_size=chunk), ref, atol=1e-12, rtol=0)


def test_lightning_decay_is_alibi_slopes():
    """Lightning Attention-2's per-head decay: λ_h = exp(-s_h) with ALiBi slopes s_h = 2^(-8(h+1)/H)."""
    q, k, v = qkv(H=4, L=6)
    slopes = 2.0 ** (-8 * (torch.arange(4, dtype=torch.float64) + 1) / 4)
    i = torch.arange(6, dtype=torch.float64)
    w = (torch.exp(-slopes[:, None, None] * (i[:, None] - i[None]))).tril()
    want = ((q * 8 ** -0.5 @ k.transpose(-1, -2)) * w) @ v
    torch.testing.assert_close(attnlab.mechanism("lightning")(q, k, v, causal=True), want, atol=1e-12, rtol=0)


def test_decay_gradient_flows_to_log_decay():
    q, k, v = qkv(H=2, L=9)
    lam = torch.tensor([-0.3, -0.05], dtype=torch.float64, requires_grad=True)
    m = attnlab.mechanism("lightning")
    grads = []
    for impl in ("parallel", "chunked", "recurrent"):
        (g,) = torch.autograd.grad(m(q, k, v, causal=True, impl=impl, log_decay=lam, chunk_size=4).sum(), lam)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-10, rtol=0)
    assert grads[0].abs().min() > 0


def test_bad_parameters_name_the_argument():
    q, k, v = qkv(H=2)
    with pytest.raises(ValueError, match="log_decay"):
        attnlab.mechanism("lightning")(q, k, v, log_decay=torch.tensor([0.1, -0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="log_decay"):
        attnlab.mechanism("retention")(q, k, v, log_decay=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        attnlab.mechanism("lightning")(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map"):
        attnlab.mechanism("linear")(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="noncausal_cross"):  # decayed forms define no non-causal cross attention
        attnlab.mechanism("retention")(q[:, :, :5], k, v)


def test_step_time_state_is_constant_size():
    m = attnlab.mechanism("lightning")
    q, k, v = qkv(B=1, H=2, L=50)
    _, s = m.scan(q, k, v)
    o, s2 = m.step(s, q[:, :, 0], k[:, :, 0], v[:, :, 0])
    assert s2.length == 51 and s2.floats == s.floats == m.state_size(2, 8, 5)


def test_flops_count_the_chunked_forms_gemms():
    """Causal: per chunk the visible intra pairs (QKᵀ, AV) plus KᵀV and Q·S; non-causal without decay:
    the two GEMMs KᵀV and Q·S only; with a decay: two causal scans."""
    q, k, v = qkv(B=1, H=2, L=128, D=8, Dv=8)
    lin, ret = attnlab.mechanism("linear"), attnlab.mechanism("retention")
    call = lin.prepare(q, k, v, causal=False, normalize=False, chunk_size=32)
    assert lin.flops(call) == 2 * 2 * 8 * 8 * (128 + 128)
    causal = lin.prepare(q, k, v, causal=True, normalize=False, chunk_size=32)
    per_chunk = 2 * (32 * 33 / 2) * (8 + 8) + 4 * 32 * 8 * 8
    assert lin.flops(causal) == 2 * per_chunk * 128 / 32
    assert ret.flops(ret.prepare(q, k, v, causal=False, chunk_size=32)) == 2 * ret.flops(
        ret.prepare(q, k, v, causal=True, chunk_size=32))
