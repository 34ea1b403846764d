"""The conformance checks every catalogue entry must pass, shared by the test suite and the CLI.

``run_checks(mech)`` runs, for every example of the entry x every CAB pattern it declares x every
implementation, the checks below on small random inputs and returns one :class:`CheckResult` per
check. ``tests/conformance`` runs them for every registered entry (so a new entry is enrolled the
moment it is registered) and ``attnlab check NAME`` prints them.

Inputs (:func:`example_inputs`): ``B = 2``, ``Hq = 4``, ``Hkv = 2`` (GQA), ``D = 8`` for q/k and
``Dv = 6`` for v. Sequences have ``L = mech.extras.get("example_length", 37)`` for self attention and
``Lq = 23 < Lk = L`` for cross attention (bottom-right causal alignment); spatial examples are
``(grid_shape, params)`` tuples. Example parameter values that are callables are called with the
number of query heads (e.g. ``relative_bias``'s table); floating tensor parameters take the input
dtype. Examples that set ``is_causal`` are skipped for ``causal=True`` calls (they contradict it).

Checks and tolerances (``scale = max(1, max |reference|)`` of the compared quantity):

``forward``      output equals the entry's reference (the dense oracle with its mask), computed
                 in float64: float64 inputs within ``1e-10 * scale``; the same inputs rounded to
                 float32 within ``2e-5 * scale`` of the float64 reference. Shape and dtype checked.
``gradients``    float64 gradients w.r.t. q, k, v and every tensor parameter the score modifier
                 reads (e.g. the relative-bias table, a dense additive bias) equal the reference's
                 autograd gradients within ``1e-9 * scale``, for the loss ``sum(out * G)``, G random.
``gradcheck``    ``torch.autograd.gradcheck`` (float64, default tolerances) of the implementations
                 with a hand-written backward (``tiled``, plus ``mech.extras["gradcheck_impls"]``)
                 on a tiny shape (B=1, Hq=2, Hkv=1, L=10 or Lq=6/Lk=10, D=4, Dv=3); where the
                 example's parameters do not fit that shape (document lengths, spatial grids) on
                 the example's own shape in ``fast_mode``.
``causality``    causal patterns only. Prefix (sequence layout): the output on the prefix
                 ``0..i`` equals rows ``0..i`` of the full output, for a few ``i`` (CAB's check);
                 skipped with the reason where the parameters are not valid on a prefix (document
                 lengths) or the entry says its definition depends on the length
                 (``mech.extras["prefix_check"](params) -> reason``). Perturbation (sequence and
                 spatial, raster order): replacing queries, keys and values after position ``i``
                 leaves rows ``0..i`` unchanged. Same tolerance as ``forward`` for the dtype used.
``gqa``          ``Hkv < Hq`` equals the dense oracle with k, v ``repeat_interleave``-d to Hq heads
                 (the mask/modifier of the GQA call, so patterns that depend on the kv head, like
                 ``head_sharded``, are compared like with like); ``Hkv == Hq`` equals the reference.
``patterns``     every declared pattern (incl. cross) runs through automatic implementation
                 selection and equals the reference; every undeclared one raises ValueError
                 naming the supported patterns.
``batch``        the output of batch element ``b`` computed alone equals its slice.
``determinism``  two identical calls are bitwise equal.
``bad_input``    wrong rank, mismatched batch / heads / head dim / kv length, empty axes, integer
                 dtypes, mixed dtypes or devices, invalid or unknown parameters, bad ``causal`` /
                 ``scale`` raise ValueError/TypeError whose message names the argument.
``nan``          a NaN in query row ``i`` makes output row ``i`` NaN and leaves the other rows
                 finite (documented in :mod:`attnlab.reference`), for every implementation.

An implementation that does not serve a call (its ``supports`` gives a reason) is reported as
skipped with that reason. Implementations that cannot take float64 (FlexAttention on CPU) are
checked in float32; FlexAttention on CPU is inference-only, so its gradient checks are skipped.
Set ``ATTNLAB_FLEX_COMPILE=0`` to check the FlexAttention block-mask logic without paying for
``torch.compile`` per shape (the test suite does).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.autograd.gradcheck import GradcheckError

from . import reference as _ref
from .catalogue import PATTERNS, Mechanism, mechanism as _lookup
from .recurrent import token_params

B, HQ, HKV, D, DV = 2, 4, 2, 8, 6
DEFAULT_LENGTH = 37
CROSS_LQ = 23
FLOAT64_ATOL = 1e-10
FLOAT32_ATOL = 2e-5
GRAD_ATOL = 1e-9
GRADCHECK_IMPLS = ("tiled",)
GROUPS = ("forward", "gradients", "gradcheck", "causality", "gqa", "patterns", "batch", "determinism", "bad_input",
          "nan", "forms")
ATOL = {torch.float64: FLOAT64_ATOL, torch.float32: FLOAT32_ATOL}


@dataclass
class CheckResult:
    """One check's verdict. ``detail`` states the measured error and the tolerance, or why skipped.

    ``name`` is ``group.check/example/pattern/impl`` (``-`` where not applicable).
    """

    name: str
    ok: bool
    detail: str
    skipped: bool = False
    group: str = ""
    example: str = "-"
    pattern: str = "-"
    impl: str = "-"

    def __str__(self) -> str:
        verdict = "SKIP" if self.skipped else ("ok" if self.ok else "FAIL")
        return f"{verdict:4} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Example:
    """One entry of ``mech.examples``, normalized: ``shape`` is the grid (spatial) or None."""

    index: int
    shape: Optional[tuple]
    params: Mapping[str, Any]

    @property
    def label(self) -> str:
        parts = ["x".join(map(str, self.shape))] if self.shape else []
        for k, v in self.params.items():
            parts.append(f"{k}={'<fn>' if callable(v) else v}")
        return f"ex{self.index}[{' '.join(parts)}]"


@dataclass
class Inputs:
    """q, k, v and the resolved parameters of one example under one pattern.

    Unpacks as ``q, k, v, params = example_inputs(...)``; ``kwargs()`` is ``causal`` + params.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: Dict[str, Any]
    causal: bool
    pattern: str
    spatial: Optional[tuple] = None

    def __iter__(self) -> Iterator:
        return iter((self.q, self.k, self.v, self.params))

    def kwargs(self, **over) -> dict:
        return {"causal": self.causal, **self.params, **over}

    @property
    def offset(self) -> int:
        """``Lk - Lq`` (flattened lengths)."""
        return _flat(self.k).shape[2] - _flat(self.q).shape[2]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def examples(mech: Mechanism) -> List[Example]:
    """The entry's examples, normalized (spatial entries give ``(shape, params)`` tuples)."""
    return [_as_example(mech, e, i) for i, e in enumerate(mech.examples)]


