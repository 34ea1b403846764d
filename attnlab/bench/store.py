"""The results store: one SQLite file (stdlib ``sqlite3``), no server.

Tables (schema version :data:`SCHEMA_VERSION`, kept in ``schema_version``)::

    runs              one row per run of ``attnlab bench``: start/finish times, git commit and dirty
                      flag, attnlab/torch/python versions, CPU model, torch threads, seed, preset, argv,
                      the resolved options, torch's build configuration, load average; the *plan key*
                      (what the run measures) and its *owner* (the process writing it), for resuming
    cases             one row per finished efficiency case: its full configuration (the *case key*),
                      the impl actually used, status (ok / unsupported / oom / timeout / error), message
    measurements      (case, metric name) -> value with its unit
    samples           (case, series name) -> raw samples as a JSON list (every timed repeat, and the
                      paired SDPA baseline call before each)
    derived           run-level results computed from several cases (log-log slopes, efficiency lengths)
    calibration       run-level machine measurements (the GEMM throughput per dtype and threads)
    task_cases        one row per finished quality-task case (task, mechanism, configuration, seed,
                      status, the task's whole result as JSON)
    task_measurements (task case, metric name) -> value with its unit

Durability: WAL journal, and every case is written with its measurements and samples in one
``BEGIN IMMEDIATE`` transaction when it finishes, so a killed run keeps every finished case
and never leaves half a case. ``UNIQUE(run_id, case_key)`` is what lets a later run resume
(skip the keys already stored) without duplicates; concurrent writers wait on the busy
timeout instead of failing or corrupting the file.

Resuming (:meth:`Store.claim_run`): a run records its plan key and its owner (host, boot id,
process id and that process's start time). A later run with the same plan key takes over the
newest unfinished run of that key whose owner is no longer alive on this machine, in the same
transaction that checks it, so two processes never write one run; a run whose owner still
lives (a concurrent run of the same command) is left alone and the newcomer starts its own.

Migrations: :data:`MIGRATIONS` ``[v]`` takes a store from version ``v`` to ``v + 1``; a new
store is created at version 1 and migrated forward like any old one, so there is one path.
"""
from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

SCHEMA_VERSION = 2

_SCHEMA_V1 = """
CREATE TABLE runs (
    id              INTEGER PRIMARY KEY,
    started         TEXT NOT NULL,
    finished        TEXT,               -- NULL while running or when the run was killed
    git_commit      TEXT,
    git_dirty       INTEGER,
    attnlab_version TEXT NOT NULL,
    torch_version   TEXT NOT NULL,
    python_version  TEXT NOT NULL,
    platform        TEXT,
    cpu_model       TEXT,
    cpu_count       INTEGER,
    threads         INTEGER NOT NULL,
    seed            INTEGER NOT NULL,
    preset          TEXT,
    argv            TEXT NOT NULL,      -- JSON list
    config          TEXT NOT NULL,      -- JSON: the resolved options
    torch_config    TEXT,               -- torch.__config__.show()
    env             TEXT,               -- JSON: environment variables that change results
    loadavg         TEXT,               -- /proc/loadavg at the start (other load skews timings)
    loadavg_end     TEXT                -- /proc/loadavg at the finish
);
CREATE TABLE cases (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    case_key    TEXT NOT NULL,          -- canonical JSON of every configuration field below
    mechanism   TEXT NOT NULL,
    impl        TEXT NOT NULL,          -- requested: 'auto' or an impl name
    impl_used   TEXT,                   -- what actually ran (NULL when nothing ran)
    pattern     TEXT NOT NULL,
    direction   TEXT NOT NULL,
    dtype       TEXT NOT NULL,
    batch       INTEGER NOT NULL,
    heads       INTEGER NOT NULL,
    kv_heads    INTEGER NOT NULL,
    q_len       INTEGER NOT NULL,
    kv_len      INTEGER NOT NULL,
    head_dim    INTEGER NOT NULL,
    grid        TEXT,                   -- JSON list (spatial mechanisms) or NULL
    params      TEXT NOT NULL,          -- JSON object
    status      TEXT NOT NULL CHECK (status IN ('ok', 'unsupported', 'oom', 'timeout', 'error')),
    message     TEXT,
    baseline_case_id INTEGER REFERENCES cases(id),
    started     TEXT,
    finished    TEXT,
    UNIQUE (run_id, case_key)
);
CREATE TABLE measurements (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    name    TEXT NOT NULL,
    value   REAL,
    unit    TEXT NOT NULL,
    PRIMARY KEY (case_id, name)
);
CREATE TABLE samples (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    name    TEXT NOT NULL,
    unit    TEXT NOT NULL,
    data    TEXT NOT NULL,              -- JSON list
    PRIMARY KEY (case_id, name)
);
CREATE TABLE derived (
    run_id    INTEGER NOT NULL REFERENCES runs(id),
    name      TEXT NOT NULL,
    group_key TEXT NOT NULL,            -- canonical JSON of what the value summarizes
    value     REAL,
    unit      TEXT NOT NULL,
    detail    TEXT,                     -- JSON: inputs of the fit etc.
    PRIMARY KEY (run_id, name, group_key)
);
CREATE INDEX cases_by_run ON cases(run_id);
"""

