"""One executor for every mask-expressible mechanism.

A mechanism contributes a :class:`~attnlab.patterns.base.Mask` and/or
:class:`~attnlab.patterns.base.ScoreMod` (its ``spec``); the executor adds the causal mask
when the call is causal and runs one of five backends, all computing the same function:

``reference``  the dense oracle (:mod:`attnlab.reference`) on the materialized mask. O(L^2).
``sdpa``       ``torch.nn.functional.scaled_dot_product_attention`` with the materialized
               boolean mask (no score modifiers). O(L^2) mask memory.
``tiled``      block-sparse FlashAttention in PyTorch (:mod:`attnlab.tiled`): visits only the
               tiles the mask touches, forward and backward, any device and float dtype.
``native``     attnlab's C++ kernels (:mod:`attnlab.native`) when every query sees one or two
               ranges of keys (sliding windows, 1-D neighborhoods, prefix-LM, documents, sinks
               plus a window) or, on a 2-D/3-D grid, one box of keys (neighborhoods without
               dilation, windows): CPU, float32/float64; the range kernel forward and backward,
               the box kernel forward only.
``flex``       FlexAttention (``torch.compile``-d by default) with the same block structure.
               On CPU, torch's FlexAttention kernel is inference-only and does not return the
               LSE; it says so instead of falling back.

Spatial inputs are flattened; for ``tiled`` and ``flex`` tokens are first permuted into
tile-major order (boxes of :func:`default_tile`), so that a spatial neighbourhood covers few
contiguous blocks, and permuted back afterwards. Block structures, block masks and built
functions are cached by (pattern, parameters, shapes): a repeated call compiles nothing.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch

from .. import native as _native
from .. import reference as _ref
from .. import tiled as _tiled
from ..catalogue import Call, Implementation
from . import blocks as _blocks
from .base import Geometry, Mask, causal as _causal_mask, token_order

#: Tile edge (queries and keys) of the block structures used by ``tiled`` and ``flex``. Measured with
#: ``attnlab bench`` on this project's 2-core CPU at L=8192: 64 beats 128 by up to 2x on local patterns
#: (a smaller tile wastes less of a window's edge) and ties on dense attention; 32 loses on dense.
BLOCK = 64
_FLEX_BLOCK_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BOX_TILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # structure -> (box kernel tile, its union bound)
_COMPILED = {}


def flex_compile_enabled() -> bool:
    """``ATTNLAB_FLEX_COMPILE=0`` runs FlexAttention uncompiled (slow; used to keep tests quick)."""
    return os.environ.get("ATTNLAB_FLEX_COMPILE", "1") != "0"


def default_tile(shape: Optional[tuple], block: Optional[int] = None) -> Optional[tuple]:
    """Box shape of tiles for a spatial grid: about ``block`` (default :data:`BLOCK`) tokens, powers of
    two, last axis widest."""
    if not shape or len(shape) == 1:
        return None
    block = block or BLOCK
    n = len(shape)
    tile = [1] * n
    budget = block
    # Give each axis its share (rounded to a power of two), last axis first, clipped to the grid.
    for a in reversed(range(n)):
        share = 2 ** math.ceil(math.log2(max(1, round(budget ** (1 / (a + 1))))))
        tile[a] = max(1, min(shape[a], share))
        budget = max(1, budget // tile[a])
    return tuple(tile)


def geometry(call: Call, tiled_order: bool) -> Geometry:
    tile = default_tile(call.spatial) if tiled_order else None
    return Geometry(call.batch, call.q_heads, call.q_len, call.kv_len, call.spatial, tile, str(call.device))


def plan(call: Call):
    """The call's full mask (pattern & causal) and score modifier, or None for either."""
    spec = call.mechanism.spec
    mask, score = spec(call) if spec else (None, None)
    if call.causal:
        mask = _causal_mask() if mask is None else mask & _causal_mask()
    return mask, score


