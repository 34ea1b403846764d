"""``titans``: the neural memory against independent computations, and the memory-as-context layer.

The independent references here are hand-written loops over tokens that take each gradient with
``torch.func.grad`` of the associative loss (no factored gradients, no unrolled products), and a plain
delta-rule loop for the linear memory.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import grad

import attnlab
from attnlab import memory as mem
from attnlab import native
from kernel_paths import graph_nodes, kernel_and_pytorch_gradients, same_segments, segments
from attnlab.entries.titans import memory_as_context
from attnlab.reference import attention

pytestmark = pytest.mark.usefixtures("single_thread")
M = attnlab.mechanism("titans")
FORMS = ("chunked", "recurrent", "parallel")


def qkv(B=1, H=2, L=11, D=4, Dv=3, seed=0, Lq=None, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Lq or L, D), r(B, Hkv or H, L, D), r(B, Hkv or H, L, Dv)


def flat_init(H, dims, seed=1, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return gain * torch.randn(H, mem.param_count(dims), generator=g, dtype=torch.float64)


def layers(flat, dims):
    """(P,) -> [(in, out)], row-major per layer, layers concatenated (the documented layout)."""
    out, at = [], 0
    for a, b in dims:
        out.append(flat[at:at + a * b].reshape(a, b))
        at += a * b
    return out


def mlp(ws, x, act):
    for i, w in enumerate(ws):
        if i:
            x = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[act](x)
        x = x @ w
    return x


def loop_reference(q, k, v, init, dims, *, chunk, theta, eta, alpha, act="silu", qk_norm=True):
    """The model by its definition, one token at a time: u_t = torch.func.grad of ||M(k_t) - v_t||² at the
    weights before t's chunk; S = η S - θ u; W = (1 - α) W + S; o_t = M_W(q_t). Rates are (B|1, H|1, L)."""
    if qk_norm:
        q, k = (torch.nn.functional.normalize(x, dim=-1, eps=1e-6) for x in (q, k))
    B, H, L, _ = k.shape

    def loss(ws, kt, vt):
        return ((mlp(ws, kt, act) - vt) ** 2).sum()

    out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            W = layers(init[h], dims)
            S = [torch.zeros_like(w) for w in W]
            for t in range(L):
                if t % chunk == 0:
                    G = [w.clone() for w in W]
                u = grad(loss)(G, k[b, h, t], v[b, h, t])
                th, et, al = (float(r[min(b, r.shape[0] - 1), min(h, r.shape[1] - 1), t]) for r in (theta, eta, alpha))
                S = [et * s - th * g for s, g in zip(S, u)]
                W = [(1 - al) * w + s for w, s in zip(W, S)]
                out[b, h, t] = mlp(W, q[b, h, t], act)
    return out


def rates(theta, eta, alpha, L):
    return [torch.full((1, 1, L), x, dtype=torch.float64) for x in (theta, eta, alpha)]


# --------------------------------------------------------------------------------------------
# The definition
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4])
def test_forms_equal_the_torch_func_gradient_loop(chunk):
    """chunk_size=1 is online gradient descent, chunk_size=b the paper's mini-batch form (section 3.2), with
    per-token rates including the exact ends η = 0 and α = 1 (products with zero factors)."""
    D, Dv, hidden, depth, L = 4, 3, 5, 2, 11
    q, k, v = qkv(L=L, D=D, Dv=Dv)
    dims = mem.layer_dims(D, Dv, depth, hidden)
    init = flat_init(2, dims)
    g = torch.Generator().manual_seed(5)
    theta = 0.3 * torch.rand(1, 2, L, generator=g, dtype=torch.float64)
    eta = torch.rand(1, 2, L, generator=g, dtype=torch.float64)
    alpha = 0.2 * torch.rand(1, 2, L, generator=g, dtype=torch.float64)
    eta[0, 0, 2], alpha[0, 1, 3], eta[0, 1, 6] = 0.0, 1.0, 1.0
    want = loop_reference(q, k, v, init, dims, chunk=chunk, theta=theta, eta=eta, alpha=alpha)
    for impl in FORMS:
        got = M(q, k, v, causal=True, impl=impl, depth=depth, hidden=hidden, chunk_size=chunk, init_weights=init,
                theta_t=theta, eta_t=eta, alpha_t=alpha)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=impl)


