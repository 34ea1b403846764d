"""What a run shows: a progress bar while it runs, then a results table and the derived slopes.

Table columns: median time of the timed repeats; spread = half the interquartile range relative
to the median; first = the first call (compilation included); tokens/s = B * Lq / median;
eff GFLOP/s = effective FLOPs (unmasked pairs only) / median; % GEMM = that over the run's
``torch.mm`` GFLOP/s at the case's dtype; x SDPA = that over the same-run SDPA baseline's;
t/SDPA = median time over the baseline's; peak mem = peak RSS increase during one call; saved =
bytes autograd keeps for the backward (fwdbwd only). See :mod:`attnlab.bench.memory`.

Further tables when there is something to show: attnlab against NATTEN, log-log slopes, CAB
efficiency lengths, GNA's tile bounds beside the measured speedups, quality-task results, and
the verdicts of ``attnlab bench compare``.

The progress bar (rich, transient) is shown only on a terminal; elsewhere (CI logs, pipes) one
plain line per finished case goes to stderr instead.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cases import BASELINE
from .runner import Result

_STATUS_STYLE = {"ok": "green", "unsupported": "yellow", "timeout": "red", "oom": "red", "error": "bold red"}


def console(file=None) -> Console:
    c = Console(file=file)
    if not c.is_terminal:  # no terminal width to fit: do not wrap the table into 80 columns
        c = Console(file=file, width=200)
    return c


def _describe(case) -> str:
    if not hasattr(case, "grid"):  # a quality-task case
        return f"task {case.label} seed {case.seed}"
    shape = "x".join(map(str, case.grid)) if case.grid else f"L={case.kv_len}"
    return f"{case.label} {case.pattern} {case.direction} {shape}"


@contextmanager
def progress(total: int, out: Console):
    """Yields ``(on_start, on_done)`` callbacks for :func:`attnlab.bench.runner.run_cases`."""
    err = Console(file=sys.stderr)
    if err.is_terminal:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=err, transient=True)
        with bar:
            task = bar.add_task("bench", total=total)

            def on_start(i, n, case):
                bar.update(task, description=_describe(case))

            def on_done(i, n, res):
                bar.advance(task)

            yield on_start, on_done
    else:
        def on_done(i, n, res):
            stored = " (stored before: resumed)" if res.stored else ""
            if isinstance(res, Result):
                t = res.value("time_median_s")
                timing = f" {t * 1e3:.2f} ms" if t is not None else ""
                print(f"[{i + 1}/{n}] {_describe(res.case)} impl={res.impl_used or res.case.impl}: {res.status}"
                      f"{timing}{stored}", file=sys.stderr, flush=True)
            else:
                t = res.value("wall_s")
                print(f"[{i + 1}/{n}] {_describe(res.case)}: {res.status}" + (f" {t:.1f} s" if t is not None else "")
                      + stored, file=sys.stderr, flush=True)

        yield (lambda i, n, case: None), on_done


def _fmt(v: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _bytes(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def results_table(results: Sequence[Result], title: str = "attnlab bench") -> Table:
    t = Table(title=title, header_style="bold")
    for col, just in (("mechanism", "left"), ("impl", "left"), ("pattern", "left"), ("L", "right"),
                      ("dir", "left"), ("median ms", "right"), ("spread", "right"), ("first s", "right"),
                      ("tokens/s", "right"), ("eff GFLOP/s", "right"), ("% GEMM", "right"), ("% roof", "right"),
                      ("x SDPA", "right"),
                      ("t/SDPA", "right"),
                      ("peak mem", "right"), ("saved", "right"), ("status", "left")):
        t.add_column(col, justify=just)

    for r in results:
        c = r.case
        med = r.value("time_median_s")
        q1, q3 = r.value("time_q1_s"), r.value("time_q3_s")
        spread = "-" if med is None or q1 is None else f"±{(q3 - q1) / 2 / med * 100:.0f}%"
        length = f"{c.kv_len}" + (f" ({'x'.join(map(str, c.grid))})" if c.grid and len(c.grid) > 1 else "")
        if c.q_len != c.kv_len:
            length = f"{c.q_len}/{length}"
        status = r.status if r.status == "ok" else f"{r.status}: {_short(r.message)}"
        t.add_row(c.label, r.impl_used or c.impl, c.pattern, length, c.direction, _fmt(med, ".2f", 1e3), spread,
                  _fmt(r.value("first_call_s"), ".2f"), _fmt(r.value("tokens_per_s"), ",.0f"),
                  _fmt(r.value("effective_gflops_per_s"), ".1f"), _fmt(r.value("gemm_peak_fraction"), ".1f", 100),
                  _fmt(r.value("roofline_fraction"), ".0f", 100), _fmt(r.value("sdpa_gflops_ratio"), ".2f"),
                  _fmt(r.value("sdpa_time_ratio"), ".2f"),
                  _bytes(r.value("peak_rss_delta_bytes")), _bytes(r.value("saved_tensor_bytes")),
                  f"[{_STATUS_STYLE.get(r.status, '')}]{_escape(status)}[/]")
    return t


def external_table(results: Sequence[Result]) -> Optional[Table]:
    """attnlab against NATTEN on the same cases (``--compare natten``); None when there are no such rows."""
    from .external import is_external

    twins = [r for r in results if is_external(r.case)]
    if not twins:
        return None
    t = Table(title="attnlab vs NATTEN (same inputs; ratio = attnlab median / NATTEN median, < 1: attnlab faster)",
              header_style="bold")
    for col in ("mechanism", "grid", "params", "dir", "attnlab impl", "attnlab ms", "NATTEN", "NATTEN ms",
                "attnlab/NATTEN", "status"):
        t.add_column(col, justify="right" if col.endswith("ms") or "/" in col else "left")
    for r in twins:
        c = r.case
        subject = r.compared_with
        status = r.status if r.status == "ok" else f"{r.status}: {_short(r.message, 90)}"
        t.add_row(c.label, "x".join(map(str, c.grid or (c.kv_len,))), _escape(_params(c.params)), c.direction,
                  (subject.impl_used or "-") if subject else "-",
                  _fmt(subject.value("time_median_s") if subject else None, ".2f", 1e3), c.impl,
                  _fmt(r.value("time_median_s"), ".2f", 1e3), _fmt(r.value("attnlab_natten_time_ratio"), ".3f"),
                  f"[{_STATUS_STYLE.get(r.status, '')}]{_escape(status)}[/]")
    return t


def _params(p: Dict) -> str:
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in p.items())


def _group_name(g: Dict) -> str:
    return "SDPA (baseline)" if g["mechanism"] == BASELINE else g["mechanism"] + (
        f" {g['grid_rank']}d" if g.get("grid_rank") else "")


def slopes_table(derived: List[Dict]) -> Optional[Table]:
    derived = [d for d in derived if d["name"].startswith("slope_")]
    if not derived:
        return None
    t = Table(title="log-log slopes against L (1 = linear, 2 = quadratic)", header_style="bold")
    for col in ("mechanism", "impl", "pattern", "dir", "metric", "lengths", "slope"):
        t.add_column(col)
    for d in derived:
        g = d["group"]
        lengths = d["detail"]["lengths"]
        t.add_row(_group_name(g), g["impl"], g["pattern"], g["direction"], d["detail"]["metric"],
                  f"{lengths[0]}..{lengths[-1]} ({len(lengths)})", f"{d['value']:.2f}")
    return t


def efficiency_table(derived: List[Dict]) -> Optional[Table]:
    """CAB efficiency lengths: where a linear fit of the mechanism crosses a quadratic fit of SDPA."""
    rows = [d for d in derived if d["name"].startswith("efficiency_length_")]
    if not rows:
        return None
    t = Table(title="CAB efficiency length: tokens beyond which the mechanism is cheaper than SDPA (quadratic fit "
                    "to SDPA, linear fit to the mechanism)", header_style="bold")
    for col in ("mechanism", "pattern", "dir", "cost", "lengths", "efficiency length", "note"):
        t.add_column(col, justify="right" if col == "efficiency length" else "left")
    for d in rows:
        g, det = d["group"], d["detail"]
        v = d["value"]
        value = "-" if v is None else ("0 (always)" if v == 0 else f"{v:,.0f}")
        note = det.get("reason", "") if v is None or v == 0 else ("measured range" if det.get("within_measured")
                                                                   else "extrapolated")
        lengths = det["lengths"]
        t.add_row(_group_name(g), g["pattern"], g["direction"], d["name"][len("efficiency_length_"):],
                  f"{lengths[0]}..{lengths[-1]} ({len(lengths)})", value, _escape(note))
    return t


def tile_table(results: Sequence[Result]) -> Optional[Table]:
    """GNA's tile-simulator upper bounds beside the measured speedup over SDPA."""
    rows = [r for r in results if r.value("gna_tile_speedup_bound") is not None]
    if not rows:
        return None
    t = Table(title="GNA tile simulator: speedup upper bounds over dense attention beside the measured speedup over "
                    "SDPA", header_style="bold")
    for col in ("mechanism", "pattern", "L", "dir", "tiles visited", "bound (tiles)", "bound (FLOPs)",
                "measured"):
        t.add_column(col, justify="left" if col in ("mechanism", "pattern", "dir") else "right")
    for r in rows:
        c = r.case
        t.add_row(c.label, c.pattern, str(c.kv_len), c.direction,
                  f"{r.value('tiles_visited'):.0f}/{r.value('tiles_total'):.0f}",
                  _fmt(r.value("gna_tile_speedup_bound"), ".2f"), _fmt(r.value("gna_flop_speedup_bound"), ".2f"),
                  _fmt(r.value("speedup_vs_sdpa"), ".2f"))
    return t


