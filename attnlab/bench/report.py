"""``attnlab report``: one self-contained HTML file from a results store, plus PNG and SVG figures.

    attnlab report                                   # ./attnlab-results.sqlite -> ./attnlab-report/
    attnlab report --store runs.sqlite --out out/ --run 3 --run 5

What it reads: by default the newest run that has efficiency cases and the newest run that has
quality-task cases (``--run ID``, repeatable, picks runs; ``latest`` and ``latest-N`` work too).
Several runs are merged by case configuration, the newest run winning.

What it writes, in ``--out`` (default ``./attnlab-report``): ``attnlab-report.html`` and, under
``figures/``, every plot as ``NAME.svg`` and ``NAME.png`` (for papers and slides). The HTML
embeds each plot as inline SVG (matplotlib, text drawn as paths) and uses no script, stylesheet,
font or image from anywhere else: it opens offline, from a file, in any browser.

Sections (each only when the store has data for it): the runs (machine, versions, commit, GEMM
throughput); time and memory against length per CAB pattern, log-log, with SDPA as the dashed
baseline (memory: peak RSS increase, and the bytes autograd saves for the backward); LongCA-bench's
masks; CAB efficiency lengths; effective GFLOP/s as a fraction of the run's GEMM throughput; GNA's
tile-simulator bounds beside the measured speedups; MQAR accuracy against state size (the
Zoology / BASED plot); a table per quality task with its conformance column; every case as a table.
"""
from __future__ import annotations

import html
import io
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .store import Store
from .taskcases import CONFORMANCE

DEFAULT_OUT = "attnlab-report"
_CODES = {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC"}
HTML_NAME = "attnlab-report.html"
BASELINE = "torch_sdpa"


@dataclass
class Data:
    """What the report shows, read from the store."""

    runs: List[Dict[str, Any]]
    cases: List[Dict[str, Any]]  # efficiency cases (newest run wins per case key), with "run_id"
    derived: List[Dict[str, Any]]
    tasks: List[Dict[str, Any]]
    calibration: List[Dict[str, Any]]


@dataclass
class Figure:
    name: str
    title: str
    svg: str
    caption: str = ""


@dataclass
class Report:
    sections: List[Tuple[str, str]] = field(default_factory=list)  # (title, html)
    figures: List[Figure] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def pick_runs(store: Store, runs: Optional[Sequence[Any]] = None) -> List[int]:
    """Run ids to report: ``runs`` resolved, or the newest run with efficiency cases and the newest
    run with task cases."""
    if runs:
        return sorted({store.resolve_run(r) for r in runs})
    picked = set()
    for table in ("cases", "task_cases"):
        row = store.db.execute(f"SELECT MAX(run_id) FROM {table}").fetchone()
        if row[0] is not None:
            picked.add(row[0])
    return sorted(picked)


def load(store: Store, runs: Optional[Sequence[Any]] = None) -> Data:
    ids = pick_runs(store, runs)
    cases: Dict[str, Dict[str, Any]] = {}
    tasks: Dict[str, Dict[str, Any]] = {}
    derived: Dict[Tuple[str, str], Dict[str, Any]] = {}
    calibration = []
    for rid in ids:  # ascending: newer runs overwrite
        for c in store.cases(rid):
            cases[c["case_key"]] = dict(c, run_id=rid)
        for t in store.task_cases(rid):
            tasks[t["case_key"]] = dict(t, run_id=rid)
        for d in store.derived(rid):
            derived[(d["name"], repr(sorted(d["group"].items())))] = dict(d, run_id=rid)
        calibration += [dict(c, run_id=rid) for c in store.calibration(rid)]
    return Data([store.run(r) for r in ids], list(cases.values()), list(derived.values()), list(tasks.values()),
                calibration)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _mpl():
    """matplotlib without pyplot: figures are plain ``Figure`` objects, no GUI backend is selected."""
    import matplotlib
    from matplotlib.figure import Figure as MplFigure

    return matplotlib, MplFigure


def _render(fig, name: str) -> str:
    """The figure as SVG text (no XML prolog, no metadata), ids salted by ``name``."""
    matplotlib, _ = _mpl()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _inline(svg: str) -> str:
    """The SVG for inlining in HTML5, which knows the SVG and xlink namespaces itself: without the
    namespace declarations, the page names no URL at all."""
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2)


