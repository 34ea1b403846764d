"""Score modifiers: ALiBi, relative position bias, logit soft-capping.

Each is a :class:`~attnlab.patterns.base.ScoreMod`, composable with any mask (and with each
other by ``+``). Positions are absolute (``i = q_idx + Lk - Lq``), as for masks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import ScoreMod


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022, official code's recipe).

    For ``n`` a power of two: ``m_h = 2^(-8 (h + 1) / n)``. Otherwise the slopes of the nearest
    lower power of two ``p``, followed by every other slope of ``2p``, ``n - p`` of them.
    """

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        s = pow2(heads)
    else:
        p = 2 ** math.floor(math.log2(heads))
        s = pow2(p) + pow2(2 * p)[0::2][: heads - p]
    return torch.tensor(s, dtype=torch.float32)


def alibi(heads: int, slopes: Optional[torch.Tensor] = None) -> ScoreMod:
    """ALiBi: ``s_ij - m_h * |i - j|`` (for causal attention this is the paper's ``-m_h (i - j)``)."""
    slopes_t = alibi_slopes(heads) if slopes is None else slopes
    key = ("alibi", heads, tuple(slopes_t.tolist()))

    def build(g):
        m = slopes_t.to(g.device)
        return lambda s, b, h, q, kv: s - m[h].to(s.dtype) * (g.q_pos(q) - kv).abs().to(s.dtype)

    return ScoreMod(f"alibi({heads})", build, key, per_head=True)


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """Relative position bias (Shaw et al.; Transformer-XL/T5 family; RCMHA): ``s_ij + T[h, c(j - i)]``.

    ``table`` is ``(H, 2M + 1)``; the offset ``j - i`` is clipped to ``[-M, M]`` and shifted by
    ``M``. The table may require grad: every implementation returns its gradient.
    """
    if table.dim() != 2 or table.shape[1] % 2 != 1:
        raise ValueError(f"relative_bias table must have shape (heads, 2*max_distance + 1), got {tuple(table.shape)}")
    M = table.shape[1] // 2

    def build(g):
        return lambda s, b, h, q, kv: s + table[h, torch.clamp(kv - g.q_pos(q), -M, M) + M].to(s.dtype)

    # Keyed by identity: the same table object (e.g. an nn.Parameter updated in place) reuses builds.
    return ScoreMod(f"relative_bias(M={M})", build, ("relative_bias", id(table), tuple(table.shape)),
                    per_head=True, tensors=(table,))


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): ``cap * tanh(s / cap)``."""
    return ScoreMod(f"softcap({cap})", lambda g: (lambda s, b, h, q, kv: cap * torch.tanh(s / cap)), ("softcap", cap))
