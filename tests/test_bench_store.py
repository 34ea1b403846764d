"""The results store and runs: schema migration, resuming a run killed with SIGKILL (exactly the
rows of an uninterrupted run), two runs writing one store at once, CSV/JSON export, and
``attnlab bench compare``'s regression rule on raw samples."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnlab import bench, cli
from attnlab.bench import compare, meta
from attnlab.bench.store import _SCHEMA_V1, SCHEMA_VERSION, Store, _statements

ROOT = Path(__file__).resolve().parent.parent
#: The tiled engine everywhere: no FlexAttention, so the child processes never import torch._dynamo.
TINY = ["--heads", "2", "--head-dim", "16", "--warmup", "0", "--threads", "1", "--impl", "tiled"]
#: 3 mechanisms + the SDPA baseline x 6 lengths x 2 directions = 48 cases: long enough to be killed mid-run
KILLED = ["--mechanisms", "dense,sliding_window,tiled", "--lengths", "64,96,128,160,192,224",
          "--directions", "fwd,fwdbwd", "--repeats", "3", "--params", '{"sliding_window": {"window": 16}}', *TINY]


def _env():
    return dict(os.environ, ATTNLAB_FLEX_COMPILE="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _child(args, store):
    return subprocess.Popen([sys.executable, "-m", "attnlab.bench", *args, "--store", str(store)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _count(store) -> int:
    try:
        with sqlite3.connect(str(store), timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _snapshot(store):
    """Everything a run's rows say except measured values: keys, statuses, metric names, sample counts."""
    with Store(store) as s:
        (run,) = s.runs()
        cases = {c["case_key"]: (c["status"], c["impl_used"], tuple(sorted(c["measurements"])),
                                 tuple(sorted((n, len(x["values"])) for n, x in c["samples"].items())))
                 for c in s.cases(run["id"])}
        derived = sorted((d["name"], json.dumps(d["group"], sort_keys=True)) for d in s.derived(run["id"]))
        calibration = [(c["name"], c["dtype"], c["threads"]) for c in s.calibration(run["id"])]
        n_rows = {t: s.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("cases", "measurements", "samples", "derived", "calibration")}
        return run, cases, derived, calibration, n_rows


def test_a_run_killed_with_sigkill_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    killed, whole = tmp_path / "killed.sqlite", tmp_path / "whole.sqlite"
    proc = _child(KILLED, killed)
    deadline = time.monotonic() + 240
    while proc.poll() is None and _count(killed) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    with Store(killed) as s:
        (run,) = s.runs()
        done = len(s.case_keys(run["id"]))
    assert run["finished"] is None and 3 <= done < 48  # killed mid-run: some cases, no finish

    assert bench.main([*KILLED, "--store", str(killed)]) == 0  # the same command again
    assert bench.main([*KILLED, "--store", str(whole)]) == 0  # an uninterrupted run, for comparison
    run, cases, derived, calibration, n_rows = _snapshot(killed)
    run_w, cases_w, derived_w, calibration_w, n_rows_w = _snapshot(whole)
    assert run["finished"] is not None and run["resumed"] == 1 and run_w["resumed"] == 0
    assert run["plan_key"] == run_w["plan_key"]
    assert len(cases) == 48 and cases == cases_w  # no loss, no duplicates, the same rows
    assert derived == derived_w and derived
    assert calibration == calibration_w == [("bandwidth", "bytes", 1), ("gemm", "float32", 1)]
    assert n_rows == n_rows_w


def test_two_runs_writing_one_store_at_once(tmp_path):
    store = tmp_path / "shared.sqlite"
    args = ["--mechanisms", "dense,sliding_window", "--lengths", "64,128", "--directions", "fwd", "--repeats", "2",
            *TINY]
    procs = [_child(args, store) for _ in range(2)]  # the same command twice, at once
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-2000:]
    with Store(store) as s:
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = s.runs()
        assert len(runs) == 2 and all(r["finished"] for r in runs)  # neither took over the other's live run
        assert runs[0]["owner"]["pid"] != runs[1]["owner"]["pid"]
        keys = [s.case_keys(r["id"]) for r in runs]
        assert keys[0] == keys[1] and len(keys[0]) == 6
        assert s.db.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 12


