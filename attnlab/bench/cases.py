"""Benchmark cases: one configuration each, expanded from the options, and their inputs.

A :class:`Case` is pure configuration (JSON-able, hashable by :meth:`Case.key`): mechanism,
requested impl, CAB pattern, direction, dtype, shapes, grid and parameters. Mechanisms are named
as in the catalogue, spatial ones optionally with a rank: ``neighborhood:2d``. A length ``L``
maps to a sequence of ``L`` tokens, or for a spatial mechanism to a near-square (near-cubic) grid
of ``L`` tokens (:func:`~attnlab.bench.presets.grid_for`, recorded as ``grid``). Cross patterns
use ``L // 2`` queries against ``L`` keys.

The baseline of every case is ``torch.nn.functional.scaled_dot_product_attention`` called
directly (case mechanism ``torch_sdpa``, impl ``torch``: not a catalogue entry) on the same
batch, heads, token count, head dim, dtype, causality and direction, measured in the same run.
Calling torch directly rather than through ``attnlab.mechanism("dense")`` makes the ratio of the
``dense`` rows read as attnlab's overhead over SDPA (the target is <= 5%), and keeps the
baseline from duplicating the ``dense`` row.

Besides catalogue names, a mechanism spec may be ``longca`` (LongCA-bench's whole mask set,
:mod:`attnlab.bench.longca`) or ``longca:MASK``: each runs at its mask's own pattern, whatever
``--patterns`` says, with its drawn quantities (document lengths, ...) resolved per length and
seed into the case's parameters. ``family:NAME`` stands for every catalogue entry of a family
(``family:linear``).
"""
from __future__ import annotations

import importlib
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import catalogue
from . import longca, presets
from .store import case_key

#: ``fwd`` and ``fwdbwd`` time the whole call; ``step`` times the decoding step of token ``L``:
#: ``m.step`` on the state of a chunked scan over the ``L - 1`` tokens before it (recurrent entries),
#: against SDPA attending that one query to the ``L`` cached keys (KV-cache decoding) as the baseline.
DIRECTIONS = ("fwd", "fwdbwd", "step")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
AUTO = "auto"
BASELINE = "torch_sdpa"  # mechanism name of the baseline cases (impl "torch")


@dataclass(frozen=True)
class Case:
    mechanism: str
    impl: str  # "auto" = what the mechanism picks for the call
    pattern: str
    direction: str
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    grid: Optional[Tuple[int, ...]]
    params: Dict[str, Any] = field(hash=False)  # part of key(); dicts are unhashable

    def config(self) -> Dict[str, Any]:
        d = asdict(self)
        d["grid"] = None if self.grid is None else list(self.grid)
        return d

    def key(self) -> str:
        return case_key(self.config())

    @property
    def causal(self) -> bool:
        return self.pattern.startswith("causal")

    @property
    def label(self) -> str:
        """Mechanism name with its grid rank for spatial mechanisms: ``neighborhood 2d``."""
        if self.is_baseline():
            return "SDPA (baseline)"
        return self.mechanism if self.grid is None else f"{self.mechanism} {len(self.grid)}d"

    def baseline(self) -> "Case":
        """Direct torch SDPA on the same shapes, dtype, causality and direction."""
        return replace(self, mechanism=BASELINE, impl="torch", grid=None, params={})

    def is_baseline(self) -> bool:
        return self.mechanism == BASELINE


def mechanism_of(name: str) -> catalogue.Mechanism:
    """The mechanism a case names: a catalogue entry or a LongCA-bench pseudo-mechanism."""
    return longca.mechanism(name) if longca.is_longca(name) else catalogue.mechanism(name)


def specs(spec: str) -> List[str]:
    """One ``--mechanisms`` item as mechanism specs: ``longca`` -> every LongCA-bench mask,
    ``family:NAME`` -> every catalogue entry of that family (spatial ones at their default rank)."""
    spec = spec.strip()
    if spec == longca.PREFIX:
        return longca.names()
    if spec.startswith("family:"):
        fam = spec.split(":", 1)[1]
        return [m.name for m in catalogue.mechanisms(family=fam)]  # raises naming the valid families
    return [spec]


def parse_mechanism(spec: str) -> Tuple[catalogue.Mechanism, Optional[int]]:
    """``name`` or ``name:Nd`` -> (mechanism, spatial rank or None). Raises naming close names."""
    if longca.is_longca(spec.strip()):
        return longca.mechanism(spec.strip()), None
    name, _, rank = spec.strip().partition(":")
    mech = catalogue.mechanism(name)
    if mech.layout != "spatial":
        if rank:
            raise ValueError(f"{name} is a sequence mechanism; drop the ':{rank}' (ranks are for spatial ones)")
        return mech, None
    if not rank:
        return mech, 2 if 2 in mech.spatial_dims else mech.spatial_dims[0]
    try:
        n = int(rank.lower().rstrip("d"))
    except ValueError:
        n = -1
    if n not in mech.spatial_dims:
        raise ValueError(f"{name}: rank must be one of {', '.join(f'{d}d' for d in mech.spatial_dims)}, got {rank!r}")
    return mech, n


