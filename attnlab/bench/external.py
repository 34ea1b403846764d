"""External comparisons: NATTEN 0.21 on the same neighborhood / GNA cases (``--compare natten``).

For every ``neighborhood`` or ``gna`` case the plan gets *twins*: the same case (mechanism,
pattern, direction, dtype, shapes, grid, parameters) with the pseudo-implementation
``natten(flex-fna)`` (NATTEN's FlexAttention backend as NATTEN runs it by default, uncompiled)
and ``natten(flex-fna,compiled)`` (``torch_compile=True`` under ``natten.allow_flex_compile()``,
the kernel-to-kernel comparison). A twin runs ``natten.na1d/na2d/na3d`` with the same
kernel_size, stride, dilation and causality on the very inputs of the attnlab case it follows
(converted once to NATTEN's heads-last ``(B, *spatial, H, D)`` layout, outside the timed
region), and is measured and stored like any case: its own row, the same effective-FLOP count
(the two masks are equal: ``tests/test_natten.py``), the ratio to SDPA, and
``attnlab_natten_time_ratio`` = the attnlab case's median time / NATTEN's (below 1: attnlab is
faster) with ``attnlab_case_id``.

A NATTEN call builds its block mask on every call (NATTEN keeps no cache); that is part of its
timed call, as for any NATTEN user. What NATTEN cannot run is ``unsupported`` with its reason,
never an error: natten not installed; forward+backward (FlexAttention has no CPU backward);
float64; head dims that are not a power of two in [8, 512]; kernel sizes below 2; and, with
NATTEN 0.21 on a CPU-only machine, the compiled mode (NATTEN allows ``torch_compile`` only with
a CUDA device of compute capability >= 70; wrapping ``natten.na*d`` in ``torch.compile``
instead fails too, because NATTEN always asks FlexAttention for the log-sum-exp, which torch's
compiled CPU FlexAttention does not return).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import List

import torch

from .. import catalogue
from .cases import call_params

NATTEN = "natten"
UNCOMPILED = "natten(flex-fna)"
COMPILED = "natten(flex-fna,compiled)"
IMPLS = (UNCOMPILED, COMPILED)
SUBJECTS = ("neighborhood", "gna")  # catalogue entries NATTEN implements
COMPARISONS = (NATTEN,)  # values of --compare


class Unsupported(Exception):
    """NATTEN cannot run this case; the message says why."""


def is_external(case) -> bool:
    return case.impl in IMPLS


def twins(case) -> List:
    """The NATTEN rows of an attnlab case (none for other mechanisms or for a NATTEN row itself)."""
    if case.mechanism not in SUBJECTS or is_external(case) or case.is_baseline():
        return []
    return [replace(case, impl=impl) for impl in IMPLS]


def with_twins(cases) -> List:
    """``cases`` with each neighborhood / gna case followed by its NATTEN twins."""
    return [t for c in cases for t in (c, *twins(c))]


def _natten():
    try:
        import natten
    except ImportError as exc:
        raise Unsupported(f"natten not installed ({exc}); scripts/setup.sh installs it with "
                          "ATTNLAB_EXTRAS=dev,natten") from None
    return natten


@contextmanager
def _compile_allowed(natten, on: bool):
    """``natten.allow_flex_compile()`` for the compiled twin, restoring NATTEN's setting after.

    NATTEN logs a warning (to stdout) each time compilation gets allowed; the row's label says
    it is compiled, so that log is silenced here rather than repeated once per timed call."""
    if not on:
        yield
        return
    log = logging.getLogger("natten.context")
    before = (natten.is_flex_compile_allowed(), natten.is_flex_compile_backprop_allowed())
    was_disabled, log.disabled = log.disabled, True
    try:
        natten.allow_flex_compile(True, False)
        yield
    finally:
        natten.allow_flex_compile(*before)
        log.disabled = was_disabled


def calls(case, q, k, v, subject: str):
    """``(call, forward, q, k, v)`` for a NATTEN twin on attnlab's heads-first inputs ``q, k, v``.

    ``call`` is attnlab's validated call of ``subject`` (for the pair count); ``forward`` runs
    NATTEN on heads-last copies made here, once. Raises :class:`Unsupported` naming the reason.
    """
    if case.mechanism not in SUBJECTS:
        raise Unsupported(f"NATTEN implements neighborhood attention only ({', '.join(SUBJECTS)}), "
                          f"not {case.mechanism}")
    natten = _natten()
    call = catalogue.mechanism(subject).prepare(q, k, v, causal=case.causal,
                                                **call_params(case, torch.Generator().manual_seed(0)))
    if case.direction != "fwd":
        raise Unsupported("NATTEN on CPU is forward-only (FlexAttention has no CPU backward)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"NATTEN's flex-fna takes float32/float16/bfloat16, not {case.dtype}")
    d = case.head_dim
    if d < 8 or d > 512 or d & (d - 1):
        raise Unsupported(f"NATTEN's flex-fna needs a head dim that is a power of two in [8, 512], got {d}")
    p = call.params
    n = len(call.spatial)
    if min(p["kernel_size"]) < 2:
        raise Unsupported(f"NATTEN needs kernel_size >= 2 on every axis, got {list(p['kernel_size'])}")
    compiled = case.impl == COMPILED
    to_last = lambda x: x.detach().movedim(1, -2).contiguous()  # noqa: E731 (B, H, *S, D) -> (B, *S, H, D)
    ql, kl, vl = to_last(q), to_last(k), to_last(v)
    try:
        from natten.backends.configs.checks import can_run_flex_attention
    except ImportError:  # another NATTEN layout: let the call itself say what it cannot do
        can_run_flex_attention = None
    if can_run_flex_attention is not None:
        with _compile_allowed(natten, compiled):
            try:
                can_run_flex_attention(ql, kl, vl, torch_compile=compiled, raise_error=True)
            except Exception as exc:  # noqa: BLE001 - NATTEN's own reason
                why = f"NATTEN says: {str(exc).strip()}"
                if compiled and ql.device.type == "cpu":
                    why = f"NATTEN 0.21 compiles FlexAttention only on a CUDA device of compute capability >= 70; {why}"
                raise Unsupported(why) from None
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    kw = dict(kernel_size=tuple(p["kernel_size"]), stride=tuple(p["stride"]), dilation=tuple(p["dilation"]),
              is_causal=(True,) * n if case.causal else tuple(p["is_causal"] or (False,) * n),
              backend="flex-fna", torch_compile=compiled)
    if n == 1:  # na1d takes plain ints
        kw.update((key, kw[key][0]) for key in ("kernel_size", "stride", "dilation", "is_causal"))

    def forward():
        with warnings.catch_warnings():  # per call: NATTEN's return_lse FutureWarning, torch's "uncompiled flex"
            warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            with _compile_allowed(natten, compiled):
                try:
                    return fn(ql, kl, vl, **kw)
                except (NotImplementedError, ValueError) as exc:  # NATTEN's argument / backend checks
                    raise Unsupported(f"NATTEN says: {str(exc).strip()}") from exc

    return call, forward, ql, kl, vl


__all__ = ["NATTEN", "UNCOMPILED", "COMPILED", "IMPLS", "COMPARISONS", "Unsupported", "is_external", "twins",
           "with_twins", "calls"]
