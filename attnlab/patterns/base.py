"""Masks and score modifiers as data.

Following FlexAttention (attention-gym), a pattern is a tiny pure function

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor        True = the query may see the key
    score_mod(score, b, h, q_idx, kv_idx) -> tensor     a modified score

written with broadcasting torch operations only, so the same function runs

* inside FlexAttention (scalar tensors under ``vmap``, compiled into a kernel),
* on broadcast index grids, to materialize the mask for the dense oracle and to find which
  ``(query block, key block)`` tiles a block-sparse kernel must visit.

A :class:`Mask` / :class:`ScoreMod` is a named, hashable *recipe* for such a function: it is
built for a :class:`Geometry` (sequence lengths, grid shape, token order) and the built
function is cached, so the same pattern on the same shapes always yields the same function
object, which is what lets compiled kernels and block masks be reused without recompiling.
Masks compose with ``&``, ``|`` and ``~``; score modifiers compose with ``+`` (applied left to
right).

Positions: ``q_idx`` and ``kv_idx`` are indices into the (possibly flattened) query and key
sequences. For cross attention (``Lq != Lk``) query ``i`` sits at absolute position
``i + Lk - Lq`` (bottom-right alignment, see :mod:`attnlab.reference`); builders use
:meth:`Geometry.q_pos` for that.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_BUILD_CACHE: "OrderedDict[tuple, Callable]" = OrderedDict()
_BUILD_CACHE_SIZE = 512


@dataclass(frozen=True)
class Geometry:
    """Everything a pattern needs to know about a call's shapes.

    ``shape`` is the spatial grid for spatial mechanisms (self attention only) and ``None``
    for sequences. ``tile`` is the token order: ``None`` is raster (row-major) order; a tuple
    gives the box shape of the tiles tokens are permuted into (see :func:`token_order`).
    """

    batch: int
    heads: int
    q_len: int
    kv_len: int
    shape: Optional[tuple] = None
    tile: Optional[tuple] = None
    device: str = "cpu"

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    def q_pos(self, q_idx):
        """Absolute position of a query (bottom-right alignment for cross attention)."""
        return q_idx + self.offset if self.offset else q_idx

    def coords(self) -> torch.Tensor:
        """``(ndim, L)`` long tensor: the grid coordinate of each token index, in token order.

        A sequence (``shape`` None) is a 1-D grid of ``kv_len`` tokens.
        """
        return _coords(self.shape or (self.kv_len,), self.tile, self.device)


def _coords(shape: tuple, tile: Optional[tuple], device: str) -> torch.Tensor:
    key = ("coords", shape, tile, device)
    hit = _BUILD_CACHE.get(key)
    if hit is None:
        grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"))
        flat = grid.reshape(len(shape), -1)
        hit = flat[:, token_order(shape, tile)].to(device) if tile else flat.to(device)
        _remember(key, hit)
    return hit


def token_order(shape: tuple, tile: Optional[tuple]) -> torch.Tensor:
    """Permutation putting raster-ordered tokens into tile-major order.

    Tokens are grouped into boxes of ``tile`` (per axis; border boxes are smaller), boxes are
    visited in raster order and tokens within a box in raster order. ``perm[t]`` is the raster
    index of the token at position ``t``. With a tile of ``(1, ..., 1, n)`` or ``None`` this is the
    identity. NATTEN and GNA use the same idea ("token permutation") so that a spatial
    neighbourhood is a few contiguous blocks.
    """
    raster = torch.arange(math.prod(shape)).view(shape)
    if tile is None:
        return raster.flatten()
    # Sort by (box coordinates, in-box coordinates) lexicographically.
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")).reshape(len(shape), -1)
    t = torch.tensor(tile).view(-1, 1)
    keys = list((grid // t)) + list(grid % t)
    order = torch.arange(grid.shape[1])
    for key in reversed(keys):  # stable sorts, last key first
        order = order[torch.sort(key[order], stable=True).indices]
    return raster.flatten()[order]


def _remember(key, value):
    _BUILD_CACHE[key] = value
    _BUILD_CACHE.move_to_end(key)
    while len(_BUILD_CACHE) > _BUILD_CACHE_SIZE:
        _BUILD_CACHE.popitem(last=False)


class _Recipe:
    """Shared part of :class:`Mask` and :class:`ScoreMod`: a name, a key and a cached builder."""

    kind = "recipe"

    def __init__(self, name: str, builder: Callable, key: tuple, *, per_head=False, per_batch=False, tensors=()):
        self.name = name
        self.builder = builder
        self.key = key
        self.per_head = per_head
        self.per_batch = per_batch
        self.tensors = tuple(tensors)

    def build(self, geom: Geometry) -> Callable:
        if self.key is None:  # made from a tensor given by the caller: not cacheable
            return self.builder(geom)
        key = (self.kind, self.key, geom)
        fn = _BUILD_CACHE.get(key)
        if fn is None:
            fn = self.builder(geom)
            _remember(key, fn)
        return fn

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"



class Mask(_Recipe):
    """A pattern: ``build(geom)`` gives ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""

    kind = "mask"

    def __and__(self, other: "Mask") -> "Mask":
        return _combine("&", self, other, torch.logical_and)

    def __or__(self, other: "Mask") -> "Mask":
        return _combine("|", self, other, torch.logical_or)

    def __invert__(self) -> "Mask":
        inner = self

        def builder(g):
            f = inner.build(g)
            return lambda b, h, q, kv: ~f(b, h, q, kv)

        return Mask(f"~{self.name}", builder, _key("not", self.key), per_head=self.per_head, per_batch=self.per_batch)


