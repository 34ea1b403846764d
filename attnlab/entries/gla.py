"""``gla``: Gated Linear Attention (Yang et al. 2024), with ViG's bidirectional form for non-causal use.

Causal (GLA, eq. (2)-(3) of "Gated Linear Attention Transformers with Hardware-Efficient Training")::

    S_t = Diag(α_t) S_{t-1} + k_tᵀ v_t,      o_t = (scale · q_t) S_t
    o_i = Σ_{j<=i} Σ_f scale q_if k_jf exp(Σ_{p=j+1..i} g_pf) v_j         (g = log α <= 0)

with data-dependent per-channel forget gates ``α_t ∈ (0, 1]^{Dk}`` given in log space as the per-token
tensor ``log_gates`` ``g`` of shape ``(B|1, H|1, Lk, Dk|1)`` (last axis 1: one gate per head and token,
shared by every key channel). A catalogue entry has no learned projections, so the gates are an input;
:func:`gate_log` maps gate logits to GLA's log gates ``log σ(x) / τ`` (τ = 16, the paper's
normalizer). No feature map and no normalizer (GLA normalizes the output with a group norm outside
attention); ``scale`` multiplies the queries (default ``Dk^-1/2``, as flash-linear-attention).

Non-causal (ViG, Liao et al. 2024, "direction-wise gating"): a forward scan with the gates ``g`` and a
backward scan (the causal form on the reversed sequence) with their own gates ``log_gates_backward``
``b`` (default: ``g``, shared), averaged::

    o_i = ½ [ Σ_{j<=i} Σ_f scale q_if k_jf exp(Σ_{p=j+1..i} g_pf) v_j
            + Σ_{j>=i} Σ_f scale q_if k_jf exp(Σ_{p=i..j-1} b_pf) v_j ]

The diagonal ``j = i`` is counted once in each direction (weight 1 after the ½), as ViG's kernels do
(``bid_fused_recurrent_gla`` scans ``h <- α_t h + k_tᵀ v_t`` from both ends and the layer divides by 2);
the backward gate at position ``p`` decays what lies after ``p`` (ViG feeds its backward gates reversed to
the causal kernel). With ``g = b = 0`` this is ``½ (full + diagonal)`` linear attention, not plain
non-causal linear attention: ViG's definition, kept as is. Non-causal cross attention is not defined
(the two scans need the queries and keys on one sequence).

All three forms reuse :mod:`attnlab.linear`'s gated kernels (parallel: ``exp(G_i - G_j)`` with
``G = cumsum(g)``; chunked: intra-chunk ``(C, C, Dk)`` decays + the inter-chunk state; recurrent: the
scan above); the non-causal forms run the causal one forwards and on the flipped sequence. Gates
stay in log space and are exponentiated only as differences ``<= 0``; accumulation is float32 for
half inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import linear as K
from ..catalogue import Call, Mechanism, Param, register
from ..reference import compute_dtype
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, check_per_token, forms, within

#: GLA's gate-logit normalizer τ: α = σ(x)^(1/τ) (Yang et al. 2024, section 4.4; ViG uses the same).
GATE_NORMALIZER = 16.0


def gate_log(logits: torch.Tensor, normalizer: float = GATE_NORMALIZER) -> torch.Tensor:
    """GLA's log forget gates from gate logits: ``log α = log σ(logits) / normalizer`` (<= 0, finite)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"gate_log: logits must be a floating-point torch.Tensor, got {type(logits).__name__}")
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not normalizer > 0:
        raise ValueError(f"gate_log: normalizer must be a positive number, got {normalizer!r}")
    return torch.nn.functional.logsigmoid(logits) / normalizer


LOG_GATES = Param("log_gates", "tensor", None, "log forget gates g <= 0 (finite), per token: (B|1, H|1, Lk, Dk|1); "
                  "required (e.g. attnlab.entries.gla.gate_log(logits))", per_token=True)
LOG_GATES_BACKWARD = Param("log_gates_backward", "tensor", None, "non-causal only: the backward scan's log gates "
                           "(ViG's direction-wise gating), same shape rules; default: log_gates",
                           optional=True, per_token=True)
_GATES = ("log_gates", "log_gates_backward")


