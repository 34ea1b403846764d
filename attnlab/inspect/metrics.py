"""Attention metrics: pure functions of post-softmax weights and the visibility mask.

Shapes and conventions used throughout:

* ``w``: weights ``(B, H, Lq, Lk)``; ``visible``: bool, broadcastable to ``w`` (True where the
  query may see the key). A row with no visible key is *empty*.
* Query ``i`` sits at absolute position ``pos(i) = i + Lk - Lq`` (bottom-right alignment, as in
  :mod:`attnlab.reference`); key ``j`` at position ``j``.
* Per-query metrics return ``(B, H, Lq)``, per-key metrics ``(B, H, Lk)``; a value that is not
  defined (an empty row, a key no query can see, ...) is NaN, so that averages over queries,
  layers or batches are ``nanmean`` and undefined entries never bias them.

Formulas (``n_i = #{j : visible_ij}``, ``d_ij = |pos(i) - j|``):

====================  ===================================================================
entropy               ``E_i = -sum_j w_ij log w_ij / log n_i`` in [0, 1] (NaN if n_i < 2)
received              ``r_j = sum_i [visible_ij] w_ij / #{i : visible_ij}`` (mean received
                      attention over the queries that can see key j)
class_attention       ``a_i = sum_{j in C} w_ij`` for a key class C (special tokens, punct.)
offset_score          ``o_i = w_{i, pos(i)+k}``: previous-token (k=-1), self (0), next (+1)
attention_distance    ``D_i = sum_j w_ij d_ij``
waad                  ``WAAD_i = sum_j w_ij min(d_ij, W)`` (Attention Illuminates LLM Reasoning,
                      Def. 4.1; W = 10 there)
fai                   ``FAI_j = mean_{i in T(j)} w_ij``, ``T(j) = {i non-empty : j + h_lo <=
                      pos(i) <= j + h_hi}`` (Def. 4.2; the paper's horizon runs to the end)
====================  ===================================================================

Head- and model-level summaries: :func:`sink_rate` (StreamingLLM / attention-sink survey: a
key is a sink for a layer-head when its mean received attention exceeds eps = 0.3),
:func:`act_sinks` (ACT), :func:`head_groups` / :func:`group_average` (WAAD/FAI head sets),
:func:`massive_activations` (Sun et al.), :func:`head_divergence` (VHD).
"""
from __future__ import annotations

