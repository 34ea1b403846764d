"""``titans``: Titans' neural long-term memory as a token mixer, and its memory-as-context composition.

Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2024/2025, arXiv 2501.00663). The
keys and values of a call are written into an MLP memory by test-time gradient descent with momentum
and forgetting, and each query reads the memory; the exact definition (sections 3.1-3.2, with 3.2's
chunk-wise gradients) and its three computations are in :mod:`attnlab.memory`::

    S_t = η_t S_{t-1} - θ_t ∇ℓ(W_{t'}; k_t, v_t)     ℓ(W; k, v) = ||M_W(k) - v||²
    W_t = (1 - α_t) W_{t-1} + S_t                     o_t = M_{W_t}(q_t)

with ``W_{t'}`` the weights before the chunk of ``chunk_size`` tokens that contains ``t``.

Conventions chosen here (the paper leaves them to the architecture):

- ``chunk_size`` is the paper's mini-batch size ``b``: it is part of the model (it decides which
  weights a gradient is taken at), unlike the chunk size of the kernelized entries. ``chunk_size=1``
  is the purely online memory. Default 16 (TTT's mini-batch size, whose parallelization Titans
  follows).
- ``η, θ, α`` are data dependent in the paper (projections of the token, a layer's business): here
  scalars ``eta``, ``theta``, ``alpha`` by default, or per-token tensors ``eta_t``, ``theta_t``,
  ``alpha_t`` of shape ``(B|1, H|1, Lk)`` that override them; ``θ >= 0``, ``η, α ∈ [0, 1]``.
- queries and keys are ℓ2-normalized (``qk_norm=True``; section 4.4: "we normalize queries and keys
  using ℓ2-norm"), ``x / max(||x||, 1e-6)``; values are used as given.
- the MLP has no biases; ``depth`` layers, hidden width ``hidden`` (default ``4 · D``), activation
  ``silu``/``gelu``/``tanh`` between layers.
- initial weights: ``init_weights``, a tensor ``(P,)`` or ``(Hq, P)`` with all layers flattened
  row-major and concatenated (``P = Σ in·out``, the learned initial memory of the paper; gradients
  flow into it), else a seeded draw ``N(0, 1/in)`` per layer from ``init_seed``, the same for every
  batch element and head (:func:`attnlab.memory.seeded_init`).
- defaults ``θ = 0.01, η = 0.9, α = 0.01``: with the summed squared loss, momentum, and a chunk's
  gradients all taken at one point, larger steps diverge on random data (θ = 0.02 with η = 0.9
  already overflows on random unit keys, D = 16, b = 16 or 64); the defaults stay finite over 65,536
  random bfloat16 tokens (tests/test_recurrent.py).
- ``scale`` is accepted like every entry's and not used: a memory read has no softmax temperature.
- only causal patterns: the memory is a recurrence over the keys in order (a test-time training
  run); a non-causal read (every query against the memory after all keys) is a different model that
  the paper does not define, so it is not offered.

State (per batch element and query head): the current weights ``W1..Wd``, their momentum ``S1..Sd``
and, for ``chunk_size > 1``, the chunk-start weights ``G1..Gd`` the chunk's gradients are taken at:
``(2 or 3) · P`` floats per head.

:func:`memory_as_context` is Titans' MAC variant built on this memory and ``sliding_window``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import memory as mem
from .. import native as _native
from ..catalogue import Call, Mechanism, Param, mechanism, register
from ..reference import compute_dtype
from ..recurrent import OFFSETS, Recurrence, State, check_offsets, check_per_token, forms, within

NAME = "titans"
RATES = (("theta", "theta_t"), ("eta", "eta_t"), ("alpha", "alpha_t"))


# --------------------------------------------------------------------------------------------
# Call helpers
# --------------------------------------------------------------------------------------------
def dims(call: Call):
    p = call.params
    hidden = p["hidden"] if p["hidden"] is not None else 4 * call.head_dim
    return mem.layer_dims(call.head_dim, call.value_dim, p["depth"], hidden)


def _rates(call: Call, dt, start: int, stop: int):
    """θ, η, α for key positions ``start:stop`` of the call: (B|1, H|1, n) each."""
    out = []
    for scalar, tensor in RATES:
        x = call.params.get(tensor)
        if x is None:
            out.append(torch.full((1, 1, stop - start), call.params[scalar], dtype=dt, device=call.device))
        else:
            out.append(x[:, :, start:stop].to(dt))
    return out


def _prep(call: Call, q, k, v):
    dt = compute_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if call.params["qk_norm"]:
        q, k = mem.normalize(q), mem.normalize(k)
    return q, k, v


def _depth(state: State) -> int:
    return sum(1 for n in state.tensors if n.startswith("W"))


def _named(prefix: str, ws):
    return {f"{prefix}{i + 1}": w for i, w in enumerate(ws)}


def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    dt = compute_dtype(dtype)
    given = call.params.get("init_weights")
    if given is not None:  # (P,) or (Hq, P)
        layers = mem.unflatten(given.to(dt), dims(call))
    else:
        layers = [w.to(dtype=dt, device=device) for w in mem.seeded_init(dims(call), call.params["init_seed"])]
    W = [w.expand(batch, heads, *w.shape[-2:]) for w in layers]
    tensors = {**_named("W", W), **_named("S", [torch.zeros_like(w) for w in W])}
    if call.params["chunk_size"] > 1:
        tensors.update(_named("G", W))
    return State(NAME, tensors, 0)


def _unpack(state: State, call: Optional[Call] = None):
    """(W, S, G) layer lists; with ``call``, the state must match its memory (layers, chunk_size)."""
    d = _depth(state)
    if call is not None:
        want = [tuple(x) for x in dims(call)]
        got = [tuple(state[f"W{i + 1}"].shape[-2:]) for i in range(d)]
        if got != want or ("G1" in state.tensors) != (call.params["chunk_size"] > 1):
            raise ValueError(f"{NAME}: the state holds a memory with layers {got} and "
                             f"{'a' if 'G1' in state.tensors else 'no'} chunk-start copy; this call's memory has "
                             f"layers {want} and chunk_size={call.params['chunk_size']} (continue a state with the "
                             f"parameters that made it)")
    W = [state[f"W{i + 1}"] for i in range(d)]
    S = [state[f"S{i + 1}"] for i in range(d)]
    G = [state[f"G{i + 1}"] for i in range(d)] if "G1" in state.tensors else W
    return W, S, G


def _pack(state: State, length: int, W, S, G) -> State:
    tensors = {**_named("W", W), **_named("S", S)}
    if "G1" in state.tensors:
        tensors.update(_named("G", G))
    return State(NAME, tensors, length)


# --------------------------------------------------------------------------------------------
# The three forms
# --------------------------------------------------------------------------------------------
def _parallel(call: Call, q, k, v):
    """The reference: chunk after chunk, every token's weights materialized (memory.chunk_explicit)."""
    B, H, Lq, _ = q.shape
    Lk, act = k.shape[2], call.params["activation"]
    q, k, v = _prep(call, q, k, v)
    dt = q.dtype
    # bottom-right: query i reads the memory after key i + Lk - Lq; place the queries at those keys
    if Lq <= Lk:
        q_at = torch.cat([q.new_zeros(B, H, Lk - Lq, q.shape[-1]), q], dim=2)
    else:
        q_at = q[:, :, Lq - Lk:]
    W, S, _ = _unpack(_init(call, B, H, dt, q.device))
    outs = []
    for s, e, co in _runs(call, dt, 0, Lk):  # every run starts a chunk: gradients at its first weights W
        read = e > Lk - Lq  # the run holds a query position
        o, W, S = mem.chunk_explicit(W, S, W, q_at[:, :, s:e], k[:, :, s:e], v[:, :, s:e], co, act, read=read)
        if read:
            outs.append(o)
    first = Lk - sum(o.shape[2] for o in outs)  # key position of the first row read
    out = torch.cat(outs, dim=2)
    if Lq <= Lk:
        return out[:, :, Lk - Lq - first:].to(call.dtype)
    return torch.cat([out.new_zeros(B, H, Lq - Lk, out.shape[-1]), out], dim=2).to(call.dtype)  # early rows: no key


