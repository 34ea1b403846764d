"""Measuring cases: timing, memory, effective FLOPs, status, ratios to SDPA and derived slopes.

One case, in this order (all in the running process, inputs seeded per case):

1. build ``q, k, v`` (and the output gradient for ``fwdbwd``), validate the call and pick the
   implementation (``impl='auto'``: the one the mechanism picks; recorded as ``impl_used``);
2. **first call**, timed alone as ``first_call_s``: it includes building block masks and, for
   FlexAttention, ``torch.compile`` (unless ``ATTNLAB_FLEX_COMPILE=0``); the next call is
   recorded as ``second_call_s`` (it should compile nothing: compare it with the median);
3. ``warmup`` calls left out of the statistics, then ``repeats`` calls timed with ``time.perf_counter``:
   median, quartiles, min and max (the raw samples are stored), tokens/s = ``B * Lq / median``. A
   sample is one call after the paired baseline (below), which evicts the caches: inputs come from
   memory at every length, so lengths compare alike (timing bursts of back-to-back calls instead kept
   a 1K sequence's 8 MB in the last-level cache and made chunked lightning's 32K tokens/s look 0.79x
   its 1K rate, against 1.3-1.5x with cold inputs at both);
4. one more call for memory (:mod:`attnlab.bench.memory`);
5. the exact count of unmasked pairs and effective FLOPs (:mod:`attnlab.bench.flops`; linear-family
   entries count their own), GFLOP/s = effective FLOPs / median, and ``gemm_peak_fraction`` =
   that over the run's ``torch.mm`` GFLOP/s at the case's dtype (:mod:`attnlab.bench.gemm`); the
   fewest bytes the call must move (``bytes_moved``), ``arithmetic_intensity`` = FLOPs / bytes and
   ``roofline_fraction`` = ``max(FLOPs / GEMM, bytes / the run's copy bandwidth)`` / median, the
   share of what the machine's two roofs allow;
6. for neighbourhood and blocked patterns (every spatial entry, and ``sliding_window``) on self
   attention: GNA's tile simulator (:func:`attnlab.patterns.neighborhood.simulate_tiles`) on the
   case's own mask, token order and tiles (the executor's 64-token tiles): tiles visited, total and
   partly masked, and its two upper bounds on the speedup over dense attention
   (``gna_tile_speedup_bound`` = tiles / visited tiles, ``gna_flop_speedup_bound`` = pairs / visible
   pairs), beside the measured ``speedup_vs_sdpa`` (= 1 / ``sdpa_time_ratio``);
7. ``state_size_floats`` for entries that declare ``m.state_size`` (recurrent state per layer).

A forward call runs under ``torch.no_grad()``; a forward+backward call runs the forward on
inputs that require grad and ``out.backward(dout)``. Every case ends with a status:
``ok``, ``unsupported`` (the mechanism does not define the pattern / GQA, or the requested
impl cannot serve the call: the reason is stored), ``oom``, ``timeout`` (the case's whole
budget, enforced by ``SIGALRM`` between Python operations when running on the main thread and
checked after every call otherwise; samples taken so far are kept) or ``error`` (the message).
No status ever stops the run.

Each case's baseline, torch's SDPA called directly (:meth:`Case.baseline`), is measured in the
same run just before the cases that need it, as its own row. The ratios are *paired*: every timed
repeat of a case is preceded by one timed baseline call on the same shapes (``paired_samples``),
so slow drift of the machine (frequency, other load) cancels. ``sdpa_time_ratio`` = the median over
repeats of case time / paired baseline time; ``sdpa_gflops_ratio`` ("x SDPA") = the case's
effective FLOPs over the baseline's, divided by ``sdpa_time_ratio``.

External twins (:mod:`attnlab.bench.external`, ``--compare natten``: impl ``natten(flex-fna)``
...) run right after the attnlab case they follow, on that case's inputs, and get
``attnlab_natten_time_ratio`` = the attnlab case's median time over theirs and ``attnlab_case_id``.

**Resuming.** :func:`run_cases` takes the results already stored for the run (``done``, read back
with :meth:`Result.from_stored`) and measures only the other cases; baselines, ratios and derived
results use stored and new results alike, so a resumed run ends with the rows of an
uninterrupted one.

**Derived** (:func:`derived`, from every result of the run): log-log slopes of time and memory
against L (:func:`slopes`) and CAB's efficiency lengths (:func:`efficiency_lengths`).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import catalogue
from ..recurrent import token_params
from ..reference import causal_mask
from ..patterns import executor as ex
from ..patterns.neighborhood import simulate_tiles
from . import external, flops, memory
from .cases import AUTO, Case, make_inputs, mechanism_of, ordered_with_baselines
from .store import CASE_FIELDS, Store, canonical, now


@dataclass
class Settings:
    repeats: int = 5
    warmup: int = 1
    timeout: float = 60.0
    seed: int = 0
    gemm_gflops: Dict[str, float] = field(default_factory=dict)  # dtype name -> this run's torch.mm GFLOP/s
    bandwidth_gbytes: Optional[float] = None  # this run's memory copy GB/s (the roofline's second roof)


@dataclass
class Result:
    case: Case
    status: str = "ok"
    message: Optional[str] = None
    impl_used: Optional[str] = None
    metrics: Dict[str, Tuple[Optional[float], str]] = field(default_factory=dict)  # name -> (value, unit)
    samples: List[float] = field(default_factory=list)
    paired_samples: List[float] = field(default_factory=list)  # baseline calls interleaved with samples
    started: Optional[str] = None
    case_id: Optional[int] = None
    baseline_case_id: Optional[int] = None
    compared_with: Optional["Result"] = field(default=None, repr=False)  # external twin: its attnlab result
    stored: bool = False  # read back from the store (a resumed run), not measured by this process

    def value(self, name: str) -> Optional[float]:
        return self.metrics.get(name, (None, ""))[0]

    @classmethod
    def from_stored(cls, row: Dict[str, Any]) -> "Result":
        """A result as :meth:`attnlab.bench.store.Store.cases` returns it."""
        cfg = {f: row[f] for f in CASE_FIELDS}
        cfg["grid"] = None if cfg["grid"] is None else tuple(cfg["grid"])
        samples = row.get("samples", {})
        return cls(Case(**cfg), status=row["status"], message=row["message"], impl_used=row["impl_used"],
                   metrics={n: (m["value"], m["unit"]) for n, m in row.get("measurements", {}).items()},
                   samples=list(samples.get("time_s", {}).get("values", [])),
                   paired_samples=list(samples.get("sdpa_paired_time_s", {}).get("values", [])),
                   started=row.get("started"), case_id=row["id"], baseline_case_id=row.get("baseline_case_id"),
                   stored=True)


class CaseTimeout(Exception):
    pass


class _Unsupported(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Deadline
# --------------------------------------------------------------------------------------------
class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds
        self.stage = "setup"

    def check(self):
        if time.perf_counter() > self.end:
            raise CaseTimeout(f"exceeded the {self.seconds:g} s case timeout during {self.stage}")


@contextmanager
def deadline(seconds: float):
    """A case budget: SIGALRM interrupts Python code past it (main thread only); ``check()`` anywhere.

    An alarm already set by someone else (e.g. pytest-timeout) is kept: it fires through its own
    handler when it is due first, and it is re-armed with its remaining time afterwards.
    """
    d = _Deadline(seconds)
    use_alarm = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                 and seconds > 0)
    if not use_alarm:
        yield d
        return
    start = time.perf_counter()
    outer_end = None

    def on_alarm(signum, frame):
        if outer_end is not None and time.perf_counter() >= outer_end - 1e-3 and callable(old_handler):
            return old_handler(signum, frame)
        raise CaseTimeout(f"exceeded the {seconds:g} s case timeout during {d.stage}")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_delay > 0:
        outer_end = start + old_delay
        if old_delay < seconds:
            signal.setitimer(signal.ITIMER_REAL, old_delay)
    try:
        yield d
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer_end is not None:
            signal.setitimer(signal.ITIMER_REAL, max(outer_end - time.perf_counter(), 1e-3), old_interval)


def _caused_by(exc: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """``exc`` or the first exception of its cause/context chain that is a ``kind``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def measure_case(case: Case, settings: Settings, subject: Optional[Case] = None) -> Result:
    """Measure one case; never raises (except KeyboardInterrupt): failures become a status.

    ``subject``: for an external twin (:mod:`.external`), the attnlab case whose inputs it reuses."""
    res = Result(case, started=now())
    memory.release_free_memory(freeze=True)
    try:
        with deadline(settings.timeout) as dl:
            _measure(case, settings, res, dl, subject)
    except (_Unsupported, external.Unsupported) as exc:
        res.status, res.message = "unsupported", str(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - one failing case never ends the run
        timeout = _caused_by(exc, CaseTimeout)  # torch.compile may wrap the alarm's exception
        if timeout is not None:
            res.status = "timeout"
            res.message = f"{timeout} ({len(res.samples)} of {settings.repeats} timed repeats done)"
        else:
            res.status = "oom" if _is_oom(exc) else "error"
            res.message = f"{type(exc).__name__}: {exc}"
    finally:
        memory.release_free_memory()
    if res.samples:
        _time_metrics(res, settings.gemm_gflops.get(case.dtype), settings.bandwidth_gbytes)
    return res


def _measure(case: Case, settings: Settings, res: Result, dl: _Deadline, subject: Optional[Case] = None):
    if case.is_baseline():
        return _measure_calls(case, settings, res, dl, *_baseline_calls(case, settings, res))
    if external.is_external(case):
        return _measure_calls(case, settings, res, dl, *_external_calls(case, settings, res, subject))
    mech = mechanism_of(case.mechanism)
    if case.pattern not in mech.patterns:
        raise _Unsupported(f"{mech.name} does not define the {case.pattern} pattern; it defines "
                           f"{', '.join(mech.patterns)}")
    if case.heads != case.kv_heads and not mech.gqa:
        raise _Unsupported(f"{mech.name} does not support grouped-query attention (heads != kv_heads)")
    impl = None if case.impl == AUTO else case.impl
    if impl is not None and impl not in mech.impl_names:
        raise _Unsupported(f"{mech.name} has no impl {impl!r}; it has {', '.join(mech.impl_names)}")
    if case.direction == "step":
        return _measure_step(case, settings, res, dl, mech)
    q, k, v, dout, params = make_inputs(case, settings.seed)
    call = mech.prepare(q, k, v, causal=case.causal, **params)
    try:
        res.impl_used = mech.select(call, impl).name
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None

    def forward():
        return mech(q, k, v, causal=case.causal, impl=impl, **params)

    _, b_forward, bq, bk, bv, b_dout = _baseline_calls(case.baseline(), settings, Result(case.baseline()))
    paired = _step(case.direction, b_forward, bq, bk, bv, b_dout)[0]
    _measure_calls(case, settings, res, dl, call, forward, q, k, v, dout, paired)


def _measure_step(case: Case, settings: Settings, res: Result, dl: _Deadline, mech):
    """One ``m.step``: token ``L`` on the state of the ``L - 1`` before it (a chunked scan, not timed)."""
    if mech.recurrence is None or "causal_self" not in mech.patterns:
        raise _Unsupported(f"{mech.name} has no causal recurrent form; direction 'step' times m.step")
    if case.pattern != "causal_self" or case.impl not in (AUTO, "recurrent"):
        raise _Unsupported("direction 'step' decodes causal self attention with the recurrent form "
                           "(--patterns causal_self, impl auto or recurrent)")
    q, k, v, _, params = make_inputs(case, settings.seed)
    L = case.kv_len - 1
    prefix, token = token_params(mech, params, slice(0, L)), token_params(mech, params, L)
    dl.stage = "the prefill (not timed)"
    with torch.no_grad():
        _, state = mech.scan(q[:, :, :L], k[:, :, :L], v[:, :, :L], impl="chunked", **prefix)
    one = slice(L, L + 1)
    call = mech.prepare(q[:, :, one], k[:, :, one], v[:, :, one], causal=True, **token_params(mech, params, one))
    res.impl_used = "recurrent"
    res.metrics["state_floats"] = (float(state.floats), "floats")

    q_t, k_t, v_t = (x[:, :, L].contiguous() for x in (q, k, v))  # a decoder's fresh projections of one token

    def forward():
        return mech.step(state, q_t, k_t, v_t, **token)

    paired = _step("fwd", _baseline_calls(case.baseline(), settings, Result(case.baseline()))[1], q, k, v, None)[0]
    _measure_calls(case, settings, res, dl, call, forward, q, k, v, None, paired)


def _baseline_calls(case: Case, settings: Settings, res: Result):
    """torch's SDPA called directly (bottom-right causal mask for causal cross attention); for
    ``step``: the last query against the ``L`` cached keys (KV-cache decoding)."""
    if case.direction == "step":
        q, k, v, _, _ = make_inputs(case, settings.seed)
        q = q[:, :, -1:]
        call = catalogue.mechanism("dense").prepare(q, k, v)
        res.impl_used = "torch"

        def decode():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=case.heads != case.kv_heads)

        return call, decode, q, k, v, None
    q, k, v, dout, _ = make_inputs(case, settings.seed)
    call = catalogue.mechanism("dense").prepare(q, k, v, causal=case.causal)
    kw = dict(enable_gqa=case.heads != case.kv_heads)
    if case.causal and case.q_len == case.kv_len:
        kw["is_causal"] = True
    elif case.causal:
        kw["attn_mask"] = causal_mask(case.q_len, case.kv_len, q.device)
    res.impl_used = "torch"

    def forward():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

    return call, forward, q, k, v, dout


