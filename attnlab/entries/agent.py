"""``agent``: Agent Attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024).

``n`` agent tokens ``A`` (``n x d``) first aggregate the keys and values, then broadcast the result to the
queries, both with softmax attention (the paper's definition, without its agent bias and DWC, see below)::

    V_A = softmax(scale · A Kᵀ) V          (n x d_v; softmax over the keys)
    O   = softmax(scale · Q Aᵀ) V_A        (L_q x d_v; softmax over the agents)

so ``O = φ_q(Q) φ_k(K)ᵀ V`` is a generalized linear attention with ``φ_q(Q) = softmax(scale Q Aᵀ)`` and
``φ_k(K)ᵀ = softmax(scale A Kᵀ)`` (rows over keys): the ``L_q x L_k`` attention matrix has rank <= n and
rows that sum to 1 (tests/linear/test_agent.py checks this against the independent product).

**Agent tokens.** By default pooled from the queries, as the paper does: it pools the query feature map
with 2-D adaptive average pooling to ``n = 49 = 7 x 7`` agents; on a sequence this is 1-D adaptive
average pooling (``torch.nn.functional.adaptive_avg_pool1d``): agent ``a`` averages the queries
``floor(a L_q / n) .. ceil((a + 1) L_q / n) - 1``, ``n = n_agents`` (default 16; with ``L_q < n`` bins
repeat queries). Or given: ``agents`` ``(B|1, Hq|1, n, D|1)`` (e.g. learned agent tokens; size-1 axes
broadcast). The scale multiplies the agents in the aggregation and the queries in the broadcast (the
official code's ``(agent_tokens * scale) @ kᵀ`` and ``(q * scale) @ agent_tokensᵀ``).

**Causal form** (not in the paper, whose agent attention is non-causal; defined here). Pooled agents
average future queries, so ``causal=True`` needs given ``agents``; each query's agents then aggregate
only the keys it sees (``i' = i + L_k - L_q``, bottom-right)::

    V_A^(i) = softmax_{j <= i'}(scale · A k_jᵀ) v_j,      o_i = softmax(scale · q_i Aᵀ) V_A^(i)

Rows with no visible key (``L_q > L_k``) are zero, the catalogue's fully-masked-row rule.

**Forms.** Parallel: the definition; causal materializes per query the ``n x L_k`` weights of its prefix
(in blocks of queries, so ``L_q x n x L_k`` floats are never held at once). Recurrent: per head and
agent a running softmax over keys, the state ``(max m_a, sum Z_a = Σ_j exp(s_aj - m_a), weighted sum
U_a = Σ_j exp(s_aj - m_a) v_j)``, ``s_aj = scale A_a·k_j``, ``V_A = U / Z``: ``n (d_v + 2)`` floats per head,
independent of the length. Chunked (causal): n-dimensional causal linear attention with features
built from each prefix's log-normalizer (:func:`_causal_as_linear`: GEMMs, and on CPU the linear
kernels, forward and backward; on CPU without autograd a C++ kernel of its own,
:func:`_native_chunked`, which moves the reference up chunk by chunk);
where those features would leave the dtype's range (a prefix whose logits all lie more than 60 below
a later maximum, in float32), per chunk of ``C`` keys every position's prefix ``(max, sum, weighted
sum)`` from an ``(n, C, C)`` masked exponential combined with the carried state, every exponent
``<= 0``. The non-causal chunked form absorbs key chunks into the same state (online softmax; a C++
kernel on CPU, forward and backward) and then reads it out; the non-causal recurrent form absorbs one
key at a time.
Accumulation is float32 for half inputs.

**Left out (module-level).** The agent bias (learned 2-D position biases added to both softmax logits)
and the depthwise convolution over V added to the output (DWC) are layer parameters on the image grid;
add them outside the attention.

**NaN.** Pooled agents mix the queries, so one NaN query row makes every output row NaN (declared in
``extras["nan_rows"]``); with given agents every row depends on its own query only.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .. import linear as K
from .. import native as _native
from ..catalogue import Call, Mechanism, Param, register
from ..reference import compute_dtype
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, forms

#: Agents pooled from the queries when neither ``n_agents`` nor ``agents`` says otherwise.
DEFAULT_AGENTS = 16
#: Rows the non-causal kernels read at a time, at least (the result does not depend on it: the agents' softmax
#: runs online over the blocks). Measured with ``attnlab bench`` (n = 16, H = 8, D = 64): 512-row blocks
#: against chunk_size = 64 took fwd+bwd 3.40 -> 2.84 ms at L = 1024 and 14.8 -> 10.4 ms at 4096.
NONCAUSAL_ROWS = 512
#: The causal parallel form holds (query block) x n x L_k weights of about this many floats at once.
_BLOCK_FLOATS = 1 << 22

AGENTS = Param("agents", "tensor", None, "agent tokens A, shape (B|1, Hq|1, n, D|1) (broadcast on the axes of size "
               "1); None: pooled from the queries (adaptive average pooling over the sequence; non-causal only)",
               optional=True)
N_AGENTS = Param("n_agents", "int", None, f"number of agents pooled from the queries (None: {DEFAULT_AGENTS}); with "
                 "`agents` given it must be None or agents.shape[2]", ge=1, optional=True)


# --------------------------------------------------------------------------------------------
# Agents, aggregation and broadcast
# --------------------------------------------------------------------------------------------
def agent_count(params: Mapping) -> int:
    agents = params.get("agents")
    if isinstance(agents, torch.Tensor):
        return agents.shape[2]
    return params.get("n_agents") or DEFAULT_AGENTS


def agent_tokens(call: Call, q: torch.Tensor) -> torch.Tensor:
    """``A`` (B, H, n, D) in the accumulation dtype: the given agents, or the queries pooled to n."""
    dt = compute_dtype(q.dtype)
    B, H = q.shape[:2]
    given = call.params.get("agents")
    if given is not None:
        return given.to(dt).expand(B, H, -1, q.shape[-1])
    pooled = torch.nn.functional.adaptive_avg_pool1d(q.to(dt).flatten(0, 1).transpose(1, 2), agent_count(call.params))
    return pooled.transpose(1, 2).unflatten(0, (B, H))


def _logits(call: Call, A: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``scale · A Kᵀ``: (B, H, n, L_k)."""
    return call.scale * A @ k.to(A.dtype).transpose(-1, -2)