def _pieces(b: int, pos0: int, L: int):
    """Key positions ``0..L-1`` (absolute ``pos0 + i``) cut at the boundaries of chunks of ``b``: ``(start, stop)``."""
    cuts = [0] + [i for i in range(1, L) if (pos0 + i) % b == 0] + [L]
    return list(zip(cuts[:-1], cuts[1:]))


def _runs(call: Call, dt, pos0: int, L: int):
    """Key positions ``0..L-1`` (absolute ``pos0 + i``) split at chunk boundaries: ``(start, stop, coefficients)``
    for each run; the full chunks' coefficients are computed for all of them at once."""
    b = call.params["chunk_size"]
    pieces = _pieces(b, pos0, L)
    full = [(s, e) for s, e in pieces if e - s == b]
    if full:  # contiguous: one (…, n_chunks, b) batch of rates
        a0, n_full = full[0][0], len(full)
        co_full = mem.coefficients(*(r.unflatten(2, (n_full, b)) for r in _rates(call, dt, a0, a0 + n_full * b)))
    for s, e in pieces:
        yield s, e, (co_full.select(2, (s - a0) // b) if e - s == b else mem.coefficients(*_rates(call, dt, s, e)))


def _chunked(call: Call, q, k, v, state: Optional[State]):
    """Causal aligned segment from ``state``: the partial chunk up to the next boundary, the full chunks,
    the remainder, each through memory.chunk (gradients at G, which becomes W at every boundary); on the
    C++ kernel where it serves (:func:`_native_chunked`)."""
    B, H, L, _ = q.shape
    state = _init(call, B, H, q.dtype, q.device) if state is None else state
    q, k, v = _prep(call, q, k, v)
    b, act, pos0 = call.params["chunk_size"], call.params["activation"], state.length
    W, S, G = _unpack(state, call)
    rates = [call.params.get(t) for _, t in RATES]
    if _native.serves(q, k, v, *W, *S, *G, *rates, backward=not _native.recording(*rates)):
        out, W, S, G = _native_chunked(call, q, k, v, W, S, G, pos0)
        return out.to(call.dtype), _pack(state, pos0 + L, W, S, G)
    outs = []
    for s, e, co in _runs(call, q.dtype, pos0, L):
        o, W, S = mem.chunk(W, S, G if b > 1 else W, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], co, act)
        if b > 1 and (pos0 + e) % b == 0:
            G = W
        outs.append(o)
    return torch.cat(outs, dim=2).to(call.dtype), _pack(state, pos0 + L, W, S, G)


def _fused(call: Call) -> bool:
    """True when :func:`_chunked` runs on the C++ kernel for this call (it then takes the call whole): forward
    and backward, but for rates that need gradients (the kernel takes them as constants)."""
    grad = any(isinstance(call.params.get(t), torch.Tensor) and call.params[t].requires_grad for _, t in RATES)
    return _native.unsupported(call.device, compute_dtype(call.dtype), grad) is None


def _run_coefficients(call: Call, dt, pos0: int, L: int) -> mem.Coefficients:
    """The coefficients of every run of the segment for the kernel, ``(Bc, Hc, R, C[, C])``: the rates of
    each run padded at its end to ``C`` with ``θ = 0, η = 1, α = 0`` (which change no product of the
    run's own rows); with constant rates one set (R = 1) serves every run (a shorter run's are the
    leading rows and columns)."""
    b = call.params["chunk_size"]
    if all(call.params.get(t) is None for _, t in RATES):
        return mem.coefficients(*(r[:, :, None] for r in _rates(call, dt, 0, b)))
    index = torch.tensor([list(range(s, e)) + [-1] * (b - (e - s)) for s, e in _pieces(b, pos0, L)],
                         device=call.device)
    pads = (0.0, 1.0, 0.0)
    rates = [torch.where(index >= 0, r[:, :, index.clamp(min=0)], pad) for r, pad in zip(_rates(call, dt, 0, L), pads)]
    return mem.coefficients(*rates)


def _native_chunked(call: Call, q, k, v, W, S, G, pos0: int):
    """:func:`_chunked` on the C++ kernel (:func:`attnlab.native.memory_chunks`): returns ``(out, W, S, G)``."""
    B, H, L, _ = q.shape
    b = call.params["chunk_size"]
    full = lambda x: x.expand(B, H, *x.shape[-2:])  # noqa: E731
    ws = [torch.stack([full(w), full(s)], 2) for w, s in zip(W, S)]
    g = [full(x) for x in G] if b > 1 else []
    co = _run_coefficients(call, q.dtype, pos0, L)
    out, ws, g = _native.memory_chunks(q, k, v, ws, g, co, b, pos0, call.params["activation"])
    W, S = [x[:, :, 0] for x in ws], [x[:, :, 1] for x in ws]
    return out, W, S, (W if (pos0 + L) % b == 0 else g)


def _step(call: Call, state: State, q_t, k_t, v_t):
    q, k, v = _prep(call, q_t, k_t, v_t)
    b = call.params["chunk_size"]
    W, S, G = _unpack(state, call)
    theta, eta, alpha = (r[:, :, 0] for r in _rates(call, q.dtype, 0, 1))
    o, W, S = mem.step(W, S, G if b > 1 else W, q, k, v, theta, eta, alpha, call.params["activation"])
    if b > 1 and (state.length + 1) % b == 0:
        G = W
    return o.to(call.dtype), _pack(state, state.length + 1, W, S, G)


def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """``H · P · (3 if chunk_size > 1 else 2)``: weights, momentum (and chunk-start weights)."""
    depth, hidden = params.get("depth", 2), params.get("hidden") or 4 * head_dim
    P = mem.param_count(mem.layer_dims(head_dim, value_dim, depth, hidden))
    return heads * P * (3 if params.get("chunk_size", 16) > 1 else 2)


def _flops(call: Call) -> float:
    """Chunked form, per token and layer ``(in, out)``: key forward 2·in·out, error back-propagation
    2·in·out (not the first layer), retrieval from W and S 4·in·out, the attention-like part
    2·C·(in + out), the chunk-end update of W and S 4·in·out (amortized); C = chunk_size."""
    C = min(call.params["chunk_size"], call.kv_len)
    per_token = sum((12 if i else 10) * a * b + 2 * C * (a + b) for i, (a, b) in enumerate(dims(call)))
    return call.batch * call.q_heads * max(call.q_len, call.kv_len) * per_token


def _check(call: Call) -> None:
    check_offsets(call)
    check_per_token(call)
    name, p = call.mechanism.name, call.params
    for scalar, tensor in RATES:
        x = p.get(tensor)
        if x is None:
            continue
        if x.dim() != 3:
            raise ValueError(f"{name}: {tensor} must have shape (B|1, H|1, Lk={call.kv_len}) (one {scalar} per "
                             f"token), got {tuple(x.shape)}")
        hi = math.inf if scalar == "theta" else 1.0
        if not within(x, 0.0, hi):
            valid = ">= 0" if hi == math.inf else "in [0, 1]"
            raise ValueError(f"{name}: {tensor} must be finite and {valid}, got values in [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}]")
    w = p.get("init_weights")
    if w is not None:
        P = mem.param_count(dims(call))
        if not w.is_floating_point() or w.dim() not in (1, 2) or w.shape[-1] != P or \
                (w.dim() == 2 and w.shape[0] != call.q_heads):
            raise ValueError(f"{name}: init_weights must be a float tensor of shape (P,) or (Hq, P) with Hq = "
                             f"{call.q_heads} and P = {P} (layers {list(dims(call))} flattened), got "
                             f"{tuple(w.shape)} {w.dtype}")
        if w.device != call.device:
            raise ValueError(f"{name}: init_weights is on {w.device}, the inputs on {call.device}")


def _rate_tensor(low: float, high: float, length: int = 37):
    """Conformance examples: one rate per head and token, uniform in [low, high] (the suite's L = 37)."""
    return lambda h: low + (high - low) * torch.rand(1, h, length, dtype=torch.float64)


PARAMS = (
    Param("depth", "int", 2, "layers of the memory MLP (1: a linear memory, the delta rule's matrix)", ge=1),
    Param("hidden", "int", None, "hidden width of the memory MLP (default 4 · head dim; unused for depth 1)",
          ge=1, optional=True),
    Param("activation", "choice", "silu", "activation between the memory's layers", choices=mem.ACTIVATIONS),
    Param("theta", "float", 0.01, "θ: learning rate of the test-time gradient step (momentary surprise)", ge=0.0),
    Param("eta", "float", 0.9, "η: momentum decay of the surprise S (0: no momentum)", ge=0.0, le=1.0),
    Param("alpha", "float", 0.01, "α: forgetting, W <- (1 - α) W + S (0: no forgetting)", ge=0.0, le=1.0),
    Param("theta_t", "tensor", None, "per-token θ, shape (B|1, H|1, Lk), >= 0; overrides theta", optional=True,
          per_token=True),
    Param("eta_t", "tensor", None, "per-token η, shape (B|1, H|1, Lk), in [0, 1]; overrides eta", optional=True,
          per_token=True),
    Param("alpha_t", "tensor", None, "per-token α, shape (B|1, H|1, Lk), in [0, 1]; overrides alpha",
          optional=True, per_token=True),
    Param("qk_norm", "bool", True, "ℓ2-normalize queries and keys (Titans section 4.4)"),
    Param("init_weights", "tensor", None, "initial memory weights (P,) or (Hq, P), layers flattened row-major and "
          "concatenated; default: seeded N(0, 1/in) draw", optional=True),
    Param("init_seed", "int", 0, "seed of the default initial weights", ge=0),
    Param("chunk_size", "int", 16, "the paper's mini-batch size b: a chunk's gradients are all taken at the "
          "weights before the chunk (part of the model; 1 = online gradient descent)", ge=1),
    OFFSETS,
)

register(Mechanism(
    name=NAME,
    family="linear",
    paper="Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2024/2025)",
    summary="Neural long-term memory: an MLP written at test time by gradient descent on ||M(k) - v||² with "
            "momentum (surprise) and forgetting, read by the queries; chunk-wise (mini-batch) gradients",
    formula="u_t = ∇_W ||M_{W_t'}(k_t) - v_t||² (W_t' = weights before t's chunk of chunk_size tokens); "
            "S_t = η_t S_{t-1} - θ_t u_t; W_t = (1 - α_t) W_{t-1} + S_t; o_t = M_{W_t}(q_t); M = bias-free MLP "
            "of `depth` layers; q, k ℓ2-normalized (qk_norm)",
    layout="sequence",
    patterns=("causal_self", "causal_cross"),
    params=PARAMS,
    impls=forms({"chunked": "chunked form: per chunk, gradients at the chunk-start weights and the momentum/"
                            "forgetting recurrences as (C x C) products; retrieval as masked matmuls (no per-token "
                            "weights); on CPU a C++ kernel per (batch, head), weights in cache, with a backward "
                            "kernel (rates that need gradients take the PyTorch path)",
                 "parallel": "the reference: chunk after chunk with every token's weights materialized"}),
    check_params=_check,
    examples=(
        {},
        {"depth": 1, "chunk_size": 5, "theta": 0.3, "eta": 0.5, "alpha": 0.1},
        {"depth": 3, "hidden": 5, "activation": "gelu", "chunk_size": 7, "qk_norm": False,
         "theta_t": _rate_tensor(0.0, 0.02), "eta_t": _rate_tensor(0.0, 1.0), "alpha_t": _rate_tensor(0.0, 0.3)},
        {"chunk_size": 1, "activation": "tanh", "hidden": 6, "theta_t": _rate_tensor(0.0, 0.3), "eta": 0.0,
         "alpha": 0.0},
    ),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          fused=_fused),
    flops=_flops,
    complexity={"time": "O(L (P + C (d + h)))", "memory": "O(L (d + h) + (L / C) P) with autograd, O(L d + P) "
                "without", "state": "O(P), P = weights of the memory MLP"},
    extras={"gradcheck_impls": ("chunked", "parallel")},
))


