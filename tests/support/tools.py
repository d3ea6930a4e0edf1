"""The Debian tools some tests run: one list, one way to ask for a tool, one installer.

A test calls :func:`require` with a binary's name and gets its path. A missing tool skips
the test with the package that brings it, except under ``CI=true``: there it fails, since
a run that skipped it did not check what it claims to.

``python -m tests.support.tools`` (tox runs it before the suite) installs whatever is
missing with apt-get when it can (root, apt-get present), quietly, and otherwise prints
what is missing and the command that would install it (``--check``: only print). To need
another tool (``chromium``, say), add one line to :data:`TOOLS` and call :func:`require`
in the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    package: str  # the Debian package
    binary: str  # what the tests run, found on PATH (or, with a module, the name asked for)
    used_for: str
    #: A module the system's own Python (:data:`SYSTEM_PYTHON`) must import, for a package
    #: that brings a Python module rather than a program; the tool's path is that Python.
    module: str = ""


TOOLS: tuple[Tool, ...] = (
    Tool("tini", "tini", "the image's init, reaping orphans as PID 1 (test_image_init.py)"),
    Tool("prometheus", "promtool", "checks and unit-tests the alert rules (test_deploy.py)"),
    Tool("systemd", "systemd-analyze", "verifies the systemd unit (test_deploy.py)"),
    Tool("prometheus", "prometheus", "a real Prometheus whose firing alert blocks restarts"
         " (tests/blockers/)"),
    Tool("chromium", "chromium", "loads the status page in a headless browser"
         " (test_status_fleet.py)"),
    Tool("python3-seccomp", "seccomp", "applies the unit's system-call filter without systemd"
         " (test_deploy.py)", module="seccomp"),
)

#: The system's Python, which Debian's Python modules are for (not the tests' venv).
SYSTEM_PYTHON = Path("/usr/bin/python3")

#: Answers "do not start services" to the packages' install scripts (the prometheus
#: package would start a server): see Debian's invoke-rc.d(8).
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
#: Bound on one apt-get run.
APT_TIMEOUT = 600


def tool(binary: str) -> Tool:
    """The entry of :data:`TOOLS` for ``binary``; ``KeyError`` for one not listed there."""
    for entry in TOOLS:
        if entry.binary == binary:
            return entry
    raise KeyError(f"{binary!r} is not in tests.support.tools.TOOLS: add it there")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(binary: str) -> str:
    """The path of ``binary`` (for a module's tool, the Python that imports it); skips the
    calling test where it is missing (fails it under CI=true)."""
    import pytest

    entry = tool(binary)
    path = found(entry)
    if path is not None:
        return path
    why = (f"{binary} missing (Debian package {entry.package}; `python -m tests.support.tools`"
           " installs it)")
    if in_ci():
        pytest.fail(f"{why}: CI=true, so this test may not be skipped", pytrace=False)
    pytest.skip(why)


def found(entry: Tool) -> str | None:
    """The path of ``entry`` on this machine, or ``None``."""
    if not entry.module:
        return shutil.which(entry.binary)
    python = shutil.which(str(SYSTEM_PYTHON))
    if python is None:
        return None
    imported = subprocess.run([python, "-c", f"import {entry.module}"], capture_output=True,
                              check=False, timeout=60)
    return python if imported.returncode == 0 else None


def missing(tools: Sequence[Tool] = TOOLS) -> list[Tool]:
    return [entry for entry in tools if found(entry) is None]


@contextlib.contextmanager
def services_not_started() -> Iterator[None]:
    """A policy-rc.d denying every service start while packages install, unless the
    machine has one already (container images usually do)."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# tests.support.tools: no services while installing\n"
                           "exit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-qq", *args], capture_output=True, text=True,
                          env=env, check=False, timeout=APT_TIMEOUT)


def install(tools: Sequence[Tool]) -> subprocess.CompletedProcess[str]:
    """apt-get install the packages of ``tools`` (no recommends); on failure, once more
    after ``apt-get update`` (a fresh image has no package lists)."""
    packages = sorted({entry.package for entry in tools})
    command = ("install", "-y", "--no-install-recommends", *packages)
    with services_not_started():
        result = apt_get(*command)
        if result.returncode != 0:
            updated = apt_get("update")
            if updated.returncode != 0:
                return updated
            result = apt_get(*command)
    return result


def describe(tools: Sequence[Tool]) -> str:
    return ", ".join(f"{entry.binary} ({entry.package})" for entry in tools)


def main(argv: Sequence[str] = ()) -> int:
    """Install what is missing where possible (``--check``: only say what is missing);
    always 0: the tests that need a missing tool skip, or fail under CI, each saying why."""
    absent = missing()
    if not absent:
        return 0
    packages = " ".join(sorted({entry.package for entry in absent}))
    if "--check" in argv or os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"tests.support.tools: missing {describe(absent)}; their tests skip (fail under"
              f" CI=true). Install: apt-get install --no-install-recommends {packages}")
        return 0
    started = time.monotonic()
    result = install(absent)
    still = missing(absent)
    if result.returncode != 0 or still:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        print(f"tests.support.tools: apt-get could not install {describe(still or absent)}"
              f" (exit {result.returncode}):\n{tail}")
        return 0
    print(f"tests.support.tools: installed {describe(absent)} in"
          f" {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