def _structure(call: Call, mask: Optional[Mask], geom: Geometry):
    if mask is None:
        mod, key = _tiled._visible, ("dense",)
        bm, hm = 1, 1
    else:
        mod, key = mask.build(geom), mask.key
        bm = call.batch if mask.per_batch else 1
        hm = call.q_heads if mask.per_head else 1
    skey = None if key is None else (key, geom)
    # natural token order on a grid of 2-3 axes: also each query's box of keys (the native box kernel)
    coords = geom.coords() if geom.tile is None and geom.shape and 2 <= len(geom.shape) <= 3 else None
    st = _blocks.cached(skey, mod, bm, hm, call.q_len, call.kv_len, BLOCK, BLOCK, call.device, coords)
    return st, (None if mask is None else mod)


def _permute(call: Call, geom: Geometry, *xs):
    if geom.tile is None:
        return xs, None
    perm = token_order(call.spatial, geom.tile).to(call.device)
    return tuple(x.index_select(2, perm) for x in xs), perm


def _unpermute(perm, out, lse):
    if perm is None:
        return out, lse
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out.index_select(2, inv), lse.index_select(2, inv) if lse is not None else None


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
def run_reference(call: Call, q, k, v):
    mask, score = plan(call)
    geom = geometry(call, tiled_order=False)
    return _ref.attention(q, k, v, mask_mod=mask.build(geom) if mask else None,
                          score_mod=score.build(geom) if score else None, scale=call.scale, return_lse=True)


def run_tiled(call: Call, q, k, v):
    mask, score = plan(call)
    geom = geometry(call, tiled_order=True)
    (q, k, v), perm = _permute(call, geom, q, k, v)
    st, mod = _structure(call, mask, geom)
    out, lse = _tiled.sparse_attention(q, k, v, st, mask_mod=mod, score_mod=score.build(geom) if score else None,
                                       score_tensors=score.tensors if score else (), scale=call.scale)
    return _unpermute(perm, out, lse)


def run_flex(call: Call, q, k, v):
    mask, score = plan(call)
    geom = geometry(call, tiled_order=True)
    (q, k, v), perm = _permute(call, geom, q, k, v)
    st, mod = _structure(call, mask, geom)
    bm = _FLEX_BLOCK_MASKS.get(st)
    if bm is None:
        bm = st.flex_block_mask(mod or _tiled._visible)
        _FLEX_BLOCK_MASKS[st] = bm
    fn = _flex_fn()
    kwargs = dict(block_mask=bm, scale=call.scale, enable_gqa=call.q_heads != call.kv_heads)
    if score is not None:
        kwargs["score_mod"] = score.build(geom)
    lse = None
    if call.return_lse:
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    else:
        out = fn(q, k, v, **kwargs)
    # torch's compiled CPU kernel drops NaN in its max reduction and returns a zero row for a NaN
    # query; restore the library's documented contract (a NaN query row gives a NaN output row).
    out = out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))
    return _unpermute(perm, out, lse)


def _native_plan(call: Call):
    """``(structure, tile)`` for the native kernels: ``tile`` None runs the range kernel, else the box
    kernel with query tiles of that shape; or a string saying why neither serves the call."""
    mask, score = plan(call)
    if score is not None:
        return "the C++ kernels apply no score modifier"
    if mask is None or mask.key is None:
        return "the C++ kernels serve masks of a named pattern"
    if mask.per_batch or mask.per_head:
        return "the C++ kernels take one mask for every batch and head"
    st, _ = _structure(call, mask, geometry(call, tiled_order=False))
    if call.spatial and len(call.spatial) > 1:
        if st.boxes is None:
            return "the C++ box kernel needs each query's visible keys to fill one box of the grid"
        planned = _BOX_TILES.get(st)
        if planned is None:
            tile = _native.box_tile(st.boxes, call.spatial)
            planned = _BOX_TILES[st] = tile, _native.box_union(st.boxes, call.spatial, tile)
        tile, keys = planned
        if keys > _native.MAX_BOX_KEYS:
            return f"the boxes of a {tile} query tile span more than {_native.MAX_BOX_KEYS} keys"
        return st, tile
    if st.runs > _blocks.RUNS:
        return f"the C++ range kernel needs each query's visible keys to be at most {_blocks.RUNS} ranges"
    return st, None


