"""Mask recipes on 1-D sequences (MECHANISMS.md section 2).

Every function returns a :class:`~attnlab.patterns.base.Mask`; ``i`` below is the query's
absolute position (``q_idx + Lk - Lq``), ``j`` the key's. Causality is *not* part of these
masks: a causal call ANDs the causal mask ``j <= i`` on top (see
:mod:`attnlab.patterns.executor`), so every mechanism's causal form is causal by construction.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Mask, take


def sliding_window(window: int) -> Mask:
    """Sliding window: ``|i - j| < window``. With causal: the last ``window`` keys, self included."""

    def build(g):
        return lambda b, h, q, kv: (g.q_pos(q) - kv).abs() < window

    return Mask(f"sliding_window({window})", build, ("sliding_window", window))


def sinks(n: int) -> Mask:
    """The first ``n`` keys, visible from every query (attention sinks, StreamingLLM)."""
    return Mask(f"sinks({n})", lambda g: (lambda b, h, q, kv: kv < n), ("sinks", n))


def sink_window(sinks_: int, window: int) -> Mask:
    """StreamingLLM: ``j < sinks or |i - j| < window`` (causal: sinks plus the last ``window`` keys)."""
    return sinks(sinks_) | sliding_window(window)


def prefix_lm(prefix: int) -> Mask:
    """Prefix LM: ``j < prefix or j <= i`` -- bidirectional over the prefix, causal after it."""

    def build(g):
        return lambda b, h, q, kv: (kv < prefix) | (kv <= g.q_pos(q))

    return Mask(f"prefix_lm({prefix})", build, ("prefix_lm", prefix))


def _ids(lengths: Sequence[int], device) -> torch.Tensor:
    """Segment id of every position for consecutive segments of the given lengths."""
    lens = torch.as_tensor(list(lengths), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lens)), lens).to(device)


def document(lengths: Sequence[int]) -> Mask:
    """Packed variable-length sequences: ``doc(i) == doc(j)`` (block diagonal).

    ``lengths`` are the documents' lengths in order; they must sum to the sequence length.
    """
    lengths = tuple(int(x) for x in lengths)

    def build(g):
        ids = _ids(lengths, g.device)
        return lambda b, h, q, kv: take(ids, g.q_pos(q)) == take(ids, kv)

    return Mask(f"document({len(lengths)} docs)", build, ("document", lengths))


def segment_stream(lengths: Sequence[int], targets: Optional[Sequence[int]] = None) -> Mask:
    """Segment-level streaming causal mask (Think While Watching).

    Source segments ``S_0..S_{n-1}`` (``lengths``): a token sees every source token of its own
    and earlier segments, ``seg(j) <= seg(i)`` -- causal over segments, full inside one. With
    ``targets`` (one output segment ``T_t`` per source segment, packed after all sources, the
    paper's memory-anchored layout), a target token of ``T_t`` sees source tokens with
    ``seg(j) <= t`` and target tokens ``j <= i``; sources never see targets.
    """
    lengths = tuple(int(x) for x in lengths)
    targets = None if targets is None else tuple(int(x) for x in targets)
    n_src = sum(lengths)

    def build(g):
        ids = _ids(lengths + (targets or ()), g.device)
        n = len(lengths)

        def see(b, h, q, kv):
            i = g.q_pos(q)
            si, sj = torch.remainder(take(ids, i), n), torch.remainder(take(ids, kv), n)
            src_i, src_j = i < n_src, kv < n_src
            return torch.where(src_j, sj <= si, (~src_i) & (kv <= i))

        return see

    return Mask(f"segment_stream({len(lengths)} segments)", build, ("segment_stream", lengths, targets))


def shifted_sparse(group_size: int, heads: int, wrap: bool = True) -> Mask:
    """LongLoRA's shifted sparse attention (S2-Attn), as a mask on original positions.

    Tokens are split into groups of ``group_size``; attention stays inside a group. The second
    half of the heads (``h >= heads // 2``) uses groups shifted by ``group_size // 2``: LongLoRA
    rolls those heads' tokens by ``-group_size // 2`` before grouping, so position ``p`` falls
    in group ``((p - group_size//2) mod L) // group_size``; with ``wrap`` (LongLoRA) the first
    and last half-groups form one group, without it they are two smaller groups.
    """
    half = group_size // 2

    def build(g):
        L = g.kv_len

        def group(p, h):
            shifted = h >= heads // 2
            if wrap:
                sp = torch.remainder(p - half, L) // group_size
            else:
                sp = (p + group_size - half) // group_size
            return torch.where(shifted, sp, p // group_size)

        return lambda b, h, q, kv: group(g.q_pos(q), h) == group(kv, h)

    return Mask(f"shifted_sparse({group_size})", build, ("shifted_sparse", group_size, heads, wrap), per_head=True)


def head_sharded(block_size: int, local_blocks: int, vert_stride: int, head_step: int, head_offset: int,
                 group: int) -> Mask:
    """S2-Attention (Sparsely-Sharded; DKernel's local-stride pattern, 'absolute' layout).

    Query block ``r = i // block_size``, key block ``c = j // block_size``, kv head ``g = h // group``.
    Visible iff ``(c + g * head_step + head_offset) % vert_stride == 0`` (the head's shard) or
    ``|r - c| < local_blocks`` (local blocks; causal calls keep those with ``c <= r``).
    """

    def build(gm):
        def see(b, h, q, kv):
            r, c = gm.q_pos(q) // block_size, kv // block_size
            shard = torch.remainder(c + (h // group) * head_step + head_offset, vert_stride) == 0
            return shard | ((r - c).abs() < local_blocks)

        return see

    return Mask(f"head_sharded({block_size},{local_blocks},{vert_stride},{head_step},{head_offset})", build,
                ("head_sharded", block_size, local_blocks, vert_stride, head_step, head_offset, group), per_head=True)


def strided(stride: int, mode: str = "strided", summary: int = 1) -> Mask:
    """Sparse Transformer (Child et al. 2019) factorized patterns, as one mask.

    ``strided``: ``|i - j| < stride`` (local band) or ``(i - j) % stride == 0`` (strided columns).
    ``fixed``: ``i // stride == j // stride`` (same block) or ``j % stride >= stride - summary``
    (the last ``summary`` positions of every block act as summary columns).
    """

    def build(g):
        if mode == "strided":
            return lambda b, h, q, kv: ((g.q_pos(q) - kv).abs() < stride) | (
                torch.remainder(g.q_pos(q) - kv, stride) == 0)
        return lambda b, h, q, kv: (g.q_pos(q) // stride == kv // stride) | (
            torch.remainder(kv, stride) >= stride - summary)

    return Mask(f"strided({stride},{mode})", build, ("strided", stride, mode, summary))


def from_tensor(mask: torch.Tensor) -> Mask:
    """A boolean mask tensor broadcastable to ``(B, H, Lq, Lk)`` as a Mask (not cached)."""
    per_batch = mask.dim() >= 4 and mask.shape[-4] > 1
    per_head = mask.dim() >= 3 and mask.shape[-3] > 1

    def build(g):
        full = mask.expand(g.batch, g.heads, g.q_len, g.kv_len)
        return lambda b, h, q, kv: full[b, h, torch.clamp(q, max=g.q_len - 1), torch.clamp(kv, max=g.kv_len - 1)]

    return Mask(f"tensor{tuple(mask.shape)}", build, None, per_head=per_head, per_batch=per_batch)


def lengths_from(lengths: Optional[Sequence[int]], offsets: Optional[Sequence[int]], total: int, what: str,
                 owner: str) -> tuple:
    """Validate document/segment ``lengths`` or ``offsets`` (cu_seqlens style) against ``total``."""
    if (lengths is None) == (offsets is None):
        raise ValueError(f"{owner}: give exactly one of {what}_lengths or {what}_offsets")
    if offsets is not None:
        offs = list(offsets)
        if offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"{owner}: {what}_offsets must start at 0 and increase strictly, got {offs}")
        lengths = [b - a for a, b in zip(offs, offs[1:])]
        if not lengths:
            raise ValueError(f"{owner}: {what}_offsets needs at least two entries, got {offs}")
    lengths = list(lengths)
    if any(x < 1 for x in lengths):
        raise ValueError(f"{owner}: every {what} length must be >= 1, got {lengths}")
    if sum(lengths) != total:
        raise ValueError(f"{owner}: {what} lengths must sum to the sequence length {total}, got sum {sum(lengths)}")
    return tuple(lengths)


__all__ = ["sliding_window", "sinks", "sink_window", "prefix_lm", "document", "segment_stream", "shifted_sparse",
           "head_sharded", "strided", "from_tensor"]
