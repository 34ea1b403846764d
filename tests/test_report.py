"""``attnlab report``: one self-contained HTML file with plots and tables from a results store,
plus PNG/SVG figures; it renders offline in headless Chromium. Quality-task cases flow from
``attnlab bench --task`` into the store and the report (a stand-in task keeps this fast; the real
tasks are tested in tests/test_tasks.py)."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from attnlab import bench, cli
from attnlab.bench import report
from attnlab.bench.store import Store

TINY = ["--heads", "2", "--head-dim", "16", "--repeats", "2", "--warmup", "0", "--threads", "1"]


class _StandIn:
    """A quality task with a known answer: accuracy grows with the state size; 'broken' fails."""

    name = "standin"

    def default_configs(self, size):
        return [{"d_model": d, "size": size} for d in (16, 32)]

    def run(self, mechanism, config, seed):
        if mechanism == "tiled":
            raise NotImplementedError("the stand-in task has no tiled model")
        state = 4.0 * config["d_model"] * (1 if mechanism == "linear" else 8)
        return {"accuracy": min(1.0, state / 1024), "state_size": state, "steps": 10, "lrs_tried": [0.1, 0.2],
                # the conformance column of attnlab.bench.tasks.run_task: True / False / None (not applicable)
                "causal_consistent": True, "incremental_equal": {"dense": False, "linear": True}.get(mechanism),
                "conformance_detail": "stand-in"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from attnlab.bench import tasks as tasks_module

    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNLAB_FLEX_COMPILE", "0")
    mp.setitem(tasks_module.TASKS, "standin", _StandIn())
    mp.setitem(tasks_module.TASKS, "mqar", _StandIn())  # the report's MQAR plot reads task 'mqar'
    mp.setattr(tasks_module, "run_task", lambda name, mech, config, seed: tasks_module.TASKS[name].run(mech, config,
                                                                                                       seed))
    try:
        path = tmp_path_factory.mktemp("report") / "r.sqlite"
        assert bench.main(["--mechanisms", "dense,sliding_window,neighborhood:2d,linear,longca:causal_document",
                           "--lengths", "64,128,256", "--directions", "fwd,fwdbwd", "--store", str(path), *TINY,
                           "--params", '{"sliding_window": {"window": 8}, "neighborhood": {"kernel_size": 3}}']) == 0
        assert bench.main(["--task", "mqar,standin", "--mechanisms", "dense,linear,tiled", "--task-size", "tiny",
                           "--store", str(path)]) == 0
        yield path
    finally:
        mp.undo()


def test_task_cases_are_stored_with_their_numbers_and_statuses(store):
    with Store(store) as s:
        runs = s.runs()
        assert len(runs) == 2
        tasks = s.task_cases(runs[1]["id"])
        assert s.cases(runs[1]["id"]) == []  # --task runs tasks instead of the efficiency cases
    assert len(tasks) == 2 * 3 * 2  # tasks x mechanisms x configurations
    by = {(t["task"], t["mechanism"], t["config"]["d_model"]): t for t in tasks}
    t = by[("mqar", "linear", 32)]
    assert t["status"] == "ok" and t["config"] == {"d_model": 32, "size": "tiny"} and t["seed"] == 0
    m = t["measurements"]
    assert m["accuracy"]["value"] == 0.125 and m["accuracy"]["unit"] == "fraction"
    assert m["state_size"]["value"] == 128 and m["incremental_equal"] == {"value": 1.0, "unit": "bool"}
    assert m["wall_s"]["unit"] == "s" and t["result"]["lrs_tried"] == [0.1, 0.2]  # the whole result as JSON
    assert by[("mqar", "dense", 16)]["measurements"]["incremental_equal"]["value"] == 0.0
    assert by[("standin", "tiled", 16)]["measurements"].get("incremental_equal") is None  # nothing ran
    na = by[("mqar", "linear", 16)]
    assert na["measurements"]["causal_consistent"]["value"] == 1.0
    bad = by[("standin", "tiled", 16)]
    assert bad["status"] == "unsupported" and "no tiled model" in bad["message"]
    # the same command again resumes nothing (the run finished) and a new run stores the same keys
    assert bench.main(["--task", "standin", "--mechanisms", "dense", "--task-size", "tiny", "--store",
                       str(store), "--json", str(store.with_suffix(".json"))]) == 0
    data = json.loads(store.with_suffix(".json").read_text())
    assert len(data["task_cases"]) == 2 and data["cases"] == []


def test_bad_task_options_exit_2(tmp_path, capsys):
    assert bench.main(["--task", "nosuchtask", "--store", str(tmp_path / "x.sqlite")]) == 2
    assert "--task" in capsys.readouterr().err
    assert not (tmp_path / "x.sqlite").exists()


@pytest.fixture(scope="module")
def built(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with Store(store) as s:
        efficiency, tasks = (r["id"] for r in s.runs()[:2])
    assert cli.main(["report", "--store", str(store), "--out", str(out), "--run", str(efficiency), "--run",
                     str(tasks)]) == 0
    return out, report.write.figures


def test_report_files_are_self_contained(built, store):
    out, figures = built
    page = (out / report.HTML_NAME).read_text(encoding="utf-8")
    want = {"time_noncausal_self_fwd_float32", "memory_noncausal_self_fwdbwd_float32", "longca_fwd_float32",
            "gemm_fraction_fwd_float32", "tile_bounds", "mqar_accuracy_vs_state_size"}
    assert want <= set(figures)
    for name in figures:
        assert f'id="fig-{name}"' in page
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ET.parse(out / "figures" / f"{name}.svg")  # well-formed SVG
    # nothing is fetched: no scripts, stylesheets or images from elsewhere; inline SVG only; no URL at all
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "http:" not in page and "https:" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<img" not in page.lower()
    assert page.count("<svg") == len(figures)
    with Store(store) as s:
        n_cases = len(s.cases(s.runs()[0]["id"]))
    assert 'id="efficiency-length"' in page and 'id="task-mqar"' in page and 'id="task-standin"' in page
    assert page.count("<tr>") > n_cases  # every case is a row of the cases table (plus other tables)


def test_report_renders_in_headless_chromium(built, store):
    from browser import open_html

    out, figures = built
    with Store(store) as s:
        n_cases = len(s.cases(s.runs()[0]["id"]))
    with open_html(out / report.HTML_NAME) as view:
        page = view.page
        boxes = page.eval_on_selector_all("figure.plot svg", "els => els.map(e => e.getBoundingClientRect())"
                                          ".map(r => [r.width, r.height])")
        assert len(boxes) == len(figures)
        assert all(w > 200 and h > 100 for w, h in boxes)  # drawn at a real size
        assert page.locator("#cases table tbody tr").count() == n_cases
        assert page.locator("#task-mqar table tbody tr").count() == 6
        cells = page.locator("#task-mqar table").inner_text()
        assert "pass" in cells and "FAIL" in cells  # the conformance column
        assert page.locator("#task-mqar .conf-FAIL").count() == 2  # dense's incremental check, twice
        assert page.locator("#runs table tbody tr").count() == 2
        assert page.title() == "attnlab report"
        assert not view.blocked, view.blocked  # no request left the file
        assert not view.errors, view.errors


def test_report_needs_a_store(tmp_path, capsys):
    assert cli.main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o")]) == 2
    assert "no results store" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
