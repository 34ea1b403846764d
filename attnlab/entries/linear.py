"""Kernelized linear attention entries (MECHANISMS.md section 4): ``linear``, ``lightning``, ``retention``.

All three are :mod:`attnlab.linear` with a feature map, a decay and a normalizer; :func:`kernel_entry`
builds their parallel, chunked and recurrent forms from those three choices, so the entries differ
only in data. ``scale`` multiplies ``φ(q)`` in the unnormalized forms (the normalized form ignores it:
it would cancel); FAVOR+ uses it as the softmax temperature instead: ``φ(x · scale^½)`` on queries and keys.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import linear as K
from ..catalogue import Call, Mechanism, Param, register
from ..patterns.mods import alibi_slopes
from ..reference import compute_dtype
from ..recurrent import CHUNK_SIZE, OFFSETS, Recurrence, State, check_offsets, check_per_token, forms, within

FEATURE_MAPS = ("elu+1", "relu", "identity", "favor+", "cosformer")


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------
def favor_projection(features: int, dim: int, seed: int) -> torch.Tensor:
    """Performer's orthogonal random features (Choromanski et al. 2021): ``(features, dim)``.

    Blocks of ``dim`` orthonormal rows (QR of a Gaussian matrix), each row rescaled by the norm of
    an independent Gaussian vector so that rows are marginally ``N(0, I)``. Seeded, float64, CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(features / dim)):
        qmat, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        blocks.append(qmat.T)
    rows = torch.cat(blocks)[:features]
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return rows * norms


def feature_dim(call: Call) -> int:
    fmap = call.params.get("feature_map", "identity")
    if fmap == "favor+":
        return call.params["features"]
    return 2 * call.head_dim if fmap == "cosformer" else call.head_dim


def features(call: Call, x: torch.Tensor, pos: torch.Tensor, is_query: bool) -> torch.Tensor:
    """``φ(x)`` for positions ``pos`` (absolute, used by cosFormer's re-weighting only)."""
    fmap = call.params.get("feature_map", "identity")
    if fmap in K.ELEMENTWISE:  # identity, relu, elu+1 (Linear Transformer, Katharopoulos et al. 2020)
        return K.feature_map(fmap, x)
    if fmap == "favor+":  # φ(x) = exp(W x - |x|²/2) / sqrt(m), x scaled by scale^½ (softmax kernel)
        x = x * call.scale ** 0.5
        W = favor_projection(call.params["features"], x.shape[-1], call.params["feature_seed"]).to(x)
        return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
    # cosFormer (Qin et al. 2022): relu, re-weighted by cos(π/2 · (i - j) / M) = cos·cos + sin·sin
    angle = (math.pi / 2) * pos.to(x.dtype) / call.params["horizon"]
    r = torch.relu(x)
    return torch.cat([r * angle.cos()[:, None], r * angle.sin()[:, None]], dim=-1)


