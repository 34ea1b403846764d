"""Structured sparsity as data: masks, score modifiers, and the one executor that runs them.

Compose your own pattern and run it with any backend::

    from attnlab import patterns as P
    mask = P.sliding_window(256) | P.sinks(4)
    out = P.masked_attention(q, k, v, mask=mask, score_mod=P.softcap(30.0), causal=True)
"""
from __future__ import annotations

from typing import Optional

from ..catalogue import PATTERNS, Mechanism
from . import executor
from .base import Geometry, Mask, ScoreMod, causal, full, token_order
from .mods import alibi, alibi_slopes, relative_bias, softcap
from .neighborhood import neighborhood, simulate_tiles
from .sequence import (document, head_sharded, prefix_lm, segment_stream, shifted_sparse, sink_window, sinks,
                       sliding_window, strided)
from .spatial import grid, halo, shifted_window, tile3d, window


def masked_attention(q, k, v, mask: Optional[Mask] = None, score_mod: Optional[ScoreMod] = None, *,
                     causal: bool = False, impl: Optional[str] = None, scale: Optional[float] = None,
                     return_lse: bool = False):
    """Attention under any :class:`Mask` / :class:`ScoreMod` composition, on any backend.

    Inputs are ``(B, H, L, D)``, or ``(B, H, *grid, D)`` for masks built on grid coordinates.
    """
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"masked_attention: mask must be an attnlab Mask or None, got {type(mask).__name__}")
    if score_mod is not None and not isinstance(score_mod, ScoreMod):
        raise TypeError(f"masked_attention: score_mod must be an attnlab ScoreMod or None, got "
                        f"{type(score_mod).__name__}")
    spatial = getattr(q, "dim", lambda: 4)() != 4
    mech = Mechanism(name="masked_attention", family="structured", paper="", summary="", formula="",
                     layout="spatial" if spatial else "sequence", patterns=PATTERNS, impls=executor.MASKED_IMPLS,
                     spec=lambda call: (mask, score_mod))
    return mech(q, k, v, causal=causal, impl=impl, scale=scale, return_lse=return_lse)


__all__ = ["Geometry", "Mask", "ScoreMod", "causal", "full", "token_order", "alibi", "alibi_slopes", "relative_bias",
           "softcap", "neighborhood", "simulate_tiles", "document", "head_sharded", "prefix_lm", "segment_stream",
           "shifted_sparse", "sink_window", "sinks", "sliding_window", "strided", "grid", "halo", "shifted_window",
           "tile3d", "window", "masked_attention", "executor"]
