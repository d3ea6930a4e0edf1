"""A SQLite ledger path that cannot be used says why in one line and exits 2: a path under
a file, a directory, a file that is not SQLite, a missing directory (reproduced as root);
a directory that is not writable, a file that cannot be read or written (reproduced by
running mandrill as root without the capabilities that let root ignore permission bits)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import pytest

from mandrill.errors import LedgerPathError
from mandrill.ledger import open_ledger
from mandrill.ledger.sqlite import path_problem
from tests.support.daemon import mandrill_argv


def test_a_healthy_path_has_no_problem(tmp_path):
    assert path_problem(str(tmp_path / "new.db")) is None
    sqlite3.connect(tmp_path / "old.db").close()
    assert path_problem(str(tmp_path / "old.db")) is None
    assert path_problem(":memory:") is None


@pytest.fixture
def odd_paths(tmp_path) -> dict[str, tuple[str, str]]:
    """Paths root cannot use either, with what mandrill says of each."""
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "text.db").write_text("not SQLite, a text file long enough to tell\n")
    return {
        "under a file": (str(tmp_path / "file" / "x.db"),
                         f"{tmp_path / 'file'} is a file, not a directory"),
        "a directory": (str(tmp_path), "is a directory, not a file"),
        "not SQLite": (str(tmp_path / "text.db"), "is not a SQLite database"),
        "no directory": (str(tmp_path / "none" / "x.db"),
                         f"directory {tmp_path / 'none'} does not exist"),
    }


@pytest.mark.parametrize("case", ["under a file", "a directory", "not SQLite", "no directory"])
async def test_opening_says_why_the_path_cannot_be_used(odd_paths, case):
    path, why = odd_paths[case]
    assert path_problem(path) == why
    with pytest.raises(LedgerPathError) as info:
        await open_ledger(path)
    assert str(info.value) == f"SQLite ledger {path}: {why}"


#: Root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: permission bits stop it as they
#: stop any user. (Becoming ``nobody`` instead fails where the checkout itself is private,
#: as CI's is: the interpreter could not import what it imports lazily.)
WITHOUT_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


async def run_as(user: str | None, *args: str) -> tuple[int, str]:
    argv = mandrill_argv(*args)
    if user == "unprivileged":
        argv = [*WITHOUT_DAC, *argv]
    with anyio.fail_after(60):
        result = await anyio.run_process(argv, check=False)
    return result.returncode, result.stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["under a file", "a directory", "not SQLite"])
async def test_run_exits_2_with_one_line(odd_paths, case):
    path, why = odd_paths[case]
    code, err = await run_as(None, "run", "--count", "1", "--ledger", path)
    assert code == 2
    assert err == f"mandrill: error: SQLite ledger {path}: {why}\n"


# --- as an unprivileged user -------------------------------------------------------------


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A directory for ledgers that root, stripped of its capabilities, may not use."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to drop the capabilities that bypass permission bits")
    return tmp_path


def ledger_in(directory: Path) -> Path:
    path = directory / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "history"])
async def test_unwritable_and_unreadable_ledgers_without_root_privileges(shared_dir, command):
    read_only = shared_dir / "ro"
    read_only.mkdir()
    existing = ledger_in(read_only)
    existing.chmod(0o666)  # the file is writable: only its directory is not
    read_only.chmod(0o555)
    writable = shared_dir / "rw"
    writable.mkdir()
    writable.chmod(0o777)
    unreadable = ledger_in(writable)
    unreadable.chmod(0o000)
    frozen = writable / "frozen.db"
    sqlite3.connect(frozen).close()
    frozen.chmod(0o444)
    not_writable = (f"directory {read_only} is not writable (Permission denied): SQLite"
                    " keeps its journal beside the ledger")
    cases = [
        (existing, not_writable),
        (unreadable, "cannot be read (Permission denied)"),
        (frozen, "cannot be written (Permission denied)"),
    ]
    if command == "run":
        cases.append((read_only / "new.db", not_writable))
    extra = ["--count", "1"] if command == "run" else []
    for path, why in cases:
        code, err = await run_as("unprivileged", command, "--ledger", str(path), *extra)
        assert (code, err) == (2, f"mandrill: error: SQLite ledger {path}: {why}\n")
