"""`attnlab bench`: cases land in the SQLite store with run metadata, statuses never stop a run,
effective pair counts are exact, ratios are against SDPA measured in the same run.

Tiny settings only (L <= 128, 2 heads, head dim 16, 2 repeats); FlexAttention runs uncompiled
(ATTNLAB_FLEX_COMPILE=0) except in one tiny compiled case. No timing is asserted.
"""
from __future__ import annotations

import json
import math
import signal
import sqlite3
from dataclasses import replace

import pytest
import torch

import attnlab
from attnlab import bench
from attnlab.bench import cases as bcases
from attnlab.bench import flops, presets
from attnlab.bench.store import SCHEMA_VERSION, Store
from attnlab.patterns.blocks import RUNS

TINY = ["--heads", "2", "--head-dim", "16", "--repeats", "2", "--warmup", "0"]


def _run(tmp_path, *argv, name="r"):
    store, js = tmp_path / f"{name}.sqlite", tmp_path / f"{name}.json"
    args = [*argv, *TINY, "--store", str(store), "--json", str(js)]
    rc = bench.main(args)
    return rc, store, js


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNLAB_FLEX_COMPILE", "0")
    try:
        tmp = tmp_path_factory.mktemp("bench")
        threads = torch.get_num_threads()
        out = _run(tmp, "--mechanisms", "dense,sliding_window,neighborhood:2d,linear", "--lengths", "64,100,128",
                   "--directions", "fwd,fwdbwd", "--threads", "1")
        assert torch.get_num_threads() == threads  # --threads is undone after the run
        yield out
    finally:
        mp.undo()


def _cases(store):
    with Store(store) as s:
        (run,) = s.runs()
        return run, s.cases(run["id"]), s.derived(run["id"])


def test_rows_land_in_the_store_with_run_metadata(basic):
    rc, store, _ = basic
    assert rc == 0
    run, cases, _ = _cases(store)
    assert run["finished"] is not None and run["started"] <= run["finished"]
    assert run["torch_version"] == torch.__version__ and run["attnlab_version"] == attnlab.__version__
    assert run["python_version"] and run["cpu_model"] and run["threads"] == 1 and run["seed"] == 0
    assert run["preset"] == "quick" and "--mechanisms" in run["argv"] and run["config"]["lengths"] == [64, 100, 128]
    assert run["git_dirty"] in (0, 1, None) and run["env"]["ATTNLAB_FLEX_COMPILE"] == "0"
    # 4 mechanisms + the SDPA baseline, x 3 lengths x 2 directions; one row each, all ok
    assert len(cases) == 5 * 3 * 2
    assert {c["status"] for c in cases} == {"ok"}
    assert len({c["case_key"] for c in cases}) == len(cases)
    by = {(c["mechanism"], c["kv_len"], c["direction"]): c for c in cases}
    na = by[("neighborhood", 128, "fwd")]
    assert na["grid"] == [8, 16] and na["impl_used"] == "native" and na["params"] == {"kernel_size": [8, 16]}
    assert by[("sliding_window", 64, "fwdbwd")]["impl_used"] == "native"  # its range kernel has a backward
    assert by[("dense", 64, "fwd")]["impl_used"] == "sdpa" and by[("sliding_window", 64, "fwd")]["params"] == {
        "window": 512}
    for c in cases:
        m = c["measurements"]
        for name in ("first_call_s", "second_call_s", "time_median_s", "time_q1_s", "time_q3_s", "tokens_per_s",
                     "effective_gflops_per_s", "gemm_peak_fraction", "peak_rss_delta_bytes", "sdpa_gflops_ratio"):
            assert m[name]["value"] is not None, (c["mechanism"], name)
        assert ("unmasked_pairs" in m) == (c["mechanism"] != "linear")  # linear counts its own FLOPs
        assert len(c["samples"]["time_s"]["values"]) == 2
        assert m["time_median_s"]["value"] == pytest.approx(sorted(c["samples"]["time_s"]["values"])[0] / 2 +
                                                             sorted(c["samples"]["time_s"]["values"])[1] / 2)
        assert ("saved_tensor_bytes" in m) == (c["direction"] == "fwdbwd")


