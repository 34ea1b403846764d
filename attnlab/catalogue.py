"""The catalogue: one :class:`Mechanism` record per mechanism, and the registry.

A mechanism is data: its name, family, paper, exact formula, tensor layout, the CAB patterns
it defines, its parameters (typed, with valid ranges) and its implementations, each of which
declares what it can serve. Calling a mechanism validates everything *before* any work and
then runs the first implementation that serves the call, or the one named by ``impl=``;
an implementation that cannot serve a call says why (no silent fallback).

Adding a mechanism is adding one :func:`register` call; the conformance suite
(``tests/conformance``) enrolls every registered entry automatically.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REGISTRY: Dict[str, "Mechanism"] = {}


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A declared parameter: type, default and valid range.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``choice``, ``ints`` (a non-empty list of
    ints), ``tensor`` or ``mask``/``score`` (pattern objects). ``per_axis`` ints accept one
    value for every spatial axis or a tuple with one value per axis. ``None`` is accepted when
    ``optional``.
    """

    name: str
    kind: str
    default: Any
    doc: str
    ge: Optional[float] = None
    le: Optional[float] = None
    choices: Tuple = ()
    per_axis: bool = False
    optional: bool = False
    per_token: bool = False  # a tensor whose axis 2 runs over key positions (gates, decays); see recurrent.py

    def describe(self) -> str:
        """Human-readable valid range, used in errors and ``attnlab info``."""
        if self.kind == "choice":
            rng = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind in ("int", "float", "ints"):
            lo = "" if self.ge is None else f">= {self.ge}"
            hi = "" if self.le is None else f"<= {self.le}"
            base = {"int": "an int", "float": "a float", "ints": "a list of ints"}[self.kind]
            rng = base + (" " + " and ".join(x for x in (lo, hi) if x) if (lo or hi) else "")
            if self.per_axis:
                rng += " (one value, or a tuple with one per spatial axis)"
        else:
            rng = {"bool": "True or False", "tensor": "a torch.Tensor", "mask": "an attnlab Mask",
                   "score": "an attnlab ScoreMod"}.get(self.kind, self.kind)
        return rng + (" or None" if self.optional else "")

    def validate(self, value: Any, owner: str, ndim: int = 1) -> Any:
        """Return the normalized value or raise ValueError/TypeError naming the argument."""
        where = f"{owner}: parameter '{self.name}'"
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{where} must be {self.describe()}, got None")
        if self.per_axis:
            vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
            if len(vals) != ndim:
                raise ValueError(f"{where} has {len(vals)} values but the input has {ndim} spatial axes; "
                                 f"give one value or {ndim}")
            return tuple(self._scalar(v, where) for v in vals)
        if self.kind == "ints":
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if not isinstance(value, (list, tuple)) or not value:
                raise TypeError(f"{where} must be {self.describe()}, got {value!r}")
            return tuple(self._scalar(v, where, "int") for v in value)
        return self._scalar(value, where)

    def _scalar(self, v: Any, where: str, kind: Optional[str] = None) -> Any:
        kind = kind or self.kind
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, (int,)) and not (isinstance(v, torch.Tensor) and v.numel() == 1
                                                                          and not v.is_floating_point()):
                raise TypeError(f"{where} must be {self.describe()}, got {v!r} ({type(v).__name__})")
            v = int(v)
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{where} must be {self.describe()} (finite), got {v!r}")
            v = float(v)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise TypeError(f"{where} must be True or False, got {v!r}")
            return v
        elif kind == "choice":
            if v not in self.choices:
                raise ValueError(f"{where} must be {self.describe()}, got {v!r}")
            return v
        elif kind == "tensor":
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(v).__name__}")
            return v
        elif kind in ("mask", "score"):
            from .patterns.base import Mask, ScoreMod

            cls = Mask if kind == "mask" else ScoreMod
            if not isinstance(v, cls):
                raise TypeError(f"{where} must be {self.describe()}, got {type(v).__name__}")
            return v
        if self.ge is not None and v < self.ge:
            raise ValueError(f"{where} must be >= {self.ge}, got {v}")
        if self.le is not None and v > self.le:
            raise ValueError(f"{where} must be <= {self.le}, got {v}")
        return v

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "default": _jsonable(self.default), "valid": self.describe(),
                "doc": self.doc}


