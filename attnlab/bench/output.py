"""What a run shows: a progress bar while it runs, then a results table and the derived slopes.

Table columns: median time of the timed repeats; spread = half the interquartile range relative
to the median; first = the first call (compilation included); tokens/s = B * Lq / median;
eff GFLOP/s = effective FLOPs (unmasked pairs only) / median; x SDPA = that over the same-run
SDPA baseline's; t/SDPA = median time over the baseline's; peak mem = peak RSS increase during one call; saved = bytes autograd
keeps for the backward (fwdbwd only). See :mod:`attnlab.bench.memory`.

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
        def on_done(i, n, res: Result):
            t = res.value("time_median_s")
            timing = f" {t * 1e3:.2f} ms" if t is not None else ""
            print(f"[{i + 1}/{n}] {_describe(res.case)} impl={res.impl_used or res.case.impl}: {res.status}{timing}",
                  file=sys.stderr, flush=True)

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
                      ("tokens/s", "right"), ("eff GFLOP/s", "right"), ("x SDPA", "right"), ("t/SDPA", "right"),
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
                  _fmt(r.value("effective_gflops_per_s"), ".1f"), _fmt(r.value("sdpa_gflops_ratio"), ".2f"), _fmt(r.value("sdpa_time_ratio"), ".2f"),
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


def slopes_table(derived: List[Dict]) -> Optional[Table]:
    if not derived:
        return None
    t = Table(title="log-log slopes against L (1 = linear, 2 = quadratic)", header_style="bold")
    for col in ("mechanism", "impl", "pattern", "dir", "metric", "lengths", "slope"):
        t.add_column(col)
    for d in derived:
        g = d["group"]
        name = "SDPA (baseline)" if g["mechanism"] == BASELINE else g["mechanism"] + (
            f" {g['grid_rank']}d" if g["grid_rank"] else "")
        lengths = d["detail"]["lengths"]
        t.add_row(name, g["impl"], g["pattern"], g["direction"], d["detail"]["metric"],
                  f"{lengths[0]}..{lengths[-1]} ({len(lengths)})", f"{d['value']:.2f}")
    return t


def _short(msg: Optional[str], n: int = 70) -> str:
    msg = (msg or "").replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)
