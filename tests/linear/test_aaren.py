"""``aaren``: attention as a many-to-many RNN, checked against causal dense attention and softmax itself."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab import native
from kernel_paths import graph_nodes, kernel_and_pytorch_gradients, same_noncausal, same_segments, segments
from attnlab.entries import aaren as A

pytestmark = pytest.mark.usefixtures("single_thread")
FORMS = ("parallel", "chunked", "recurrent")


def inputs(B=2, H=4, Hkv=2, L=29, D=8, Dv=5, seed=0, Lq=None, dtype=torch.float64):
    """One query per (batch, head) — Aaren's query token — and L keys/values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    query = r(B, H, D)
    return query, query[:, :, None].expand(-1, -1, Lq or L, -1), r(B, Hkv, L, D), r(B, Hkv, L, Dv)


@pytest.mark.parametrize("Lq", [29, 11, 40])
def test_equals_causal_dense_attention_forward_and_backward(Lq):
    """o_i = softmax_{j<=i'}(scale q·k_j) v_j: the dense oracle with the query at every position (self, and
    causal cross bottom-right in both directions), GQA, chunk sizes that do and do not divide L."""
    query, q, k, v = inputs(Lq=Lq)
    dense = attnlab.mechanism("dense")
    m = attnlab.mechanism("aaren")
    G = torch.randn(2, 4, Lq, 5, dtype=torch.float64)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (query, k, v)]
        out = fn(leaves[0][:, :, None].expand(-1, -1, Lq, -1), *leaves[1:])
        return (out, *torch.autograd.grad((out * G).sum(), leaves))

    want = run(lambda q_, k_, v_: dense(q_, k_, v_, causal=True))
    for impl in FORMS:
        for chunk in (1, 4, 8, 64):
            got = run(lambda q_, k_, v_: m(q_, k_, v_, causal=True, impl=impl, chunk_size=chunk))
            for name, a, b in zip(("out", "dquery", "dk", "dv"), got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"{impl} chunk={chunk} {name}")


def test_noncausal_is_the_many_to_one_output():
    """Non-causal: every row is the attention of the query over all keys, i.e. the last prefix output."""
    query, q, k, v = inputs(Lq=6)
    m = attnlab.mechanism("aaren")
    want = torch.softmax(torch.einsum("bhd,bhld->bhl", query, k.repeat_interleave(2, 1)) / math.sqrt(8), -1)
    want = torch.einsum("bhl,bhld->bhd", want, v.repeat_interleave(2, 1))
    last = m(q[:, :, :1].expand(-1, -1, 29, -1), k, v, causal=True)[:, :, -1]
    torch.testing.assert_close(last, want, atol=1e-12, rtol=0)
    for impl in FORMS:
        out = m(q, k, v, impl=impl, chunk_size=5)
        torch.testing.assert_close(out, want[:, :, None].expand(-1, -1, 6, -1), atol=1e-12, rtol=0)


def test_operator_is_associative_and_folds_to_softmax():
    """(a ⊕ b) ⊕ c = a ⊕ (b ⊕ c), and folding single tokens (s_j, 1, v_j) gives Σ softmax(s)_j v_j."""
    g = torch.Generator().manual_seed(1)
    s, v = torch.randn(3, 7, generator=g, dtype=torch.float64) * 20, torch.randn(3, 7, 4, generator=g,
                                                                               dtype=torch.float64)
    tok = [(s[:, j], torch.ones(3, dtype=torch.float64), v[:, j]) for j in range(7)]
    left = A.combine(A.combine(tok[0], tok[1]), tok[2])
    right = A.combine(tok[0], A.combine(tok[1], tok[2]))
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    acc = tok[0]
    for t in tok[1:]:
        acc = A.combine(acc, t)
    torch.testing.assert_close(acc[0], s.max(1).values, atol=0, rtol=0)
    torch.testing.assert_close(acc[2] / acc[1][:, None], torch.einsum("bj,bjd->bd", torch.softmax(s, 1), v),
                               atol=1e-12, rtol=0)


def test_prefix_scan_is_inclusive_with_logarithmic_depth():
    """Hillis-Steele: with + it is cumsum; it applies the operator ⌈log₂ n⌉ times (parallel depth)."""
    x = torch.randn(2, 1000, dtype=torch.float64)
    calls = []

    def add(a, b):
        calls.append(a[0].shape[1])
        return (a[0] + b[0],)

    (out,) = A.prefix_scan(add, (x,), 1)
    torch.testing.assert_close(out, x.cumsum(1), atol=1e-10, rtol=0)
    assert len(calls) == math.ceil(math.log2(1000)) == 10
    assert sum(calls) == sum(1000 - 2 ** i for i in range(10))  # step d merges n - d pairs