def test_scalar_rates_and_other_activations():
    D, Dv, L = 4, 4, 9
    q, k, v = qkv(L=L, D=D, Dv=Dv, seed=3)
    for act, depth, chunk, qk_norm in (("gelu", 3, 3, False), ("tanh", 1, 2, True)):
        dims = mem.layer_dims(D, Dv, depth, 6)
        init = flat_init(2, dims, gain=0.5)
        want = loop_reference(q, k, v, init, dims, chunk=chunk, act=act, qk_norm=qk_norm,
                              theta=rates(0.05, 0, 0, L)[0], eta=rates(0, 0.8, 0, L)[1], alpha=rates(0, 0, 0.1, L)[2])
        for impl in FORMS:
            got = M(q, k, v, causal=True, impl=impl, depth=depth, hidden=6, chunk_size=chunk, init_weights=init,
                    activation=act, qk_norm=qk_norm, theta=0.05, eta=0.8, alpha=0.1)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=f"{impl} {act}")


def test_linear_memory_is_the_delta_rule():
    """Depth 1, no momentum, no forgetting, constant θ, chunk 1: W_t = W - 2θ k_t (k_tᵀ W - v_t)ᵀ, i.e. DeltaNet's
    S_t = S_{t-1} + β (v_t - S_{t-1} k_t) k_tᵀ with β = 2θ, o_t = S_t q_t (S = Wᵀ, keys/queries normalized)."""
    B, H, L, D, Dv, theta = 2, 3, 17, 5, 4, 0.2
    q, k, v = qkv(B=B, H=H, L=L, D=D, Dv=Dv, seed=7)
    qn, kn = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    S = torch.zeros(B, H, Dv, D, dtype=torch.float64)
    want = []
    for t in range(L):
        kt, vt = kn[:, :, t, :, None], v[:, :, t, :, None]
        S = S + 2 * theta * (vt - S @ kt) @ kt.transpose(-1, -2)
        want.append((S @ qn[:, :, t, :, None])[..., 0])
    want = torch.stack(want, dim=2)
    init = torch.zeros(D * Dv, dtype=torch.float64)
    for impl in FORMS:
        got = M(q, k, v, causal=True, impl=impl, depth=1, chunk_size=1, theta=theta, eta=0.0, alpha=0.0,
                init_weights=init)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=impl)


def test_memory_learns_a_repeated_pair():
    """Gradient *descent*: writing one pair again and again makes the memory recall it (wrong signs diverge)."""
    D, L = 8, 60
    g = torch.Generator().manual_seed(2)
    key, val = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    k = key.expand(1, 1, L, D)
    v = val.expand(1, 1, L, D)
    out = M(k, k, v, causal=True, impl="chunked", chunk_size=1, theta=0.05, eta=0.5, alpha=0.0)
    err = (out[0, 0] - val).norm(dim=-1)
    assert err[-1] < 1e-3 * err[0], err