def test_saved_tensor_bytes_are_exact(basic):
    _, store, _ = basic
    _, cases, _ = _cases(store)
    c = next(c for c in cases if c["mechanism"] == "sliding_window" and c["direction"] == "fwdbwd"
             and c["kv_len"] == 128)
    B, H, L, D = 1, 2, 128, 16
    # the range kernel keeps q, k, v, out (fp32), the fp32 log-sum-exp and its two int64 tables of
    # (L, RUNS) range bounds: O(L), no L x L matrix
    assert c["measurements"]["saved_tensor_bytes"]["value"] == 4 * B * H * L * D * 4 + B * H * L * 4 + 2 * L * RUNS * 8


def test_json_export_parses_and_matches_the_store(basic):
    _, store, js = basic
    data = json.loads(js.read_text())
    run, cases, derived = _cases(store)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["run"]["id"] == run["id"] and len(data["cases"]) == len(cases)
    assert data["cases"][0]["measurements"]["time_median_s"]["unit"] == "s"
    assert data["derived"] == derived


def test_ratio_is_against_sdpa_of_the_same_run(basic):
    _, store, _ = basic
    _, cases, _ = _cases(store)
    by_id = {c["id"]: c for c in cases}
    checked = 0
    for c in cases:
        m = c["measurements"]
        if c["mechanism"] == bcases.BASELINE:
            assert c["impl_used"] == "torch" and m["sdpa_gflops_ratio"]["value"] == 1.0
            continue
        base = by_id[c["baseline_case_id"]]  # a case of this very run
        assert base["mechanism"] == bcases.BASELINE
        for f in ("pattern", "direction", "dtype", "batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"):
            assert base[f] == c[f]
        bm = base["measurements"]
        # Paired: each timed repeat follows one baseline call on the same shapes; the time ratio is
        # the median of the per-repeat ratios, the GFLOP/s ratio follows from it and the FLOP counts.
        ratio = m["sdpa_time_ratio"]["value"]
        assert ratio == pytest.approx(m["sdpa_paired_time_ratio"]["value"])
        assert 0 < m["sdpa_paired_median_s"]["value"]
        assert m["sdpa_gflops_ratio"]["value"] == pytest.approx(
            m["effective_flops"]["value"] / bm["effective_flops"]["value"] / ratio)
        assert base["id"] < c["id"]  # measured before the cases that use it
        checked += 1
    assert checked == 4 * 3 * 2


def test_gemm_peak_is_measured_in_the_run_and_divides_every_case(basic):
    _, store, _ = basic
    run, cases, _ = _cases(store)
    with Store(store) as s:
        cal, bw = sorted(s.calibration(run["id"]), key=lambda c: c["name"] != "gemm")
    n = cal["detail"]["n"]
    assert cal["name"] == "gemm" and cal["dtype"] == "float32" and cal["threads"] == 1 and len(cal["samples"]) == 9
    assert cal["value"] == pytest.approx(2 * n ** 3 / min(cal["samples"]) / 1e9)
    assert bw["name"] == "bandwidth" and bw["unit"] == "GB/s" and bw["threads"] == 1 and len(bw["samples"]) == 9
    assert bw["value"] == pytest.approx(bw["detail"]["bytes_per_call"] / min(bw["samples"]) / 1e9)
    for c in cases:
        m = c["measurements"]
        fl, moved, med = m["effective_flops"]["value"], m["bytes_moved"]["value"], m["time_median_s"]["value"]
        assert m["gemm_peak_fraction"]["value"] == pytest.approx(m["effective_gflops_per_s"]["value"] / cal["value"])
        # the roofline: the time the slower of the two roofs allows, over the measured time
        assert m["arithmetic_intensity"]["value"] == pytest.approx(fl / moved)
        roof = max(fl / cal["value"], moved / bw["value"]) / 1e9
        assert m["roofline_fraction"]["value"] == pytest.approx(roof / med)
        assert m["roofline_fraction"]["value"] >= m["gemm_peak_fraction"]["value"] * (1 - 1e-9)