_V1_TO_V2 = """
ALTER TABLE runs ADD COLUMN plan_key TEXT;      -- hash of what the run measures (resume finds it by this)
ALTER TABLE runs ADD COLUMN owner TEXT;         -- JSON {host, boot_id, pid, pid_start} of the writing process
ALTER TABLE runs ADD COLUMN resumed INTEGER NOT NULL DEFAULT 0;  -- times a restarted command took it over
CREATE INDEX runs_by_plan ON runs(plan_key);
CREATE TABLE calibration (
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    name    TEXT NOT NULL,                  -- 'gemm'
    dtype   TEXT NOT NULL,
    threads INTEGER NOT NULL,
    value   REAL,
    unit    TEXT NOT NULL,
    samples TEXT,                           -- JSON list of raw samples
    detail  TEXT,                           -- JSON: sizes etc.
    PRIMARY KEY (run_id, name, dtype, threads)
);
CREATE TABLE task_cases (
    id        INTEGER PRIMARY KEY,
    run_id    INTEGER NOT NULL REFERENCES runs(id),
    case_key  TEXT NOT NULL,                -- canonical JSON of task, mechanism, config, seed
    task      TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    config    TEXT NOT NULL,                -- JSON object
    seed      INTEGER NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('ok', 'unsupported', 'oom', 'timeout', 'error')),
    message   TEXT,
    result    TEXT,                         -- JSON: the task's whole result
    started   TEXT,
    finished  TEXT,
    UNIQUE (run_id, case_key)
);
CREATE TABLE task_measurements (
    case_id INTEGER NOT NULL REFERENCES task_cases(id),
    name    TEXT NOT NULL,
    value   REAL,
    unit    TEXT NOT NULL,
    PRIMARY KEY (case_id, name)
);
CREATE INDEX task_cases_by_run ON task_cases(run_id);
"""

#: Migrations: MIGRATIONS[v] takes a store from schema version v to v + 1 (append, never edit).
MIGRATIONS: Dict[int, str] = {1: _V1_TO_V2}

CASE_FIELDS = ("mechanism", "impl", "pattern", "direction", "dtype", "batch", "heads", "kv_heads", "q_len",
               "kv_len", "head_dim", "grid", "params")


