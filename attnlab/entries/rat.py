"""``rat``: a linear recurrence inside chunks, softmax attention across chunks (Wei et al. 2025).

RAT ("RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling") re-indexes token
``t`` as ``(c, l)``: chunk ``c = t // C`` and offset ``l = t mod C`` (``C`` = ``chunk``, the paper's
chunk length ``L``). Inside each chunk a gated EMA aggregates keys and values (the "intra-chunk
RNN", restarted at every chunk)::

    k̃_{c,l} = g_{c,l} ⊙ k̃_{c,l-1} + (1 - g_{c,l}) ⊙ k_{c,l}        k̃_{c,-1} = 0
    ṽ_{c,l} = g_{c,l} ⊙ ṽ_{c,l-1} + (1 - g_{c,l}) ⊙ v_{c,l}        ṽ_{c,-1} = 0

and each query attends with softmax over the final summaries of the earlier chunks and the current
chunk's running summary (the "inter-chunk attention")::

    o_{c,l} = softmax([scale q_{c,l}·k̃_{0,C-1}, ..., scale q_{c,l}·k̃_{c-1,C-1}, scale q_{c,l}·k̃_{c,l}])
              · [ṽ_{0,C-1}; ...; ṽ_{c-1,C-1}; ṽ_{c,l}]

Unrolled, ``k̃_t = Σ_{d=0}^{t mod C} (1 - g_{t-d}) (Π_{r=t-d+1}^{t} g_r) ⊙ k_{t-d}``. ``chunk = 1``
gives softmax attention over the gated keys and values ``(1 - g) ⊙ k``, ``(1 - g) ⊙ v`` (plain causal
softmax attention for ``g = 0``); ``chunk >= L`` gives one chunk, a softmax over a single summary, so
``o_t = ṽ_t``: the linear recurrence alone (the paper's "interpolates between attention (L = 1) and
recurrence (L = T)").

Gates (the paper's ``g = σ(W x + b)``; a catalogue entry has no projections, so they are inputs):
``gates`` per token, in ``[0, 1]``, shape ``(B|1, H|1, Lk, F)`` with ``F = 1`` (one gate per head and
token), ``F = D + Dv`` (key channels, then value channels) or ``F = D`` when ``Dv == D`` (one gate per
channel shared by keys and values: RAT's code repeats one gate vector over ``[v, k]``). Without
``gates``, the constant ``gate`` (default 0.5) is used for every token and channel.

Conventions (where the paper leaves attnlab's interface open):

- Chunks are aligned to the start of the key sequence (of each document with ``offsets``); causal
  cross attention is bottom-right (query ``i`` sits at key position ``i + Lk - Lq``).
- Not part of the entry: RAT's output gate ``z ⊙ y`` and projections (layer parameters), and its
  inter-chunk RoPE (the layer rotates ``q`` and the summaries by chunk index; positions are the
  caller's business in attnlab).
- **Non-causal** (attnlab's extension; the paper is causal only): every query attends to the final
  summary of every chunk (the last, possibly shorter chunk ends at ``Lk - 1``).
- **State**: the running summary ``(k̃, ṽ)`` of the current chunk plus one ``(k̃, ṽ)`` per finished
  chunk, so it grows as ``⌈t / C⌉ (D + Dv)`` floats per head: the paper's trade-off (a KV cache
  ``C`` times shorter). The recurrent step costs ``O((t / C) d)``: it grows with the context only
  through the attention over the ``t / C`` summaries. A finished chunk's summary moves into the
  list when the next chunk's first token arrives.

Forms: **parallel** = the unrolled sums above (a loop over the lag ``d``), then masked dense
attention over the per-position summaries (the reference); **chunked** = the recurrence as a
Hillis-Steele scan inside each chunk, then the queries (in groups of bounded memory) attend to the
chunk finals plus their own summary; causal on CPU, the C++ kernel
(:func:`attnlab.native.rat_chunks`) runs the recurrence as written and attends block by block in one
pass per (batch, head), and trains on its backward kernel (the attention's backward over the finals,
then the recurrences read backwards); **recurrent** = the step above. Accumulation is float32 for
half inputs; the recurrence is a convex combination (no growth), and every softmax row contains
the query's own summary, so no row is empty and no epsilon is needed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import native as _native
from .. import reference as R
from ..catalogue import Call, Mechanism, Param, register
from ..linear import fused as _fused_linear
from ..recurrent import OFFSETS, Recurrence, State, check_offsets, check_per_token, forms, within
from .aaren import prefix_scan

NAME = "rat"
#: The chunked form's queries attend in groups of about this many scores.
_GROUP_SCORES = 1 << 22

CHUNK = Param("chunk", "int", 16, "RAT's chunk length (the paper's L; 16 in its 1.3B models): a linear recurrence "
              "inside each chunk, softmax attention across chunks; it changes the result: 1 = softmax attention "
              "over (1-g)k, (1-g)v, >= the sequence length = the gated linear recurrence alone", ge=1)
GATE = Param("gate", "float", 0.5, "constant forget gate g for every token and channel, used when `gates` is not "
             "given", ge=0.0, le=1.0)
GATES = Param("gates", "tensor", None, "per-token forget gates g in [0, 1] (RAT's σ(W x + b)), shape (B|1, H|1, Lk, "
              "F): F = 1 (per head and token), D + Dv (key channels then value channels) or D when Dv == D (shared "
              "by keys and values, as RAT's code)", optional=True, per_token=True)


# --------------------------------------------------------------------------------------------
# Gates and summaries
# --------------------------------------------------------------------------------------------
def _gates(call: Call, dt) -> Tuple[torch.Tensor, torch.Tensor]:
    """(key gates, value gates): per-token tensors (B|1, H|1, L, D|1 / Dv|1) or 0-dim constants."""
    g = call.params.get("gates")
    if g is None:
        c = torch.tensor(call.params["gate"], dtype=dt, device=call.device)
        return c, c
    g = g.to(dt)
    D = call.head_dim
    if g.shape[-1] == D + call.value_dim:
        return g[..., :D], g[..., D:]
    return g, g


def _at(g: torch.Tensor, t: int) -> torch.Tensor:
    return g if g.dim() == 0 else g[:, :, t]


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` moved ``d`` positions later along axis 2, zeros in front."""
    if d == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[:2] + (d,) + x.shape[3:]), x[:, :, :x.shape[2] - d]], 2)


