"""One hook point for every attention call: :func:`attention_hooks`.

Inside ``with attention_hooks(model, hook1, hook2, mask_mod=..., layers=...)`` every attention
call of ``model`` (a Hugging Face transformers model, or any torch model built from
:class:`AttnlabAttention`) is computed by attnlab, with materialized weights::

    visible = mask_mod(site)                 # optional; default: the model's own mask
    s_ij    = scaling * <q_i, k_j> (+ bias_ij)   float32 (float64 for a float64 model); GQA: query
                                             head h uses kv head h // kv_group
    p_ij    = exp(s_ij - lse_i) where visible_ij, else 0;   lse_i = log sum_{j visible} exp(s_ij)
    p       = hook_n(site, ... hook_2(site, hook_1(site, p)) ...)     (a hook returning None keeps p)
    o_i     = sum_j p_ij v_j

A row that sees no key gets zero weights and a zero output (never NaN), as in
:func:`attnlab.reference.attention`, whose formula this is. With no hook returning weights,
the model's outputs equal the unhooked model's (float32 round-off, ~1e-6).

How the model is switched (and switched back on exit, also on error):

* transformers models that support attention backends (``_supports_attention_backend``): an
  ``"attnlab"`` entry is registered in transformers' ``AttentionInterface`` together with a mask
  function in ``AttentionMaskInterface`` (transformers' boolean SDPA mask, always materialized),
  and every config of the model is pointed at it for the duration;
* other transformers models (eager fallback): the model runs ``"eager"`` attention and the
  ``eager_attention_forward`` of each attention module's modeling file is replaced by the
  attnlab function (it receives the additive float mask; ``visible`` is where it is not the
  dtype's minimum);
* :class:`AttnlabAttention` modules check for active hooks themselves.

Layers are the attention modules in ``model.named_modules()`` order (0-based); ``layers=``
limits the hooks and the mask_mod to those layers; the other layers run unchanged
(transformers' SDPA function on the interface path, the original eager function on the
eager path, the mechanism's fastest implementation in :class:`AttnlabAttention`).
Nested ``attention_hooks`` on one model compose: mask_mods apply in entry order
(each sees the ``visible`` left by the previous one), then hooks in entry order (outer first).
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..reference import expand_kv, index_grid


@dataclass
class Site:
    """One attention call inside a model (what a hook or mask_mod is told)."""

    layer: int                # index of the attention module (0-based, model order)
    module: nn.Module
    query: Tensor             # (B, Hq, Lq, D) as the model computed it (after RoPE)
    key: Tensor               # (B, Hkv, Lk, D)
    value: Tensor             # (B, Hkv, Lk, Dv)
    visible: Tensor           # bool (B or 1, 1 or Hq, Lq, Lk): True where the query may see the key
    scaling: float
    kv_group: int             # Hq // Hkv; query head h uses kv head h // kv_group
    name: str = ""            # the module's qualified name in the model

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, Hq, Lq, Lk)``: the shape of the weights."""
        return (self.query.shape[0], self.query.shape[1], self.query.shape[2], self.key.shape[2])


Hook = Callable[[Site, Tensor], Optional[Tensor]]
MaskMod = Callable[[Site], Tensor]


@dataclass
class _Entry:
    hooks: Tuple[Hook, ...]
    mask_mod: Optional[MaskMod]


# id(attention module) -> active entries (outermost first); id(module) -> (layer, name)
_ACTIVE: Dict[int, List[_Entry]] = {}
_WHERE: Dict[int, Tuple[int, str]] = {}
# id(model) -> [nesting depth, restore function]
_SWITCHED: Dict[int, list] = {}