def _meta(**kw):
    m = {"started": "t", "attnlab_version": "0", "torch_version": "0", "python_version": "3", "threads": 1, "seed": 0,
         "argv": [], "config": {}, "plan_key": "p"}
    m.update(kw)
    return m


def test_claim_takes_over_only_unfinished_runs_of_dead_writers(tmp_path):
    me = meta.owner()
    dead = dict(me, pid_start=(me["pid_start"] or 0) + 1)  # this pid, another start time: a reused pid
    with Store(tmp_path / "c.sqlite") as s:
        a, resumed = s.claim_run(_meta(), dead, meta.alive)
        assert not resumed
        b, resumed = s.claim_run(_meta(), me, meta.alive)  # a's writer is dead: take it over
        assert (b, resumed) == (a, True) and s.run(a)["owner"]["pid_start"] == me["pid_start"]
        c, resumed = s.claim_run(_meta(), me, meta.alive)  # now its writer (this process) lives: a new run
        assert c != a and not resumed
        d, resumed = s.claim_run(_meta(plan_key="other"), me, meta.alive)  # another plan: never c or a
        assert d not in (a, c) and not resumed
        s.finish_run(a)
        s.finish_run(c)
        s.db.execute("UPDATE runs SET owner = ?", (json.dumps(dead),))  # every writer gone
        e, resumed = s.claim_run(_meta(), me, meta.alive)  # finished runs are never taken over
        assert e not in (a, c, d) and not resumed
        f, resumed = s.claim_run(_meta(), me, meta.alive, resume=False)  # --new-run, although e's writer is dead
        assert f not in (a, c, d, e) and not resumed
    assert not meta.alive(dict(me, pid=2 ** 22 + 12345)) and meta.alive(dict(me, host="elsewhere"))


def test_a_schema_1_store_migrates_forward(tmp_path):
    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(str(path), isolation_level=None)
    for stmt in _statements(_SCHEMA_V1):
        db.execute(stmt)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO runs (started, attnlab_version, torch_version, python_version, threads, seed, argv, "
               "config) VALUES ('t', '0', '0', '3', 1, 0, '[]', '{}')")
    db.execute("INSERT INTO cases (run_id, case_key, mechanism, impl, pattern, direction, dtype, batch, heads, "
               "kv_heads, q_len, kv_len, head_dim, params, status) VALUES (1, 'k', 'dense', 'auto', "
               "'noncausal_self', 'fwd', 'float32', 1, 2, 2, 8, 8, 4, '{}', 'ok')")
    db.execute("INSERT INTO measurements VALUES (1, 'time_median_s', 0.5, 's')")
    db.close()
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 2
        (run,) = s.runs()
        assert run["plan_key"] is None and run["owner"] is None and run["resumed"] == 0
        (case,) = s.cases(1)
        assert case["measurements"]["time_median_s"]["value"] == 0.5
        assert s.task_cases(1) == [] and s.calibration(1) == []
        data = s.export_run(1)
        assert data["schema_version"] == 2 and data["task_cases"] == []


# --------------------------------------------------------------------------------------------
# Export and compare
# --------------------------------------------------------------------------------------------
def _case(**kw):
    c = dict(mechanism="dense", impl="auto", pattern="noncausal_self", direction="fwd", dtype="float32", batch=1,
             heads=2, kv_heads=2, q_len=64, kv_len=64, head_dim=16, grid=None, params={})
    c.update(kw)
    return c


BASE = [1.00, 1.01, 0.99, 1.02, 1.00]


