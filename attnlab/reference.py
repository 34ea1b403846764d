"""The dense oracle: attention with materialized scores.

This is the definition every other implementation in attnlab is tested against. It is
deliberately plain: scores are materialized as a ``(B, H, Lq, Lk)`` tensor, modified,
masked, soft-maxed and applied to the values.

Formula (per batch ``b``, query head ``h``, query ``i``, key ``j``)::

    s_ij  = scale * <q_i, k_j>                      scale defaults to 1/sqrt(D)
    s_ij  = score_mod(s_ij, b, h, i, j)             optional (ALiBi, soft-capping, ...)
    s_ij  = s_ij + bias_ij                          optional additive bias
    s_ij  = -inf  where mask_ij is False            optional boolean mask, causal mask
    lse_i = log sum_j exp(s_ij)                     -inf when row i sees no key
    p_ij  = exp(s_ij - lse_i)                       0 for a fully masked row (never NaN)
    o_i   = sum_j p_ij v_j

Conventions shared by the whole library:

* tensors are ``(B, H, L, D)`` as in ``torch.nn.functional.scaled_dot_product_attention``;
* grouped-query attention when ``Hq`` is a multiple of ``Hkv``: query head ``h`` uses key/value
  head ``h // (Hq // Hkv)``;
* ``causal`` is aligned to the bottom-right corner (the FlashAttention >= 2.1 convention):
  query ``i`` is at absolute position ``i + Lk - Lq`` and sees keys ``j <= i + Lk - Lq``. For
  self attention this is the usual lower triangle; for decoding with a KV cache it lets the new
  queries see the whole cache;
* a query row that sees no key returns zeros and an LSE of ``-inf``;
* NaN: a NaN in query row ``i`` makes output row ``i`` NaN and leaves every other row finite, in
  every implementation (checked by :mod:`attnlab.conformance`); a NaN in a key or value is not
  contained (``0 * NaN`` is NaN) and may reach rows that do not see it.

Half-precision inputs are computed in float32 and cast back; float32 and float64 are computed
in their own precision, so a float64 call is a float64 reference.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expand_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat key/value heads so that query head ``h`` meets kv head ``h // group``."""
    group = q_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def index_grid(B: int, H: int, Lq: int, Lk: int, device) -> tuple:
    """Broadcastable index tensors ``(b, h, q_idx, kv_idx)`` of shapes (B,1,1,1) ... (1,1,1,Lk)."""
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    return (ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1), ar(Lq).view(1, 1, Lq, 1), ar(Lk).view(1, 1, 1, Lk))


def causal_mask(Lq: int, Lk: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask of shape (Lq, Lk): ``j <= i + Lk - Lq``."""
    i = torch.arange(Lq, device=device).view(Lq, 1)
    j = torch.arange(Lk, device=device).view(1, Lk)
    return j <= i + (Lk - Lq)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    mask_mod: Optional[MaskFn] = None,
    score_mod: Optional[ScoreFn] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    return_weights: bool = False,
):
    """Dense attention with materialized scores; see the module docstring for the formula.

    ``mask`` is boolean (True = attend) or floating (added to the scores, ``-inf`` masks);
    it broadcasts to ``(B, Hq, Lq, Lk)``. ``bias`` is an additive floating tensor.
    ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)`` are
    FlexAttention-style functions, evaluated here on broadcast index tensors.

    Returns ``out`` or a tuple ``(out, lse?, weights?)`` in that order.
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cdt = compute_dtype(q.dtype)
    kx, vx = expand_kv(k, Hq).to(cdt), expand_kv(v, Hq).to(cdt)
    s = torch.matmul(q.to(cdt), kx.transpose(-1, -2)) * scale
    idx = index_grid(B, Hq, Lq, Lk, q.device)
    if score_mod is not None:
        s = score_mod(s, *idx)
    if bias is not None:
        s = s + bias.to(cdt)
    allowed = torch.ones((), dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(cdt)
    if mask_mod is not None:
        allowed = allowed & mask_mod(*idx)
    if causal:
        allowed = allowed & causal_mask(Lq, Lk, q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)
    # exp(s - lse) is NaN for a fully masked row (-inf - -inf); such rows get zero weights.
    p = torch.where(empty, torch.zeros((), dtype=cdt, device=q.device), torch.exp(s - lse.unsqueeze(-1)))
    out = torch.matmul(p, vx).to(q.dtype)
    if not (return_lse or return_weights):
        return out
    extra = ([lse] if return_lse else []) + ([p.to(q.dtype)] if return_weights else [])
    return (out, *extra)
