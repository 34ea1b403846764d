"""Parallel, chunked and recurrent forms of one mechanism, behind one catalogue entry.

Linear, recurrent and memory mechanisms (MECHANISMS.md section 4) compute one function three
ways: the **parallel** form (quadratic and readable: the reference), the **chunked** form (block
size a parameter; intra-chunk attention plus an inter-chunk state, Lightning Attention's split)
and the **recurrent** form (one token at a time through an explicit :class:`State`). An entry
supplies them as a :class:`Recurrence`; :func:`forms` turns it into the entry's
implementations ``chunked``, ``recurrent`` and ``parallel``.

What every form gets for free here, so each mechanism writes only its mathematics:

- **GQA**: key/value heads (and per-token tensors given per key/value head) are repeated to the
  query heads before a form runs, so states are per query head.
- **Causal cross attention** (bottom-right aligned, ``Lq != Lk``): the first ``Lk - Lq`` keys are
  absorbed into the state first (their outputs dropped); with ``Lq > Lk`` the first ``Lq - Lk``
  queries see no key and give zeros (the catalogue's fully-masked-row rule).
- **Packed variable-length input**: ``offsets`` (document start positions, as FlashAttention's
  ``cu_seqlens`` without the final length) split the sequence; every document starts from the
  initial state, so state never leaks across a boundary.
- **Segments**: ``m.scan(q, k, v, state=...)`` continues from a state and returns the final one,
  so a long sequence processed in pieces equals processing it whole.
- **Per-token tensors** (gates, decays: parameters declared with ``per_token=True``, shaped
  ``(B, H, Lk, ...)`` or broadcastable on B and H) are sliced alongside the keys.

States hold float32 accumulators for float16/bfloat16 inputs (float64 stays float64).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .catalogue import Call, Implementation, Mechanism, Param

FORMS = ("chunked", "recurrent", "parallel")
#: Causal chunked forms run over spans of about this many tokens (whole chunks), state carried.
SPAN = 512

#: The chunk-size parameter every chunked form declares (Lightning Attention's block size).
CHUNK_SIZE = Param("chunk_size", "int", 64, "block size of the chunked form (tokens per chunk); it changes "
                   "speed and memory, never the result", ge=1)
#: Packed variable-length input: state resets at each offset.
OFFSETS = Param("offsets", "ints", None, "document start positions of a packed sequence (increasing, first 0, "
                "all < L; FlashAttention's cu_seqlens without the total): every document starts from the "
                "initial state", optional=True, ge=0)


@dataclass
class State:
    """The recurrent state of one layer after ``length`` tokens: named tensors, batch x heads first."""

    mechanism: str
    tensors: Dict[str, torch.Tensor]
    length: int = 0

    @property
    def floats(self) -> int:
        """Number of stored numbers (the state size the benchmark plots recall against)."""
        return sum(t.numel() for t in self.tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def replace(self, length: Optional[int] = None, **tensors) -> "State":
        return State(self.mechanism, {**self.tensors, **tensors}, self.length if length is None else length)


@dataclass
class Recurrence:
    """The three forms of one mechanism. Each gets q, k, v with ``Hq`` heads (GQA expanded).

    ``parallel(call, q, k, v) -> out``: the quadratic definition, for every declared pattern.
    ``chunked(call, q, k, v, state) -> (out, state)``: causal: an aligned segment (``Lq == Lk``)
    continuing ``state`` (``None``: the initial state); non-causal: the whole call, ``state`` is
    None in and may be None out.
    ``step(call, state, q_t, k_t, v_t) -> (o_t, state)``: one causal token, ``(B, H, D)`` each;
    per-token tensors in ``call.params`` are sliced to the token (length-1 axis 2).
    ``init(call, batch, heads, dtype, device) -> State``: the initial state.
    ``noncausal_recurrent(call, q, k, v) -> out``: the recurrent form of a non-causal call (for
    example: absorb every key into the state, then read it out per query); required when the
    entry declares a non-causal pattern.
    ``state_size(heads, head_dim, value_dim, **params) -> int``: floats per layer.
    ``fused(call) -> bool``: True when ``chunked`` runs as one fused kernel on this call (the C++
    kernel of :mod:`attnlab.native`), which keeps its own working set in cache: the call is then
    not cut into spans.
    """

    parallel: Callable
    chunked: Callable
    step: Callable
    init: Callable
    state_size: Callable
    noncausal_recurrent: Optional[Callable] = None
    fused: Optional[Callable] = None


# --------------------------------------------------------------------------------------------
# Running a form on a validated call
# --------------------------------------------------------------------------------------------
def _per_token(mech: Mechanism):
    return [p.name for p in mech.params if p.per_token]


def token_params(mech: Mechanism, params: Dict, index) -> Dict:
    """``params`` with every per-token tensor (``Param.per_token``) indexed on its key axis 2 by ``index``:
    a slice of key positions, one position (the axis dropped), or None (a length-1 axis added)."""
    names = _per_token(mech)
    return {n: (x[:, :, index] if n in names and isinstance(x, torch.Tensor) else x) for n, x in params.items()}


def _expand_heads(x: torch.Tensor, heads: int, broadcast: bool = False) -> torch.Tensor:
    """Key/value heads repeated to the query heads (a per-token tensor may keep one broadcast head)."""
    if x.shape[1] == heads or (broadcast and x.shape[1] == 1):
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _slice_call(call: Call, names, start: int, stop: int, q_len: int) -> Call:
    """The call restricted to keys ``start:stop`` (per-token tensors sliced) and ``q_len`` queries."""
    params = token_params(call.mechanism, call.params, slice(start, stop))
    if "offsets" in params:
        params["offsets"] = None
    return dataclasses.replace(call, q_len=q_len, kv_len=stop - start, params=params)


def run_form(form: str, call: Call, q, k, v, state: Optional[State] = None) -> Tuple[torch.Tensor, Optional[State]]:
    """Run ``form`` of ``call.mechanism`` on (B, H, L, D) inputs; returns (out, final state)."""
    mech = call.mechanism
    rec: Recurrence = mech.recurrence
    names = _per_token(mech)
    H = call.q_heads
    k, v = _expand_heads(k, H), _expand_heads(v, H)
    params = {n: (_expand_heads(x, H, broadcast=True) if n in names and isinstance(x, torch.Tensor) else x)
              for n, x in call.params.items()}
    call = dataclasses.replace(call, params=params)
    offsets = call.params.get("offsets")
    if offsets:
        bounds = list(offsets) + [call.kv_len]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            sub = _slice_call(call, names, a, b, b - a)
            out, state_out = _run_aligned(form, rec, sub, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
            outs.append(out)
        return torch.cat(outs, dim=2), state_out
    return _run_aligned(form, rec, call, q, k, v, state)


def _run_aligned(form, rec: Recurrence, call: Call, q, k, v, state):
    """Causal cross alignment (absorb the key prefix / zero rows), then the form itself."""
    Lq, Lk = q.shape[2], k.shape[2]
    if form == "parallel":
        if state is not None:
            raise ValueError(f"{call.mechanism.name}: the parallel form takes no state; use impl='chunked' or "
                             f"'recurrent' to continue from one")
        return rec.parallel(call, q, k, v), None
    if not call.causal:
        if state is not None:
            raise ValueError(f"{call.mechanism.name}: state continues causal calls only (causal=True), "
                             f"got causal=False")
        if form == "chunked":
            return rec.chunked(call, q, k, v, None)
        return rec.noncausal_recurrent(call, q, k, v), None
    names = _per_token(call.mechanism)
    if Lk > Lq:  # bottom-right: the first Lk - Lq keys come before every query
        pre = _slice_call(call, names, 0, Lk - Lq, Lk - Lq)
        _, state = _causal(form, rec, pre, torch.zeros_like(q[:, :, :1]).expand(-1, -1, Lk - Lq, -1),
                           k[:, :, :Lk - Lq], v[:, :, :Lk - Lq], state)
        call = _slice_call(call, names, Lk - Lq, Lk, Lq)
        k, v = k[:, :, Lk - Lq:], v[:, :, Lk - Lq:]
    elif Lq > Lk:  # the first Lq - Lk queries see no key
        out, state = _causal(form, rec, dataclasses.replace(call, q_len=Lk), q[:, :, Lq - Lk:], k, v, state)
        zeros = out.new_zeros(out.shape[:2] + (Lq - Lk, out.shape[-1]))
        return torch.cat([zeros, out], dim=2), state
    return _causal(form, rec, call, q, k, v, state)


def _causal(form, rec: Recurrence, call: Call, q, k, v, state):
    if form == "chunked":
        return _spans(rec, call, q, k, v, state)
    names = _per_token(call.mechanism)
    if state is None:
        state = rec.init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    outs = []
    for t in range(q.shape[2]):
        o, state = rec.step(_slice_call(call, names, t, t + 1, 1), state, q[:, :, t], k[:, :, t], v[:, :, t])
        outs.append(o)
    return torch.stack(outs, dim=2), state


def _spans(rec: Recurrence, call: Call, q, k, v, state):
    """The chunked form over spans of about :data:`SPAN` tokens (whole chunks), the state carried
    between them: every per-token pass (feature maps, gates) then runs on cache-sized pieces, so
    throughput does not fall as L grows. Results are those of one call (segments are exact)."""
    L = q.shape[2]
    chunk = call.params.get("chunk_size") or 1
    span = max(chunk, SPAN // chunk * chunk)
    if L <= span or (rec.fused is not None and rec.fused(call)):
        return rec.chunked(call, q, k, v, state)
    names = _per_token(call.mechanism)
    out = None
    for a in range(0, L, span):
        b = min(L, a + span)
        piece, state = rec.chunked(_slice_call(call, names, a, b, b - a), q[:, :, a:b], k[:, :, a:b],
                                   v[:, :, a:b], state)
        if out is None:  # one output written span by span: the pieces' memory is reused, not accumulated
            out = piece.new_empty(piece.shape[:2] + (L,) + piece.shape[3:])
        out[:, :, a:b] = piece
    return out, state


# --------------------------------------------------------------------------------------------
# Catalogue glue
# --------------------------------------------------------------------------------------------
def forms(docs: Optional[Dict[str, str]] = None) -> Tuple[Implementation, ...]:
    """The ``chunked``, ``recurrent`` and ``parallel`` implementations of a recurrence entry."""
    docs = docs or {}
    default = {"chunked": "chunked form: intra-chunk attention + inter-chunk state (O(L) time and memory)",
               "recurrent": "recurrent form: one token at a time through the explicit state (O(1) state)",
               "parallel": "parallel form: the quadratic definition (the reference)"}

    def impl(form):
        return Implementation(form, lambda call, q, k, v: run_form(form, call, q, k, v)[0],
                              doc=docs.get(form, default[form]))

    return tuple(impl(f) for f in FORMS)


def check_offsets(call: Call) -> None:
    """``offsets`` must be increasing, start at 0, stay below L, and need self attention."""
    offsets = call.params.get("offsets")
    if offsets is None:
        return
    name = call.mechanism.name
    if call.q_len != call.kv_len:
        raise ValueError(f"{name}: offsets (packed documents) need self attention (q length == k length), got "
                         f"{call.q_len} and {call.kv_len}")
    if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= call.kv_len:
        raise ValueError(f"{name}: offsets must start at 0, increase strictly and stay below the length "
                         f"{call.kv_len}, got {list(offsets)}")


def check_per_token(call: Call) -> None:
    """Per-token tensors must be (B or 1, Hq or Hkv or 1, Lk, ...) in the inputs' dtype family."""
    mech = call.mechanism
    for n in _per_token(mech):
        x = call.params.get(n)
        if x is None:
            continue
        ok = (x.dim() >= 3 and x.shape[0] in (1, call.batch) and x.shape[1] in (1, call.q_heads, call.kv_heads)
              and x.shape[2] == call.kv_len and x.is_floating_point())
        if not ok:
            raise ValueError(f"{mech.name}: parameter '{n}' must be a float tensor of shape (B or 1, Hq or Hkv or 1, "
                             f"Lk={call.kv_len}, ...), got {tuple(x.shape)} {x.dtype}")
        if x.device != call.device:
            raise ValueError(f"{mech.name}: parameter '{n}' is on {x.device}, the inputs on {call.device}")