def _as_example(mech: Mechanism, example, index: int = 0) -> Example:
    if isinstance(example, Example):
        return example
    if isinstance(example, int) and not isinstance(example, bool):
        return _as_example(mech, mech.examples[example], example)
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], Mapping):
        shape, params = example
        return Example(index, tuple(int(s) for s in shape), dict(params))
    if isinstance(example, Mapping):
        if mech.layout == "spatial":
            shape = mech.example_shape or (DEFAULT_LENGTH,) * min(mech.spatial_dims)
            return Example(index, tuple(shape), dict(example))
        return Example(index, None, dict(example))
    raise TypeError(f"{mech.name}: an example must be a dict of parameters or a (shape, params) tuple, "
                    f"got {example!r}")


def example_inputs(mech: Mechanism, example, pattern: str, *, dtype: torch.dtype = torch.float64, gqa: bool = True,
                   seed: int = 0, batch: int = B, q_heads: int = HQ, kv_heads: Optional[int] = None,
                   head_dim: int = D, value_dim: int = DV, length: Optional[int] = None,
                   cross_length: Optional[int] = None) -> Inputs:
    """Small random q, k, v (+ resolved parameters) for one example of ``mech`` under ``pattern``.

    ``example`` is an index into ``mech.examples``, one of its entries, or an :class:`Example`.
    Defaults: ``B=2, Hq=4, Hkv=2`` (``Hkv=Hq`` with ``gqa=False``), ``D=8, Dv=6``; sequences of
    ``L = extras["example_length"]`` (37) keys, ``Lq = 23`` queries for cross patterns. The
    keyword overrides (``length`` etc.) exist for the tiny gradcheck shapes. Values are drawn in
    float64 from ``seed`` and rounded to ``dtype``, so different dtypes see the same numbers.
    """
    ex = _as_example(mech, example)
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    if kv_heads is None:
        kv_heads = (q_heads // 2 if q_heads % 2 == 0 and q_heads > 1 else q_heads) if gqa else q_heads
    if not mech.gqa:
        kv_heads = q_heads
    if ex.shape is not None:
        if cross:
            raise ValueError(f"{mech.name}: spatial inputs have no cross-attention form (q and k share one grid)")
        q_shape = k_shape = ex.shape
    else:
        L = length or mech.extras.get("example_length", DEFAULT_LENGTH)
        lq = (cross_length or (CROSS_LQ if L > CROSS_LQ else max(1, L // 2))) if cross else L
        q_shape, k_shape = (lq,), (L,)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = rnd(batch, q_heads, *q_shape, head_dim)
    if mech.extras.get("shared_query"):  # one query per (batch, head), repeated along the length axis (aaren)
        q = q[:, :, :1].expand_as(q).clone()
    k = rnd(batch, kv_heads, *k_shape, head_dim)
    v = rnd(batch, kv_heads, *k_shape, value_dim)
    params = {}
    for name, value in ex.params.items():
        if callable(value) and not isinstance(value, torch.Tensor):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                value = _call_example(value, batch=batch, heads=q_heads, length=k_shape[0] if ex.shape is None
                                      else None, head_dim=head_dim, value_dim=value_dim)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype)
        params[name] = value
    return Inputs(q, k, v, params, causal, pattern, ex.shape)


def _call_example(fn: Callable, **shape) -> Any:
    """An example parameter given as a function: ``fn(q_heads)``, or ``fn(**shape)`` when it names any
    of ``batch, heads, length, head_dim, value_dim`` (per-token tensors need the length)."""
    names = set(inspect.signature(fn).parameters)
    if names & set(shape):
        return fn(**{k: v for k, v in shape.items() if k in names})
    return fn(shape["heads"])


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, *grid, D) -> (B, H, L, D); sequences unchanged."""
    return x if x.dim() == 4 else x.flatten(2, -2)


def _unflat_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if like.dim() == 4 else x.unflatten(2, like.shape[2:-1])


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _scale(x: torch.Tensor) -> float:
    return max(1.0, float(x.double().abs().max())) if x.numel() else 1.0


def _compare(a, ref, atol: float, what: str = "max |err|") -> Tuple[bool, str]:
    err, tol = _max_err(a, ref), atol * _scale(ref)
    if a.shape != ref.shape:
        return False, f"shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}"
    ok = err <= tol  # NaN err -> False
    return ok, f"{what} {err:.3g} {'<=' if ok else '>'} tol {tol:.3g} ({atol:g} x scale)"


# --------------------------------------------------------------------------------------------
# One (example, pattern): inputs, the reference and helpers shared by the checks
# --------------------------------------------------------------------------------------------
class _Case:
    def __init__(self, mech: Mechanism, ex: Example, pattern: str, seed: int):
        self.mech, self.ex, self.pattern, self.seed = mech, ex, pattern, seed
        self._inputs: Dict[tuple, Inputs] = {}
        self._ref = None
        self._ref_grads = None

    def inputs(self, dtype=torch.float64, gqa=True) -> Inputs:
        key = (dtype, gqa)
        if key not in self._inputs:
            self._inputs[key] = example_inputs(self.mech, self.ex, self.pattern, dtype=dtype, gqa=gqa, seed=self.seed)
        return self._inputs[key]

    def run(self, impl: str, x: Inputs, q=None, k=None, v=None, **over):
        q, k, v = (x.q if q is None else q), (x.k if k is None else k), (x.v if v is None else v)
        return self.mech(q, k, v, impl=impl, **x.kwargs(**over))

    def why_not(self, impl: str, x: Inputs, requires_grad: bool = False) -> Optional[str]:
        """The implementation's reason for not serving the call, or None."""
        q = x.q.detach().requires_grad_(True) if requires_grad else x.q
        call = self.mech.prepare(q, x.k, x.v, **x.kwargs())
        return self.mech.impl(impl).supports(call)

    def work_dtype(self, impl: str) -> Tuple[Optional[torch.dtype], str]:
        """float64 when the implementation takes it, else float32; (None, reason) if neither."""
        reasons = []
        for dt in (torch.float64, torch.float32):
            why = self.why_not(impl, self.inputs(dt))
            if not why:
                return dt, ""
            reasons.append(f"{dt}: {why}")
        return None, "; ".join(reasons)

    @property
    def reference(self) -> torch.Tensor:
        if self._ref is None:
            self._ref = self.run(self.mech.reference_impl, self.inputs())
        return self._ref

    def grad_leaves(self, x: Inputs) -> Tuple[list, dict, list]:
        """Fresh leaves: [q, k, v, *tensor params the score modifier differentiates], params, names."""
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (x.q, x.k, x.v))
        params = dict(x.params)
        names = ["q", "k", "v"]
        leaves = [q, k, v]
        for name in differentiable_params(self.mech, x):
            params[name] = params[name].detach().clone().requires_grad_(True)
            leaves.append(params[name])
            names.append(name)
        return leaves, params, names

    def grads(self, impl: str) -> Tuple[list, list]:
        x = self.inputs()
        leaves, params, names = self.grad_leaves(x)
        out = self.mech(leaves[0], leaves[1], leaves[2], impl=impl, causal=x.causal, **params)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.seed + 1), dtype=out.dtype)
        grads = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
        return [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)], names

    @property
    def reference_grads(self):
        if self._ref_grads is None:
            self._ref_grads = self.grads(self.mech.reference_impl)
        return self._ref_grads


