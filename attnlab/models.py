"""Tiny language models whose token mixers are catalogue entries, alone or mixed in a hybrid stack.

The benchmark's quality tasks (:mod:`attnlab.bench.tasks`) train these on CPU. A model is::

    x = embed(tokens) [+ learned position]            # or a linear map of continuous inputs
    for each layer l:  x = x + mixer_l(norm(x))       # pre-norm token mixer
                       x = x + mlp(norm(x))           # pre-norm MLP (omitted when mlp_ratio = 0)
    logits = head(norm(x))

``mixer_l`` projects to multi-head ``q, k, v`` of shape ``(B, H, L, d_model / H)`` (SDPA's layout),
runs the catalogue entry ``attnlab.mechanism(name)(q, k, v, causal=causal, impl=..., **params)`` and
projects back. The implementation is fixed per input shape (:func:`training_impl`), so training and
evaluation compute the same function with an implementation that has a backward on this device.
Entries that need more than q, k, v (learned tables, gates computed from the input, one shared query)
get it through the generic hooks of :class:`TokenMixer`; a mechanism that cannot mix tokens here (a
grid mechanism, a missing causal/non-causal self pattern) raises :class:`UnsupportedMixer`.

**Hybrid stacks** (:func:`layer_plan`, :func:`build_hybrid`). "A Systematic Analysis of Hybrid Linear
Attention" (Wang et al. 2025) stacks ``N`` repetitions of ``a`` linear-attention layers followed by
``b`` full-attention layers (ratio ``a:b``, e.g. 3:1 or 6:1); MiniCPM-SALA mixes sparse and linear
attention layers the same way. ``mixers=(A, B), ratio="a:b"`` gives ``n_layers * a / (a + b)`` layers of
``A`` and ``n_layers * b / (a + b)`` of ``B``, placed by ``placement``:

``interleave``  ``[A]*a + [B]*b`` repeated (the paper's layout: every group ends with ``B``)
``first``       all ``B`` layers at the bottom (closest to the embedding), then all ``A``
``last``        all ``A`` layers, then all ``B`` layers at the top

**Three forms** of a model, as of every mechanism of issue 3. ``model(x, form=...)``: ``"default"``
(each layer's :func:`training_impl`), ``"parallel"``, ``"chunked"`` or ``"recurrent"`` (each layer
runs that implementation where its entry has one, its default otherwise: linear / recurrent entries
have all three, softmax entries none). And incremental decoding with an explicit cache
(:class:`DecodeCache`): ``logits, cache = model.prefill(prompt)`` then
``logits_t, cache = model.step(token_t, cache)`` per new token, equal to the full forward's logits
at every position. Per layer (:meth:`TokenMixer.decode_kind`):

``"state"``  entries with a recurrence and ``causal_self``: the entry's :class:`~attnlab.recurrent.State`;
             prefill runs ``m.scan(..., impl="chunked")``, a step ``m.step`` (the recurrent form).
             Memory: ``B x`` the entry's ``state_size`` floats, constant in the context length (except
             an entry whose state grows by definition, ``extras["state_grows"]``: RAT's chunk summaries).
``"kv"``     softmax entries with ``causal_cross``: a :class:`KVCache` of every key and value so far;
             a step is the causal_cross call of the new query against the cache (bottom-right
             aligned, so exactly the last row of the full causal call). Memory: ``2 B H t d`` floats
             after ``t`` tokens, growing linearly (each step concatenates: a new cache, O(t) copy).
             Windowed entries (``sliding_window``,
             ``sink_window``, ...) keep the whole cache too: the entry's own mask picks the keys (exact
             by construction, at the cost of memory a ring buffer of ``window`` keys would save).

Per-token parameters computed from the input (``extras["from_input"]``) are computed for the new
tokens only; given per-token tensors are sliced at the absolute positions, as learned positions are.
Entries with neither a recurrence nor ``causal_cross``, and non-causal models, raise
:class:`UnsupportedMixer` before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .catalogue import Mechanism, mechanism as _lookup
from .recurrent import State, token_params

PLACEMENTS = ("interleave", "first", "last")
#: ``model(x, form=...)``: "default" = each layer's :func:`training_impl`; the others pick that
#: implementation in every layer whose entry has one (the default elsewhere).
FORMS = ("default", "parallel", "chunked", "recurrent")
POSITIONS = ("learned", "none")
#: Implementations tried first for training: torch's fused SDPA has an autograd backward on every
#: device and is the fastest exact form at the short lengths these tasks use.
PREFERRED_IMPLS = ("sdpa",)

MixerSpec = Union[str, Tuple[str, Mapping[str, Any]]]


def _spec(spec: MixerSpec, where: str) -> Tuple[str, Dict[str, Any]]:
    """``"name"`` or ``("name", {params})`` -> (name, params); raises naming ``where``."""
    if isinstance(spec, str):
        return spec, {}
    if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], Mapping)):
        return spec[0], dict(spec[1])
    raise TypeError(f"{where} must be a mechanism name or a (name, params) pair, got {spec!r}")


def _parse_ratio(ratio: Any, n_mixers: int) -> Tuple[int, ...]:
    if isinstance(ratio, str):
        parts = ratio.split(":")
    elif isinstance(ratio, (tuple, list)):
        parts = list(ratio)
    else:
        raise TypeError(f"ratio must be a string like '3:1' or a tuple of ints, got {ratio!r}")
    try:
        counts = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be positive integers separated by ':', e.g. '3:1', got {ratio!r}") from None
    if len(counts) != n_mixers or any(c < 1 for c in counts):
        raise ValueError(f"ratio must have one positive count per mixer ({n_mixers}), e.g. '3:1', got {ratio!r}")
    return counts


def layer_plan(n_layers: int, mixers: Union[MixerSpec, Sequence[MixerSpec]], ratio: Optional[Any] = None,
               placement: str = "interleave") -> List[Tuple[str, Dict[str, Any]]]:
    """The token mixer of every layer, bottom to top, as ``(name, params)`` pairs.

    ``mixers`` is one spec (every layer the same), two specs ``(A, B)`` with ``ratio="a:b"`` (see the
    module docstring), or one spec per layer (``len(mixers) == n_layers``, ``ratio=None``). A spec is a
    catalogue name or ``(name, params)``. Names are not looked up here (see :func:`build_hybrid`).
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if isinstance(mixers, str) or (isinstance(mixers, tuple) and len(mixers) == 2 and isinstance(mixers[1], Mapping)):
        if ratio is not None:
            raise ValueError(f"ratio {ratio!r} needs two mixers, got one: {mixers!r}")
        return [_spec(mixers, "mixers")] * n_layers
    if not isinstance(mixers, (list, tuple)) or not mixers:
        raise TypeError(f"mixers must be a mechanism name, a (name, params) pair or a list of them, got {mixers!r}")
    specs = [_spec(s, f"mixers[{i}]") for i, s in enumerate(mixers)]
    if ratio is None:
        if len(specs) == 1:
            return specs * n_layers
        if len(specs) != n_layers:
            raise ValueError(f"mixers lists {len(specs)} mechanisms without a ratio; give one per layer "
                             f"(n_layers = {n_layers}) or two with ratio='a:b'")
        return specs
    if len(specs) != 2:
        raise ValueError(f"ratio mixes exactly two mixers (A, B), got {len(specs)}")
    a, b = _parse_ratio(ratio, 2)
    if n_layers % (a + b):
        raise ValueError(f"n_layers ({n_layers}) must be a multiple of a + b = {a + b} for ratio {a}:{b}")
    groups = n_layers // (a + b)
    A, B = specs
    if placement == "interleave":
        return ([A] * a + [B] * b) * groups
    if placement == "first":
        return [B] * (b * groups) + [A] * (a * groups)
    return [A] * (a * groups) + [B] * (b * groups)