def _save(fig, name: str, svg: str, out: Optional[Path]):
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.svg").write_text('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + svg,
                                     encoding="utf-8")
    fig.savefig(out / f"{name}.png", format="png", dpi=150, metadata={"Software": None})


def _figure(width: float = 6.4, height: float = 4.0, *, bottom: float = 0.12, left: float = 0.12):
    """A figure with fixed margins (a layout engine would measure every label again on each save)."""
    _, MplFigure = _mpl()
    fig = MplFigure(figsize=(width, height))
    fig.subplots_adjust(left=left, right=0.98, top=0.9, bottom=bottom, wspace=0.3)
    return fig


def _value(case: Dict[str, Any], name: str) -> Optional[float]:
    m = case["measurements"].get(name)
    return None if m is None else m["value"]


def _label(case: Dict[str, Any]) -> str:
    if case["mechanism"] == BASELINE:
        return "SDPA (baseline)"
    name = case["mechanism"] + (f" {len(case['grid'])}d" if case["grid"] else "")
    impl = case["impl"]
    return name if impl == "auto" else f"{name} [{impl}]"


def _series(cases: Iterable[Dict[str, Any]], metric: str) -> Dict[str, List[Tuple[int, float]]]:
    """label -> sorted (L, value) of ok cases with a positive value."""
    out: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for c in cases:
        v = _value(c, metric)
        if c["status"] == "ok" and v is not None and v > 0:
            out[_label(c)].append((c["kv_len"], v))
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: (kv[0] != "SDPA (baseline)", kv[0]))}


def _plot_lines(ax, series: Dict[str, List[Tuple[int, float]]], ylabel: str, scale: float = 1.0, logy: bool = True):
    for label, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] * scale for p in pts]
        base = label.startswith("SDPA (baseline)")
        ax.plot(xs, ys, "--" if base else "-", marker="o", color="black" if label == "SDPA (baseline)" else None,
                label=label, linewidth=1.8 if base else 1.4, markersize=4)
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plain)
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _few_majors(ax) else ""))
    ax.set_xlabel("tokens L")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")


def _few_majors(ax) -> bool:
    """Label the minor ticks of a log axis only when it spans less than about two decades."""
    lo, hi = ax.get_ylim()
    return lo > 0 and hi / lo < 100


def _is_longca(c: Dict[str, Any]) -> bool:
    return c["mechanism"].startswith("longca:")


def _is_external(c: Dict[str, Any]) -> bool:
    return c["impl"].startswith("natten")