def expand(
    mechanisms: Sequence[str],
    lengths: Sequence[int],
    directions: Sequence[str],
    patterns: Optional[Sequence[str]] = None,
    *,
    dtypes: Sequence[str] = ("float32",),
    batch: int = 1,
    heads: int = 8,
    kv_heads: Optional[int] = None,
    head_dim: int = 64,
    impl: Optional[str] = None,
    params: Optional[Dict[str, Dict[str, Any]]] = None,
    seed: int = 0,
) -> List[Case]:
    """The cross product as cases (the caller adds baselines). ``patterns=None``: first self pattern.

    ``seed`` seeds the drawn parameters of LongCA-bench masks (document lengths, ...)."""
    out = []
    for spec in [x for s in mechanisms for x in specs(s)]:
        mech, rank = parse_mechanism(spec)
        if longca.is_longca(mech.name):
            pats = list(mech.patterns)  # the mask decides its pattern
        else:
            pats = patterns or [next((p for p in mech.patterns if p.endswith("_self")), mech.patterns[0])]
        for L in lengths:
            for pattern in pats:
                for direction in directions:
                    for dtype in dtypes:
                        cross = pattern.endswith("_cross")
                        q_len = max(1, L // 2) if cross else L
                        grid = presets.grid_for(L, rank) if rank else None
                        shape = grid or (L,)
                        if longca.is_longca(mech.name):
                            p = longca.draw_params(mech.name.split(":", 1)[1], L, seed)
                        else:
                            p = presets.default_params(mech.name, shape, heads, head_dim)
                        p.update((params or {}).get(mech.name, {}))
                        if rank:  # "neighborhood:2d" entries override "neighborhood" ones for that rank
                            p.update((params or {}).get(f"{mech.name}:{rank}d", {}))
                        out.append(Case(mech.name, impl or AUTO, pattern, direction, dtype, batch, heads,
                                        kv_heads or heads, q_len, L, head_dim, grid, _jsonable(p)))
    return out


def ordered_with_baselines(cases: Iterable[Case]) -> List[Case]:
    """Unique cases, each shape group preceded by its SDPA baseline, smallest lengths first."""
    seen, groups = set(), {}
    for c in cases:
        if c.key() in seen:
            continue
        seen.add(c.key())
        b = c.baseline()
        groups.setdefault(b.key(), [b])
        if not c.is_baseline():
            groups[b.key()].append(c)
    order = sorted(groups.values(), key=lambda g: (g[0].kv_len, g[0].direction != "fwd", g[0].pattern,
                                                   g[0].dtype, g[0].key()))
    return [c for g in order for c in g]


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def seed_of(case: Case, seed: int) -> int:
    """A stable per-case seed: the run seed mixed with the case key (same case, same inputs)."""
    return (seed * 1_000_003 + zlib.crc32(case.key().encode())) % (2 ** 63)


def call_params(case: Case, gen: torch.Generator) -> Dict[str, Any]:
    """The case's parameters as the mechanism takes them (lists -> tuples, ``{"randn": shape}`` -> a
    seeded tensor, ``{"randn": shape, "map": "module:function"}`` -> that function of it)."""
    def conv(v):
        if isinstance(v, dict) and "randn" in v and set(v) <= {"randn", "map"}:
            x = torch.randn(*v["randn"], generator=gen, dtype=DTYPES[case.dtype])
            if "map" in v:
                module, _, fn = v["map"].partition(":")
                x = getattr(importlib.import_module(module), fn)(x)
            return x
        if isinstance(v, list):
            return tuple(conv(x) for x in v)
        return v

    return {k: conv(v) for k, v in case.params.items()}


def make_inputs(case: Case, seed: int):
    """Seeded ``q, k, v`` (requiring grad for ``fwdbwd``), the output gradient and call parameters."""
    gen = torch.Generator().manual_seed(seed_of(case, seed))
    dtype = DTYPES[case.dtype]
    if case.grid is not None:
        q_shape = k_shape = tuple(case.grid)
    else:
        q_shape, k_shape = (case.q_len,), (case.kv_len,)
    B, D = case.batch, case.head_dim
    grad = case.direction == "fwdbwd"
    q = torch.randn(B, case.heads, *q_shape, D, generator=gen, dtype=dtype)
    if not case.is_baseline() and mechanism_of(case.mechanism).extras.get("shared_query"):
        # one query per head at every position (Aaren), given as its users give it: a view of the one row
        # (the gradient lands in the leaf row: q.grad is that of the view's base)
        q = q[:, :, :1].clone().requires_grad_(grad).expand_as(q)
    else:
        q = q.requires_grad_(grad)
    k = torch.randn(B, case.kv_heads, *k_shape, D, generator=gen, dtype=dtype).requires_grad_(grad)
    v = torch.randn(B, case.kv_heads, *k_shape, D, generator=gen, dtype=dtype).requires_grad_(grad)
    dout = torch.randn(B, case.heads, *q_shape, D, generator=gen, dtype=dtype) if grad else None
    return q, k, v, dout, call_params(case, gen)
