"""The ``MANDRILL_*`` variables of the environment that nothing reads: a typo
(``MANDRILL_LEDGR``) would otherwise be ignored without a word, and the default used."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping

from mandrill.config.table import ENV_PREFIX, SETTINGS

#: ``MANDRILL_*`` variables read by something other than a setting: the test suite's
#: PostgreSQL server (tests/fixtures/postgres.py), inherited by the daemons it starts.
READ_ELSEWHERE = frozenset({"MANDRILL_TEST_POSTGRES"})
#: How alike (difflib's ratio) a known name must be to be suggested.
CLOSE_ENOUGH = 0.75


def known_variables() -> frozenset[str]:
    """Every ``MANDRILL_*`` variable something reads: each setting's, whichever command
    takes it (a shared environment serves ``run`` and ``history`` alike), and
    :data:`READ_ELSEWHERE`."""
    return frozenset(setting.env for setting in SETTINGS) | READ_ELSEWHERE


def unknown_variables(environ: Mapping[str, str]) -> Iterator[str]:
    """One line for each ``MANDRILL_*`` variable of ``environ`` nothing reads, in name
    order, with the known one it is closest to when there is a close one."""
    known = known_variables()
    # Compared without the prefix, which every name shares: MANDRILL_FOO is not "close"
    # to MANDRILL_ONLY for the 9 characters they have in common.
    suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1,
                                          cutoff=CLOSE_ENOUGH)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        yield f"unknown environment variable {name} ignored{hint}"