def lag_summaries(x: torch.Tensor, g: torch.Tensor, chunk: int) -> torch.Tensor:
    """``x̃_t = Σ_{d=0}^{t mod C} (1 - g_{t-d}) (Π_{r=t-d+1}^{t} g_r) x_{t-d}`` for every position (the unrolled
    recurrence; chunks start at position 0). ``x`` (B, H, L, F), ``g`` broadcastable to it."""
    g = g.expand_as(x)
    L = x.shape[2]
    b = (1 - g) * x
    offset = (torch.arange(L, device=x.device) % chunk)[:, None]
    out, prod = b, torch.ones_like(x)
    for d in range(1, min(chunk, L)):
        prod = prod * _shift(g, d - 1)  # Π_{r=t-d+1}^{t} g_r
        out = out + torch.where(offset >= d, prod * _shift(b, d), torch.zeros((), dtype=x.dtype, device=x.device))
    return out


def _linear(a, b):
    """The linear recurrence ``h <- a h + b`` as an associative operator on (a, b) (earlier, later)."""
    (a1, b1), (a2, b2) = a, b
    return a1 * a2, a2 * b1 + b2


def scan_summaries(x: torch.Tensor, g: torch.Tensor, chunk: int, start: int = 0,
                   carry: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The intra-chunk recurrence as a Hillis-Steele scan inside each chunk.

    The segment's first token sits at offset ``start`` of its chunk, continuing the summary ``carry``
    (B, H, F). Returns the summaries in the chunk-aligned frame: ``start`` positions in front (the last
    one holds ``carry``) and zeros after the last token up to a whole number of chunks.
    """
    B, H, L, F = x.shape
    g = g.expand_as(x)
    back = -(start + L) % chunk
    front_a = x.new_zeros(B, H, start, F)
    front_b = front_a if carry is None else torch.cat([x.new_zeros(B, H, start - 1, F), carry[:, :, None]], 2)
    pad = x.new_zeros(B, H, back, F)
    a = torch.cat([front_a, g, pad], 2).unflatten(2, (-1, chunk))
    b = torch.cat([front_b, (1 - g) * x, pad], 2).unflatten(2, (-1, chunk))
    return prefix_scan(_linear, (a, b), 3)[1].flatten(2, 3)


# --------------------------------------------------------------------------------------------
# Attention over summaries
# --------------------------------------------------------------------------------------------
def _attend(q, keys, values, own_k, own_v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Row t: softmax over ``keys[:visible[t]]`` and its own summary ``own_k[t]`` (``visible`` non-decreasing)."""
    B, H, L, _ = q.shape
    group = max(1, _GROUP_SCORES // (B * H * (keys.shape[2] + 1)))
    outs = []
    for a in range(0, L, group):
        b = min(L, a + group)
        n = int(visible[b - 1])
        qs = q[:, :, a:b]
        s = (qs @ keys[:, :, :n].transpose(-1, -2)) * scale
        s = s.masked_fill(torch.arange(n, device=q.device) >= visible[a:b, None], float("-inf"))
        s = torch.cat([s, (qs * own_k[:, :, a:b]).sum(-1, keepdim=True) * scale], -1)
        p = torch.softmax(s, -1)
        outs.append(p[..., :-1] @ values[:, :, :n] + p[..., -1:] * own_v[:, :, a:b])
    return torch.cat(outs, 2)


def _finals(s: torch.Tensor, L: int, chunk: int) -> torch.Tensor:
    """The final summary of every chunk of ``L`` tokens (the last chunk may be shorter)."""
    ends = list(range(chunk - 1, L, chunk)) + ([L - 1] if L % chunk else [])
    return s[:, :, ends]


# --------------------------------------------------------------------------------------------
# The three forms (GQA expanded, causal cross aligned by attnlab.recurrent)
# --------------------------------------------------------------------------------------------
def _parallel(call: Call, q, k, v):
    dt, C = R.compute_dtype(q.dtype), call.params["chunk"]
    gk, gv = _gates(call, dt)
    sk, sv = lag_summaries(k.to(dt), gk, C), lag_summaries(v.to(dt), gv, C)
    Lq, Lk = q.shape[2], k.shape[2]
    j = torch.arange(Lk, device=q.device)[None]
    chunk_final = (j % C == C - 1) | (j == Lk - 1)
    if call.causal:
        i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)  # key position of each query
        mask = (j == i) | ((j % C == C - 1) & (j < (i // C) * C))
    else:
        mask = chunk_final.expand(Lq, Lk)
    return R.attention(q.to(dt), sk, sv, mask=mask, scale=call.scale).to(q.dtype)


def _chunked(call: Call, q, k, v, state: Optional[State]):
    dt, C = R.compute_dtype(q.dtype), call.params["chunk"]
    gk, gv = _gates(call, dt)
    k, v, qq = k.to(dt), v.to(dt), q.to(dt)
    if not call.causal:
        L = k.shape[2]
        if _native.serves(qq, k, v, gk, gv, backward=True):  # the finals by the recurrence itself, then SDPA
            fk, fv = _native.rat_finals(k, v, *_kernel_gates(k, gk, gv), C)
            out = torch.nn.functional.scaled_dot_product_attention(qq, fk, fv, scale=call.scale)
            return out.to(q.dtype), None
        fk, fv = (_finals(scan_summaries(x, g, C), L, C) for x, g in ((k, gk), (v, gv)))
        return R.attention(qq, fk, fv, scale=call.scale).to(q.dtype), None
    state = state if state is not None else _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    p0, L = state.length, k.shape[2]
    r = p0 % C
    if _native.serves(qq, k, v, gk, gv, *state.tensors.values(), backward=True):
        return _native_chunked(call, qq, k, v, gk, gv, state)
    carry = (state["key"], state["value"]) if r else (None, None)
    sk = scan_summaries(k, gk, C, r, carry[0])
    sv = scan_summaries(v, gv, C, r, carry[1])
    past_k, past_v = _finished(state, C)
    fk, fv = sk[:, :, C - 1::C], sv[:, :, C - 1::C]
    own_k, own_v = sk[:, :, r:r + L], sv[:, :, r:r + L]
    visible = past_k.shape[2] + (r + torch.arange(L, device=q.device)) // C
    out = _attend(qq, torch.cat([past_k, fk], 2), torch.cat([past_v, fv], 2), own_k, own_v, visible, call.scale)
    done = (r + L - 1) // C  # chunks of this segment finished before its last token
    new = State(NAME, {"keys": torch.cat([past_k, fk[:, :, :done]], 2),
                       "values": torch.cat([past_v, fv[:, :, :done]], 2),
                       "key": own_k[:, :, -1], "value": own_v[:, :, -1]}, p0 + L)
    return out.to(q.dtype), new


def _finished(state: State, C: int):
    """The final summaries of every chunk finished before the state's next token: the state's list, plus
    its running summary when that chunk is complete."""
    past_k, past_v = state["keys"], state["values"]
    if state.length % C == 0 and state.length > 0:
        past_k = torch.cat([past_k, state["key"][:, :, None]], 2)
        past_v = torch.cat([past_v, state["value"][:, :, None]], 2)
    return past_k, past_v


def _kernel_gates(k, gk, gv):
    """The gates as the C++ kernels read them: ``(B, H, L, 1 | F)`` views (a constant as one per token)."""
    B, H, L = k.shape[:3]
    return tuple((g.reshape(1, 1, 1, 1) if g.dim() == 0 else g).expand(B, H, L, -1) for g in (gk, gv))


def _native_chunked(call: Call, q, k, v, gk, gv, state: State):
    """The causal chunked form on the C++ kernel (:func:`attnlab.native.rat_chunks`): one pass per
    (batch, head), the summaries scanned and attended block by block."""
    L = q.shape[2]
    C, p0 = call.params["chunk"], state.length
    past_k, past_v = _finished(state, C)
    gk, gv = _kernel_gates(k, gk, gv)
    out, fin_k, fin_v, key, value = _native.rat_chunks(q, k, v, gk, gv, past_k, past_v, state["key"], state["value"],
                                                       C, p0, call.scale)
    kept = past_k.shape[2] + (p0 % C + L - 1) // C  # finished before the segment's last token
    new = State(NAME, {"keys": fin_k[:, :, :kept], "values": fin_v[:, :, :kept], "key": key, "value": value}, p0 + L)
    return out.to(call.dtype), new


def _absorb(state: State, C: int, k_t, v_t, gk, gv) -> State:
    """One token into the state: a new chunk pushes the finished summary and restarts the recurrence."""
    keys, values = state["keys"], state["values"]
    if state.length % C == 0:
        if state.length > 0:
            keys = torch.cat([keys, state["key"][:, :, None]], 2)
            values = torch.cat([values, state["value"][:, :, None]], 2)
        key, value = (1 - gk) * k_t, (1 - gv) * v_t
    else:
        key, value = gk * state["key"] + (1 - gk) * k_t, gv * state["value"] + (1 - gv) * v_t
    return State(NAME, {"keys": keys, "values": values, "key": key, "value": value}, state.length + 1)


def _step(call: Call, state: State, q_t, k_t, v_t):
    dt = R.compute_dtype(q_t.dtype)
    gk, gv = (_at(g, 0) for g in _gates(call, dt))
    state = _absorb(state, call.params["chunk"], k_t.to(dt), v_t.to(dt), gk, gv)
    keys = torch.cat([state["keys"], state["key"][:, :, None]], 2)
    values = torch.cat([state["values"], state["value"][:, :, None]], 2)
    p = torch.softmax((keys @ q_t.to(dt)[..., None])[..., 0] * call.scale, -1)
    return (p[:, :, None] @ values)[:, :, 0].to(q_t.dtype), state


def _noncausal_recurrent(call: Call, q, k, v):
    dt = R.compute_dtype(q.dtype)
    gk, gv = _gates(call, dt)
    state = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    for t in range(k.shape[2]):
        state = _absorb(state, call.params["chunk"], k[:, :, t].to(dt), v[:, :, t].to(dt), _at(gk, t), _at(gv, t))
    keys = torch.cat([state["keys"], state["key"][:, :, None]], 2)
    values = torch.cat([state["values"], state["value"][:, :, None]], 2)
    return R.attention(q.to(dt), keys, values, scale=call.scale).to(q.dtype)


def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    z = lambda *s: torch.zeros(batch, heads, *s, dtype=R.compute_dtype(dtype), device=device)  # noqa: E731
    D, Dv = call.head_dim, call.value_dim
    return State(NAME, {"keys": z(0, D), "values": z(0, Dv), "key": z(D), "value": z(Dv)}, 0)


def _state_size(heads: int, head_dim: int, value_dim: int, length: Optional[int] = None, chunk: int = 16,
                **params) -> int:
    """Floats after ``length`` tokens: ``⌈length / C⌉`` key/value summaries per head (one chunk's worth, the
    current summary, when ``length`` is not given: the state grows with the context)."""
    chunks = 1 if length is None else max(1, -(-int(length) // chunk))
    return heads * chunks * (head_dim + value_dim)


def _visible_sum(n: int, C: int) -> int:
    """Σ_{p=0}^{n-1} (p // C): finished chunks seen by the queries at positions 0..n-1."""
    m = n // C
    return C * m * (m - 1) // 2 + m * (n - m * C)


def _flops(call: Call) -> float:
    """The two summary recurrences (``g h + (1 - g) x``: 3 flops per channel and token), then 2(D + Dv) per
    (query, visible summary) pair and the softmax (about 3 per pair). The useful work: the PyTorch path's
    Hillis-Steele scan does about 3x the recurrences' flops; the C++ kernel runs them as written."""
    Lq, Lk, C, D, Dv = call.q_len, call.kv_len, call.params["chunk"], call.head_dim, call.value_dim
    chunks = -(-Lk // C)
    scans = 3 * Lk * (D + Dv)
    if call.causal:
        lo = max(Lk - Lq, 0)
        pairs = _visible_sum(Lk, C) - _visible_sum(lo, C) + (Lk - lo)
    else:
        pairs = Lq * chunks
    return float(call.batch * call.q_heads * (scans + pairs * (2 * D + 2 * Dv + 3)))


def _check(call: Call) -> None:
    check_offsets(call)
    check_per_token(call)
    g = call.params.get("gates")
    if g is None:
        return
    D, Dv, F = call.head_dim, call.value_dim, g.shape[-1]
    if g.dim() != 4 or not (F in (1, D + Dv) or (F == D and Dv == D)):
        shared = f", or D = {D} (shared by keys and values, since Dv == D)" if Dv == D else ""
        raise ValueError(f"{NAME}: parameter 'gates' must have shape (B|1, H|1, Lk, F) with F = 1 or D + Dv = {D + Dv}"
                         f"{shared}; got {tuple(g.shape)}")
    if not within(g, 0.0, 1.0):
        raise ValueError(f"{NAME}: parameter 'gates' must lie in [0, 1] (forget gates, e.g. torch.sigmoid(logits)), "
                         f"got values in [{float(g.min())}, {float(g.max())}]")


def _example_gates(channels: str):
    """Conformance examples: gates uniform in [0, 1) for the example's keys; ``channels`` is 'key+value'
    (F = D + Dv, per head) or 'shared' (F = 1, one head broadcast to all)."""
    if channels == "key+value":
        return lambda heads, length, head_dim, value_dim: torch.rand(1, heads, length, head_dim + value_dim,
                                                                      dtype=torch.float64)
    return lambda length: torch.rand(1, 1, length, 1, dtype=torch.float64)


register(Mechanism(
    name=NAME,
    family="linear",
    paper="RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling (Wei, Yadav, Pascanu, "
          "Gulcehre 2025)",
    summary="Chunks of C tokens: a gated linear recurrence (EMA) of keys and values inside each chunk, softmax "
            "attention over the earlier chunks' final summaries and the current running one",
    formula="k̃_t = g_t ⊙ k̃_{t-1} + (1-g_t) ⊙ k_t and ṽ_t likewise, restarted at every chunk start (t mod C = 0); "
            "o_t = softmax_j(scale q_t·k̃_j) ṽ_j over j ∈ {ends of the chunks before t's} ∪ {t}; chunk = 1: softmax "
            "attention on (1-g)k, (1-g)v; chunk >= L: o_t = ṽ_t. Non-causal: j over every chunk's end",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    params=(CHUNK, GATE, GATES, OFFSETS),
    impls=forms({"chunked": "chunked form: intra-chunk recurrence as a parallel scan, attention over chunk finals "
                            "in query groups (O(L^2/C d) time, O(L d) memory); on CPU C++ kernels (the recurrence as "
                            "written; causal: one pass per (batch, head), with a backward kernel)",
                 "recurrent": "recurrent form: one token at a time; state = running summary + one per finished "
                              "chunk (O(t/C d))"}),
    check_params=_check,
    examples=({"chunk": 4, "gates": _example_gates("key+value")}, {"chunk": 3, "gate": 0.7},
              {"chunk": 5, "gates": _example_gates("shared")}),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          noncausal_recurrent=_noncausal_recurrent,
                          fused=lambda call: call.causal and _fused_linear(call)),
    flops=_flops,
    complexity={"time": "O(L^2/C d + L d) (the PyTorch path's parallel scan: + L d log C)", "memory": "O(L d)",
                "state": "O(L/C d)"},
    extras={"gradcheck_impls": ("chunked", "parallel"),
            "state_grows": "RAT keeps one key/value summary per finished chunk: O(L/C) state, the paper's trade-off",
            "random_params": lambda B, H, L, D, gen: {"gates": torch.rand(B, H, L, D, generator=gen)}},
))

__all__ = ["lag_summaries", "scan_summaries"]
