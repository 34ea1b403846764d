"""``aaren``: exact softmax attention as a many-to-many RNN (Feng et al. 2024, "Attention as an RNN").

Aaren attends with **one query token per layer** (a learned constant ``q``, per head) over the
inputs seen so far; its many-to-many output is the attention of that query over every prefix::

    o_t = Σ_{j<=t} exp(s_j) v_j / Σ_{j<=t} exp(s_j),        s_j = scale · q·k_j

Each prefix is summarised by the triple ``(m, u, w)`` = (running max of the scores,
``Σ exp(s_j - m)``, ``Σ exp(s_j - m) v_j``), so ``o_t = w_t / u_t``. The paper's associative
operator merges two adjacent spans ``A`` (earlier) and ``B``::

    (m_A, u_A, w_A) ⊕ (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B e^{m_B - m}, w_A e^{m_A - m} + w_B e^{m_B - m}),
    m = max(m_A, m_B)

One token is the element ``(s_j, 1, v_j)``. Its three forms here:

- **recurrent**: ``state ← state ⊕ (s_t, 1, v_t)``, ``o_t = w / u``: O(1) work and state per token
  (the paper's RNN cell);
- **chunked**: the parallel prefix scan done blockwise: a Hillis-Steele inclusive scan with ``⊕``
  inside every block of ``chunk_size`` tokens (depth ``⌈log₂ C⌉``), the same scan over the block
  totals (depth ``⌈log₂ L/C⌉``), then each block's prefix merged in: all ``L`` outputs in
  ``O(log L)`` depth (the paper's many-to-many form by the parallel prefix scan);
- **parallel**: the quadratic softmax definition (:func:`attnlab.reference.attention`), the reference.

Conventions (where attnlab's ``(B, H, L, D)`` interface meets Aaren):

- **One query per (batch, head).** ``q`` is ``(B, H, Lq, D)`` with every row equal: Aaren's query
  token repeated along the length axis, e.g. ``query[:, :, None].expand(-1, -1, L, -1)`` (a view,
  no copy). Then the causal output is exactly causal dense attention with that query at every
  position (``attnlab.mechanism('dense')``), and the state is O(1). Rows that differ are refused
  with a ValueError (not silently read from row 0): a different query per position has no O(1)
  recurrent form (exact softmax would need every key: a KV cache), so use ``dense`` for that.
  A NaN query makes every row NaN; it is the same query. The gradient w.r.t. ``q`` is spread
  evenly over its rows (``g / L`` each, a view): summed over the rows (what an expanded view
  accumulates) it is the gradient w.r.t. the shared query, the only direction in which ``q`` may
  vary, and no ``(B, H, L, D)`` tensor of zeros is written for it.
- **Causal cross** (bottom-right, ``Lq != Lk``): row ``i`` is the prefix output at key position
  ``i + Lk - Lq`` (``Lq < Lk``: the last ``Lq`` prefix outputs; ``Lq > Lk``: the first ``Lq - Lk``
  rows see no key and are 0). The chunked and recurrent forms run the query over all ``Lk`` keys.
- **Non-causal** (self or cross): every row is Aaren's many-to-one output, the attention of the
  query over all keys (``o_N``, the last prefix).
- **State** ``{query (B,H,D), m (B,H), u (B,H), w (B,H,Dv)}``: ``D + Dv + 2`` floats per head. The
  query is kept so that continuing a state with another query raises instead of mixing two
  queries. ``m.scan`` continues self-attention segments (``Lq == Lk``).
- **Numerics**: scores and accumulators in float32 for half inputs; the exponentials only see
  ``m_A - m <= 0`` so nothing overflows at any length, and ``u >= 1`` (the maximal score contributes
  ``e^0``), so the division needs no epsilon. ``m`` is a stabiliser with a stop-gradient (one token
  is ``(sg(s), exp(s - sg(s)), exp(s - sg(s)) v)``): the outputs do not depend on it, and the
  gradient flows through ``u`` and ``w`` only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import native as _native
from .. import reference as R
from ..catalogue import Call, Implementation, Mechanism, register
from ..linear import fused as _fused_linear
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, run_form

NAME = "aaren"
Elems = Tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------------------------
# The associative scan
# --------------------------------------------------------------------------------------------
def prefix_scan(combine: Callable[[Elems, Elems], Elems], elems: Sequence[torch.Tensor], dim: int) -> Elems:
    """Inclusive Hillis-Steele scan along ``dim`` (non-negative) of an associative ``combine``.

    ``elems`` are tensors sharing the scanned axis; ``combine(earlier, later)`` merges two spans
    elementwise. Step ``d = 1, 2, 4, ...`` replaces element ``t >= d`` by ``x_{t-d} ⊕ x_t``: after
    ``⌈log₂ n⌉`` steps element ``t`` holds ``x_0 ⊕ ... ⊕ x_t`` (Hillis & Steele 1986).
    """
    elems = tuple(elems)
    n, d = elems[0].shape[dim], 1
    while d < n:
        merged = combine(tuple(x.narrow(dim, 0, n - d) for x in elems), tuple(x.narrow(dim, d, n - d) for x in elems))
        elems = tuple(torch.cat([x.narrow(dim, 0, d), y], dim) for x, y in zip(elems, merged))
        d *= 2
    return elems


def combine(a: Elems, b: Elems) -> Elems:
    """Aaren's ``⊕`` on ``(m, u, w)``: ``m`` and ``u`` are ``(...)``, ``w`` is ``(..., Dv)``; broadcasts."""
    (ma, ua, wa), (mb, ub, wb) = a, b
    m = torch.maximum(ma, mb)
    ea, eb = (ma - m).exp(), (mb - m).exp()
    return m, ua * ea + ub * eb, wa * ea[..., None] + wb * eb[..., None]