def task_table(results: Sequence) -> Optional[Table]:
    """Quality-task cases: the task's headline numbers and the conformance column."""
    if not results:
        return None
    t = Table(title="quality tasks", header_style="bold")
    for col in ("task", "mechanism", "config", "seed", "accuracy", "MSE", "state size", "conformance", "time s",
                "status"):
        t.add_column(col, justify="right" if col in ("accuracy", "MSE", "state size", "time s") else "left")
    for r in results:
        c = r.case
        from .taskcases import CONFORMANCE

        got = {n: v for n, v, _ in r.measurements}
        conformance = " ".join(f"{n}={'-' if got[n] is None else ('ok' if got[n] == 1 else 'FAIL')}"
                               for n in CONFORMANCE if n in got) or "-"
        keys = ("vocab", "seq_len", "num_kv_pairs", "d_model", "context", "max_length", "depth")
        cfg = " ".join(f"{k}={c.config[k]}" for k in keys if k in c.config)
        status = r.status if r.status == "ok" else f"{r.status}: {_short(r.message)}"
        t.add_row(c.task, c.mechanism, cfg, str(c.seed), _fmt(r.value("accuracy"), ".3f"), _fmt(r.value("mse"), ".4g"),
                  _fmt(r.value("state_size"), ",.0f"), _escape(conformance), _fmt(r.value("wall_s"), ".1f"),
                  f"[{_STATUS_STYLE.get(r.status, '')}]{_escape(status)}[/]")
    return t


