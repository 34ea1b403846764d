"""``based``: Taylor-feature linear attention plus a small exact sliding window (BASED, Arora et al. 2024).

"Simple linear attention language models balance the recall-throughput tradeoff". Two parts, summed::

    o_i = lin_i + win_i
    lin_i = Σ_j φ(q'_i)·φ(k'_j) v_j / (Σ_j φ(q'_i)·φ(k'_j) + eps)        over visible j (causal: j <= i')
    win_i = softmax_j(scale q_i·k_j) v_j                                     over |i' - j| < window
                                                                             (causal: i' - window < j <= i')

- **Taylor feature map** (BASED's ``TaylorExp``): ``φ(x) = [1, x / d'^¼, vec(x ⊗ x) / (√2 √d')]`` of
  dimension ``1 + d' + d'²``, so that ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k / √d'`` exactly: the
  2nd-order Taylor expansion of ``exp(q·k / √d')``. ``d'`` is ``feature_dim`` (default 16, BASED's).
  In BASED the linear-attention layer projects its input to ``d'``-dim queries and keys of its own;
  an attention mechanism receives ``q, k`` of the head dim ``D``, so the linear part reads their first
  ``feature_dim`` channels ``q' = q[..., :d'], k' = k[..., :d']`` (``feature_dim <= D``; equal to
  BASED's layer when ``D == feature_dim``, or when the caller lays its projection out that way). The
  temperature ``1/√d'`` is the paper's and fixed; ``scale`` (default ``D^-½``) is the softmax scale of
  the window part only. ``1 + s + s²/2 = ((1 + s)² + 1)/2 >= ½``, so the normalizer is at least half the
  number of visible keys; ``eps = 1e-12`` (BASED's default) only keeps query rows that see no key (causal
  cross attention with ``Lq > Lk``) at zero. The full outer product (``d'²`` features, BASED's layout)
  is kept, so the state size matches the paper's ``(1 + d' + d'²) d_v`` per head.
- **Sliding window**: exact softmax attention over the last ``window`` keys, the query's own included
  (default 64, the paper's window), i.e. attnlab's ``sliding_window`` entry; non-causal calls use its
  two-sided window ``|i' - j| < window``, with ``i' = i + Lk - Lq`` (bottom-right) for cross attention.
  ``window=0`` drops the window part (Taylor linear attention alone).
- **Summing**: the paper describes BASED as linear attention plus sliding-window attention; its released
  models (hazyresearch/based) place them in *different layers* of a hybrid stack (with gated
  convolutions). This entry sums the two outputs in one mixer, as issue 3 specifies; use ``window=0``
  and ``sliding_window`` (or the ``hybrid`` builder) for the layer-wise arrangement.

State (recurrent form): the linear-attention state ``Σ_j φ(k_j)ᵀ [v_j, 1]`` (``(1 + d' + d'²) x (Dv+1)``
per head) plus a KV cache of the last ``window - 1`` keys and values (the next query's window holds
them and itself), so the state and the step cost are bounded: they do not grow with the context.

Forms: the linear part through :mod:`attnlab.linear` (parallel / chunked / recurrent). The window part:
parallel form: ``sliding_window``'s dense oracle (the definition); chunked form: :func:`banded_window`
(queries ``chunk_size`` at a time against the keys of their band, the state's cached keys first), O(L w);
one step: the dense oracle over the cache and the new key. A two-sided window has no one-directional
recurrence, so the non-causal recurrent form computes its window part as the chunked form does.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import linear as K
from .. import native as _native
from .. import reference as R
from ..catalogue import Call, Mechanism, Param, mechanism, register
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, check_per_token, forms

#: Normalizer epsilon of the linear part (hazyresearch/based LinearAttention default); see the docstring.
EPS = 1e-12


def taylor_features(x: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """BASED's 2nd-order Taylor map on the first ``feature_dim`` channels: ``(..., 1 + d' + d'²)``.

    ``φ(x) = [1, x/d'^¼, vec(x ⊗ x)/(√2 √d')]``, so ``φ(q)·φ(k) = 1 + s + s²/2``, ``s = q·k/√d'``
    (:func:`attnlab.linear.feature_map`, which the chunked form applies chunk by chunk).
    """
    return K.feature_map("taylor", x, feature_dim)


def _features(call: Call) -> int:
    d = call.params["feature_dim"]
    return 1 + d + d * d


def window_reference(call: Call, q, k, v):
    """The exact sliding-window part, by definition: attnlab's ``sliding_window`` dense oracle."""
    return mechanism("sliding_window")(q, k, v, causal=call.causal, window=call.params["window"], scale=call.scale,
                                       impl="reference")


