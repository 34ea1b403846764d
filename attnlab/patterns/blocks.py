"""Block structure of a mask: which (query block, key block) tiles a kernel must visit.

A tile is *empty* when no pair in it is visible (skipped), *full* when every pair is visible
(no mask needs to be applied), and *partial* otherwise. This is the data FlexAttention's
``BlockMask`` holds, computed here directly from the mask function on broadcast index grids,
a few query rows at a time so memory stays bounded by ``O(rows * Lk)`` rather than
``O(Lq * Lk)``. The same structure drives the tiled PyTorch implementation, the FlexAttention
kernel, the benchmark's count of unmasked pairs and the GNA tile simulator. The same pass also
records each query's runs of visible keys (up to :data:`RUNS` ranges): what the ``native`` C++
kernel (:func:`attnlab.native.range_attention`) runs on.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_CACHE: "OrderedDict[tuple, BlockStructure]" = OrderedDict()
_CACHE_SIZE = 128
_ROW_BUDGET = 1 << 24  # mask elements evaluated at once
#: Runs of visible keys per query the structure records (attention sinks plus a window: two).
RUNS = 2


@dataclass(frozen=True, eq=False)
class BlockStructure:
    """Tiles of one mask. Leading dims ``(Bm, Hm)`` are 1 where the mask ignores batch/head."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    kv_num: torch.Tensor  # (Bm, Hm, NQ) int64: visited (partial + full) key blocks per query block
    kv_idx: torch.Tensor  # (Bm, Hm, NQ, NK) int64: visited key blocks first, ascending; rest arbitrary
    full: torch.Tensor  # (Bm, Hm, NQ, NK) bool: tile fully visible
    any: torch.Tensor  # (Bm, Hm, NQ, NK) bool: tile has at least one visible pair
    pairs: int  # visible (query, key) pairs summed over the (Bm, Hm) leading dims
    start: torch.Tensor  # (Bm, Hm, Lq, RUNS) int64: first key of each query's runs of visible keys (0 if none)
    end: torch.Tensor  # (Bm, Hm, Lq, RUNS) int64: one past the run's last key (0 when there is no such run)
    runs: int  # most runs of visible keys in any query's row; RUNS + 1 means more than start/end hold
    boxes: Optional[torch.Tensor] = None  # (Lq, 6) int64 [lo0..2, hi0..2]: each query's keys are this box

    @property
    def grid(self) -> tuple:
        return self.any.shape[-2], self.any.shape[-1]

    def visited_tiles(self) -> int:
        return int(self.any.sum())

    def partial_tiles(self) -> int:
        return int((self.any & ~self.full).sum())

    def flex_block_mask(self, mask_mod: Callable):
        """This structure as a FlexAttention ``BlockMask`` (partial tiles apply ``mask_mod``)."""
        from torch.nn.attention.flex_attention import BlockMask

        partial = self.any & ~self.full
        p_num, p_idx = _compact(partial)
        f_num, f_idx = _compact(self.full)
        return BlockMask.from_kv_blocks(
            p_num.to(torch.int32),
            p_idx.to(torch.int32),
            f_num.to(torch.int32),
            f_idx.to(torch.int32),
            BLOCK_SIZE=(self.block_q, self.block_k),
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )


def _compact(flags: torch.Tensor):
    """Per row of ``flags`` (..., NK): the count of True entries and their indices first, ascending."""
    nk = flags.shape[-1]
    order = torch.argsort((~flags).to(torch.int64) * nk + torch.arange(nk, device=flags.device), dim=-1)
    return flags.sum(-1), order