def compare_table(rows: Sequence, run_a: int, run_b: int, *, show_all: bool = False, relative: bool = False,
                  threshold: float = 0.05, alpha: float = 0.05) -> Table:
    """``attnlab bench compare``: the flagged cases (every case with ``show_all``)."""
    what = "time / paired SDPA time" if relative else "time"
    t = Table(title=f"run {run_b} against run {run_a} ({what}; flagged when the median moves by more than "
                    f"max({threshold:.0%}, pooled spread) and the one-sided Mann-Whitney p < {alpha})",
              header_style="bold")
    for col in ("case", f"A {'ratio' if relative else 'ms'}", f"B {'ratio' if relative else 'ms'}", "B/A", "noise",
                "p", "n", "verdict"):
        t.add_column(col, justify="left" if col in ("case", "verdict") else "right")
    style = {"regression": "bold red", "improvement": "green", "same": ""}
    scale = 1.0 if relative else 1e3
    spec = ".3f" if relative else ".3f"
    for r in rows:
        if not show_all and r.verdict not in ("regression", "improvement"):
            continue
        t.add_row(_escape(r.label), _fmt(r.a_median, spec, scale), _fmt(r.b_median, spec, scale),
                  _fmt(r.ratio, ".3f"), "-" if r.noise is None else f"±{r.noise:.1%}", _fmt(r.p, ".3g"),
                  f"{r.n[0]}+{r.n[1]}" if r.n != (0, 0) else "-",
                  f"[{style.get(r.verdict, 'yellow')}]{_escape(r.verdict + (': ' + r.detail if r.detail else ''))}[/]")
    return t


def _short(msg: Optional[str], n: int = 70) -> str:
    msg = (msg or "").replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)