def banded_window(q, k, v, *, window: int, scale: float, causal: bool, block: int) -> torch.Tensor:
    """Sliding-window softmax attention in O(L (block + window)) time and memory (bottom-right aligned).

    Query ``i`` sits at key position ``p = i + Lk - Lq`` and sees keys ``p - window < j <= p`` (causal) or
    ``|p - j| < window``. Queries are taken ``block`` at a time; block ``b`` needs the
    ``block + window - 1`` (causal) or ``block + 2 window - 2`` keys starting at ``b·block + Lk - Lq -
    window + 1``, which :meth:`torch.Tensor.unfold` reads from the zero-padded keys without copying;
    within a block the window is the band ``r <= c <= r + back + ahead`` (query ``r``, key slot ``c``).
    Rows that see no key give zeros. (``sliding_window``'s tiled backend builds its block structure from
    the whole ``Lq x Lk`` mask, quadratic in ``L``; this band is what keeps the chunked form O(L).)
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    off = Lk - Lq
    back, ahead = window - 1, (0 if causal else window - 1)
    if _native.serves(q, k, v, backward=True):  # the same band, fused (C++ range kernel, forward and backward)
        p = torch.arange(Lq, device=q.device) + off
        start, end = (p - back).clamp(0, Lk), (p + ahead + 1).clamp(0, Lk)
        return _native.range_attention(q, k, v, start, end, scale)[0]
    C = max(1, min(block, Lq))
    n = -(-Lq // C)
    size = C + back + ahead
    left = back + max(0, -off)  # ext index e holds key e - left
    base = off + left - back  # ext index of block 0's first key slot (>= 0)
    length = base + (n - 1) * C + size
    right = max(0, length - left - Lk)

    def ext(x):
        x = torch.nn.functional.pad(x, (0, 0, left, right))
        return x[:, :, base:base + (n - 1) * C + size].unfold(2, size, C)  # (B, H, n, Dx, size)

    qb = torch.nn.functional.pad(q, (0, 0, 0, n * C - Lq)).unflatten(2, (n, C))  # (B, H, n, C, D)
    s = (qb @ ext(k)) * scale  # (B, H, n, C, size)
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(size, device=q.device)[None, :]
    j = (torch.arange(n, device=q.device) * C + off - back)[:, None, None] + c  # key index of each slot
    allowed = (c >= r) & (c <= r + back + ahead) & (j >= 0) & (j < Lk)  # (n, C, size)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))  # empty rows: exp(-inf) = 0
    out = p @ ext(v).transpose(-1, -2)  # (B, H, n, C, Dv)
    return out.flatten(2, 3)[:, :, :Lq]


def _window(call: Call, q, k, v):
    return banded_window(q, k, v, window=call.params["window"], scale=call.scale, causal=call.causal,
                         block=call.params["chunk_size"])


def _linear(call: Call, q, k, v):
    dt = R.compute_dtype(q.dtype)
    d = call.params["feature_dim"]
    return taylor_features(q.to(dt), d), taylor_features(k.to(dt), d), v.to(dt)


def _parallel(call: Call, q, k, v):
    fq, fk, vv = _linear(call, q, k, v)
    out = K.finish(K.parallel(fq, fk, K.with_ones(vv, True), causal=call.causal), True, EPS)
    if call.params["window"]:
        out = out + window_reference(call, q.to(fq.dtype), k.to(fq.dtype), v.to(fq.dtype))
    return out.to(v.dtype)


def _cache_len(call: Call) -> int:
    return max(call.params["window"] - 1, 0)


def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    dt, W = R.compute_dtype(dtype), _cache_len(call)
    return State("based", {
        "S": torch.zeros(batch, heads, _features(call), call.value_dim + 1, dtype=dt, device=device),
        "k": torch.zeros(batch, heads, W, call.head_dim, dtype=dt, device=device),
        "v": torch.zeros(batch, heads, W, call.value_dim, dtype=dt, device=device),
    }, 0)


def _with_cache(call: Call, state: State, k, v):
    """The cached keys/values that precede ``k, v`` (only the valid ones), and the cache after them."""
    W = _cache_len(call)
    n = min(state.length, W)
    if n == 0 and k.shape[2] >= W:  # nothing cached yet: the segment as it is, its last W tokens cached
        return k, v, k[:, :, k.shape[2] - W:].clone(), v[:, :, v.shape[2] - W:].clone()
    ks, vs = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
    start = ks.shape[2] - k.shape[2] - n
    return ks[:, :, start:], vs[:, :, start:], ks[:, :, ks.shape[2] - W:], vs[:, :, vs.shape[2] - W:]


def _chunked(call: Call, q, k, v, state: Optional[State]):
    if not call.causal:  # the Taylor map and the normalizer on the C++ kernel where it serves
        dt = R.compute_dtype(q.dtype)
        out = K.noncausal_fused(q.to(dt), k.to(dt), v.to(dt), chunk=call.params["chunk_size"], feature="taylor",
                                feature_dim=call.params["feature_dim"], normalize_eps=EPS)
        if out is None:
            fq, fk, vv = _linear(call, q, k, v)
            out = K.finish(K.noncausal(fq, fk, K.with_ones(vv, True)), True, EPS)
        if call.params["window"]:
            out = out + _window(call, q.to(dt), k.to(dt), v.to(dt))
        return out.to(v.dtype), None
    dt = R.compute_dtype(q.dtype)  # the causal chunked form maps q and k itself
    fq, fk, vv = q.to(dt), k.to(dt), v.to(dt)
    state = _init(call, q.shape[0], q.shape[1], q.dtype, q.device) if state is None else state
    out, S = K.chunked_normalized(fq, fk, vv, state["S"], chunk=call.params["chunk_size"], normalize=True,
                                  eps=EPS, feature="taylor", feature_dim=call.params["feature_dim"])
    kc, vc, k_cache, v_cache = _with_cache(call, state, fk, vv)
    if call.params["window"]:
        out = out + _window(call, fq, kc, vc)
    return out.to(v.dtype), state.replace(length=state.length + k.shape[2], S=S, k=k_cache, v=v_cache)


def _step(call: Call, state: State, q_t, k_t, v_t):
    fq, fk, vv = _linear(call, q_t, k_t, v_t)
    dt = fq.dtype
    raw, S = K.step(fq, fk, K.with_ones(vv, True), state["S"])
    out = K.finish(raw, True, EPS)
    kc, vc, k_cache, v_cache = _with_cache(call, state, k_t.to(dt)[:, :, None], v_t.to(dt)[:, :, None])
    if call.params["window"]:  # every cached key is within the window of this query
        out = out + R.attention(q_t.to(dt)[:, :, None], kc, vc, scale=call.scale)[:, :, 0]
    return out.to(v_t.dtype), state.replace(length=state.length + 1, S=S, k=k_cache, v=v_cache)


def _noncausal_recurrent(call: Call, q, k, v):
    fq, fk, vv = _linear(call, q, k, v)
    out = K.finish(K.noncausal(fq, fk, K.with_ones(vv, True), recurrent=True), True, EPS)
    if call.params["window"]:
        out = out + _window(call, q.to(fq.dtype), k.to(fq.dtype), v.to(fq.dtype))
    return out.to(v.dtype)


def state_size(heads: int, head_dim: int, value_dim: int, feature_dim: int = 16, window: int = 64, **_) -> int:
    """Floats per layer: ``H [(1 + d' + d'²)(Dv + 1) + (window - 1)(D + Dv)]`` (linear state with its
    normalizer, plus the KV cache of the last ``window - 1`` tokens)."""
    linear = (1 + feature_dim + feature_dim ** 2) * (value_dim + 1)
    return heads * (linear + max(window - 1, 0) * (head_dim + value_dim))


def _flops(call: Call) -> float:
    """Chunked form. Linear part (F = 1 + d' + d'² features, Dv + 1 columns): causal, per chunk of C
    tokens, scores 2·pairs·F and their values 2·pairs·(Dv+1) over C(C+1)/2 pairs, state write and read
    4·C·F·(Dv+1); non-causal, the keys' state 2·Lk·F·(Dv+1) and its read-out 2·Lq·F·(Dv+1). Window
    part: 2 (D + Dv) per visible query-key pair (min(window, L) keys per query causal, 2·window - 1
    two-sided; the band's masked slots are not counted)."""
    F, Dv1, C = _features(call), call.value_dim + 1, min(call.params["chunk_size"], call.kv_len)
    if call.causal:
        linear = (2 * C * (C + 1) / 2 * (F + Dv1) + 4 * C * F * Dv1) * max(call.q_len, call.kv_len) / C
    else:
        linear = 2 * F * Dv1 * (call.q_len + call.kv_len)
    W = call.params["window"]
    keys = min(W, call.kv_len) if call.causal else min(2 * W - 1, call.kv_len) if W else 0
    window = 2 * (call.head_dim + call.value_dim) * keys * call.q_len
    return call.batch * call.q_heads * (linear + window)


def _check(call: Call) -> None:
    check_offsets(call)
    check_per_token(call)
    d = call.params["feature_dim"]
    if d > call.head_dim:
        raise ValueError(f"based: feature_dim must be <= the head dim {call.head_dim} (the Taylor map reads the first "
                         f"feature_dim channels of q and k), got {d}")


register(Mechanism(
    name="based",
    family="linear",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (BASED, Arora et al. 2024)",
    summary="Linear attention with BASED's 2nd-order Taylor feature map (approximates exp(q·k/√d')) plus a small "
            "exact sliding-window softmax attention, summed",
    formula="o_i = Σ_j φ(q'_i)·φ(k'_j) v_j / (Σ_j φ(q'_i)·φ(k'_j) + 1e-12) "
            "+ Σ_{|i'-j|<w} softmax_j(scale q_i·k_j) v_j "
            "(causal: j <= i' in both; i' - w < j for the window), φ(x) = [1, x/d'^¼, vec(x⊗x)/(√2√d')] so "
            "φ(q)·φ(k) = 1 + s + s²/2, s = q·k/√d'; q' = q[..., :d'], k' = k[..., :d'], d' = feature_dim, "
            "w = window (0: no window part)",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    params=(Param("feature_dim", "int", 16, "d': the Taylor map reads the first d' channels of q and k (<= head dim); "
                  "1 + d' + d'^2 features", ge=1),
            Param("window", "int", 64, "sliding-window size w (keys incl. self, causal); 0 drops the window part",
                  ge=0),
            CHUNK_SIZE, OFFSETS),
    impls=forms(),
    check_params=_check,
    examples=({"feature_dim": 4, "window": 5, "chunk_size": 8},
              {"feature_dim": 2, "window": 1, "chunk_size": 5},
              {"feature_dim": 3, "window": 0, "chunk_size": 16}),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=state_size,
                          noncausal_recurrent=_noncausal_recurrent, fused=K.fused),
    flops=_flops,
    complexity={"time": "O(L C d'^2 + L d'^2 d_v + L (C + w) d)",
                "memory": "O(L d'^2 + L/C d'^2 d_v + L (C + w))",
                "state": "O(d'^2 d_v + w d)"},
    extras={"gradcheck_impls": ("chunked", "parallel")},
))

__all__ = ["EPS", "banded_window", "state_size", "taylor_features", "window_reference"]