def _external_calls(case: Case, settings: Settings, res: Result, subject: Optional[Case]):
    """A NATTEN twin on the inputs of its attnlab case (the twin's own seed when run alone)."""
    res.impl_used = case.impl
    q, k, v, _, _ = make_inputs(subject or case, settings.seed)
    call, forward, q, k, v = external.calls(case, q, k, v, subject=case.mechanism)
    return call, forward, q, k, v, None


def _step(direction: str, forward, q, k, v, dout):
    """``(step, backward)``: one timed unit of work (forward, or forward and backward)."""
    if direction in ("fwd", "step"):
        def step():
            with torch.no_grad():
                forward()
        return step, None

    def backward(out):
        out.backward(dout)

    def step():
        q.grad = k.grad = v.grad = None
        backward(forward())
    return step, backward


#: A ``step`` sample is the mean of this many back-to-back decoding steps on the same state (decoding
#: runs them back to back; a single step after the paired baseline would time a cache the baseline evicted).
STEP_BURST = 32


def _measure_calls(case: Case, settings: Settings, res: Result, dl: _Deadline, call, forward, q, k, v, dout,
                   paired: Optional[Callable[[], None]] = None):
    step, backward = _step(case.direction, forward, q, k, v, dout)

    dl.stage = "the first call"
    t0 = time.perf_counter()
    step()
    res.metrics["first_call_s"] = (time.perf_counter() - t0, "s")
    dl.check()
    dl.stage = "warm-up"
    for i in range(settings.warmup):
        t0 = time.perf_counter()
        step()
        if i == 0:
            res.metrics["second_call_s"] = (time.perf_counter() - t0, "s")
        dl.check()
    dl.stage = "the timed repeats"
    if paired is not None:
        paired()  # warm the baseline too
    for _ in range(settings.repeats):
        if paired is not None:
            t0 = time.perf_counter()
            paired()
            res.paired_samples.append(time.perf_counter() - t0)
        burst = STEP_BURST if case.direction == "step" else 1
        t0 = time.perf_counter()
        for _ in range(burst):
            step()
        res.samples.append((time.perf_counter() - t0) / burst)
        if "second_call_s" not in res.metrics:
            res.metrics["second_call_s"] = (res.samples[-1], "s")
        dl.check()

    dl.stage = "the memory run"
    q.grad = k.grad = v.grad = None
    if backward is None:
        mem = memory.measure(lambda: step())
    else:
        mem = memory.measure(forward, backward)
    for name, value in mem.items():
        if value is not None:
            res.metrics[name] = (float(value), "bytes")

    dl.stage = "counting unmasked pairs"
    fl, pairs = flops.count(call, case.direction)
    if pairs is not None:
        res.metrics["unmasked_pairs"] = (float(pairs), "pairs")
        res.metrics["density"] = (pairs / (call.batch * call.q_heads * call.q_len * call.kv_len), "fraction")
    res.metrics["effective_flops"] = (fl, "FLOP")
    if case.direction != "step":
        res.metrics["bytes_moved"] = (float(flops.bytes_moved(call, case.direction)), "bytes")
    if call.mechanism.state_size is not None:
        res.metrics["state_size_floats"] = (float(call.mechanism.state_size(call.q_heads, call.head_dim,
                                                                            call.value_dim, **call.params)), "floats")
    if not case.is_baseline() and not external.is_external(case):
        dl.stage = "simulating tiles"
        rep = tile_bounds(call)
        if rep is not None:
            res.metrics.update({
                "tiles_visited": (float(rep.tiles_visited), "tiles"), "tiles_total": (float(rep.tiles_total), "tiles"),
                "tiles_partial": (float(rep.tiles_partial), "tiles"),
                "gna_tile_speedup_bound": (rep.tile_speedup, "x"), "gna_flop_speedup_bound": (rep.flop_speedup, "x")})