def _scaled(call: Call, A: torch.Tensor) -> torch.Tensor:
    """``scale · Aᵀ`` (B, H, D, n): the scale on the n agents, not on every query or key row (a pass over
    ``(B, H, L, D)`` forward and another backward)."""
    return (call.scale * A).transpose(-1, -2)


def _broadcast(call: Call, q: torch.Tensor, A: torch.Tensor, VA: torch.Tensor) -> torch.Tensor:
    """``softmax(scale q Aᵀ) V_A`` with V_A (B, H, n, Dv) shared, or (B, H, L_q, n, Dv) per query."""
    p = torch.softmax(q.to(A.dtype) @ _scaled(call, A), dim=-1)  # (B, H, L_q, n)
    if VA.dim() == 4:
        return p @ VA
    return (p.unsqueeze(-2) @ VA).squeeze(-2)


# --------------------------------------------------------------------------------------------
# Parallel form: the definition
# --------------------------------------------------------------------------------------------
def _parallel(call: Call, q, k, v):
    A = agent_tokens(call, q)
    s = _logits(call, A, k)
    vv = v.to(A.dtype)
    if not call.causal:
        return _broadcast(call, q, A, torch.softmax(s, dim=-1) @ vv).to(v.dtype)
    B, H, n, Lk = s.shape
    Lq = q.shape[2]
    pos = torch.arange(Lq, device=q.device) + (Lk - Lq)  # i' per query
    keys = torch.arange(Lk, device=q.device)
    rows = max(1, _BLOCK_FLOATS // (B * H * n * Lk))
    outs = []
    for a in range(0, Lq, rows):
        p = pos[a:a + rows, None]
        hidden = (keys[None, :] > p) & (p >= 0)  # rows without keys: anything finite, zeroed below
        w = torch.softmax(s.unsqueeze(2).masked_fill(hidden[:, None, :], float("-inf")), dim=-1)  # (B, H, r, n, Lk)
        outs.append(_broadcast(call, q[:, :, a:a + rows], A, w @ vv.unsqueeze(2)))
    out = torch.cat(outs, dim=2)
    return torch.where((pos >= 0)[:, None], out, torch.zeros_like(out)).to(v.dtype)


# --------------------------------------------------------------------------------------------
# State: a running softmax over keys per agent
# --------------------------------------------------------------------------------------------
def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    dt, n = compute_dtype(dtype), agent_count(call.params)
    return State("agent", {"max": torch.full((batch, heads, n), float("-inf"), dtype=dt, device=device),
                           "sum": torch.zeros(batch, heads, n, dtype=dt, device=device),
                           "wsum": torch.zeros(batch, heads, n, call.value_dim, dtype=dt, device=device)}, 0)


def _absorb(m, Z, U, s, v):
    """Keys with logits ``s`` (B, H, n, c) and values ``v`` (B, H, c, Dv) into (max, sum, weighted sum)."""
    M = torch.maximum(m, s.amax(dim=-1))
    carry = torch.exp(m - M)
    e = torch.exp(s - M[..., None])
    return M, Z * carry + e.sum(-1), U * carry[..., None] + e @ v


def _step(call: Call, state: State, q_t, k_t, v_t):
    """One token: ``m' = max(m, s)``, ``Z' = Z e^(m-m') + e^(s-m')``, ``U' = U e^(m-m') + e^(s-m') v_t``."""
    A = agent_tokens(call, q_t[:, :, None])
    s = _logits(call, A, k_t[:, :, None])  # (B, H, n, 1)
    M, Z, U = _absorb(state["max"], state["sum"], state["wsum"], s, v_t.to(A.dtype)[:, :, None])
    o = _broadcast(call, q_t[:, :, None], A, U / Z[..., None])[:, :, 0]
    return o.to(v_t.dtype), state.replace(length=state.length + 1, max=M, sum=Z, wsum=U)


def _chunked(call: Call, q, k, v, state):
    A = agent_tokens(call, q)
    C, L = call.params["chunk_size"], k.shape[2]
    vv = v.to(A.dtype)
    if not call.causal:  # online softmax over key chunks, then one read-out (on the kernel: forward and backward)
        if _native.serves(A, q, k, vv, backward=True):  # A: the compute dtype, which the kernel gets
            return _native.agent_noncausal(q.to(A.dtype), k.to(A.dtype), vv, A, call.scale,
                                           max(C, NONCAUSAL_ROWS)).to(v.dtype), None
        if _native.recording(q, k, v, A):
            # training: the agents' softmax over every key at once (n x L_k floats, as many as the loop below
            # would save for its backward, in two GEMMs instead of many small steps)
            VA = torch.softmax(_logits(call, A, k), dim=-1) @ vv
            return _broadcast(call, q, A, VA).to(v.dtype), None
        s0 = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
        m, Z, U = s0["max"], s0["sum"], s0["wsum"]
        for a in range(0, L, C):
            m, Z, U = _absorb(m, Z, U, _logits(call, A, k[:, :, a:a + C]), vv[:, :, a:a + C])
        return _broadcast(call, q, A, U / Z[..., None]).to(v.dtype), None
    state = state or _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    if _native.serves(A, q, k, vv, *state.tensors.values()):  # A first: half inputs run in float32 too
        fused = _native_chunked(call, q, A, k, vv, state)
        if fused is not None:
            return fused[0].to(v.dtype), fused[1]
    as_linear = _causal_as_linear(call, q, A, k, vv, state)
    if as_linear is not None:
        return as_linear[0].to(v.dtype), as_linear[1]
    m, Z, U = state["max"], state["sum"], state["wsum"]
    outs = []
    for a in range(0, L, C):
        s = _logits(call, A, k[:, :, a:a + C])  # (B, H, n, c)
        c = s.shape[-1]
        M = torch.maximum(m[..., None], s.cummax(dim=-1).values)  # max after each token: (B, H, n, c)
        later = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)  # (t, s): key s after query t
        E = torch.exp((s[..., None, :] - M[..., :, None]).masked_fill(later, float("-inf")))  # (B, H, n, c, c)
        carry = torch.exp(m[..., None] - M)
        Zt = Z[..., None] * carry + E.sum(-1)
        Ut = U[..., None, :] * carry[..., None] + E @ vv[:, :, None, a:a + c]  # (B, H, n, c, Dv)
        outs.append(_broadcast(call, q[:, :, a:a + c], A, (Ut / Zt[..., None]).transpose(2, 3)))
        m, Z, U = M[..., -1], Zt[..., -1], Ut[..., -1, :]
    out = torch.cat(outs, dim=2).to(v.dtype)
    return out, state.replace(length=state.length + L, max=m, sum=Z, wsum=U)