# --------------------------------------------------------------------------------------------
# The three forms: chunk sizes not dividing L, segments, gradients, GQA and cross attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 32])
def test_chunked_recurrent_parallel_agree_forward_and_backward(chunk):
    L, D, Dv, H = 19, 4, 3, 2
    q, k, v = qkv(B=2, H=2 * H, Hkv=H, L=L, D=D, Dv=Dv, seed=chunk)
    dims = mem.layer_dims(D, Dv, 2, 6)
    g = torch.Generator().manual_seed(chunk)
    params = dict(hidden=6, chunk_size=chunk, init_weights=flat_init(2 * H, dims),
                  theta_t=0.05 * torch.rand(2, H, L, generator=g, dtype=torch.float64),
                  eta_t=torch.rand(1, H, L, generator=g, dtype=torch.float64), alpha=0.05)
    results = {}
    for impl in FORMS:
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, params["init_weights"], params["theta_t"],
                                                            params["eta_t"])]
        p = dict(params, init_weights=leaves[3], theta_t=leaves[4], eta_t=leaves[5])
        out = M(*leaves[:3], causal=True, impl=impl, **p)
        gr = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves)
        results[impl] = (out, gr)
    ref_out, ref_grads = results["parallel"]
    for impl in ("chunked", "recurrent"):
        out, gr = results[impl]
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
        for a, b in zip(gr, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_segments_continue_the_state_across_chunk_boundaries():
    """Segments cut inside chunks (the state carries the chunk-start weights) equal the whole sequence; m.step
    token by token too; causal cross attention equals the last rows of self attention."""
    L, chunk = 23, 5
    q, k, v = qkv(L=L, D=4, Dv=4, seed=11)
    whole = M(q, k, v, causal=True, impl="parallel", chunk_size=chunk, theta=0.02)
    state, outs = None, []
    for n, (a, b) in enumerate(zip([0, 3, 7, 16], [3, 7, 16, L])):
        o, state = M.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, impl=FORMS[n % 2], chunk_size=chunk,
                          theta=0.02)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)
    assert state.length == L and set(state.tensors) == {"W1", "W2", "S1", "S2", "G1", "G2"}
    assert state.floats == M.state_size(2, 4, 4, chunk_size=chunk)  # B = 1
    st, steps = None, []
    for t in range(L):
        o, st = M.step(st, q[:, :, t], k[:, :, t], v[:, :, t], chunk_size=chunk, theta=0.02)
        steps.append(o)
    torch.testing.assert_close(torch.stack(steps, 2), whole, atol=1e-12, rtol=0)
    for impl in FORMS:
        cross = M(q[:, :, -6:], k, v, causal=True, impl=impl, chunk_size=chunk, theta=0.02)
        torch.testing.assert_close(cross, whole[:, :, -6:], atol=1e-12, rtol=0)
        early = M(q, k[:, :, :9], v[:, :, :9], causal=True, impl=impl, chunk_size=chunk, theta=0.02)
        assert early[:, :, :L - 9].abs().max() == 0  # queries before every key see nothing
        late_queries = M(q[:, :, L - 9:], k[:, :, :9], v[:, :, :9], causal=True, impl="parallel", chunk_size=chunk,
                         theta=0.02)
        torch.testing.assert_close(early[:, :, L - 9:], late_queries, atol=1e-12, rtol=0)


def test_init_weights_and_seeded_init():
    q, k, v = qkv(L=9, D=4, Dv=3)
    dims = mem.layer_dims(4, 3, 2, 16)  # default hidden = 4 * D
    seeded = torch.cat([w.flatten() for w in mem.seeded_init(dims, 3)])
    a = M(q, k, v, causal=True, impl="chunked", init_seed=3)
    torch.testing.assert_close(a, M(q, k, v, causal=True, impl="chunked", init_weights=seeded), atol=0, rtol=0)
    assert not torch.equal(a, M(q, k, v, causal=True, impl="chunked", init_seed=4))
    per_head = flat_init(2, dims)
    both = M(q, k, v, causal=True, impl="chunked", init_weights=per_head)
    for h in range(2):  # a (Hq, P) init gives head h its own row
        alone = M(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], causal=True, impl="chunked", init_weights=per_head[h])
        torch.testing.assert_close(both[:, h:h + 1], alone, atol=1e-13, rtol=0)
    assert mem.param_count(mem.layer_dims(4, 3, 2, 4)) == 28
    w = per_head[:, :28].clone().requires_grad_(True)  # gradients reach the initial memory
    torch.autograd.gradcheck(lambda w_: M(q, k, v, causal=True, impl="chunked", hidden=4, chunk_size=3,
                                          init_weights=w_), (w,))