# --------------------------------------------------------------------------------------------
# Memory as a context (MAC)
# --------------------------------------------------------------------------------------------
_PER_TOKEN = tuple(t for _, t in RATES)


def _read(call: Call, state: Optional[State], q: torch.Tensor) -> torch.Tensor:
    """``M_W(q)`` with the weights of ``state`` (None: the initial memory), without a write."""
    if state is None:
        state = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)
    x = q.to(compute_dtype(q.dtype))
    if call.params["qk_norm"]:
        x = mem.normalize(x)
    return mem.apply(_unpack(state)[0], x, call.params["activation"]).to(q.dtype)


def memory_as_context(q, k, v, *, segment: int, window: int, persistent_k=None, persistent_v=None,
                      retrieved: bool = True, scale: Optional[float] = None, **memory) -> torch.Tensor:
    """Titans' memory-as-a-context layer (section 4.1), on given q, k, v (causal self attention).

    The sequence is cut into segments of ``segment`` tokens. For segment ``s`` with queries ``Q_s``:

    1. retrieve ``h_j = M_{s-1}(q_j)`` for its queries from the memory that has absorbed every earlier
       segment (the memory before the segment; the initial memory for the first);
    2. attend, one softmax over the union of three key sets: the ``N_p`` persistent
       tokens ``[p_1 … p_Np]`` (``persistent_k`` / ``persistent_v``, every query sees all of them),
       the retrieved tokens (``h_j`` as key and value, query ``i`` sees ``h_j`` for ``j <= i``), and the
       segment's own keys through ``sliding_window`` (causal, the last ``window`` keys of the segment);
    3. write the segment's ``(k, v)`` into the memory (``titans`` chunked form, continuing its state).

    Choices where the paper is a full model and this is a token mixer without projections: the
    retrieved tokens are keys and values as they are (so ``Dv`` must equal ``D``); the paper prepends
    all of a segment's ``h`` to every query, which lets token ``i`` see ``h_j = M(q_j)`` of later queries
    ``j > i``: here query ``i`` sees ``h_j`` for ``j <= i`` only, so the layer stays causal; the paper
    writes the projections of the attention output into the memory and gates the output with a
    read of it - a model's layer does that around this function; here the segment's
    keys and values are written and the attention output is returned. ``retrieved=False`` leaves the
    memory out (persistent tokens + sliding window only). ``memory``: the ``titans`` parameters
    (per-token rates cover the whole sequence); ``scale``: the attention's softmax scale.
    Returns ``(B, Hq, L, Dv)``.
    """
    from ..tiled import merge

    m = mechanism(NAME)
    call = m.prepare(q, k, v, causal=True, **memory)  # validates q, k, v and the memory parameters
    B, Hq, L, D = q.shape
    if call.params["offsets"] is not None:
        raise ValueError("memory_as_context: offsets (packed documents) are not supported; call it per document")
    for arg, x in (("segment", segment), ("window", window)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"memory_as_context: {arg} must be an int >= 1, got {x!r}")
    if not isinstance(retrieved, bool):
        raise TypeError(f"memory_as_context: retrieved must be True or False, got {retrieved!r}")
    if k.shape[2] != L:
        raise ValueError(f"memory_as_context: q and k must have the same length (self attention over one sequence), "
                         f"got {L} and {k.shape[2]}")
    if retrieved and v.shape[-1] != D:
        raise ValueError(f"memory_as_context: the retrieved tokens serve as keys and values, so the value dim must "
                         f"equal the head dim {D}, got value dim {v.shape[-1]} (or pass retrieved=False)")
    if (persistent_k is None) != (persistent_v is None):
        raise ValueError("memory_as_context: give both persistent_k and persistent_v, or neither")
    if persistent_k is not None:
        Hkv = k.shape[1]
        ok = (isinstance(persistent_k, torch.Tensor) and isinstance(persistent_v, torch.Tensor)
              and persistent_k.dim() == 3 and persistent_k.shape[0] == Hkv and persistent_k.shape[2] == D
              and persistent_v.shape == persistent_k.shape[:2] + (v.shape[-1],)
              and persistent_k.dtype == persistent_v.dtype == q.dtype)
        if not ok:
            got = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                   for x in (persistent_k, persistent_v)]
            raise ValueError(f"memory_as_context: persistent_k and persistent_v must be {q.dtype} tensors of shape "
                             f"(Hkv={Hkv}, Np, D={D}) and (Hkv, Np, Dv={v.shape[-1]}), got {got[0]} and {got[1]}")
    swa, dense = mechanism("sliding_window"), mechanism("dense")
    state, outs = None, []
    for s in range(0, L, segment):
        e = min(s + segment, L)
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        parts = [swa(qs, ks, vs, causal=True, window=window, scale=scale, return_lse=True)]
        if persistent_k is not None:
            pk, pv = (x.expand(B, *x.shape) for x in (persistent_k, persistent_v))
            parts.append(dense(qs, pk, pv, causal=False, scale=scale, return_lse=True))
        if retrieved:
            h = _read(call, state, qs)
            parts.append(dense(qs, h, h, causal=True, scale=scale, return_lse=True))
            seg = {n: (x[:, :, s:e] if n in _PER_TOKEN and x is not None else x) for n, x in memory.items()}
            _, state = m.scan(qs, ks, vs, state, **seg)
        outs.append(merge(parts)[0])
    return torch.cat(outs, dim=2)


__all__ = ["memory_as_context"]