def test_bytes_moved_counts_inputs_and_output_once_and_thrice_with_the_backward():
    from attnlab.bench.flops import bytes_moved

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 6)
    call = attnlab.mechanism("dense").prepare(q, k, v, causal=False)
    fwd = 4 * (2 * 4 * 10 * (8 + 6) + 2 * 2 * 12 * (8 + 6))  # q and the output; k and v (GQA: 2 heads)
    assert bytes_moved(call, "fwd") == fwd and bytes_moved(call, "fwdbwd") == 3 * fwd
    call16 = attnlab.mechanism("dense").prepare(q.half(), k.half(), v.half(), causal=False)
    assert bytes_moved(call16, "fwd") == fwd // 2
    # Aaren's query is one row per head (a view repeated along the length axis)
    qa = q[:, :, :1].expand_as(q)
    shared = attnlab.mechanism("aaren").prepare(qa, k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1),
                                                causal=True)
    assert bytes_moved(shared, "fwd") == 4 * (2 * 4 * (8 + 10 * 6) + 2 * 4 * 12 * (8 + 6))


def test_tile_bounds_are_the_gna_simulator_on_the_case_mask(basic):
    from attnlab.bench.runner import tile_bounds
    from attnlab.patterns import executor as ex
    from attnlab.patterns.neighborhood import simulate_tiles

    _, store, _ = basic
    _, cases, _ = _cases(store)
    with_bounds = {(c["mechanism"], c["kv_len"], c["direction"]) for c in cases
                   if "gna_tile_speedup_bound" in c["measurements"]}
    assert with_bounds == {(m, L, d) for m in ("sliding_window", "neighborhood") for L in (64, 100, 128)
                           for d in ("fwd", "fwdbwd")}
    c = next(c for c in cases if c["mechanism"] == "neighborhood" and c["kv_len"] == 128 and c["direction"] == "fwd")
    case = bcases.Case(**{**{k: c[k] for k in bcases.Case.__dataclass_fields__}, "grid": tuple(c["grid"])})
    q, k, v, _, params = bcases.make_inputs(case, 0)
    call = attnlab.mechanism("neighborhood").prepare(q, k, v, **params)
    mask, _ = ex.plan(call)
    rep = simulate_tiles(mask, (8, 16), ex.default_tile((8, 16)), ex.default_tile((8, 16)))
    m = c["measurements"]
    assert (m["tiles_visited"]["value"], m["tiles_total"]["value"]) == (rep.tiles_visited, rep.tiles_total)
    assert m["gna_tile_speedup_bound"]["value"] == pytest.approx(rep.tile_speedup)
    assert m["gna_flop_speedup_bound"]["value"] == pytest.approx(128 * 128 / m["unmasked_pairs"]["value"] * 2)
    assert m["speedup_vs_sdpa"]["value"] == pytest.approx(1 / m["sdpa_time_ratio"]["value"])
    assert tile_bounds(attnlab.mechanism("dense").prepare(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))) is None


def test_linear_entries_count_their_own_flops_and_state(basic):
    _, store, _ = basic
    _, cases, _ = _cases(store)
    m = attnlab.mechanism("linear")
    for c in (c for c in cases if c["mechanism"] == "linear"):
        case = bcases.Case(**{k: c[k] for k in bcases.Case.__dataclass_fields__})
        q, k, v, _, params = bcases.make_inputs(case, 0)
        call = m.prepare(q, k, v, **params)
        want = m.flops(call) * (3.5 if c["direction"] == "fwdbwd" else 1.0)
        meas = c["measurements"]
        assert meas["effective_flops"]["value"] == pytest.approx(want) and "density" not in meas
        assert meas["state_size_floats"]["value"] == m.state_size(2, 16, 16, **call.params)
        assert c["impl_used"] == "chunked"


