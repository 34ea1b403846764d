"""Interventions on attention weights: reversible, composable hooks for :func:`attention_hooks`.

Each intervention is an object that is a :data:`~attnlab.inspect.hooks.Hook` (``site, w ->
new w``) restricted to chosen heads, and ``intervention.apply(model)`` is a context manager that
switches it on (through :func:`attention_hooks`) and off again; leaving the context restores
the model exactly. Interventions compose by nesting (``with a.apply(m), b.apply(m):``) or with
:func:`apply`; the composition order is the entry order: the outer (first) intervention's hook
sees the model's weights, the next one sees its result, and so on.

``heads`` selects where an intervention acts: ``None`` (every head of every layer), a dict
``{layer: [heads] | None}`` (None: all heads of that layer), or a list of ``(layer, head)``
pairs. Below, ``w`` is one query row of a selected head and ``V`` its visible keys.

===========================  ==================================================  ===========
intervention                 new row                                             row sum
===========================  ==================================================  ===========
HeadAblation("zero")         ``w' = 0`` (the head's output is zero)              0
HeadAblation("mean")         ``w'_i = mean of the rows w_i' of the queries i'    kept
                             at positions query i can see``: the output
                             becomes the head's mean output over the visible
                             context (mean ablation; no look-ahead in causal
                             models)
SinkCalibration (ACT)        sinks S (ACT detection, or given): ``w'_S = beta    kept
                             w_S``; the removed ``(1-beta) sum_S w`` goes to
                             the other visible keys in proportion to ``w``
InitialTokenScaling          ``w'_j = s_j w_j / sum_k s_k w_k`` with ``s_0 =     kept
(ZeroTuning)                 gamma``, 1 elsewhere
SinkRedistribution (VAR)     on rows whose attention to the region R is >=       kept
                             ``summ`` and whose sink share of it is <= ``rho``:
                             ``w'_S = p w_S``; ``(1-p) sum_S w`` goes to
                             ``R \\ S`` in proportion to ``w``
IdentityInterpolation        ``w' = (1-alpha) w + alpha e_self`` (e_self: one-   kept when
(SoftPAG)                    hot on the query's own position)                    self visible
===========================  ==================================================  ===========

Mask modifiers (:data:`~attnlab.inspect.hooks.MaskMod`) for the same entry point:
:func:`window_mask` (sliding window plus sink tokens, StreamingLLM) and :func:`hide_span`.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import metrics as M
from .hooks import Site, attention_hooks

HeadSpec = Union[None, Dict[int, Optional[Iterable[int]]], Iterable[Tuple[int, int]]]


def _parse_heads(heads: HeadSpec) -> Optional[Dict[int, Optional[frozenset]]]:
    if heads is None:
        return None
    out: Dict[int, Optional[set]] = {}
    if isinstance(heads, dict):
        items = heads.items()
    else:
        try:
            pairs = [tuple(p) for p in heads]
        except TypeError:
            raise TypeError(f"heads must be None, a dict {{layer: heads}} or a list of (layer, head) pairs, "
                            f"got {type(heads).__name__}") from None
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"heads as a list must hold (layer, head) pairs, got {pairs!r}")
        items = [(l, [h]) for l, h in pairs]
    for layer, hs in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"heads: layer must be an int >= 0, got {layer!r}")
        if hs is None:
            out[layer] = None
            continue
        hs = [hs] if isinstance(hs, int) else list(hs)
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ValueError(f"heads: head index must be an int >= 0, got {h!r} (layer {layer})")
        if layer in out and out[layer] is None:
            continue
        out[layer] = set(out.get(layer) or ()) | set(hs)
    return {l: (None if hs is None else frozenset(hs)) for l, hs in out.items()}


def _frac(name: str, value, lo: float = 0.0, hi: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Intervention:
    """Base: a hook acting on selected heads. Subclasses implement ``edit(site, w, visible)``,
    which gets the selected heads' weights ``(B, h, Lq, Lk)`` and their visibility and returns
    new weights for them."""

    def __init__(self, heads: HeadSpec = None):
        self.heads = _parse_heads(heads)

    @property
    def layers(self) -> Optional[list]:
        return None if self.heads is None else sorted(self.heads)

    def _head_index(self, site: Site) -> Optional[Tensor]:
        Hq = site.query.shape[1]
        if self.heads is None or self.heads.get(site.layer) is None:
            return None
        hs = sorted(self.heads[site.layer])
        if hs[-1] >= Hq:
            raise ValueError(f"{type(self).__name__}: head {hs[-1]} does not exist in layer {site.layer} "
                             f"({Hq} query heads)")
        return torch.tensor(hs, device=site.query.device)

    def __call__(self, site: Site, w: Tensor) -> Optional[Tensor]:
        if self.heads is not None and site.layer not in self.heads:
            return None
        idx = self._head_index(site)
        vis = site.visible.expand(w.shape)
        if idx is None:
            return self.edit(site, w, vis)
        out = w.clone()
        out[:, idx] = self.edit(site, w[:, idx], vis[:, idx])
        return out

    def edit(self, site: Site, w: Tensor, visible: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model):
        """Context manager: the intervention is active inside, the model unchanged after."""
        return attention_hooks(model, self, layers=self.layers)


@contextmanager
def apply(model, *interventions: Intervention):
    """Activate several interventions, composed in the order given (the first sees the model's weights)."""
    with ExitStack() as stack:
        for it in interventions:
            if not isinstance(it, Intervention):
                raise TypeError(f"apply: expected Intervention objects, got {type(it).__name__}")
            stack.enter_context(it.apply(model))
        yield


def _redistribute(w: Tensor, take: Tensor, keep_frac: float, to: Tensor) -> Tensor:
    """Scale the ``take`` keys by ``keep_frac`` and give the removed mass to the ``to`` keys in
    proportion to their weights; rows whose ``to`` keys carry no weight are left unchanged."""
    taken = (w * take).sum(-1, keepdim=True) * (1 - keep_frac)
    recv = w * to
    denom = recv.sum(-1, keepdim=True)
    ok = denom > 0
    new = torch.where(take, w * keep_frac, w) + taken * recv / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, new, w)


