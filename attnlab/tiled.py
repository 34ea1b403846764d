"""Tiled exact attention: the FlashAttention algorithm in PyTorch, dense or block-sparse.

FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023) never materializes the ``Lq x Lk``
score matrix. Queries are processed in blocks of ``block_q``; for each, key/value blocks of
``block_k`` are visited one chunk at a time while a running maximum ``m``, running sum ``l`` and
un-normalized output ``acc`` are updated (online softmax)::

    s     = scale * q_blk @ k_chunk^T        (score_mod, mask applied; -inf where masked)
    m'    = max(m, rowmax(s))
    p     = exp(s - m')
    l     = l * exp(m - m') + rowsum(p)
    acc   = acc * exp(m - m') + p @ v_chunk
    out   = acc / l,   lse = m + log(l)       (zeros and -inf for a row that sees nothing)

Memory is ``O(L)`` beyond the inputs: per query block a ``block_q x chunk`` score tile.

Block sparsity: given a :class:`~attnlab.patterns.blocks.BlockStructure`, only the key blocks
a query block can see are visited (gathered, so heads with different patterns work), which is
how every structured-sparsity mechanism gets an ``O(visible area)`` implementation with a
backward pass on any device.

Backward (FlashAttention-2, recomputation; nothing of size ``Lq x Lk`` is stored)::

    D_i  = rowsum(dO_i * O_i)
    p    = exp(s - lse)                      recomputed per tile
    dV  += p^T dO,   dP = dO V^T,   dS = p * (dP - D + dlse)
    dQ  += scale * dS K,   dK += scale * dS^T Q

``dlse`` makes the returned LSE differentiable, so :func:`merge` of partial results is
differentiable too. A score modifier is differentiated through with autograd per tile, which
also yields gradients for the tensors it reads (e.g. a learnable relative-position table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .patterns import blocks as _blocks
from .reference import compute_dtype

DEFAULT_BLOCK = 128
CHUNK_KEYS = 1024  # keys per online-softmax step (a few key blocks gathered together)


@dataclass
class _Plan:
    structure: _blocks.BlockStructure
    mask_mod: Optional[Callable]
    score_mod: Optional[Callable]
    scale: float


def _kv_chunks(plan: _Plan, qb: int, B: int, H: int, device):
    """Yield ``(idx, pos, valid)`` for the visited key blocks of query block ``qb``.

    ``idx``: (B|1, H|1, g) key-block indices; ``pos``: (B|1, H|1, g*block_k) key positions;
    ``valid``: same shape, True for positions in range and in a visited block.
    """
    st = plan.structure
    bk = st.block_k
    num = st.kv_num[:, :, qb]
    n_max = int(num.max())
    per_chunk = max(1, CHUNK_KEYS // bk)
    inner = torch.arange(bk, device=device)
    for c0 in range(0, n_max, per_chunk):
        c1 = min(n_max, c0 + per_chunk)
        idx = st.kv_idx[:, :, qb, c0:c1]
        pos = (idx.unsqueeze(-1) * bk + inner).flatten(-2)
        slot = torch.arange(c0, c1, device=device).view(1, 1, -1, 1)
        valid = ((slot < num.unsqueeze(-1).unsqueeze(-1)).expand(*idx.shape, bk).flatten(-2)) & (pos < st.kv_len)
        yield idx, pos, valid


def _gather(x: torch.Tensor, idx: torch.Tensor, bk: int) -> torch.Tensor:
    """Blocks ``idx`` (Bm, Hm, g) of ``x`` (B, H, NK*bk, D) -> (B, H, g*bk, D)."""
    B, H, _, D = x.shape
    if idx.shape[0] == idx.shape[1] == 1:
        first, n = int(idx[0, 0, 0]), idx.shape[-1]
        if n == 1 or torch.equal(idx[0, 0], torch.arange(first, first + n, device=idx.device)):
            return x[:, :, first * bk:(first + n) * bk]  # one contiguous run for every head: a view
    xb = x.view(B, H, -1, bk, D)
    bi = torch.arange(B, device=x.device).view(B, 1, 1)
    hi = torch.arange(H, device=x.device).view(1, H, 1)
    return xb[bi, hi, idx.expand(B, H, idx.shape[-1])].reshape(B, H, -1, D)


def _scores(plan: _Plan, qblk, kc, qpos, pos, valid, B, H, grad_tensors=False):
    """Scores of one tile: returns (raw, modded, allowed)."""
    s = torch.matmul(qblk, kc.transpose(-1, -2)) * plan.scale
    bi = torch.arange(B, device=qblk.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=qblk.device).view(1, H, 1, 1)
    kpos = pos.unsqueeze(-2)
    allowed = valid.unsqueeze(-2)
    if plan.mask_mod is not None:
        allowed = allowed & plan.mask_mod(bi, hi, qpos, kpos)
    raw = s
    if plan.score_mod is not None:
        if grad_tensors:
            raw = s.detach().requires_grad_(True)
        s = plan.score_mod(raw, bi, hi, qpos, kpos)
    return raw, s, allowed


def _forward(plan: _Plan, q, k, v):
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    st = plan.structure
    cdt = compute_dtype(q.dtype)
    kp, vp = _pad_blocks(k, st.block_k), _pad_blocks(v, st.block_k)
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=cdt, device=q.device)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=q.device)
    for qb in range(st.grid[0]):
        r0, r1 = qb * st.block_q, min(Lq, (qb + 1) * st.block_q)
        qblk = q[:, :, r0:r1].to(cdt)
        qpos = torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1)
        m = torch.full((B, H, r1 - r0), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros(B, H, r1 - r0, dtype=cdt, device=q.device)
        acc = torch.zeros(B, H, r1 - r0, Dv, dtype=cdt, device=q.device)
        for idx, pos, valid in _kv_chunks(plan, qb, B, H, q.device):
            kc = _gather(kp, idx, st.block_k).to(cdt)
            vc = _gather(vp, idx, st.block_k).to(cdt)
            _, s, allowed = _scores(plan, qblk, kc, qpos, pos, valid, B, H)
            s = torch.where(allowed, s, neg_inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vc)
            m = m_new
        # l == 0 exactly when the row saw no key; a NaN l (NaN query) must stay NaN, not become a zero row.
        seen = l != 0
        out[:, :, r0:r1] = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), 0.0).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), neg_inf)
    return out, lse


def _backward(plan: _Plan, q, k, v, out, lse, dout, dlse, tensors):
    B, H, Lq, D = q.shape
    st = plan.structure
    cdt = compute_dtype(q.dtype)
    kp, vp = _pad_blocks(k, st.block_k), _pad_blocks(v, st.block_k)
    Lkp = kp.shape[2]
    dq = torch.zeros(B, H, Lq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B * H * Lkp, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B * H * Lkp, v.shape[-1], dtype=cdt, device=q.device)
    dtens = [torch.zeros_like(t) if t.requires_grad else None for t in tensors]
    want_t = [t for t in tensors if t.requires_grad]
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    base = (torch.arange(B * H, device=q.device) * Lkp).view(B, H, 1)
    for qb in range(st.grid[0]):
        r0, r1 = qb * st.block_q, min(Lq, (qb + 1) * st.block_q)
        qblk = q[:, :, r0:r1].to(cdt)
        doblk = dout[:, :, r0:r1].to(cdt)
        lblk = lse[:, :, r0:r1].unsqueeze(-1)
        lblk = torch.where(torch.isneginf(lblk), torch.full_like(lblk, float("inf")), lblk)
        dblk = delta[:, :, r0:r1].unsqueeze(-1)
        qpos = torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1)
        for idx, pos, valid in _kv_chunks(plan, qb, B, H, q.device):
            kc = _gather(kp, idx, st.block_k).to(cdt)
            vc = _gather(vp, idx, st.block_k).to(cdt)
            with torch.enable_grad():
                raw, s, allowed = _scores(plan, qblk, kc, qpos, pos, valid, B, H, grad_tensors=True)
            p = torch.where(allowed, torch.exp(s.detach() - lblk), 0.0)
            flat = (base + pos).expand(B, H, pos.shape[-1]).reshape(-1)
            dv.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), doblk).reshape(-1, dv.shape[-1]))
            ds = p * (torch.matmul(doblk, vc.transpose(-1, -2)) - dblk)
            if plan.score_mod is not None:
                grads = torch.autograd.grad(s, [raw, *want_t], ds, allow_unused=True)
                ds = grads[0]
                for i, g in enumerate(_scatter_positions(tensors, grads[1:])):
                    if g is not None and dtens[i] is not None:
                        dtens[i] += g
            dq[:, :, r0:r1] += torch.matmul(ds, kc) * plan.scale
            dk.index_add_(0, flat, (torch.matmul(ds.transpose(-1, -2), qblk) * plan.scale).reshape(-1, D))
    Lk = k.shape[2]
    dk = dk.view(B, H, Lkp, D)[:, :, :Lk]
    dv = dv.view(B, H, Lkp, -1)[:, :, :Lk]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtens


def _scatter_positions(tensors, grads):
    """Map gradients of the tensors that require grad back to positions in ``tensors``."""
    it = iter(grads)
    return [next(it) if t.requires_grad else None for t in tensors]


def _pad_blocks(x: torch.Tensor, bk: int) -> torch.Tensor:
    pad = (-x.shape[2]) % bk
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, q, k, v, *tensors):
        out, lse = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dt = _backward(ctx.plan, q, k, v, out, lse, dout, dlse, tensors)
        return (None, dq, dk, dv, *dt)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: _blocks.BlockStructure,
    *,
    mask_mod: Optional[Callable] = None,
    score_mod: Optional[Callable] = None,
    score_tensors: Sequence[torch.Tensor] = (),
    scale: Optional[float] = None,
):
    """Block-sparse tiled attention over the tiles of ``structure``; returns ``(out, lse)``.

    ``k``/``v`` may have fewer heads than ``q`` (GQA); they are expanded per group and their
    gradients summed back. ``mask_mod`` is applied to every visited tile (it must agree with
    the structure); ``score_mod`` may read ``score_tensors``, which receive gradients.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    group = Hq // Hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = _Plan(structure, mask_mod, score_mod, scale)
    return _TiledFunction.apply(plan, q, k, v, *score_tensors)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    return_lse: bool = False,
):
    """Exact dense attention by the FlashAttention algorithm (optionally causal, bottom-right).

    Returns ``out`` or ``(out, lse)``; ``lse`` is float32 for half inputs.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    mask_mod, key = None, ("dense",)
    if causal:
        off = Lk - Lq
        mask_mod, key = (lambda b, h, i, j: j <= i + off), ("causal", off)
    st = _blocks.cached(key, mask_mod or _visible, 1, 1, Lq, Lk, block_q, block_k, q.device)
    out, lse = sparse_attention(q, k, v, st, mask_mod=mask_mod, scale=scale)
    return (out, lse) if return_lse else out


def _visible(b, h, i, j):
    return j >= 0


def merge(partials: Sequence[tuple]) -> tuple:
    """Combine results computed over disjoint key sets into the result over their union.

    Each partial is ``(out, lse)`` for the same queries; with ``L = logsumexp_p lse_p``::

        out = sum_p exp(lse_p - L) * out_p,     lse = L

    A partial whose rows saw no key (``lse = -inf``) contributes nothing; rows no partial
    saw stay zero with ``lse = -inf``. Differentiable in every ``out_p`` and ``lse_p``.
    """
    if not partials:
        raise ValueError("merge needs at least one (out, lse) partial, got none")
    outs = torch.stack([o.to(torch.promote_types(o.dtype, torch.float32)) for o, _ in partials])
    lses = torch.stack([l.to(outs.dtype) for _, l in partials])
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    w = torch.exp(lses - safe)  # exp(-inf - x) = 0 for empty partials
    out = (w.unsqueeze(-1) * outs).sum(0).to(partials[0][0].dtype)
    return out, total

