"""The `attnlab` command line: list, info, check, bench delegation, errors, console script."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import types
import sys
from importlib import metadata
from pathlib import Path

import pytest

import attnlab
from attnlab import cli
from attnlab.cli import main

NAMES = [m.name for m in attnlab.mechanisms()]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------
def test_list_table_shows_every_entry(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, err = run(capsys, "list")
    assert rc == 0 and not err
    for m in attnlab.mechanisms():
        assert m.name in out
    assert "NS, CS, NC, CC" in out  # dense: all four CAB patterns as short codes
    assert "sdpa, flex, tiled, reference" in out


def test_list_table_names_not_cut_on_narrow_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    for name in NAMES:
        assert name in out


def test_list_json_has_every_mechanism(capsys):
    rc, out, err = run(capsys, "list", "--json")
    assert rc == 0 and not err
    data = json.loads(out)
    assert [d["name"] for d in data] == NAMES
    by_name = {d["name"]: d for d in data}
    for m in attnlab.mechanisms():
        assert by_name[m.name] == json.loads(json.dumps(m.as_dict()))


def test_list_markdown_is_deterministic(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    rc, narrow, _ = run(capsys, "list", "--markdown")
    monkeypatch.setenv("COLUMNS", "300")
    rc2, wide, _ = run(capsys, "list", "--markdown")
    assert rc == rc2 == 0 and narrow == wide
    lines = narrow.splitlines()
    assert lines[0] == "| name | family | layout | patterns | implementations | paper |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(NAMES)
    for line, name in zip(lines[2:], NAMES):
        assert line.startswith(f"| `{name}` |") and line.endswith(" |")
        assert line.replace("\\|", "").count("|") == 7  # six cells, pipes inside cells escaped
    assert "| `neighborhood` | structured | spatial | NS, CS |" in narrow


def test_list_filters(capsys):
    rc, out, _ = run(capsys, "list", "--family", "exact", "--json")
    assert rc == 0 and [d["name"] for d in json.loads(out)] == ["dense", "tiled"]
    rc, out, _ = run(capsys, "list", "--pattern", "CC", "--json")  # short code, any case
    want = [m.name for m in attnlab.mechanisms(pattern="causal_cross")]
    assert rc == 0 and [d["name"] for d in json.loads(out)] == want
    rc, out2, _ = run(capsys, "list", "--pattern", "causal_cross", "--json")
    assert out2 == out
    assert "neighborhood" not in want


@pytest.mark.parametrize("argv,needle", [
    (["list", "--family", "nope"], "family must be one of"),
    (["list", "--pattern", "sideways"], "pattern must be one of"),
])
def test_list_bad_filter_is_a_clean_error(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err and not out


def test_usage_errors_return_2(capsys):
    rc, _, err = run(capsys, "list", "--json", "--markdown")
    assert rc == 2 and "not allowed" in err
    rc, _, err = run(capsys)
    assert rc == 2
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and attnlab.__version__ in out


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def test_info_known(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    m = attnlab.mechanism("sliding_window")
    rc, out, err = run(capsys, "info", "sliding_window")
    assert rc == 0 and not err
    for text in (m.paper, m.summary, m.formula, "sequence", "causal_self"):
        assert text in out
    for p in m.params:
        assert p.name in out and p.describe() in out and p.doc in out
    assert "an int >= 1" in out  # window's valid range
    for i in m.impls:
        assert i.name in out and i.doc in out


def test_info_spatial(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, _ = run(capsys, "info", "neighborhood")
    assert rc == 0 and "1, 2 or 3 spatial axes" in out and "kernel_size" in out


def test_info_unknown_suggests_close_names(capsys):
    rc, out, err = run(capsys, "info", "slidng_window")
    assert rc == 2 and not out
    assert "no mechanism named 'slidng_window'" in err and "did you mean sliding_window" in err
    assert "Traceback" not in err and not err.strip().startswith('"')


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------
class Result:
    def __init__(self, name, ok, detail="", skipped=False):
        self.name, self.ok, self.detail, self.skipped = name, ok, detail, skipped


@pytest.fixture
def fake_checks(monkeypatch):
    """Replace conformance.run_checks, recording how the CLI calls it."""
    calls = []
    box = {"results": []}

    def run_checks(mech, *, seed=0, impls=None, flex_compile=None):
        calls.append((mech.name, seed, impls, flex_compile))
        return list(box["results"])

    monkeypatch.setattr(importlib.import_module("attnlab.conformance"), "run_checks", run_checks)
    return box, calls


def test_check_all_pass(capsys, fake_checks):
    box, calls = fake_checks
    box["results"] = [Result("forward equals reference", True, "max err 1e-7 [tol 1e-5]"),
                      Result("cross attention", True, "not defined", skipped=True)]
    rc, out, _ = run(capsys, "check", "sliding_window", "--seed", "3")
    assert rc == 0
    assert calls == [("sliding_window", 3, None, False)]  # uncompiled flex unless --compile
    assert "PASS  forward equals reference  max err 1e-7 [tol 1e-5]" in out  # no markup eaten
    assert "SKIP  cross attention" in out
    assert "1 passed, 0 failed, 1 skipped" in out


def test_check_failure_exits_1(capsys, fake_checks):
    box, calls = fake_checks
    box["results"] = [Result("forward equals reference", True),
                      Result("gradients equal reference", False, "dq max err 0.3")]
    rc, out, _ = run(capsys, "check", "tiled", "--impl", "tiled", "--compile")
    assert rc == 1
    assert calls == [("tiled", 0, ["tiled"], True)]
    assert "FAIL  gradients equal reference  dq max err 0.3" in out
    assert "FAILED" in out


def test_check_unknown_name(capsys, fake_checks):
    _, calls = fake_checks
    rc, _, err = run(capsys, "check", "dens")
    assert rc == 2 and "did you mean dense" in err and not calls


def test_check_real_suite_on_a_cheap_entry(capsys):
    rc, out, _ = run(capsys, "check", "softcap", "--impl", "tiled")
    assert rc == 0, out
    assert "PASS" in out and "FAIL " not in out
    rc, out, err = run(capsys, "check", "softcap", "--impl", "bogus")
    assert rc == 2 and "bogus" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# bench (delegated to attnlab.bench)
# ---------------------------------------------------------------------------------------------
def test_bench_delegates(capsys, monkeypatch):
    seen = {}
    stub = types.ModuleType("attnlab.bench")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--lengths", type=int, nargs="+", default=[128])

    def run_(args: argparse.Namespace) -> int:
        seen["lengths"] = args.lengths
        return 7

    stub.add_arguments, stub.run = add_arguments, run_
    monkeypatch.setitem(sys.modules, "attnlab.bench", stub)
    monkeypatch.setattr(attnlab, "bench", stub, raising=False)
    assert main(["bench", "--lengths", "256", "512"]) == 7
    assert seen == {"lengths": [256, 512]}
    assert main(["list", "--json"]) == 0  # other commands do not need bench's options
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# the console script
# ---------------------------------------------------------------------------------------------
def test_console_script_runs_list(capsys):
    try:
        metadata.distribution("attnlab")
    except metadata.PackageNotFoundError:
        pytest.skip("attnlab is not installed in this interpreter (scripts/setup.sh installs it into .venv)")
    script = Path(sys.executable).parent / "attnlab"
    assert script.exists(), f"console script missing: {script} (pyproject [project.scripts])"
    proc = subprocess.run([str(script), "list", "--markdown"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli.markdown_table(attnlab.mechanisms())