# ---------------------------------------------------------------------------------------------
class HeadAblation(Intervention):
    """Zero (``mode="zero"``) or mean-ablate (``mode="mean"``) the chosen heads.

    Mean ablation replaces row ``i`` by the mean of the non-empty rows ``i'`` whose query position
    ``pos(i')`` query ``i`` can see (``visible[i, pos(i')]``), so the head's output at ``i``
    becomes its mean output over that context: ``sum_j (mean_i' w_i'j) v_j = mean_i' o_i'``.
    In a bidirectional model that is the mean over the whole sequence; in a causal model the
    mean over the prefix (nothing from later positions leaks in).
    """

    def __init__(self, heads: HeadSpec, mode: str = "zero"):
        super().__init__(heads)
        if mode not in ("zero", "mean"):
            raise ValueError(f"HeadAblation: mode must be 'zero' or 'mean', got {mode!r}")
        self.mode = mode

    def edit(self, site, w, visible):
        if self.mode == "zero":
            return torch.zeros_like(w)
        Lq, Lk = w.shape[-2:]
        pos = M.query_positions(Lq, Lk, w.device)
        if int(pos.min()) < 0:
            raise ValueError(f"HeadAblation('mean') needs Lq <= Lk, got Lq={Lq}, Lk={Lk}")
        ctx = visible[..., pos] & visible.any(-1)[..., None, :]        # (B, h, Lq, Lq): i sees query i'
        n = ctx.sum(-1, keepdim=True)
        mean = torch.matmul(ctx.to(w.dtype), w) / n.clamp(min=1)
        return torch.where(n > 0, mean, w)


class SinkCalibration(Intervention):
    """ACT (Yu et al., ICML 2024): scale attention to sink keys by ``beta`` and give the removed mass
    to the other visible keys in proportion to their weights.

    Sinks per (batch, head): ``sinks`` positions if given, else ACT's detection
    (:func:`attnlab.inspect.metrics.act_sinks`: mean received attention > ``threshold``,
    initial token excluded). Defaults ``beta=0.4``, ``threshold=0.1`` are the official code's.
    """

    def __init__(self, heads: HeadSpec = None, beta: float = 0.4, threshold: float = 0.1,
                 sinks: Optional[Sequence[int]] = None):
        super().__init__(heads)
        self.beta = _frac("SinkCalibration: beta", beta)
        self.threshold = _frac("SinkCalibration: threshold", threshold)
        self.sinks = None if sinks is None else [int(s) for s in sinks]

    def edit(self, site, w, visible):
        Lk = w.shape[-1]
        if self.sinks is None:
            s = M.act_sinks(M.received(w, visible), self.threshold)[:, :, None, :]  # (B, h, 1, Lk)
        else:
            s = torch.zeros(Lk, dtype=torch.bool, device=w.device)
            s[[j for j in self.sinks if -Lk <= j < Lk]] = True
        take = s & visible
        return _redistribute(w, take, self.beta, visible & ~take)


