"""A real headless browser for the tests: Debian's ``chromium``, driven from its command
line (``--dump-dom``, ``--screenshot``), no Python dependency.

A test calls :func:`chromium` first: where the browser is missing it skips, with the
package that brings it, except under ``CI=true``, where it fails (tests.support.tools, whose
list the test command installs).
"""

from __future__ import annotations

from pathlib import Path

import anyio

from tests.support import tools

#: Bound on one run of the browser (its first start on a busy machine takes seconds).
BROWSER_TIMEOUT = 60.0


def chromium() -> str:
    """The path of ``chromium``; skips the calling test where it is missing (fails it
    under ``CI=true``): see tests.support.tools."""
    return tools.require("chromium")


def _argv(browser: str, profile: Path, *args: str) -> list[str]:
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", f"--user-data-dir={profile}", *args]


async def dump_dom(browser: str, url: str, profile: Path) -> str:
    """The DOM of ``url`` once loaded, as the browser serialises it."""
    with anyio.fail_after(BROWSER_TIMEOUT):
        done = await anyio.run_process(_argv(browser, profile, "--dump-dom", url), check=True)
    return done.stdout.decode()


async def screenshot(browser: str, url: str, path: Path, profile: Path,
                     size: str = "1280,1400") -> None:
    """A PNG of ``url`` at ``size`` (width,height) in ``path``."""
    with anyio.fail_after(BROWSER_TIMEOUT):
        await anyio.run_process(
            _argv(browser, profile, f"--window-size={size}", "--hide-scrollbars",
                  f"--screenshot={path}", url),
            check=True,
        )