#: Sequence entries that are neighbourhood / blocked patterns (besides every spatial entry).
TILE_BOUND_MECHANISMS = ("sliding_window",)


def tile_bounds(call):
    """GNA's tile simulator on a self-attention call's full mask with the executor's token order and
    tiles, or None (no mask, cross attention, or not a neighbourhood / blocked pattern)."""
    m = call.mechanism
    if call.q_len != call.kv_len or not (m.layout == "spatial" or m.name in TILE_BOUND_MECHANISMS):
        return None
    mask, _ = ex.plan(call)
    if mask is None:
        return None
    tile = ex.default_tile(call.spatial) or ex.BLOCK
    return simulate_tiles(mask, call.spatial or (call.kv_len,), tile, tile)


def _time_metrics(res: Result, gemm_gflops: Optional[float] = None, bandwidth_gbytes: Optional[float] = None):
    s = np.asarray(res.samples)
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    res.metrics.update({
        "time_median_s": (float(med), "s"),
        "time_q1_s": (float(q1), "s"),
        "time_q3_s": (float(q3), "s"),
        "time_min_s": (float(s.min()), "s"),
        "time_max_s": (float(s.max()), "s"),
        "tokens_per_s": (res.case.batch * (1 if res.case.direction == "step" else res.case.q_len) / float(med),
                         "tokens/s"),
    })
    fl = res.value("effective_flops")
    if fl is not None:
        res.metrics["effective_gflops_per_s"] = (fl / float(med) / 1e9, "GFLOP/s")
        if gemm_gflops:
            res.metrics["gemm_peak_fraction"] = (fl / float(med) / 1e9 / gemm_gflops, "fraction")
        moved = res.value("bytes_moved")
        if moved:
            res.metrics["arithmetic_intensity"] = (fl / moved, "FLOP/byte")
            if gemm_gflops and bandwidth_gbytes:
                roof = max(fl / gemm_gflops, moved / bandwidth_gbytes) / 1e9
                res.metrics["roofline_fraction"] = (roof / float(med), "fraction")
    n = min(len(res.samples), len(res.paired_samples))
    if n:
        res.metrics["sdpa_paired_median_s"] = (float(np.median(res.paired_samples[:n])), "s")
        res.metrics["sdpa_paired_time_ratio"] = (float(np.median(s[:n] / np.asarray(res.paired_samples[:n]))), "x")