def training_impl(mech: Mechanism, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  params: Mapping[str, Any]) -> str:
    """The implementation a model uses for these shapes: the first of :data:`PREFERRED_IMPLS`, then of
    the entry's own order, that serves the call *with gradients* (so CPU FlexAttention, inference-only,
    is passed over for ``tiled``). Raises ValueError naming the mechanism when none does."""
    call = dataclasses.replace(mech.prepare(q, k, v, causal=causal, **params), requires_grad=True)
    order = [n for n in PREFERRED_IMPLS if n in mech.impl_names] + [n for n in mech.impl_names
                                                                    if n not in PREFERRED_IMPLS]
    reasons = []
    for name in order:
        why = mech.impl(name).supports(call)
        if not why:
            return name
        reasons.append(f"{name}: {why}")
    raise ValueError(f"{mech.name}: no implementation can train on these inputs ({'; '.join(reasons)})")


class UnsupportedMixer(ValueError, NotImplementedError):
    """The mechanism cannot be a token mixer of this model (a grid mechanism, a missing pattern). A
    ValueError like every bad argument, and a NotImplementedError so a benchmark records "unsupported"."""


def input_width(width: Any, head_dim: int) -> int:
    """The last axis of a parameter computed from the input (``extras["from_input"]``): an int or ``"head_dim"``."""
    return head_dim if width == "head_dim" else int(width)