def tokens(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Elems:
    """One ``(m, u, w) = (sg(s), exp(s - sg(s)), exp(s - sg(s)) v)`` per key, ``s = scale · q·k``."""
    s = (k @ query[..., None])[..., 0] * scale
    m = s.detach()
    u = (s - m).exp()
    return m, u, u[..., None] * v


def blockwise_scan(elems: Elems, chunk: int, carry: Optional[Elems] = None) -> Elems:
    """All prefixes ``carry ⊕ x_0 ⊕ ... ⊕ x_t`` of ``(B, H, L, ...)`` elements, blockwise.

    Blocks of ``chunk`` tokens are scanned in parallel (Hillis-Steele inside each block), their
    totals are scanned across blocks, and block ``c`` gets the total of blocks ``< c`` merged in
    front. A last, shorter block (``chunk`` not dividing ``L``) is a second pass continuing the first.
    """
    L = elems[0].shape[2]
    n = L // chunk
    outs = []
    for a, b, size in ((0, n * chunk, chunk), (n * chunk, L, L - n * chunk)):
        if b == a:
            continue
        blocks = tuple(x[:, :, a:b].unflatten(2, (-1, size)) for x in elems)  # (B, H, nb, size, ...)
        inner = prefix_scan(combine, blocks, 3)
        totals = prefix_scan(combine, tuple(x[:, :, :, -1] for x in inner), 2)  # inclusive, over blocks
        if blocks[0].shape[2] > 1:  # block c >= 1 starts after blocks 0..c-1
            before = tuple(t[:, :, :-1, None] for t in totals)
            merged = combine(before, tuple(x[:, :, 1:] for x in inner))
            inner = tuple(torch.cat([x[:, :, :1], y], 2) for x, y in zip(inner, merged))
        if carry is not None:
            inner = combine(tuple(c[:, :, None, None] for c in carry), inner)
        outs.append(tuple(x.flatten(2, 3) for x in inner))
        carry = tuple(x[:, :, -1] for x in outs[-1])
    return tuple(torch.cat(parts, 2) for parts in zip(*outs)) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------------------------
# The query: one per (batch, head)
# --------------------------------------------------------------------------------------------
def shared_query(q: torch.Tensor, arg: str = "q") -> torch.Tensor:
    """``q[:, :, 0]`` after checking that every row repeats it (NaN equal to NaN); else ValueError. Its
    gradient w.r.t. ``q`` is spread evenly over the rows (:class:`_Row`)."""
    first = q[:, :, :1]
    if q.shape[2] <= 1 or q.stride(2) == 0 or torch.equal(q, first.expand_as(q)):  # one pass, or none for a view
        return _Row.apply(q)
    same = (q == first) | (q.isnan() & first.isnan())  # NaN equal to NaN
    if not bool(same.all()):
        row = int(torch.nonzero(~same.all(-1).all(0).all(0))[0, 0])
        raise ValueError(f"{NAME}: {arg} must repeat one query per (batch, head) along its length axis (Aaren's "
                         f"query token, e.g. query[:, :, None].expand(-1, -1, L, -1)), but row {row} differs from row "
                         f"0; a different query per position has no O(1) recurrent form: use "
                         f"attnlab.mechanism('dense') with causal=True for that (aaren equals it for a shared query)")
    return _Row.apply(q)


class _Row(torch.autograd.Function):
    """``q[:, :, 0]`` of a query whose rows are equal, with the gradient ``g / L`` in every row, returned as a
    view repeated along the length axis: summed over the rows (what autograd does for the expanded view a
    user passes) it is ``g``, the gradient w.r.t. the one query, and no ``(B, H, L, D)`` tensor of zeros is
    written and read back (what ``q[:, :, 0]``'s own backward does, costing more than Aaren's whole scan)."""

    @staticmethod
    def forward(ctx, q):
        ctx.length = q.shape[2]
        return q[:, :, 0].clone()

    @staticmethod
    def backward(ctx, g):
        return (g / ctx.length)[:, :, None].expand(-1, -1, ctx.length, -1)


def _state_query(q: torch.Tensor, state: Optional[State], arg: str = "q") -> torch.Tensor:
    """The call's query (accumulation dtype); when continuing a state, the state's (checked equal to the call's),
    so that gradients w.r.t. the query reach the row that started the sequence, as in every form."""
    query = shared_query(q, arg).to(R.compute_dtype(q.dtype))
    if state is None or state.length == 0:
        return query
    kept = state["query"]
    if not bool(((query == kept) | (query.isnan() & kept.isnan())).all()):
        raise ValueError(f"{NAME}: {arg} differs from the query this state was built with; Aaren runs one query "
                         f"through the whole sequence (m.scan continues self-attention segments, q length == "
                         f"k length, with the same query)")
    return kept


def _finish(m_u_w: Elems, like: torch.Tensor) -> torch.Tensor:
    _, u, w = m_u_w
    return (w / u[..., None]).to(like.dtype)


def _as_state(query, m_u_w: Elems, length: int) -> State:
    m, u, w = m_u_w
    return State(NAME, {"query": query, "m": m, "u": u, "w": w}, length)


# --------------------------------------------------------------------------------------------
# The three forms (GQA already expanded; causal cross handled by _impl)
# --------------------------------------------------------------------------------------------
def _parallel(call: Call, q, k, v):
    """The quadratic definition: softmax(scale · q kᵀ) v with the causal (bottom-right) mask, q = row 0 repeated."""
    return R.attention(q[:, :, :1].expand_as(q), k, v, causal=call.causal, scale=call.scale)


def _chunked(call: Call, q, k, v, state: Optional[State]):
    dt = R.compute_dtype(q.dtype)
    query = _state_query(q, state)
    if _native.serves(query, k, v, *(() if state is None else state.tensors.values()), backward=True):
        return _native_chunked(call, query, k.to(dt), v.to(dt), state, q)
    elems = tokens(query, k.to(dt), v.to(dt), call.scale)
    carry = None if state is None or state.length == 0 else (state["m"], state["u"], state["w"])
    prefixes = blockwise_scan(elems, call.params["chunk_size"], carry)
    if not call.causal:  # many-to-one: every row is the output over all keys
        last = tuple(x[:, :, -1:] for x in prefixes)
        return _finish(last, v).expand(-1, -1, q.shape[2], -1).contiguous(), None
    final = tuple(x[:, :, -1] for x in prefixes)
    return _finish(prefixes, v), _as_state(query, final, (0 if state is None else state.length) + k.shape[2])


def _native_chunked(call: Call, query, k, v, state: Optional[State], q):
    """:func:`_chunked` on the C++ kernel (:func:`attnlab.native.aaren_scan`): the keys walked once per
    (batch, head) with the state, every exponent <= 0 as in the scan; trained through its backward kernel
    (one reverse pass)."""
    B, H, L, _ = k.shape
    start = _init(call, B, H, k.dtype, k.device) if state is None else state
    out, m, u, w = _native.aaren_scan(query.contiguous(), k, v, start["m"], start["u"], start["w"], call.scale,
                                      call.causal)
    out = out.to(q.dtype)
    if not call.causal:
        return out.expand(-1, -1, q.shape[2], -1).contiguous(), None
    return out, _as_state(query, (m, u, w), (0 if state is None else state.length) + L)


def _step(call: Call, state: State, q_t, k_t, v_t):
    dt = R.compute_dtype(q_t.dtype)
    query = _state_query(q_t[:, :, None], state, "q_t")
    tok = tokens(query, k_t.to(dt)[:, :, None], v_t.to(dt)[:, :, None], call.scale)
    tok = tuple(x[:, :, 0] for x in tok)
    new = tok if state.length == 0 else combine((state["m"], state["u"], state["w"]), tok)
    return _finish(new, v_t), _as_state(query, new, state.length + 1)


def _noncausal_recurrent(call: Call, q, k, v):
    state = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    for t in range(k.shape[2]):
        o, state = _step(call, state, q[:, :, 0], k[:, :, t], v[:, :, t])
    return o[:, :, None].expand(-1, -1, q.shape[2], -1).contiguous()


def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    dt = R.compute_dtype(dtype)
    z = lambda *s: torch.zeros(batch, heads, *s, dtype=dt, device=device)  # noqa: E731
    return State(NAME, {"query": z(call.head_dim), "m": torch.full((batch, heads), float("-inf"), dtype=dt,
                                                                   device=device),
                        "u": z(), "w": z(call.value_dim)}, 0)


def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """Per head: the query (D), m, u and w (Dv)."""
    return heads * (head_dim + value_dim + 2)


def _impl(form: str, doc: str):
    """Check the shared query before any work; chunked/recurrent causal cross = causal self over Lk keys."""

    def run(call: Call, q, k, v):
        row = shared_query(q)[:, :, None]  # once: the forms then see it repeated as a view, checked free
        Lq, Lk = call.q_len, call.kv_len
        if form == "parallel" or not call.causal or Lq == Lk:
            return run_form(form, call, row.expand_as(q), k, v)[0]
        whole = dataclasses.replace(call, q_len=Lk, pattern="causal_self")
        out = run_form(form, whole, row.expand(-1, -1, Lk, -1), k, v)[0]
        if Lq <= Lk:
            return out[:, :, Lk - Lq:]
        return torch.cat([out.new_zeros(out.shape[:2] + (Lq - Lk, out.shape[-1])), out], 2)

    return Implementation(form, run, doc=doc)


def _flops(call: Call) -> float:
    """The useful work over all Lk keys: the score (2D per key), one ``⊕`` per key (3·Dv + 8: a max, two
    exps, the u and w updates) and the division (Dv per key). The C++ kernel does this; the PyTorch
    path's Hillis-Steele scan does about log2(chunk_size) times the ``⊕``s."""
    per_key = 2 * call.head_dim + 3 * call.value_dim + 8 + call.value_dim
    return float(call.batch * call.q_heads * call.kv_len * per_key)


def _check(call: Call) -> None:
    check_offsets(call)


register(Mechanism(
    name=NAME,
    family="linear",
    paper="Attention as an RNN (Aaren, Feng et al. 2024)",
    summary="Exact softmax attention of one query token computed as a many-to-many RNN: state (max, sum, weighted "
            "sum), merged by an associative operator; parallel prefix scan for training, O(1) state per step",
    formula="o_t = Σ_{j<=t} exp(s_j) v_j / Σ_{j<=t} exp(s_j), s_j = scale·q·k_j, one query q per (batch, head) "
            "(every row of q equal). State (m, u, w) = (max s, Σ e^{s-m}, Σ e^{s-m} v), o = w/u; "
            "(m_A,u_A,w_A) ⊕ (m_B,u_B,w_B) = (m, u_A e^{m_A-m} + u_B e^{m_B-m}, w_A e^{m_A-m} + w_B e^{m_B-m}), "
            "m = max(m_A, m_B). Non-causal: every row is o_N (the many-to-one output)",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    params=(CHUNK_SIZE, OFFSETS),
    impls=(
        _impl("chunked", "chunked form: blockwise parallel prefix scan with ⊕ (Hillis-Steele inside blocks and "
                         "across block totals), O(log L) depth, O(L d) memory; on CPU without autograd the RNN "
                         "itself, keys walked once per (batch, head) by a C++ kernel"),
        _impl("recurrent", "recurrent form: state ⊕ (s_t, 1, v_t) one token at a time (O(1) state)"),
        _impl("parallel", "parallel form: the quadratic softmax definition (the reference)"),
    ),
    check_params=_check,
    examples=({"chunk_size": 5}, {}),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          noncausal_recurrent=_noncausal_recurrent,
                          fused=_fused_linear),
    flops=_flops,
    complexity={"time": "O(L (d + d_v)) work on the C++ kernel (the RNN); the parallel prefix scan: O(L d + L d_v "
                        "log C + (L/C) d_v log(L/C)) work, O(log L) depth",
                "memory": "O(L d_v)", "state": "O(d + d_v)"},
    extras={"gradcheck_impls": ("chunked", "parallel"),
            "shared_query": "Aaren attends with one query token per (batch, head): every row of q must be equal "
                            "(the query repeated along the length axis)"},
))

__all__ = ["blockwise_scan", "combine", "prefix_scan", "shared_query", "tokens"]