def differentiable_params(mech: Mechanism, x: Inputs) -> List[str]:
    """Names of the floating tensor parameters the call's score modifier reads (they get gradients)."""
    if mech.recurrence is not None:  # every float tensor parameter (decays, gates, projections)
        return [n for n, val in x.params.items() if isinstance(val, torch.Tensor) and val.is_floating_point()]
    if mech.spec is None:
        return []
    call = mech.prepare(x.q, x.k, x.v, **x.kwargs())
    _, score = mech.spec(call)
    tensors = getattr(score, "tensors", ()) if score is not None else ()
    return [name for name, val in call.params.items()
            if isinstance(val, torch.Tensor) and val.is_floating_point() and any(val is t for t in tensors)]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
class _Collector:
    def __init__(self):
        self.results: List[CheckResult] = []

    def add(self, group, check, case: Optional[_Case], impl, ok, detail, skipped=False):
        ex = case.ex.label if case else "-"
        pattern = case.pattern if case else "-"
        name = f"{group}.{check}/{ex}/{pattern}/{impl}"
        self.results.append(CheckResult(name, bool(ok), detail, skipped, group, ex, pattern, impl))

    def skip(self, group, check, case, impl, reason):
        self.add(group, check, case, impl, True, f"skipped: {reason}", skipped=True)

    @contextlib.contextmanager
    def guard(self, group, check, case, impl):
        """Record an unexpected exception as a failure of this check."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a check must report, not crash the run
            self.add(group, check, case, impl, False, f"raised {type(e).__name__}: {e}")


def _check_forward(c: _Collector, case: _Case, impl: str):
    for dtype in (torch.float64, torch.float32):
        check = "float64" if dtype == torch.float64 else "float32"
        with c.guard("forward", check, case, impl):
            x = case.inputs(dtype)
            why = case.why_not(impl, x)
            if why:
                c.skip("forward", check, case, impl, why)
                continue
            out = case.run(impl, x)
            want = x.q.shape[:-1] + (x.v.shape[-1],)
            if out.shape != want or out.dtype != dtype:
                c.add("forward", check, case, impl, False, f"output {tuple(out.shape)} {out.dtype}, expected "
                                                          f"{tuple(want)} {dtype}")
                continue
            ok, detail = _compare(out, case.reference, ATOL[dtype])
            c.add("forward", check, case, impl, ok, detail + " vs the float64 reference")


def _check_gradients(c: _Collector, case: _Case, impl: str):
    with c.guard("gradients", "float64", case, impl):
        why = case.why_not(impl, case.inputs(), requires_grad=True)
        if why:
            c.skip("gradients", "float64", case, impl, why)
            return
        grads, names = case.grads(impl)
        ref, _ = case.reference_grads
        parts, ok = [], True
        for name, g, r in zip(names, grads, ref):
            good, detail = _compare(g, r, GRAD_ATOL, f"d{name}")
            ok &= good
            parts.append(detail)
        c.add("gradients", "float64", case, impl, ok, "; ".join(parts))


def _check_gradcheck(c: _Collector, case: _Case, impl: str):
    mech = case.mech
    with c.guard("gradcheck", "float64", case, impl):
        tiny = dict(batch=1, q_heads=2, kv_heads=1, head_dim=4, value_dim=3, seed=case.seed)
        fast, note = False, "tiny shape (B=1, Hq=2, Hkv=1, L=10, D=4)"
        x = example_inputs(mech, case.ex, case.pattern, length=10, cross_length=6, **tiny)
        try:
            mech.prepare(x.q, x.k, x.v, **x.kwargs())
            if x.spatial is not None and math.prod(x.spatial) > 10:
                raise ValueError("spatial grid larger than the tiny shape")
        except (ValueError, TypeError) as e:
            x = example_inputs(mech, case.ex, case.pattern, **tiny)
            fast, note = True, f"fast_mode on the example's shape ({e})"
        why = case.why_not(impl, x, requires_grad=True)
        if why:
            c.skip("gradcheck", "float64", case, impl, why)
            return
        leaves, params, names = case.grad_leaves(x)
        extra = names[3:]
        shared = mech.extras.get("shared_query")
        if shared:  # differentiate w.r.t. the one query, repeated inside fn (finite differences keep rows equal)
            leaves[0] = leaves[0][:, :, :1].detach().clone().requires_grad_(True)

        def fn(q, k, v, *tensors):
            p = dict(params)
            p.update(zip(extra, tensors))
            if shared:
                q = q.expand(-1, -1, x.q.shape[2], -1)
            return mech(q, k, v, impl=impl, causal=x.causal, **p)

        try:
            torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=fast)
            c.add("gradcheck", "float64", case, impl, True, f"passed w.r.t. {', '.join(names)}; {note}")
        except GradcheckError as e:
            c.add("gradcheck", "float64", case, impl, False, f"{note}: {str(e).splitlines()[0]}")


def _positions(n: int) -> List[int]:
    """A few query positions for the causality checks (the last row is trivially its own prefix)."""
    return sorted({i for i in (0, n // 3, (2 * n) // 3) if i < n - 1} or {0})


def _check_causality(c: _Collector, case: _Case, impl: str):
    with c.guard("causality", "full", case, impl):
        _causality(c, case, impl)


def _causality(c: _Collector, case: _Case, impl: str):
    mech = case.mech
    dtype, why = case.work_dtype(impl)
    if dtype is None:
        c.skip("causality", "prefix", case, impl, why)
        c.skip("causality", "perturb", case, impl, why)
        return
    x = case.inputs(dtype)
    atol = ATOL[dtype]
    full = _flat(case.run(impl, x))
    Lq, off = full.shape[2], x.offset
    positions = _positions(Lq)

    # CAB's prefix check: run on the prefix 0..i, compare with rows 0..i of the full output.
    with c.guard("causality", "prefix", case, impl):
        reason = None
        if x.spatial is not None:
            reason = "spatial layout (a prefix of a grid is not a grid); covered by the perturbation check"
        hook = mech.extras.get("prefix_check")
        if reason is None and hook is not None:
            reason = hook(x.params)
        worst, done, invalid, failed = 0.0, [], [], False
        for i in positions if reason is None else ():
            qp, kp, vp = x.q[:, :, :i + 1], x.k[:, :, :i + 1 + off], x.v[:, :, :i + 1 + off]
            sliced = token_params(mech, x.params, slice(0, i + 1 + off))  # per-token tensors follow the keys
            try:
                mech.prepare(qp, kp, vp, **x.kwargs(**sliced))
            except (ValueError, TypeError) as e:
                invalid.append(f"prefix 0..{i}: {e}")
                continue
            out = case.run(impl, x, qp, kp, vp, **sliced)
            ok, detail = _compare(out, full[:, :, :i + 1], atol)
            if not ok:
                c.add("causality", "prefix", case, impl, False, f"prefix 0..{i}: {detail}")
                failed = True
                break
            worst = max(worst, _max_err(out, full[:, :, :i + 1]))
            done.append(i)
        if reason is None and not done and not failed:
            reason = "parameters not valid on any prefix: " + "; ".join(invalid)
        if reason is not None:
            c.skip("causality", "prefix", case, impl, reason)
        elif not failed:
            c.add("causality", "prefix", case, impl, True,
                  f"prefixes ending at {done}: max |err| {worst:.3g} ({dtype}, tol {atol:g} x scale)"
                  + (f"; not valid on {len(invalid)} shorter prefix(es)" if invalid else ""))

    # Perturbing the future (queries, keys and values after position i) changes nothing before it.
    with c.guard("causality", "perturb", case, impl):
        gen = torch.Generator().manual_seed(case.seed + 7)
        worst = 0.0
        for i in positions:
            qf, kf, vf = (_flat(t).clone() for t in (x.q, x.k, x.v))
            future = ((kf, i + 1 + off), (vf, i + 1 + off))
            if not mech.extras.get("shared_query"):  # a shared query has no future rows to replace
                future = ((qf, i + 1),) + future
            for t, start in future:
                n = t.shape[2] - start
                if n > 0:
                    t[:, :, start:] = 3 * torch.randn(t[:, :, start:].shape, generator=gen,
                                                      dtype=torch.float64).to(t.dtype)
            out = _flat(case.run(impl, x, _unflat_like(qf, x.q), _unflat_like(kf, x.k), _unflat_like(vf, x.v)))
            ok, detail = _compare(out[:, :, :i + 1], full[:, :, :i + 1], atol)
            if not ok:
                c.add("causality", "perturb", case, impl, False, f"rows 0..{i} changed: {detail}")
                break
            worst = max(worst, _max_err(out[:, :, :i + 1], full[:, :, :i + 1]))
        else:
            c.add("causality", "perturb", case, impl, True,
                  f"future q/k/v after positions {positions} (raster order) replaced: rows up to each changed by "
                  f"at most {worst:.3g} ({dtype})")


def gqa_oracle(mech: Mechanism, x: Inputs) -> torch.Tensor:
    """The float64 dense oracle on k, v repeat_interleave-d to Hq heads, with the GQA call's mask."""
    q, k, v = (t.detach().double() for t in (x.q, x.k, x.v))
    params = {n: (p.detach().double() if isinstance(p, torch.Tensor) and p.is_floating_point() else p)
              for n, p in x.params.items()}
    rep = lambda t: t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)  # noqa: E731
    if mech.spec is None:
        return mech.reference(q, rep(k), rep(v), causal=x.causal, **params)
    from .patterns import executor as ex

    call = mech.prepare(q, k, v, causal=x.causal, **params)
    mask, score = ex.plan(call)
    geom = ex.geometry(call, tiled_order=False)
    out = _ref.attention(_flat(q), rep(_flat(k)), rep(_flat(v)), mask_mod=mask.build(geom) if mask else None,
                         score_mod=score.build(geom) if score else None, scale=call.scale)
    return _unflat_like(out, q)


