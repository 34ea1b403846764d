"""Neighborhood attention (NA, DiNA, GNA) as a mask, and GNA's tile simulator.

Semantics follow NATTEN 0.21 (Hassani et al.: Neighborhood Attention, Dilated Neighborhood
Attention, Faster Neighborhood Attention, Generalized Neighborhood Attention), one axis at a
time; on a grid the mask is the AND over axes. For one axis of length ``n`` with kernel ``k``,
dilation ``d``, stride ``s``:

1. Dilation groups: token ``x`` is in group ``x % d`` at in-group coordinate ``c = x // d``;
   the group has ``n_g = ceil((n - x % d) / d)`` tokens. Keys outside the query's group are
   invisible.
2. Non-causal: the stride group of a query (``c // s``) shares the window of its leader
   ``lead = min((c // s) * s + s // 2, n_g - 1)`` (its centre; the right-hand centre for even
   ``s``). The window is ``[start, start + k)`` with ``start = clamp(lead - k // 2, 0, n_g - k)``:
   clamped at the borders, never padded, so every query sees exactly ``k`` keys per axis.
3. Causal: ``lead = min((c // s) * s + s - 1, n_g - 1)`` (the last query of the stride group);
   keys ``max(lead - k + 1, 0) <= c_key <= c``. Early queries see fewer keys.

``stride = 1`` is sliding-window NA, ``stride = kernel`` blocked (window) attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import blocks as _blocks
from .base import Geometry, Mask, token_order
from .spatial import per_axis


def neighborhood(kernel_size: tuple, stride: tuple, dilation: tuple, is_causal: tuple, shape: tuple) -> Mask:
    """NATTEN-exact neighborhood mask on a grid of ``shape`` (all parameters per axis)."""

    def rule(a, qc, kc):
        k, s, d, n = kernel_size[a], stride[a], dilation[a], shape[a]
        same_group = torch.remainder(qc, d) == torch.remainder(kc, d)
        cq, ck = qc // d, kc // d
        n_g = (n - torch.remainder(qc, d) + d - 1) // d
        if is_causal[a]:
            lead = torch.minimum((cq // s) * s + s - 1, n_g - 1)
            return same_group & (ck <= cq) & (ck >= lead - k + 1)
        lead = torch.minimum((cq // s) * s + s // 2, n_g - 1)
        start = torch.clamp(torch.minimum(lead - k // 2, n_g - k), min=0)
        return same_group & (ck >= start) & (ck < start + k)

    key = ("neighborhood", kernel_size, stride, dilation, is_causal, shape)
    return per_axis(f"neighborhood(k={kernel_size},s={stride},d={dilation},causal={is_causal})", key, rule)


@dataclass
class TileReport:
    """GNA simulator output: tile counts and the speedup upper bounds over dense attention."""

    tiles_total: int
    tiles_visited: int
    tiles_partial: int
    pairs_total: int
    pairs_visible: int
    tile_q: tuple
    tile_kv: tuple

    @property
    def tile_speedup(self) -> float:
        """Upper bound if a kernel's cost is proportional to visited tiles."""
        return self.tiles_total / max(1, self.tiles_visited)

    @property
    def flop_speedup(self) -> float:
        """Upper bound if only visible (query, key) pairs cost: dense pairs / visible pairs."""
        return self.pairs_total / max(1, self.pairs_visible)

    def as_dict(self) -> dict:
        return {**self.__dict__, "tile_speedup": self.tile_speedup, "flop_speedup": self.flop_speedup}


def simulate_tiles(mask: Mask, shape: Sequence[int], tile_q, tile_kv) -> TileReport:
    """GNA's analytical model: count the ``(T_Q, T_KV)`` tiles a fused kernel must visit.

    ``shape`` is the token grid (or ``(L,)``); ``tile_q``/``tile_kv`` are tile shapes, one size
    per axis (an int is a 1-D tile of that many tokens in raster order). Tokens are laid out in
    tile-major order (GNA's token permutation) with the query tile shape, the same layout
    attnlab's kernels use. Returns visited and partly masked tile counts, and the tile-level and
    FLOP-level speedup upper bounds over dense attention.
    """
    shape = tuple(int(s) for s in shape)
    tq = _tile(tile_q, shape, "tile_q")
    tk = _tile(tile_kv, shape, "tile_kv")
    if tq != tk and len(shape) > 1:
        raise ValueError(f"tile_q and tile_kv must be equal boxes on a multi-dimensional grid, got {tq} and {tk}")
    L = math.prod(shape)
    order = tq if len(shape) > 1 else None
    geom = Geometry(1, 1, L, L, shape if len(shape) > 1 else (L,), order)
    mod = mask.build(geom)
    st = _blocks.compute(mod, 1, 1, L, L, math.prod(tq), math.prod(tk))
    nq, nk = st.grid
    return TileReport(nq * nk, st.visited_tiles(), st.partial_tiles(), L * L, st.pairs, tq, tk)


def _tile(t, shape: tuple, name: str) -> tuple:
    t = (t,) * 1 if isinstance(t, int) else tuple(t)
    if len(shape) > 1 and len(t) == 1:
        raise ValueError(f"{name} must give one size per axis of the grid {shape}, got {t}")
    if len(shape) == 1 and len(t) != 1:
        raise ValueError(f"{name} must be one int for a sequence, got {t}")
    if any((not isinstance(x, int)) or x < 1 for x in t):
        raise ValueError(f"{name} sizes must be ints >= 1, got {t}")
    return t


__all__ = ["neighborhood", "simulate_tiles", "TileReport", "token_order"]