# ---------------------------------------------------------------------------------------------
# The computation
# ---------------------------------------------------------------------------------------------
def softmax_weights(query: Tensor, key: Tensor, visible: Tensor, scaling: float, *, bias: Optional[Tensor] = None,
                    score_fn: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``p = softmax(scaling * q k^T (+ bias), over visible keys)`` ``(B, Hq, Lq, Lk)``.

    Computed in float32 (float64 for float64 inputs).

    ``score_fn(s)`` modifies the scores before masking (soft-capping, ALiBi, ...). Rows with no
    visible key are all zero. Same formula as :func:`attnlab.reference.attention`; the gradient
    is finite everywhere (the row log-sum-exp of an empty row is replaced by 0 before ``exp``).
    """
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(cdt)
    k = expand_kv(key, q.shape[1]).to(cdt)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if score_fn is not None:
        s = score_fn(s)
    if bias is not None:
        s = s + bias.to(cdt)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lse = torch.where(torch.isneginf(lse), torch.zeros((), device=s.device), lse)
    return torch.exp(s - lse)


def _apply(site: Site, entries: List[_Entry], *, bias=None, score_fn=None) -> Tensor:
    """mask_mods, weights, hooks (in entry order); returns the final float32 weights."""
    for e in entries:
        if e.mask_mod is not None:
            vis = e.mask_mod(site)
            if not isinstance(vis, Tensor) or vis.dtype != torch.bool:
                raise TypeError(f"mask_mod {e.mask_mod!r} must return a bool tensor, got "
                                f"{getattr(vis, 'dtype', type(vis).__name__)}")
            try:
                torch.broadcast_shapes(vis.shape, site.shape)
            except RuntimeError:
                raise ValueError(f"mask_mod {e.mask_mod!r} returned shape {tuple(vis.shape)}, which does not "
                                 f"broadcast to the weights' (B, Hq, Lq, Lk) = {site.shape}") from None
            site.visible = vis
    p = softmax_weights(site.query, site.key, site.visible, site.scaling, bias=bias, score_fn=score_fn)
    for e in entries:
        for hook in e.hooks:
            new = hook(site, p)
            if new is None:
                continue
            if not isinstance(new, Tensor) or tuple(new.shape) != tuple(p.shape):
                raise ValueError(f"hook {hook!r} must return None or weights of shape {tuple(p.shape)}, got "
                                 f"{tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__}")
            p = new.to(p.dtype)
    return p


def _site(module, query, key, value, visible, scaling) -> Site:
    layer, name = _WHERE.get(id(module), (-1, ""))
    return Site(layer, module, query, key, value, visible, float(scaling), query.shape[1] // key.shape[1], name)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, fallback=None, **kwargs):
    """The function transformers calls (AttentionInterface signature); output ``(B, Lq, Hq, Dv)``."""
    entries = _ACTIVE.get(id(module))
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__}: learned attention sinks (s_aux) are not supported by "
                                  "attnlab.inspect hooks")
    softcap = kwargs.get("softcap")
    if not entries and softcap is None:
        if fallback is not None:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    scaling = D ** -0.5 if scaling is None else scaling
    bias = None
    if attention_mask is None:
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False))) and Lq > 1
        visible = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=query.device)
        if causal:
            visible = visible & torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :Lk]
    else:  # additive float mask (eager): the dtype's minimum (or -inf) marks hidden keys
        m = attention_mask[..., :Lk]
        visible = m > torch.finfo(m.dtype).min / 2
        bias = torch.where(visible, m, torch.zeros((), dtype=m.dtype, device=m.device))
    pos_bias = kwargs.get("position_bias")
    if pos_bias is not None:
        bias = pos_bias if bias is None else bias + pos_bias
    score_fn = None if softcap is None else (lambda s: softcap * torch.tanh(s / softcap))
    site = _site(module, query, key, value, visible, scaling)
    p = _apply(site, entries or [], bias=bias, score_fn=score_fn)
    if module.training and dropout > 0:
        p = nn.functional.dropout(p, p=dropout)
    out = torch.matmul(p, expand_kv(value, Hq).to(p.dtype)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


def _hf_mask(*args, **kwargs):
    """transformers' boolean SDPA mask ``(B, 1, Lq, Lk)``, always materialized (never None)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def _register_transformers():
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("attnlab", _hf_attention)
    AttentionMaskInterface.register("attnlab", _hf_mask)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------------
# Finding attention modules and switching a model
# ---------------------------------------------------------------------------------------------
def _forward_names(module: nn.Module) -> tuple:
    fwd = inspect.unwrap(type(module).forward)
    code = getattr(fwd, "__code__", None)
    return code.co_names if code is not None else ()


def _is_hf_attention(module: nn.Module) -> bool:
    names = _forward_names(module)
    return "ALL_ATTENTION_FUNCTIONS" in names or "eager_attention_forward" in names


def attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, module)]`` of the attention modules the hooks see, in model order (= layer index).

    These are :class:`AttnlabAttention` modules and transformers modules whose ``forward``
    dispatches through ``ALL_ATTENTION_FUNCTIONS`` or calls ``eager_attention_forward``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttnlabAttention) or _is_hf_attention(m)]


def _configs(model: nn.Module) -> list:
    """Every transformers config object reachable from the model (sub-configs included)."""
    seen, out = set(), []
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen.add(id(cfg))
        out.append(cfg)
        stack.extend(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})
    return out