def _grouped(data: Data, fields: Tuple[str, ...], keep) -> List[Tuple[tuple, List[Dict[str, Any]]]]:
    """The cases that ``keep`` accepts, grouped by the values of ``fields``, groups in sorted order."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for c in data.cases:
        if keep(c):
            groups[tuple(c[f] for f in fields)].append(c)
    return sorted(groups.items())


def efficiency_figures(data: Data, out: Optional[Path]) -> List[Figure]:
    figs = []
    for (pattern, direction, dtype), cs in _grouped(data, ("pattern", "direction", "dtype"),
                                                    lambda c: not _is_longca(c) and not _is_external(c)):
        if all(c["mechanism"] == BASELINE for c in cs):  # only SDPA (the baseline of other sections' cases)
            continue
        tag = f"{pattern}_{direction}_{dtype}"
        t = _series(cs, "time_median_s")
        if t:
            fig = _figure()
            ax = fig.add_subplot()
            _plot_lines(ax, t, "median time per call (ms)", 1e3)
            ax.set_title(f"time vs length: {pattern}, {direction}, {dtype}", fontsize=10)
            figs.append(_finish(fig, f"time_{tag}", f"Time against length ({pattern}, {direction}, {dtype})",
                                "Median of the timed repeats, log-log; SDPA (dashed) is torch's "
                                "scaled_dot_product_attention on the same shapes in the same run.", out))
        rss = _series(cs, "peak_rss_delta_bytes")
        saved = _series(cs, "saved_tensor_bytes") if direction == "fwdbwd" else {}
        if rss or saved:
            fig = _figure(11.0 if saved else 6.4, 4.0, left=0.08 if saved else 0.12)
            ax = fig.add_subplot(1, 2 if saved else 1, 1)
            _plot_lines(ax, rss, "peak RSS increase (MiB)", 1 / 2 ** 20)
            ax.set_title(f"peak memory: {pattern}, {direction}", fontsize=10)
            if saved:
                ax2 = fig.add_subplot(1, 2, 2)
                _plot_lines(ax2, saved, "bytes saved for backward (MiB)", 1 / 2 ** 20)
                ax2.set_title("saved tensors (autograd)", fontsize=10)
            figs.append(_finish(fig, f"memory_{tag}", f"Memory against length ({pattern}, {direction}, {dtype})",
                                "Peak resident-set increase during one call (process RSS high-water mark); for "
                                "forward+backward also the exact bytes autograd keeps between forward and backward "
                                "(saved-tensor hooks).", out))
    return figs


def longca_figures(data: Data, out: Optional[Path]) -> List[Figure]:
    figs = []
    for (direction, dtype), cs in _grouped(data, ("direction", "dtype"), _is_longca):
        fig = _figure(11.0, 4.2, left=0.08)
        ax = fig.add_subplot(1, 2, 1)
        _plot_lines(ax, _series(cs, "time_median_s"), "median time per call (ms)", 1e3)
        ax.set_title(f"LongCA-bench masks: time, {direction}, {dtype}", fontsize=10)
        ax2 = fig.add_subplot(1, 2, 2)
        _plot_lines(ax2, _series(cs, "effective_gflops_per_s"), "effective GFLOP/s (area count)", logy=False)
        ax2.set_title("effective throughput", fontsize=10)
        figs.append(_finish(fig, f"longca_{direction}_{dtype}", f"LongCA-bench masks ({direction}, {dtype})",
                            "LongCA-bench's mask set with seeded long-tailed document lengths; effective FLOPs count "
                            "only visible pairs (4 x area x heads x head dim, backward 2.5x).", out))
    return figs


def gemm_figures(data: Data, out: Optional[Path]) -> List[Figure]:
    figs = []
    for (direction, dtype), cs in _grouped(data, ("direction", "dtype"), lambda c: _value(
            c, "gemm_peak_fraction") is not None and not _is_external(c)):
        series: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
        for c in cs:
            if c["status"] == "ok":
                label = _label(c) + ("" if c["pattern"] == "noncausal_self" else f" ({c['pattern']})")
                series[label].append((c["kv_len"], _value(c, "gemm_peak_fraction")))
        series = {k: sorted(v) for k, v in sorted(series.items(), key=lambda kv: (not kv[0].startswith("SDPA"), kv[0]))}
        fig = _figure(7.5, 4.4)
        ax = fig.add_subplot()
        _plot_lines(ax, series, "% of this machine's GEMM GFLOP/s", 100, logy=False)
        gem = [f"{c['dtype']}: {c['value']:.0f} GFLOP/s (run {c['run_id']}, {c['threads']} threads)"
               for c in data.calibration if c["name"] == "gemm" and c["dtype"] == dtype]
        ax.set_title(f"effective GFLOP/s as % of GEMM peak, {direction}, {dtype}", fontsize=10)
        figs.append(_finish(fig, f"gemm_fraction_{direction}_{dtype}",
                            f"Fraction of GEMM throughput ({direction}, {dtype})",
                            "Effective GFLOP/s (visible pairs only) over torch.mm's GFLOP/s measured at the start "
                            "of the same run: " + "; ".join(gem), out))
    return figs


def efficiency_length_figure(data: Data, out: Optional[Path]) -> List[Figure]:
    rows = [d for d in data.derived if d["name"].startswith("efficiency_length_") and d["value"] is not None]
    if not rows:
        return []
    rows.sort(key=lambda d: (d["name"], d["group"]["pattern"], d["group"]["direction"], d["group"]["mechanism"]))
    labels = [f"{_group_label(d['group'])} | {d['name'][len('efficiency_length_'):]}" for d in rows]
    values = [max(d["value"], 1.0) for d in rows]
    fig = _figure(8.0, max(2.5, 0.32 * len(rows) + 1.2), left=0.42, bottom=0.2)
    ax = fig.add_subplot()
    colors = ["#4c72b0" if d["detail"].get("within_measured") else "#c4c4c4" for d in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlim(right=max(values) * 4)  # room for the value labels
    ax.set_xlabel("tokens (blue: inside the measured lengths; grey: extrapolated)")
    for i, d in enumerate(rows):
        ax.text(values[i], i, f" {d['value']:,.0f}" if d["value"] else " always", va="center", fontsize=7)
    ax.set_title("CAB efficiency length against SDPA", fontsize=10)
    return [_finish(fig, "efficiency_lengths", "CAB efficiency lengths",
                    "Length beyond which the mechanism is cheaper than SDPA: crossing of a quadratic fit to SDPA's "
                    "cost and a linear fit to the mechanism's (CAB, Zhang et al. 2022).", out)]


def tile_figure(data: Data, out: Optional[Path]) -> List[Figure]:
    rows = [c for c in data.cases if _value(c, "gna_tile_speedup_bound") is not None and c["status"] == "ok"]
    if not rows:
        return []
    rows.sort(key=lambda c: (_label(c), c["pattern"], c["direction"], c["kv_len"]))
    labels = [f"{_label(c)} {_CODES.get(c['pattern'], c['pattern'])} {c['direction']} {c['kv_len']}" for c in rows]
    fig = _figure(max(6.4, 0.45 * len(rows) + 2), 5.0, bottom=0.36)
    ax = fig.add_subplot()
    w = 0.27
    xs = range(len(rows))
    ax.bar([x - w for x in xs], [_value(c, "gna_tile_speedup_bound") for c in rows], w, label="bound: tiles")
    ax.bar(list(xs), [_value(c, "gna_flop_speedup_bound") for c in rows], w, label="bound: FLOPs")
    ax.bar([x + w for x in xs], [_value(c, "speedup_vs_sdpa") or 0 for c in rows], w, label="measured vs SDPA")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("speedup over dense attention")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("GNA tile simulator: upper bounds beside measured speedups", fontsize=10)
    return [_finish(fig, "tile_bounds", "GNA tile-simulator bounds",
                    "Upper bounds of the speedup over dense attention from GNA's tile simulator (tiles a fused "
                    "kernel visits; visible pairs) on each case's own mask and 64-token tiles, beside the measured "
                    "speedup over SDPA.", out)]


def mqar_figure(data: Data, out: Optional[Path]) -> List[Figure]:
    rows = [t for t in data.tasks if t["task"] == "mqar" and t["status"] == "ok"
            and _tvalue(t, "accuracy") is not None and _tvalue(t, "state_size") is not None]
    if not rows:
        return []
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    by: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    for t in rows:
        by[t["mechanism"]].append((max(_tvalue(t, "state_size"), 1.0), _tvalue(t, "accuracy")))
    for mech, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-", label=mech)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("state size (floats per layer)")
    ax.set_ylabel("MQAR accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("MQAR accuracy against state size", fontsize=10)
    return [_finish(fig, "mqar_accuracy_vs_state_size", "MQAR accuracy against state size",
                    "Zoology's multi-query associative recall: accuracy over query positions (best of the "
                    "learning-rate sweep) against the floats of recurrent state a layer keeps (the Zoology / BASED "
                    "plot).", out)]


def icl_figure(data: Data, out: Optional[Path]) -> List[Figure]:
    """In-context linear regression: MSE against context length per mechanism, beside ridge regression."""
    rows = [t for t in data.tasks if t["task"] == "icl_regression" and t["status"] == "ok" and t["result"]
            and t["result"].get("context_lengths")]
    if not rows:
        return []
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    ridge_done = set()
    for t in sorted(rows, key=lambda t: (t["mechanism"], t["seed"])):
        r = t["result"]
        ns = sorted(int(n) for n in r["context_lengths"])
        pts = [(n, r.get(f"mse_n{n}")) for n in ns if r.get(f"mse_n{n}") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{t['mechanism']} (seed {t['seed']})")
        ridge = [(n, r.get(f"ridge_mse_n{n}")) for n in ns if r.get(f"ridge_mse_n{n}") is not None]
        key = tuple(ridge)
        if ridge and key not in ridge_done:
            ridge_done.add(key)
            ax.plot([p[0] for p in ridge], [p[1] for p in ridge], "--", color="black",
                    label="ridge regression (optimum)" if len(ridge_done) == 1 else None)
    ax.set_yscale("log")
    ax.set_xlabel("context length (pairs)")
    ax.set_ylabel("test MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("in-context linear regression", fontsize=10)
    return [_finish(fig, "icl_regression_mse_vs_context", "In-context linear regression",
                    "MSE of the trained model's prediction for the query against the number of in-context examples, "
                    "beside the ridge-regression estimate on the same examples (dashed).", out)]


def _tvalue(t: Dict[str, Any], name: str) -> Optional[float]:
    m = t["measurements"].get(name)
    return None if m is None else m["value"]


def _group_label(g: Dict[str, Any]) -> str:
    name = "SDPA" if g["mechanism"] == BASELINE else g["mechanism"] + (f" {g['grid_rank']}d" if g.get("grid_rank")
                                                                      else "")
    return f"{name} {g['pattern']} {g['direction']}"


def _finish(fig, name: str, title: str, caption: str, out: Optional[Path]) -> Figure:
    svg = _render(fig, name)
    _save(fig, name, svg, out)
    return Figure(name, title, svg, caption)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(v: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v * scale, spec)


def _bytes(v: Optional[float]) -> str:
    if v is None:
        return ""
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", numeric: Sequence[bool] = ()) -> str:
    """An HTML table; cells are HTML already (escape text with :func:`_e`)."""
    numeric = list(numeric) + [False] * (len(headers) - len(numeric))
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td class=\"num\">{c}</td>" if numeric[i] else f"<td>{c}</td>"
                                      for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table class=\"{cls}\"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def runs_table(data: Data) -> str:
    roofs = defaultdict(list)
    for c in data.calibration:
        if c["name"] == "gemm":
            roofs[c["run_id"]].append(f"{c['dtype']} {c['value']:.0f} GFLOP/s (n={(c['detail'] or {}).get('n', '?')})")
        else:
            roofs[c["run_id"]].append(f"memory {c['value']:.0f} {c['unit']}")
    rows = []
    for r in data.runs:
        commit = (r.get("git_commit") or "")[:10] + (" (dirty)" if r.get("git_dirty") else "")
        rows.append([_e(r["id"]), _e(r["started"]), _e(r["finished"] or "unfinished"), _e(r.get("preset")),
                     _e(commit), _e(f"attnlab {r['attnlab_version']}, torch {r['torch_version']}, "
                                    f"python {r['python_version']}"),
                     _e(r.get("cpu_model")), _e(r["threads"]), _e(r["seed"]), _e("; ".join(roofs.get(r["id"], [])))])
    return table(["run", "started", "finished", "preset", "commit", "versions", "CPU", "threads", "seed",
                  "roofs (torch.mm GEMM; copy bandwidth)"], rows, "runs")


def cases_table(data: Data) -> str:
    rows = []
    for c in sorted(data.cases, key=lambda c: (c["pattern"], c["direction"], c["dtype"], c["kv_len"], _label(c))):
        med, q1, q3 = (_value(c, n) for n in ("time_median_s", "time_q1_s", "time_q3_s"))
        spread = f"±{(q3 - q1) / 2 / med * 100:.0f}%" if med and q1 is not None and q3 is not None else ""
        shape = "x".join(map(str, c["grid"])) if c["grid"] else ""
        L = f"{c['q_len']}/{c['kv_len']}" if c["q_len"] != c["kv_len"] else str(c["kv_len"])
        status = c["status"] + (f": {c['message']}" if c["message"] else "")
        rows.append([_e(_label(c)), _e(c["impl_used"] or c["impl"]), _e(c["pattern"]), _e(L), _e(shape),
                     _e(c["direction"]), _e(c["dtype"]), _num(med, ".3f", 1e3), _e(spread),
                     _num(_value(c, "tokens_per_s"), ",.0f"), _num(_value(c, "effective_gflops_per_s"), ".2f"),
                     _num(_value(c, "gemm_peak_fraction"), ".1f", 100), _num(_value(c, "roofline_fraction"), ".0f", 100),
                     _num(_value(c, "sdpa_time_ratio"), ".2f"),
                     _num(_value(c, "density"), ".3f"), _e(_bytes(_value(c, "peak_rss_delta_bytes"))),
                     _e(_bytes(_value(c, "saved_tensor_bytes"))), _e(c["run_id"]),
                     f"<span class=\"st-{_e(c['status'])}\">{_e(status)}</span>"])
    return table(["mechanism", "impl", "pattern", "L", "grid", "dir", "dtype", "median ms", "spread", "tokens/s",
                  "eff GFLOP/s", "% GEMM", "% roof", "t/SDPA", "density", "peak RSS", "saved", "run", "status"], rows,
                 "cases", [False] * 7 + [True] * 11)


def derived_tables(data: Data) -> Tuple[str, str]:
    slopes, eff = [], []
    for d in sorted(data.derived, key=lambda d: (d["name"], _group_label(d["group"]))):
        g, det = d["group"], d["detail"] or {}
        lengths = det.get("lengths") or []
        span = f"{lengths[0]}..{lengths[-1]} ({len(lengths)})" if lengths else ""
        if d["name"].startswith("slope_"):
            slopes.append([_e(_group_label(g)), _e(g["dtype"]), _e(det.get("metric")), _e(span),
                           _num(d["value"], ".2f")])
        elif d["name"].startswith("efficiency_length_"):
            v = d["value"]
            note = det.get("reason", "") if v is None or v == 0 else (
                "inside the measured lengths" if det.get("within_measured") else "extrapolated")
            eff.append([_e(_group_label(g)), _e(g["dtype"]), _e(d["name"][len("efficiency_length_"):]), _e(span),
                        "" if v is None else ("0 (always)" if v == 0 else f"{v:,.0f}"), _e(note)])
    st = table(["configuration", "dtype", "metric", "lengths", "log-log slope"], slopes, "slopes",
               [False] * 4 + [True]) if slopes else ""
    et = table(["configuration", "dtype", "cost", "lengths", "efficiency length (tokens)", "note"], eff, "efficiency",
               [False] * 4 + [True, False]) if eff else ""
    return st, et


def tile_table(data: Data) -> str:
    rows = []
    for c in data.cases:
        if _value(c, "gna_tile_speedup_bound") is None:
            continue
        rows.append([_e(_label(c)), _e(c["pattern"]), _e(c["direction"]), _e(c["kv_len"]),
                     _e(f"{_value(c, 'tiles_visited'):.0f}/{_value(c, 'tiles_total'):.0f}"),
                     _e(f"{_value(c, 'tiles_partial'):.0f}"), _num(_value(c, "gna_tile_speedup_bound"), ".2f"),
                     _num(_value(c, "gna_flop_speedup_bound"), ".2f"), _num(_value(c, "speedup_vs_sdpa"), ".2f")])
    return table(["mechanism", "pattern", "dir", "L", "tiles visited", "partial", "bound (tiles)", "bound (FLOPs)",
                  "measured vs SDPA"], rows, "tiles", [False] * 4 + [True] * 5) if rows else ""


_TASK_HEADLINE = ("accuracy", "mse", "ridge_mse", "mse_ratio", "state_size", "state_size_model", "chance",
                  "majority_baseline", "steps", "wall_s")


def task_tables(data: Data) -> List[Tuple[str, str]]:
    """One table per task: configuration, headline numbers, the conformance column, status."""
    out = []
    by: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for t in data.tasks:
        by[t["task"]].append(t)
    for task, rows in sorted(by.items()):
        configs = [t["config"] for t in rows]
        varying = [k for k in sorted({k for c in configs for k in c})
                   if len({repr(c.get(k)) for c in configs}) > 1 and k not in ("params",)]
        names = [n for n in _TASK_HEADLINE if any(n in t["measurements"] for t in rows)]
        conf = [n for n in CONFORMANCE if any(n in t["measurements"] for t in rows)]
        body = []
        for t in sorted(rows, key=lambda t: (t["mechanism"], repr([t["config"].get(k) for k in varying]), t["seed"])):
            cells = [_e(t["mechanism"])] + [_e(t["config"].get(k)) for k in varying] + [_e(t["seed"])]
            cells += [_num(_tvalue(t, n), ".4g") for n in names]
            detail = (t["result"] or {}).get("conformance_detail", "")
            for n in conf:
                v = _tvalue(t, n)
                text = "n/a" if v is None else ("pass" if v == 1 else "FAIL")
                cells.append(f"<span class=\"conf-{text.replace('/', '')}\" title=\"{_e(detail)}\">{text}</span>")
            status = t["status"] + (f": {t['message']}" if t["message"] else "")
            cells.append(f"<span class=\"st-{_e(t['status'])}\">{_e(status)}</span>")
            body.append(cells)
        head = ["mechanism"] + varying + ["seed"] + names + [f"conformance: {n}" for n in conf] + ["status"]
        fixed = {k: v for k, v in configs[0].items() if k not in varying} if configs else {}
        caption = "fixed configuration: " + ", ".join(f"{k}={v}" for k, v in sorted(fixed.items()))
        numeric = [False] * (2 + len(varying)) + [True] * len(names) + [False] * (len(conf) + 1)
        out.append((task, f"<p class=\"caption\">{_e(caption)}</p>" + table(head, body, f"task task-{_e(task)}",
                                                                           numeric)))
    return out


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
figure { margin: 1em 1em 1em 0; display: inline-block; vertical-align: top; max-width: 100%; }
figure svg { max-width: 100%; height: auto; } figcaption, .caption { font-size: 0.85em; color: #555; }
p.caption { max-width: 60em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; } th { background: #f2f2f2; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.conf-pass { color: #1a7f37; } .conf-FAIL { color: #cf222e; font-weight: bold; } .conf-na { color: #888; }
.st-ok { color: #1a7f37; } .st-unsupported { color: #9a6700; } .st-error, .st-timeout, .st-oom { color: #cf222e; }
nav a { margin-right: 1em; }
"""