def add_ratios(res: Result, base: Optional[Result]):
    """``sdpa_gflops_ratio`` and ``sdpa_time_ratio`` against the same-run SDPA baseline."""
    if base is None or res.status != "ok" or base.status != "ok":
        return
    res.baseline_case_id = base.case_id
    ratio = res.value("sdpa_paired_time_ratio")
    if ratio is None:  # no paired samples (e.g. an external twin): medians of the two rows
        t, bt = res.value("time_median_s"), base.value("time_median_s")
        ratio = t / bt if t is not None and bt else None
    if ratio is None or not ratio:
        return
    res.metrics["sdpa_time_ratio"] = (ratio, "x")
    if res.value("gna_tile_speedup_bound") is not None:
        res.metrics["speedup_vs_sdpa"] = (1.0 / ratio, "x")
    fl, bfl = res.value("effective_flops"), base.value("effective_flops")
    if fl is not None and bfl:
        res.metrics["sdpa_gflops_ratio"] = (fl / bfl / ratio, "x")


def add_external_ratio(res: Result, subject: Result):
    """``attnlab_natten_time_ratio`` = the attnlab case's median time over the external twin's."""
    res.compared_with = subject
    if subject.case_id is not None:
        res.metrics["attnlab_case_id"] = (float(subject.case_id), "case id")
    t, st = res.value("time_median_s"), subject.value("time_median_s")
    if res.status == "ok" and subject.status == "ok" and t and st is not None:
        res.metrics["attnlab_natten_time_ratio"] = (st / t, "x")


