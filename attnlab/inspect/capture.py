"""Streaming capture of attention metrics (and optionally maps) from one forward pass.

:func:`capture` runs the model once inside :func:`~attnlab.inspect.hooks.attention_hooks`;
each layer's weights are reduced to metrics as that layer runs and then dropped, so memory
stays at one layer's weights (plus whatever maps ``store`` keeps). Per-(layer, head) results:

* head metrics (one number per layer-head; mean over batch items and valid queries, NaN-aware):
  ``entropy``, ``prev_token``, ``next_token``, ``self_token``, ``distance``, ``special``,
  ``punctuation`` (see :mod:`.metrics` for the formulas);
* position metrics (one vector per layer-head, averaged over the batch): ``received``
  (per key), ``waad`` (per query), ``fai`` (per key);
* ``store=None | "fp16" | ("topk", k)``: the maps themselves, per layer, in float16 or as the
  k largest weights per row (values and key indices).

:func:`head_divergence_map` runs the model twice (full context / a span hidden through a
mask_mod) and gives VHD per layer-head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import metrics as M
from .hooks import Site, attention_hooks, attention_modules
from .interventions import hide_span

HEAD_METRICS = ("entropy", "prev_token", "next_token", "self_token", "distance", "special", "punctuation")
POSITION_METRICS = ("received", "waad", "fai")
DEFAULT_METRICS = HEAD_METRICS + POSITION_METRICS


@dataclass
class TopK:
    """The ``k`` largest weights of each row: ``values`` float16 and key ``indices``, ``(B, H, Lq, k)``."""

    values: Tensor
    indices: Tensor

    def dense(self, Lk: int) -> Tensor:
        """Back to a ``(B, H, Lq, Lk)`` float32 map with zeros outside the kept entries."""
        out = torch.zeros(*self.values.shape[:-1], Lk)
        return out.scatter_(-1, self.indices.long(), self.values.float())


@dataclass
class Capture:
    """Result of :func:`capture`. Arrays are float32 torch tensors indexed ``[layer_i, head_i, ...]``
    where ``layers[layer_i]`` / ``heads[head_i]`` are the model's layer / query-head indices."""

    layers: List[int]
    heads: List[int]
    names: List[str]                     # attention module names, one per captured layer
    kv_group: List[int]                  # per captured layer: query head h uses kv head h // kv_group
    tokens: List[List[str]]              # per batch item (key positions)
    head_metrics: Dict[str, Tensor] = field(default_factory=dict)      # (nL, nH)
    position_metrics: Dict[str, Tensor] = field(default_factory=dict)  # (nL, nH, L)
    maps: Dict[int, Union[Tensor, TopK]] = field(default_factory=dict)  # layer -> (B, nH, Lq, Lk)
    massive: Optional[List[dict]] = None                                # massive activations
    params: Dict[str, object] = field(default_factory=dict)

    def sink_rate(self, position: int = 0, eps: float = 0.3, min_layer: int = 0) -> float:
        """Share of captured layer-heads (layers >= ``min_layer``) for which key ``position`` is a sink
        (mean received attention > ``eps``); see :func:`attnlab.inspect.metrics.sink_rate`."""
        keep = [i for i, l in enumerate(self.layers) if l >= min_layer]
        return M.sink_rate(self.position_metrics["received"][keep], position, eps)

    def sinks(self, eps: float = 0.3) -> List[dict]:
        """Every (layer, head, key) with mean received attention > ``eps``, largest first."""
        r = self.position_metrics["received"]
        hits = (torch.nan_to_num(r, nan=0.0) > eps).nonzero().tolist()
        rows = [{"layer": self.layers[a], "head": self.heads[b], "position": c,
                 "token": self.tokens[0][c] if c < len(self.tokens[0]) else "", "received": float(r[a, b, c])}
                for a, b, c in hits]
        return sorted(rows, key=lambda x: -x["received"])

    def kv_head(self, layer_i: int, head: int) -> int:
        """The key/value head that query head ``head`` of captured layer ``layer_i`` reads."""
        return head // self.kv_group[layer_i]

    def as_dict(self) -> dict:
        """JSON-ready: lists, NaN as None (maps are not included)."""
        def clean(v):
            if isinstance(v, Tensor):
                v = v.tolist()
            if isinstance(v, list):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and math.isnan(v) else v

        return {"layers": self.layers, "heads": self.heads, "names": self.names, "kv_group": self.kv_group,
                "tokens": self.tokens, "head_metrics": {k: clean(v) for k, v in self.head_metrics.items()},
                "position_metrics": {k: clean(v) for k, v in self.position_metrics.items()},
                "massive_activations": self.massive, "params": self.params}


