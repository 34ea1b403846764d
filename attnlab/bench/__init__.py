"""``attnlab bench``: speed and memory of catalogue mechanisms against dense SDPA, into SQLite.

    attnlab bench                                   # the quick preset (~3 min on 2 cores)
    attnlab bench --mechanisms sliding_window,neighborhood:2d --lengths 8192 --patterns causal_self \\
                  --directions fwd --params '{"sliding_window": {"window": 512}}'
    attnlab bench --mechanisms tiled --lengths 1024,2048,4096,8192,16384 --directions fwd  # + log-log slopes
    attnlab bench --mechanisms neighborhood:1d,neighborhood:3d --lengths 8192 --directions fwd --compare natten

Modules, one idea each: :mod:`.presets` (defaults and presets), :mod:`.cases` (configurations
and inputs), :mod:`.flops` (unmasked pairs, effective FLOPs), :mod:`.memory` (peak memory),
:mod:`.runner` (measuring, statuses, ratios, slopes), :mod:`.store` (SQLite results),
:mod:`.meta` (run metadata), :mod:`.output` (progress, tables), :mod:`.external` (NATTEN on the same
cases, ``--compare natten``).

Exit status: 0 when every case ended ok, unsupported, oom or timeout (measurement outcomes,
all recorded); 1 when a case ended in ``error``; 2 for invalid options; 130 when interrupted
(finished cases stay in the store).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import catalogue
from . import external
from . import presets as _presets
from .cases import DIRECTIONS, DTYPES, Case, expand, parse_mechanism
from .runner import Result, Settings, run_cases, slopes
from .store import Store

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
                        "name a rank: neighborhood:1d,neighborhood:2d (default rank 2)")
    parser.add_argument("--lengths", type=_csv(_positive()), help="token counts, e.g. 1024,4096; spatial "
                        "mechanisms get a near-square grid of that many tokens (4096 -> 64x64)")
    parser.add_argument("--patterns", type=_csv(), help=f"CAB patterns ({', '.join(catalogue.PATTERNS)}); "
                        "default: each mechanism's first self pattern")
    parser.add_argument("--directions", type=_csv(), help="fwd and/or fwdbwd (forward+backward)")
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
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--store", default=DEFAULT_STORE, metavar="PATH",
                        help=f"SQLite results file (default ./{DEFAULT_STORE})")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the run as JSON here")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``attnlab bench`` options on their own (tests, ``python -m attnlab.bench``)."""
    return add_arguments(argparse.ArgumentParser(prog="attnlab bench")).parse_args(argv)


class OptionError(ValueError):
    pass


def plan_cases(args: argparse.Namespace) -> List[Case]:
    """The cases the options ask for (preset groups with explicit options substituted)."""
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
    cases: List[Case] = []
    for g in preset.groups:
        try:
            cases += expand(args.mechanisms or g.mechanisms, args.lengths or g.lengths,
                            args.directions or g.directions, args.patterns or g.patterns, dtypes=args.dtype,
                            batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                            impl=args.impl, params=params)
        except (KeyError, ValueError) as exc:
            raise OptionError(f"--mechanisms: {exc.args[0] if exc.args else exc}") from None
    if external.NATTEN in compare:
        cases = external.with_twins(cases)
    return cases


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
    """``neighborhood:2D`` / ``neighborhood:2`` -> ``neighborhood:2d``; plain names unchanged."""
    name, _, rank = spec.strip().partition(":")
    return f"{name}:{int(rank.lower().rstrip('d'))}d" if rank else name


def settings_of(args: argparse.Namespace) -> Settings:
    p = _presets.PRESETS[args.preset]
    return Settings(repeats=args.repeats or p.repeats, warmup=p.warmup if args.warmup is None else args.warmup,
                    timeout=args.timeout or p.timeout, seed=args.seed)


def run(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``attnlab bench`` with parsed ``args``; returns the exit status (see the module doc)."""
    import torch

    from . import output
    from .meta import loadavg, run_metadata

    out = output.console()
    try:
        cases = plan_cases(args)
        settings = settings_of(args)
    except OptionError as exc:
        print(f"attnlab bench: {exc}", file=sys.stderr)
        return 2
    try:
        store = Store(args.store)
    except (RuntimeError, OSError, sqlite3.Error) as exc:
        print(f"attnlab bench: cannot use --store {args.store}: {exc}", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items() if not callable(v)}
    config.update(repeats=settings.repeats, warmup=settings.warmup, timeout=settings.timeout)
    results: List[Result] = []
    try:
        with store:
            run_id = store.start_run(run_metadata(seed=args.seed, preset=args.preset,
                                                  argv=list(sys.argv if argv is None else argv), config=config))
            n_total = len({c.key() for c in cases} | {c.baseline().key() for c in cases})
            try:
                with output.progress(n_total, out) as (on_start, on_done):
                    results = run_cases(cases, settings, store, run_id, on_start, on_done)
            except KeyboardInterrupt:
                print(f"attnlab bench: interrupted; run {run_id} keeps its {len(store.case_keys(run_id))} finished "
                      f"cases in {args.store}", file=sys.stderr)
                return 130
            derived = slopes(results)
            for d in derived:
                store.add_derived(run_id, d["name"], d["group"], d["value"], d["unit"], d["detail"])
            store.finish_run(run_id, loadavg())
            out.print(output.results_table(results, title=f"attnlab bench: run {run_id} "
                                           f"({torch.get_num_threads()} threads, {','.join(args.dtype)})"))
            nt = output.external_table(results)
            if nt is not None:
                out.print(nt)
            st = output.slopes_table(derived)
            if st is not None:
                out.print(st)
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(store.export_run(run_id), indent=1))
            out.print(f"stored run {run_id} ({len(results)} cases) in {args.store}"
                      + (f"; JSON in {args.json}" if args.json else ""))
    finally:
        torch.set_num_threads(old_threads)
    return 1 if any(r.status == "error" for r in results) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv), argv)


__all__ = ["add_arguments", "run", "parse_args", "plan_cases", "main"]