import math
import unicodedata
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _check(w: Tensor, visible: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 4 or not w.is_floating_point():
        raise TypeError(f"w must be a floating (B, H, Lq, Lk) tensor, got "
                        f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if not isinstance(visible, Tensor) or visible.dtype != torch.bool:
        raise TypeError(f"visible must be a bool tensor, got {getattr(visible, 'dtype', type(visible).__name__)}")
    try:
        return visible.expand_as(w)
    except RuntimeError:
        raise ValueError(f"visible of shape {tuple(visible.shape)} does not broadcast to w {tuple(w.shape)}") from None


def query_positions(Lq: int, Lk: int, device=None) -> Tensor:
    """``pos(i) = i + Lk - Lq``: absolute position of each query (bottom-right alignment)."""
    return torch.arange(Lq, device=device) + (Lk - Lq)


def distances(Lq: int, Lk: int, device=None) -> Tensor:
    """``d_ij = |pos(i) - j|`` as a float ``(Lq, Lk)`` tensor."""
    return (query_positions(Lq, Lk, device)[:, None] - torch.arange(Lk, device=device)[None, :]).abs().float()


def _rows(vis: Tensor) -> Tensor:
    """Non-empty rows ``(B, H, Lq)``."""
    return vis.any(-1)


def _nan_where(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, torch.full((), NAN, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# per-query / per-key metrics
# ---------------------------------------------------------------------------------------------
def entropy(w: Tensor, visible: Tensor) -> Tensor:
    """Normalized entropy ``-sum_j w_ij log w_ij / log n_i`` per query ``(B, H, Lq)``.

    ``n_i`` is the number of keys query ``i`` can see; 1 means uniform over them, 0 one-hot.
    NaN for rows with fewer than two visible keys (the normalization is undefined there).
    """
    vis = _check(w, visible)
    p = w.float() * vis
    h = -(torch.special.xlogy(p, p)).sum(-1)
    n = vis.sum(-1)
    return _nan_where(h / torch.log(n.clamp(min=2).float()), n >= 2)


def received(w: Tensor, visible: Tensor) -> Tensor:
    """Mean attention received per key ``r_j = sum_i [vis_ij] w_ij / #{i : vis_ij}`` ``(B, H, Lk)``.

    The average is over the queries that can see key ``j`` (so a causal model's late keys are
    not penalized for being seen by fewer queries); NaN for a key no query can see. This is
    the sink score of StreamingLLM / the attention-sink survey and ACT's column statistic.
    """
    vis = _check(w, visible)
    num = (w.float() * vis).sum(-2)
    cnt = vis.sum(-2)
    return _nan_where(num / cnt.clamp(min=1), cnt > 0)


def class_attention(w: Tensor, visible: Tensor, key_class: Tensor) -> Tensor:
    """Attention each query gives to a class of keys ``a_i = sum_{j in C} w_ij`` ``(B, H, Lq)``.

    ``key_class`` is a bool ``(B or 1, Lk)`` mask of the class (e.g. :func:`special_token_mask`,
    :func:`punctuation_mask`). NaN for empty rows.
    """
    vis = _check(w, visible)
    if not isinstance(key_class, Tensor) or key_class.dtype != torch.bool or key_class.dim() != 2:
        raise TypeError("key_class must be a bool (B or 1, Lk) tensor")
    c = key_class.to(w.device)[:, None, None, :]
    return _nan_where((w.float() * (vis & c)).sum(-1), _rows(vis))


def offset_score(w: Tensor, visible: Tensor, offset: int) -> Tensor:
    """Weight on the key at relative position ``offset``: ``w_{i, pos(i)+offset}`` ``(B, H, Lq)``.

    ``offset=-1`` is the previous-token score, ``0`` the self score, ``+1`` the next-token
    score (always 0 in a causal model). NaN where that key does not exist or the row is empty.
    """
    vis = _check(w, visible)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {offset!r}")
    B, H, Lq, Lk = w.shape
    tgt = query_positions(Lq, Lk, w.device) + offset
    ok = (tgt >= 0) & (tgt < Lk)
    idx = tgt.clamp(0, Lk - 1).view(1, 1, Lq, 1).expand(B, H, Lq, 1)
    val = w.float().gather(-1, idx).squeeze(-1)
    return _nan_where(val, ok.view(1, 1, Lq) & _rows(vis))


def attention_distance(w: Tensor, visible: Tensor) -> Tensor:
    """Average attention distance ``D_i = sum_j w_ij |pos(i) - j|`` ``(B, H, Lq)``; NaN for empty rows.

    Averaged over queries this is the head's mean look-back distance ``d(l, h)`` of Attention
    Illuminates LLM Reasoning (Eq. 7), which sorts heads into local and global ones.
    """
    vis = _check(w, visible)
    d = distances(w.shape[2], w.shape[3], w.device)
    return _nan_where((w.float() * vis * d).sum(-1), _rows(vis))


def waad(w: Tensor, visible: Tensor, window: int = 10) -> Tensor:
    """Windowed average attention distance ``sum_j w_ij min(|pos(i) - j|, W)`` ``(B, H, Lq)``.

    Attention Illuminates LLM Reasoning (Li et al., 2025), Def. 4.1, with ``W = window``
    (10 in the paper). The paper applies it to the mean map of the local-focused heads; the
    formula is linear in ``w``, so :func:`group_average` of per-head values gives exactly that.
    """
    vis = _check(w, visible)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    d = distances(w.shape[2], w.shape[3], w.device).clamp(max=window)
    return _nan_where((w.float() * vis * d).sum(-1), _rows(vis))


def fai(w: Tensor, visible: Tensor, h_lo: int = 1, h_hi: Optional[int] = None) -> Tensor:
    """Future attention influence ``FAI_j = mean_{i in T(j)} w_ij`` per key ``(B, H, Lk)``.

    ``T(j) = {i : row i non-empty, j + h_lo <= pos(i) <= j + h_hi}`` (``h_hi=None``: to the end,
    the paper's setting). Attention Illuminates LLM Reasoning, Def. 4.2; applied there to the
    mean map of the global-focused heads (linear, see :func:`waad`). NaN where ``T(j)`` is empty.
    """
    vis = _check(w, visible)
    if isinstance(h_lo, bool) or not isinstance(h_lo, int) or h_lo < 0:
        raise ValueError(f"h_lo must be an int >= 0, got {h_lo!r}")
    if h_hi is not None and (isinstance(h_hi, bool) or not isinstance(h_hi, int) or h_hi < h_lo):
        raise ValueError(f"h_hi must be None or an int >= h_lo={h_lo}, got {h_hi!r}")
    Lq, Lk = w.shape[2], w.shape[3]
    rel = query_positions(Lq, Lk, w.device)[:, None] - torch.arange(Lk, device=w.device)[None, :]
    inside = rel >= h_lo
    if h_hi is not None:
        inside = inside & (rel <= h_hi)
    sel = inside & _rows(vis)[..., None]                      # (B, H, Lq, Lk)
    cnt = sel.sum(-2)
    return _nan_where((w.float() * sel).sum(-2) / cnt.clamp(min=1), cnt > 0)


# ---------------------------------------------------------------------------------------------
# sinks
# ---------------------------------------------------------------------------------------------
def sink_rate(received_: Tensor, position: int = 0, eps: float = 0.3) -> float:
    """Share of layer-head pairs for which key ``position`` is a sink.

    ``received_`` is ``(..., Lk)`` of :func:`received` values, one row per (layer, head) (e.g.
    ``(L, H, Lk)``, batch already averaged). A key is a sink for a layer-head when its mean
    received attention over the queries that can see it exceeds ``eps`` (0.3, as in the
    attention-sink survey following StreamingLLM). Pairs where the key is not visible (NaN)
    are left out; NaN when none is left.
    """
    if not isinstance(received_, Tensor) or received_.dim() < 1:
        raise TypeError("received_ must be a tensor (..., Lk) of received-attention values")
    Lk = received_.shape[-1]
    if isinstance(position, bool) or not isinstance(position, int) or not -Lk <= position < Lk:
        raise ValueError(f"position must be an int in [{-Lk}, {Lk - 1}], got {position!r}")
    col = received_[..., position].reshape(-1)
    col = col[~torch.isnan(col)]
    return float((col > eps).float().mean()) if col.numel() else NAN


def act_sinks(received_: Tensor, threshold: float = 0.1, exclude: Sequence[int] = (0,)) -> Tensor:
    """ACT's attention sinks: keys whose mean received attention exceeds ``threshold``.

    Yu et al., "Unveiling and Harnessing Hidden Attention Sinks" (ICML 2024, ACT): per head,
    the column sum of the attention map divided by the number of queries that see the key
    (:func:`received`) is compared with a threshold (0.1 in the official code); the initial
    token is excluded (it is kept as the useful sink; ACT calibrates the others). Returns a
    bool tensor shaped like ``received_``.
    """
    out = torch.nan_to_num(received_, nan=0.0) > threshold
    for j in exclude:
        out[..., j] = False
    return out


# ---------------------------------------------------------------------------------------------
# head groups (WAAD / FAI)
# ---------------------------------------------------------------------------------------------
def head_groups(distance: Tensor, q: float = 0.3) -> Tuple[Tensor, Tensor]:
    """Local- and global-focused heads: the ``q`` share of (layer, head) pairs with the smallest
    and the largest mean attention distance (Attention Illuminates LLM Reasoning, Sec. 4.1,
    bottom/top 30%). ``distance`` is ``(L, H)``; returns two bool ``(L, H)`` masks. NaN heads
    are in neither group.
    """
    if not 0 < q <= 0.5:
        raise ValueError(f"q must be in (0, 0.5], got {q!r}")
    flat = distance.reshape(-1).float()
    ok = ~torch.isnan(flat)
    n = int(ok.sum())
    k = max(1, int(round(q * n))) if n else 0
    order = torch.argsort(torch.where(ok, flat, torch.full_like(flat, math.inf)))
    local = torch.zeros_like(ok)
    glob = torch.zeros_like(ok)
    local[order[:k]] = True
    glob[order[:n][n - k:]] = True
    return local.view(distance.shape), glob.view(distance.shape)


def group_average(values: Tensor, group: Tensor) -> Tensor:
    """``mean over (l, h) in group of values[l, h]``: ``values (L, H, X)``, ``group (L, H)`` -> ``(X,)``.

    For metrics linear in the attention map (:func:`waad`, :func:`fai`) this equals the metric
    of the group's mean map, the paper's ``A_loc`` / ``A_glob``.
    """
    if group.shape != values.shape[:2]:
        raise ValueError(f"group {tuple(group.shape)} must match values' (L, H) {tuple(values.shape[:2])}")
    return values[group].nanmean(0)


# ---------------------------------------------------------------------------------------------
# token classes
# ---------------------------------------------------------------------------------------------
def special_token_mask(tokenizer, input_ids: Tensor) -> Tensor:
    """Bool ``(B, L)``: True where the id is one of the tokenizer's special tokens ([CLS], <s>, ...)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    return torch.tensor([[int(t) in special for t in row] for row in ids.tolist()], dtype=torch.bool)


_MARKERS = ("Ġ", "▁", "##", "Ċ")


def is_punctuation(token: str) -> bool:
    """True when the token, stripped of word-piece markers (Ġ ▁ ## Ċ) and spaces, is non-empty and
    made only of Unicode punctuation characters (categories P*)."""
    t = token
    for m in _MARKERS:
        t = t.replace(m, "")
    t = t.strip()
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)


def punctuation_mask(tokens: Sequence[Sequence[str]]) -> Tensor:
    """Bool ``(B, L)`` from token strings (:func:`is_punctuation`)."""
    return torch.tensor([[is_punctuation(t) for t in row] for row in tokens], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# hidden states and head outputs
# ---------------------------------------------------------------------------------------------
def massive_activations(hidden_states: Sequence[Tensor], threshold: float = 100.0,
                        ratio: float = 1000.0) -> List[dict]:
    """Massive activations (Sun et al., 2024): entries ``h[b, t, c]`` of a layer's hidden state with
    ``|h| > threshold`` (100) and ``|h| > ratio * median(|h|)`` (1000x the median magnitude of
    that layer's hidden state). ``hidden_states`` is the model's ``output_hidden_states`` tuple
    (embeddings first). Returns records ``{layer, batch, token, dim, value, median}`` sorted by
    magnitude, largest first.
    """
    out = []
    for layer, h in enumerate(hidden_states):
        a = h.detach().float().abs()
        med = float(a.median())
        hit = (a > threshold) & (a > ratio * med)
        for b, t, c in hit.nonzero().tolist():
            out.append({"layer": layer, "batch": b, "token": t, "dim": c, "value": float(h[b, t, c]),
                        "median": med})
    return sorted(out, key=lambda r: -abs(r["value"]))


def head_outputs(w: Tensor, value: Tensor) -> Tensor:
    """Per-head attention outputs ``o_i = sum_j w_ij v_j`` ``(B, H, Lq, Dv)`` (GQA value heads expanded)."""
    from ..reference import expand_kv

    return torch.matmul(w.float(), expand_kv(value, w.shape[1]).float())


def head_divergence(out_a: Tensor, out_b: Tensor, distance: str = "l2") -> Tensor:
    """Divergence of two head outputs ``(..., D) -> (...)``: ``||a - b||_2`` (``"l2"``, default) or
    ``1 - cos(a, b)`` (``"cosine"``). VHD (He et al., 2025) is this divergence between a head's
    output with the full context and with part of the context removed.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"head outputs must have the same shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if distance == "l2":
        return (out_a.float() - out_b.float()).norm(dim=-1)
    if distance == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(out_a.float(), out_b.float(), dim=-1)
    raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