@dataclasses.dataclass
class KVCache:
    """Every key and value a softmax layer has seen: ``(B, H, t, head_dim)`` each (``2 B H t d`` floats)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def floats(self) -> int:
        return self.k.numel() + self.v.numel()


LayerCache = Union[State, KVCache]


@dataclasses.dataclass
class DecodeCache:
    """A model's decoding cache after ``length`` tokens of a batch of ``batch``: one :class:`State`
    (``"state"`` layers) or :class:`KVCache` (``"kv"`` layers) per block, bottom to top. Functional:
    :meth:`HybridModel.step` returns a new cache and leaves this one valid (a decode can branch)."""

    length: int
    batch: int
    layers: List[LayerCache]

    def floats(self) -> List[int]:
        """Numbers stored per layer (the memory of decoding; :meth:`TokenMixer.decode_kind` says which grow)."""
        return [c.floats for c in self.layers]


class TokenMixer(nn.Module):
    """Multi-head projection to q, k, v + a catalogue entry + output projection.

    ``impl`` pins an implementation; by default :func:`training_impl` picks one per input shape.
    Extra inputs an entry needs, through generic hooks (so any sequence entry can be a mixer):

    - floating tensor parameters given in ``params`` (a relative-bias table, agent tokens, ...) become
      learned parameters of the layer, initialized from the given value;
    - ``mech.extras["from_input"] = {name: (fn, width)}``: per-token parameters computed from the layer's
      input as ``fn(x W)``, ``W`` a learned ``d_model x (heads * width)`` projection viewed as
      ``(B, H, L, width)`` (``width`` an int or ``"head_dim"``), e.g. GLA's gates ``gate_log(x W)``;
      a value given in ``params`` is used instead;
    - ``mech.extras["shared_query"]``: the entry attends with one query per head (Aaren): a learned
      query vector per head replaces the query projection.
    """

    def __init__(self, d_model: int, heads: int, mechanism: str, params: Optional[Mapping[str, Any]] = None,
                 causal: bool = True, impl: Optional[str] = None):
        super().__init__()
        self.mech = _lookup(mechanism) if isinstance(mechanism, str) else mechanism
        if self.mech.layout != "sequence":
            raise UnsupportedMixer(f"mechanism {self.mech.name!r} works on {self.mech.layout} grids; a token mixer "
                                   f"needs a sequence mechanism")
        pattern = ("causal" if causal else "noncausal") + "_self"
        if pattern not in self.mech.patterns:
            raise UnsupportedMixer(f"mechanism {self.mech.name!r} does not define {pattern} (causal={causal}); it "
                                   f"supports: {', '.join(self.mech.patterns)}")
        params = dict(params or {})
        hooks = {n: h for n, h in self.mech.extras.get("from_input", {}).items() if n not in params}
        # unknown / invalid parameters fail here, naming themselves (generated ones stand in as tensors)
        self.mech.normalize_params({**params, **{n: torch.zeros(()) for n in hooks}})
        if impl is not None and impl not in self.mech.impl_names:
            raise ValueError(f"impl must be one of {', '.join(self.mech.impl_names)} for {self.mech.name}, "
                             f"got {impl!r}")
        self.heads, self.head_dim, self.causal, self.impl = heads, d_model // heads, causal, impl
        learned = {n: v for n, v in params.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        self.learned = nn.ParameterDict({n: nn.Parameter(v.detach().clone().float()) for n, v in learned.items()})
        self.static = {n: v for n, v in params.items() if n not in learned}
        self._maps = {n: fn for n, (fn, _) in hooks.items()}
        self.from_input = nn.ModuleDict({n: nn.Linear(d_model, heads * input_width(w, self.head_dim))
                                         for n, (_, w) in hooks.items()})
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) * 0.02) \
            if self.mech.extras.get("shared_query") else None
        self.qkv = nn.Linear(d_model, (2 if self.query is not None else 3) * d_model)
        self.out = nn.Linear(d_model, d_model)
        self._impls: Dict[tuple, str] = {}
        self._per_token = {p.name for p in self.mech.params if p.per_token}

    def call_params(self, x: torch.Tensor, start: int = 0) -> Dict[str, Any]:
        """The entry's parameters for input ``x`` ``(B, L, d_model)`` at positions ``start .. start + L - 1``:
        given and learned ones (per-token tensors sliced to those positions on their length axis 2) and
        those computed from ``x`` (``extras["from_input"]``, for these tokens only)."""
        B, L, _ = x.shape
        params = {**self.static, **dict(self.learned.items())}
        for n in self._per_token.intersection(params):
            t = params[n]
            if isinstance(t, torch.Tensor):
                if t.shape[2] < start + L:
                    raise ValueError(f"{self.mech.name}: per-token parameter '{n}' covers {t.shape[2]} positions, "
                                     f"the input reaches position {start + L - 1}")
                params[n] = t[:, :, start:start + L]
        for n, proj in self.from_input.items():
            params[n] = self._maps[n](proj(x).view(B, L, self.heads, -1).transpose(1, 2))
        return params

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, L, d_model)`` -> ``q, k, v`` ``(B, H, L, head_dim)`` (q: the shared query repeated)."""
        B, L, _ = x.shape
        proj = self.qkv(x).view(B, L, -1, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.query is not None:
            (k, v), q = proj, self.query[None, :, None, :].expand(B, -1, L, -1)
        else:
            q, k, v = proj
        return q, k, v

    def implementation(self, q, k, v, params: Mapping[str, Any], form: str = "default") -> str:
        """The entry's implementation for this call: ``form`` when the entry has an implementation of that
        name, else the pinned ``impl``, else :func:`training_impl` (remembered per self-attention shape)."""
        if form != "default" and form in self.mech.impl_names:
            return form
        if self.impl is not None:
            return self.impl
        if q.shape[2] != k.shape[2]:  # a decoding call: not remembered (one per context length)
            return training_impl(self.mech, q, k, v, self.causal, params)
        key = (q.shape[2], q.dtype, q.device)
        if key not in self._impls:
            self._impls[key] = training_impl(self.mech, q, k, v, self.causal, params)
        return self._impls[key]

    def _attend(self, q, k, v, params: Mapping[str, Any], form: str = "default") -> torch.Tensor:
        return self.mech(q, k, v, causal=self.causal, impl=self.implementation(q, k, v, params, form), **params)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x: torch.Tensor, form: str = "default") -> torch.Tensor:
        """``x`` ``(B, L, d_model)`` -> ``(B, L, d_model)``; ``form`` as :data:`FORMS`."""
        q, k, v = self.qkv_heads(x)
        return self._merge(self._attend(q, k, v, self.call_params(x), form))

    # ---- incremental decoding ------------------------------------------------------------
    def decode_kind(self) -> str:
        """``"state"`` (a recurrence: constant memory) or ``"kv"`` (a growing key/value cache); raises
        :class:`UnsupportedMixer` when this mixer cannot decode one token at a time."""
        m = self.mech
        if not self.causal:
            raise UnsupportedMixer(f"{m.name}: a non-causal layer (causal=False) cannot decode incrementally: every "
                                   f"output depends on later tokens")
        if m.recurrence is not None and "causal_self" in m.patterns:
            return "state"
        if "causal_cross" in m.patterns:
            return "kv"
        raise UnsupportedMixer(f"{m.name} cannot decode incrementally: it has no recurrent form and does not define "
                               f"causal_cross (one new query against the cached keys); it supports: "
                               f"{', '.join(m.patterns)}")

    def extend(self, x: torch.Tensor, cache: Optional[LayerCache], start: int,
               one_step: bool = False) -> Tuple[torch.Tensor, LayerCache]:
        """Tokens ``x`` ``(B, L, d_model)`` at positions ``start ..`` continuing ``cache`` (None: the first
        tokens) -> ``(y, new cache)``, ``y`` equal to rows ``start ..`` of :meth:`forward` on the whole
        sequence. ``"state"`` layers run ``m.scan(impl="chunked")``, or ``m.step`` when ``one_step``
        (``L == 1``); ``"kv"`` layers attend the new queries to the cache plus the new keys (causal,
        bottom-right aligned)."""
        kind = self.decode_kind()
        q, k, v = self.qkv_heads(x)
        params = self.call_params(x, start)
        if kind == "state":
            if one_step:
                params = token_params(self.mech, params, 0)
                o, state = self.mech.step(cache, q[:, :, 0], k[:, :, 0], v[:, :, 0], **params)
                return self._merge(o[:, :, None]), state
            o, state = self.mech.scan(q, k, v, cache, impl="chunked", **params)
            return self._merge(o), state
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        return self._merge(self._attend(q, k, v, params)), KVCache(k, v)

    def extra_repr(self) -> str:
        given = {**self.static, **{n: f"learned{tuple(p.shape)}" for n, p in self.learned.items()},
                 **{n: "from input" for n in self.from_input}}
        return f"{self.mech.name}, heads={self.heads}, params={given}, causal={self.causal}"