def _check_gqa(c: _Collector, case: _Case, impl: str):
    mech = case.mech
    dtype, why = case.work_dtype(impl)
    for check in ("gqa", "mha"):
        with c.guard("gqa", check, case, impl):
            if dtype is None:
                c.skip("gqa", check, case, impl, why)
                continue
            if check == "gqa":
                x = case.inputs(dtype, gqa=True)
                if not mech.gqa:
                    c.skip("gqa", check, case, impl, f"{mech.name} does not declare GQA (see bad_input)")
                    continue
                if x.k.shape[1] == x.q.shape[1]:
                    c.skip("gqa", check, case, impl, "the example has Hkv == Hq")
                    continue
                ok, detail = _compare(case.run(impl, x), gqa_oracle(mech, x), ATOL[dtype])
                c.add("gqa", check, case, impl, ok,
                      f"Hq={x.q.shape[1]}, Hkv={x.k.shape[1]} vs the oracle on repeat_interleave-d k, v: {detail}")
            else:
                x = case.inputs(dtype, gqa=False)
                x64 = case.inputs(torch.float64, gqa=False)
                ref = case.run(mech.reference_impl, x64)
                ok, detail = _compare(case.run(impl, x), ref, ATOL[dtype])
                c.add("gqa", check, case, impl, ok, f"Hq=Hkv={x.q.shape[1]} vs reference: {detail}")