def test_slopes_are_derived_for_three_lengths(basic):
    _, store, _ = basic
    _, _, derived = _cases(store)
    names = {(d["group"]["mechanism"], d["group"]["direction"], d["name"]) for d in derived}
    assert ("sliding_window", "fwdbwd", "slope_saved_bytes_vs_L") in names
    assert ("dense", "fwd", "slope_time_vs_L") in names
    saved = next(d for d in derived if d["name"] == "slope_saved_bytes_vs_L" and d["group"]["mechanism"] ==
                 "sliding_window")
    assert saved["value"] == pytest.approx(1.0, abs=1e-6)  # O(L) exactly
    assert saved["detail"]["lengths"] == [64, 100, 128]


def test_failing_cases_get_a_status_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    # flex cannot serve forward+backward on CPU; `tiled` has no flex impl; window=0 is invalid (error)
    rc, store, js = _run(tmp_path, "--mechanisms", "sliding_window,tiled,sink_window", "--impl", "flex",
                         "--directions", "fwdbwd", "--lengths", "64",
                         "--params", '{"sink_window": {"window": 0}}')
    assert rc == 1  # an error case makes the exit status 1, after the whole run
    _, cases, _ = _cases(store)
    st = {c["mechanism"]: c for c in cases}
    assert st[bcases.BASELINE]["status"] == "ok"
    assert st["sliding_window"]["status"] == "unsupported"
    assert "inference-only" in st["sliding_window"]["message"]
    assert st["tiled"]["status"] == "unsupported" and "no impl 'flex'" in st["tiled"]["message"]
    assert st["sink_window"]["status"] == "error" and "window" in st["sink_window"]["message"]
    assert json.loads(js.read_text())["run"]["finished"] is not None