# --------------------------------------------------------------------------------------------
# A run
# --------------------------------------------------------------------------------------------
def run_cases(cases: Sequence[Case], settings: Settings, store: Optional[Store] = None,
              run_id: Optional[int] = None, on_start: Callable[[int, int, Case], None] = lambda i, n, c: None,
              on_done: Callable[[int, int, Result], None] = lambda i, n, r: None,
              done: Optional[Dict[str, Result]] = None) -> List[Result]:
    """Measure ``cases`` and their SDPA baselines, storing each result as it finishes.

    ``done``: results already stored for this run, by case key (a resumed run); they are not
    measured again but serve as baselines and subjects, and are returned in plan order."""
    try:
        return _run_cases(cases, settings, store, run_id, on_start, on_done, done or {})
    finally:
        memory.thaw()  # cases froze long-lived objects (see memory.release_free_memory): collectable again


def _run_cases(cases, settings, store, run_id, on_start, on_done, done) -> List[Result]:
    ordered = ordered_with_baselines(cases)
    baselines: Dict[str, Result] = {}
    subjects: Dict[str, Result] = {}  # external twin key -> the attnlab result it compares with
    results = []
    for i, case in enumerate(ordered):
        on_start(i, len(ordered), case)
        subject = subjects.get(case.key())
        res = done.get(case.key())
        if res is None:
            res = measure_case(case, settings, subject.case if subject else None)
            if subject is not None:
                add_external_ratio(res, subject)
            if case.is_baseline():
                if res.status == "ok":  # its own baseline: ratios 1 by definition (baseline_case_id stays NULL)
                    res.metrics["sdpa_gflops_ratio"] = (1.0, "x")
                    res.metrics["sdpa_time_ratio"] = (1.0, "x")
            else:
                add_ratios(res, baselines.get(case.baseline().key()))
            if store is not None:
                _save(store, run_id, res)
        elif subject is not None:
            res.compared_with = subject
        for twin in external.twins(case):
            subjects.setdefault(twin.key(), res)
        if case.is_baseline():
            baselines[case.key()] = res
        results.append(res)
        on_done(i, len(ordered), res)
    return results


