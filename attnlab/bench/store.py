"""The results store: one SQLite file (stdlib ``sqlite3``), no server.

Tables (schema version :data:`SCHEMA_VERSION`, kept in ``schema_version``)::

    runs          one row per ``attnlab bench`` invocation: start/finish times, git commit and dirty
                  flag, attnlab/torch/python versions, CPU model, torch threads, seed, preset, argv,
                  the resolved options, torch's build configuration, load average
    cases         one row per finished case: its full configuration (the *case key*), the impl
                  actually used, status (ok / unsupported / oom / timeout / error) and message
    measurements  (case, metric name) -> value with its unit
    samples       (case, series name) -> raw samples as a JSON list (e.g. every timed repeat)
    derived       run-level results computed from several cases (e.g. log-log slopes)

Durability: WAL journal, and every case is written with its measurements and samples in one
``BEGIN IMMEDIATE`` transaction when it finishes, so a killed run keeps every finished case
and never leaves half a case. ``UNIQUE(run_id, case_key)`` is what lets a later run resume
(skip the keys already stored) without duplicates; concurrent writers wait on the busy
timeout instead of failing or corrupting the file.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

SCHEMA_VERSION = 1

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

#: Migrations: MIGRATIONS[v] takes a store from schema version v to v + 1 (append, never edit).
MIGRATIONS: Dict[int, str] = {}

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
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per case).
        self.db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
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
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                return
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
            self.db.execute("INSERT OR REPLACE INTO derived (run_id, name, group_key, value, unit, detail) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (run_id, name, canonical(group), value, unit, None if detail is None else
                             json.dumps(detail)))

    # ---- reading -------------------------------------------------------------------------
    def runs(self) -> List[Dict[str, Any]]:
        return [_decode_run(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    def case_keys(self, run_id: int) -> set:
        """Keys of the cases already stored for a run (what a resumed run skips)."""
        return {r[0] for r in self.db.execute("SELECT case_key FROM cases WHERE run_id = ?", (run_id,))}

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
        """A run as one JSON-able dict: ``{"schema_version", "run", "cases", "derived"}``."""
        run = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if run is None:
            raise KeyError(f"no run {run_id} in {self.path}")
        return {"schema_version": self.schema_version(), "run": _decode_run(run), "cases": self.cases(run_id),
                "derived": self.derived(run_id)}


def case_key(config: Dict[str, Any]) -> str:
    """Canonical JSON of a case's configuration fields: equal configurations, equal keys."""
    return canonical({f: (list(config[f]) if f == "grid" and config[f] is not None else config[f])
                      for f in CASE_FIELDS})


def _decode_run(row) -> Dict[str, Any]:
    r = dict(row)
    for c in ("argv", "config", "env"):
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