def now() -> str:
    """UTC timestamp with milliseconds (ISO 8601)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def canonical(obj: Any) -> str:
    """The one JSON spelling of ``obj`` used for keys (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Store:
    """An open results store. ``Store(path)`` creates the file and schema when missing."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two processes opening a new store at once can get SQLITE_BUSY from the switch to WAL or
        # the first schema write without SQLite's busy handler being consulted: retry until timeout.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._open(timeout)
                return
            except sqlite3.OperationalError as exc:
                if getattr(self, "db", None) is not None:
                    self.db.close()
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05 + 0.2 * random.random())

    def _open(self, timeout: float):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per case).
        self.db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # ---- schema --------------------------------------------------------------------------
    def _migrate(self):
        with self._write():
            have = self.db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
            if have is None:
                for stmt in _statements(_SCHEMA_V1):
                    self.db.execute(stmt)
                self.db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                self.db.execute("INSERT INTO schema_version VALUES (1)")
            version = self.db.execute("SELECT version FROM schema_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has results schema version {version}, newer than this attnlab's "
                                   f"{SCHEMA_VERSION}; upgrade attnlab or use another --store")
            while version < SCHEMA_VERSION:
                for stmt in _statements(MIGRATIONS[version]):
                    self.db.execute(stmt)
                version += 1
                self.db.execute("UPDATE schema_version SET version = ?", (version,))
            # stores written before runs.loadavg_end joined schema 1 (pre-release): add the column
            run_cols = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
            if "loadavg_end" not in run_cols:
                self.db.execute("ALTER TABLE runs ADD COLUMN loadavg_end TEXT")

    def schema_version(self) -> int:
        return self.db.execute("SELECT version FROM schema_version").fetchone()[0]

    def _write(self):
        return _Transaction(self.db)

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- writing -------------------------------------------------------------------------
    def start_run(self, meta: Dict[str, Any]) -> int:
        """Insert a run row from ``meta`` (keys = column names; dicts/lists are stored as JSON)."""
        cols = [c for c in meta if c != "id"]
        vals = [json.dumps(meta[c]) if isinstance(meta[c], (dict, list, tuple)) else meta[c] for c in cols]
        with self._write():
            cur = self.db.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                  vals)
            return cur.lastrowid

    def claim_run(self, meta: Dict[str, Any], owner: Dict[str, Any], alive: Callable[[Dict[str, Any]], bool],
                  resume: bool = True) -> Tuple[int, bool]:
        """``(run_id, resumed)``: take over the newest unfinished run with ``meta["plan_key"]`` whose
        owner is not ``alive`` (a killed run of the same command), or start a new run from ``meta``.

        The check and the take-over happen in one write transaction, so of two processes
        restarting the same command at once only one resumes the run."""
        meta = dict(meta, owner=owner)
        with self._write():
            if resume and meta.get("plan_key"):
                for row in self.db.execute("SELECT id, owner FROM runs WHERE plan_key = ? AND finished IS NULL "
                                           "ORDER BY id DESC", (meta["plan_key"],)).fetchall():
                    prev = json.loads(row["owner"]) if row["owner"] else None
                    if prev is not None and alive(prev):
                        continue
                    self.db.execute("UPDATE runs SET owner = ?, resumed = resumed + 1 WHERE id = ?",
                                    (json.dumps(owner), row["id"]))
                    return row["id"], True
            cols = [c for c in meta if c != "id"]
            vals = [json.dumps(meta[c]) if isinstance(meta[c], (dict, list, tuple)) else meta[c] for c in cols]
            cur = self.db.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                  vals)
            return cur.lastrowid, False

    def finish_run(self, run_id: int, loadavg: Optional[str] = None):
        with self._write():
            self.db.execute("UPDATE runs SET finished = ?, loadavg_end = ? WHERE id = ?", (now(), loadavg, run_id))

    def add_case(self, run_id: int, config: Dict[str, Any], *, status: str, message: Optional[str] = None,
                 impl_used: Optional[str] = None, measurements: Iterable[tuple] = (),
                 samples: Iterable[tuple] = (), baseline_case_id: Optional[int] = None,
                 started: Optional[str] = None) -> int:
        """Store one finished case atomically; returns its id.

        ``config`` has every field of :data:`CASE_FIELDS`; ``measurements`` are ``(name, value,
        unit)``; ``samples`` are ``(name, unit, list)``.
        """
        missing = [f for f in CASE_FIELDS if f not in config]
        if missing:
            raise ValueError(f"case config lacks {', '.join(missing)}")
        key = case_key(config)
        row = dict(config)
        row["grid"] = None if config["grid"] is None else json.dumps(list(config["grid"]))
        row["params"] = canonical(config["params"])
        with self._write():
            cur = self.db.execute(
                f"INSERT INTO cases (run_id, case_key, {', '.join(CASE_FIELDS)}, impl_used, status, message, "
                f"baseline_case_id, started, finished) VALUES (?, ?, {', '.join('?' * len(CASE_FIELDS))}, "
                f"?, ?, ?, ?, ?, ?)",
                (run_id, key, *[row[f] for f in CASE_FIELDS], impl_used, status, message, baseline_case_id,
                 started, now()))
            cid = cur.lastrowid
            self.db.executemany("INSERT INTO measurements (case_id, name, value, unit) VALUES (?, ?, ?, ?)",
                                [(cid, n, None if v is None else float(v), u) for n, v, u in measurements])
            self.db.executemany("INSERT INTO samples (case_id, name, unit, data) VALUES (?, ?, ?, ?)",
                                [(cid, n, u, json.dumps(list(v))) for n, u, v in samples])
        return cid

    def add_derived(self, run_id: int, name: str, group: Dict[str, Any], value: Optional[float], unit: str,
                    detail: Optional[Dict[str, Any]] = None):
        with self._write():
            self._insert_derived(run_id, name, group, value, unit, detail)

    def set_derived(self, run_id: int, rows: Sequence[Dict[str, Any]]):
        """Replace every derived row of a run by ``rows`` (dicts with name, group, value, unit, detail),
        in one transaction: derived rows are a function of the run's stored cases."""
        with self._write():
            self.db.execute("DELETE FROM derived WHERE run_id = ?", (run_id,))
            for d in rows:
                self._insert_derived(run_id, d["name"], d["group"], d["value"], d["unit"], d.get("detail"))

    def _insert_derived(self, run_id, name, group, value, unit, detail):
        self.db.execute("INSERT OR REPLACE INTO derived (run_id, name, group_key, value, unit, detail) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, name, canonical(group), None if value is None else float(value), unit,
                         None if detail is None else json.dumps(detail)))

    def add_calibration(self, run_id: int, name: str, dtype: str, threads: int, value: Optional[float], unit: str,
                        samples: Sequence[float] = (), detail: Optional[Dict[str, Any]] = None):
        """Store a machine measurement of the run (kept when already there: a resumed run reuses it)."""
        with self._write():
            self.db.execute("INSERT OR IGNORE INTO calibration (run_id, name, dtype, threads, value, unit, samples, "
                            "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (run_id, name, dtype, threads, value, unit, json.dumps(list(samples)),
                             None if detail is None else json.dumps(detail)))

    def add_task_case(self, run_id: int, key: str, *, task: str, mechanism: str, config: Dict[str, Any], seed: int,
                      status: str, message: Optional[str] = None, result: Optional[Dict[str, Any]] = None,
                      measurements: Iterable[tuple] = (), started: Optional[str] = None) -> int:
        """Store one finished quality-task case atomically; returns its id."""
        with self._write():
            cur = self.db.execute(
                "INSERT INTO task_cases (run_id, case_key, task, mechanism, config, seed, status, message, result, "
                "started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, key, task, mechanism, canonical(config), seed, status, message,
                 None if result is None else json.dumps(result, default=_json_default), started, now()))
            cid = cur.lastrowid
            self.db.executemany("INSERT INTO task_measurements (case_id, name, value, unit) VALUES (?, ?, ?, ?)",
                                [(cid, n, None if v is None else float(v), u) for n, v, u in measurements])
        return cid

    # ---- reading -------------------------------------------------------------------------
    def runs(self) -> List[Dict[str, Any]]:
        return [_decode_run(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    def run(self, run_id: int) -> Dict[str, Any]:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            have = [r["id"] for r in self.db.execute("SELECT id FROM runs ORDER BY id")]
            raise KeyError(f"no run {run_id} in {self.path} (runs: {', '.join(map(str, have)) or 'none'})")
        return _decode_run(row)

    def resolve_run(self, spec: Any) -> int:
        """A run id from ``spec``: an id, ``latest`` (the newest run) or ``latest-1`` (the one before)."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM runs ORDER BY id")]
        text = str(spec).strip().lower()
        m = re.fullmatch(r"latest(?:-(\d+))?", text)
        if m:
            back = int(m.group(1) or 0)
            if back >= len(ids):
                raise KeyError(f"{self.path} has {len(ids)} run(s); there is no {spec!r}")
            return ids[-1 - back]
        if not text.isdigit():
            raise ValueError(f"run must be an id, 'latest' or 'latest-N', got {spec!r}")
        if int(text) not in ids:
            raise KeyError(f"no run {text} in {self.path} (runs: {', '.join(map(str, ids)) or 'none'})")
        return int(text)

    def case_keys(self, run_id: int) -> set:
        """Keys of the cases already stored for a run (what a resumed run skips)."""
        return {r[0] for r in self.db.execute("SELECT case_key FROM cases WHERE run_id = ?", (run_id,))}

    def task_case_keys(self, run_id: int) -> set:
        return {r[0] for r in self.db.execute("SELECT case_key FROM task_cases WHERE run_id = ?", (run_id,))}

    def calibration(self, run_id: int) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM calibration WHERE run_id = ? ORDER BY name, dtype, threads", (run_id,))
        return [dict(r, samples=json.loads(r["samples"] or "[]"),
                     detail=None if r["detail"] is None else json.loads(r["detail"])) for r in rows]

    def task_cases(self, run_id: int) -> List[Dict[str, Any]]:
        """Every quality-task case of a run with its measurements, in the order they finished."""
        out = []
        for r in self.db.execute("SELECT * FROM task_cases WHERE run_id = ? ORDER BY id", (run_id,)).fetchall():
            c = dict(r)
            c["config"] = json.loads(c["config"])
            c["result"] = None if c["result"] is None else json.loads(c["result"])
            c["measurements"] = {m["name"]: {"value": m["value"], "unit": m["unit"]} for m in self.db.execute(
                "SELECT name, value, unit FROM task_measurements WHERE case_id = ? ORDER BY name", (c["id"],))}
            out.append(c)
        return out

    def cases(self, run_id: int) -> List[Dict[str, Any]]:
        """Every case of a run with its measurements and samples, in the order they finished."""
        out = []
        for r in self.db.execute("SELECT * FROM cases WHERE run_id = ? ORDER BY id", (run_id,)).fetchall():
            c = dict(r)
            c["grid"] = None if c["grid"] is None else json.loads(c["grid"])
            c["params"] = json.loads(c["params"])
            c["measurements"] = {m["name"]: {"value": m["value"], "unit": m["unit"]} for m in self.db.execute(
                "SELECT name, value, unit FROM measurements WHERE case_id = ? ORDER BY name", (c["id"],))}
            c["samples"] = {s["name"]: {"unit": s["unit"], "values": json.loads(s["data"])} for s in
                            self.db.execute("SELECT name, unit, data FROM samples WHERE case_id = ?", (c["id"],))}
            out.append(c)
        return out

    def derived(self, run_id: int) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM derived WHERE run_id = ? ORDER BY name, group_key", (run_id,))
        return [{"name": r["name"], "group": json.loads(r["group_key"]), "value": r["value"], "unit": r["unit"],
                 "detail": None if r["detail"] is None else json.loads(r["detail"])} for r in rows]

    def export_run(self, run_id: int) -> Dict[str, Any]:
        """A run as one JSON-able dict: ``{"schema_version", "run", "calibration", "cases", "derived",
        "task_cases"}``."""
        return {"schema_version": self.schema_version(), "run": self.run(run_id),
                "calibration": self.calibration(run_id), "cases": self.cases(run_id),
                "derived": self.derived(run_id), "task_cases": self.task_cases(run_id)}

    def export_csv(self, run_id: int, out: TextIO, kind: str = "cases"):
        """Write a run as CSV, one row per case: the configuration columns, then one column per
        measurement name (value only; units in the header as ``name [unit]``).

        ``kind``: ``cases`` (efficiency cases), ``tasks`` (quality-task cases; the configuration
        flattened to ``config.KEY`` columns) or ``derived``."""
        import csv

        if kind == "derived":
            rows = [{"run_id": run_id, "name": d["name"], **{f"group.{k}": v for k, v in d["group"].items()},
                     "value": d["value"], "unit": d["unit"]} for d in self.derived(run_id)]
            head = _union_keys(rows)
        elif kind in ("cases", "tasks"):
            if kind == "cases":
                cases = self.cases(run_id)
                fixed = ["run_id", "id", "mechanism", "impl", "impl_used", "pattern", "direction", "dtype", "batch",
                         "heads", "kv_heads", "q_len", "kv_len", "head_dim", "grid", "params", "status", "message",
                         "baseline_case_id"]
                base = [{f: (canonical(c[f]) if f in ("grid", "params") and c[f] is not None else c[f])
                         for f in fixed} for c in cases]
            else:
                cases = self.task_cases(run_id)
                fixed = ["run_id", "id", "task", "mechanism", "seed", "status", "message"]
                base = [dict({f: c[f] for f in fixed}, **{f"config.{k}": (canonical(v) if isinstance(v, (list, dict))
                                                                          else v) for k, v in c["config"].items()})
                        for c in cases]
            units: Dict[str, str] = {}
            for c in cases:
                for n, m in c["measurements"].items():
                    units.setdefault(n, m["unit"])
            names = sorted(units)
            rows = [dict(b, **{f"{n} [{units[n]}]": c["measurements"].get(n, {}).get("value") for n in names})
                    for b, c in zip(base, cases)]
            head = _union_keys(base) + [f"{n} [{units[n]}]" for n in names]
        else:
            raise ValueError(f"kind must be 'cases', 'tasks' or 'derived', got {kind!r}")
        w = csv.DictWriter(out, fieldnames=head, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def case_key(config: Dict[str, Any]) -> str:
    """Canonical JSON of a case's configuration fields: equal configurations, equal keys."""
    return canonical({f: (list(config[f]) if f == "grid" and config[f] is not None else config[f])
                      for f in CASE_FIELDS})


def _union_keys(rows: Sequence[Dict[str, Any]]) -> List[str]:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return keys


def _json_default(x):
    """JSON for what tasks may return besides plain numbers: numpy scalars/arrays, tensors, tuples."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _decode_run(row) -> Dict[str, Any]:
    r = dict(row)
    for c in ("argv", "config", "env", "owner"):
        if r.get(c) is not None:
            r[c] = json.loads(r[c])
    return r


def _statements(script: str) -> Sequence[str]:
    """Split a schema script into statements (``executescript`` would commit our transaction)."""
    lines = [ln.split("--", 1)[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class _Transaction:
    """``with`` block = one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
