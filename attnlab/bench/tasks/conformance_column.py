"""The conformance column of every task result: is the mechanism causal, and does decoding token by token
give the full causal output?

``causal_consistent`` is the conformance suite's causality group (:func:`attnlab.conformance.run_checks`
with ``groups=["causality"]``) on the entry's own examples: CAB's prefix check (the output on the
prefix ``0..i`` equals rows ``0..i`` of the full output) and the perturbation check (changing the future
changes nothing before it), for every implementation and causal pattern. True when at least one check
ran and none failed, False when one failed, None when nothing could run (no causal pattern, or the suite
itself raised; the detail says which). FlexAttention
runs uncompiled there (the same block-mask logic without ``torch.compile`` per shape).

``incremental_equal`` decodes with the parameters the task used, in float64 (``B=2``, ``L=12``, the task
model's heads and head dims), one token at a time, and compares with the full causal call
(``|err| <= 1e-9 * max(1, max |out|)``):

- recurrent entries (a ``"recurrent"`` implementation or a ``recurrence``, and a callable ``m.step``):
  ``o_t, state = m.step(state, q_t, k_t, v_t, **params_t)`` from ``state = None``, ``q_t`` of shape
  ``(B, H, D)``, per-token parameters sliced to token ``t``;
- entries that define ``causal_cross``: query ``i`` alone against the growing KV cache,
  ``m(q[:, :, i:i+1], k[:, :, :i+1], v[:, :, :i+1], causal=True, **params)`` (bottom-right aligned),
  per-token parameters sliced to the keys;
- otherwise None (no incremental form), and None when the parameters are not valid here.

The inputs follow the hooks a task model uses (:class:`attnlab.models.TokenMixer`): per-token parameters
the entry computes from its input (``extras["from_input"]``) are its map of standard-normal logits, and
an entry with ``extras["shared_query"]`` gets one query per head repeated along the sequence.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import torch

from ...catalogue import Mechanism, mechanism as _lookup
from ...conformance import run_checks
from ...models import input_width
from ...recurrent import token_params

B, L = 2, 12
ATOL = 1e-9


def _mech(mechanism) -> Mechanism:
    if isinstance(mechanism, Mechanism):
        return mechanism
    return _lookup(mechanism)


def causal_consistency(mechanism) -> Tuple[Optional[bool], str]:
    """(verdict, detail) of the causality group of the conformance suite (see the module docstring)."""
    m = _mech(mechanism)
    if isinstance(mechanism, str):
        return _cached_causality(m.name)
    return _causality(m)


@functools.lru_cache(maxsize=None)
def _cached_causality(name: str) -> Tuple[Optional[bool], str]:
    return _causality(_lookup(name))


def _causality(m: Mechanism) -> Tuple[Optional[bool], str]:
    try:
        results = run_checks(m, groups=["causality"], flex_compile=False)
    except Exception as e:  # noqa: BLE001 - the column reports, it never ends a task run
        return None, f"the conformance suite could not run the causality checks: {type(e).__name__}: {e}"
    failed = [r for r in results if not r.ok]
    if failed:
        return False, f"{len(failed)} causality check(s) failed, e.g. {failed[0].name}: {failed[0].detail}"
    passed = [r for r in results if r.ok and not r.skipped]
    if not passed:
        reasons = "; ".join(sorted({r.detail for r in results})) or "no checks"
        return None, f"no causality check could run: {reasons}"
    return True, f"{len(passed)} causality checks (prefix and perturbation) passed"


def _inputs(m: Mechanism, params: dict, heads: int, head_dim: int, value_dim: int, seed: int):
    """Random float64 q, k, v and the call's parameters (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, heads, L, head_dim), rnd(B, heads, L, head_dim), rnd(B, heads, L, value_dim)
    if m.extras.get("shared_query"):
        q = q[:, :, :1].expand(-1, -1, L, -1)
    params = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for n, x in params.items()}
    for n, (fn, width) in m.extras.get("from_input", {}).items():
        if n not in params:
            params[n] = fn(rnd(B, heads, L, input_width(width, head_dim)))
    return q, k, v, params


def _compare(a: torch.Tensor, ref: torch.Tensor) -> Tuple[bool, float, float]:
    if a.shape != ref.shape:
        return False, float("inf"), 0.0
    err = float((a - ref).abs().max())
    tol = ATOL * max(1.0, float(ref.abs().max()))
    return err <= tol, err, tol  # NaN err -> False


def incremental_decoding(mechanism, params: Optional[Mapping[str, Any]] = None, seed: int = 0, *, heads: int = 2,
                         head_dim: int = 16, value_dim: int = 12) -> Tuple[Optional[bool], str]:
    """(verdict, detail): token-by-token decoding equals the full causal output (see the module docstring)."""
    m = _mech(mechanism)
    q, k, v, params = _inputs(m, dict(params or {}), heads, head_dim, value_dim, seed)
    try:
        full = m(q, k, v, causal=True, **params)
    except (ValueError, TypeError) as e:
        return None, f"the full causal call is not defined here: {e}"
    recurrent = getattr(m, "recurrence", None) is not None or "recurrent" in m.impl_names
    if recurrent and callable(getattr(m, "step", None)):
        how = "recurrent step"
        outs, state = [], None
        for t in range(L):
            o, state = m.step(state, q[:, :, t], k[:, :, t], v[:, :, t], **token_params(m, params, t))
            outs.append(o)
        inc = torch.stack(outs, dim=2)
    elif "causal_cross" in m.patterns:
        how = "one query against the growing KV cache (causal_cross)"
        outs = []
        for i in range(L):
            try:
                outs.append(m(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], causal=True,
                              **token_params(m, params, slice(0, i + 1))))
            except (ValueError, TypeError) as e:
                return None, f"{how}: the parameters are not valid on the prefix 0..{i}: {e}"
        inc = torch.cat(outs, dim=2)
    else:
        return None, f"{m.name} has no incremental form (neither a recurrent step nor causal_cross)"
    ok, err, tol = _compare(inc, full)
    return ok, f"{how}: max |err| {err:.3g} {'<=' if ok else '>'} tol {tol:.3g} (float64, L={L})"


def conformance_column(mechanism, params: Optional[Mapping[str, Any]] = None, seed: int = 0, *, heads: int = 2,
                       head_dim: int = 16, value_dim: int = 12) -> dict:
    """``{"causal_consistent": bool | None, "incremental_equal": bool | None, "detail": str}``; the head
    sizes are those of the task model (they matter to parameters shaped by them)."""
    causal, why_c = causal_consistency(mechanism)
    inc, why_i = incremental_decoding(mechanism, params, seed, heads=heads, head_dim=head_dim, value_dim=value_dim)
    return {"causal_consistent": causal, "incremental_equal": inc,
            "detail": f"causality: {why_c}; incremental: {why_i}"}


__all__ = ["causal_consistency", "conformance_column", "incremental_decoding"]
