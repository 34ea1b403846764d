"""The ``attnlab`` command: a thin layer that parses, calls the library and prints.

    attnlab list [--family F] [--pattern P] [--json | --markdown]
    attnlab info NAME
    attnlab check NAME [--seed N] [--impl IMPL ...]
    attnlab bench ...                 (options: ``attnlab bench --help``; also ``bench compare A B``, ``bench export``)
    attnlab report [--store PATH] [--out DIR] [--run ID ...]
    attnlab inspect MODEL_DIR --text T | --file F ...   (options: ``attnlab inspect --help``)

User errors (an unknown name, an invalid option value: the ValueError / TypeError / KeyError
the library raises) print one line to stderr and exit with status 2; no traceback.
``attnlab check`` exits 1 when a check fails. ``--json`` and ``--markdown`` write plain,
deterministic text (no terminal-width dependence); the README's catalogue table is
``attnlab list --markdown``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

#: CAB's four attention patterns and their short codes (Zhang et al. 2022, CAB).
PATTERN_CODES = {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC"}
_CODE_TO_PATTERN = {v: k for k, v in PATTERN_CODES.items()}

USER_ERROR = 2  # argparse's status for usage errors; also used for library ValueError/TypeError/KeyError


def _console(stderr: bool = False):
    from rich.console import Console

    # Resolved at call time so redirected / captured streams are honoured.
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False)


def _codes(patterns: Sequence[str]) -> str:
    return ", ".join(PATTERN_CODES.get(p, p) for p in patterns)


def _pattern_arg(value: str) -> str:
    """Accept a CAB pattern by name (causal_self) or by its short code (CS)."""
    return _CODE_TO_PATTERN.get(value.upper(), value)


def _error_text(exc: BaseException) -> str:
    # str(KeyError("msg")) is "'msg'": print the message itself.
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(mechs) -> str:
    """The catalogue as a GitHub markdown table (what ``attnlab list --markdown`` prints)."""
    lines = ["| name | family | layout | patterns | implementations | paper |",
             "|---|---|---|---|---|---|"]
    for m in mechs:
        cells = (f"`{m.name}`", m.family, m.layout, _codes(m.patterns), ", ".join(m.impl_names), m.paper)
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_list(args) -> int:
    import attnlab

    mechs = attnlab.mechanisms(family=args.family, pattern=args.pattern)
    if args.json:
        sys.stdout.write(json.dumps([m.as_dict() for m in mechs], indent=2) + "\n")
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table(mechs))
        return 0
    from rich.table import Table

    table = Table(title=f"attnlab catalogue ({len(mechs)} mechanisms)", show_lines=False)
    table.add_column("name", no_wrap=True)
    for col in ("family", "layout", "patterns", "implementations", "paper"):
        table.add_column(col, overflow="fold")
    for m in mechs:
        table.add_row(m.name, m.family, m.layout, _codes(m.patterns), ", ".join(m.impl_names), m.paper)
    out = _console()
    out.print(table, markup=False)
    out.print("patterns: NS noncausal self, CS causal self, NC noncausal cross, CC causal cross (CAB). "
              "Implementations in the order a call without impl= tries them.", markup=False)
    return 0


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def _stateful_rows(m):
    """Complexity and, for recurrent entries, the state size at H=8, D=64 (defaults)."""
    rows = list((m.complexity or {}).items())
    if m.state_size is not None:
        defaults = {p.name: p.default for p in m.params if p.default is not None}
        rows.append(("size", f"{m.state_size(8, 64, 64, **defaults):,} floats per layer at H=8, D=Dv=64 "
                              f"(m.state_size(heads, head_dim, value_dim, **params)); m.step / m.scan continue it"))
    return rows


def cmd_info(args) -> int:
    import attnlab
    from rich.table import Table

    m = attnlab.mechanism(args.name)
    out = _console()
    layout = m.layout
    if m.layout == "spatial":
        dims = [str(n) for n in m.spatial_dims]
        dims = dims[0] if len(dims) == 1 else ", ".join(dims[:-1]) + " or " + dims[-1]
        layout += f" (B, H, *grid, D) with {dims} spatial axes"
    else:
        layout += " (B, H, L, D)"
    for label, value in (("name", m.name), ("family", m.family), ("paper", m.paper), ("summary", m.summary),
                         ("formula", m.formula), ("layout", layout),
                         ("patterns", ", ".join(f"{p} ({PATTERN_CODES[p]})" for p in m.patterns)),
                         ("GQA", "yes (Hq a multiple of Hkv)" if m.gqa else "no (Hq must equal Hkv)"),
                         *_stateful_rows(m)):
        out.print(f"{label + ':':<10}{value}", markup=False, soft_wrap=True)

    params = Table(title="parameters", title_justify="left")
    for col in ("name", "default", "valid", "doc"):
        params.add_column(col, overflow="fold")
    for p in m.params:
        params.add_row(p.name, repr(p.default), p.describe(), p.doc)
    out.print()
    if m.params:
        out.print(params, markup=False)
    else:
        out.print("parameters: none", markup=False)

    impls = Table(title="implementations (tried in this order when impl= is not given)", title_justify="left")
    impls.add_column("impl")
    impls.add_column("doc", overflow="fold")
    for i in m.impls:
        marker = " (m.reference)" if i.name == m.reference_impl and i.name != "reference" else ""
        impls.add_row(i.name + marker, i.doc)
    out.print(impls, markup=False)
    return 0


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    import attnlab

    m = attnlab.mechanism(args.name)  # unknown names fail before the suite is imported
    from . import conformance

    results = conformance.run_checks(m, seed=args.seed, impls=args.impl, flex_compile=args.compile)
    out = _console()
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for r in results:
        verdict = "SKIP" if r.skipped else ("PASS" if r.ok else "FAIL")
        counts[verdict] += 1
        style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}[verdict]
        detail = r.detail[len("skipped: "):] if r.skipped and r.detail.startswith("skipped: ") else r.detail
        line = f"{verdict}  {r.name}" + (f"  {detail}" if detail else "")
        out.print(line, style=style, markup=False, soft_wrap=True)
    failed = counts["FAIL"]
    verdict = "FAILED" if failed else "OK"
    out.print(f"{m.name}: {verdict} ({counts['PASS']} passed, {failed} failed, {counts['SKIP']} skipped, "
              f"seed {args.seed})", style="bold red" if failed else "bold green", markup=False)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from . import bench

    return bench.run(args)


def cmd_report(args) -> int:
    from .bench import report

    return report.main(args)


def cmd_inspect(args) -> int:
    from .inspect import command

    return command.run(args)


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------
def build_parser(with_bench: bool = False, with_inspect: bool = False,
                 with_report: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``with_bench`` / ``with_inspect`` add ``attnlab.bench``'s / ``attnlab.inspect``'s
    own options (imported lazily, so other commands stay fast)."""
    parser = argparse.ArgumentParser(
        prog="attnlab", description="Attention mechanisms behind one interface: catalogue, checks, benchmarks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", help="table of every catalogue entry",
                       description="Table of every catalogue entry. Pattern codes: NS noncausal self, CS causal "
                                   "self, NC noncausal cross, CC causal cross.")
    p.add_argument("--family", help="only this family (e.g. exact, structured)")
    p.add_argument("--pattern", type=_pattern_arg,
                   help="only entries defining this pattern: noncausal_self|causal_self|noncausal_cross|"
                        "causal_cross, or NS|CS|NC|CC")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON list of the entries' records")
    fmt.add_argument("--markdown", action="store_true", help="a GitHub markdown table (as in the README)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="paper, formula, parameters and implementations of one entry")
    p.add_argument("name", help="catalogue name, e.g. sliding_window")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="run the conformance checks for one entry on random inputs")
    p.add_argument("name", help="catalogue name, e.g. sliding_window")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--impl", action="append", metavar="IMPL",
                   help="check only this implementation against the reference (repeatable; default: all)")
    p.add_argument("--compile", action="store_true",
                   help="check FlexAttention compiled, as calls run it (seconds per shape; default: uncompiled, "
                        "which checks the same block masks quickly)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="benchmark mechanisms (options: attnlab bench --help)",
                       description="Benchmark mechanisms against dense SDPA measured in the same run.")
    if with_bench:
        from . import bench

        bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="one offline HTML report (plots and tables) from a results store",
                       description="Write one self-contained HTML report (inline SVG plots, no network) and every "
                                   "plot as PNG and SVG from an attnlab bench results store.")
    if with_report:
        from .bench import report

        report.add_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="attention in a real model on disk: metrics, sinks, retrieval heads, head "
                                       "importance -> one offline HTML report (options: attnlab inspect --help)",
                       description="Capture attention in a Hugging Face model on disk (safetensors or GGUF) over a "
                                   "text and write a self-contained HTML report and a JSON file.")
    if with_inspect:
        from .inspect import command

        command.add_arguments(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def _wants_bench(argv: Sequence[str]) -> bool:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first == "bench"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``attnlab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        first = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(with_bench=_wants_bench(argv), with_inspect=first == "inspect",
                              with_report=first == "report")
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed already
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USER_ERROR)
    except ImportError as exc:
        print(f"attnlab: error: {exc}", file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError) as exc:
        print(f"attnlab {args.command}: error: {_error_text(exc)}", file=sys.stderr)
        return USER_ERROR
    except ImportError as exc:  # e.g. an optional dependency of `check` / `bench` is missing
        print(f"attnlab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
