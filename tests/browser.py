"""Open a local HTML file in headless Debian Chromium, for tests of attnlab's HTML reports.

No browser is downloaded: Playwright (the Python package, extra ``browser``) drives the system
Chromium at ``/usr/bin/chromium`` (Debian package ``chromium``, installed by ``scripts/setup.sh``
when running as root; ``ATTNLAB_CHROMIUM`` points elsewhere). Every run gets a fresh profile
directory, and every request that is not ``file:`` / ``data:`` / ``blob:`` / ``about:`` is
aborted and recorded, so a report that would reach the network is caught offline too.

Use it in a test::

    from browser import open_html            # tests/ is on sys.path (tests/conftest.py)

    def test_report(tmp_path):
        with open_html(tmp_path / "report.html") as view:
            view.page.click("#heatmap-entropy rect")
            assert not view.blocked and not view.errors

or through the ``browser_page`` fixture (import it into the test module, or into a conftest)::

    from browser import browser_page  # noqa: F401  (a pytest fixture)

    def test_report(browser_page, tmp_path):
        view = browser_page(tmp_path / "report.html")   # closed at teardown

When Chromium or Playwright is missing the test is skipped with the reason, except under CI
(``CI`` set), where it fails: a CI machine is set up by ``scripts/setup.sh``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest

CHROMIUM = os.environ.get("ATTNLAB_CHROMIUM", "/usr/bin/chromium")

#: Headless, no GPU, no network chatter of Chromium's own (updates, sync, QUIC, first-run UI).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")

_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


@dataclass
class View:
    """An opened page: ``page`` (a Playwright ``Page``), the external requests it attempted
    (``blocked``, aborted) and the JavaScript errors it raised (``errors``: uncaught exceptions
    and ``console.error`` messages)."""

    page: Any
    blocked: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


def unavailable() -> Optional[str]:
    """Why a headless Chromium cannot be started here, or None when it can."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set ATTNLAB_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[browser]')"
    return None


def require_browser() -> None:
    """Skip the calling test when no browser can run here; fail instead under CI."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"headless browser needed under CI: {reason}")
        pytest.skip(reason)


@contextmanager
def open_html(path, *, timeout_s: float = 20.0) -> Iterator[View]:
    """Open the local HTML file ``path`` in a fresh headless Chromium; yield a :class:`View`.

    The page has finished loading (the ``load`` event) when the view is yielded. The browser and
    its temporary profile are removed on exit.
    """
    require_browser()
    from playwright.sync_api import sync_playwright

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"open_html: no file at {path}")
    profile = tempfile.mkdtemp(prefix="attnlab-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=list(FLAGS))
            try:
                context.set_default_timeout(timeout_s * 1000)
                view = View(page=context.pages[0] if context.pages else context.new_page())

                def route(r):
                    if r.request.url.startswith(_LOCAL_SCHEMES):
                        r.continue_()
                    else:
                        view.blocked.append(r.request.url)
                        r.abort()

                context.route("**/*", route)
                view.page.on("pageerror", lambda exc: view.errors.append(f"pageerror: {exc}"))
                view.page.on("console", lambda msg: view.errors.append(f"console.error: {msg.text}")
                             if msg.type == "error" else None)
                view.page.goto(path.as_uri(), wait_until="load")
                yield view
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser_page():
    """A function ``open(path) -> View``; every page it opened is closed at teardown."""
    with ExitStack() as stack:
        yield lambda path, **kw: stack.enter_context(open_html(path, **kw))
