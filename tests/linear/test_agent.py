"""``agent``: Agent Attention checked against independent computations (attnlab/entries/agent.py)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import attnlab
from attnlab import conformance as C
from attnlab import native
from kernel_paths import graph_nodes, kernel_and_pytorch_gradients, same_noncausal, same_segments

pytestmark = pytest.mark.usefixtures("single_thread")

IMPLS = ("parallel", "chunked", "recurrent")


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(B=2, H=3, L=29, D=8, Dv=5, Lq=None, seed=0):
    return rnd(B, H, Lq or L, D, seed=seed), rnd(B, H, L, D, seed=seed + 1), rnd(B, H, L, Dv, seed=seed + 2)


def pooled(q, n):
    """Adaptive average pooling written out: agent a averages queries floor(a L / n) .. ceil((a + 1) L / n) - 1."""
    L = q.shape[2]
    return torch.stack([q[:, :, (a * L) // n:math.ceil((a + 1) * L / n)].mean(2) for a in range(n)], dim=2)


def generalized_linear(q, k, v, A, scale):
    """O = φ_q(Q) φ_k(K)ᵀ V with φ_q(Q) = softmax(scale Q Aᵀ), φ_k(K)ᵀ = softmax(scale A Kᵀ) (rows over keys)."""
    phi_q = torch.softmax(scale * q @ A.transpose(-1, -2), dim=-1)  # (B, H, Lq, n)
    phi_k_t = torch.softmax(scale * A @ k.transpose(-1, -2), dim=-1)  # (B, H, n, Lk)
    W = phi_q @ phi_k_t
    return W @ v, W


@pytest.mark.parametrize("Lq", [29, 11])
def test_equals_generalized_linear_attention(Lq):
    """Han et al. 2024: agent attention is linear attention with φ_q = softmax(QAᵀ), φ_k = softmax(AKᵀ)ᵀ;
    its attention matrix has rank <= n and rows summing to 1."""
    m = attnlab.mechanism("agent")
    q, k, v = qkv(Lq=Lq)
    n, scale = 6, 8 ** -0.5
    A = rnd(1, 3, n, 8, seed=7)
    want, W = generalized_linear(q, k, v, A, scale)
    torch.testing.assert_close(W.sum(-1), torch.ones_like(W[..., 0]), atol=1e-12, rtol=0)
    assert int(torch.linalg.matrix_rank(W).max()) <= n < min(W.shape[-2:])
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, agents=A, impl=impl), want, atol=1e-12, rtol=0)
    # Default: agents pooled from the queries (the paper's adaptive average pooling, on the sequence).
    want, _ = generalized_linear(q, k, v, pooled(q, 4), scale)
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, n_agents=4, impl=impl), want, atol=1e-12, rtol=0)
    want, _ = generalized_linear(q, k, v, pooled(q, 16), scale)
    torch.testing.assert_close(m(q, k, v), want, atol=1e-12, rtol=0)  # default n_agents = 16


def test_single_agent_gives_one_row():
    """With one agent every query reads the same V_A = softmax(scale a Kᵀ) V."""
    m = attnlab.mechanism("agent")
    q, k, v = qkv()
    a = rnd(2, 3, 1, 8, seed=3)
    want = torch.softmax(a @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1) @ v  # (B, H, 1, Dv)
    for impl in IMPLS:
        torch.testing.assert_close(m(q, k, v, agents=a, impl=impl), want.expand(-1, -1, 29, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("Lq", [23, 23 + 6, 1])
def test_causal_is_per_query_prefix_aggregation(Lq):
    """causal: V_A^(i) = softmax_{j <= i'}(scale A k_jᵀ) v_j, o_i = softmax(scale q_i Aᵀ) V_A^(i), i' = i + Lk - Lq;
    rows with no visible key are zero."""
    m = attnlab.mechanism("agent")
    q, k, v = qkv(L=23, Lq=Lq)
    A = rnd(2, 1, 5, 8, seed=5)
    scale = 0.7
    rows = []
    for i in range(Lq):
        end = i + 23 - Lq + 1
        if end <= 0:
            rows.append(torch.zeros_like(v[:, :, 0]))
            continue
        VA = torch.softmax(scale * A @ k[:, :, :end].transpose(-1, -2), dim=-1) @ v[:, :, :end]
        rows.append((torch.softmax(scale * q[:, :, i, None] @ A.transpose(-1, -2), dim=-1) @ VA)[:, :, 0])
    want = torch.stack(rows, dim=2)
    for impl in IMPLS:
        got = m(q, k, v, causal=True, agents=A, scale=scale, impl=impl, chunk_size=4)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("spread", [1.0, 300.0])
def test_causal_chunked_as_linear_attention_and_its_fallback(spread):
    """The causal chunked form runs as n-feature linear attention; logits spread wider than float32's safe
    exponent range (a prefix far below a later maximum) take the per-chunk exponential form instead. Both
    equal the float64 definition, continuing a state across segments."""
    from attnlab.entries import agent as E

    m = attnlab.mechanism("agent")
    q, k, v = qkv(B=1, H=2, L=40, D=8, Dv=5, seed=3)
    k[:, :, 30:] *= spread  # keys late in the sequence: logits far above the earlier ones when spread is large
    A = rnd(1, 2, 4, 8, seed=4)
    want = m(q, k, v, agents=A, causal=True, impl="parallel")
    q32, k32, v32, A32 = (t.float() for t in (q, k, v, A))
    call = m.prepare(q32, k32, v32, agents=A32, causal=True, chunk_size=8)
    taken = E._causal_as_linear(call, q32, E.agent_tokens(call, q32), k32, v32,
                                E._init(call, 1, 2, torch.float32, q32.device))
    assert (taken is not None) == (spread == 1.0)
    o1, s = m.scan(q32[:, :, :17], k32[:, :, :17], v32[:, :, :17], agents=A32, chunk_size=8)
    o2, _ = m.scan(q32[:, :, 17:], k32[:, :, 17:], v32[:, :, 17:], s, agents=A32, chunk_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], 2).double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [64, 16, 7])
def test_causal_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, chunk):
    """The C++ kernel (taken without autograd; its reference moves up chunk by chunk) equals the PyTorch path
    (taken when q requires grad), output and state, over segments; it reports logits too far apart within a
    chunk (a NaN logit too), and the entry then takes the per-chunk form."""
    from attnlab.entries import agent as E

    m = attnlab.mechanism("agent")
    q, k, v = (t.to(dtype) for t in qkv(B=2, H=3, L=150, D=8, Dv=6, seed=5))
    A = rnd(1, 3, 5, 8, seed=6).to(dtype)
    same_segments(m, q, k, v, (0, 5, 77, 150), tol, agents=A, chunk_size=chunk)
    call = m.prepare(q, k, v, agents=A, causal=True, chunk_size=chunk)
    Ae = E.agent_tokens(call, q).contiguous()
    for bad in ("spread", "nan"):
        kb = k.clone()
        if bad == "spread":  # one key far above the earlier ones of its chunk: their normalizers underflow
            kb[:, :, 3] = 1e4 * Ae[0, :, 0][None]
        else:
            kb[1, 2, 3, 0] = float("nan")
        state = [t.contiguous().clone() for t in E._init(call, 2, 3, dtype, q.device).tensors.values()]
        assert not native.agent_chunks(q, kb, v, Ae, *state, call.scale, chunk)[1]
        got = m(q, kb, v, agents=A, causal=True, chunk_size=chunk)  # the per-chunk form
        want = m(q, kb, v, agents=A, causal=True, impl="parallel")
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("Lq,given", [(150, False), (70, True)])
def test_noncausal_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, Lq, given):
    """Non-causal (cross lengths too, pooled or given agents, logits spread wide): the C++ kernel equals the
    PyTorch path (the kernels turned off) and the definition, and so do its backward kernel's gradients (q, k,
    v and given agents, broadcast over the batch); a NaN key makes every row NaN on both paths."""
    m = attnlab.mechanism("agent")
    q, k, v = (t.to(dtype) for t in qkv(B=2, H=3, L=150, D=8, Dv=6, Lq=Lq, seed=9))
    k = 4 * k
    params = {"chunk_size": 16, **({"agents": rnd(1, 3, 5, 8, seed=2).to(dtype)} if given else {})}
    same_noncausal(m, q, k, v, tol, (1, 0, 40, 2), **params)
    G = rnd(2, 3, Lq, 6, seed=3).to(dtype)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in [q, k, v] + ([params["agents"]] if given else [])]
        extra = {"agents": leaves[3]} if given else {}
        out = m(*leaves[:3], causal=False, chunk_size=16, **extra)
        return [out.detach(), *torch.autograd.grad((out * G).sum(), leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(grads, "AgentNonCausalBackward", 10 * tol)
    # the entry reads NONCAUSAL_ROWS at a time: the kernels' blocks (the online softmax moving its maxima
    # between them, forward and backward) give the same output and gradients
    A = (params["agents"] if given else torch.randn(1, 3, 5, 8, dtype=dtype)).expand(2, 3, 5, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, A)]
    blocks = [native.agent_noncausal(*leaves, 0.3, rows) for rows in (16, 512)]
    torch.testing.assert_close(blocks[0], blocks[1], atol=tol, rtol=tol)
    for a, b in zip(*(torch.autograd.grad((o * G).sum(), leaves) for o in blocks)):
        torch.testing.assert_close(a, b, atol=10 * tol * max(1.0, float(b.abs().max())), rtol=10 * tol)


def test_noncausal_chunked_form_without_the_kernel():
    """The PyTorch paths of the non-causal chunked form: the online softmax over key chunks (no autograd)
    and the one-shot softmax taken while autograd records equal the definition, gradients included."""
    m = attnlab.mechanism("agent")
    q, k, v = qkv(B=2, H=3, L=150, D=8, Dv=6, Lq=70, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (q, 4 * k, v)]
    want = m(*leaves, causal=False, impl="parallel", chunk_size=16)
    G = rnd(*want.shape, seed=12)
    with native.disabled():
        with torch.no_grad():
            torch.testing.assert_close(m(*leaves, causal=False, chunk_size=16), want.detach())
        got = m(*leaves, causal=False, chunk_size=16)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad((got * G).sum(), leaves), torch.autograd.grad((want * G).sum(), leaves)):
        torch.testing.assert_close(a, b)


def test_per_channel_agents_gradients_and_state():
    """Agents with a value per channel (the conformance examples use D=1): gradients of every form w.r.t. q, k, v
    and the agents equal the parallel form's; gradcheck of the chunked form; segments and steps continue the
    state, whose size is H n (Dv + 2)."""
    m = attnlab.mechanism("agent")
    q, k, v = qkv(B=1, H=2, L=13, D=4, Dv=3)
    A = rnd(1, 2, 3, 4, seed=9)
    G = rnd(1, 2, 13, 3, seed=10)
    for causal in (False, True):
        grads = {}
        for impl in IMPLS:
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, A)]
            out = m(*leaves[:3], agents=leaves[3], causal=causal, impl=impl, chunk_size=5)
            grads[impl] = torch.autograd.grad((out * G).sum(), leaves)
        for impl in ("chunked", "recurrent"):
            for g, r in zip(grads[impl], grads["parallel"]):
                torch.testing.assert_close(g, r, atol=1e-11, rtol=0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, A)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: m(a, b, c, agents=d, causal=True, impl="chunked", chunk_size=4),
                                    leaves)
    whole = m(q, k, v, agents=A, causal=True)
    o1, s = m.scan(q[:, :, :6], k[:, :, :6], v[:, :, :6], agents=A, chunk_size=4)
    o2, s = m.scan(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], s, agents=A, impl="recurrent")
    torch.testing.assert_close(torch.cat([o1, o2], 2), whole, atol=1e-12, rtol=0)
    assert s.floats == m.state_size(2, 4, 3, agents=A) == 2 * 3 * (3 + 2)


def test_pooled_agents_pass_the_conformance_checks():
    """The catalogue examples give agents (the causal patterns need them); the default, agents pooled from the
    queries, runs the whole suite on the non-causal patterns, with the declared NaN exception (every row)."""
    m = attnlab.mechanism("agent")
    assert m.extras["nan_rows"]({}) == "all" and m.extras["nan_rows"]({"agents": torch.ones(1)}) == "row"
    pooled_only = dataclasses.replace(m, patterns=("noncausal_self", "noncausal_cross"),
                                      examples=({}, {"n_agents": 5, "chunk_size": 7}),
                                      extras={**m.extras, "nan_rows": "all"})
    rs = C.run_checks(pooled_only, groups=["forward", "gradients", "gradcheck", "gqa", "patterns", "batch", "nan",
                                           "forms"])
    bad = [str(r) for r in rs if not r.ok]
    assert not bad, "\n".join(bad)
    assert sum(r.group == "nan" and not r.skipped for r in rs) >= 6


def test_nan_query_reaches_every_row_only_when_pooled():
    m = attnlab.mechanism("agent")
    q, k, v = qkv()
    q[:, :, 4] = float("nan")
    assert m(q, k, v).isnan().all()
    out = m(q, k, v, agents=rnd(1, 3, 4, 8))
    assert out[:, :, 4].isnan().all() and out[:, :, torch.arange(29) != 4].isfinite().all()


def test_bad_agent_arguments_raise_naming_them():
    m = attnlab.mechanism("agent")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="agents"):
        m(q, k, v, causal=True)  # pooled agents would read future queries
    with pytest.raises(ValueError, match="agents"):
        m.scan(q, k, v)
    with pytest.raises(ValueError, match="agents"):
        m(q, k, v, agents=rnd(1, 3, 4, 5))  # head dim 5 != 8
    with pytest.raises(ValueError, match="agents"):
        m(q, k, v, agents=rnd(1, 2, 4, 8))  # 2 heads for 3 query heads
    with pytest.raises(ValueError, match="n_agents"):
        m(q, k, v, agents=rnd(1, 3, 4, 8), n_agents=5)
    with pytest.raises(ValueError, match="n_agents"):
        m(q, k, v, n_agents=0)


def test_long_bfloat16_noncausal_pooled_stays_finite():
    """The non-causal pooled path at L = 65,536 in bfloat16 (tests/test_recurrent.py checks the causal forms)."""
    m = attnlab.mechanism("agent")
    q, k, v = (rnd(1, 2, 65_536, 16, seed=s).to(torch.bfloat16) for s in range(3))
    whole = m(q, k, v, impl="chunked")
    ref = m(q, k, v, impl="parallel")
    assert whole.dtype == torch.bfloat16 and whole.isfinite().all() and ref.isfinite().all()
    torch.testing.assert_close(whole.float(), ref.float(), atol=2e-2, rtol=2e-2)