# --------------------------------------------------------------------------------------------
# The three forms from (feature map, decay, normalizer)
# --------------------------------------------------------------------------------------------
def kernel_entry(name: str, *, paper: str, summary: str, formula: str, params, patterns,
                 log_decay: Callable[[Call], Optional[torch.Tensor]], normalize: Callable[[Call], bool],
                 examples, check: Optional[Callable[[Call], None]] = None, complexity=None) -> Mechanism:
    """Register a kernelized linear-attention entry; see the module docstring."""

    def mapped(call, q, k, pos0: int):
        dt = compute_dtype(q.dtype)
        Lq, Lk = q.shape[2], k.shape[2]
        pk = torch.arange(Lk, device=k.device) + pos0
        fq = features(call, q.to(dt), pk[-1] - Lq + 1 + torch.arange(Lq, device=q.device), True)
        fk = features(call, k.to(dt), pk, False)
        if call.params.get("feature_map") != "favor+" and not normalize(call):
            fq = fq * call.scale
        return fq, fk

    def decay(call, dt):
        lam = log_decay(call)
        return None if lam is None else lam.to(dt)

    def out(call, raw, like):
        return K.finish(raw, normalize(call), call.params.get("eps", 0.0)).to(like.dtype)

    def parallel(call, q, k, v):
        fq, fk = mapped(call, q, k, 0)
        raw = K.parallel(fq, fk, K.with_ones(v.to(fq.dtype), normalize(call)), causal=call.causal,
                         log_decay=decay(call, fq.dtype))
        return out(call, raw, v)

    def chunked(call, q, k, v, state):
        pos0 = 0 if state is None else state.length
        fmap = call.params.get("feature_map", "identity")
        dt, q_scale = compute_dtype(q.dtype), (1.0 if normalize(call) else call.scale)
        if not call.causal and fmap in K.ELEMENTWISE and log_decay(call) is None:  # mapped on the kernel
            fast = K.noncausal_fused(q.to(dt), k.to(dt), v.to(dt), chunk=call.params["chunk_size"], feature=fmap,
                                     q_scale=q_scale,
                                     normalize_eps=call.params.get("eps", 0.0) if normalize(call) else None)
            if fast is not None:
                return fast.to(v.dtype), None
        if call.causal and fmap in K.ELEMENTWISE:  # the chunked form maps q and k itself, chunk by chunk
            fq, fk = q.to(dt), k.to(dt)
        else:
            fq, fk = mapped(call, q, k, pos0)
            fmap, q_scale = "identity", 1.0
        if not call.causal:
            raw = K.noncausal(fq, fk, K.with_ones(v.to(fq.dtype), normalize(call)), log_decay=decay(call, fq.dtype),
                              chunk=call.params["chunk_size"])
            return out(call, raw, v), None
        S = init(call, q.shape[0], q.shape[1], q.dtype, q.device) if state is None else state
        o, S_new = K.chunked_normalized(fq, fk, v.to(fq.dtype), S["S"], chunk=call.params["chunk_size"],
                                        log_decay=decay(call, fq.dtype), normalize=normalize(call),
                                        eps=call.params.get("eps", 0.0), feature=fmap, q_scale=q_scale)
        return o.to(v.dtype), S.replace(length=S.length + k.shape[2], S=S_new)

    def step(call, state, q_t, k_t, v_t):
        fq, fk = mapped(call, q_t[:, :, None], k_t[:, :, None], state.length)
        vv = K.with_ones(v_t.to(fq.dtype), normalize(call))
        o, S = K.step(fq[:, :, 0], fk[:, :, 0], vv, state["S"], log_decay=decay(call, fq.dtype))
        return out(call, o, v_t), state.replace(length=state.length + 1, S=S)

    def noncausal_recurrent(call, q, k, v):
        fq, fk = mapped(call, q, k, 0)
        raw = K.noncausal(fq, fk, K.with_ones(v.to(fq.dtype), normalize(call)), log_decay=decay(call, fq.dtype),
                          recurrent=True)
        return out(call, raw, v)

    def init(call, batch, heads, dtype, device):
        S = torch.zeros(batch, heads, feature_dim(call), call.value_dim + normalize(call), dtype=compute_dtype(dtype),
                        device=device)
        return State(name, {"S": S}, 0)

    def state_size(heads, head_dim, value_dim, **p):
        fmap = p.get("feature_map", "identity")
        F = p.get("features", 64) if fmap == "favor+" else (2 * head_dim if fmap == "cosformer" else head_dim)
        return heads * F * (value_dim + int(p.get("normalize", False)))

    def flops(call: Call) -> float:
        """GEMM work of the chunked form. Causal: per chunk of C tokens QKᵀ and (QKᵀ)V over the
        C(C+1)/2 visible pairs, KᵀV and Q·S (2 C F Dv each). Non-causal without decay: the two
        GEMMs KᵀV (2 Lk F Dv) and Q·S (2 Lq F Dv); with a decay: two causal scans."""
        F, Dv, C = feature_dim(call), call.value_dim + normalize(call), min(call.params["chunk_size"], call.kv_len)
        BH = call.batch * call.q_heads
        if not call.causal and log_decay(call) is None:
            return BH * 2.0 * F * Dv * (call.q_len + call.kv_len)
        per_chunk = 2 * (C * (C + 1) / 2) * (F + Dv) + 4 * C * F * Dv
        return (1 if call.causal else 2) * BH * per_chunk * max(call.q_len, call.kv_len) / C

    def checks(call: Call):
        check_offsets(call)
        check_per_token(call)
        if call.params.get("feature_map") == "cosformer" and call.params.get("horizon") is None:
            raise ValueError(f"{name}: feature_map='cosformer' needs horizon (cosFormer's M, at least the longest "
                             f"query-key distance), got None")
        if check:
            check(call)

    rec = Recurrence(parallel=parallel, chunked=chunked, step=step, init=init, state_size=state_size,
                     noncausal_recurrent=noncausal_recurrent, fused=K.fused)
    return register(Mechanism(
        name=name, family="linear", paper=paper, summary=summary, formula=formula, layout="sequence",
        patterns=patterns, params=tuple(params) + (CHUNK_SIZE, OFFSETS), impls=forms(), check_params=checks,
        examples=examples, reference_impl="parallel", recurrence=rec, flops=flops,
        complexity=complexity or {"time": "O(L C d + L d^2)", "memory": "O(L d + L/C d^2)", "state": "O(d^2)"},
        extras={"gradcheck_impls": ("chunked", "parallel")},
    ))


# --------------------------------------------------------------------------------------------
# Decays
# --------------------------------------------------------------------------------------------
DECAY = Param("decay", "choice", "none", "per-head decay: none; 'alibi' λ_h = -2^(-8(h+1)/H) (Lightning Attention 2 "
              "/ TransNormerLLM slopes); 'retnet' γ_h = 1 - 2^(-5-h) (RetNet)", choices=("none", "alibi", "retnet"))
LOG_DECAY = Param("log_decay", "tensor", None, "explicit per-head log decay λ_h <= 0, shape (Hq,); overrides "
                  "`decay`", optional=True)


