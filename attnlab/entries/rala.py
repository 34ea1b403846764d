"""``rala``: Rank-Augmented Linear Attention (Fan, Huang and He 2025, "Breaking the Low-Rank Dilemma of Linear
Attention", CVPR 2025; the RAVLT backbone).

With ``φ(x) = elu(x) + 1`` on queries and keys (the paper's κ)::

    q̄   = (1/L_q) Σ_i φ(q_i)                                   the global query
    α_j = softmax_j(scale · q̄·φ(k_j))                           context-aware key weights, Σ_j α_j = 1
    o_i = Σ_j α_j (φ(q_i)·φ(k_j)) v_j / (Σ_j α_j φ(q_i)·φ(k_j) + eps)

The paper reweights the keys as ``α_j N φ(k_j)`` so that the KV buffer ``Σ_j α_j N φ(k_j)ᵀ v_j`` is no
longer a plain sum of rank-one terms (its rank augmentation of the KV buffer); the official code divides
both that buffer and the normalizer ``φ(q_i)·mean_j(α_j N φ(k_j))`` by ``N``, so ``N`` cancels and the
code's ``eps = 1e-6`` is added to ``Σ_j α_j φ(q_i)·φ(k_j)``: the form above. ``scale`` enters only the
softmax of α (the code's ``self.scale * q_mean @ kᵀ``); φ(q) is unscaled.

**Left out (module-level).** The output rank augmentation ``Y = O ⊙ (X W_o)`` (an elementwise gate from
the layer input: multiply the output by it), the LePE depthwise convolution over V added to the output,
and the RoPE the official code applies to ``φ(q)`` and ``α N φ(k)`` in the numerator only: all are layer
parameters or positional encodings outside the attention.

**Non-causal only.** q̄ averages every query. A causal variant with q̄ the prefix mean is definable, but
``α^(i)_j ∝ exp(scale q̄_i·φ(k_j))`` changes with ``q̄_i`` for every past key, so each step must revisit
all past keys: an ``O(L)`` state and ``O(L²)`` total work, no longer a linear attention; keeping q̄ fixed
would either read future queries or change the definition. So only ``noncausal_self`` and
``noncausal_cross`` are declared (packed documents via ``offsets``: q̄ and α per document).

**Forms.** Parallel: the explicit ``L_q x L_k`` weights ``α_j φ(q_i)·φ(k_j)`` divided by their row sums
(+ eps). Chunked: α over all keys, then the kernel trick through :func:`attnlab.linear.noncausal` with
keys ``α_j φ(k_j)`` and the ones column for the normalizer. Recurrent: one pass over the queries for q̄,
then the keys one at a time through an online-softmax state (running max ``m`` of ``ℓ_j = scale
q̄·φ(k_j)``, ``Z = Σ_j e^(ℓ_j - m)`` and ``S = Σ_j e^(ℓ_j - m) φ(k_j)ᵀ [v_j, 1]``; every exponent <= 0),
then every query reads ``φ(q_i) S / Z = Σ_j α_j φ(q_i)·φ(k_j) [v_j, 1]``. State:
``d (d_v + 1) + d + 2`` floats per head (buffer, q̄, max, sum). Accumulation is float32 for half inputs.

**NaN.** q̄ mixes every query, so one NaN query row makes every output row NaN (``extras["nan_rows"]``).
"""
from __future__ import annotations

import torch

from .. import linear as K
from ..catalogue import Call, Mechanism, Param, register
from ..reference import compute_dtype
from ..recurrent import OFFSETS, Recurrence, check_offsets, forms

EPS = Param("eps", "float", 1e-6, "added to the normalizer Σ_j α_j φ(q_i)·φ(k_j) (the official code's 1e-6)", ge=0.0)


def _mapped(q, k):
    dt = compute_dtype(q.dtype)
    return K.feature_map("elu+1", q.to(dt)), K.feature_map("elu+1", k.to(dt))


def _logits(call: Call, fq, fk):
    """``ℓ_j = scale · q̄·φ(k_j)`` with the global query q̄ = mean_i φ(q_i): (B, H, L_k)."""
    qbar = fq.mean(dim=2, keepdim=True)
    return call.scale * (qbar @ fk.transpose(-1, -2))[:, :, 0]


def _parallel(call: Call, q, k, v):
    fq, fk = _mapped(q, k)
    alpha = torch.softmax(_logits(call, fq, fk), dim=-1)
    w = (fq @ fk.transpose(-1, -2)) * alpha[:, :, None, :]  # (B, H, L_q, L_k)
    return (w @ v.to(fq.dtype) / (w.sum(-1, keepdim=True) + call.params["eps"])).to(v.dtype)