def _save(store: Store, run_id: int, res: Result):
    ms = [(n, v, u) for n, (v, u) in res.metrics.items()]
    samples = [("time_s", "s", res.samples)] if res.samples else []
    if res.paired_samples:
        samples.append(("sdpa_paired_time_s", "s", res.paired_samples))
    res.case_id = store.add_case(run_id, res.case.config(), status=res.status, message=res.message,
                                 impl_used=res.impl_used, measurements=ms, samples=samples,
                                 baseline_case_id=res.baseline_case_id, started=res.started)


# --------------------------------------------------------------------------------------------
# Derived: log-log slopes against L, CAB efficiency lengths
# --------------------------------------------------------------------------------------------
SLOPE_METRICS = (("time_median_s", "slope_time_vs_L"), ("peak_rss_delta_bytes", "slope_peak_rss_vs_L"),
                 ("saved_tensor_bytes", "slope_saved_bytes_vs_L"))
EFFICIENCY_METRICS = (("time_median_s", "efficiency_length_time"),
                      ("peak_rss_delta_bytes", "efficiency_length_memory"),
                      ("saved_tensor_bytes", "efficiency_length_saved_bytes"))
#: A mechanism gets efficiency lengths when it computes at most this share of the dense pairs at
#: its largest length (or counts its own FLOPs, the linear family): exact attention is not "efficient".
EFFICIENT_DENSITY = 0.5


def derived(results: Sequence[Result]) -> List[Dict[str, Any]]:
    """Every run-level result: :func:`slopes` and :func:`efficiency_lengths`."""
    return slopes(results) + efficiency_lengths(results)