def head_log_decay(call: Call) -> Optional[torch.Tensor]:
    """λ_h (<= 0) per query head from ``log_decay`` or the ``decay`` schedule; None for no decay."""
    given = call.params.get("log_decay")
    if given is not None:
        return given
    kind, H = call.params.get("decay", "none"), call.q_heads
    if kind == "alibi":
        return -alibi_slopes(H).to(torch.float64)
    if kind == "retnet":
        return torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))))
    return None


def _check_log_decay(call: Call):
    lam = call.params.get("log_decay")
    if lam is None:
        return
    name = call.mechanism.name
    if lam.shape != (call.q_heads,) or not lam.is_floating_point():
        raise ValueError(f"{name}: log_decay must be a float tensor of shape (Hq,) = ({call.q_heads},), got "
                         f"{tuple(lam.shape)} {lam.dtype}")
    if not within(lam, high=0.0):
        raise ValueError(f"{name}: log_decay must be finite and <= 0 (a decay in (0, 1]), got {lam.tolist()}")


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------
kernel_entry(
    "linear",
    paper="Transformers are RNNs: Linear Transformer (Katharopoulos et al. 2020); Performer FAVOR+ (Choromanski et "
          "al. 2021); cosFormer (Qin et al. 2022); CAB baselines",
    summary="Kernelized attention φ(q)·φ(k) with feature maps elu+1, relu, FAVOR+ random features or cosFormer's "
            "cos re-weighting; with or without the normalizer",
    formula="o_i = Σ_j φ(q_i)·φ(k_j) v_j / (Σ_j φ(q_i)·φ(k_j) + eps) over visible j (normalize=True; else the "
            "numerator times scale). elu+1: φ(x)=elu(x)+1; relu; favor+: φ(x)=exp(Wx' - |x'|²/2)/√m, x'=x·scale^½, "
            "W orthogonal random features; cosformer: φ(x_p)=[relu(x)cos(πp/2M), relu(x)sin(πp/2M)], M=horizon",
    params=(
        Param("feature_map", "choice", "elu+1", "feature map φ", choices=FEATURE_MAPS),
        Param("normalize", "bool", True, "divide by the kernel's row sum (Linear Transformer); False: plain "
              "φ(q) S, scaled by `scale`"),
        Param("eps", "float", 1e-6, "added to the normalizer's denominator", ge=0.0),
        Param("features", "int", 64, "random features m (favor+)", ge=1),
        Param("feature_seed", "int", 0, "seed of the random projection (favor+)", ge=0),
        Param("horizon", "int", None, "cosFormer's M: re-weighting cos(π/2 (i - j)/M); needs M >= the longest "
              "distance (cosformer)", ge=1, optional=True),
    ),
    patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
    log_decay=lambda call: None, normalize=lambda call: call.params["normalize"],
    examples=({}, {"feature_map": "relu", "chunk_size": 8}, {"feature_map": "favor+", "features": 16,
                                                            "chunk_size": 16},
              {"feature_map": "cosformer", "horizon": 64, "chunk_size": 5},
              {"feature_map": "identity", "normalize": False, "chunk_size": 7}),
)

kernel_entry(
    "lightning",
    paper="Lightning Attention-2 (Qin et al. 2024); TransNormerLLM (Qin et al. 2023)",
    summary="Linear attention computed per block: conventional (masked, decayed) attention inside a block, the "
            "kernel trick across blocks; optional per-head decay",
    formula="o_i = Σ_{j<=i} λ^(i-j) (q_i·k_j) v_j · scale, computed per chunk of C tokens: intra = [(Q Kᵀ) ⊙ M] V with "
            "M_ts = λ^(t-s) (s <= t), inter = (Q ⊙ λ^(t+1)) S, S <- λ^C S + (K ⊙ λ^(C-1-s))ᵀ V",
    params=(Param("feature_map", "choice", "identity", "feature map φ applied to q and k", choices=FEATURE_MAPS[:3]),
            Param("decay", "choice", "alibi", DECAY.doc, choices=DECAY.choices), LOG_DECAY),
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    log_decay=head_log_decay, normalize=lambda call: False, check=_check_log_decay,
    examples=({}, {"decay": "none", "chunk_size": 8}, {"chunk_size": 5, "feature_map": "elu+1"},
              {"log_decay": lambda h: -torch.rand(h, dtype=torch.float64), "chunk_size": 16}),
)

kernel_entry(
    "retention",
    paper="Retentive Network (RetNet, Sun et al. 2023); Lightning decay",
    summary="Linear attention with a fixed per-head exponential decay γ_h (RetNet's retention, without its "
            "group norm and gate)",
    formula="o_i = scale · Σ_j γ_h^(i-j) (q_i·k_j) v_j over j <= i (causal; non-causal: γ_h^|i-j|), "
            "γ_h = 1 - 2^(-5-h); recurrent S_t = γ S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t",
    params=(Param("decay", "choice", "retnet", DECAY.doc, choices=DECAY.choices), LOG_DECAY),
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    log_decay=head_log_decay, normalize=lambda call: False, check=_check_log_decay,
    examples=({}, {"chunk_size": 6}, {"decay": "alibi", "chunk_size": 11}),
)