def _combine(op: str, a: Mask, b: Mask, fn) -> Mask:
    def builder(g):
        fa, fb = a.build(g), b.build(g)
        return lambda bb, h, q, kv: fn(fa(bb, h, q, kv), fb(bb, h, q, kv))

    return Mask(
        f"({a.name} {op} {b.name})",
        builder,
        _key(op, a.key, b.key),
        per_head=a.per_head or b.per_head,
        per_batch=a.per_batch or b.per_batch,
    )


def _key(op, *keys):
    """Key of a composite: None (uncacheable) when any part is uncacheable."""
    return None if any(k is None for k in keys) else (op, *keys)


class ScoreMod(_Recipe):
    """A score modifier: ``build(geom)`` gives ``score_mod(score, b, h, q_idx, kv_idx)``.

    ``tensors`` lists tensors the modifier reads (e.g. a learnable bias table); the tiled
    implementation returns gradients for those that require grad.
    """

    kind = "score"

    def __add__(self, other: "ScoreMod") -> "ScoreMod":
        a, b = self, other

        def builder(g):
            fa, fb = a.build(g), b.build(g)
            return lambda s, bb, h, q, kv: fb(fa(s, bb, h, q, kv), bb, h, q, kv)

        return ScoreMod(
            f"{a.name} + {b.name}",
            builder,
            _key("+", a.key, b.key),
            per_head=a.per_head or b.per_head,
            per_batch=a.per_batch or b.per_batch,
            tensors=a.tensors + b.tensors,
        )


def causal() -> Mask:
    """Causal mask, bottom-right aligned: key ``j`` visible from query ``i`` iff ``j <= i + Lk - Lq``."""
    return Mask("causal", lambda g: (lambda b, h, q, kv: kv <= g.q_pos(q)), ("causal",))


def full() -> Mask:
    """Every key visible (used to express 'no mask' where a Mask object is needed)."""
    return Mask("full", lambda g: (lambda b, h, q, kv: kv >= 0), ("full",))


def take(table: torch.Tensor, idx):
    """``table[idx]`` with ``idx`` clamped into range.

    Kernels evaluate mask functions on whole blocks, so the last block can pass positions past
    the end of the sequence (they are masked out anyway); lookups must not fault on them.
    """
    return table[torch.clamp(idx, max=table.shape[-1] - 1)]