def _group(c: Case) -> Dict[str, Any]:
    return {"mechanism": c.mechanism, "impl": c.impl, "pattern": c.pattern, "direction": c.direction,
            "dtype": c.dtype, "batch": c.batch, "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "grid_rank": None if c.grid is None else len(c.grid)}


def _series(results: Sequence[Result]) -> Dict[str, List[Result]]:
    """ok results by configuration except length (canonical group key), sorted by length."""
    groups: Dict[str, List[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups.setdefault(canonical(_group(r.case)), []).append(r)
    return {k: sorted(v, key=lambda r: r.case.kv_len) for k, v in groups.items()}


def slopes(results: Sequence[Result]) -> List[Dict[str, Any]]:
    """Least-squares slope of log(metric) against log(L) for every configuration measured at >= 3
    lengths (ok cases only; a metric with a zero or missing value at some length is skipped)."""
    out = []
    for gkey, rs in _series(results).items():
        lengths = [r.case.kv_len for r in rs]
        if len(set(lengths)) < 3:
            continue
        for metric, name in SLOPE_METRICS:
            vals = [r.value(metric) for r in rs]
            if any(v is None or v <= 0 for v in vals):
                continue
            slope = float(np.polyfit(np.log(lengths), np.log(vals), 1)[0])
            out.append({"name": name, "group": json.loads(gkey), "value": slope, "unit": "log-log",
                        "detail": {"metric": metric, "lengths": lengths, "values": vals}})
    return out


def efficiency_length(lengths: Sequence[int], dense: Sequence[float], mech: Sequence[float]) -> Dict[str, Any]:
    """CAB's efficiency length (Zhang et al. 2022): fit a quadratic ``a L^2 + b L + c`` to dense
    attention's cost and a line ``m L + n`` to the mechanism's (least squares, >= 3 lengths); the
    efficiency length is the length beyond which the quadratic stays above the line, i.e. the
    largest real root of ``(a L^2 + b L + c) - (m L + n)``.

    Returns ``{"value", "reason", "dense_fit", "mechanism_fit", "within_measured"}``: ``value`` 0
    when the mechanism is cheaper at every length, None when the dense fit is not convex
    (``a <= 0``: no length beyond which dense attention stays costlier)."""
    x = np.asarray(lengths, dtype=np.float64) / 1024.0  # fit in K tokens: better conditioned
    qd = np.polyfit(x, np.asarray(dense, dtype=np.float64), 2)
    lm = np.polyfit(x, np.asarray(mech, dtype=np.float64), 1)
    diff = qd - np.array([0.0, lm[0], lm[1]])
    out: Dict[str, Any] = {"dense_fit": [qd[0] / 1024.0 ** 2, qd[1] / 1024.0, qd[2]],
                           "mechanism_fit": [lm[0] / 1024.0, lm[1]], "within_measured": False}
    if diff[0] <= 0:
        out.update(value=None, reason="the dense fit is not convex: no length beyond which dense attention stays "
                                      "costlier")
        return out
    roots = [r.real for r in np.roots(diff) if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)) and r.real > 0]
    if not roots:
        out.update(value=0.0, reason="cheaper than dense attention at every length (no crossing)")
        return out
    value = float(max(roots) * 1024.0)
    out.update(value=value, reason="crossing of the fits",
               within_measured=bool(min(lengths) <= value <= max(lengths)))
    return out


def efficiency_lengths(results: Sequence[Result]) -> List[Dict[str, Any]]:
    """:func:`efficiency_length` of every efficient configuration (see :data:`EFFICIENT_DENSITY`)
    against the SDPA baseline of the same run, at the >= 3 lengths where both are ok, for time and
    memory (:data:`EFFICIENCY_METRICS`; a metric missing at some length is skipped)."""
    series = _series(results)
    base: Dict[str, Dict[int, Result]] = {}
    for gkey, rs in series.items():
        if rs[0].case.is_baseline():
            g = json.loads(gkey)
            base[canonical({k: v for k, v in g.items() if k not in ("mechanism", "impl", "grid_rank")})] = {
                r.case.kv_len: r for r in rs}
    out = []
    for gkey, rs in series.items():
        c = rs[-1].case
        if c.is_baseline() or external.is_external(c):
            continue
        density = rs[-1].value("density")  # None: the mechanism counts its own FLOPs (linear family)
        if density is not None and density > EFFICIENT_DENSITY:
            continue
        g = json.loads(gkey)
        b = base.get(canonical({k: v for k, v in g.items() if k not in ("mechanism", "impl", "grid_rank")}), {})
        pairs = [(r, b[r.case.kv_len]) for r in rs if r.case.kv_len in b]
        lengths = [r.case.kv_len for r, _ in pairs]
        if len(set(lengths)) < 3:
            continue
        for metric, name in EFFICIENCY_METRICS:
            mine = [r.value(metric) for r, _ in pairs]
            dense = [br.value(metric) for _, br in pairs]
            if any(v is None for v in mine + dense):
                continue
            fit = efficiency_length(lengths, dense, mine)
            value = fit.pop("value")
            out.append({"name": name, "group": g, "value": value, "unit": "tokens",
                        "detail": dict(fit, metric=metric, lengths=lengths, dense=dense, values=mine)})
    return out