class Block(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (GELU MLP of width ``mlp_ratio * d_model``)."""

    def __init__(self, d_model: int, mixer: TokenMixer, mlp_ratio: int):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d_model), mixer
        self.norm2 = nn.LayerNorm(d_model) if mlp_ratio else None
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model)) if mlp_ratio else None

    def forward(self, x: torch.Tensor, form: str = "default") -> torch.Tensor:
        return self._mlp(x + self.mixer(self.norm1(x), form))

    def extend(self, x: torch.Tensor, cache: Optional[LayerCache], start: int,
               one_step: bool = False) -> Tuple[torch.Tensor, LayerCache]:
        """:meth:`forward` on new tokens continuing the mixer's cache (:meth:`TokenMixer.extend`)."""
        y, cache = self.mixer.extend(self.norm1(x), cache, start, one_step)
        return self._mlp(x + y), cache

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x)) if self.mlp is not None else x


class HybridModel(nn.Module):
    """Embedding, blocks, final norm, head. ``forward(x)``: token ids ``(B, L)`` (long) when built with a
    vocabulary, or features ``(B, L, input_dim)`` when built with ``input_dim``; returns ``(B, L, out_dim)``
    (:meth:`features` gives the hidden states before the head).
    ``plan`` lists every layer's ``(mechanism, params)``.

    Incremental decoding (causal models): :meth:`prefill` a prompt, then :meth:`step` one token at a
    time through a :class:`DecodeCache` (see the module docstring for each layer's cache and memory)::

        logits, cache = model.prefill(prompt)                  # (B, P, out_dim)
        logits_t, cache = model.step(next_token, cache)        # (B, out_dim), position P
    """

    def __init__(self, embed: nn.Module, pos: Optional[nn.Embedding], blocks: List[Block], d_model: int,
                 out_dim: int, plan: List[Tuple[str, Dict[str, Any]]], takes_tokens: bool):
        super().__init__()
        self.embed, self.pos, self.blocks = embed, pos, nn.ModuleList(blocks)
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, out_dim)
        self.plan, self.takes_tokens = plan, takes_tokens

    def forward(self, x: torch.Tensor, form: str = "default") -> torch.Tensor:
        return self.head(self.features(x, form))

    def features(self, x: torch.Tensor, form: str = "default") -> torch.Tensor:
        """The final-normed hidden states ``(B, L, d_model)``; ``forward = head(features)`` (tasks that score
        a few positions apply ``head`` to those only). ``form``: one of :data:`FORMS`."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        h = self._embed(x, 0, "x")
        for block in self.blocks:
            h = block(h, form)
        return self.norm(h)

    def _embed(self, x: torch.Tensor, start: int, arg: str) -> torch.Tensor:
        """Validated inputs ``(B, L)`` ids or ``(B, L, input_dim)`` at positions ``start ..`` -> ``(B, L, d_model)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
        if self.takes_tokens:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{arg} must be token ids of shape (B, L) and an integer dtype, got "
                                 f"{tuple(x.shape)} {x.dtype}")
        elif x.dim() != 3 or x.shape[-1] != self.embed.in_features:
            raise ValueError(f"{arg} must be features of shape (B, L, {self.embed.in_features}), got "
                             f"{tuple(x.shape)}")
        L = x.shape[1]
        h = self.embed(x)
        if self.pos is not None:
            if start + L > self.pos.num_embeddings:
                raise ValueError(f"input length {start + L} exceeds max_len {self.pos.num_embeddings} of the learned "
                                 f"positions")
            h = h + self.pos.weight[start:start + L]
        return h

    # ---- incremental decoding ------------------------------------------------------------
    def decode_kinds(self) -> List[str]:
        """Each layer's cache kind, ``"state"`` or ``"kv"`` (:meth:`TokenMixer.decode_kind`); raises
        :class:`UnsupportedMixer` naming the first layer that cannot decode incrementally."""
        kinds = []
        for i, block in enumerate(self.blocks):
            try:
                kinds.append(block.mixer.decode_kind())
            except UnsupportedMixer as e:
                raise UnsupportedMixer(f"layer {i}: {e}") from None
        return kinds

    def _check_cache(self, cache: Optional[DecodeCache], batch: int) -> None:
        if cache is None:
            return
        if not isinstance(cache, DecodeCache):
            raise TypeError(f"cache must be a DecodeCache from prefill/step of this model or None, got "
                            f"{type(cache).__name__}")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.layers)} layers, this model {len(self.blocks)}")
        if cache.batch != batch:
            raise ValueError(f"cache is for a batch of {cache.batch}, the input has {batch}")

    def _extend(self, x: torch.Tensor, cache: Optional[DecodeCache], one_step: bool, arg: str
                ) -> Tuple[torch.Tensor, DecodeCache]:
        self.decode_kinds()
        self._check_cache(cache, x.shape[0])
        start = 0 if cache is None else cache.length
        h = self._embed(x, start, arg)
        layers = []
        for i, block in enumerate(self.blocks):
            h, c = block.extend(h, None if cache is None else cache.layers[i], start, one_step)
            layers.append(c)
        return self.head(self.norm(h)), DecodeCache(start + x.shape[1], x.shape[0], layers)

    def prefill(self, x: torch.Tensor, cache: Optional[DecodeCache] = None) -> Tuple[torch.Tensor, DecodeCache]:
        """Run a prompt ``x`` (as :meth:`forward`'s input), continuing ``cache`` when given: returns its
        logits ``(B, L, out_dim)`` (those of the whole sequence at these positions) and the cache."""
        return self._extend(x, cache, False, "x")

    def step(self, x_t: torch.Tensor, cache: Optional[DecodeCache] = None) -> Tuple[torch.Tensor, DecodeCache]:
        """One token at position ``cache.length`` (0 when ``cache`` is None): ``x_t`` token ids ``(B,)``
        or features ``(B, input_dim)`` -> ``(logits_t (B, out_dim), new cache)``. ``"state"`` layers run
        their entry's recurrent form (``m.step``)."""
        if not isinstance(x_t, torch.Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if self.takes_tokens:
            if x_t.dim() != 1 or x_t.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"x_t must be token ids of shape (B,) (one per sequence) and an integer dtype, got "
                                 f"{tuple(x_t.shape)} {x_t.dtype}")
        elif x_t.dim() != 2 or x_t.shape[-1] != self.embed.in_features:
            raise ValueError(f"x_t must be features of shape (B, {self.embed.in_features}) (one token per "
                             f"sequence), got {tuple(x_t.shape)}")
        logits, cache = self._extend(x_t.unsqueeze(1), cache, True, "x_t")
        return logits[:, 0], cache


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def build_hybrid(vocab: Optional[int], d_model: int, n_layers: int, heads: int,
                 mixers: Union[MixerSpec, Sequence[MixerSpec]] = "dense", ratio: Optional[Any] = None,
                 placement: str = "interleave", *, causal: bool = True, positions: str = "learned",
                 max_len: int = 512, mlp_ratio: int = 4, input_dim: Optional[int] = None,
                 out_dim: Optional[int] = None, impl: Optional[str] = None, seed: Optional[int] = None
                 ) -> HybridModel:
    """A :class:`HybridModel` whose layers follow :func:`layer_plan` (``mixers``, ``ratio``, ``placement``).

    ``vocab`` token ids in (``nn.Embedding``), or ``vocab=None`` with ``input_dim`` features in
    (``nn.Linear``); ``out_dim`` defaults to ``vocab``. ``positions`` is ``"learned"`` (up to ``max_len``)
    or ``"none"``. ``mlp_ratio=0`` drops the MLPs (Zoology's MQAR models). ``impl`` pins the catalogue
    implementation of every mixer. ``seed`` makes the initialization reproducible (weights
    ``N(0, 0.02)``, biases 0). Every argument is validated before anything is built.
    """
    if vocab is None:
        if input_dim is None:
            raise ValueError("give vocab (token ids in) or input_dim (features in); both are None")
        _positive_int("input_dim", input_dim)
        if out_dim is None:
            raise ValueError("out_dim must be given when vocab is None (no vocabulary to predict)")
    else:
        _positive_int("vocab", vocab)
        if input_dim is not None:
            raise ValueError(f"give vocab or input_dim, not both (vocab={vocab}, input_dim={input_dim})")
    out_dim = vocab if out_dim is None else _positive_int("out_dim", out_dim)
    _positive_int("d_model", d_model)
    _positive_int("heads", heads)
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    _positive_int("max_len", max_len)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int) or mlp_ratio < 0:
        raise ValueError(f"mlp_ratio must be an int >= 0, got {mlp_ratio!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    plan = layer_plan(n_layers, mixers, ratio, placement)
    for name, _ in plan:
        _lookup(name)  # KeyError naming the unknown mechanism (with close matches)

    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        embed = nn.Embedding(vocab, d_model) if vocab is not None else nn.Linear(input_dim, d_model)
        pos = nn.Embedding(max_len, d_model) if positions == "learned" else None
        blocks = [Block(d_model, TokenMixer(d_model, heads, name, params, causal, impl), mlp_ratio)
                  for name, params in plan]
        model = HybridModel(embed, pos, blocks, d_model, out_dim, plan, vocab is not None)
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FORMS", "PLACEMENTS", "POSITIONS", "Block", "DecodeCache", "HybridModel", "KVCache", "TokenMixer",
           "UnsupportedMixer", "build_hybrid", "count_params", "input_width", "layer_plan", "training_impl"]
