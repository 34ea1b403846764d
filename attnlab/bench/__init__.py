"""``attnlab bench``: speed, memory and recall of catalogue mechanisms against dense SDPA, into SQLite.

    attnlab bench                                   # the quick preset (< 3 min on 2 cores)
    attnlab bench --mechanisms sliding_window,neighborhood:2d --lengths 8192 --patterns causal_self \\
                  --directions fwd --params '{"sliding_window": {"window": 512}}'
    attnlab bench --mechanisms tiled --lengths 1024,2048,4096,8192,16384 --directions fwd  # + log-log slopes
    attnlab bench --mechanisms longca --lengths 1024,2048,4096 --directions fwd     # LongCA-bench's mask set
    attnlab bench --mechanisms neighborhood:1d,neighborhood:3d --lengths 8192 --directions fwd --compare natten
    attnlab bench --task mqar --mechanisms dense,sliding_window                     # a quality task
    attnlab bench compare 3 4                       # regressions of run 4 against run 3, beyond noise
    attnlab bench export latest --format csv        # a run as CSV (or JSON)

Modules, one idea each: :mod:`.presets` (defaults and presets), :mod:`.cases` (configurations
and inputs), :mod:`.longca` (LongCA-bench's mask set), :mod:`.flops` (unmasked pairs, effective
FLOPs), :mod:`.gemm` (the run's GEMM throughput), :mod:`.memory` (peak memory), :mod:`.runner`
(measuring, statuses, ratios, slopes, efficiency lengths), :mod:`.taskcases` (quality-task cases),
:mod:`.store` (SQLite results), :mod:`.meta` (run metadata), :mod:`.output` (progress, tables),
:mod:`.compare` (regressions between runs), :mod:`.external` (NATTEN on the same cases,
``--compare natten``), :mod:`.report` (``attnlab report``).

**Resuming.** A run's *plan key* hashes what it measures (every case and task-case key, the
repeats, warm-up, timeouts, seed and threads, and the git commit). Run again after a crash or
``kill -9``, the same command takes over that unfinished run (when the process that wrote it is
gone) and measures only the cases it lacks, so the store ends with exactly the rows of an
uninterrupted run; ``--new-run`` starts a fresh run instead.

**Quality tasks.** ``--task NAME[,NAME]`` (or ``all``) runs those tasks of
:mod:`attnlab.bench.tasks` instead of the efficiency cases, for ``--mechanisms`` (default: dense,
sliding_window and every linear-family entry) at the task's configurations for ``--task-size``
(default: the preset's name); ``--task none`` drops the preset's own task cases.

Exit status: 0 when every case ended ok, unsupported, oom or timeout (measurement outcomes,
all recorded); 1 when a case ended in ``error`` (``compare``: when a regression is flagged); 2 for
invalid options; 130 when interrupted (finished cases stay in the store).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import catalogue
from . import external, longca
from . import presets as _presets
from .cases import DIRECTIONS, DTYPES, Case, expand, ordered_with_baselines, parse_mechanism, specs
from .runner import Result, Settings, derived, run_cases
from .store import Store, canonical

DEFAULT_STORE = "attnlab-results.sqlite"


def _csv(kind=str):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _positive(kind=int):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``attnlab bench`` options to ``parser``."""
    presets_doc = "; ".join(f"{n}: {p.doc}" for n, p in _presets.PRESETS.items())
    parser.add_argument("--preset", choices=list(_presets.PRESETS), default="quick",
                        help=f"what to run unless other options say otherwise ({presets_doc}); default quick")
    parser.add_argument("--mechanisms", type=_csv(), help="catalogue names, comma-separated; spatial ones may "
                        "name a rank: neighborhood:1d,neighborhood:2d (default rank 2); family:NAME for a whole "
                        "family (family:linear); longca for LongCA-bench's mask set, longca:MASK for one")
    parser.add_argument("--lengths", type=_csv(_positive()), help="token counts, e.g. 1024,4096; spatial "
                        "mechanisms get a near-square grid of that many tokens (4096 -> 64x64)")
    parser.add_argument("--patterns", type=_csv(), help=f"CAB patterns ({', '.join(catalogue.PATTERNS)}); "
                        "default: each mechanism's first self pattern")
    parser.add_argument("--directions", type=_csv(), help="fwd, fwdbwd (forward+backward) and/or step (one "
                        "decoding step of recurrent entries after L-1 tokens, against SDPA KV-cache decoding)")
    parser.add_argument("--dtype", type=_csv(), default=["float32"], help=f"{', '.join(DTYPES)} (default float32)")
    parser.add_argument("--batch", type=_positive(), default=1, help="batch size (default 1)")
    parser.add_argument("--heads", type=_positive(), default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=_positive(), default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=_positive(), default=64, help="head dim (default 64)")
    parser.add_argument("--impl", default=None, help="run this implementation (flex, tiled, sdpa, reference, ...) "
                        "instead of the one each mechanism picks; cases it cannot serve are 'unsupported'")
    parser.add_argument("--compare", type=_csv(), default=[], metavar="NAME",
                        help="also time an external implementation on the same cases: natten (NATTEN 0.21's "
                             "na1d/na2d/na3d, uncompiled and compiled, on every neighborhood/gna case; rows "
                             "'natten(flex-fna)' and 'natten(flex-fna,compiled)' with the ratio attnlab/NATTEN)")
    parser.add_argument("--params", default=None, metavar="JSON",
                        help="parameters per mechanism over the defaults, e.g. "
                             "'{\"sliding_window\": {\"window\": 256}, \"neighborhood:2d\": {\"kernel_size\": 31}}' "
                             "(a name:Nd key applies to that spatial rank only)")
    parser.add_argument("--repeats", type=_positive(), help="timed calls per case (default: the preset's)")
    parser.add_argument("--warmup", type=_nonneg, help="untimed calls after the first (default: the preset's)")
    parser.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                        help="budget per case, first call included (default: the preset's)")
    parser.add_argument("--threads", type=_positive(), help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="input seed, also of LongCA-bench's drawn masks and "
                        "of the task cases (default 0)")
    parser.add_argument("--task", type=_csv(), default=None, metavar="NAME",
                        help="run these quality tasks (comma-separated, or 'all') instead of the efficiency cases, "
                             "for --mechanisms (default: dense, sliding_window and every linear-family entry); "
                             "'none' drops the preset's task cases")
    parser.add_argument("--task-size", default=None, metavar="SIZE",
                        help="task configurations: tiny, quick, standard or full (default: the preset's name)")
    parser.add_argument("--store", default=DEFAULT_STORE, metavar="PATH",
                        help=f"SQLite results file (default ./{DEFAULT_STORE})")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the run as JSON here")
    parser.add_argument("--new-run", action="store_true",
                        help="start a new run even when an unfinished run of the same plan (a killed run of the "
                             "same command) could be resumed")
    sub = parser.add_subparsers(dest="bench_command", metavar="{compare,export}")
    sub.required = False
    p = sub.add_parser("compare", help="flag regressions of run B against run A beyond noise",
                       description="Match the cases of two runs by configuration and flag those whose time moved "
                                   "beyond noise: ratio of medians beyond max(threshold, pooled spread) and a "
                                   "one-sided Mann-Whitney test on the raw samples below alpha (see "
                                   "attnlab.bench.compare). Exit status 1 when a regression is flagged.")
    p.add_argument("run_a", help="run id, or latest / latest-N")
    p.add_argument("run_b", help="run id, or latest / latest-N")
    p.add_argument("--store", default=argparse.SUPPRESS, metavar="PATH", help=f"default ./{DEFAULT_STORE}")
    p.add_argument("--threshold", type=float, default=0.05, help="smallest relative change flagged (default 0.05)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the test (default 0.05)")
    p.add_argument("--relative", action="store_true",
                   help="compare each repeat's time over the SDPA call just before it (cancels machine drift)")
    p.add_argument("--all", action="store_true", help="list every case, not only the flagged ones")
    p = sub.add_parser("export", help="write a run as CSV or JSON",
                       description="Write a run of the store as JSON (everything: run metadata, calibration, "
                                   "cases with measurements and raw samples, derived results, task cases) or CSV "
                                   "(one row per case, one column per measurement).")
    p.add_argument("run", nargs="?", default="latest", help="run id, or latest / latest-N (default latest)")
    p.add_argument("--store", default=argparse.SUPPRESS, metavar="PATH", help=f"default ./{DEFAULT_STORE}")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="default csv")
    p.add_argument("--kind", choices=("cases", "tasks", "derived"), default="cases",
                   help="CSV only: efficiency cases (default), task cases or derived results")
    p.add_argument("--out", default=None, metavar="PATH", help="file to write (default: standard output)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``attnlab bench`` options on their own (tests, ``python -m attnlab.bench``)."""
    return add_arguments(argparse.ArgumentParser(prog="attnlab bench")).parse_args(argv)


class OptionError(ValueError):
    pass


def plan_cases(args: argparse.Namespace) -> List[Case]:
    """The efficiency cases the options ask for (preset groups with explicit options substituted);
    none with ``--task``."""
    preset = _presets.PRESETS[args.preset]
    for d in args.directions or ():
        if d not in DIRECTIONS:
            raise OptionError(f"--directions: each must be one of {', '.join(DIRECTIONS)}, got {d!r}")
    for p in args.patterns or ():
        if p not in catalogue.PATTERNS:
            raise OptionError(f"--patterns: each must be one of {', '.join(catalogue.PATTERNS)}, got {p!r}")
    for d in args.dtype:
        if d not in DTYPES:
            raise OptionError(f"--dtype: each must be one of {', '.join(DTYPES)}, got {d!r}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise OptionError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    compare = getattr(args, "compare", None) or []
    for c in compare:
        if c not in external.COMPARISONS:
            raise OptionError(f"--compare: each must be one of {', '.join(external.COMPARISONS)}, got {c!r}")
    params = _parse_params(args.params)
    if _task_names(args):
        return []
    cases: List[Case] = []
    for g in preset.groups:
        try:
            cases += expand(args.mechanisms or g.names(), args.lengths or g.lengths,
                            args.directions or g.directions, args.patterns or g.patterns, dtypes=args.dtype,
                            batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                            impl=args.impl, params=params, seed=args.seed)
        except (KeyError, ValueError) as exc:
            raise OptionError(f"--mechanisms: {exc.args[0] if exc.args else exc}") from None
    if external.NATTEN in compare:
        cases = external.with_twins(cases)
    return cases


def _task_names(args: argparse.Namespace) -> List[str]:
    """Tasks named by ``--task`` (``all``: every task; ``none`` or absent: none)."""
    names = list(getattr(args, "task", None) or [])
    if names == ["none"]:
        return []
    if "all" in names:
        from .taskcases import tasks

        return list(tasks())
    return names


def plan_tasks(args: argparse.Namespace) -> list:
    """The quality-task cases: ``--task`` for ``--mechanisms`` (or the default task mechanisms), or the
    preset's own task groups unless ``--task none``."""
    from . import taskcases

    preset = _presets.PRESETS[args.preset]
    size = args.task_size or args.preset
    names = _task_names(args)
    try:
        if names:
            mechs = [x for m in (args.mechanisms or _presets.task_mechanisms()) for x in specs(m)]
            for m in mechs:
                parse_mechanism(m)
            return taskcases.plan(names, mechs, size, seeds=(args.seed,))
        if getattr(args, "task", None) == ["none"]:
            return []
        out = []
        for g in preset.tasks:
            names = list(taskcases.tasks()) if g.task == "all" else [g.task]
            out += taskcases.plan(names, list(args.mechanisms or g.names()), args.task_size or g.size,
                                  seeds=tuple(args.seed + s for s in g.seeds))
        return out
    except (KeyError, ValueError) as exc:
        raise OptionError(exc.args[0] if exc.args else str(exc)) from None


def _parse_params(text: Optional[str]) -> Dict[str, Dict[str, Any]]:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--params must be JSON like '{{\"sliding_window\": {{\"window\": 512}}}}': {exc}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise OptionError("--params must map mechanism names to objects of parameters, e.g. "
                          "'{\"sliding_window\": {\"window\": 512}}'")
    for name in params:
        try:
            parse_mechanism(name)
        except (KeyError, ValueError) as exc:
            raise OptionError(f"--params: {exc.args[0]}") from None
    return {_canonical_spec(k): v for k, v in params.items()}


def _canonical_spec(spec: str) -> str:
    """``neighborhood:2D`` / ``neighborhood:2`` -> ``neighborhood:2d``; other names unchanged."""
    name, _, rank = spec.strip().partition(":")
    if not rank or longca.is_longca(spec.strip()):
        return spec.strip()
    return f"{name}:{int(rank.lower().rstrip('d'))}d"


def settings_of(args: argparse.Namespace) -> Settings:
    p = _presets.PRESETS[args.preset]
    return Settings(repeats=args.repeats or p.repeats, warmup=p.warmup if args.warmup is None else args.warmup,
                    timeout=args.timeout or p.timeout, seed=args.seed)


def task_timeout(args: argparse.Namespace) -> float:
    return args.timeout or _presets.PRESETS[args.preset].task_timeout


def plan_key(cases: Sequence[Case], tasks: Sequence[Any], settings: Settings, task_timeout_s: float, threads: int,
             commit: Optional[str]) -> str:
    """What a run measures, hashed: equal keys mean "the same command" for resuming."""
    spec = {"cases": sorted(c.key() for c in ordered_with_baselines(cases)), "tasks": sorted(t.key() for t in tasks),
            "repeats": settings.repeats, "warmup": settings.warmup, "timeout": settings.timeout,
            "task_timeout": task_timeout_s, "seed": settings.seed, "threads": threads, "commit": commit}
    return hashlib.sha256(canonical(spec).encode()).hexdigest()


def run(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``attnlab bench`` with parsed ``args``; returns the exit status (see the module doc)."""
    command = getattr(args, "bench_command", None)
    if command == "compare":
        return compare_command(args)
    if command == "export":
        return export_command(args)
    import torch

    from . import gemm, output, taskcases
    from .meta import alive, loadavg, owner, run_metadata, tune_malloc

    out = output.console()
    try:
        cases = plan_cases(args)
        tasks = plan_tasks(args)
        settings = settings_of(args)
    except OptionError as exc:
        print(f"attnlab bench: {exc}", file=sys.stderr)
        return 2
    if not cases and not tasks:
        print("attnlab bench: nothing to run (no efficiency cases and no task cases)", file=sys.stderr)
        return 2
    try:
        store = Store(args.store)
    except (RuntimeError, OSError, sqlite3.Error) as exc:
        print(f"attnlab bench: cannot use --store {args.store}: {exc}", file=sys.stderr)
        return 2
    tune_malloc()
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = {k: v for k, v in vars(args).items() if not callable(v)}
    config.update(repeats=settings.repeats, warmup=settings.warmup, timeout=settings.timeout,
                  task_timeout=task_timeout(args))
    results: List[Result] = []
    task_results: list = []
    try:
        with store:
            meta = run_metadata(seed=args.seed, preset=args.preset, argv=list(sys.argv if argv is None else argv),
                                config=config)
            meta["plan_key"] = plan_key(cases, tasks, settings, task_timeout(args), threads, meta["git_commit"])
            run_id, resumed = store.claim_run(meta, owner(), alive, resume=not args.new_run)
            done = {r.case.key(): r for r in map(Result.from_stored, store.cases(run_id))}
            done_tasks = {r.case.key(): r for r in map(taskcases.TaskResult.from_stored, store.task_cases(run_id))}
            n_cases = len(ordered_with_baselines(cases))
            n_total = n_cases + len(tasks)
            if resumed:
                print(f"attnlab bench: resuming run {run_id}: {len(done) + len(done_tasks)} of {n_total} cases are "
                      f"already stored", file=sys.stderr)
            dtypes = sorted({c.dtype for c in cases})
            settings.gemm_gflops, settings.bandwidth_gbytes = _calibrate(store, run_id, dtypes, threads, gemm)
            try:
                with output.progress(n_total, out) as (on_start, on_done):
                    results = run_cases(cases, settings, store, run_id, on_start, on_done, done=done)
                    task_results = taskcases.run(tasks, task_timeout(args), store, run_id, on_start, on_done,
                                                 offset=n_cases, total=n_total, done=done_tasks)
            except KeyboardInterrupt:
                print(f"attnlab bench: interrupted; run {run_id} keeps its "
                      f"{len(store.case_keys(run_id)) + len(store.task_case_keys(run_id))} finished cases in "
                      f"{args.store} (run the same command again to resume it)", file=sys.stderr)
                return 130
            rows = derived(results)
            store.set_derived(run_id, rows)
            store.finish_run(run_id, loadavg())
            if results:
                out.print(output.results_table(results, title=f"attnlab bench: run {run_id} "
                                               f"({threads} threads, {','.join(args.dtype)}; GEMM "
                                               + ", ".join(f"{d} {g:.0f} GFLOP/s"
                                                           for d, g in settings.gemm_gflops.items())
                                               + f"; memory {settings.bandwidth_gbytes or 0:.0f} GB/s)"))
            for table in (output.external_table(results), output.slopes_table(rows),
                          output.efficiency_table(rows), output.tile_table(results), output.task_table(task_results)):
                if table is not None:
                    out.print(table)
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(store.export_run(run_id), indent=1))
            out.print(f"stored run {run_id} ({len(results)} cases"
                      + (f", {len(task_results)} task cases" if task_results else "") + f") in {args.store}"
                      + (f"; JSON in {args.json}" if args.json else "")
                      + f"; report: attnlab report --store {args.store}")
    finally:
        torch.set_num_threads(old_threads)
    failed = any(r.status == "error" for r in results) or any(r.status == "error" for r in task_results)
    return 1 if failed else 0


def _calibrate(store: Store, run_id: int, dtypes: Sequence[str], threads: int,
               gemm) -> Tuple[Dict[str, float], Optional[float]]:
    """The run's two roofs at these threads: GEMM GFLOP/s per dtype and the memory copy GB/s (stored under the
    dtype ``bytes``; None without efficiency cases); stored ones (a resumed run), else measured now."""
    def have(name):
        return {c["dtype"]: c["value"] for c in store.calibration(run_id) if c["name"] == name and
                c["threads"] == threads}

    for d in dtypes:
        if d not in have("gemm"):
            m = gemm.measure(DTYPES[d])
            store.add_calibration(run_id, "gemm", d, threads, m["gflops"], "GFLOP/s", m["samples"],
                                  {"n": m["n"], "op": "torch.mm(n x n, n x n)", "flops_per_call": 2 * m["n"] ** 3})
    if dtypes and "bytes" not in have("bandwidth"):
        m = gemm.bandwidth()
        store.add_calibration(run_id, "bandwidth", "bytes", threads, m["gbytes"], "GB/s", m["samples"],
                              {"bytes_per_call": m["bytes"], "op": "Tensor.copy_ (bytes read + written)"})
    return {d: have("gemm")[d] for d in dtypes}, have("bandwidth").get("bytes")


def _open_existing(path: str) -> Store:
    if not Path(path).is_file():
        raise OptionError(f"no results store at {path} (run attnlab bench first, or pass --store PATH)")
    return Store(path)


def compare_command(args: argparse.Namespace) -> int:
    """``attnlab bench compare RUN_A RUN_B``: exit 1 when a regression is flagged."""
    from . import compare, output

    try:
        with _open_existing(getattr(args, "store", DEFAULT_STORE)) as store:
            a, b = store.resolve_run(args.run_a), store.resolve_run(args.run_b)
            rows = compare.compare(store, a, b, threshold=args.threshold, alpha=args.alpha, relative=args.relative)
    except (OptionError, KeyError, ValueError, RuntimeError, sqlite3.Error) as exc:
        print(f"attnlab bench compare: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    out = output.console()
    out.print(output.compare_table(rows, a, b, show_all=args.all, relative=args.relative,
                                   threshold=args.threshold, alpha=args.alpha))
    counts = {v: sum(r.verdict == v for r in rows) for v in ("regression", "improvement", "same")}
    other = len(rows) - sum(counts.values())
    out.print(f"run {b} against run {a}: {counts['regression']} regression(s), {counts['improvement']} "
              f"improvement(s), {counts['same']} within noise" + (f", {other} not comparable" if other else ""))
    return 1 if counts["regression"] else 0


def export_command(args: argparse.Namespace) -> int:
    """``attnlab bench export [RUN] --format csv|json [--kind ...] [--out PATH]``."""
    import io

    try:
        with _open_existing(getattr(args, "store", DEFAULT_STORE)) as store:
            rid = store.resolve_run(args.run)
            buf = io.StringIO()
            if args.format == "json":
                buf.write(json.dumps(store.export_run(rid), indent=1) + "\n")
            else:
                store.export_csv(rid, buf, args.kind)
    except (OptionError, KeyError, ValueError, RuntimeError, sqlite3.Error) as exc:
        print(f"attnlab bench export: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(buf.getvalue())
        print(f"wrote run {rid} as {args.format} to {path}", file=sys.stderr)
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv), argv)


__all__ = ["add_arguments", "run", "parse_args", "plan_cases", "plan_tasks", "main", "DEFAULT_STORE"]