def _prepare_inputs(model, inputs, tokenizer):
    """-> (kwargs for model(**kwargs), input_ids or None, attention_mask or None)."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("capture: text inputs need tokenizer=")
        inputs = tokenizer(inputs, return_tensors="pt", padding=True)
    if isinstance(inputs, Tensor):
        if inputs.dtype in (torch.int32, torch.int64):
            return {"input_ids": inputs if inputs.dim() == 2 else inputs[None]}, inputs, None
        return inputs, None, None  # a plain torch model's input (e.g. AttnlabAttention stacks)
    if hasattr(inputs, "keys"):
        kw = dict(inputs)
        return kw, kw.get("input_ids"), kw.get("attention_mask")
    raise TypeError(f"capture: inputs must be text (with tokenizer=), a BatchEncoding/dict, or a tensor, "
                    f"got {type(inputs).__name__}")


def capture(model, inputs, *, tokenizer=None, layers: Optional[Sequence[int]] = None,
            heads: Optional[Sequence[int]] = None, metrics: Sequence[str] = DEFAULT_METRICS,
            store: Union[None, str, Tuple[str, int]] = None, window: int = 10,
            fai_horizon: Tuple[int, Optional[int]] = (1, None),
            hidden_states: bool = False) -> Capture:
    """Run ``model`` once on ``inputs`` and return per-(layer, head) attention metrics.

    ``inputs``: text (with ``tokenizer``), a tokenizer output / dict of model kwargs, or a
    tensor (token ids, or the input of a plain torch model built from AttnlabAttention).
    ``layers`` / ``heads``: attention-module and query-head indices to capture (default all).
    ``metrics``: names from :data:`HEAD_METRICS` and :data:`POSITION_METRICS`. ``store``: keep
    maps in float16 (``"fp16"``) or the top-k entries per row (``("topk", k)``).
    ``window``: WAAD's W; ``fai_horizon``: FAI's ``(h_lo, h_hi)``. ``hidden_states=True`` also
    records massive activations (transformers models; :func:`metrics.massive_activations`).
    Padded queries (``attention_mask`` 0) are left out of every average.
    """
    bad = [m for m in metrics if m not in DEFAULT_METRICS]
    if bad:
        raise ValueError(f"capture: unknown metrics {bad}; valid: {', '.join(DEFAULT_METRICS)}")
    if store is not None and store != "fp16" and not (isinstance(store, tuple) and len(store) == 2
                                                      and store[0] == "topk" and isinstance(store[1], int)
                                                      and store[1] >= 1):
        raise ValueError(f"capture: store must be None, 'fp16' or ('topk', k) with k >= 1, got {store!r}")
    kwargs, ids, pad = _prepare_inputs(model, inputs, tokenizer)
    mods = attention_modules(model)
    n = len(mods)
    layer_list = list(range(n)) if layers is None else sorted(set(layers))
    if any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n for l in layer_list):
        raise ValueError(f"capture: layers must be indices in [0, {n - 1}], got {list(layers)!r}")
    if heads is not None and (any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads)
                              or len(set(heads)) != len(heads)):
        raise ValueError(f"capture: heads must be distinct ints >= 0, got {list(heads)!r}")

    tokens: List[List[str]] = []
    special = punct = None
    if ids is not None:
        ids2 = ids if ids.dim() == 2 else ids[None]
        if tokenizer is not None:
            tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids2.tolist()]
            special = M.special_token_mask(tokenizer, ids2)
            punct = M.punctuation_mask(tokens)
        else:
            tokens = [[str(t) for t in row] for row in ids2.tolist()]
    for m in ("special", "punctuation"):
        if m in metrics and tokenizer is None:
            raise ValueError(f"capture: metric {m!r} needs tokenizer=")
    valid_q = None if pad is None else pad.bool()

    head_acc: Dict[str, List[Optional[Tensor]]] = {m: [None] * len(layer_list) for m in metrics if m in HEAD_METRICS}
    pos_acc: Dict[str, List[Optional[Tensor]]] = {m: [None] * len(layer_list) for m in metrics
                                                  if m in POSITION_METRICS}
    maps: Dict[int, Union[Tensor, TopK]] = {}
    kv_group = [0] * len(layer_list)
    head_list: List[int] = list(heads) if heads is not None else []
    where = {l: i for i, l in enumerate(layer_list)}

    def hook(site: Site, w: Tensor):
        li = where[site.layer]
        if kv_group[li]:
            raise RuntimeError(f"capture: layer {site.layer} ran twice in one forward pass; capture one call")
        Hq = w.shape[1]
        kv_group[li] = site.kv_group
        if heads is None and not head_list:
            head_list.extend(range(Hq))
        if max(head_list) >= Hq:
            raise ValueError(f"capture: head {max(head_list)} does not exist in layer {site.layer} ({Hq} heads)")
        Lq, Lk = w.shape[2], w.shape[3]
        qmask = valid_q.to(w.device) if valid_q is not None and valid_q.shape[-1] == Lq else None
        per_query = {
            "entropy": M.entropy, "distance": M.attention_distance,
            "prev_token": lambda a, v: M.offset_score(a, v, -1), "next_token": lambda a, v: M.offset_score(a, v, 1),
            "self_token": lambda a, v: M.offset_score(a, v, 0),
            "special": lambda a, v: M.class_attention(a, v, special),
            "punctuation": lambda a, v: M.class_attention(a, v, punct),
        }
        per_pos = {"received": M.received, "waad": lambda a, v: M.waad(a, v, window),
                   "fai": lambda a, v: M.fai(a, v, *fai_horizon)}
        # a few heads at a time: temporaries stay at ~8 MB however long the input
        chunk = max(1, (1 << 21) // (w.shape[0] * Lq * Lk))
        parts: Dict[str, list] = {m: [] for m in (*head_acc, *pos_acc)}
        stored = []
        with torch.no_grad():
            for c0 in range(0, len(head_list), chunk):
                idx = torch.tensor(head_list[c0:c0 + chunk], device=w.device)
                ww = w.detach().index_select(1, idx)
                vis = site.visible.expand(w.shape).index_select(1, idx)
                if qmask is not None:
                    vis = vis & qmask[:, None, :, None]
                for m in head_acc:
                    v = per_query[m](ww, vis)
                    if qmask is not None:
                        v = v.masked_fill(~qmask[:, None, :], float("nan"))
                    parts[m].append(v.transpose(0, 1).reshape(len(idx), -1).nanmean(-1).cpu())
                for m in pos_acc:
                    parts[m].append(per_pos[m](ww, vis).nanmean(0).cpu())
                if store == "fp16":
                    stored.append(ww.to(torch.float16).cpu())
                elif store is not None:
                    top = ww.topk(min(store[1], Lk), dim=-1)
                    stored.append(TopK(top.values.to(torch.float16).cpu(), top.indices.to(torch.int32).cpu()))
        for m in head_acc:
            head_acc[m][li] = torch.cat(parts[m])
        for m in pos_acc:
            pos_acc[m][li] = torch.cat(parts[m])
        if store == "fp16":
            maps[site.layer] = torch.cat(stored, 1)
        elif store is not None:
            maps[site.layer] = TopK(torch.cat([t.values for t in stored], 1), torch.cat([t.indices for t in stored], 1))
        return None

    massive = None
    with torch.no_grad(), attention_hooks(model, hook, layers=layer_list):
        if isinstance(kwargs, dict):
            out = model(**kwargs, output_hidden_states=True) if hidden_states else model(**kwargs)
        else:
            if hidden_states:
                raise ValueError("capture: hidden_states=True needs a transformers model called with keyword inputs")
            out = model(kwargs)
    if hidden_states:
        massive = M.massive_activations(out.hidden_states)
    del out
    missing = [layer_list[i] for i, g in enumerate(kv_group) if not g]
    if missing:
        raise RuntimeError(f"capture: layers {missing} did not run in the forward pass")
    return Capture(
        layers=layer_list, heads=head_list, names=[mods[l][0] for l in layer_list], kv_group=kv_group,
        tokens=tokens,
        head_metrics={m: torch.stack(v) for m, v in head_acc.items()},
        position_metrics={m: torch.stack(v) for m, v in pos_acc.items()},
        maps=maps, massive=massive,
        params={"window": window, "fai_horizon": list(fai_horizon), "store": store},
    )


def waad_fai(cap: Capture, q: float = 0.3) -> Dict[str, Tensor]:
    """WAAD and FAI token curves of Attention Illuminates LLM Reasoning from a :class:`Capture`
    (needs its ``distance``, ``waad`` and ``fai`` metrics): heads are split by mean attention
    distance into the local / global ``q`` shares (:func:`metrics.head_groups`); WAAD is averaged
    over the local heads, FAI over the global ones. Returns ``{"waad": (Lq,), "fai": (Lk,),
    "local": (nL, nH) bool, "global": (nL, nH) bool}``."""
    for m in ("distance",):
        if m not in cap.head_metrics:
            raise ValueError(f"waad_fai: the capture lacks the {m!r} metric")
    for m in ("waad", "fai"):
        if m not in cap.position_metrics:
            raise ValueError(f"waad_fai: the capture lacks the {m!r} metric")
    local, glob = M.head_groups(cap.head_metrics["distance"], q)
    return {"waad": M.group_average(cap.position_metrics["waad"], local),
            "fai": M.group_average(cap.position_metrics["fai"], glob), "local": local, "global": glob}


def head_divergence_map(model, inputs, span: Tuple[int, int], *, tokenizer=None,
                        layers: Optional[Sequence[int]] = None, distance: str = "l2",
                        queries: Optional[Tuple[int, int]] = None) -> Tensor:
    """VHD-style head sensitivity to a part of the context, ``(nL, Hq)``.

    He et al. (ACL 2025) define a head's vision-aware divergence as ``d(A_lh(x_V, x_T),
    A_lh(x_T))``: its output with and without the visual context. Here the removed context
    is the key span ``span = (start, end)``: pass 1 runs the full input and keeps every
    captured head's output ``o = w v``; pass 2 hides the span from every query
    (:func:`interventions.hide_span` as mask_mod) and compares outputs per query with
    :func:`metrics.head_divergence` (``"l2"`` or ``"cosine"``). Returned values are the mean
    over the queries in ``queries`` (default: those after the span, ``pos >= end``).
    """
    start, end = span
    kwargs, ids, pad = _prepare_inputs(model, inputs, tokenizer)
    n = len(attention_modules(model))
    layer_list = list(range(n)) if layers is None else sorted(set(layers))
    full: Dict[int, Tensor] = {}
    div: Dict[int, Tensor] = {}

    def keep(site: Site, w: Tensor):
        full[site.layer] = M.head_outputs(w, site.value).detach()

    def compare(site: Site, w: Tensor):
        o = M.head_outputs(w, site.value).detach()
        d = M.head_divergence(full.pop(site.layer), o, distance)          # (B, H, Lq)
        Lq, Lk = w.shape[2], w.shape[3]
        pos = M.query_positions(Lq, Lk, w.device)
        lo, hi = queries if queries is not None else (end, Lk)
        sel = (pos >= lo) & (pos < hi)
        if not bool(sel.any()):
            raise ValueError(f"head_divergence_map: no query position in [{lo}, {hi})")
        div[site.layer] = d[..., sel].mean(dim=(0, 2)).cpu()

    def run(hook):
        with torch.no_grad(), attention_hooks(model, hook, layers=layer_list):
            model(**kwargs) if isinstance(kwargs, dict) else model(kwargs)

    run(keep)
    # the span is hidden in every layer, the comparison hooks only the captured ones
    with attention_hooks(model, mask_mod=hide_span(start, end)):
        run(compare)
    return torch.stack([div[l] for l in layer_list])