def _check_batch(c: _Collector, case: _Case, impl: str):
    with c.guard("batch", "independence", case, impl):
        dtype, why = case.work_dtype(impl)
        if dtype is None:
            c.skip("batch", "independence", case, impl, why)
            return
        x = case.inputs(dtype)
        out = case.run(impl, x)
        worst = 0.0
        for b in range(x.q.shape[0]):
            sl = slice(b, b + 1)
            try:
                case.mech.prepare(x.q[sl], x.k[sl], x.v[sl], **x.kwargs())
            except (ValueError, TypeError) as e:
                c.skip("batch", "independence", case, impl, f"parameters are per batch element: {e}")
                return
            alone = case.run(impl, x, x.q[sl], x.k[sl], x.v[sl])
            ok, detail = _compare(alone, out[sl], ATOL[dtype])
            if not ok:
                c.add("batch", "independence", case, impl, False, f"batch element {b} alone: {detail}")
                return
            worst = max(worst, _max_err(alone, out[sl]))
        c.add("batch", "independence", case, impl, True,
              f"each of {x.q.shape[0]} batch elements alone equals its slice (max |err| {worst:.3g}, {dtype})")


def _check_determinism(c: _Collector, case: _Case, impl: str):
    with c.guard("determinism", "bitwise", case, impl):
        dtype, why = case.work_dtype(impl)
        if dtype is None:
            c.skip("determinism", "bitwise", case, impl, why)
            return
        x = case.inputs(dtype)
        a, b = case.run(impl, x), case.run(impl, x)
        ok = torch.equal(a, b)
        c.add("determinism", "bitwise", case, impl, ok,
              f"two calls {'bitwise equal' if ok else f'differ by up to {_max_err(a, b):.3g}'} ({dtype})")