def _native_chunked(call: Call, q, A, k, vv, state: State):
    """The causal chunked form on the C++ kernel (:func:`attnlab.native.agent_chunks`): the linear form of
    :func:`_causal_as_linear` with the reference moved up chunk by chunk (the state rescaled, every
    exponent <= 0), the logits never written out. None when a normalizer leaves the safe range there
    (the caller then takes the PyTorch forms from the same state)."""
    dt = A.dtype
    r, Z, U = (state[n].to(dt).contiguous().clone() for n in ("max", "sum", "wsum"))
    out, ok = _native.agent_chunks(q.to(dt), k.to(dt), vv, A.contiguous(), r, Z, U, call.scale,
                                   call.params["chunk_size"])
    if not ok:
        return None
    return out, state.replace(length=state.length + k.shape[2], max=r, sum=Z, wsum=U)


def _causal_as_linear(call: Call, q, A, k, vv, state: State):
    """The causal chunked form as causal linear attention (:func:`attnlab.linear.chunked`, the C++
    kernel where it serves), or None when the factors below leave the dtype's safe range.

    With key logits ``s_j`` (per agent), ``r`` the largest logit so far and the state's ``(m, Z, U)``,
    every prefix's normalizer relative to ``r`` is ``Z'_i = Z e^(m - r) + Σ_{j<=i} e^(s_j - r)`` and
    ``V_A^(i) = (U e^(m - r) + Σ_{j<=i} e^(s_j - r) v_j) / Z'_i``, so ``o_i = Σ_a p_ia V_A^(i)_a`` is
    linear attention with features ``φq_i = p_i / Z'_i`` (``p_i = softmax(scale q_i Aᵀ)``),
    ``φk_j = e^(s_j - r)`` and the initial state ``U e^(m - r)``: GEMMs instead of an (n, C, C)
    exponential per chunk. Exact in real arithmetic; taken when every ``Z'_i`` is at least
    ``exp(-EXP_RANGE)`` (:data:`attnlab.linear.EXP_RANGE`), else some prefix holds only logits that
    far below a later maximum and its feature would overflow; random and trained logits are far
    inside."""
    s = k.to(A.dtype) @ _scaled(call, A)  # key logits (B, H, L, n), as the kernel reads them
    m0, Z0, U0 = state["max"], state["sum"], state["wsum"]
    r = torch.maximum(m0, s.amax(2))  # (B, H, n)
    carry = torch.exp(m0 - r)  # 0 for an empty state (m = -inf)
    w = torch.exp(s - r[:, :, None])
    z = w.cumsum(2).add_((Z0 * carry)[:, :, None])  # Z'_i: (B, H, L, n)
    if not bool((z >= math.exp(-K.EXP_RANGE[s.dtype])).all()):  # NaN logits fail too: the per-chunk form
        return None
    p = torch.softmax(q.to(A.dtype) @ _scaled(call, A), dim=-1)  # (B, H, L, n)
    out, S = K.chunked(p / z, w, vv, (U0 * carry[..., None]).contiguous(), chunk=call.params["chunk_size"])
    return out, state.replace(length=state.length + k.shape[2], max=r, sum=z[:, :, -1], wsum=S)


