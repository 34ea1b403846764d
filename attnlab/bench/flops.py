"""Effective work: the number of unmasked query-key pairs, and FLOPs counted by that area.

Counting follows CAB / LongCA-bench ("effective FLOPs by area"): only visible pairs count, so
a sparse mechanism is not credited for work it skips, nor charged for tiles it computes and
masks. Per visible pair the forward does one ``q.k`` dot product and one ``p*v`` accumulation::

    FLOPs_fwd    = 2 * (D + Dv) * pairs          (= 4 * D * pairs when Dv = D)
    FLOPs_fwdbwd = 3.5 * FLOPs_fwd               (backward = 2.5x forward, FlashAttention's count)

Entries that are not masked softmax attention (the linear / recurrent family) declare their own
count: ``m.flops(call)`` gives the forward FLOPs the mechanism actually needs (e.g. the state
updates and reads of a chunked linear attention), and ``FLOPs_fwdbwd`` is 3.5x that as above; no
pair count is recorded for them.

``pairs`` is exact: it is the :class:`~attnlab.patterns.blocks.BlockStructure` pair count of
the call's full mask (pattern and causality, :func:`attnlab.patterns.executor.plan`), the same
structure the block-sparse kernels visit, scaled from its leading ``(Bm, Hm)`` dims (1 where the
mask ignores batch / head) to every batch element and query head. A call without a mask counts
``B * Hq * Lq * Lk`` pairs.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..catalogue import Call
from ..patterns import executor as ex

BACKWARD_FACTOR = 2.5


def unmasked_pairs(call: Call) -> int:
    """Visible (query, key) pairs of a call, summed over batch and query heads."""
    mask, _ = ex.plan(call)
    if mask is None:
        return call.batch * call.q_heads * call.q_len * call.kv_len
    st, _ = ex._structure(call, mask, ex.geometry(call, tiled_order=True))
    bm, hm = st.any.shape[:2]
    return st.pairs * (call.batch // bm) * (call.q_heads // hm)


def effective_flops(call: Call, direction: str, pairs: int) -> float:
    fwd = 2.0 * (call.head_dim + call.value_dim) * pairs
    return fwd * (1.0 + BACKWARD_FACTOR) if direction == "fwdbwd" else fwd


def bytes_moved(call: Call, direction: str) -> int:
    """The fewest bytes a call must move between memory and the cores (the roofline's denominator): the
    forward reads ``q, k, v`` and writes the output; forward and backward, 3x that (the backward reads
    ``q, k, v``, the output and its gradient, and writes ``dq, dk, dv``). An entry with one query per head
    (``extras["shared_query"]``, Aaren) reads one row of ``q``. Tensor parameters (gates, agents) and any
    state are left out: they are small beside ``q, k, v`` for every catalogue entry."""
    q_rows = 1 if call.mechanism.extras.get("shared_query") else call.q_len
    elems = call.batch * (call.q_heads * (q_rows * call.head_dim + call.q_len * call.value_dim)
                          + call.kv_heads * call.kv_len * (call.head_dim + call.value_dim))
    return elems * call.dtype.itemsize * (3 if direction == "fwdbwd" else 1)


def own_count(call: Call):
    """The mechanism's own forward-FLOP function (``m.flops``), or None: count by area."""
    return call.mechanism.flops


def count(call: Call, direction: str) -> Tuple[float, Optional[int]]:
    """``(effective FLOPs, unmasked pairs)`` of a call: by area, or by the mechanism's own count
    (pairs None) when it declares one."""
    own = own_count(call)
    if own is not None:
        fwd = float(own(call))
        return (fwd * (1.0 + BACKWARD_FACTOR) if direction == "fwdbwd" else fwd), None
    pairs = unmasked_pairs(call)
    return effective_flops(call, direction, pairs), pairs
