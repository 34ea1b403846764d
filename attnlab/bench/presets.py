"""What a benchmark runs when not told otherwise: default parameters per mechanism, and presets.

**Default parameters.** ``DEFAULT_PARAMS[name]`` maps a parameter to a value, or to a function
of the case's token shape (``(L,)`` for sequences, the grid for spatial mechanisms) and its
query heads, so that one default fits every length. They are chosen so that local patterns
see about 512 keys per query (sliding window 512, neighbourhood 513 / 23x23 / 8x8x8), close to
the settings of the papers at these lengths. ``--params`` overrides them key by key; the
resolved values are recorded with every case. A value ``{"randn": shape}`` stands for a seeded
``torch.randn`` tensor of that shape (learnable tables such as ``relative_bias``), and
``{"randn": shape, "map": "module:function"}`` for that function applied to it (GLA's gates:
``attnlab.entries.gla:gate_log`` of N(0, 1) logits).

**Presets.** A preset is a list of *groups* (mechanisms x lengths x directions x patterns) plus
repeats, warm-up and per-case timeout. Options given on the command line replace the preset's
value in every group (duplicates are dropped), so ``--lengths 8192`` keeps a preset's
mechanisms and directions.

``quick`` (the default) must finish in under 3 minutes on 2 CPU cores *including* FlexAttention's
first-call compilation (about 5-20 s per new mask and shape): dense, sliding_window, 2-D
neighborhood, document and the first linear-family entry forward at 1024, 2048 and 4096 tokens
(three lengths: log-log slopes and CAB efficiency lengths), the exact PyTorch ``tiled`` engine
forward at 1024 only (it computes every pair in Python-driven tiles: seconds per call at 4K), all
six forward+backward at 1024 (backward runs on the ``tiled`` engine on CPU, an order of magnitude
slower than the compiled forward), and two LongCA-bench masks (packed causal documents and
share-question) forward at 4096. ``standard`` and ``full`` take every catalogue entry when the
plan is made (entries registered later are included) and LongCA-bench's whole mask set.

Presets may carry quality-task groups (:class:`TaskGroup`; ``full`` runs every task at its full
configurations after the efficiency cases); ``--task`` replaces them, ``--task none`` drops them.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

#: Axis sizes of the local window per spatial rank, chosen to see ~512 keys.
_NA_KERNEL = {1: 513, 2: 23, 3: 8}


def _per_axis(sizes: Dict[int, int]) -> Callable:
    """Per-axis value for the grid's rank, clipped to each axis."""
    return lambda shape, heads: [min(sizes[len(shape)], n) for n in shape]


def _divisor_at_most(n: int, g: int) -> int:
    return max(d for d in range(1, min(n, g) + 1) if n % d == 0)