def _noncausal_recurrent(call: Call, q, k, v):
    """Agents first (pooled from every query), then the keys one at a time, then the read-out."""
    A = agent_tokens(call, q)
    s0 = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    m, Z, U = s0["max"], s0["sum"], s0["wsum"]
    vv = v.to(A.dtype)
    for t in range(k.shape[2]):
        m, Z, U = _absorb(m, Z, U, _logits(call, A, k[:, :, t:t + 1]), vv[:, :, t:t + 1])
    return _broadcast(call, q, A, U / Z[..., None]).to(v.dtype)


# --------------------------------------------------------------------------------------------
# Catalogue data
# --------------------------------------------------------------------------------------------
def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """(max, sum, weighted sum) per agent: ``H n (d_v + 2)``; the agents themselves are an input."""
    return heads * agent_count(params) * (value_dim + 2)


def _flops(call: Call) -> float:
    """Chunked form: key logits 2 n L_k D and query logits 2 L_q n D; non-causal, aggregation 2 n L_k Dv
    and read-out 2 L_q n Dv; causal, the n-feature linear attention (per chunk of C: C(C+1)/2 pairs,
    2 (n + Dv) each, and 4 C n Dv for the state's read and update)."""
    n, D, Dv = agent_count(call.params), call.head_dim, call.value_dim
    Lq, Lk = call.q_len, call.kv_len
    if call.causal:
        C = min(call.params["chunk_size"], Lk)
        rest = (C * (C + 1) * (n + Dv) + 4 * C * n * Dv) * Lk / C
    else:
        rest = 2 * n * Dv * (Lk + Lq)
    return call.batch * call.q_heads * (2 * n * D * (Lk + Lq) + rest)