def _check(call: Call) -> None:
    check_offsets(call)
    check_per_token(call)
    name = call.mechanism.name
    if call.causal and call.params.get("log_gates_backward") is not None:
        raise ValueError(f"{name}: log_gates_backward is the backward scan of the non-causal (bidirectional) form; "
                         f"a causal call (causal=True) takes log_gates only")
    for n in _GATES:
        g = call.params.get(n)
        if g is None:
            continue
        if g.dim() != 4 or g.shape[-1] not in (1, call.head_dim):
            raise ValueError(f"{name}: {n} must have shape (B|1, H|1, Lk, Dk={call.head_dim} or 1), got "
                             f"{tuple(g.shape)}")
        if not within(g, high=0.0):
            raise ValueError(f"{name}: {n} must be finite and <= 0 (log of forget gates in (0, 1]); got values in "
                             f"[{float(g.min()):.3g}, {float(g.max()):.3g}]")


def _gates(call: Call, dt):
    """The forward and backward log gates in ``dt``, as given: (B|1, H|1, Lk, Dk|1) (the kernel broadcasts
    them; one gate per token stays one, its fast path)."""
    g, gb = (call.params.get(n) for n in ("log_gates", "log_gates_backward"))
    g, gb = (None if x is None else x.to(dt) for x in (g, gb))
    return g, (g if gb is None else gb)


def _prep(call: Call, q, k, v):
    """Queries scaled, everything in the accumulation dtype; gates expanded to (B, H, Lk, Dk) (views)."""
    dt = compute_dtype(q.dtype)
    return (q.to(dt) * call.scale, k.to(dt), v.to(dt), *(x.expand(k.shape) for x in _gates(call, dt)))


def _bidirectional(causal_form, fq, fk, v, g, gb):
    """ViG: ½ (forward scan with g + backward scan with gb), diagonal in both; see the module docstring."""
    fwd = causal_form(fq, fk, v, g)
    bwd = causal_form(fq.flip(2), fk.flip(2), v.flip(2), gb.flip(2)).flip(2)
    return 0.5 * (fwd + bwd)


def _parallel(call: Call, q, k, v):
    fq, fk, vv, g, gb = _prep(call, q, k, v)
    form = lambda a, b, c, gg: K.parallel(a, b, c, causal=True, log_gates=gg)  # noqa: E731
    out = form(fq, fk, vv, g) if call.causal else _bidirectional(form, fq, fk, vv, g, gb)
    return out.to(v.dtype)


def _init(call: Call, batch: int, heads: int, dtype, device) -> State:
    return State("gla", {"S": torch.zeros(batch, heads, call.head_dim, call.value_dim, dtype=compute_dtype(dtype),
                                          device=device)}, 0)


def _chunked(call: Call, q, k, v, state: Optional[State]):
    C = call.params["chunk_size"]
    if not call.causal:
        dt = compute_dtype(q.dtype)  # ViG's ½ (fwd + bwd) and the scale as the kernel's factor on the queries
        fast = K.bidirectional(q.to(dt), k.to(dt), v.to(dt), chunk=C, log_gates=_gates(call, dt),
                               q_scale=0.5 * call.scale)
        if fast is not None:
            return fast.to(v.dtype), None
        fq, fk, vv, g, gb = _prep(call, q, k, v)
        S0 = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)["S"]
        form = lambda a, b, c, gg: K.chunked(a, b, c, S0, chunk=C, log_gates=gg)[0]  # noqa: E731
        return _bidirectional(form, fq, fk, vv, g, gb).to(v.dtype), None
    state = _init(call, q.shape[0], q.shape[1], q.dtype, q.device) if state is None else state
    dt = compute_dtype(q.dtype)  # the chunked form scales the queries and broadcasts the gates itself
    out, S = K.chunked(q.to(dt), k.to(dt), v.to(dt), state["S"], chunk=C, log_gates=call.params["log_gates"].to(dt),
                       q_scale=call.scale)
    return out.to(v.dtype), state.replace(length=state.length + k.shape[2], S=S)


def _step(call: Call, state: State, q_t, k_t, v_t):
    fq, fk, vv, g, _ = _prep(call, q_t[:, :, None], k_t[:, :, None], v_t[:, :, None])
    o, S = K.step(fq[:, :, 0], fk[:, :, 0], vv[:, :, 0], state["S"], log_gates_t=g[:, :, 0])
    return o.to(v_t.dtype), state.replace(length=state.length + 1, S=S)


