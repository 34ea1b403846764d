"""Mask recipes on 1-, 2- and 3-D token grids (vision and video).

Tokens of a grid of shape ``(S0, S1, ...)`` are flattened; a mask function maps the flat index
back to grid coordinates with :meth:`~attnlab.patterns.base.Geometry.coords` (so it is correct
in raster order and in the tile-major order the fast backends use). Every rule is a
conjunction over axes: a key is visible when it is visible along every axis. Parameters are
per axis (tuples with one entry per spatial axis).
"""
from __future__ import annotations

from typing import Callable

from .base import Mask, take


def per_axis(name: str, key: tuple, rule: Callable) -> Mask:
    """Mask that is the AND over axes of ``rule(axis, qc, kc)`` on grid coordinates."""

    def build(g):
        coords = g.coords()

        def see(b, h, q, kv):
            ok = None
            for a in range(coords.shape[0]):
                r = rule(a, take(coords[a], q), take(coords[a], kv))
                ok = r if ok is None else ok & r
            return ok

        return see

    return Mask(name, build, key)


def window(size: tuple) -> Mask:
    """Non-overlapping windows (Swin / MaxViT block attention): same ``coord // size`` on every axis.

    Border windows of a grid not divisible by ``size`` are smaller (Swin pads and masks the pad,
    which gives the same result).
    """
    return per_axis(f"window{size}", ("window", size), lambda a, qc, kc: qc // size[a] == kc // size[a])


def shifted_window(size: tuple, shift: tuple) -> Mask:
    """Swin's shifted windows, on original positions.

    Swin rolls the grid by ``-shift``, partitions it into windows and masks pairs that came
    from different regions of the roll. On original coordinates this is the window partition
    offset by ``shift``: window id ``(coord + size - shift) // size`` per axis (the first ``shift``
    rows/columns and the wrapped-around border form their own smaller windows).
    """
    return per_axis(f"shifted_window{size}+{shift}", ("shifted_window", size, shift),
                    lambda a, qc, kc: (qc + size[a] - shift[a]) // size[a] == (kc + size[a] - shift[a]) // size[a])


def halo(block: tuple, halo_: tuple) -> Mask:
    """HaloNet blocked local attention: a query block sees its block grown by ``halo`` per side.

    Query block ``B = coord // block``; a key is visible when
    ``B*block - halo <= coord_k < (B+1)*block + halo`` on every axis. Halo positions outside
    the grid do not exist here (HaloNet zero-pads them, which adds keys of score 0; attnlab
    masks them instead and documents this choice).
    """

    def rule(a, qc, kc):
        lo = (qc // block[a]) * block[a] - halo_[a]
        return (kc >= lo) & (kc < lo + block[a] + 2 * halo_[a])

    return per_axis(f"halo{block}+{halo_}", ("halo", block, halo_), rule)


def grid(size: tuple, shape: tuple) -> Mask:
    """MaxViT grid attention (dilated global): a ``size`` grid of tokens at stride ``S / size``.

    MaxViT's grid partition splits axis ``S`` into ``size`` cells of ``S // size`` tokens; tokens
    with the same offset inside their cell, ``coord % (S // size)``, attend to each other. Every
    axis must be divisible by its grid size.
    """
    stride = tuple(s // g for s, g in zip(shape, size))
    return per_axis(f"grid{size}", ("grid", size, shape), lambda a, qc, kc: qc % stride[a] == kc % stride[a])


def tile3d(global_frames: int) -> Mask:
    """Efficient-vDiT attention tiles on a video grid ``(T, H, W)``: frame ``f`` = axis-0 coordinate.

    Visible iff ``f(i) == f(j)`` (diagonal tiles) or ``f(j) < k`` or ``f(i) < k`` (the first ``k``
    frames are global reference frames, as rows and as columns). Cost is linear in ``T``.
    """
    k = global_frames

    def build(g):
        frame = g.coords()[0]
        def see(b, h, q, kv):
            fq, fk = take(frame, q), take(frame, kv)
            return (fq == fk) | (fk < k) | (fq < k)

        return see

    return Mask(f"tile3d({k})", build, ("tile3d", k))