def run_native(call: Call, q, k, v):
    st, tile = _native_plan(call)
    if tile is None:
        runs = max(st.runs, 1)
        return _native.range_attention(q, k, v, st.start[0, 0, :, :runs], st.end[0, 0, :, :runs], call.scale)
    return _native.box_attention(q, k, v, st.boxes, call.spatial, tile, call.scale)


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    if not flex_compile_enabled():
        return flex_attention
    if "flex" not in _COMPILED:
        import torch._dynamo.config as dc

        # One compiled graph per (pattern, params, shape): allow many before dynamo gives up.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(getattr(dc, name), 512))
        if hasattr(dc, "accumulated_recompile_limit"):
            dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 4096)
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED["flex"]


def run_sdpa(call: Call, q, k, v):
    mask, _ = plan(call)
    geom = geometry(call, tiled_order=False)
    attn_mask = None
    if mask is not None:
        idx = _ref.index_grid(call.batch if mask.per_batch else 1, call.q_heads if mask.per_head else 1,
                              call.q_len, call.kv_len, q.device)
        attn_mask = mask.build(geom)(*idx)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=call.scale, enable_gqa=call.q_heads != call.kv_heads)


# --------------------------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------------------------
def _flex_supports(call: Call) -> Optional[str]:
    mask, score = plan(call)
    if (mask is not None and mask.key is None) or (score is not None and score.key is None):
        return "a mask or bias given as a tensor would recompile the kernel on every call; use sdpa or tiled"
    if call.device.type == "cpu":
        if call.requires_grad:
            return "torch's CPU FlexAttention kernel is inference-only (inputs require grad); use impl='tiled'"
        if call.dtype == torch.float64:
            return "torch's CPU FlexAttention supports float32, float16 and bfloat16, not float64"
        if call.return_lse and flex_compile_enabled():
            return "torch's compiled CPU FlexAttention cannot return the log-sum-exp; use impl='tiled'"
    return None


def _native_supports(call: Call) -> Optional[str]:
    reason = _native.unsupported(call.device, call.dtype, False)
    if reason:
        return reason
    planned = _native_plan(call)
    if isinstance(planned, str):
        return planned
    if call.requires_grad and planned[1] is not None:
        return "the C++ box kernel is forward-only (inputs require grad); use impl='tiled'"
    return None


def _sdpa_supports(call: Call) -> Optional[str]:
    if call.return_lse:
        return "scaled_dot_product_attention does not return the log-sum-exp"
    spec = call.mechanism.spec
    if spec is not None and spec(call)[1] is not None:
        return "scaled_dot_product_attention cannot apply a score modifier"
    return None


NATIVE = Implementation("native", run_native, _native_supports,
                        doc="C++ kernels for masks where each query sees 1-2 key ranges (CPU, forward and backward) "
                            "or a grid box (CPU forward)")
REFERENCE = Implementation("reference", run_reference, doc="dense oracle on the materialized mask, O(L^2)")
TILED = Implementation("tiled", run_tiled, doc="block-sparse FlashAttention in PyTorch, forward and backward, O(L)")
FLEX = Implementation("flex", run_flex, _flex_supports, doc="FlexAttention block-sparse kernel (compiled)")
SDPA = Implementation("sdpa", run_sdpa, _sdpa_supports, doc="SDPA with the materialized boolean mask, O(L^2)")

#: Preference order for masked mechanisms: the C++ kernels, then the compiled FlexAttention
#: kernel, when they serve; else tiled.
MASKED_IMPLS = (NATIVE, FLEX, TILED, SDPA, REFERENCE)