def compute(
    mask_mod: Callable,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    device="cpu",
    coords: Optional[torch.Tensor] = None,
) -> BlockStructure:
    """Evaluate ``mask_mod`` on the whole grid, a chunk of query rows at a time.

    ``batch``/``heads`` are the leading sizes to evaluate (1 where the mask does not depend on
    them). Keys past ``kv_len`` in the last block count as invisible for ``any`` and as visible
    for ``full`` (kernels bound-check them separately). With the keys' grid ``coords``
    (``(ndim, kv_len)``, at most 3 axes, one mask for every batch and head), also each query's
    bounding box, kept when every query's visible keys fill their box exactly.
    """
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    any_ = torch.zeros(batch, heads, nq, nk, dtype=torch.bool, device=device)
    full = torch.zeros_like(any_)
    pairs = 0
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    start = torch.zeros(batch, heads, q_len, RUNS, dtype=torch.int64, device=device)
    end = torch.zeros_like(start)
    runs = 0
    box = _BoxTracker(coords, q_len) if coords is not None and batch == heads == 1 else None
    pad_k = nk * block_k - kv_len
    rows_per_chunk = max(1, _ROW_BUDGET // max(1, kv_len * batch * heads) // block_q) * block_q
    for r0 in range(0, q_len, rows_per_chunk):
        r1 = min(q_len, r0 + rows_per_chunk)
        q = torch.arange(r0, r1, device=device).view(1, 1, r1 - r0, 1)
        m = torch.as_tensor(mask_mod(b, h, q, kv), device=device).expand(batch, heads, r1 - r0, kv_len)
        count = m.sum(-1)
        pairs += int(count.sum())
        first = m.to(torch.uint8).argmax(-1)
        if runs <= RUNS:  # runs of visible keys per row: the False -> True steps
            rise = torch.cat([m[..., :1], m[..., 1:] & ~m[..., :-1]], -1)
            runs = max(runs, min(int(rise.sum(-1).max()), RUNS + 1))
            if runs <= 1:
                start[:, :, r0:r1, 0] = torch.where(count > 0, first, 0)
                end[:, :, r0:r1, 0] = torch.where(count > 0, first + count, 0)
            elif runs <= RUNS:
                run_id = rise.to(torch.uint8).cumsum(-1, dtype=torch.uint8)
                for r in range(RUNS):
                    sel = m & (run_id == r + 1)
                    n_r = sel.sum(-1)
                    first_r = sel.to(torch.uint8).argmax(-1)
                    start[:, :, r0:r1, r] = torch.where(n_r > 0, first_r, 0)
                    end[:, :, r0:r1, r] = torch.where(n_r > 0, first_r + n_r, 0)
        if box is not None:
            box.add(m[0, 0], count[0, 0], r0)
        pad_q = (-(r1 - r0)) % block_q
        m_any = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=False)
        m_all = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=True)
        shape = (batch, heads, m_any.shape[2] // block_q, block_q, nk, block_k)
        qb0 = r0 // block_q
        qb1 = qb0 + shape[2]
        any_[:, :, qb0:qb1] = m_any.view(shape).any(5).any(3)
        full[:, :, qb0:qb1] = m_all.view(shape).all(5).all(3)
    full &= any_
    kv_num, kv_idx = _compact(any_)
    return BlockStructure(q_len, kv_len, block_q, block_k, kv_num, kv_idx, full, any_, pairs, start, end, runs,
                          box.result() if box is not None else None)


class _BoxTracker:
    """Per query, the bounding box of its visible keys in grid coordinates, and whether every query's
    keys fill their box (the visible count equals the box's volume)."""

    ROWS = 256  # rows per step: the (rows, Lk) coordinate temporaries stay a few MiB

    def __init__(self, coords: torch.Tensor, q_len: int):
        pad = 3 - coords.shape[0]
        self.coords = torch.cat([coords.new_zeros(pad, coords.shape[1]), coords]).to(torch.int32)
        self.boxes = torch.zeros(q_len, 6, dtype=torch.int64, device=coords.device)
        self.ok = True

    def add(self, m: torch.Tensor, count: torch.Tensor, r0: int):
        big = torch.iinfo(torch.int32).max
        for a in range(0, m.shape[0], self.ROWS):
            if not self.ok:
                return
            mm, cnt = m[a:a + self.ROWS], count[a:a + self.ROWS]
            lo = torch.stack([torch.where(mm, c, big).amin(-1) for c in self.coords], -1).to(torch.int64)
            hi = torch.stack([torch.where(mm, c, -1).amax(-1) for c in self.coords], -1).to(torch.int64) + 1
            seen = (cnt > 0)[:, None]
            lo, hi = torch.where(seen, lo, 0), torch.where(seen, hi, 0)
            self.ok = bool(((hi - lo).prod(-1) == cnt).all())
            self.boxes[r0 + a:r0 + a + mm.shape[0]] = torch.cat([lo, hi], -1)

    def result(self) -> Optional[torch.Tensor]:
        return self.boxes if self.ok else None


def cached(
    key: Optional[tuple],
    mask_mod: Callable,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    device="cpu",
    coords: Optional[torch.Tensor] = None,
) -> BlockStructure:
    """:func:`compute` memoized by ``key`` (pattern, params, shapes); ``key=None`` disables caching."""
    if key is None:
        return compute(mask_mod, batch, heads, q_len, kv_len, block_q, block_k, device, coords)
    full_key = (key, batch, heads, q_len, kv_len, block_q, block_k, str(device), coords is not None)
    hit = _CACHE.get(full_key)
    if hit is None:
        hit = compute(mask_mod, batch, heads, q_len, kv_len, block_q, block_k, device, coords)
        _CACHE[full_key] = hit
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(full_key)
    return hit
