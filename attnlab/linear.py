"""Kernelized linear attention with an optional decay: the shared mathematics of the linear family.

With feature-mapped queries and keys ``φq, φk`` (``(B, H, L, F)``), values ``V`` and a decay,
every form computes, for query ``i`` at key position ``i' = i + Lk - Lq`` (bottom-right),

    num_i = Σ_j  w(i', j) (φq_i · φk_j) v_j          den_i = Σ_j  w(i', j) (φq_i · φk_j)
    o_i   = num_i / (den_i + eps)   (normalize=True)  or  o_i = num_i   (normalize=False)

with ``w(i', j)`` by decay kind:

- none:      1 where visible (causal: ``j <= i'``; non-causal: every key);
- ``log_decay`` λ_h <= 0, one per head (RetNet, TransNormerLLM / Lightning): ``exp(λ_h (i' - j))`` for
  ``j <= i'``; non-causal ``exp(λ_h |i' - j|)`` (bidirectional, self attention only);
- ``log_gates`` g (``(B, H, Lk, F)``, <= 0, data dependent per channel, GLA): the weight moves
  inside the dot product, ``Σ_f φq_if φk_jf exp(G_i'f - G_jf)`` with ``G = cumsum(g)`` (causal).

The recurrent state is ``S_t = decay_t ⊙ S_{t-1} + φk_tᵀ [v_t, 1]`` (the appended 1 carries the
normalizer), read as ``o_t = φq_t S_t``. The chunked form (Lightning Attention 2's split) computes
the intra-chunk part as masked (decayed) attention and the inter-chunk part through the state.
Every function here takes and returns the raw ``[num, den]`` accumulator (``value_dim + 1`` columns
when normalizing); :func:`finish` divides. Accumulation is in float32 for half inputs; decays stay
in log space and are only exponentiated as differences ``<= 0``, so nothing overflows.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import native as _native
from .reference import causal_mask, compute_dtype
from .recurrent import SPAN  # tokens computed at once (whole chunks); the state carries across spans
#: Largest exponent a product may be split at into exp(+x) exp(-y) factors (both stay far inside the
#: accumulation dtype: ~1e26 in float32): the one-GEMM gated path takes chunks whose total log gate
#: is below it (stronger decay takes the (C, C, F) path), as the C++ kernel does.
EXP_RANGE = {torch.float32: 60.0, torch.float64: 600.0}
#: Gated intra-chunk work is (C, C, F) per chunk; chunks are processed in groups of about this many floats.
_GATED_GROUP_FLOATS = 1 << 22


#: Feature maps the chunked form can apply itself, chunk by chunk (:func:`chunked`'s ``feature``;
#: the C++ kernel then reads q and k as they are, with no mapped copies in memory): the
#: elementwise ones, and BASED's Taylor map.
FEATURES = _native.LINEAR_FEATURES
ELEMENTWISE = FEATURES[:3]


def feature_map(name: str, x: torch.Tensor, feature_dim: int = 0) -> torch.Tensor:
    """``φ(x)`` for the maps of :data:`FEATURES`: identity, elu+1 (Linear Transformer), relu, and
    ``taylor``: BASED's 2nd-order Taylor map of the first ``feature_dim`` channels ``x'``,
    ``φ(x) = [1, x'/d'^¼, vec(x' ⊗ x')/(√2 √d')]`` (``1 + d' + d'²`` features), so that
    ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q'·k'/√d'``. elu+1 and Taylor in one vectorized pass on the
    C++ kernels where they serve (``torch``'s elu is several passes and slow on CPU)."""
    if name in ("elu+1", "taylor") and _native.serves(x):
        return _native.map_features(x, name, feature_dim)
    if name == "elu+1":
        return torch.nn.functional.elu(x).add_(1)  # in place on elu's fresh output (its backward reads x)
    if name == "relu":
        return torch.relu(x)
    if name == "identity":
        return x
    if name == "taylor":
        x = x[..., :feature_dim]
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
        return torch.cat([x.new_ones(x.shape[:-1] + (1,)), x * feature_dim ** -0.25,
                          outer / (math.sqrt(2) * math.sqrt(feature_dim))], dim=-1)
    raise ValueError(f"feature: one of {FEATURES}, got {name!r}")


def with_ones(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``[v, 1]``: the normalizer rides along as one more value column."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1) if normalize else v


def finish(raw: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """``num / (den + eps)`` when normalizing (``den`` is the last column), else ``raw``."""
    if not normalize:
        return raw
    return raw[..., :-1] / (raw[..., -1:] + eps)


# --------------------------------------------------------------------------------------------
# Parallel (quadratic) form: the readable definition
# --------------------------------------------------------------------------------------------
def weights(Lq: int, Lk: int, causal: bool, log_decay: Optional[torch.Tensor], device, dtype) -> torch.Tensor:
    """``w(i', j)`` for no decay or a per-head decay: ``(Lq, Lk)`` or ``(H, Lq, Lk)``."""
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    dist = (i - j).to(dtype)
    visible = causal_mask(Lq, Lk, device) if causal else torch.ones_like(dist, dtype=torch.bool)
    if log_decay is None:
        return visible.to(dtype)
    lam = log_decay.to(dtype)[:, None, None]
    expo = lam * (dist if causal else dist.abs())
    return torch.where(visible, expo, torch.full_like(expo, float("-inf"))).exp()


def parallel(fq, fk, v, *, causal: bool, log_decay=None, log_gates=None) -> torch.Tensor:
    """The quadratic form of the module docstring; returns the raw accumulator."""
    Lq, Lk = fq.shape[2], fk.shape[2]
    if log_gates is None:
        w = weights(Lq, Lk, causal, log_decay, fq.device, fq.dtype)
        return ((fq @ fk.transpose(-1, -2)) * w) @ v
    if not causal:
        raise ValueError("per-channel gates define the causal form only")
    G = log_gates.to(fq.dtype).expand(fk.shape[0], fk.shape[1], Lk, -1).cumsum(2)
    i = torch.arange(Lq, device=fq.device) + (Lk - Lq)
    Gq = G[:, :, i.clamp(min=0)]  # rows with i' < 0 see no key (masked below)
    visible = causal_mask(Lq, Lk, fq.device)
    expo = Gq[:, :, :, None, :] - G[:, :, None, :, :]  # (B, H, Lq, Lk, F), <= 0 where visible
    expo = torch.where(visible[:, :, None], expo, torch.full_like(expo, float("-inf")))
    scores = torch.einsum("bhif,bhjf,bhijf->bhij", fq, fk, expo.exp())
    return scores @ v


# --------------------------------------------------------------------------------------------
# Recurrent form: one token
# --------------------------------------------------------------------------------------------
def step(fq_t, fk_t, v_t, S, *, log_decay=None, log_gates_t=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``S <- decay ⊙ S + φk_tᵀ v_t``; ``o_t = φq_t S``. Shapes ``(B, H, F)``, ``(B, H, F, Dv')``."""
    if log_decay is not None:
        S = S * log_decay.to(S.dtype).exp()[:, None, None]
    if log_gates_t is not None:
        S = S * log_gates_t.to(S.dtype).exp()[..., None]
    S = S + fk_t[..., :, None] * v_t[..., None, :]
    return (fq_t[..., None, :] @ S)[..., 0, :], S


def scan_recurrent(fq, fk, v, S, *, log_decay=None, log_gates=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The causal recurrent form over a whole segment (a loop of :func:`step`)."""
    outs = []
    for t in range(fq.shape[2]):
        g = None if log_gates is None else log_gates[:, :, t]
        o, S = step(fq[:, :, t], fk[:, :, t], v[:, :, t], S, log_decay=log_decay, log_gates_t=g)
        outs.append(o)
    return torch.stack(outs, dim=2), S


# --------------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------------
def chunked(fq, fk, v, S, *, chunk: int, log_decay=None, log_gates=None, feature: str = "identity",
            q_scale: float = 1.0, feature_dim: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal, aligned (``Lq == Lk``); returns (raw, S). ``fq, fk`` are the features, or with a
    ``feature`` map (:func:`feature_map`) the queries and keys it maps, the queries then multiplied
    by ``q_scale``.

    Spans of about :data:`SPAN` tokens (whole chunks) are computed one after another, each with all
    its chunks at once and the state carried between spans, so the working set stays in cache and
    does not grow with L (throughput at 32K tokens equals throughput at 1K). A remainder shorter
    than a chunk is one last chunk. On CPU, in float32/float64, the fused C++ kernel
    (:func:`attnlab.native.linear_chunks`) computes the same thing; while autograd records, with the
    feature map applied in PyTorch and :class:`Chunks`' backward kernel.
    """
    B, H, L, F = fq.shape
    if _recorded((fq, fk, v, S), (log_decay, log_gates)):  # forward and backward on the C++ kernels
        return _through_kernels(fq, fk, v, S, log_decay, log_gates, Form(chunk, feature, feature_dim, q_scale))[:2]
    S_kernel = _kernel_state(S, fq, fk, v, log_decay, log_gates)
    if S_kernel is not None:
        return _native.linear_chunks(fq, fk, v, S_kernel, log_decay, chunk, log_gates, feature=feature, q_scale=q_scale,
                                     feature_dim=feature_dim), S_kernel
    fq, fk = _mapped(fq, fk, feature, q_scale, feature_dim)
    per = chunk * max(1, SPAN // chunk)
    consts = {}
    outs = []
    a = 0
    while a < L:
        C = min(chunk, L - a)
        b = a + min(per, (L - a) // C * C)
        if log_decay is not None and C not in consts:
            consts[C] = _decay_consts(log_decay.to(fq.dtype), C)

        def blocks(x):  # (B, H, m·C, .) -> contiguous (B, H, m, C, .)
            return x[:, :, a:b].reshape(B, H, (b - a) // C, C, x.shape[-1])

        if log_gates is None:
            o, S = _span(blocks(fq), blocks(fk), blocks(v), S, consts.get(C))
        else:
            o, S = _gated_chunks(blocks(fq), blocks(fk), blocks(v), S,
                                 blocks(log_gates.to(fq.dtype).expand(B, H, L, F)))
        outs.append(o.reshape(B, H, b - a, -1))
        a = b
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0], S


def chunked_normalized(fq, fk, v, S, *, chunk: int, log_decay=None, normalize: bool, eps: float,
                       feature: str = "identity", q_scale: float = 1.0, feature_dim: int = 0):
    """:func:`chunked` then :func:`finish`: the output ``num / (den + eps)`` (or ``num``), and the state
    (``value_dim + 1`` columns when normalizing). The C++ kernel, where it serves, divides inside each
    chunk instead of appending a column of ones to ``v``."""
    if normalize and _recorded((fq, fk, v, S), (log_decay,)):  # forward and backward on the C++ kernels
        return _through_kernels(fq, fk, v, S, log_decay, None, Form(chunk, feature, feature_dim, q_scale, eps))[:2]
    S_kernel = _kernel_state(S, fq, fk, v, log_decay) if normalize else None
    if S_kernel is not None:
        return _native.linear_chunks(fq, fk, v, S_kernel, log_decay, chunk, normalize_eps=eps, feature=feature,
                                     q_scale=q_scale, feature_dim=feature_dim), S_kernel
    raw, S = chunked(fq, fk, with_ones(v, normalize), S, chunk=chunk, log_decay=log_decay, feature=feature,
                     q_scale=q_scale, feature_dim=feature_dim)
    return finish(raw, normalize, eps), S


def chunked_centred(fq, fk, v, S, value_sum, count: int, *, chunk: int, scale: float):
    """InLine's causal centred form (:mod:`attnlab.entries.inline`): with ``[num | den]`` of
    :func:`chunked` over ``[v, 1]`` and ``N_i = count + i + 1`` tokens seen,
    ``o_i = scale/N_i (num_i - den_i ū_i) + ū_i``, ``ū_i`` = (``value_sum`` + the values up to ``i``) / ``N_i``.
    Returns ``(o, S, value_sum after the segment)``; the C++ kernel, where it serves, finishes each
    chunk as it goes."""
    if _recorded((fq, fk, v, S, value_sum)):  # forward and backward on the C++ kernels
        return _through_kernels(fq, fk, v, S, None, None, Form(chunk, centre_scale=scale, count=count), value_sum)
    S_kernel = _kernel_state(S, fq, fk, v, value_sum)
    if S_kernel is not None:
        vsum = value_sum.clone(memory_format=torch.contiguous_format)  # updated in place too
        return _native.linear_chunks(fq, fk, v, S_kernel, None, chunk, centre=(vsum, scale, count)), S_kernel, vsum
    raw, S = chunked(fq, fk, with_ones(v, True), S, chunk=chunk)
    N = count + torch.arange(1, v.shape[2] + 1, device=v.device, dtype=v.dtype)[:, None]
    vsum = value_sum[:, :, None] + v.cumsum(2)
    return finish_centred(raw, vsum / N, N, scale), S, vsum[:, :, -1]


def finish_centred(raw: torch.Tensor, ubar, count, scale: float) -> torch.Tensor:
    """InLine's output from the raw ``[num | den]``: ``scale/count (num - den ū) + ū``."""
    return scale / count * (raw[..., :-1] - raw[..., -1:] * ubar) + ubar


class Form(NamedTuple):
    """:class:`Chunks`' settings: as :func:`attnlab.native.linear_chunks` takes them (``eps``: normalize;
    ``centre_scale`` and ``count``: InLine's centred finish, with the value sum an input of its own;
    ``reverse`` and ``strict``: the anti-causal half of a bidirectional form)."""
    chunk: int
    feature: str = "identity"
    feature_dim: int = 0
    q_scale: float = 1.0
    eps: Optional[float] = None
    centre_scale: float = 0.0
    count: int = 0
    reverse: bool = False
    strict: bool = False


class Chunks(torch.autograd.Function):
    """:func:`chunked`, :func:`chunked_normalized` or :func:`chunked_centred` on the C++ kernels,
    forward and backward (:func:`attnlab.native.linear_chunks_backward` gives dq, dk, dv, the initial
    state's and the value sum's gradients, through the feature map and the finish).
    ``apply(q, k, v, S0, value_sum0, log_decay, log_gates, form) -> (out, S, value_sum)`` (``value_sum0``
    None unless centred; ``form`` a :class:`Form`); the gates ``(B, H, L, F|1)``; a feature map other
    than the identity only where the decay needs no gradient (:func:`_through_kernels` maps the
    features in PyTorch otherwise).

    The gates' gradient: with ``G_t`` the cumulative log gate (``Σ_{i<=t} g_i``, in reading order),
    every term of the output and of the final state ``S_L`` holds ``G_t`` as ``φq_t e^{G_t}`` or
    ``φk_t e^{-G_t}`` (and ``S_L`` as ``e^{G_L}`` on its rows), so ``∂/∂G_t = φq_t ⊙ dφq_t - φk_t ⊙ dφk_t``
    (plus ``Σ_d S_L ⊙ dS_L`` at ``t = L``), and ``dg_i = Σ_{t>=i} ∂/∂G_t``: the backward kernel sums it
    as it walks back (one gate per token sums the channels). A per-head decay ``λ`` (``G_t = λ t``)
    gives ``dλ = Σ_t t ∂/∂G_t``, here from dq and dk: with the identity map and a factor on the
    queries, ``φq ⊙ dφq = q ⊙ dq``."""

    @staticmethod
    def forward(ctx, q, k, v, S0, vsum0, log_decay, log_gates, form: Form):
        S = S0.clone(memory_format=torch.contiguous_format)
        vsum = None if vsum0 is None else vsum0.clone(memory_format=torch.contiguous_format)  # updated in place
        centre = None if vsum is None else (vsum, form.centre_scale, form.count)
        out = _native.linear_chunks(q, k, v, S, log_decay, form.chunk, log_gates, normalize_eps=form.eps,
                                    feature=form.feature, q_scale=form.q_scale, centre=centre,
                                    feature_dim=form.feature_dim, reverse=form.reverse, strict=form.strict)
        ctx.save_for_backward(q, k, v, S0, vsum0, log_decay, log_gates, S, out if form.eps is not None else None)
        ctx.form = form
        return out, S, vsum

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dS, dvsum):
        q, k, v, S0, vsum0, lam, g, S, out = ctx.saved_tensors
        f = ctx.form
        dout = torch.zeros_like(v) if dout is None else dout
        centre = None if vsum0 is None else (vsum0, f.centre_scale, f.count)
        gates_grad = ctx.needs_input_grad[6]
        dq, dk, dv, dS0, *more = _native.linear_chunks_backward(
            q, k, v, S0, lam, g, dout, dS, f.chunk, out, f.eps, f.feature, f.q_scale, f.feature_dim, centre,
            f.reverse, f.strict, S, gates_grad)
        dvsum0 = more.pop(0) if centre is not None else None
        dg = more.pop(0) if gates_grad else None  # summed inside the kernel as it walks backwards
        if dvsum is not None:  # the final sum is the first plus every value
            dv = dv + dvsum[:, :, None]
            dvsum0 = dvsum0 + dvsum
        dlam = None
        if ctx.needs_input_grad[5]:  # dλ = Σ_t t ∂/∂G_t, in reading order
            dG = (q * dq - k * dk).sum(-1)
            dG = dG.flip(2) if f.reverse else dG  # read backwards: G runs from the end, S_L sits at position 0
            if dS is not None:
                dG[:, :, -1] += (S * dS).sum((-1, -2))
            t = torch.arange(1, dG.shape[2] + 1, dtype=dG.dtype, device=dG.device)
            dlam = (dG * t).sum((0, 2))
        return dq, dk, dv, dS0, dvsum0, dlam, dg, None


def _through_kernels(q, k, v, S, log_decay, log_gates, form: Form, vsum0=None):
    """:class:`Chunks` for a call autograd records: the feature map in PyTorch first where the decay's
    gradient needs the features, the gates broadcast, the decay in the compute dtype."""
    if form.feature != "identity" and log_decay is not None and log_decay.requires_grad:
        q, k = _mapped(q, k, form.feature, form.q_scale, form.feature_dim)
        form = form._replace(feature="identity", q_scale=1.0, feature_dim=0)
    if log_gates is not None:
        B, H, L, F = q.shape[:3] + (S.shape[2],)
        log_gates = log_gates.to(q.dtype).expand(B, H, L, 1 if log_gates.shape[-1] == 1 else F)
    log_decay = None if log_decay is None else log_decay.to(q.dtype)
    return Chunks.apply(q, k, v, S, vsum0, log_decay, log_gates, form)


def _recorded(tensors, params=()) -> bool:
    """True when autograd records this call and the C++ kernels, forward and backward, serve it (CPU,
    float32/float64, ``tensors`` in one dtype; ``params``, decays and gates, are converted to it)."""
    return (_native.recording(*tensors, *params) and all(t.dtype == tensors[0].dtype for t in tensors)
            and _native.serves(*tensors, backward=True))


def _kernel_state(S: torch.Tensor, fq, *tensors) -> Optional[torch.Tensor]:
    """A contiguous copy of the state for the C++ kernel to update in place, or None when the kernel
    does not serve this call (:func:`attnlab.native.serves` on the inputs, the state in their dtype)."""
    if S.dtype != fq.dtype or not _native.serves(fq, S, *tensors):
        return None
    return S.clone(memory_format=torch.contiguous_format)


def _mapped(q, k, feature: str, q_scale: float, feature_dim: int):
    """``(φ(q) · q_scale, φ(k))``, no copy for the identity and a unit scale."""
    fq = feature_map(feature, q, feature_dim)
    return (fq if q_scale == 1.0 else fq * q_scale), feature_map(feature, k, feature_dim)


def fused(call, backward: bool = True) -> bool:
    """True when the C++ kernels run this call (CPU, float32/float64 compute); while autograd records
    only where they have a backward (``backward``: :func:`chunked`'s has)."""
    return _native.unsupported(call.device, compute_dtype(call.dtype), call.requires_grad and not backward) is None


def _decay_consts(lam: torch.Tensor, C: int):
    """Per-head decay factors of one chunk: intra weights (H, C, C), key-to-end and start-to-query
    factors (H, C, 1), and one whole chunk (H, 1, 1); all exponents <= 0."""
    t = torch.arange(C, device=lam.device, dtype=lam.dtype)
    lam = lam[:, None, None]
    return (weights(C, C, True, lam[:, 0, 0], lam.device, lam.dtype), (lam * (C - 1 - t)[:, None]).exp(),
            (lam * (t + 1)[:, None]).exp(), (lam * C).exp())


def _span(q, k, v, S, consts):
    """Chunks (B, H, m, C, .) at once: intra = [(Q Kᵀ) ⊙ W] V, inter = (Q ⊙ decay) S_before."""
    scores = q @ k.transpose(-1, -2)  # fresh: masked in place (matmul's backward does not read its output)
    if consts is None:
        scores.tril_()
        dS = k.transpose(-1, -2) @ v  # (B, H, m, F, Dv)
        before = S[:, :, None] + dS.cumsum(2) - dS  # state before each chunk
        S = before[:, :, -1] + dS[:, :, -1]
        qs = q
    else:
        w, k_to_end, q_from_start, across = consts
        scores.mul_(w[:, None])
        before, S = _carry(S, (k * k_to_end[:, None]).transpose(-1, -2) @ v, across)
        qs = q * q_from_start[:, None]
    flat = lambda x: x.reshape(-1, x.shape[-2], x.shape[-1])  # noqa: E731
    out = flat(scores @ v).baddbmm_(flat(qs), flat(before))  # intra + inter in one pass
    return out.view(q.shape[:-1] + (v.shape[-1],)), S


def _carry(S, dS, across):
    """The state before each chunk (stacked on axis 2) and after the last one:
    ``S_{c+1} = across_c ⊙ S_c + dS_c``; ``across`` is one factor for every chunk, or one per chunk
    on axis 2 (as ``dS``)."""
    befores = []
    for c in range(dS.shape[2]):
        befores.append(S)
        S = S * (across[:, :, c] if across.dim() == dS.dim() else across) + dS[:, :, c]
    return torch.stack(befores, dim=2), S


def _gated_chunks(q, k, vv, S, g):
    """Per-channel gates, (B, H, m, C, F) each: intra-chunk weights ``exp(G_t - G_s)`` per channel."""
    B, H, m, C, F = q.shape
    G = g.cumsum(3)  # inclusive, within each chunk
    last = G[..., -1:, :]  # (B, H, m, 1, F)
    q_from_start = q * G.exp()
    if float(-last.detach().min()) < EXP_RANGE[q.dtype]:
        # every chunk's gates span less than exp(range): split exp(G_t - G_s) = exp(G_t) exp(-G_s) and
        # use one GEMM (both factors stay far inside the dtype's range; the products are exact)
        intra = (q_from_start @ (k * (-G).exp()).transpose(-1, -2)).tril_() @ vv
    else:  # strong decay: the (C, C, F) weights themselves, in groups of chunks
        visible = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        per = max(1, _GATED_GROUP_FLOATS // max(1, B * H * C * C * F))
        parts = []
        for a in range(0, m, per):
            Ga = G[:, :, a:a + per]
            expo = Ga[..., :, None, :] - Ga[..., None, :, :]  # (B, H, m', C, C, F)
            expo = torch.where(visible[..., None], expo, torch.full_like(expo, float("-inf")))
            scores = torch.einsum("bhntf,bhnsf,bhntsf->bhnts", q[:, :, a:a + per], k[:, :, a:a + per], expo.exp())
            parts.append(scores @ vv[:, :, a:a + per])
        intra = torch.cat(parts, dim=2)
    before, S = _carry(S, (k * (last - G).exp()).transpose(-1, -2) @ vv, last[..., 0, :, None].exp())
    return intra + q_from_start @ before, S


# --------------------------------------------------------------------------------------------
# Non-causal forms
# --------------------------------------------------------------------------------------------
def bidirectional(fq, fk, v, *, chunk: int, log_decay=None, log_gates=None, q_scale: float = 1.0,
                  strict: bool = False) -> Optional[torch.Tensor]:
    """The causal chunked form plus the anti-causal one (the sequence read backwards), added, on the C++
    kernel without flipping anything in memory: ``strict`` leaves the backward pass's diagonal out (so
    a token's own pair counts once); ``log_gates`` = ``(forward, backward)`` per-channel log gates, the
    backward ones read backwards too. None when the kernel does not serve the call."""
    g, gb = log_gates if log_gates is not None else (None, None)
    S0 = fq.new_zeros(fq.shape[:2] + (fq.shape[-1], v.shape[-1]))
    if _recorded((fq, fk, v), (log_decay, g, gb)):  # forward and backward on the C++ kernels
        form = Form(chunk, q_scale=q_scale)
        return (_through_kernels(fq, fk, v, S0, log_decay, g, form)[0]
                + _through_kernels(fq, fk, v, S0, log_decay, gb, form._replace(reverse=True, strict=strict))[0])
    S = _kernel_state(S0, fq, fk, v, log_decay, g, gb)
    if S is None:
        return None
    out = _native.linear_chunks(fq, fk, v, S, log_decay, chunk, g, q_scale=q_scale)
    return _native.linear_chunks(fq, fk, v, torch.zeros_like(S), log_decay, chunk, gb, q_scale=q_scale, reverse=True,
                                 strict=strict, add_to=out)


def noncausal_fused(q, k, v, *, chunk: int = 64, feature: str = "identity", q_scale: float = 1.0,
                    normalize_eps: Optional[float] = None, feature_dim: int = 0, rala_scale: float = 0.0,
                    centred: bool = False):
    """:func:`noncausal` without decay on the C++ kernel (:func:`attnlab.native.linear_noncausal`): the
    feature map applied there chunk by chunk (times ``q_scale`` on the queries; with ``rala_scale`` RALA's
    key weights), the state then the read-out, normalized with ``normalize_eps`` (``num / (den + eps)``,
    no ones column appended) or ``centred`` (InLine's ``φ(q) q_scale (S - z ūᵀ) + ū``); forward and
    backward: :class:`NonCausal`. None when the kernel does not serve the call."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return None
    if _recorded((q, k, v)):  # forward and backward on the C++ kernels
        return NonCausal.apply(q, k, v, Form(chunk, feature, feature_dim, q_scale, normalize_eps), rala_scale, centred)
    if not _native.serves(q, k, v):
        return None
    return _native.linear_noncausal(q, k, v, chunk, normalize_eps, feature, q_scale, feature_dim, rala_scale, centred)


class NonCausal(torch.autograd.Function):
    """:func:`noncausal_fused` on the C++ kernels, forward and backward
    (:func:`attnlab.native.linear_noncausal_backward`: from the forward's keys' state (a few floats per
    head, saved) and, normalized, its output, the queries' gradients and the state's, then the keys'; with
    RALA's weights, their softmax's gradient and the global query's; centred, the mean value's and the key
    sums' share). ``apply(q, k, v, form, rala_scale, centred) -> out`` (``form`` a :class:`Form`)."""

    @staticmethod
    def forward(ctx, q, k, v, form: Form, rala_scale: float, centred: bool):
        out, saved = _native.linear_noncausal(q, k, v, form.chunk, form.eps, form.feature, form.q_scale,
                                              form.feature_dim, rala_scale, centred, save=True)
        ctx.save_for_backward(q, k, v, saved, out if form.eps is not None else None)  # o = num / den
        ctx.form, ctx.extra = form, (rala_scale, centred)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, saved, out = ctx.saved_tensors
        f = ctx.form
        return (*_native.linear_noncausal_backward(q, k, v, dout, saved, out, f.chunk, f.eps, f.feature, f.q_scale,
                                                   f.feature_dim, *ctx.extra), None, None, None)


def noncausal(fq, fk, v, *, log_decay=None, recurrent: bool = False, chunk: int = 64) -> torch.Tensor:
    """Every key visible. No decay: ``φq (Σ_j φk_jᵀ v_j)`` (cross attention too). Per-head decay:
    the bidirectional sum of a forward and a backward causal scan minus the double-counted diagonal
    (self attention; on the C++ kernel, :func:`bidirectional`)."""
    if log_decay is None:
        if recurrent:  # absorb every key into the state, then read it out per query
            S = fq.new_zeros(fq.shape[:2] + (fq.shape[-1], v.shape[-1]))
            for t in range(fk.shape[2]):
                S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        else:
            S = fk.transpose(-1, -2) @ v
        return fq @ S
    fast = None if recurrent else bidirectional(fq, fk, v, chunk=chunk, log_decay=log_decay, strict=True)
    if fast is not None:
        return fast
    S0 = fq.new_zeros(fq.shape[:2] + (fq.shape[-1], v.shape[-1]))

    def causal(a, b, c):
        if recurrent:
            return scan_recurrent(a, b, c, S0, log_decay=log_decay)[0]
        return chunked(a, b, c, S0, chunk=chunk, log_decay=log_decay)[0]

    fwd = causal(fq, fk, v)
    bwd = causal(fq.flip(2), fk.flip(2), v.flip(2)).flip(2)
    diag = (fq * fk).sum(-1, keepdim=True) * v
    return fwd + bwd - diag


__all__ = ["Chunks", "ELEMENTWISE", "EXP_RANGE", "FEATURES", "Form", "NonCausal", "bidirectional", "chunked",
           "chunked_centred", "chunked_normalized", "feature_map", "finish", "finish_centred", "fused", "noncausal",
           "noncausal_fused", "parallel", "scan_recurrent", "step", "weights", "with_ones"]