def _documents(shape, heads) -> List[int]:
    """Four packed documents of 1/2, 1/4, 1/8 and the rest of the sequence (deterministic)."""
    L = shape[0]
    if L < 8:
        return [L]
    parts = [L // 2, L // 4, L // 8]
    return parts + [L - sum(parts)]


def _segments(shape, heads, n: int = 8) -> List[int]:
    L = shape[0]
    n = min(n, L)
    return [L // n] * (n - 1) + [L - (L // n) * (n - 1)]


DEFAULT_PARAMS: Dict[str, Dict[str, Any]] = {
    "dense": {},
    "tiled": {},
    "sliding_window": {"window": 512},
    "sink_window": {"sinks": 4, "window": 512},
    "shifted_sparse": {"group_size": lambda shape, heads: max(2, shape[0] // 4)},
    "head_sharded": {"block_size": 64, "local_blocks": 16, "vert_stride": 8},
    "strided": {"stride": 128, "mode": "strided"},
    "prefix_lm": {"prefix": lambda shape, heads: shape[0] // 4},
    "document": {"document_lengths": _documents},
    "segment_stream": {"segment_lengths": _segments},
    "alibi": {},
    "relative_bias": {"table": lambda shape, heads: {"randn": [heads, 2 * 128 + 1]}},
    "softcap": {"cap": 30.0},
    "neighborhood": {"kernel_size": _per_axis(_NA_KERNEL)},
    "gna": {"kernel_size": _per_axis({1: 512, 2: 24, 3: 8}), "stride": _per_axis({1: 128, 2: 8, 3: 4})},
    "window": {"window_size": _per_axis({1: 512, 2: 16, 3: 8})},
    "shifted_window": {"window_size": _per_axis({1: 512, 2: 16, 3: 8})},
    "halo": {"block_size": _per_axis({1: 256, 2: 8, 3: 4}), "halo_size": _per_axis({1: 128, 2: 3, 3: 2})},
    "grid": {"grid_size": lambda shape, heads: [_divisor_at_most(n, 8) for n in shape]},
    "tile3d": {"global_frames": 1},
    # GLA's per-token log forget gates, one per head and token: GLA's own map of seeded N(0, 1) logits.
    "gla": {"log_gates": lambda shape, heads: {"randn": [1, heads, shape[0], 1],
                                               "map": "attnlab.entries.gla:gate_log"}},
    # Agent attention's causal form needs given agent tokens (pooling queries would see the future):
    # 16 seeded agents per head, used for every pattern so the patterns compare like with like.
    "agent": {"agents": lambda shape, heads, head_dim: {"randn": [1, heads, 16, head_dim]}},
}


def default_params(name: str, shape: Tuple[int, ...], heads: int, head_dim: int = 64) -> Dict[str, Any]:
    """The resolved (JSON-able) default parameters of mechanism ``name`` for one case shape (a
    function of ``(shape, heads)``, or of ``(shape, heads, head_dim)`` when it takes three arguments)."""
    def resolve(v):
        if not callable(v):
            return v
        wants_dim = len(inspect.signature(v).parameters) == 3
        return v(tuple(shape), heads, head_dim) if wants_dim else v(tuple(shape), heads)

    return {k: resolve(v) for k, v in DEFAULT_PARAMS.get(name, {}).items()}


def grid_for(length: int, ndim: int) -> Tuple[int, ...]:
    """A near-square (near-cubic) grid of exactly ``length`` tokens: 4096 -> (64, 64), 8192 -> (64, 128).

    Axes are non-decreasing; each is the largest divisor of what remains that is at most its
    fair share (so a prime length gives (1, ..., L))."""
    dims = []
    rest = length
    for axes_left in range(ndim, 1, -1):
        share = rest ** (1 / axes_left)
        d = max(x for x in range(1, int(math.floor(share + 1e-9)) + 1) if rest % x == 0)
        dims.append(d)
        rest //= d
    dims.append(rest)
    return tuple(dims)


def _entries(family: Optional[str] = None, layout: Optional[str] = None, first: bool = False) -> Tuple[str, ...]:
    """Catalogue entries at plan time (so entries registered later are included)."""
    from .. import catalogue

    names = tuple(m.name for m in catalogue.mechanisms() if (family is None or m.family == family)
                  and (layout is None or m.layout == layout))
    return names[:1] if first else names


@dataclass(frozen=True)
class Group:
    """One cross product of a preset. ``patterns=None``: each mechanism's first self pattern.

    ``mechanisms`` is a tuple of specs or a function returning one when the plan is made."""

    mechanisms: Union[Tuple[str, ...], Callable[[], Tuple[str, ...]]]
    lengths: Tuple[int, ...]
    directions: Tuple[str, ...] = ("fwd", "fwdbwd")
    patterns: Optional[Tuple[str, ...]] = None

    def names(self) -> Tuple[str, ...]:
        return tuple(self.mechanisms() if callable(self.mechanisms) else self.mechanisms)


@dataclass(frozen=True)
class TaskGroup:
    """Quality-task cases of a preset: ``task`` (a name of :mod:`attnlab.bench.tasks`, or ``all``) for
    each mechanism (tuple or function) and seed, at the configurations the task module gives for
    ``size`` (``tiny``, ``quick``, ``standard``, ``full``)."""

    task: str
    mechanisms: Union[Tuple[str, ...], Callable[[], Tuple[str, ...]]]
    size: str
    seeds: Tuple[int, ...] = (0,)

    def names(self) -> Tuple[str, ...]:
        return tuple(self.mechanisms() if callable(self.mechanisms) else self.mechanisms)


@dataclass(frozen=True)
class Preset:
    groups: Tuple[Group, ...]
    repeats: int
    warmup: int
    timeout: float
    doc: str = ""
    tasks: Tuple[TaskGroup, ...] = ()
    task_timeout: float = 600.0


_QUICK_MECHS = ("dense", "tiled", "sliding_window", "neighborhood:2d", "document")
_SPATIAL = ("neighborhood:1d", "neighborhood:2d", "neighborhood:3d", "gna:2d", "window:2d", "shifted_window:2d",
            "halo:2d", "grid:2d", "tile3d:3d")
#: LongCA-bench masks in the quick preset: packed documents (the realistic long-tailed draw) and
#: the two multi-range masks, share-question and causal-blockwise.
_QUICK_LONGCA = ("longca:causal_document", "longca:share_question")


def _quick() -> Tuple[str, ...]:
    return _QUICK_MECHS + _entries(family="linear", first=True)


def _quick_local() -> Tuple[str, ...]:
    """The quick mechanisms that are not exact attention (the PyTorch ``tiled`` engine computes every
    pair: seconds per call at 4K on 2 cores, so it runs at two lengths only)."""
    return tuple(m for m in _quick() if m != "tiled")


def task_mechanisms() -> Tuple[str, ...]:
    """Token mixers of a ``--task`` run without ``--mechanisms``: dense and sliding-window softmax
    attention, and every linear-family entry (the Zoology comparison)."""
    return ("dense", "sliding_window") + _entries(family="linear")


def _every() -> Tuple[str, ...]:
    return _entries(layout="sequence") + _SPATIAL


PRESETS: Dict[str, Preset] = {
    "quick": Preset(
        groups=(Group(_quick_local, (1024, 2048, 4096), ("fwd",)), Group(_quick, (1024,), ("fwd", "fwdbwd")),
                Group(_QUICK_LONGCA, (4096,), ("fwd",))),
        repeats=5, warmup=1, timeout=60.0,
        doc="dense, sliding_window, neighborhood 2d, document and the first linear entry fwd at 1K, 2K and 4K "
            "(slopes and efficiency lengths), these and tiled fwd and fwd+bwd at 1K; two LongCA-bench masks fwd at "
            "4K (< 3 min on 2 cores)"),
    "standard": Preset(
        groups=(Group(_every, (1024, 2048, 4096, 8192), ("fwd",)), Group(_every, (1024, 2048), ("fwdbwd",)),
                Group(("longca",), (1024, 2048, 4096), ("fwd",))),
        repeats=5, warmup=1, timeout=300.0,
        doc="every mechanism; fwd at 1K-8K, fwd+bwd at 1K-2K; LongCA-bench's mask set fwd at 1K-4K"),
    "full": Preset(
        groups=(Group(_every, (1024, 2048, 4096, 8192, 16384), ("fwd", "fwdbwd"),
                      ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")),
                Group(("longca",), (1024, 2048, 4096, 8192, 16384), ("fwd", "fwdbwd"))),
        repeats=10, warmup=2, timeout=600.0, tasks=(TaskGroup("all", task_mechanisms, "full"),), task_timeout=3600.0,
        doc="every mechanism x the four CAB patterns x 1K-16K x fwd and fwd+bwd; LongCA-bench's mask set at 1K-16K; "
            "every quality task at its full configurations"),
}