def within(x: torch.Tensor, low: float = -math.inf, high: float = math.inf) -> bool:
    """True when every element of ``x`` is finite and in ``[low, high]``: one pass (``aminmax``) over a
    per-token tensor, so validating gates costs little beside the mechanism itself; NaN fails."""
    if x.numel() == 0:
        return True
    lo, hi = (float(t) for t in torch.aminmax(x.detach()))
    return math.isfinite(lo) and math.isfinite(hi) and low <= lo and hi <= high


def _check_state(mech: Mechanism, state, call: Call) -> None:
    if state is None:
        return
    if not isinstance(state, State):
        raise TypeError(f"{mech.name}: state must be an attnlab State (from a previous scan/step) or None, "
                        f"got {type(state).__name__}")
    if state.mechanism != mech.name:
        raise ValueError(f"{mech.name}: state comes from {state.mechanism!r}, not from {mech.name!r}")
    for name, t in state.tensors.items():
        if t.shape[:2] != (call.batch, call.q_heads):
            raise ValueError(f"{mech.name}: state tensor {name!r} is for batch x heads {tuple(t.shape[:2])}, the "
                             f"inputs have {(call.batch, call.q_heads)}")
        if t.device != call.device:
            raise ValueError(f"{mech.name}: state is on {t.device}, the inputs on {call.device}")