def _check(call: Call) -> None:
    check_offsets(call)
    A, n = call.params.get("agents"), call.params.get("n_agents")
    if A is None:
        if call.causal:
            raise ValueError("agent: causal=True needs fixed agent tokens: give agents (B|1, Hq|1, n, D); agents "
                             "pooled from the queries (agents=None) average future queries")
        return
    ok = (A.is_floating_point() and A.dim() == 4 and A.shape[0] in (1, call.batch) and A.shape[1] in (1, call.q_heads)
          and A.shape[2] >= 1 and A.shape[3] in (1, call.head_dim))
    if not ok:
        raise ValueError(f"agent: parameter 'agents' must be a float tensor of shape (B or 1, Hq or 1, n >= 1, "
                         f"D={call.head_dim} or 1) with B={call.batch}, Hq={call.q_heads}; got {tuple(A.shape)} "
                         f"{A.dtype}")
    if A.device != call.device:
        raise ValueError(f"agent: parameter 'agents' is on {A.device}, the inputs on {call.device}")
    if n is not None and n != A.shape[2]:
        raise ValueError(f"agent: n_agents={n} contradicts agents with {A.shape[2]} agents; give n_agents=None (or "
                         f"{A.shape[2]}) with agents")


def _example_agents(n: int, heads: bool = True):
    """Given agents for the conformance examples (causal patterns need them).

    The suite calls an example value with the number of query heads only and runs every example at two
    head dims (8, and 4 for gradcheck), so the examples use the ``D = 1`` form (one value per agent,
    broadcast over the channels): ``(1, Hq|1, n, 1)``. Agents with a value per channel, and agents
    pooled from the queries, are checked in tests/linear/test_agent.py."""
    return lambda h: torch.randn(1, h if heads else 1, n, 1, dtype=torch.float64)


def _random_params(B, H, L, D, gen):
    """Inputs for the long-sequence checks (tests/test_recurrent.py): 16 random agents."""
    return {"agents": torch.randn(1, H, DEFAULT_AGENTS, D, generator=gen).to(torch.bfloat16)}


def _nan_rows(params: Mapping) -> str:
    """Pooled agents mix the queries: a NaN query reaches every row; given agents keep rows independent."""
    return "all" if params.get("agents") is None else "row"


register(Mechanism(
    name="agent",
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al. 2024)",
    summary="n agent tokens (pooled from the queries, or given) aggregate keys/values with softmax attention, then "
            "broadcast to the queries with softmax attention: a rank-n generalized linear attention",
    formula="V_A = softmax(scale A Kᵀ) V, O = softmax(scale Q Aᵀ) V_A; A = adaptive_avg_pool(Q) to n_agents "
            "(default) or agents. causal (given A only): V_A^(i) = softmax_{j<=i'}(scale A k_jᵀ) v_j, o_i = "
            "softmax(scale q_i Aᵀ) V_A^(i)",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    params=(AGENTS, N_AGENTS, CHUNK_SIZE, OFFSETS),
    impls=forms(),
    check_params=_check,
    examples=({"agents": _example_agents(5)},
              {"agents": _example_agents(3, heads=False), "chunk_size": 5},
              {"agents": _example_agents(7), "n_agents": 7, "chunk_size": 8}),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          noncausal_recurrent=_noncausal_recurrent, fused=K.fused),
    flops=_flops,
    complexity={"time": "O(L n d) non-causal; O(L (n d + C (n + d_v) + n d_v)) causal chunked",
                "memory": "O(L (d + n))", "state": "O(n d_v)"},
    extras={"gradcheck_impls": ("chunked", "parallel"), "nan_rows": _nan_rows, "random_params": _random_params},
))

__all__ = ["DEFAULT_AGENTS", "agent_count", "agent_tokens"]