def test_undeclared_pattern_is_unsupported_and_timeout_is_a_status(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    rc, store, _ = _run(tmp_path, "--mechanisms", "neighborhood:1d,dense", "--patterns", "causal_cross",
                        "--directions", "fwd", "--lengths", "64")
    assert rc == 0
    _, cases, _ = _cases(store)
    st = {c["mechanism"]: c for c in cases}
    assert st["neighborhood"]["status"] == "unsupported" and "causal_cross" in st["neighborhood"]["message"]
    assert st["dense"]["status"] == "ok" and st["dense"]["q_len"] == 32 and st["dense"]["kv_len"] == 64
    outer = signal.setitimer(signal.ITIMER_REAL, 300)  # e.g. pytest-timeout's alarm: must survive
    try:
        rc, store, _ = _run(tmp_path, "--mechanisms", "tiled", "--directions", "fwdbwd", "--lengths", "128",
                            "--timeout", "0.0005", name="t")
        assert 250 < signal.getitimer(signal.ITIMER_REAL)[0] <= 300
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
    assert rc == 0
    _, cases, _ = _cases(store)
    assert {c["status"] for c in cases} == {"timeout"} and "timeout" in cases[0]["message"]


def test_a_timeout_wrapped_by_torch_compile_is_still_a_timeout():
    from attnlab.bench.runner import CaseTimeout, _caused_by

    try:
        try:
            raise CaseTimeout("exceeded the 1 s case timeout")
        except CaseTimeout as inner:
            raise RuntimeError("dynamo: compilation failed") from inner
    except RuntimeError as outer:
        assert isinstance(_caused_by(outer, CaseTimeout), CaseTimeout)
        assert _caused_by(outer, KeyError) is None


def test_bad_options_exit_2(tmp_path, capsys):
    assert bench.main(["--mechanisms", "sliding_windw", "--store", str(tmp_path / "x.sqlite")]) == 2
    assert "sliding_window" in capsys.readouterr().err  # names the close match
    assert bench.main(["--params", "{not json", "--store", str(tmp_path / "x.sqlite")]) == 2
    assert bench.main(["--directions", "back", "--store", str(tmp_path / "x.sqlite")]) == 2
    assert not (tmp_path / "x.sqlite").exists()  # nothing ran, nothing written
    assert bench.main(["--lengths", "64", "--store", str(tmp_path)]) == 2  # a directory is no store


# --------------------------------------------------------------------------------------------
# Effective pair counts against brute force
# --------------------------------------------------------------------------------------------
def _call(name, B, H, Lq, Lk, causal, **params):
    q = torch.zeros(B, H, Lq, 8)
    k = torch.zeros(B, H, Lk, 8)
    return attnlab.mechanism(name).prepare(q, k, k, causal=causal, **params)


def _brute(Lq, Lk, visible):
    off = Lk - Lq
    return sum(1 for i in range(Lq) for j in range(Lk) if visible(i + off, j))


@pytest.mark.parametrize("Lq,Lk", [(100, 100), (37, 300), (300, 300)])
def test_pairs_dense_and_causal(Lq, Lk):
    B, H = 2, 3
    assert flops.unmasked_pairs(_call("dense", B, H, Lq, Lk, False)) == B * H * Lq * Lk
    want = B * H * _brute(Lq, Lk, lambda i, j: j <= i)
    assert flops.unmasked_pairs(_call("dense", B, H, Lq, Lk, True)) == want
    if Lq == Lk:
        assert want == B * H * Lq * (Lq + 1) // 2


@pytest.mark.parametrize("L,w", [(300, 7), (257, 128), (64, 512)])
@pytest.mark.parametrize("causal", [False, True])
def test_pairs_sliding_window(L, w, causal):
    B, H = 1, 2
    if causal:
        want = _brute(L, L, lambda i, j: i - w < j <= i)
    else:
        want = _brute(L, L, lambda i, j: abs(i - j) < w)
    assert flops.unmasked_pairs(_call("sliding_window", B, H, L, L, causal, window=w)) == B * H * want


def test_effective_flops_count_area():
    call = _call("dense", 1, 2, 64, 64, True)
    pairs = flops.unmasked_pairs(call)
    assert flops.effective_flops(call, "fwd", pairs) == 4 * 8 * pairs
    assert flops.effective_flops(call, "fwdbwd", pairs) == 3.5 * 4 * 8 * pairs


# --------------------------------------------------------------------------------------------
# Store, presets, grids
# --------------------------------------------------------------------------------------------
def _config(**kw):
    c = dict(mechanism="dense", impl="auto", pattern="noncausal_self", direction="fwd", dtype="float32", batch=1,
             heads=2, kv_heads=2, q_len=64, kv_len=64, head_dim=16, grid=None, params={})
    c.update(kw)
    return c


def test_store_keeps_finished_cases_of_a_killed_run_and_rejects_duplicates(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        rid = s.start_run({"started": "t", "attnlab_version": "0", "torch_version": "0", "python_version": "3",
                           "threads": 1, "seed": 0, "argv": [], "config": {}})
        s.add_case(rid, _config(), status="ok", measurements=[("time_median_s", 0.5, "s")],
                   samples=[("time_s", "s", [0.4, 0.5, 0.6])])
        with pytest.raises(sqlite3.IntegrityError):
            s.add_case(rid, _config(), status="ok")
        with pytest.raises(sqlite3.IntegrityError):  # the failed transaction left nothing behind
            s.add_case(rid, _config(kv_len=128), status="ok", measurements=[("a", 1, "s"), ("a", 2, "s")])
        # never finished (killed): reopening shows the finished case, and the key a resume would skip
    with Store(path) as s:
        (run,) = s.runs()
        assert run["finished"] is None
        (case,) = s.cases(rid)
        assert case["samples"]["time_s"]["values"] == [0.4, 0.5, 0.6]
        assert s.case_keys(rid) == {case["case_key"]}
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


@pytest.mark.parametrize("L,ndim,grid", [(4096, 2, (64, 64)), (8192, 2, (64, 128)), (1024, 1, (1024,)),
                                         (4096, 3, (16, 16, 16)), (8192, 3, (16, 16, 32)), (97, 2, (1, 97)),
                                         (1000, 2, (25, 40))])
def test_grid_for(L, ndim, grid):
    assert presets.grid_for(L, ndim) == grid
    assert math.prod(grid) == L


def test_every_mechanism_has_bench_defaults_that_validate():
    """Each catalogue entry (each spatial rank) prepares with its bench defaults at bench lengths."""
    for m in attnlab.mechanisms():
        specs = [m.name] if m.layout == "sequence" else [f"{m.name}:{d}d" for d in m.spatial_dims]
        for L in (1024, 4096):
            for case in bcases.expand(specs, [L], ["fwd"], heads=4):
                q, k, v, _, params = bcases.make_inputs(case, 0)
                call = m.prepare(q, k, v, causal=case.causal, **params)
                m.select(call)


def test_quick_preset_plan():
    cases = bench.plan_cases(bench.parse_args([]))
    linear = [m.name for m in attnlab.mechanisms(family="linear")][:1]  # the first linear entry, once there is one
    core = {"dense", "tiled", "sliding_window", "neighborhood 2d", "document", *linear}
    assert {c.label for c in cases} == core | {"longca:causal_document", "longca:share_question"}
    by = {}
    for c in cases:
        by.setdefault(c.label, set()).add((c.kv_len, c.direction))
    for name in core - {"tiled"}:  # three lengths: slopes and efficiency lengths
        assert by[name] == {(1024, "fwd"), (2048, "fwd"), (4096, "fwd"), (1024, "fwdbwd")}
    assert by["tiled"] == {(1024, "fwd"), (1024, "fwdbwd")}
    assert by["longca:share_question"] == {(4096, "fwd")}
    assert all(c.pattern == "noncausal_self" for c in cases if c.label in core)
    # explicit options replace the preset's in every group; duplicates are dropped later
    cases = bench.plan_cases(bench.parse_args(["--lengths", "256", "--directions", "fwd"]))
    assert {c.kv_len for c in cases} == {256} and len({c.key() for c in cases}) == len(core) + 2
    # --params: a name:Nd entry applies to that rank only, over the plain name's entry and the defaults
    args = bench.parse_args(["--mechanisms", "neighborhood:1d,neighborhood:2d,sliding_window", "--lengths", "4096",
                             "--directions", "fwd", "--params",
                             '{"neighborhood": {"dilation": 2}, "neighborhood:2D": {"kernel_size": 9}}'])
    got = {c.label: c.params for c in bench.plan_cases(args)}
    assert got == {"neighborhood 1d": {"kernel_size": [513], "dilation": 2},
                   "neighborhood 2d": {"kernel_size": 9, "dilation": 2}, "sliding_window": {"window": 512}}


def test_first_call_includes_compilation(tmp_path, monkeypatch):
    """The one compiled case: the first call (compile) is recorded apart from the steady state."""
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "1")
    rc, store, _ = _run(tmp_path, "--mechanisms", "sliding_window", "--directions", "fwd", "--lengths", "128",
                        "--params", '{"sliding_window": {"window": 16}}', "--impl", "flex")
    assert rc == 0
    _, cases, _ = _cases(store)
    (c,) = [c for c in cases if c["mechanism"] == "sliding_window"]
    assert c["status"] == "ok" and c["impl_used"] == "flex" and c["params"] == {"window": 16}
    m = c["measurements"]
    assert m["first_call_s"]["value"] > 5 * m["time_median_s"]["value"]
    assert m["density"]["value"] == pytest.approx((128 * 31 - 16 * 15) / 128 ** 2)


# --------------------------------------------------------------------------------------------
# --compare natten: NATTEN rows on the same cases, with the ratio attnlab / NATTEN
# --------------------------------------------------------------------------------------------
def test_compare_natten_rows_carry_the_ratio(tmp_path, monkeypatch):
    pytest.importorskip("natten", minversion="0.21")
    from attnlab.bench import external

    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    rc, store, _ = _run(tmp_path, "--mechanisms", "neighborhood:1d,gna:2d,dense", "--lengths", "64",
                        "--directions", "fwd", "--compare", "natten",
                        "--params", '{"gna:2d": {"kernel_size": [4, 4], "stride": [2, 2]}}')
    assert rc == 0
    _, cases, _ = _cases(store)
    by_id = {c["id"]: c for c in cases}
    rows = {(c["mechanism"], c["impl"], c["direction"]): c for c in cases}
    assert not any(c["mechanism"] == "dense" and c["impl"] in external.IMPLS for c in cases)  # NA entries only
    for mech in ("neighborhood", "gna"):
        nat = rows[(mech, external.UNCOMPILED, "fwd")]
        assert nat["status"] == "ok" and nat["impl_used"] == external.UNCOMPILED
        subject = by_id[int(nat["measurements"]["attnlab_case_id"]["value"])]
        assert (subject["mechanism"], subject["impl"], subject["direction"]) == (mech, "auto", "fwd")
        assert subject["params"] == nat["params"] and subject["grid"] == nat["grid"]
        m, sm = nat["measurements"], subject["measurements"]
        assert m["attnlab_natten_time_ratio"]["value"] == pytest.approx(
            sm["time_median_s"]["value"] / m["time_median_s"]["value"])
        assert m["unmasked_pairs"]["value"] == sm["unmasked_pairs"]["value"]  # the same mask, the same FLOPs
        assert m["sdpa_time_ratio"]["value"] > 0  # and the same-run SDPA baseline
        comp = rows[(mech, external.COMPILED, "fwd")]
        assert comp["status"] in ("ok", "unsupported")
        if comp["status"] == "unsupported":  # NATTEN 0.21 compiles flex only on CUDA cc >= 70
            assert "NATTEN" in comp["message"]


def test_natten_twin_runs_on_the_same_inputs_and_agrees(monkeypatch):
    pytest.importorskip("natten", minversion="0.21")
    from attnlab.bench import external

    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    (case,) = bcases.expand(["neighborhood:2d"], [48], ["fwd"], heads=2, head_dim=16,
                            params={"neighborhood": {"kernel_size": [3, 5], "dilation": [2, 1]}})
    twin, _ = external.twins(case)
    q, k, v, _, params = bcases.make_inputs(case, 0)
    _, forward, *_ = external.calls(twin, q, k, v, subject="neighborhood")
    with torch.no_grad():
        got = forward().movedim(-2, 1)
        want = attnlab.mechanism("neighborhood")(q, k, v, **params)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # what NATTEN cannot run on CPU is unsupported, with the reason
    bwd = replace(twin, direction="fwdbwd")
    with pytest.raises(external.Unsupported, match="forward-only"):
        external.calls(bwd, *bcases.make_inputs(bwd, 0)[:3], subject="neighborhood")
    f64 = replace(twin, dtype="float64")
    with pytest.raises(external.Unsupported, match="float64"):
        external.calls(f64, *bcases.make_inputs(f64, 0)[:3], subject="neighborhood")


def test_compare_natten_without_natten_is_unsupported(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    monkeypatch.setitem(sys.modules, "natten", None)  # `import natten` raises ImportError
    rc, store, _ = _run(tmp_path, "--mechanisms", "neighborhood:1d", "--lengths", "32", "--directions", "fwd",
                        "--compare", "natten", "--params", '{"neighborhood": {"kernel_size": 5}}')
    assert rc == 0
    _, cases, _ = _cases(store)
    nat = [c for c in cases if c["impl"].startswith("natten")]
    assert len(nat) == 2 and all(c["status"] == "unsupported" and "natten not installed" in c["message"]
                                 for c in nat)
    assert bench.main(["--compare", "flashinfer", "--store", str(tmp_path / "x.sqlite")]) == 2


def test_store_from_before_loadavg_end_still_finishes_runs(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path) as s:
        s.db.execute("ALTER TABLE runs DROP COLUMN loadavg_end")  # a pre-release schema-1 store
    with Store(path) as s:
        rid = s.start_run({"started": "t", "attnlab_version": "0", "torch_version": "0", "python_version": "3",
                           "threads": 1, "seed": 0, "argv": [], "config": {}})
        s.finish_run(rid, "0.1 0.1 0.1")
        assert s.runs()[0]["loadavg_end"] == "0.1 0.1 0.1"


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    """Drift cancels: the ratio pairs each repeat with the baseline call just before it."""
    from attnlab.bench import runner

    res = runner.Result(case=None, samples=[2.0, 4.0, 6.0], paired_samples=[1.0, 1.0, 3.0])
    res.case = type("C", (), {"batch": 1, "q_len": 8, "direction": "fwd"})()
    res.metrics["effective_flops"] = (12.0, "FLOP")
    runner._time_metrics(res)
    assert res.value("sdpa_paired_time_ratio") == 2.0  # per-repeat ratios 2, 4, 2 (medians would give 4)
    base = runner.Result(case=None, metrics={"effective_flops": (6.0, "FLOP"), "time_median_s": (1.0, "s")})
    runner.add_ratios(res, base)
    assert res.value("sdpa_time_ratio") == 2.0
    assert res.value("sdpa_gflops_ratio") == 1.0  # twice the FLOPs in twice the time


def test_step_direction_times_one_decoding_step_against_kv_cache_sdpa(tmp_path):
    """``--directions step``: m.step after L-1 tokens for recurrent entries, unsupported otherwise."""
    rc, store, _ = _run(tmp_path, "--mechanisms", "lightning,gla,dense", "--lengths", "40,80", "--directions", "step",
                        "--patterns", "causal_self", "--threads", "1")
    assert rc == 0
    _, cases, _ = _cases(store)
    by = {(c["mechanism"], c["q_len"]): c for c in cases}
    for L in (40, 80):
        for name in ("lightning", "gla"):
            c = by[(name, L)]
            assert c["status"] == "ok" and c["impl_used"] == "recurrent", c["message"]
            meas = c["measurements"]
            m = attnlab.mechanism(name)
            assert meas["state_floats"]["value"] == m.state_size(2, 16, 16)  # the state after L - 1 tokens
            assert meas["tokens_per_s"]["value"] == pytest.approx(1 / meas["time_median_s"]["value"])
            assert c["baseline_case_id"] == by[("torch_sdpa", L)]["id"]
        assert by[("dense", L)]["status"] == "unsupported" and "recurrent" in by[("dense", L)]["message"]
        base = by[("torch_sdpa", L)]["measurements"]
        assert base["effective_flops"]["value"] == pytest.approx(4 * 2 * L * 16)  # one query, L keys, 2 heads


def test_aaren_cases_take_the_query_as_a_view_of_one_row_and_train(tmp_path):
    """Aaren's bench input is its users' one query per head, a view along the length axis (no copy to check
    row by row); forward and backward run, the gradient lands in the row, and the bytes count it once."""
    rc, store, _ = _run(tmp_path, "--mechanisms", "aaren", "--lengths", "64", "--patterns", "causal_self",
                        "--directions", "fwd,fwdbwd", "--threads", "1")
    assert rc == 0
    run, cases, _ = _cases(store)
    mine = [c for c in cases if c["mechanism"] == "aaren"]
    assert [c["status"] for c in mine] == ["ok", "ok"]
    case = bcases.Case(**{k: mine[1][k] for k in bcases.Case.__dataclass_fields__})
    q, k, v, dout, params = bcases.make_inputs(case, 0)
    assert q.stride(2) == 0 and q.requires_grad and not q.is_leaf
    attnlab.mechanism("aaren")(q, k, v, causal=True, **params).backward(dout)
    assert q._base.grad is not None and q._base.grad.shape[2] == 1
    for c in mine:
        expected = 4 * 2 * (16 + 64 * 16 + 64 * 32)  # one query row, the output, keys and values (2 heads)
        assert c["measurements"]["bytes_moved"]["value"] == expected * (3 if c["direction"] == "fwdbwd" else 1)