def test_flops_count_one_combine_per_key():
    """The declared FLOPs are the recurrence's: per key the score, one ⊕ and the division."""
    m = attnlab.mechanism("aaren")
    for L, chunk in ((37, 5), (64, 8), (10, 1)):
        _, q, k, v = inputs(B=1, H=2, Hkv=2, L=L, D=4, Dv=3)
        call = m.prepare(q, k, v, causal=True, chunk_size=chunk)
        assert m.flops(call) == 2 * L * (2 * 4 + (3 * 3 + 8) + 3), (L, chunk)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, causal):
    """The C++ kernel equals the PyTorch path (the kernels turned off), output and state, over segments longer than the kernel's blocks, with scores far apart (each new maximum rescales the
    state); a NaN key makes the same outputs NaN on both paths."""
    _, q, k, v = (x.to(dtype) for x in inputs(B=2, H=3, Hkv=3, L=700, D=8, Dv=5))
    k = k * 6
    m = attnlab.mechanism("aaren")
    if not causal:
        same_noncausal(m, q, k, v, tol, (1, 2, 400, 3))
        return
    fast = same_segments(m, q, k, v, (0, 5, 300, 700), tol)
    torch.testing.assert_close(fast, m(q, k, v, causal=True, impl="parallel"), atol=tol, rtol=tol)
    k[1, 2, 400, 3] = float("nan")
    bad = segments(m, q, k, v, (0, 5, 300, 700))[0]
    with native.disabled():
        assert torch.equal(bad.isnan(), segments(m, q, k, v, (0, 5, 300, 700))[0].isnan())
    assert bad[1, 2, 400:].isnan().all() and not bad[1, 2, :400].isnan().any() and not bad[0].isnan().any()


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpp_backward_equals_autograd_of_the_pytorch_path(dtype, tol, causal):
    """The kernel's backward (one reverse pass) equals autograd through the PyTorch scan: the query, keys and
    values, over segments carrying the state (its u and w receive gradients from the later segments), a loss
    on the outputs and on the final state's u and w, scores far apart (new maxima rescale the state), GQA."""
    query, _, k, v = inputs(B=2, H=4, Hkv=2, L=600, D=8, Dv=5, dtype=dtype)
    k = k * 6
    m = attnlab.mechanism("aaren")
    g = torch.Generator().manual_seed(4)
    G = torch.randn(2, 4, 600, 5, generator=g, dtype=torch.float64).to(dtype)
    Gu, Gw = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in ((2, 4), (2, 4, 5)))

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (query, k, v)]
        q = leaves[0][:, :, None].expand(-1, -1, 600, -1)
        if not causal:
            out = m(q, *leaves[1:], causal=False)
            loss = (out * G).sum()
        else:
            out, state = segments(m, q, *leaves[1:], (0, 7, 300, 600))
            loss = (out * G).sum() + (state["u"] * Gu).sum() + (state["w"] * Gw).sum()
        return [out.detach(), *torch.autograd.grad(loss, leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(run, "AarenScanBackward", tol, times=3 if causal else 1)  # one per segment


def test_step_has_constant_state_and_equals_dense():
    """m.step: O(1) state (query, m, u, w) = state_size floats at every length; outputs are causal dense."""
    query, q, k, v = inputs(B=1, H=2, Hkv=1, L=50, D=4, Dv=3)
    m = attnlab.mechanism("aaren")
    want = attnlab.mechanism("dense")(q, k, v, causal=True)
    state = None
    for t in range(50):
        o, state = m.step(state, query, k[:, :, t], v[:, :, t])
        assert state.floats == m.state_size(2, 4, 3) == 2 * (4 + 3 + 2)
        torch.testing.assert_close(o, want[:, :, t], atol=1e-12, rtol=0)
    assert state.length == 50 and torch.equal(state["m"], (torch.einsum("bhd,bhld->bhl", query, k.expand(-1, 2, -1, -1))
                                                          / 2).max(-1).values)


def test_segments_continue_the_state():
    """A sequence in pieces (chunked, recurrent, chunked; cuts inside blocks) equals the whole."""
    query, q, k, v = inputs(L=41)
    m = attnlab.mechanism("aaren")
    whole = m(q, k, v, causal=True, impl="parallel")
    state, outs = None, []
    for (a, b), impl in zip(((0, 13), (13, 20), (20, 41)), ("chunked", "recurrent", "chunked")):
        o, state = m.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, impl=impl, chunk_size=4)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)


def test_differing_query_rows_are_refused():
    """Per-position queries have no O(1) recurrent form: refused (naming q / q_t), never read from row 0."""
    query, q, k, v = inputs()
    m = attnlab.mechanism("aaren")
    bad = q.clone()
    bad[1, 2, 7, 0] += 1
    for impl in FORMS:
        with pytest.raises(ValueError, match=r"\bq\b.*row 7"):
            m(bad, k, v, causal=True, impl=impl)
    _, state = m.scan(q, k, v)
    with pytest.raises(ValueError, match="q_t differs from the query this state"):
        m.step(state, query + 1, k[:, :, 0], v[:, :, 0])
    with pytest.raises(ValueError, match="q differs from the query this state"):
        m.scan(q + 1, k, v, state)


def test_huge_scores_stay_exact_in_float32_and_finite_in_bfloat16():
    """Log-space max tracking: scores of size ~1e4 (exp overflows float32) and L = 65,536 in bfloat16."""
    query, q, k, v = inputs(B=1, H=2, Hkv=2, L=1024, D=16, Dv=16, dtype=torch.float32)
    m, dense = attnlab.mechanism("aaren"), attnlab.mechanism("dense")
    q = q * 400
    want = dense(q.double(), k.double(), v.double(), causal=True)
    assert want.abs().max() > 1 and (q[0, 0, 0] @ k[0, 0].T / 4).abs().max() > 1000  # exp(1000) overflows
    for impl in ("chunked", "recurrent", "parallel"):  # float32 scores of ~1e3 carry ~1e-4 rounding
        torch.testing.assert_close(m(q, k, v, causal=True, impl=impl).double(), want, atol=1e-3, rtol=0)
    query, q, k, v = inputs(B=1, H=2, Hkv=2, L=65_536, D=16, Dv=16, dtype=torch.bfloat16)
    q = q * 8
    out, state = m.scan(q, k, v, impl="chunked")
    assert out.dtype == torch.bfloat16 and bool(out.isfinite().all()) and state.length == 65_536
    tail = dense(q[:, :, -8:].float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(out[:, :, -8:].float(), tail, atol=0.02, rtol=0.02)