def _check_nan(c: _Collector, case: _Case, impl: str):
    with c.guard("nan", "query_row", case, impl):
        dtype, why = case.work_dtype(impl)
        if dtype is None:
            c.skip("nan", "query_row", case, impl, why)
            return
        x = case.inputs(dtype)
        qf = _flat(x.q).clone()
        i = qf.shape[2] // 2
        qf[:, :, i] = float("nan")
        if case.mech.extras.get("shared_query"):  # the query is one vector: NaN it in every row
            qf[:] = float("nan")
            out = _flat(case.run(impl, x, q=_unflat_like(qf, x.q)))
            all_nan = bool(out.isnan().all())
            c.add("nan", "query_row", case, impl, all_nan, f"NaN shared query: every output row "
                  f"{'NaN' if all_nan else 'NOT NaN'} ({case.mech.extras['shared_query']})")
            return
        out = _flat(case.run(impl, x, q=_unflat_like(qf, x.q)))
        row_nan = bool(out[:, :, i].isnan().all())
        rule = case.mech.extras.get("nan_rows", "row")
        rule = rule(x.params) if callable(rule) else rule
        if rule == "all":  # declared: queries are mixed (e.g. pooled agent tokens)
            all_nan = bool(out.isnan().all())
            c.add("nan", "query_row", case, impl, all_nan,
                  f"NaN in query row {i}: every output row {'NaN' if all_nan else 'NOT NaN'} (declared: "
                  f"{case.mech.name} mixes queries, so one NaN query reaches every row)")
            return
        others = torch.cat([out[:, :, :i], out[:, :, i + 1:]], dim=2)
        others_finite = bool(others.isfinite().all())
        ok = row_nan and others_finite
        c.add("nan", "query_row", case, impl, ok,
              f"NaN in query row {i}: that output row {'all NaN' if row_nan else 'NOT all NaN'}, other rows "
              f"{'finite' if others_finite else 'NOT finite'}")


# ---- per mechanism ------------------------------------------------------------------------
def _check_patterns(c: _Collector, mech: Mechanism, exs: List[Example], seed: int, cases: Dict[tuple, _Case]):
    """Declared patterns run through automatic selection; undeclared ones raise naming the supported."""
    for (ex_i, pattern), case in cases.items():
        for dtype in (torch.float64, torch.float32):
            check = f"auto_{'float64' if dtype == torch.float64 else 'float32'}"
            with c.guard("patterns", check, case, "auto"):
                x = case.inputs(dtype)
                chosen = mech.select(mech.prepare(x.q, x.k, x.v, **x.kwargs())).name
                out = mech(x.q, x.k, x.v, **x.kwargs())
                ok, detail = _compare(out, case.reference, ATOL[dtype])
                c.add("patterns", check, case, "auto", ok, f"automatic choice '{chosen}': {detail}")
    ex0 = exs[0]
    for pattern in PATTERNS:
        if pattern in mech.patterns:
            continue
        case = _Case(mech, ex0, pattern, seed)
        with c.guard("patterns", "undeclared", case, "-"):
            if ex0.shape is not None and pattern.endswith("cross"):
                x = example_inputs(mech, ex0, pattern.replace("cross", "self"), seed=seed)
                grow = lambda t: torch.cat([t, t[:, :, :1]], dim=2)  # noqa: E731  (one more row on axis 0)
                args = (x.q, grow(x.k), grow(x.v))
            else:
                x = example_inputs(mech, ex0, pattern, seed=seed)
                args = (x.q, x.k, x.v)
            try:
                mech(*args, **x.kwargs())
            except ValueError as e:
                missing = [p for p in mech.patterns if p not in str(e)]
                ok = not missing
                c.add("patterns", "undeclared", case, "-", ok,
                      f"ValueError: {e}" + (f" -- does not name {missing}" if missing else ""))
            else:
                c.add("patterns", "undeclared", case, "-", False, f"{pattern} is not declared but the call ran")


def _check_forms(c: _Collector, mech: Mechanism, exs: List[Example], seed: int):
    """Recurrence entries: stepping, segments with state, and packed documents equal the parallel form."""
    if mech.recurrence is None:
        c.skip("forms", "none", None, "-", f"{mech.name} has no recurrent form (not a linear/recurrent entry)")
        return
    for ex in exs:
        for pattern in ("causal_self", "noncausal_self"):
            if pattern not in mech.patterns:
                continue
            case = _Case(mech, ex, pattern, seed)
            with c.guard("forms", "reference", case, mech.reference_impl):
                _forms_case(c, mech, case, pattern)