def test_half_inputs_accumulate_in_float32():
    q, k, v = (x.to(torch.bfloat16) for x in qkv(L=40, D=8, Dv=8, seed=4))
    out = M(q, k, v, causal=True, impl="chunked")
    want = M(q.float(), k.float(), v.float(), causal=True, impl="chunked")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0, rtol=2 ** -8)  # only the output's rounding
    _, state = M.scan(q, k, v)
    assert all(t.dtype == torch.float32 for t in state.tensors.values())


def test_bad_parameters_name_the_argument():
    q, k, v = qkv(L=6)
    for kw, name in ((dict(theta_t=-torch.ones(1, 1, 6)), "theta_t"), (dict(eta_t=2 * torch.ones(1, 1, 6)), "eta_t"),
                     (dict(alpha_t=torch.ones(1, 1, 5)), "alpha_t"), (dict(alpha_t=torch.ones(1, 1, 6, 1)), "alpha_t"),
                     (dict(eta=1.5), "eta"), (dict(init_weights=torch.ones(7)), "init_weights"),
                     (dict(init_weights=torch.ones(3, 100)), "init_weights"), (dict(depth=0), "depth")):
        with pytest.raises((ValueError, TypeError), match=name):
            M(q, k, v, causal=True, **{k_: x.double() if isinstance(x, torch.Tensor) else x for k_, x in kw.items()})
    with pytest.raises(ValueError, match="causal_self, causal_cross"):
        M(q, k, v)  # no non-causal form: the memory is written in order
    _, state = M.scan(q, k, v, chunk_size=4)
    for kw in (dict(chunk_size=1), dict(chunk_size=4, depth=3), dict(chunk_size=4, hidden=5)):
        with pytest.raises(ValueError, match="state"):
            M.scan(q, k, v, state, **kw)
        with pytest.raises(ValueError, match="state"):
            M.step(state, q[:, :, 0], k[:, :, 0], v[:, :, 0], **kw)


def test_catalogue_data():
    call = M.prepare(*qkv(L=64, D=8, Dv=8), causal=True, chunk_size=16)
    assert M.flops(call) > 0 and M.patterns == ("causal_self", "causal_cross")
    # floats per head: (W, S, G) of a 8 -> 32 -> 8 MLP; chunk_size 1 keeps no chunk-start copy
    assert M.state_size(1, 8, 8) == 3 * 2 * 8 * 32 and M.state_size(1, 8, 8, chunk_size=1) == 2 * 2 * 8 * 32


