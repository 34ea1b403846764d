"""The ``attnlab inspect`` report: one self-contained HTML file and a JSON file with the same data.

The HTML needs nothing outside itself (no CDN, no fonts, no URL of any kind): CSS and a small
vanilla-JavaScript renderer are inlined, the data is embedded as JSON in a
``<script type="application/json">`` element, and every figure is inline SVG drawn by the
renderer. It shows

* a layer x head heatmap for every metric (click a cell to select that head);
* the selected head's attention matrix over a window of tokens, with token labels, and a last
  column holding the attention each query gives to keys outside the window;
* the sink table, retrieval heads, head importance with pruning curves, and the StreamingLLM
  perplexities, each when computed.

**Report data** (``build_*`` helpers and :mod:`attnlab.inspect.command` fill it; all values are
plain JSON, NaN written as ``null``)::

    title, created, attnlab              strings
    model     {path, type, layers, heads, kv_heads, causal}
    input     {tokens: [str], n_tokens, truncated_from: int | null}
    layers, heads                       the captured layer / head indices (rows / columns)
    metrics   [{name, label, group, doc, values: [[float | null]] (layers x heads)}]
    sinks     {eps, rate, position, rows: [{position, token, rate, mean, max}]}
    matrices  {start, size, tokens: [str], layers, heads, data: base64 uint8 (layers, heads,
               size, size + 1) = round(255 * weight), last column = weight outside the window}
    retrieval | importance | pruning | streaming:  the section's data, or {skipped: reason}
    massive_activations  [{layer, batch, token, dim, value, median}]

:func:`encode_matrices` / :func:`decode_matrices` convert the matrix block.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

SCHEMA = 1
#: The keys of the report data the page shows (the JSON file has all of them; long per-position
#: arrays such as ``position_metrics`` stay out of the HTML).
PAGE_KEYS = ("title", "model", "input", "layers", "heads", "metrics", "sinks", "matrices", "retrieval",
             "importance", "pruning", "streaming", "massive_activations")


# ---------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------
def encode_matrices(weights: np.ndarray, start: int) -> Dict:
    """Pack windowed attention maps ``(layers, heads, W, W + 1)`` in [0, 1] as base64 uint8 (1/255 steps)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[3] != w.shape[2] + 1:
        raise ValueError(f"encode_matrices: weights must be (layers, heads, W, W + 1), got {w.shape}")
    q = np.rint(np.clip(np.nan_to_num(w, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    return {"start": int(start), "size": int(w.shape[2]), "shape": list(q.shape), "scale": 255,
            "data": base64.b64encode(q.tobytes()).decode("ascii")}


def decode_matrices(block: Dict) -> np.ndarray:
    """Inverse of :func:`encode_matrices`: float ``(layers, heads, W, W + 1)`` in [0, 1]."""
    raw = np.frombuffer(base64.b64decode(block["data"]), dtype=np.uint8)
    return raw.reshape(block["shape"]).astype(np.float64) / block["scale"]


def plain(x):
    """``x`` as plain JSON data: tensors / arrays to lists, NaN and infinities to None."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _script_json(data) -> str:
    """JSON safe inside ``<script>``: ``/`` and ``<`` escaped (no ``</script>``, no ``://``, no ``<!--``)."""
    text = json.dumps(plain(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("/", "\\/").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_report(data: Dict, out_dir, stem: str = "report") -> Tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.html`` and ``<out_dir>/<stem>.json``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / f"{stem}.html", out / f"{stem}.json"
    json_path.write_text(json.dumps(plain(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(data), encoding="utf-8")
    return html_path, json_path


def render_html(data: Dict) -> str:
    """The report page for ``data`` (see the module docstring) as one HTML string."""
    import html as _html

    title = _html.escape(str(data.get("title", "attnlab inspect")))
    shown = {k: v for k, v in data.items() if k in PAGE_KEYS}
    return (_PAGE.replace("{{TITLE}}", title).replace("{{CSS}}", _CSS).replace("{{JS}}", _JS)
            .replace("{{DATA}}", _script_json(shown)))


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>{{CSS}}</style>
</head>
<body>
<header><h1>{{TITLE}}</h1><div id="summary"></div></header>
<main>
<section id="metrics-section"><h2>Layer &times; head metrics</h2>
<p class="note">Rows are layers, columns heads. Click a cell to show that head's attention matrix below.</p>
<div id="heatmaps"></div></section>
<section id="matrix-section"><h2>Attention matrix</h2>
<div class="controls">layer <select id="sel-layer"></select> head <select id="sel-head"></select>
<span id="matrix-title"></span></div>
<div id="matrix"></div></section>
<section id="sinks-section"><h2>Attention sinks</h2><div id="sinks"></div></section>
<section id="retrieval-section"><h2>Retrieval heads</h2><div id="retrieval"></div></section>
<section id="importance-section"><h2>Head importance and pruning</h2><div id="pruning"></div></section>
<section id="streaming-section"><h2>StreamingLLM perplexity</h2><div id="streaming"></div></section>
<section id="massive-section"><h2>Massive activations</h2><div id="massive"></div></section>
</main>
<script type="application/json" id="report-data">{{DATA}}</script>
<script>{{JS}}</script>
</body>
</html>
"""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:16px 24px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:20px;margin:0 0 6px}h2{font-size:16px;margin:0 0 8px}h3{font-size:13px;margin:0 0 4px}
main{padding:12px 24px}section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 16px;margin:0 0 14px}
#heatmaps{display:flex;flex-wrap:wrap;gap:18px}
.heatmap{display:inline-block}.heatmap .doc{max-width:340px;font-size:11px;color:#555}
.heatmap rect.cell{cursor:pointer}.heatmap rect.cell.selected{stroke:#e4002b;stroke-width:2}
svg text{font-size:10px;fill:#333}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f2f2f2}td.tok{text-align:left;font-family:ui-monospace,monospace}
.note{color:#555;font-size:12px;margin:2px 0 8px}.skipped{color:#8a6d00}
.controls{margin:0 0 6px}#matrix-title{margin-left:12px;font-weight:600}
#matrix{overflow:auto}
.legend{font-size:11px;color:#555}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var sel = {layer: 0, head: 0};
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function fmt(x, d) {
    if (x === null || x === undefined) return "n/a";
    if (typeof x !== "number") return esc(x);
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return x.toFixed(d === undefined ? 3 : d);
  }
  // viridis, 6 stops
  var STOPS = [[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]];
  function color(t) {
    if (t === null || t === undefined || isNaN(t)) return "#cccccc";
    t = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
    var i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }
  function range(values) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (row) { row.forEach(function (v) {
      if (v !== null && !isNaN(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    if (lo === Infinity) return [0, 1];
    return lo === hi ? [lo, lo + 1] : [lo, hi];
  }
  function skipped(id, block, what) {
    var el = document.getElementById(id);
    if (!block) { el.innerHTML = '<p class="skipped">' + esc(what) + ' not computed.</p>'; return true; }
    if (block.skipped) { el.innerHTML = '<p class="skipped">' + esc(what) + ' skipped: ' + esc(block.skipped) + '</p>';
      return true; }
    return false;
  }

  // ---- summary --------------------------------------------------------------------------
  var m = D.model || {}, inp = D.input || {};
  document.getElementById("summary").innerHTML =
    '<span>' + esc(m.type || "") + ' from <code>' + esc(m.path || "") + '</code>: ' + m.layers + ' layers, ' +
    m.heads + ' heads' + (m.kv_heads && m.kv_heads !== m.heads ? ' (' + m.kv_heads + ' key/value heads)' : '') +
    (m.causal ? ', causal' : ', bidirectional') + '. Input: ' + inp.n_tokens + ' tokens' +
    (inp.truncated_from ? ' (truncated from ' + inp.truncated_from + ')' : '') + '.</span>';

  // ---- heatmaps -------------------------------------------------------------------------
  var CELL = 14, PADL = 30, PADT = 16;
  function heatmap(metric) {
    var vals = metric.values, r = range(vals), nl = vals.length, nh = nl ? vals[0].length : 0;
    var w = PADL + nh * CELL + 4, h = PADT + nl * CELL + 4, s = [];
    s.push('<svg class="hm" width="' + w + '" height="' + h + '">');
    for (var c = 0; c < nh; c++) s.push('<text x="' + (PADL + c * CELL + CELL / 2) + '" y="11" text-anchor="middle"' +
      (D.heads[c] > 9 ? ' style="font-size:8px"' : '') + '>' + D.heads[c] + '</text>');
    for (var i = 0; i < nl; i++) {
      s.push('<text x="' + (PADL - 4) + '" y="' + (PADT + i * CELL + CELL - 3) + '" text-anchor="end">' + D.layers[i] +
        '</text>');
      for (var j = 0; j < nh; j++) {
        var v = vals[i][j], t = (v === null) ? null : (v - r[0]) / (r[1] - r[0]);
        s.push('<rect class="cell" data-layer="' + i + '" data-head="' + j + '" x="' + (PADL + j * CELL) + '" y="' +
          (PADT + i * CELL) + '" width="' + (CELL - 1) + '" height="' + (CELL - 1) + '" fill="' + color(t) + '">' +
          '<title>layer ' + D.layers[i] + ', head ' + D.heads[j] + ': ' + fmt(v, 4) + '</title></rect>');
      }
    }
    s.push('</svg>');
    return '<div class="heatmap" id="heatmap-' + esc(metric.name) + '" data-metric="' + esc(metric.name) + '">' +
      '<h3>' + esc(metric.label || metric.name) + '</h3>' + s.join("") +
      '<div class="legend">min ' + fmt(r[0]) + ' <span style="color:' + color(0) + '">&#9632;</span> &rarr; ' +
      '<span style="color:' + color(1) + '">&#9632;</span> max ' + fmt(r[1]) + '</div>' +
      (metric.doc ? '<div class="doc">' + esc(metric.doc) + '</div>' : '') + '</div>';
  }
  var hm = document.getElementById("heatmaps");
  hm.innerHTML = (D.metrics || []).map(heatmap).join("");
  hm.addEventListener("click", function (ev) {
    var t = ev.target.closest ? ev.target.closest("rect.cell") : null;
    if (!t) return;
    select(+t.getAttribute("data-layer"), +t.getAttribute("data-head"));
  });

  // ---- matrix ---------------------------------------------------------------------------
  var MX = D.matrices, bytes = null;
  if (MX && MX.data) {
    var bin = atob(MX.data);
    bytes = new Uint8Array(bin.length);
    for (var b = 0; b < bin.length; b++) bytes[b] = bin.charCodeAt(b);
  }
  var selL = document.getElementById("sel-layer"), selH = document.getElementById("sel-head");
  selL.innerHTML = (D.layers || []).map(function (l, i) { return '<option value="' + i + '">' + l + '</option>'; }).join("");
  selH.innerHTML = (D.heads || []).map(function (h, i) { return '<option value="' + i + '">' + h + '</option>'; }).join("");
  selL.addEventListener("change", function () { select(+selL.value, sel.head); });
  selH.addEventListener("change", function () { select(sel.layer, +selH.value); });

  function drawMatrix() {
    var el = document.getElementById("matrix");
    var title = document.getElementById("matrix-title");
    var L = D.layers[sel.layer], H = D.heads[sel.head];
    title.textContent = "layer " + L + " \u00b7 head " + H;
    if (!bytes) { el.innerHTML = '<p class="skipped">No attention maps stored (--matrix-tokens 0).</p>'; return; }
    var n = MX.size, nc = n + 1, nh = MX.shape[1], base = ((sel.layer * nh) + sel.head) * n * nc;
    var toks = MX.tokens, C = n > 48 ? 9 : 13, lab = 0;
    toks.forEach(function (t) { lab = Math.max(lab, Math.min(14, String(t).length)); });
    var padL = 8 + lab * 6.2, padT = 8 + lab * 6.2, s = [];
    s.push('<svg class="mx" data-layer="' + L + '" data-head="' + H + '" width="' + (padL + nc * C + 50) +
      '" height="' + (padT + n * C + 10) + '">');
    function short(t) { t = String(t); return esc(t.length > 14 ? t.slice(0, 13) + "\u2026" : t); }
    for (var j = 0; j < n; j++) {
      var x = padL + j * C + C / 2;
      s.push('<text transform="translate(' + x + ',' + (padT - 4) + ') rotate(-60)">' + short(toks[j]) + '</text>');
    }
    s.push('<text transform="translate(' + (padL + n * C + C / 2) + ',' + (padT - 4) + ') rotate(-60)">(outside)</text>');
    for (var i = 0; i < n; i++) {
      s.push('<text x="' + (padL - 4) + '" y="' + (padT + i * C + C - 2) + '" text-anchor="end">' + short(toks[i]) +
        '</text>');
      for (var k = 0; k < nc; k++) {
        var v = bytes[base + i * nc + k] / MX.scale;
        s.push('<rect class="mcell" x="' + (padL + k * C + (k === n ? 3 : 0)) + '" y="' + (padT + i * C) +
          '" width="' + (C - 1) + '" height="' + (C - 1) + '" fill="' + color(Math.sqrt(v)) + '"><title>' +
          esc(toks[i]) + ' \u2192 ' + (k === n ? '(keys outside the window)' : esc(toks[k])) + ': ' + v.toFixed(3) +
          '</title></rect>');
      }
    }
    s.push('</svg>');
    el.innerHTML = '<p class="note">Tokens ' + MX.start + ' to ' + (MX.start + n - 1) + ' of ' + inp.n_tokens +
      ' (rows: queries, columns: keys; colour: square root of the weight). The last column is the weight on keys ' +
      'outside this window.</p>' + s.join("");
  }
  function select(l, h) {
    sel.layer = l; sel.head = h; selL.value = String(l); selH.value = String(h);
    Array.prototype.forEach.call(document.querySelectorAll("rect.cell.selected"), function (r) {
      r.classList.remove("selected"); });
    Array.prototype.forEach.call(document.querySelectorAll('rect.cell[data-layer="' + l + '"][data-head="' + h + '"]'),
      function (r) { r.classList.add("selected"); });
    drawMatrix();
  }

  // ---- tables ---------------------------------------------------------------------------
  function table(id, head, rows) {
    return '<table id="' + id + '"><thead><tr>' + head.map(function (h) { return '<th>' + esc(h) + '</th>'; }).join("") +
      '</tr></thead><tbody>' + rows.map(function (r) { return '<tr>' + r.join("") + '</tr>'; }).join("") +
      '</tbody></table>';
  }
  function td(x, d) { return '<td>' + fmt(x, d) + '</td>'; }
  function tok(t) { return '<td class="tok">' + esc(t) + '</td>'; }

  var S = D.sinks;
  if (!skipped("sinks", S, "Sink analysis")) {
    document.getElementById("sinks").innerHTML =
      '<p class="note">Sink rate (key ' + S.position + ' receives mean attention &gt; ' + S.eps +
      ' over the queries that see it, as a share of layer-head pairs): <b>' + fmt(S.rate) + '</b>. ' +
      'Keys ranked by their share of layer-head pairs for which they are sinks.</p>' +
      table("sinks-table", ["position", "token", "sink share", "mean received", "max received"],
        S.rows.map(function (r) { return [td(r.position, 0), tok(r.token), td(r.rate), td(r.mean), td(r.max)]; }));
  }

  var R = D.retrieval;
  if (!skipped("retrieval", R, "Retrieval-head detection")) {
    var heads = R.heads || [];
    document.getElementById("retrieval").innerHTML =
      '<p class="note">Retrieval score (Wu et al.): share of the needle copied by a head attending top-1 to the ' +
      'token it emits, averaged over ' + R.trials.length + ' passkey trials (answered correctly: ' +
      fmt(R.accuracy, 2) + '). Retrieval heads: score &gt; ' + R.threshold + ': <b>' + heads.length + '</b> (' +
      fmt(100 * R.fraction, 1) + '% of all heads).</p>' +
      table("retrieval-table", ["layer", "head", "score"], heads.map(function (h) {
        return [td(h[0], 0), td(h[1], 0), td(h[2])]; })) +
      '<h3>Trials</h3>' + table("retrieval-trials", ["passkey", "depth", "tokens", "answer", "correct"],
        R.trials.map(function (t) { return [tok(t.passkey), td(t.depth, 2), td(t.tokens, 0), tok(t.answer),
          '<td>' + (t.correct ? "yes" : "no") + '</td>']; }));
  }

  var P = D.pruning, I = D.importance;
  if (!skipped("pruning", I, "Head importance")) {
    var html = '<p class="note">Importance (Michel et al.): E|dL/d&xi;| of a gate on each head over ' + I.samples +
      ' sample(s); measure: ' + esc(I.loss_name || "") + '. Heatmaps above: raw and per-layer normalized.</p>';
    if (P && !P.skipped) html += curve(P);
    else if (P && P.skipped) html += '<p class="skipped">Pruning curves skipped: ' + esc(P.skipped) + '</p>';
    document.getElementById("pruning").innerHTML = html;
  }
  function curve(P) {
    var W = 460, H = 240, l = 56, r = 14, t = 12, b = 36, xs = P.fractions;
    var all = P.importance.concat(P.random_max, P.random_min).filter(function (v) { return v !== null; });
    var lo = Math.min.apply(null, all), hi = Math.max.apply(null, all);
    if (hi === lo) hi = lo + 1;
    function X(f) { return l + (W - l - r) * f; }
    function Y(v) { return t + (H - t - b) * (1 - (v - lo) / (hi - lo)); }
    function line(ys) { return xs.map(function (f, i) { return X(f).toFixed(1) + "," + Y(ys[i]).toFixed(1); }).join(" "); }
    var band = xs.map(function (f, i) { return X(f).toFixed(1) + "," + Y(P.random_max[i]).toFixed(1); })
      .concat(xs.slice().reverse().map(function (f, k) { var i = xs.length - 1 - k;
        return X(f).toFixed(1) + "," + Y(P.random_min[i]).toFixed(1); })).join(" ");
    var s = ['<svg id="pruning-chart" width="' + W + '" height="' + H + '">'];
    s.push('<line x1="' + l + '" y1="' + (H - b) + '" x2="' + (W - r) + '" y2="' + (H - b) + '" stroke="#888"/>');
    s.push('<line x1="' + l + '" y1="' + t + '" x2="' + l + '" y2="' + (H - b) + '" stroke="#888"/>');
    [0, 0.25, 0.5, 0.75, 1].forEach(function (f) {
      s.push('<text x="' + X(f) + '" y="' + (H - b + 14) + '" text-anchor="middle">' + Math.round(100 * f) + '%</text>'); });
    [lo, (lo + hi) / 2, hi].forEach(function (v) {
      s.push('<text x="' + (l - 4) + '" y="' + (Y(v) + 3) + '" text-anchor="end">' + fmt(v, 2) + '</text>'); });
    s.push('<text x="' + ((l + W - r) / 2) + '" y="' + (H - 4) + '" text-anchor="middle">share of heads removed</text>');
    s.push('<polygon points="' + band + '" fill="#f4b183" fill-opacity="0.35" stroke="none"/>');
    s.push('<polyline class="curve-random" points="' + line(P.random) + '" fill="none" stroke="#d9534f" stroke-width="2"/>');
    s.push('<polyline class="curve-importance" points="' + line(P.importance) +
      '" fill="none" stroke="#2b6cb0" stroke-width="2"/>');
    s.push('</svg>');
    return '<h3>Pruning curves</h3><p class="note"><span style="color:#2b6cb0">&#9632;</span> by ascending ' +
      'importance (area ' + fmt(P.auc_importance) + ') &nbsp; <span style="color:#d9534f">&#9632;</span> random ' +
      'order, mean of ' + P.random_orders + ' (area ' + fmt(P.auc_random) + '; band: min to max). Lower is better.</p>' +
      s.join("") + table("pruning-table", ["removed", "importance order", "random (mean)"],
        xs.map(function (f, i) { return [td(100 * f, 0), td(P.importance[i]), td(P.random[i])]; }));
  }

  var T = D.streaming;
  if (!skipped("streaming", T, "StreamingLLM evaluation")) {
    document.getElementById("streaming").innerHTML =
      '<p class="note">Perplexity over ' + T.tokens + ' tokens, one forward pass under a mask: full attention, ' +
      'the last ' + T.window + ' keys, and the last ' + T.window + ' keys plus the first ' + T.sinks +
      ' (attention sinks). Positions are those of the full sequence.</p>' +
      table("streaming-table", ["attention", "perplexity"], [
        [tok("full"), td(T.full)], [tok("window " + T.window), td(T.window_only)],
        [tok("window " + T.window + " + " + T.sinks + " sinks"), td(T.window_sinks)]]);
  }

  var MA = D.massive_activations;
  document.getElementById("massive").innerHTML = !MA ? '<p class="skipped">Massive activations not computed.</p>' :
    '<p class="note">Hidden-state entries with |h| &gt; 100 and &gt; 1000 times the median |h| of their layer ' +
    '(Sun et al. 2024): <b>' + MA.length + '</b>' + (MA.length ? ' (largest first)' : '') + '.</p>' +
    (MA.length ? table("massive-table", ["layer", "token", "", "dim", "value", "layer median |h|"],
      MA.slice(0, 20).map(function (r) { return [td(r.layer, 0), td(r.token, 0),
        tok((D.input.tokens || [])[r.token] || ""), td(r.dim, 0), td(r.value, 1), td(r.median)]; })) : "");

  // ---- initial selection: the head with the highest previous-token score (or first metric) ----
  var first = (D.metrics || []).filter(function (x) { return x.name === "prev_token"; })[0] || (D.metrics || [])[0];
  var best = [0, 0];
  if (first) {
    var top = -Infinity;
    first.values.forEach(function (row, i) { row.forEach(function (v, j) {
      if (v !== null && v > top) { top = v; best = [i, j]; } }); });
  }
  if ((D.layers || []).length) select(best[0], best[1]);
  document.body.setAttribute("data-ready", "1");
})();
"""