def _jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}"
    return x


# --------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------
@dataclass
class Call:
    """A validated call: shapes, pattern, normalized parameters. Built before any work."""

    mechanism: "Mechanism"
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    spatial: Optional[tuple]  # grid shape of spatial inputs, None for sequences
    causal: bool
    pattern: str
    params: Dict[str, Any]
    scale: float
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    return_lse: bool

    @property
    def ndim(self) -> int:
        return len(self.spatial) if self.spatial else 1

    @property
    def shape(self) -> tuple:
        """The q/k spatial (or sequence) shape."""
        return self.spatial or (self.q_len,)


@dataclass
class Implementation:
    """One way to compute a mechanism.

    ``run(call, q, k, v) -> out | (out, lse)`` gets flattened ``(B, H, L, D)`` tensors;
    ``supports(call) -> None | reason`` says whether it can serve a call (capabilities as data).
    """

    name: str
    run: Callable
    supports: Callable[[Call], Optional[str]] = lambda call: None
    doc: str = ""


@dataclass
class Mechanism:
    """A catalogue entry. See the module docstring; ``formula`` is the exact definition."""

    name: str
    family: str
    paper: str
    summary: str
    formula: str
    layout: str  # "sequence" or "spatial"
    patterns: Tuple[str, ...]
    params: Tuple[Param, ...] = ()
    impls: Tuple[Implementation, ...] = ()
    gqa: bool = True
    spatial_dims: Tuple[int, ...] = (1, 2, 3)
    spec: Optional[Callable[[Call], tuple]] = None  # call -> (Mask | None, ScoreMod | None)
    check_params: Optional[Callable[[Call], None]] = None
    examples: Tuple[Mapping[str, Any], ...] = ({},)
    example_shape: Optional[tuple] = None  # small grid (spatial) or length (sequence) the examples fit
    extras: Dict[str, Any] = field(default_factory=dict)
    reference_impl: str = "reference"
    #: Linear / recurrent entries: their parallel, chunked and recurrent forms (attnlab.recurrent).
    recurrence: Optional[Any] = None
    #: Floats of per-layer state as a function of (heads, head_dim, value_dim, **params); None for
    #: entries whose state is a KV cache growing with the context.
    state_size: Optional[Callable[..., int]] = None
    #: Useful forward FLOPs of a call (the benchmark's numerator), when the area count of
    #: unmasked query-key pairs does not describe the mechanism's work; None otherwise.
    flops: Optional[Callable[[Call], float]] = None
    #: Time, memory and state complexity in L (length), d (head dim), w (window), C (chunk) ...
    complexity: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.recurrence is not None and self.state_size is None:
            size = self.recurrence.state_size

            def state_size(heads: int, head_dim: int, value_dim: int, **params) -> int:
                """Floats of per-layer state; parameters not given take the entry's defaults."""
                return size(heads, head_dim, value_dim, **{**{p.name: p.default for p in self.params}, **params})

            self.state_size = state_size

    # ---- capability data --------------------------------------------------------------
    @property
    def impl_names(self) -> Tuple[str, ...]:
        return tuple(i.name for i in self.impls)

    def impl(self, name: str) -> Implementation:
        for i in self.impls:
            if i.name == name:
                return i
        raise ValueError(f"{self.name}: impl must be one of {', '.join(self.impl_names)}, got {name!r}")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "summary": self.summary,
            "formula": self.formula,
            "layout": self.layout,
            "patterns": list(self.patterns),
            "gqa": self.gqa,
            "params": [p.as_dict() for p in self.params],
            "impls": [{"name": i.name, "doc": i.doc} for i in self.impls],
            "complexity": dict(self.complexity),
            "stateful": self.recurrence is not None,
        }

    # ---- calling ------------------------------------------------------------------------
    def __call__(self, q, k, v, causal: bool = False, impl: Optional[str] = None, scale: Optional[float] = None,
                 return_lse: bool = False, **params):
        """Run the fastest implementation that serves the call, or ``impl`` when given."""
        call = self.prepare(q, k, v, causal=causal, scale=scale, return_lse=return_lse, **params)
        chosen = self.select(call, impl)
        return self._run(chosen, call, q, k, v)

    def reference(self, q, k, v, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
                  **params):
        """The readable definition (the dense oracle with this mechanism's mask / modifier)."""
        return self(q, k, v, causal=causal, impl=self.reference_impl, scale=scale, return_lse=return_lse, **params)

    def scan(self, q, k, v, state=None, *, impl: str = "chunked", **params):
        """Causal segment continuing ``state`` (None: the initial state) -> ``(out, final state)``."""
        from .recurrent import scan

        return scan(self._stateful("scan"), q, k, v, state, impl=impl, **params)

    def step(self, state, q_t, k_t, v_t, **params):
        """One causal token ``(B, H, D)`` through the recurrent form -> ``(o_t, new state)``."""
        from .recurrent import step

        return step(self._stateful("step"), state, q_t, k_t, v_t, **params)

    def _stateful(self, what: str) -> "Mechanism":
        if self.recurrence is None:
            stateful = [m.name for m in mechanisms() if m.recurrence is not None]
            raise TypeError(f"{self.name} has no recurrent form, so no {what}(); entries with one: "
                            f"{', '.join(stateful) or 'none'}")
        return self

    def select(self, call: Call, impl: Optional[str] = None) -> Implementation:
        if impl is not None:
            if not isinstance(impl, str):
                raise TypeError(f"{self.name}: impl must be a string naming one of {', '.join(self.impl_names)}")
            chosen = self.impl(impl)
            why = chosen.supports(call)
            if why:
                raise ValueError(f"{self.name}: impl={impl!r} cannot serve this call: {why}")
            return chosen
        reasons = []
        for cand in self.impls:
            why = cand.supports(call)
            if not why:
                return cand
            reasons.append(f"{cand.name}: {why}")
        raise ValueError(f"{self.name}: no implementation serves this call ({'; '.join(reasons)})")

    def _run(self, chosen: Implementation, call: Call, q, k, v):
        if call.spatial:
            q, k, v = (x.flatten(2, -2) for x in (q, k, v))
        result = chosen.run(call, q, k, v)
        out, lse = result if isinstance(result, tuple) else (result, None)
        if call.spatial:
            out = out.unflatten(2, call.spatial)
            lse = None if lse is None else lse.unflatten(2, call.spatial)
        return (out, lse) if call.return_lse else out

    def prepare(self, q, k, v, *, causal=False, scale=None, return_lse=False, **params) -> Call:
        """Validate inputs and parameters; returns the :class:`Call` or raises naming the argument."""
        spatial = validate_inputs(self, q, k, v)
        if not isinstance(causal, bool):
            raise TypeError(f"{self.name}: causal must be True or False, got {causal!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"{self.name}: return_lse must be True or False, got {return_lse!r}")
        B, Hq = q.shape[:2]
        Hkv = k.shape[1]
        Lq = math.prod(q.shape[2:-1])
        Lk = math.prod(k.shape[2:-1])
        cross = Lq != Lk
        pattern = ("causal_" if causal else "noncausal_") + ("cross" if cross else "self")
        if pattern not in self.patterns:
            raise ValueError(f"{self.name} does not define the {pattern} pattern "
                             f"(q length {Lq}, k length {Lk}, causal={causal}); it supports: {', '.join(self.patterns)}")
        if Hq != Hkv and not self.gqa:
            raise ValueError(f"{self.name} needs as many key/value heads as query heads, got {Hkv} and {Hq}")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{self.name}: scale must be a positive finite float or None, got {scale!r}")
        norm = self.normalize_params(params, len(spatial) if spatial else 1)
        call = Call(self, B, Hq, Hkv, Lq, Lk, q.shape[-1], v.shape[-1], spatial, causal, pattern, norm, float(scale),
                    q.dtype, q.device, any(x.requires_grad for x in (q, k, v)), return_lse)
        if self.check_params:
            self.check_params(call)
        return call

    def normalize_params(self, params: Mapping[str, Any], ndim: int = 1) -> Dict[str, Any]:
        known = {p.name: p for p in self.params}
        for name in params:
            if name not in known:
                close = difflib.get_close_matches(name, list(known) + ["causal", "impl", "scale", "return_lse"], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                valid = ", ".join(known) or "none"
                raise TypeError(f"{self.name}: unknown parameter {name!r} (its parameters: {valid}){hint}")
        return {p.name: p.validate(params.get(p.name, p.default), self.name, ndim) for p in self.params}


def validate_inputs(mech: Mechanism, q, k, v) -> Optional[tuple]:
    """Check q, k, v against the mechanism's layout; returns the spatial shape (or None)."""
    name = mech.name
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mech.layout == "sequence":
        ranks = (4,)
        want = "(B, H, L, D)"
    else:
        ranks = tuple(3 + n for n in mech.spatial_dims)
        want = " or ".join(f"(B, H, {', '.join('S%d' % i for i in range(n))}, D)" for n in mech.spatial_dims)
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() not in ranks:
            raise ValueError(f"{name}: {arg} must have shape {want}, got {x.dim()} dims {tuple(x.shape)}")
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name}: {arg} has an empty axis, shape {tuple(x.shape)}; every axis needs size >= 1")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"{name}: q, k and v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{name}: q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{name}: k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ValueError(f"{name}: k and v must have the same length, got {tuple(k.shape[2:-1])} and "
                         f"{tuple(v.shape[2:-1])}")
    if mech.layout == "spatial":
        if q.shape[2:-1] != k.shape[2:-1]:
            raise ValueError(f"{name}: q and k must have the same spatial shape (self attention on a grid), got "
                             f"{tuple(q.shape[2:-1])} and {tuple(k.shape[2:-1])}; {name} supports: "
                             f"{', '.join(mech.patterns)}")
        return tuple(q.shape[2:-1])
    return None


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def register(mech: Mechanism) -> Mechanism:
    if mech.name in _REGISTRY:
        raise ValueError(f"a mechanism named {mech.name!r} is already registered")
    bad = [p for p in mech.patterns if p not in PATTERNS]
    if bad:
        raise ValueError(f"{mech.name}: unknown patterns {bad}; valid: {', '.join(PATTERNS)}")
    _REGISTRY[mech.name] = mech
    return mech


def mechanism(name: str) -> Mechanism:
    """The catalogue entry called ``name``; a KeyError lists close names when unknown."""
    _load()
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise KeyError(f"no mechanism named {name!r}{hint}") from None


def mechanisms(family: Optional[str] = None, pattern: Optional[str] = None) -> List[Mechanism]:
    """All catalogue entries, optionally only one family and/or those defining one CAB pattern."""
    _load()
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    families = sorted({m.family for m in _REGISTRY.values()})
    if family is not None and family not in families:
        raise ValueError(f"family must be one of {', '.join(families)}, got {family!r}")
    return [m for m in _REGISTRY.values()
            if (family is None or m.family == family) and (pattern is None or pattern in m.patterns)]


def _load():
    from . import entries as _  # noqa: F401  (registers the built-in entries)