# --------------------------------------------------------------------------------------------
# Memory as a context
# --------------------------------------------------------------------------------------------
def mac_oracle(q, k, v, pk, pv, *, segment, window, **memory):
    """Per segment: one dense softmax over [persistent, retrieved h_j = M_{s-1}(q_j), segment] with an explicit
    mask (persistent: all; h_j: j <= i; segment: i - window < j <= i); the memory state from titans' scan
    of every earlier token, read by this file's own MLP."""
    B, H, L, D = q.shape
    rep = lambda x: x.repeat_interleave(H // x.shape[1], dim=1)  # noqa: E731
    k, v = rep(k), rep(v)
    dims = mem.layer_dims(D, v.shape[-1], memory.get("depth", 2), memory.get("hidden") or 4 * D)
    outs = []
    for s in range(0, L, segment):
        e = min(s + segment, L)
        n = e - s
        if s == 0:
            ws = [w.expand(B, H, *w.shape) for w in mem.seeded_init(dims, 0)]
        else:
            _, st = M.scan(q[:, :, :s], k[:, :, :s], v[:, :, :s], impl="recurrent", **memory)
            ws = [st[f"W{i + 1}"] for i in range(len(dims))]
        h = mlp(ws, torch.nn.functional.normalize(q[:, :, s:e], dim=-1, eps=1e-6), "silu")
        Np = pk.shape[1]
        keys = torch.cat([rep(pk[None]).expand(B, -1, -1, -1), h, k[:, :, s:e]], 2)
        vals = torch.cat([rep(pv[None]).expand(B, -1, -1, -1), h, v[:, :, s:e]], 2)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = torch.cat([torch.ones(n, Np, dtype=torch.bool), j <= i, (j <= i) & (j > i - window)], 1)
        outs.append(attention(q[:, :, s:e], keys, vals, mask=mask))
    return torch.cat(outs, 2)


def test_mac_equals_the_explicit_oracle():
    B, Hq, Hkv, L, D = 2, 4, 2, 19, 4
    q, k, v = qkv(B=B, H=Hq, Hkv=Hkv, L=L, D=D, Dv=D, seed=21)
    g = torch.Generator().manual_seed(1)
    pk, pv = (torch.randn(Hkv, 3, D, generator=g, dtype=torch.float64) for _ in range(2))
    memory = dict(theta=0.05, chunk_size=3)
    out = memory_as_context(q, k, v, segment=7, window=3, persistent_k=pk, persistent_v=pv, **memory)
    torch.testing.assert_close(out, mac_oracle(q, k, v, pk, pv, segment=7, window=3, **memory), atol=1e-12, rtol=0)


def test_mac_without_memory_is_sliding_window_with_persistent_sinks():
    """retrieved=False: each segment attends over [persistent tokens, the segment] = sink_window (sinks = Np)."""
    q, k, v = qkv(B=1, H=2, L=16, D=4, Dv=5, seed=9)
    pk, pv = torch.randn(2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64)
    out = memory_as_context(q, k, v, segment=6, window=4, persistent_k=pk, persistent_v=pv, retrieved=False)
    sink = attnlab.mechanism("sink_window")
    want = torch.cat([sink.reference(q[:, :, s:s + 6], torch.cat([pk[None], k[:, :, s:s + 6]], 2),
                                     torch.cat([pv[None], v[:, :, s:s + 6]], 2), causal=True, sinks=2, window=4)
                      for s in range(0, 16, 6)], 2)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_mac_is_causal_and_differentiable():
    q, k, v = qkv(B=1, H=1, L=13, D=3, Dv=3, seed=2)
    pk, pv = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64)
    kw = dict(segment=4, window=3, persistent_k=pk, persistent_v=pv, theta=0.3, hidden=4)
    out = memory_as_context(q, k, v, **kw)
    for i in (2, 5, 9):
        fut = [x.clone() for x in (q, k, v)]
        for x in fut:
            x[:, :, i + 1:] = 5 * torch.randn_like(x[:, :, i + 1:])
        torch.testing.assert_close(memory_as_context(*fut, **kw)[:, :, :i + 1], out[:, :, :i + 1], atol=1e-12, rtol=0)
    leaves = tuple(x.clone().requires_grad_(True) for x in (q[:, :, :6], k[:, :, :6], v[:, :, :6]))
    torch.autograd.gradcheck(lambda a, b, c: memory_as_context(a, b, c, **kw), leaves)


