"""The README stays true: its Python examples run and its catalogue table is current.

Regenerate the table after changing the catalogue::

    .venv/bin/python tests/test_readme.py --write
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"
REGENERATE = ".venv/bin/python tests/test_readme.py --write"


def python_blocks(text: str):
    """(line number, source) of every ```python fenced block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def current_table() -> str:
    import attnlab
    from attnlab.cli import markdown_table

    return markdown_table(attnlab.mechanisms())


def readme_table(text: str) -> str:
    assert text.count(START) == 1 and text.count(END) == 1, f"README needs exactly one {START} ... {END} pair"
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_table() -> bool:
    """Rewrite the README's catalogue table; returns whether it changed."""
    text = README.read_text()
    readme_table(text)  # validates the markers
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{current_table()}{END}{tail}"
    if new != text:
        README.write_text(new)
    return new != text


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should contain at least one ```python example"


@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs(line, source, monkeypatch):
    # Uncompiled FlexAttention: same results, no torch.compile time (keeps the suite fast).
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "0")
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__readme__"})


def test_readme_catalogue_table_is_current():
    have, want = readme_table(README.read_text()), current_table()
    assert have == want, f"README.md's catalogue table is stale; regenerate it with `{REGENERATE}`"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}")
    print("README.md catalogue table " + ("updated" if write_table() else "already current"))