def _switch(model: nn.Module, hf_modules: List[nn.Module], backend: str) -> Callable[[], None]:
    """Point a transformers model at attnlab; returns the function that undoes it."""
    _register_transformers()
    if backend == "auto":
        backend = "interface" if getattr(model, "_supports_attention_backend", False) else "eager"
    configs = _configs(model)
    saved_cfg = [(c, c._attn_implementation_internal) for c in configs]
    saved_fn = []
    try:
        if backend == "interface":
            for c in configs:
                c._attn_implementation_internal = "attnlab"
        else:
            files = {}
            for m in hf_modules:
                mod = sys.modules[type(m).__module__]
                if "eager_attention_forward" not in _forward_names(m) or not hasattr(mod, "eager_attention_forward"):
                    raise ValueError(f"backend='eager': {type(m).__name__} ({mod.__name__}) does not call a "
                                     "module-level eager_attention_forward; use backend='interface'")
                files[mod.__name__] = mod
            for mod in files.values():
                orig = mod.eager_attention_forward
                saved_fn.append((mod, orig))

                def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, _orig=orig, **kw):
                    return _hf_attention(module, query, key, value, attention_mask, scaling, dropout, fallback=_orig,
                                         **kw)

                mod.eager_attention_forward = eager
            for c in configs:
                c._attn_implementation_internal = "eager"
    except BaseException:
        _restore(saved_cfg, saved_fn)
        raise
    return lambda: _restore(saved_cfg, saved_fn)


def _restore(saved_cfg, saved_fn):
    for c, impl in saved_cfg:
        c._attn_implementation_internal = impl
    for mod, fn in saved_fn:
        mod.eager_attention_forward = fn


@contextmanager
def attention_hooks(model: nn.Module, *hooks: Hook, mask_mod: Optional[MaskMod] = None,
                    layers: Optional[Iterable[int]] = None, backend: str = "auto"):
    """Run ``model``'s attention through attnlab with ``hooks`` (and ``mask_mod``) active.

    ``hooks`` get ``(site, weights)`` with float32 post-softmax weights ``(B, Hq, Lq, Lk)`` and
    return replacement weights or None; ``mask_mod(site)`` returns a bool ``visible`` that
    replaces the model's own mask; ``layers`` (attention-module indices) limits both; ``backend``
    is ``"auto"``, ``"interface"`` (AttentionInterface) or ``"eager"`` (patched
    ``eager_attention_forward``) for transformers models. See the module docstring.
    Yields the list of ``(name, module)`` attention modules (index = layer).
    """
    mods = attention_modules(model)
    for i, h in enumerate(hooks):
        if not callable(h):
            raise TypeError(f"attention_hooks: hook #{i} must be callable (site, weights) -> weights | None, "
                            f"got {type(h).__name__}")
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"attention_hooks: mask_mod must be callable (site) -> bool tensor or None, "
                        f"got {type(mask_mod).__name__}")
    if backend not in ("auto", "interface", "eager"):
        raise ValueError(f"attention_hooks: backend must be 'auto', 'interface' or 'eager', got {backend!r}")
    if not mods:
        raise ValueError(f"attention_hooks: {type(model).__name__} has no attention module attnlab can hook (neither "
                         "AttnlabAttention nor a transformers attention dispatching through AttentionInterface / "
                         "eager_attention_forward)")
    chosen = _layer_set(layers, len(mods))
    entry = _Entry(tuple(hooks), mask_mod)
    hf = [m for _, m in mods if not isinstance(m, AttnlabAttention)]
    state = _SWITCHED.get(id(model))
    if state is None and hf:
        state = _SWITCHED[id(model)] = [0, _switch(model, hf, backend)]
    if state is not None:
        state[0] += 1
    added = []
    try:
        for i, (name, m) in enumerate(mods):
            _WHERE.setdefault(id(m), (i, name))
            if i in chosen:
                _ACTIVE.setdefault(id(m), []).append(entry)
                added.append(m)
        yield mods
    finally:
        for m in added:
            lst = _ACTIVE[id(m)]
            lst.remove(entry)
            if not lst:
                del _ACTIVE[id(m)]
        if state is not None:
            state[0] -= 1
            if state[0] == 0:
                del _SWITCHED[id(model)]
                state[1]()
        if not any(id(m) in _ACTIVE for _, m in mods):
            for _, m in mods:
                _WHERE.pop(id(m), None)