def test_mac_bad_arguments():
    q, k, v = qkv(L=8, D=4, Dv=3)
    with pytest.raises(ValueError, match="value dim"):
        memory_as_context(q, k, v, segment=4, window=2)
    q, k, v = qkv(L=8, D=4, Dv=4)
    with pytest.raises(ValueError, match="segment"):
        memory_as_context(q, k, v, segment=0, window=2)
    with pytest.raises(ValueError, match="persistent_k"):
        memory_as_context(q, k, v, segment=4, window=2, persistent_k=torch.zeros(2, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta"):
        memory_as_context(q, k, v, segment=4, window=2, theta=-1.0)


#: Memories the C++ kernel's tests run: ``per_token`` asks for per-token rates (:func:`kernel_params`).
KERNEL_CASES = [
    {},
    {"depth": 1, "chunk_size": 5, "theta": 0.3, "eta": 0.5, "alpha": 0.1},
    {"depth": 3, "hidden": 5, "activation": "gelu", "chunk_size": 7, "qk_norm": False, "per_token": True},
    {"chunk_size": 1, "activation": "tanh", "hidden": 6, "eta": 0.0, "alpha": 0.0},
]


def kernel_params(params, B, H, L, dtype, g):
    """A case of KERNEL_CASES as call parameters: with ``per_token``, rates per token broadcast over the batch
    (θ), the heads (η) or neither (α)."""
    params = dict(params)
    if params.pop("per_token", False):
        params.update(theta_t=0.02 * torch.rand(1, H, L, generator=g, dtype=torch.float64).to(dtype),
                      eta_t=torch.rand(B, 1, L, generator=g, dtype=torch.float64).to(dtype),
                      alpha_t=0.3 * torch.rand(B, H, L, generator=g, dtype=torch.float64).to(dtype))
    return params


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("params", KERNEL_CASES)
def test_chunked_form_on_the_cpp_kernel_equals_the_pytorch_path(dtype, tol, params):
    """The C++ kernel equals the PyTorch path (the kernels turned off), output and
    state, over segments that start and end inside chunks; per-token rates broadcast over batch or heads; a NaN
    key makes the same outputs NaN on both paths."""
    L, B, H = 41, 2, 3
    params = kernel_params(params, B, H, L, dtype, torch.Generator().manual_seed(5))
    q, k, v = (x.to(dtype) for x in qkv(B=B, H=H, L=L, D=8, Dv=6, seed=3))
    same_segments(M, q, k, v, (0, 3, 4, 11, 16, 30, L), tol, ("theta_t", "eta_t", "alpha_t"), **params)
    k[0, 1, 20, 2] = float("nan")  # spreads from its chunk's start on (0 · NaN in the masked products), both paths
    bad = M(q, k, v, causal=True, **params)
    with native.disabled():
        assert torch.equal(bad.isnan(), M(q, k, v, causal=True, **params).isnan())
    start = 20 - 20 % params.get("chunk_size", 16)
    assert bad[0, 1, 20:].isnan().all() and not bad[0, 1, :start].isnan().any() and not bad[1].isnan().any()


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("params", KERNEL_CASES)
def test_chunked_form_trains_on_the_cpp_kernel(dtype, tol, params):
    """The kernel's backward (MemoryChunksBackward) gives the PyTorch path's gradients of q, k, v and the learned
    initial weights, over segments that start and end inside chunks with the state's gradient carried between
    them (the loss reads the final state too); per-token rates that need no gradient are the kernel's constants."""
    L, B, H, D, Dv = 41, 2, 3, 8, 6
    g = torch.Generator().manual_seed(7)
    params = kernel_params(params, B, H, L, dtype, g)
    dims = mem.layer_dims(D, Dv, params.get("depth", 2), params.get("hidden") or 4 * D)
    init = (0.3 * torch.randn(H, mem.param_count(dims), generator=g, dtype=torch.float64)).to(dtype)
    q, k, v = (x.to(dtype) for x in qkv(B=B, H=H, L=L, D=D, Dv=Dv, seed=4))
    weights = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64).to(dtype)
    cuts = (0, 3, 4, 11, 16, 30, L)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, init)]
        out, state = segments(M, *leaves[:3], cuts, ("theta_t", "eta_t", "alpha_t"), init_weights=leaves[3], **params)
        loss = (out * weights).sum() + sum(t.square().sum() for t in state.tensors.values())
        return [out.detach(), *torch.autograd.grad(loss, leaves)], graph_nodes(out.grad_fn)

    kernel_and_pytorch_gradients(run, "MemoryChunksBackward", tol, times=len(cuts) - 1)


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
def test_rates_that_need_gradients_take_the_pytorch_path():
    """A per-token rate with requires_grad is a constant to the kernel, so such a call trains on the PyTorch path;
    its gradient is the parallel form's."""
    q, k, v = qkv(B=1, H=2, L=19, D=4, Dv=4, seed=2)
    theta = (0.05 * torch.rand(1, 2, 19, dtype=torch.float64)).requires_grad_()
    out = M(q, k, v, causal=True, impl="chunked", chunk_size=4, theta_t=theta)
    assert "MemoryChunksBackward" not in graph_nodes(out.grad_fn)
    got, = torch.autograd.grad(out.sum(), theta)
    ref, = torch.autograd.grad(M(q, k, v, causal=True, impl="parallel", chunk_size=4, theta_t=theta).sum(), theta)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