def _chunked(call: Call, q, k, v, state):
    dt = compute_dtype(q.dtype)  # on the C++ kernel (forward and backward): q̄, the weights and the maps fused
    fast = K.noncausal_fused(q.to(dt), k.to(dt), v.to(dt), feature="elu+1", normalize_eps=call.params["eps"],
                             rala_scale=call.scale)
    if fast is not None:
        return fast.to(v.dtype), None
    fq, fk = _mapped(q, k)
    alpha = torch.softmax(_logits(call, fq, fk), dim=-1)
    fk = fk * alpha[..., None]  # the keys weighted: then plain normalized linear attention
    out = K.finish(K.noncausal(fq, fk, K.with_ones(v.to(fq.dtype), True)), True, call.params["eps"])
    return out.to(v.dtype), None


def _noncausal_recurrent(call: Call, q, k, v):
    """q̄ first, then one key at a time: ``m' = max(m, ℓ_t)``, ``S' = S e^(m-m') + e^(ℓ_t-m') φ(k_t)ᵀ[v_t, 1]``,
    ``Z' = Z e^(m-m') + e^(ℓ_t-m')``; finally ``o_i = finish(φ(q_i) S / Z)``."""
    fq, fk = _mapped(q, k)
    qbar = fq.mean(dim=2)  # (B, H, D)
    vv = K.with_ones(v.to(fq.dtype), True)
    B, H, D = qbar.shape
    m = torch.full((B, H), float("-inf"), dtype=fq.dtype, device=q.device)
    Z = torch.zeros(B, H, dtype=fq.dtype, device=q.device)
    S = torch.zeros(B, H, D, vv.shape[-1], dtype=fq.dtype, device=q.device)
    for t in range(k.shape[2]):
        ell = call.scale * (qbar * fk[:, :, t]).sum(-1)
        M = torch.maximum(m, ell)
        carry, e = torch.exp(m - M), torch.exp(ell - M)
        S = S * carry[..., None, None] + e[..., None, None] * fk[:, :, t, :, None] * vv[:, :, t, None, :]
        Z = Z * carry + e
        m = M
    return K.finish(fq @ S / Z[..., None, None], True, call.params["eps"]).to(v.dtype)


def _state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
    """The recurrent (non-causal) form's buffer ``d (d_v + 1)``, q̄ (d), running max and sum, per head."""
    return heads * (head_dim * (value_dim + 1) + head_dim + 2)


def _flops(call: Call) -> float:
    """Chunked form: q̄ and the logits (2 L_k D), α-weighted Kᵀ[V, 1] (2 L_k D (Dv + 1)), read-out
    2 L_q D (Dv + 1)."""
    D, Dv1, Lq, Lk = call.head_dim, call.value_dim + 1, call.q_len, call.kv_len
    return call.batch * call.q_heads * (2 * Lk * D + 2 * Lk * D * Dv1 + 2 * Lq * D * Dv1)


register(Mechanism(
    name="rala",
    family="linear",
    paper="Breaking the Low-Rank Dilemma of Linear Attention (RALA / RAVLT, Fan, Huang and He 2025)",
    summary="Rank-augmented linear attention: elu+1 linear attention whose keys are reweighted by a softmax over "
            "the keys against the mean query (context-aware KV buffer); non-causal",
    formula="φ = elu+1; q̄ = mean_i φ(q_i); α_j = softmax_j(scale q̄·φ(k_j)); o_i = Σ_j α_j (φ(q_i)·φ(k_j)) v_j / "
            "(Σ_j α_j φ(q_i)·φ(k_j) + eps)",
    layout="sequence",
    patterns=("noncausal_self", "noncausal_cross"),
    params=(EPS, OFFSETS),
    impls=forms(),
    check_params=check_offsets,
    examples=({}, {"eps": 0.0}),
    reference_impl="parallel",
    # Non-causal only (see the module docstring): no causal step, so no step/init.
    recurrence=Recurrence(parallel=_parallel, chunked=_chunked, step=None, init=None, state_size=_state_size,
                          noncausal_recurrent=_noncausal_recurrent),
    flops=_flops,
    complexity={"time": "O(L d d_v)", "memory": "O(L d + d d_v)", "state": "O(d d_v)"},
    extras={"gradcheck_impls": ("chunked", "parallel"), "nan_rows": "all"},
))