def _two_runs(path):
    with Store(path) as s:
        a = s.start_run(_meta())
        b = s.start_run(_meta())
        for rid, factors in ((a, (1.0, 1.0, 1.0, 1.0)), (b, (1.3, 1.0, 0.7, 1.03))):
            for L, f in zip((64, 128, 256, 512), factors):
                t = [x * f for x in BASE]
                paired = [x * (1.3 if (rid == b and L == 64) else 1.0) for x in BASE]
                s.add_case(rid, _case(kv_len=L, q_len=L), status="ok", impl_used="sdpa",
                           measurements=[("time_median_s", sorted(t)[2], "s")],
                           samples=[("time_s", "s", t), ("sdpa_paired_time_s", "s", paired)])
        s.add_case(b, _case(kv_len=1024, q_len=1024), status="timeout", message="exceeded")
    return a, b


def test_compare_flags_regressions_beyond_noise(tmp_path, capsys):
    path = tmp_path / "cmp.sqlite"
    a, b = _two_runs(path)
    with Store(path) as s:
        rows = {r.label.split("L=")[1]: r for r in compare.compare(s, a, b)}
        assert rows["64"].verdict == "regression" and rows["64"].ratio == pytest.approx(1.3)
        assert rows["64"].p == pytest.approx(1 / 252)  # 5 + 5 samples, fully separated: exact one-sided p
        assert rows["128"].verdict == "same" and rows["256"].verdict == "improvement"
        assert rows["512"].verdict == "same"  # 3% is below the 5% threshold
        assert rows["1024"].verdict == "only in B"
        # relative to the paired SDPA call, the 1.3x at L=64 is the machine's, not the mechanism's
        rel = {r.label.split("L=")[1]: r for r in compare.compare(s, a, b, relative=True)}
        assert rel["64"].verdict == "same" and rel["256"].verdict == "improvement"
    assert cli.main(["bench", "compare", str(a), "latest", "--store", str(path)]) == 1  # a regression: exit 1
    out = capsys.readouterr().out
    assert "1 regression(s), 1 improvement(s)" in out and "L=64" in out
    assert cli.main(["bench", "compare", str(a), str(a), "--store", str(path)]) == 0
    assert cli.main(["bench", "compare", str(a), "99", "--store", str(path)]) == 2


def test_the_rule_needs_separated_samples_and_a_change_beyond_the_spread():
    # medians 20% apart but the samples overlap (wide spread): not flagged
    assert compare.judge([1.0, 1.6, 0.7, 1.3, 0.9], [1.2, 0.8, 1.5, 1.1, 1.9])["verdict"] == "same"
    # fully separated, 3 + 3 samples: the smallest one-sided p is 1/20 = 0.05, not below alpha
    j = compare.judge([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert j["p"] == pytest.approx(0.05) and j["verdict"] == "same"
    assert compare.judge([1.0] * 4, [2.0] * 4)["verdict"] == "regression"
    # the normal approximation takes over for many samples and agrees in direction
    import numpy as np

    r = np.random.default_rng(0)
    assert compare.mann_whitney_greater(r.normal(0, 1, 40), r.normal(1, 1, 40)) < 1e-3
    assert compare.mann_whitney_greater(r.normal(1, 1, 40), r.normal(0, 1, 40)) > 0.9


def test_export_csv_and_json(tmp_path, capsys):
    path = tmp_path / "cmp.sqlite"
    a, b = _two_runs(path)
    assert cli.main(["bench", "export", "--store", str(path)]) == 0  # latest run, CSV on stdout
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 5 and {r["run_id"] for r in rows} == {str(b)}
    assert rows[0]["time_median_s [s]"] and rows[-1]["status"] == "timeout" and rows[-1]["message"] == "exceeded"
    out = tmp_path / "x" / "run.json"
    assert cli.main(["bench", "export", str(a), "--format", "json", "--out", str(out), "--store", str(path)]) == 0
    data = json.loads(out.read_text())
    with Store(path) as s:
        assert data == json.loads(json.dumps(s.export_run(a)))
    assert cli.main(["bench", "export", "latest-5", "--store", str(path)]) == 2
    assert cli.main(["bench", "export", "--store", str(tmp_path / "missing.sqlite")]) == 2
    assert not (tmp_path / "missing.sqlite").exists()
