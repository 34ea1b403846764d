"""``inline``: InLine attention (Han et al. 2024, "Bridging the Divide: Reconsidering Softmax and Linear
Attention", NeurIPS 2024): injective linear attention plus a local term.

**Injective linear attention.** With a feature map φ and ``N`` keys, every query's weights are centred
linear scores plus a uniform ``1/N``, so they sum to 1 by subtraction instead of division::

    w_ij = scale/N · [φ(q_i)·φ(k_j) - (1/N) Σ_s φ(q_i)·φ(k_s)] + 1/N,        o_i = Σ_j w_ij v_j + local_i

The paper's eq. (5) writes ``φ(q_i)ᵀφ(k_j) - (1/N) Σ_s φ(q_i)ᵀφ(k_s) + 1/N``; the official code scales
``φ(Q)`` by ``scale/N`` (``head_dim^-½ / N``, "omitted in eq. 5 for simplicity"), kept here. Unlike the
division-normalized linear attention, where ``φ(q)`` and ``c·φ(q)`` give one distribution, the map from
a query to its weights is injective (for the identity map it is affine in ``q`` through the matrix
``K - 1 k̄ᵀ``, injective when that has full column rank, e.g. more than ``d`` generic keys). In linear
time, as the code computes it::

    o_i = scale/N · φ(q_i) (Σ_j φ(k_j)ᵀ v_j - z ūᵀ) + ū,     z = Σ_j φ(k_j),  ū = (1/N) Σ_j v_j

Feature maps (the code's ``kernel_func``): ``identity`` (the default there and here), ``relu``,
``leakyrelu`` (slope 0.01), ``exp`` (``exp(0.2 x)``).

**Local term** (the paper's local residual, the official code's ``residual`` branch): a depthwise
convolution over V, ``local_i = Σ_t W[t, c] v_{i' - p + t, c}`` per channel ``c``, with the kernel
``local_weights`` ``(B|1, H|1, w, Dv|1)`` (``H`` = query or key/value heads; size-1 axes broadcast). The
paper predicts a 3 x 3 kernel per sample and channel from the mean token with a small MLP (a layer
parameter, so here an input); on a sequence the window is ``w = local_weights.shape[2]`` taps. Non-causal: centred
(``w`` odd, ``p = (w - 1)/2``, the code's zero-padded convolution); causal: the last ``w`` positions
(``p = w - 1``). ``i' = i + L_k - L_q`` (bottom-right, as the causal mask), zero outside ``0..L_k-1`` and
at document boundaries (``offsets``). ``local_weights=None``: no local term.

**Causal form** (not in the paper, which is non-causal; defined here): the same on the visible prefix,
``N_i = i' + 1`` keys, so every row's weights still sum to 1::

    o_i = scale/N_i · φ(q_i)(S_i - z_i ū_iᵀ) + ū_i,    S_i = Σ_{j<=i'} φ(k_j)ᵀ v_j,  z_i = Σ_{j<=i'} φ(k_j),
    ū_i = (1/N_i) Σ_{j<=i'} v_j

Rows with no visible key (``L_q > L_k``) are zero. The recurrent state is ``[S | z]``, ``Σ v``, the
count ``N`` (the state's length) and, with a local term, the last ``w - 1`` values:
``d(d_v + 1) + d_v + (w - 1) d_v`` floats per head. The chunked and recurrent forms run
:mod:`attnlab.linear` with the extra ones column (``[num | φ(q)·z]``); the parallel form builds
``w_ij``. Accumulation is float32 for half inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import linear as K
from ..catalogue import Call, Mechanism, Param, register
from ..reference import compute_dtype
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, forms

FEATURE_MAPS = ("identity", "relu", "leakyrelu", "exp")

FEATURE_MAP = Param("feature_map", "choice", "identity", "feature map φ on queries and keys (the official code's "
                    "kernel_func): identity, relu, leakyrelu (slope 0.01), exp (exp(0.2 x))", choices=FEATURE_MAPS)
LOCAL_WEIGHTS = Param("local_weights", "tensor", None, "depthwise convolution kernel of the local term over V, shape "
                      "(B|1, H|1, w, Dv|1) with w taps (odd for non-causal: centred; causal: the last w positions); "
                      "None: no local term", optional=True)


def features(call: Call, x: torch.Tensor) -> torch.Tensor:
    fmap = call.params["feature_map"]
    if fmap == "relu":
        return torch.relu(x)
    if fmap == "leakyrelu":
        return F.leaky_relu(x, 0.01)
    if fmap == "exp":
        return torch.exp(0.2 * x)
    return x


def _weights(call: Call, dt) -> Optional[torch.Tensor]:
    """``local_weights`` in ``dt`` with the query heads (key/value heads repeated), or None."""
    W = call.params.get("local_weights")
    if W is None:
        return None
    if W.shape[1] not in (1, call.q_heads):
        W = W.repeat_interleave(call.q_heads // W.shape[1], dim=1)
    return W.to(dt)


def local_term(W: torch.Tensor, v: torch.Tensor, centres: torch.Tensor, causal: bool) -> torch.Tensor:
    """``Σ_t W[:, :, t] v[centre - p + t]`` per centre, zero outside ``v``: (B, H, len(centres), Dv)."""
    w, L = W.shape[2], v.shape[2]
    p = w - 1 if causal else (w - 1) // 2
    padded = F.pad(v, (0, 0, w, w))  # w zeros on each side of the sequence axis
    out = 0
    for t in range(w):
        idx = (centres - p + t + w).clamp(0, L + 2 * w - 1)  # anything beyond the padding reads a zero
        out = out + W[:, :, t, None] * padded[:, :, idx]
    return out


def _mapped(call: Call, q, k):
    dt = compute_dtype(q.dtype)
    return features(call, q.to(dt)), features(call, k.to(dt))


def _finish(call: Call, raw, vmean, count):
    """``scale/N · (num - den ū) + ū`` from the raw ``[num | den]`` accumulator."""
    return K.finish_centred(raw, vmean, count, call.scale)


# --------------------------------------------------------------------------------------------
# Parallel form: the weights w_ij
# --------------------------------------------------------------------------------------------
def _parallel(call: Call, q, k, v):
    fq, fk = _mapped(call, q, k)
    vv = v.to(fq.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    visible = K.weights(Lq, Lk, call.causal, None, q.device, fq.dtype)  # (Lq, Lk) of 0/1
    N = visible.sum(-1, keepdim=True).clamp(min=1)  # rows without keys get weight 0 below
    scores = fq @ fk.transpose(-1, -2)
    centred = scores - (scores * visible).sum(-1, keepdim=True) / N
    w = (call.scale / N * centred + 1 / N) * visible
    out = w @ vv
    W = _weights(call, fq.dtype)
    if W is not None:
        out = out + local_term(W, vv, torch.arange(Lq, device=q.device) + (Lk - Lq), call.causal)
    return out.to(v.dtype)


# --------------------------------------------------------------------------------------------
# Chunked and recurrent forms
# --------------------------------------------------------------------------------------------
def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    dt, D, Dv = compute_dtype(dtype), call.head_dim, call.value_dim
    tensors = {"S": torch.zeros(batch, heads, D, Dv + 1, dtype=dt, device=device),
               "vsum": torch.zeros(batch, heads, Dv, dtype=dt, device=device)}
    W = call.params.get("local_weights")
    if W is not None:
        tensors["tail"] = torch.zeros(batch, heads, W.shape[2] - 1, Dv, dtype=dt, device=device)
    return State("inline", tensors, 0)


def _check_tail(call: Call, state: State):
    W = call.params.get("local_weights")
    want = None if W is None else W.shape[2] - 1
    have = state["tail"].shape[2] if "tail" in state.tensors else None
    if want != have:
        built = "no local term" if have is None else f"a window of {have + 1}"
        given = "none" if want is None else f"a window of {want + 1}"
        raise ValueError(f"inline: the state was built for {built}, local_weights gives {given}; keep local_weights "
                         f"the same across segments")


def _chunked(call: Call, q, k, v, state):
    fq, fk = _mapped(call, q, k)
    vv = v.to(fq.dtype)
    W = _weights(call, fq.dtype)
    L = k.shape[2]
    if not call.causal:  # the finish folded into the state: scale/N (φq S - (φq z) ū) + ū = φq S' + ū
        out = K.noncausal_fused(fq, fk, vv, chunk=call.params["chunk_size"], q_scale=call.scale / max(L, 1),
                                centred=True)  # on the C++ kernel, forward and backward
        if out is None:
            ubar = vv.mean(2, keepdim=True)
            centred = (call.scale / L) * (fk.transpose(-1, -2) @ vv - fk.sum(2)[..., None] * ubar)
            out = fq @ centred + ubar
        if W is not None:
            out = out + local_term(W, vv, torch.arange(q.shape[2], device=q.device) + (L - q.shape[2]), False)
        return out.to(v.dtype), None
    state = state or _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    _check_tail(call, state)
    out, S, vsum = K.chunked_centred(fq, fk, vv, state["S"], state["vsum"], state.length,
                                     chunk=call.params["chunk_size"], scale=call.scale)
    new = {"S": S, "vsum": vsum}
    if W is not None:
        ext = torch.cat([state["tail"], vv], dim=2)  # the last w - 1 values before this segment, then it
        tail = ext.shape[2] - L
        out = out + local_term(W, ext, torch.arange(L, device=q.device) + tail, True)
        new["tail"] = ext[:, :, ext.shape[2] - tail:]
    return out.to(v.dtype), state.replace(length=state.length + L, **new)


def _step(call: Call, state: State, q_t, k_t, v_t):
    _check_tail(call, state)
    fq, fk = _mapped(call, q_t, k_t)
    vt = v_t.to(fq.dtype)
    raw, S = K.step(fq, fk, K.with_ones(vt, True), state["S"])
    count = state.length + 1
    vsum = state["vsum"] + vt
    out = _finish(call, raw, vsum / count, count)
    new = {"S": S, "vsum": vsum}
    W = _weights(call, fq.dtype)
    if W is not None:
        window = torch.cat([state["tail"], vt[:, :, None]], dim=2)  # (B, H, w, Dv)
        out = out + local_term(W, window, torch.tensor([W.shape[2] - 1], device=q_t.device), True)[:, :, 0]
        new["tail"] = window[:, :, 1:]
    return out.to(v_t.dtype), state.replace(length=count, **new)


def _noncausal_recurrent(call: Call, q, k, v):
    """Every key absorbed into ``[S | z]`` and ``Σ v`` one at a time, then read out per query."""
    fq, fk = _mapped(call, q, k)
    vv = v.to(fq.dtype)
    L = k.shape[2]
    vsum = torch.zeros_like(vv[:, :, 0])
    for t in range(L):
        vsum = vsum + vv[:, :, t]
    out = _finish(call, K.noncausal(fq, fk, K.with_ones(vv, True), recurrent=True), vsum[:, :, None] / L, L)
    W = _weights(call, fq.dtype)
    if W is not None:
        out = out + local_term(W, vv, torch.arange(q.shape[2], device=q.device) + (L - q.shape[2]), False)
    return out.to(v.dtype)


# --------------------------------------------------------------------------------------------
# Catalogue data
# --------------------------------------------------------------------------------------------
def _window(params) -> int:
    W = params.get("local_weights")
    return W.shape[2] if isinstance(W, torch.Tensor) else 1


def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """``[S | z]`` (d (d_v + 1)), ``Σ v`` (d_v) and the last w - 1 values per head."""
    return heads * (head_dim * (value_dim + 1) + value_dim + (_window(params) - 1) * value_dim)


def _flops(call: Call) -> float:
    """Causal: chunked linear attention with the ones column (QKᵀ and (QKᵀ)V over each chunk's C(C+1)/2
    pairs, KᵀV and Q·S). Non-causal: the keys' state 2 Lk D (Dv + 1) and the centred state's read-out
    2 Lq D Dv. Plus the centring (2 Dv per query) and the local term (2 w Dv per query)."""
    D, Dv, C = call.head_dim, call.value_dim + 1, min(call.params["chunk_size"], call.kv_len)
    if call.causal:
        linear = (2 * C * (C + 1) / 2 * (D + Dv) + 4 * C * D * Dv) * max(call.q_len, call.kv_len) / C
    else:
        linear = 2 * D * Dv * call.kv_len + 2 * D * call.value_dim * call.q_len
    has_local = call.params.get("local_weights") is not None
    local = 2 * _window(call.params) * call.value_dim * call.q_len * has_local
    return call.batch * call.q_heads * (linear + 2 * call.value_dim * call.q_len + local)


def _check(call: Call) -> None:
    check_offsets(call)
    W = call.params.get("local_weights")
    if W is None:
        return
    ok = (W.is_floating_point() and W.dim() == 4 and W.shape[0] in (1, call.batch)
          and W.shape[1] in (1, call.q_heads, call.kv_heads) and W.shape[2] >= 1 and W.shape[3] in (1, call.value_dim))
    if not ok:
        raise ValueError(f"inline: parameter 'local_weights' must be a float tensor of shape (B or 1, Hq or Hkv or 1, "
                         f"w >= 1, Dv={call.value_dim} or 1) with B={call.batch}, Hq={call.q_heads}, "
                         f"Hkv={call.kv_heads}; got {tuple(W.shape)} {W.dtype}")
    if W.device != call.device:
        raise ValueError(f"inline: parameter 'local_weights' is on {W.device}, the inputs on {call.device}")
    if not call.causal and W.shape[2] % 2 == 0:
        raise ValueError(f"inline: non-causal local_weights need an odd window (a centred kernel), got "
                         f"w = local_weights.shape[2] = {W.shape[2]}")


def _example_weights(w: int, heads: bool = True):
    """Local kernels for the conformance examples. The suite runs every example at two value dims (6, and 3
    for gradcheck), so the examples use the ``Dv = 1`` form (one kernel per head, shared by its channels);
    per-channel kernels are checked in tests/linear/test_inline.py."""
    return lambda h: torch.randn(1, h if heads else 1, w, 1, dtype=torch.float64) / w


def _random_params(B, H, L, D, gen):
    """Inputs for the long-sequence checks (tests/test_recurrent.py): a 3-tap local kernel per channel."""
    return {"local_weights": (torch.randn(1, H, 3, D, generator=gen) / 3).to(torch.bfloat16)}


register(Mechanism(
    name="inline",
    family="linear",
    paper="Bridging the Divide: Reconsidering Softmax and Linear Attention (InLine attention, Han et al. 2024)",
    summary="Injective linear attention: centred linear scores plus 1/N (weights sum to one by subtraction), plus a "
            "local depthwise-convolution term over V",
    formula="o_i = Σ_j w_ij v_j + Σ_t W_t v_{i'-p+t}, w_ij = scale/N [φ(q_i)·φ(k_j) - (1/N) Σ_s φ(q_i)·φ(k_s)] + 1/N "
            "over the N visible keys (causal: N = i'+1); φ = feature_map; W = local_weights (w taps; p = (w-1)/2 "
            "non-causal, w-1 causal)",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    params=(FEATURE_MAP, LOCAL_WEIGHTS, CHUNK_SIZE, OFFSETS),
    impls=forms(),
    check_params=_check,
    examples=({},
              {"feature_map": "relu", "local_weights": _example_weights(3), "chunk_size": 8},
              {"feature_map": "exp", "local_weights": _example_weights(5, heads=False), "chunk_size": 5},
              {"feature_map": "leakyrelu", "chunk_size": 16}),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          noncausal_recurrent=_noncausal_recurrent, fused=K.fused),
    flops=_flops,
    complexity={"time": "O(L C d + L d d_v + L w d_v)", "memory": "O(L d + L/C d d_v)", "state": "O(d d_v + w d_v)"},
    extras={"gradcheck_impls": ("chunked", "parallel"), "random_params": _random_params},
))

__all__ = ["FEATURE_MAPS", "features", "local_term"]