def _layer_set(layers, n: int) -> frozenset:
    if layers is None:
        return frozenset(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        vals = list(layers)
    except TypeError:
        raise TypeError(f"layers must be None, an int or a list of ints, got {type(layers).__name__}") from None
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise ValueError(f"layers must hold attention-module indices in [0, {n - 1}] (the model has {n}), "
                             f"got {v!r}")
    return frozenset(vals)


# ---------------------------------------------------------------------------------------------
# attnlab's own module
# ---------------------------------------------------------------------------------------------
class AttnlabAttention(nn.Module):
    """Multi-head attention whose token mixer is a catalogue entry, with the hook point.

    ``x (B, L, d_model)`` (or ``(B, *grid, d_model)`` for a spatial mechanism) is projected to
    ``q (B, heads, L, d_model // heads)`` and ``k, v`` with ``kv_heads`` heads (GQA), mixed by
    ``attnlab.mechanism(mechanism)`` with ``params`` (e.g. ``window=16``) and projected back.
    Outside :func:`attention_hooks` the mechanism's fastest implementation runs; inside, the
    weights come from the mechanism's reference definition (its mask and score modifier,
    ``Mechanism.spec``; causal if ``causal``) through :func:`softmax_weights` and the hooks.
    """

    def __init__(self, d_model: int, heads: int, mechanism: str = "dense", *, kv_heads: Optional[int] = None,
                 causal: bool = False, bias: bool = True, **params):
        super().__init__()
        from .. import catalogue

        for arg, val in (("d_model", d_model), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"AttnlabAttention: {arg} must be a positive int, got {val!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"AttnlabAttention: kv_heads must be a positive divisor of heads={heads}, "
                             f"got {kv_heads!r}")
        if d_model % heads:
            raise ValueError(f"AttnlabAttention: d_model={d_model} must be a multiple of heads={heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"AttnlabAttention: causal must be True or False, got {causal!r}")
        if not isinstance(mechanism, str):
            raise TypeError(f"AttnlabAttention: mechanism must be a catalogue name (str), "
                            f"got {type(mechanism).__name__}")
        try:
            self.mechanism = catalogue.mechanism(mechanism)
        except KeyError as e:
            raise ValueError(f"AttnlabAttention: mechanism {e.args[0]}") from None
        self.mechanism.normalize_params(params)  # unknown names / bad values raise here
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, d_model // heads, causal
        self.params = dict(params)
        self.q = nn.Linear(d_model, heads * self.head_dim, bias=bias)
        self.k = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(heads * self.head_dim, d_model, bias=bias)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"mechanism={self.mechanism.name!r}, heads={self.heads}, kv_heads={self.kv_heads}, " \
               f"causal={self.causal}{extra}"

    def forward(self, x: Tensor) -> Tensor:
        grid = x.shape[1:-1]

        def split(t, h):  # (B, *grid, h*D) -> (B, h, *grid, D)
            return t.view(*t.shape[:-1], h, self.head_dim).movedim(-2, 1)

        q, k, v = split(self.q(x), self.heads), split(self.k(x), self.kv_heads), split(self.v(x), self.kv_heads)
        entries = _ACTIVE.get(id(self))
        if entries:
            out = self._hooked(q, k, v, entries)
        else:
            out = self.mechanism(q, k, v, causal=self.causal, **self.params)
        return self.o(out.movedim(1, -2).reshape(*x.shape[:-1], -1))

    def _hooked(self, q, k, v, entries) -> Tensor:
        from ..patterns.executor import geometry, plan

        call = self.mechanism.prepare(q, k, v, causal=self.causal, **self.params)
        mask, score = plan(call)
        geom = geometry(call, tiled_order=False)
        qf, kf, vf = (t.flatten(2, -2) for t in (q, k, v))
        B, H, Lq, Lk = call.batch, call.q_heads, call.q_len, call.kv_len
        idx = index_grid(B, H, Lq, Lk, q.device)
        visible = torch.ones((), dtype=torch.bool, device=q.device) if mask is None else mask.build(geom)(*idx)
        visible = visible.reshape((1,) * (4 - visible.dim()) + tuple(visible.shape))
        visible = visible.expand(visible.shape[0], visible.shape[1], Lq, Lk)
        score_fn = None if score is None else (lambda s, f=score.build(geom): f(s, *idx))
        site = _site(self, qf, kf, vf, visible, call.scale)
        p = _apply(site, entries, score_fn=score_fn)
        out = torch.matmul(p, expand_kv(vf, H).to(p.dtype)).to(q.dtype)
        return out.unflatten(2, call.spatial) if call.spatial else out
