"""What the ``mandrill`` command says before it does anything: unknown ``MANDRILL_*``
variables, and bad usage or configuration (exit 2) as one line, JSON under
``--log-format json``. Real processes."""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import run_to_end

pytestmark = pytest.mark.slow


async def test_an_unknown_variable_is_warned_of_once_at_start(tmp_path, backend_name):
    code, _, err = await run_to_end(
        ["run", "--backend", backend_name, "--count", "1", "--rate", "0",
         "--restart-latency", "0s", "--ledger", str(tmp_path / "l.db"), "--log-format", "json"],
        env={"MANDRILL_LEDGR": str(tmp_path / "typo.db"), "MANDRILL_GRACE": "1s"},
    )
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    warnings = [line for line in lines if "environment variable" in line["message"]]
    assert [(w["severity"], w["message"]) for w in warnings] == [(
        "WARNING",
        "unknown environment variable MANDRILL_LEDGR ignored (did you mean MANDRILL_LEDGER?)",
    )]
    assert lines[0] is warnings[0]  # before anything else is said


async def test_a_variable_of_another_command_is_not_unknown():
    """``MANDRILL_GRACE`` is ``run``'s: one environment may serve every command."""
    code, _, err = await run_to_end(
        ["history", "--ledger", ":memory:", "--log-format", "json"],
        env={"MANDRILL_GRACE": "1s", "MANDRILL_PROJECT": "p", "MANDRILL_LEDGR": "x"},
    )
    assert code == 0
    (line,) = [json.loads(line) for line in err.splitlines()]
    assert line["message"].startswith("unknown environment variable MANDRILL_LEDGR ignored")