def _forms_case(c: _Collector, mech: Mechanism, case: _Case, pattern: str):
    x = case.inputs()
    ref = case.reference
    L = x.q.shape[2]
    if pattern == "causal_self":
        with c.guard("forms", "step", case, "recurrent"):
            state, outs = None, []
            for t in range(L):
                o, state = mech.step(state, x.q[:, :, t], x.k[:, :, t], x.v[:, :, t],
                                     **token_params(mech, x.params, t))
                outs.append(o)
            ok, detail = _compare(torch.stack(outs, 2), ref, FLOAT64_ATOL)
            c.add("forms", "step", case, "recurrent", ok, f"m.step over {L} tokens vs parallel: {detail}; "
                                                          f"state holds {state.floats} floats")
        with c.guard("forms", "segments", case, "chunked+recurrent"):
            cuts = [0, L // 3, L // 3 + max(1, L // 4), L]
            state, outs = None, []
            for n, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                impl = "recurrent" if n == 1 else "chunked"
                o, state = mech.scan(x.q[:, :, a:b], x.k[:, :, a:b], x.v[:, :, a:b], state, impl=impl,
                                     **token_params(mech, x.params, slice(a, b)))
                outs.append(o)
            ok, detail = _compare(torch.cat(outs, 2), ref, FLOAT64_ATOL)
            _, s_chunk = mech.scan(x.q, x.k, x.v, impl="chunked", **x.params)
            _, s_rec = mech.scan(x.q, x.k, x.v, impl="recurrent", **x.params)
            worst = max(_max_err(s_chunk[n], s_rec[n]) for n in s_chunk.tensors)
            same = worst <= FLOAT64_ATOL * max(_scale(t) for t in s_rec.tensors.values())
            c.add("forms", "segments", case, "chunked+recurrent", ok and same,
                  f"segments {cuts} (chunked, recurrent, chunked) continuing the state vs parallel: {detail}; "
                  f"final states of chunked and recurrent differ by {worst:.3g}")
    if "offsets" not in {p.name for p in mech.params}:
        return
    offsets = [0, L // 3, L // 3 + max(1, L // 4)]
    bounds = offsets + [L]
    for impl in mech.impl_names:
        with c.guard("forms", "offsets", case, impl):
            out = mech(x.q, x.k, x.v, impl=impl, **x.kwargs(offsets=offsets))
            docs = [mech.reference(x.q[:, :, a:b], x.k[:, :, a:b], x.v[:, :, a:b],
                                   **token_params(mech, x.kwargs(), slice(a, b)))
                for a, b in zip(bounds[:-1], bounds[1:])]
            ok, detail = _compare(out, torch.cat(docs, 2), FLOAT64_ATOL)
            c.add("forms", "offsets", case, impl, ok, f"packed documents at {offsets} vs each document alone: "
                                                     f"{detail}")


def _bad_cases(mech: Mechanism, x: Inputs) -> Iterable[Tuple[str, Callable[[], Any], str]]:
    """(check name, call, argument the message must name) for the bad-input group."""
    q, k, v, params = x
    kw = x.kwargs()

    def call(qq=q, kk=k, vv=v, **over):
        return lambda: mech(qq, kk, vv, **{**kw, **over})

    def r3(t):  # rank 3: never valid (sequences need 4, grids >= 4)
        return t.reshape(-1, t.shape[-2], t.shape[-1])

    yield "rank_q", call(qq=r3(q)), "q"
    yield "rank_k", call(kk=r3(k)), "k"
    yield "rank_v", call(vv=r3(v)), "v"
    yield "batch", call(kk=k[:1], vv=v[:1]), "batch"
    if q.shape[1] > 1:
        yield "heads_not_multiple", call(kk=torch.cat([k] * q.shape[1], 1)[:, :q.shape[1] - 1],
                                         vv=torch.cat([v] * q.shape[1], 1)[:, :q.shape[1] - 1]), "heads"
    yield "kv_heads_mismatch", call(vv=torch.cat([v, v], 1)), "heads"
    yield "head_dim", call(kk=torch.cat([k, k[..., :1]], -1)), "head dim"
    yield "kv_length", call(vv=torch.cat([v, v[:, :, :1]], 2)), "length"
    yield "empty_q", call(qq=q[:, :, :0]), "q"
    yield "empty_batch", call(qq=q[:0], kk=k[:0], vv=v[:0]), "q"
    yield "empty_head_dim", call(qq=q[..., :0], kk=k[..., :0]), "q"
    yield "int_dtype", call(qq=q.round().long()), "q"
    yield "bool_dtype", call(kk=k > 0), "k"
    yield "mixed_dtype", call(kk=k.float() if k.dtype != torch.float32 else k.double()), "dtype"
    yield "mixed_device", call(kk=k.to("meta")), "device"
    yield "not_tensor", call(qq=q.tolist()), "q"
    yield "causal_type", call(causal="yes"), "causal"
    yield "scale", call(scale=-1.0), "scale"
    yield "impl_type", call(impl=3), "impl"
    yield "unknown_param", call(bogus_param=1), "bogus_param"
    ndim = len(x.spatial) if x.spatial else 1
    for p in mech.params:
        wrong = {"int": "three", "float": "x", "bool": "yes", "choice": object(), "ints": "x", "tensor": 3.0,
                 "mask": "x", "score": "x"}.get(p.kind, object())
        yield f"type_{p.name}", call(**{p.name: wrong}), p.name
        if p.kind in ("int", "float", "ints"):
            lo = p.ge is not None and (p.ge - 1 if p.kind != "float" else p.ge - 1.0)
            for bound, val in (("ge", p.ge is not None and lo), ("le", p.le is not None and p.le + 1)):
                if val is False:
                    continue
                val = int(val) if p.kind != "float" else float(val)
                val = (val,) if p.kind == "ints" else val
                yield f"{bound}_{p.name}", call(**{p.name: val}), p.name
        if p.kind == "choice":
            yield f"choice_{p.name}", call(**{p.name: "bogus-choice"}), p.name
        if p.per_axis:
            base = {"int": 1, "float": 1.0, "bool": False}.get(p.kind, 1)
            yield f"axes_{p.name}", call(**{p.name: (base,) * (ndim + 1)}), p.name


def _check_bad_input(c: _Collector, mech: Mechanism, exs: List[Example], seed: int):
    pattern = next((p for p in ("noncausal_self", "causal_self") if p in mech.patterns), mech.patterns[0])
    ex = next((e for e in exs if not (pattern.startswith("causal") and "is_causal" in e.params)), exs[0])
    case = _Case(mech, ex, pattern, seed)
    x = case.inputs()
    for check, fn, arg in _bad_cases(mech, x):
        with c.guard("bad_input", check, case, "-"):
            try:
                fn()
            except (ValueError, TypeError) as e:
                msg = str(e)
                named = re.search(rf"(?<![\w]){re.escape(arg)}(?![\w])", msg, re.IGNORECASE) is not None
                c.add("bad_input", check, case, "-", named,
                      f"{type(e).__name__}: {msg}" + ("" if named else f" -- does not name '{arg}'"))
            except Exception as e:  # noqa: BLE001
                c.add("bad_input", check, case, "-", False, f"raised {type(e).__name__} (expected ValueError or "
                                                            f"TypeError naming '{arg}'): {e}")
            else:
                c.add("bad_input", check, case, "-", False, f"no error (expected ValueError or TypeError naming "
                                                            f"'{arg}')")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
_PER_IMPL = {
    "forward": _check_forward,
    "gradients": _check_gradients,
    "gradcheck": _check_gradcheck,
    "causality": _check_causality,
    "gqa": _check_gqa,
    "batch": _check_batch,
    "determinism": _check_determinism,
    "nan": _check_nan,
}


@contextlib.contextmanager
def _quiet_single_thread():
    """Tiny inputs: intra-op threads only add overhead (and thrash on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            yield
    finally:
        torch.set_num_threads(threads)


def run_checks(mech, *, seed: int = 0, impls: Optional[Sequence[str]] = None,
               groups: Optional[Sequence[str]] = None, flex_compile: Optional[bool] = None) -> List[CheckResult]:
    """Run the conformance checks (see the module docstring) for one catalogue entry.

    ``mech`` is a :class:`Mechanism` or its name; ``impls`` restricts the implementations checked
    (the reference is always used for comparison); ``groups`` restricts the check groups
    (:data:`GROUPS`). ``flex_compile`` sets ``ATTNLAB_FLEX_COMPILE`` for the run (None: leave the
    environment alone); compiled FlexAttention costs seconds per shape on CPU, and the checks use
    dozens of shapes. Returns one :class:`CheckResult` per check, grouped in :data:`GROUPS` order;
    a failing check never raises.
    """
    if isinstance(mech, str):
        mech = _lookup(mech)
    names = list(mech.impl_names)
    if impls is not None:
        if isinstance(impls, str):
            impls = [impls]
        bad = [i for i in impls if i not in names]
        if bad:
            raise ValueError(f"{mech.name}: impls must be among {', '.join(names)}, got {bad}")
        names = [n for n in names if n in impls]
    groups = list(GROUPS if groups is None else groups)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"groups must be among {', '.join(GROUPS)}, got {bad}")

    if flex_compile is not None:
        before = os.environ.get("ATTNLAB_FLEX_COMPILE")
        os.environ["ATTNLAB_FLEX_COMPILE"] = "1" if flex_compile else "0"
        try:
            return run_checks(mech, seed=seed, impls=impls, groups=groups)
        finally:
            if before is None:
                os.environ.pop("ATTNLAB_FLEX_COMPILE", None)
            else:
                os.environ["ATTNLAB_FLEX_COMPILE"] = before

    c = _Collector()
    if not mech.examples:
        c.add("catalogue", "examples", None, "-", False, f"{mech.name} has no examples; the suite cannot check it")
        return c.results
    if mech.reference_impl not in mech.impl_names:
        c.add("catalogue", "reference", None, "-", False,
              f"{mech.name} has no '{mech.reference_impl}' implementation to compare against")
        return c.results
    with _quiet_single_thread():
        exs = examples(mech)
        cases: Dict[tuple, _Case] = {}
        for ex in exs:
            for pattern in mech.patterns:
                case = _Case(mech, ex, pattern, seed)
                if pattern.startswith("causal") and "is_causal" in ex.params:
                    for g in groups:
                        if g in _PER_IMPL:
                            c.skip(g, "all", case, "-", "the example sets is_causal per axis, which causal=True "
                                                        "replaces (all axes causal)")
                    continue
                if ex.shape is not None and pattern.endswith("cross"):
                    for g in groups:
                        if g in _PER_IMPL:
                            c.skip(g, "all", case, "-", "spatial inputs have no cross-attention form")
                    continue
                cases[(ex.index, pattern)] = case
                for impl in names:
                    for g in groups:
                        if g not in _PER_IMPL:
                            continue
                        if g == "gradcheck" and impl not in GRADCHECK_IMPLS + tuple(
                                mech.extras.get("gradcheck_impls", ())):
                            continue
                        if g == "causality" and not pattern.startswith("causal"):
                            continue
                        _PER_IMPL[g](c, case, impl)
        none = {"causality": f"{mech.name} declares no causal pattern",
                "gradcheck": f"{mech.name} has no implementation with a hand-written backward (impls named in "
                             f"{GRADCHECK_IMPLS} or mech.extras['gradcheck_impls'])"}
        for g in groups:
            if g in _PER_IMPL and not any(r.group == g for r in c.results):
                c.skip(g, "none", None, "-", none.get(g, "no example and pattern could be run"))
        if "patterns" in groups:
            _check_patterns(c, mech, exs, seed, cases)
        if "bad_input" in groups:
            _check_bad_input(c, mech, exs, seed)
        if "forms" in groups:
            _check_forms(c, mech, exs, seed)
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(c.results, key=lambda r: order.get(r.group, -1))


def summary(results: Sequence[CheckResult]) -> Dict[str, int]:
    """Counts of passed, failed and skipped checks."""
    return {"passed": sum(r.ok and not r.skipped for r in results), "failed": sum(not r.ok for r in results),
            "skipped": sum(r.skipped for r in results)}


__all__ = ["CheckResult", "Example", "Inputs", "GROUPS", "example_inputs", "examples", "run_checks", "summary",
           "differentiable_params", "gqa_oracle"]