class InitialTokenScaling(Intervention):
    """ZeroTuning (Han et al., 2025): multiply the attention to the initial token (``position``) by
    ``gamma`` and renormalize each row: ``w'_j = s_j w_j / sum_k s_k w_k``, ``s_position = gamma``."""

    def __init__(self, gamma: float, heads: HeadSpec = None, position: int = 0):
        super().__init__(heads)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"InitialTokenScaling: gamma must be a number >= 0, got {gamma!r}")
        self.gamma, self.position = float(gamma), int(position)

    def edit(self, site, w, visible):
        scale = torch.ones(w.shape[-1], dtype=w.dtype, device=w.device)
        scale[self.position] = self.gamma
        new = w * scale
        z = new.sum(-1, keepdim=True)
        return torch.where(z > 0, new / torch.where(z > 0, z, torch.ones_like(z)), w)


class SinkRedistribution(Intervention):
    """VAR (Kang et al., ICLR 2025): keep a fraction ``p`` of the attention to the sink keys and give
    the rest to the non-sink keys of a region ``R`` (the image tokens there; default: every
    key) in proportion to their weights. Only rows that attend to ``R`` with total weight
    ``>= summ`` and whose sink share within ``R`` is ``<= rho`` are changed (the paper's
    selection of image-centric heads, per query). Defaults ``p=0.6, rho=0.5, summ=0.2``.
    """

    def __init__(self, sinks: Sequence[int] = (0,), p: float = 0.6, heads: HeadSpec = None,
                 region: Optional[Tuple[int, int]] = None, rho: float = 0.5, summ: float = 0.2):
        super().__init__(heads)
        self.sinks = [int(s) for s in sinks]
        self.p = _frac("SinkRedistribution: p", p)
        self.rho = _frac("SinkRedistribution: rho", rho)
        self.summ = _frac("SinkRedistribution: summ", summ)
        if region is not None and (len(region) != 2 or not 0 <= region[0] < region[1]):
            raise ValueError(f"SinkRedistribution: region must be (start, end) with 0 <= start < end, got {region!r}")
        self.region = region

    def edit(self, site, w, visible):
        Lk = w.shape[-1]
        s = torch.zeros(Lk, dtype=torch.bool, device=w.device)
        s[[j for j in self.sinks if -Lk <= j < Lk]] = True
        r = torch.zeros(Lk, dtype=torch.bool, device=w.device)
        if self.region is None:
            r[:] = True
        else:
            r[self.region[0]:self.region[1]] = True
        region_mass = (w * r).sum(-1, keepdim=True)
        sink_share = (w * (r & s)).sum(-1, keepdim=True) / region_mass.clamp(min=1e-30)
        rows = (region_mass >= self.summ) & (sink_share <= self.rho)
        new = _redistribute(w, s & visible, self.p, visible & r & ~s)
        return torch.where(rows, new, w)


class IdentityInterpolation(Intervention):
    """SoftPAG (HeadHunter, 2025): ``w' = (1 - alpha) w + alpha I`` for the chosen heads, ``I`` the
    identity map (query ``i`` on its own position ``i + Lk - Lq``); ``alpha = 1`` is PAG's
    identity attention."""

    def __init__(self, alpha: float, heads: HeadSpec = None):
        super().__init__(heads)
        self.alpha = _frac("IdentityInterpolation: alpha", alpha)

    def edit(self, site, w, visible):
        Lq, Lk = w.shape[-2:]
        eye = (M.query_positions(Lq, Lk, w.device)[:, None] == torch.arange(Lk, device=w.device)).to(w.dtype)
        return (1 - self.alpha) * w + self.alpha * eye


# ---------------------------------------------------------------------------------------------
# mask modifiers
# ---------------------------------------------------------------------------------------------
def window_mask(window: int, sinks: int = 0):
    """MaskMod: keep only keys within ``window`` positions back (``0 <= pos(i) - j < window``) plus
    the first ``sinks`` keys (StreamingLLM's window + attention sinks), intersected with the
    model's own mask."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window_mask: window must be an int >= 1, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"window_mask: sinks must be an int >= 0, got {sinks!r}")

    def mask_mod(site: Site) -> Tensor:
        _, _, Lq, Lk = site.shape
        rel = M.query_positions(Lq, Lk, site.query.device)[:, None] - torch.arange(Lk, device=site.query.device)
        keep = ((rel >= 0) & (rel < window)) | (torch.arange(Lk, device=site.query.device) < sinks)
        return site.visible & keep

    return mask_mod


def hide_span(start: int, end: int):
    """MaskMod: hide keys ``start <= j < end`` from every query (for VHD's context ablation)."""
    if isinstance(start, bool) or not isinstance(start, int) or isinstance(end, bool) or not isinstance(end, int) \
            or not 0 <= start < end:
        raise ValueError(f"hide_span: need ints 0 <= start < end, got start={start!r}, end={end!r}")

    def mask_mod(site: Site) -> Tensor:
        j = torch.arange(site.shape[-1], device=site.query.device)
        return site.visible & ~((j >= start) & (j < end))

    return mask_mod