def build(data: Data, out: Optional[Path] = None, store_path: str = "") -> Tuple[str, List[Figure]]:
    """The report page (HTML text) and its figures; with ``out``, figures are written under
    ``out/figures`` as SVG and PNG."""
    figdir = None if out is None else Path(out) / "figures"
    sections: List[Tuple[str, str, str]] = []  # (anchor, title, html)

    def figs_html(figs: Sequence[Figure]) -> str:
        return "\n".join(f"<figure id=\"fig-{_e(f.name)}\" class=\"plot\" style=\"width: {_width(f.svg)}\">"
                         f"{_inline(f.svg)}"
                         f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>" for f in figs)

    all_figs: List[Figure] = []
    sections.append(("runs", "Runs", runs_table(data) if data.runs else "<p>The store has no runs.</p>"))
    eff = efficiency_figures(data, figdir)
    if eff:
        sections.append(("scaling", "Time and memory against length (log-log, per CAB pattern)", figs_html(eff)))
    lc = longca_figures(data, figdir)
    if lc:
        sections.append(("longca", "LongCA-bench mask set", figs_html(lc)))
    slopes, efft = derived_tables(data)
    el = efficiency_length_figure(data, figdir)
    if el or efft:
        sections.append(("efficiency-length", "CAB efficiency lengths", figs_html(el) + efft))
    if slopes:
        sections.append(("slopes", "Log-log slopes against length (1 = linear, 2 = quadratic)", slopes))
    gf = gemm_figures(data, figdir)
    if gf:
        sections.append(("gemm", "Effective GFLOP/s as a fraction of GEMM throughput", figs_html(gf)))
    tf = tile_figure(data, figdir)
    if tf:
        sections.append(("tiles", "GNA tile-simulator bounds and measured speedups", figs_html(tf) + tile_table(data)))
    mq = mqar_figure(data, figdir)
    if mq:
        sections.append(("mqar", "MQAR accuracy against state size", figs_html(mq)))
    icl = icl_figure(data, figdir)
    if icl:
        sections.append(("icl", "In-context linear regression against ridge", figs_html(icl)))
    for task, tbl in task_tables(data):
        sections.append((f"task-{task}", f"Task: {task}", tbl))
    if data.cases:
        sections.append(("cases", "Every efficiency case", cases_table(data)))
    for group in (eff, lc, el, gf, tf, mq, icl):
        all_figs += group
    nav = " ".join(f"<a href=\"#{_e(a)}\">{_e(t)}</a>" for a, t, _ in sections)
    body = "\n".join(f"<section id=\"{_e(a)}\"><h2>{_e(t)}</h2>\n{h}\n</section>" for a, t, h in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>attnlab report</title><style>{_CSS}</style></head><body>\n"
            f"<h1>attnlab benchmark report</h1><p class=\"caption\">From {_e(store_path)}, runs "
            f"{_e(', '.join(str(r['id']) for r in data.runs))}; generated {_e(stamp)}.</p>\n<nav>{nav}</nav>\n"
            f"{body}\n</body></html>\n")
    return page, all_figs


def _width(svg: str) -> str:
    """The SVG's own width (e.g. ``460.8pt``), so that a caption wraps under its plot."""
    m = re.search(r'<svg[^>]*\swidth="([0-9.]+)(pt|px)?"', svg)
    return f"{m.group(1)}{m.group(2) or 'px'}" if m else "auto"


def write(store_path: str | Path, out: str | Path = DEFAULT_OUT, runs: Optional[Sequence[Any]] = None) -> Path:
    """Read ``store_path`` and write the report into ``out``; returns the HTML file's path."""
    store_path = Path(store_path)
    if not store_path.is_file():
        raise FileNotFoundError(f"no results store at {store_path} (run attnlab bench first, or pass --store PATH)")
    with Store(store_path) as store:
        data = load(store, runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page, figs = build(data, out, str(store_path))
    path = out / HTML_NAME
    path.write_text(page, encoding="utf-8")
    write.figures = [f.name for f in figs]  # what the last call wrote (for the CLI's message)
    return path


def add_arguments(parser):
    """The ``attnlab report`` options."""
    from . import DEFAULT_STORE

    parser.add_argument("--store", default=DEFAULT_STORE, metavar="PATH",
                        help=f"results store written by attnlab bench (default ./{DEFAULT_STORE})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for {HTML_NAME} and figures/ (default ./{DEFAULT_OUT})")
    parser.add_argument("--run", action="append", metavar="ID",
                        help="a run to report (repeatable; an id, latest or latest-N); default: the newest run with "
                             "efficiency cases and the newest with task cases")
    return parser


def main(args) -> int:
    """``attnlab report`` with parsed ``args`` (``store``, ``out``, ``run``)."""
    import sqlite3
    import sys

    try:
        path = write(args.store, args.out, args.run)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, sqlite3.Error) as exc:
        print(f"attnlab report: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(write.figures)} figures, also as SVG and PNG in {path.parent / 'figures'})")
    return 0


__all__ = ["write", "build", "load", "main", "add_arguments", "DEFAULT_OUT", "HTML_NAME"]