def _noncausal_recurrent(call: Call, q, k, v):
    fq, fk, vv, g, gb = _prep(call, q, k, v)
    S0 = _init(call, q.shape[0], q.shape[1], q.dtype, q.device)["S"]
    form = lambda a, b, c, gg: K.scan_recurrent(a, b, c, S0, log_gates=gg)[0]  # noqa: E731
    return _bidirectional(form, fq, fk, vv, g, gb).to(v.dtype)


def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """One (Dk x Dv) matrix per head: ``H · Dk · Dv`` floats."""
    return heads * head_dim * value_dim


def _flops(call: Call) -> float:
    """Chunked form, per chunk of C tokens: intra-chunk gated scores (3 flops per pair and channel:
    decay, two products) and their values (2 per pair and value channel), the state write (2 C Dk Dv) and
    read (2 C Dk Dv); causal counts C(C+1)/2 pairs; the non-causal form runs two scans."""
    Dk, Dv = call.head_dim, call.value_dim
    C = min(call.params["chunk_size"], call.kv_len)
    pairs = C * (C + 1) / 2
    per_chunk = pairs * (3 * Dk + 2 * Dv) + 4 * C * Dk * Dv
    scans = 1 if call.causal else 2
    return scans * call.batch * call.q_heads * per_chunk * max(call.q_len, call.kv_len) / C


def _example_gates(heads: bool = True, length: int = 37):
    """Conformance examples: GLA gates from standard-normal logits, one per head (or shared) and token,
    broadcast over key channels (the last example has per-channel gates)."""
    return lambda h: gate_log(torch.randn(1, h if heads else 1, length, 1, dtype=torch.float64))


register(Mechanism(
    name="gla",
    family="linear",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training (GLA, Yang et al. 2024); ViG: "
          "Linear-complexity Visual Sequence Learning with Gated Linear Attention (Liao et al. 2024)",
    summary="Linear attention with data-dependent per-channel forget gates (log space); ViG's bidirectional "
            "direction-wise form for non-causal use",
    formula="causal: S_t = Diag(exp g_t) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t, i.e. o_i = Σ_{j<=i} Σ_f scale "
            "q_if k_jf exp(Σ_{p=j+1..i} g_pf) v_j, g = log_gates <= 0. non-causal (ViG): o_i = ½[Σ_{j<=i} Σ_f "
            "scale q_if k_jf exp(Σ_{p=j+1..i} g_pf) v_j + Σ_{j>=i} Σ_f scale q_if k_jf exp(Σ_{p=i..j-1} b_pf) "
            "v_j], b = log_gates_backward (default g)",
    layout="sequence",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    params=(LOG_GATES, LOG_GATES_BACKWARD, CHUNK_SIZE, OFFSETS),
    impls=forms(),
    check_params=_check,
    examples=(
        {"log_gates": _example_gates(), "chunk_size": 8},
        {"log_gates": _example_gates(heads=False), "chunk_size": 5},
        {"log_gates": _example_gates()},
        {"log_gates": lambda heads, length, head_dim: gate_log(torch.randn(1, heads, length, head_dim,
                                                                           dtype=torch.float64)), "chunk_size": 6},
    ),
    reference_impl="parallel",
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=_step, init=_init, state_size=_state_size,
                          fused=K.fused,
                          noncausal_recurrent=_noncausal_recurrent),
    flops=_flops,
    complexity={"time": "O(L C d_k + L d_k d_v)", "memory": "O(L d + C^2 d_k)", "state": "O(d_k d_v)"},
    extras={"gradcheck_impls": ("chunked", "parallel"),
            # a token mixer computes its gates from the layer input (attnlab.models.TokenMixer)
            "from_input": {"log_gates": (gate_log, "head_dim")},
            # long-sequence tests and benchmarks: per-channel gates from Gaussian logits
            "random_params": lambda B, H, L, D, gen: {"log_gates": gate_log(torch.randn(B, H, L, D, generator=gen))}},
))

__all__ = ["GATE_NORMALIZER", "gate_log"]
