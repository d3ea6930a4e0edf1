"""What the ``mandrill`` command says before it does anything: unknown ``MANDRILL_*``
variables, and bad usage or configuration (exit 2) as one line, JSON under
``--log-format json``. Real processes."""

from __future__ import annotations

import json
import sys

import anyio
import pytest

from tests.support.daemon import run_to_end
from tests.support.net import free_port

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


# --- exit 2: one line, JSON when the logs are -------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        # argparse's own errors
        (["run", "--no-such-flag", "--log-format", "json"], {},
         "error: unrecognized arguments: --no-such-flag (see --help)"),
        (["run", "--li"], {"MANDRILL_LOG_FORMAT": "json"},
         "error: unrecognized arguments: --li (see --help)"),
        (["explode", "--log-format=json"], {}, "error: argument COMMAND: invalid choice"),
        # ConfigError while loading
        (["run", "--max-in-flight", "0", "--log-format", "json"], {},
         "error: --max-in-flight: '0' must be at least 1"),
        (["run", "--log-format", "json"], {"MANDRILL_GRACE": "soon"},
         "error: MANDRILL_GRACE: 'soon' is not a duration"),
        # ConfigError from inside the command
        (["history", "--ledger", ":memory:", "--limit", "0", "--log-format", "json"], {},
         "error: --limit: '0' must be at least 1"),
    ],
)
async def test_exit_2_is_one_json_line_under_log_format_json(args, env, expected):
    code, out, err = await run_to_end(args, env=env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    line = json.loads(err)
    assert line["message"].startswith(expected)
    assert (line["severity"], line["level"], line["logger"]) == ("ERROR", "error", "mandrill.cli")
    assert line["exit_code"] == 2
    assert "time" in line


async def test_the_log_format_of_the_config_file_counts_too(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[mandrill]\nlog_format = "json"\n')
    code, _, err = await run_to_end(["run", "--config", str(path), "--grace", "soon"])
    assert code == 2
    assert json.loads(err)["message"].startswith("error: --grace: 'soon' is not a duration")
    # The command line wins over the file, as it does for every setting.
    code, _, err = await run_to_end(["run", "--config", str(path), "--grace", "soon",
                                     "--log-format", "text"])
    assert err.startswith("mandrill: error: --grace: 'soon' is not a duration")


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-flag"],
        ["run", "--max-in-flight", "0"],
        ["history", "--ledger", ":memory:", "--limit", "0"],
        ["run", "--max-in-flight", "0", "--log-format", "auto"],
    ],
)
async def test_exit_2_is_one_plain_line_otherwise(args):
    code, _, err = await run_to_end(args, env={"MANDRILL_LOG_FORMAT": ""})
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("mandrill: error: ")


#: Run in a fresh interpreter: ``mandrill`` with an audit hook that names every module of a
#: heavy adapter library imported while an event loop runs (there, an import is a stall).
IMPORTS_ON_THE_LOOP = """
import json, sys, sniffio
on_loop = set()
def hook(event, args):
    if event == "import" and args[0].partition(".")[0] in {"psycopg", "aiohttp", "gcloud"}:
        try:
            sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return
        on_loop.add(args[0])
sys.addaudithook(hook)
from mandrill.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "on_loop": sorted(on_loop)}))
"""


async def test_the_ledger_driver_is_imported_before_the_loop_starts(backend_name):
    """psycopg's import took 105 ms on a cold cache: on the loop, the lag monitor logged it
    as a stall at every start, and a signal at start-up waited behind it."""
    done = await anyio.run_process(
        [sys.executable, "-c", IMPORTS_ON_THE_LOOP, "run", "--backend", backend_name,
         "--ledger", f"postgresql://mandrill@127.0.0.1:{free_port()}/db"],
        check=False,
    )
    result = json.loads(done.stdout.decode().splitlines()[-1])
    assert result["code"] == 1  # nothing listens there
    assert result["on_loop"] == []
