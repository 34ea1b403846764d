"""``attnlab bench --task``: which task cases a run plans, and one real (tiny) MQAR run through the
benchmark into the store with its state size and conformance column."""
from __future__ import annotations

import json

import pytest

import attnlab
from attnlab import bench
from attnlab.bench import meta, presets
from attnlab.bench.store import Store
from attnlab.bench.tasks import TASKS


def _plan(*argv):
    args = bench.parse_args(list(argv))
    return bench.plan_cases(args), bench.plan_tasks(args)


def test_task_plans():
    cases, tasks = _plan("--task", "mqar", "--task-size", "tiny")
    assert cases == []  # a task run times nothing
    mechs = presets.task_mechanisms()
    assert {"dense", "sliding_window"} <= set(mechs)
    assert set(mechs) - {"dense", "sliding_window"} == {m.name for m in attnlab.mechanisms(family="linear")}
    configs = TASKS["mqar"].default_configs("tiny")
    assert [(t.task, t.mechanism, t.seed) for t in tasks] == [("mqar", m, 0) for m in mechs for _ in configs]
    assert tasks[0].config == configs[0]
    _, tasks = _plan("--task", "all", "--mechanisms", "dense", "--task-size", "tiny", "--seed", "3")
    assert {t.task for t in tasks} == set(TASKS) and {t.seed for t in tasks} == {3}
    assert len({t.key() for t in tasks}) == len(tasks)
    cases, tasks = _plan("--task", "none", "--lengths", "64")
    assert tasks == [] and cases  # 'none': efficiency cases only
    _, quick = _plan()
    assert quick == []  # the quick preset times mechanisms only: tasks take minutes per model on 2 cores
    cases, full = _plan("--preset", "full", "--mechanisms", "dense")
    assert cases and {t.task for t in full} == set(TASKS) and {t.mechanism for t in full} == {"dense"}
    assert full[0].config == TASKS[full[0].task].default_configs("full")[0]
    with pytest.raises(bench.OptionError, match="tiny, quick, standard"):
        _plan("--task", "mqar", "--task-size", "huge")
    with pytest.raises(bench.OptionError, match="sliding_window"):
        _plan("--task", "mqar", "--mechanisms", "sliding_windw", "--task-size", "tiny")


def test_a_real_mqar_run_lands_in_the_store(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    path = tmp_path / "t.sqlite"
    assert bench.main(["--task", "mqar", "--task-size", "tiny", "--mechanisms", "linear", "--store", str(path)]) == 0
    with Store(path) as s:
        (run,) = s.runs()
        (t,) = s.task_cases(run["id"])
    assert t["status"] == "ok" and t["task"] == "mqar" and t["mechanism"] == "linear"
    m = {k: v["value"] for k, v in t["measurements"].items()}
    assert 0.0 <= m["accuracy"] <= 1.0 and m["chance"] == pytest.approx(1 / 32)
    c = t["config"]
    want = attnlab.mechanism("linear").state_size(c["heads"], c["d_model"] // c["heads"], c["d_model"] // c["heads"],
                                                  **attnlab.mechanism("linear").normalize_params(c["params"]))
    assert m["state_size"] == want
    assert m["causal_consistent"] == 1.0 and m["incremental_equal"] == 1.0  # a recurrent form decodes exactly
    assert "incremental" in t["result"]["conformance_detail"]
    # as if killed after the task case was stored: the same command resumes and trains nothing again
    with Store(path) as s:
        s.db.execute("UPDATE runs SET finished = NULL, owner = ?", (json.dumps(dict(meta.owner(), pid_start=-1)),))
    assert bench.main(["--task", "mqar", "--task-size", "tiny", "--mechanisms", "linear", "--store", str(path)]) == 0
    with Store(path) as s:
        (run,) = s.runs()
        (again,) = s.task_cases(run["id"])
    assert run["resumed"] == 1 and run["finished"] and again["id"] == t["id"]