def scan(mech: Mechanism, q, k, v, state: Optional[State] = None, *, impl: str = "chunked", causal: bool = True,
         scale: Optional[float] = None, **params) -> Tuple[torch.Tensor, State]:
    """Run a causal segment continuing ``state``; returns ``(out, final state)``."""
    if impl not in ("chunked", "recurrent"):
        raise ValueError(f"{mech.name}: impl must be 'chunked' or 'recurrent' for a stateful scan, got {impl!r}")
    if causal is not True:
        raise ValueError(f"{mech.name}: scan continues causal sequences only; causal must be True, got {causal!r}")
    call = mech.prepare(q, k, v, causal=True, scale=scale, **params)
    _check_state(mech, state, call)
    if call.params.get("offsets") and state is not None:
        raise ValueError(f"{mech.name}: offsets reset the state at every document; give state=None with offsets")
    return run_form(impl, call, q, k, v, state)


def step(mech: Mechanism, state: Optional[State], q_t, k_t, v_t, *, scale: Optional[float] = None,
         **params) -> Tuple[torch.Tensor, State]:
    """One causal token: ``(B, Hq, D), (B, Hkv, D), (B, Hkv, Dv)`` -> ``o_t (B, Hq, Dv)``, new state.

    Per-token tensor parameters are given for this token only: ``(B, H, ...)`` without the length axis.
    """
    for arg, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{mech.name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{mech.name}: {arg} must have shape (B, H, D) (one token), got {tuple(x.shape)}")
    params = token_params(mech, params, None)  # one token: a length-1 key axis
    q, k, v = q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2)
    call = mech.prepare(q, k, v, causal=True, scale=scale, **params)
    if call.params.get("offsets"):
        raise ValueError(f"{mech.name}: offsets do not apply to step (one token); start a new document with "
                         f"state=None")
    _check_state(mech, state, call)
    out, final = run_form("recurrent", call, q, k, v, state)
    return out[:, :, 0], final


__all__ = ["CHUNK_SIZE", "FORMS", "OFFSETS", "Recurrence", "State", "check_offsets", "check_per_token", "forms",
           "run_form", "scan", "step", "token_params"]
