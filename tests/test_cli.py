"""The ``mandrill`` command as a real process, on the backend of the test run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import sqlite3

import anyio
import pytest

from mandrill import config
from mandrill.cli import build_parser
from tests.support.daemon import mandrill_argv, run_to_end, start
from tests.support.net import free_port

pytestmark = pytest.mark.slow


def settled_messages(db: str) -> int:
    """Messages with a final decision, or dead-lettered (a message whose restart keeps
    failing ends there after ``--max-attempts``: rare at a 10% failure rate, not never)."""
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM messages AS m WHERE m.status = 'dead_letter' OR EXISTS"
            " (SELECT 1 FROM restarts AS r WHERE r.message_id = m.message_id"
            " AND r.outcome IN ('restarted', 'skipped'))"
        ).fetchone()
    return int(count)


def summary(daemon) -> str:
    return next(m for m in reversed(daemon.messages()) if m.startswith("stopped ("))


async def test_run_count_processes_every_message_and_exits_0(tmp_path, backend_name):
    db = str(tmp_path / "ledger.db")
    daemon = await start([
        "run", "--backend", backend_name, "--count", "500", "--rate", "0",
        "--restart-latency", "10ms", "--restart-failure-rate", "0.1", "--ledger", db,
    ])
    assert await daemon.finish(60) == 0
    assert "processed 500 messages" in summary(daemon)
    assert summary(daemon).endswith("unsettled 0")
    assert settled_messages(db) == 500


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_mid_flight_stops_gracefully(tmp_path, backend_name, signum):
    grace = 3.0
    daemon = await start([
        "run", "--backend", backend_name, "--rate", "100", "--restart-latency", "1s",
        "--grace", f"{grace}s", "--ledger", str(tmp_path / "ledger.db"),
    ])
    # The 10th restart, not the first: that one may come so early (a latency draw near 0)
    # that nothing else has been published yet.
    for _ in range(10):
        await daemon.wait_for_message("restarted ")
    signalled = anyio.current_time()
    daemon.signal(signum)
    assert await daemon.finish(grace + 10) == 0
    assert anyio.current_time() - signalled < grace + 1
    assert f"stopped ({signum.name})" in summary(daemon)
    assert summary(daemon).endswith("unsettled 0")
    stopped = next(m for m in daemon.messages() if m.startswith("stopped pulling"))
    assert not stopped.startswith("stopped pulling; 0 in flight")


async def test_a_second_signal_cancels_the_grace(tmp_path, backend_name):
    daemon = await start([
        "run", "--backend", backend_name, "--rate", "100", "--restart-latency", "60s",
        "--grace", "120s", "--ledger", str(tmp_path / "ledger.db"),
    ])
    await daemon.wait_for_message("restarted ")
    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_message("stopped pulling")
    forced = anyio.current_time()
    daemon.signal(signal.SIGTERM)
    assert await daemon.finish(30) == 0
    assert anyio.current_time() - forced < 5
    assert summary(daemon).endswith("unsettled 0")
    # The restarts under way were cut short: recorded as unknown (counted), not lost.
    assert any("interrupted by shutdown" in m for m in daemon.messages())
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        (open_claims,) = conn.execute(
            "SELECT COUNT(*) FROM restarts WHERE outcome = 'restarting'").fetchone()
        (interrupted,) = conn.execute(
            "SELECT COUNT(*) FROM restarts WHERE outcome = 'unknown'").fetchone()
    assert open_claims == 0
    assert interrupted > 0


async def test_sigquit_keeps_its_default_behaviour(tmp_path, backend_name):
    daemon = await start([
        "run", "--backend", backend_name, "--ledger", str(tmp_path / "ledger.db"),
    ])
    await daemon.wait_for_message("ready")
    daemon.signal(signal.SIGQUIT)
    assert await daemon.finish(30) == -signal.SIGQUIT


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--max-in-flight", "0"], "--max-in-flight: '0' must be at least 1"),
        (["run", "--backend", "curio"], "--backend: 'curio' is not one of asyncio, trio"),
        (["run", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["run", "--domain", "bad domain"], "--domain:"),
        (["explode"], "invalid choice: 'explode'"),
        (["run", "--config", "/nonexistent.toml"], "cannot read config file"),
    ],
)
async def test_bad_input_exits_2_with_one_line(args, expected):
    code, _, err = await run_to_end(args)
    assert code == 2
    assert err.count("\n") == 1
    assert expected in err
    assert err.startswith("mandrill: error: ")


async def test_history_lists_what_run_did(tmp_path, backend_name):
    db = str(tmp_path / "ledger.db")
    code, _, _ = await run_to_end([
        "run", "--backend", backend_name, "--count", "20", "--rate", "0",
        "--restart-latency", "0s", "--restart-failure-rate", "0", "--ledger", db,
    ])
    assert code == 0
    code, out, _ = await run_to_end(["history", "--ledger", db, "--json", "--limit", "100"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 20
    assert {row["outcome"] for row in rows} <= {"restarted", "skipped"}
    assert all(row["host"].endswith(".example.net") for row in rows)


async def test_history_of_a_missing_ledger_is_an_error(tmp_path):
    code, _, err = await run_to_end(["history", "--ledger", str(tmp_path / "typo.db")])
    assert code == 2
    assert err.strip().endswith(f"--ledger: no ledger at {tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()


# --- the command line itself -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--li"],  # would be --live: real restarts
        ["run", "--dry"],
        ["history", "--js"],
        ["replay", "--dead"],
        ["publish", "--cou", "1"],
    ],
)
def test_abbreviated_flags_are_refused_by_every_command(args, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(args)
    assert info.value.code == 2
    assert f"unrecognized arguments: {args[1]}" in capsys.readouterr().err


async def test_an_abbreviated_flag_exits_2_as_a_process():
    code, _, err = await run_to_end(["run", "--li", "--count", "1"])
    assert code == 2
    assert err == "mandrill: error: unrecognized arguments: --li (see --help)\n"


async def test_version():
    code, out, _ = await run_to_end(["--version"])
    assert code == 0
    assert out == f"mandrill {importlib.metadata.version('mayhem-mandrill')}\n"


async def test_run_help_reads_like_the_readme():
    code, out, _ = await run_to_end(["run", "--help"])
    assert code == 0
    assert "--backend {asyncio,trio}" in out
    assert "--restarter {simulated,command,gce}" in out
    flat = " ".join(out.split())
    assert "[default 7d; env MANDRILL_MIN_RESTART_INTERVAL]" in flat
    assert "[default 10s; env MANDRILL_GRACE]" in flat
    assert "[default 500ms; env MANDRILL_RESTART_LATENCY]" in flat
    for raw in ("604800", "default None", "default ()", "default False"):
        assert raw not in flat
    titles = [line for line in out.splitlines() if line and not line.startswith(" ")]
    for group in ("source", "ledger", "restarter", "safety", "shutdown", "observability"):
        assert any(title.startswith(group) and title.endswith(":") for title in titles), group


def test_every_setting_is_in_a_known_group():
    assert {setting.group for setting in config.SETTINGS} <= set(config.GROUPS)


async def test_publish_offers_only_what_it_uses():
    code, out, _ = await run_to_end(["publish", "--help"])
    assert code == 0
    assert "--topic" in out
    assert "--subscription" not in out
    assert "--dead-letter-topic" not in out
    code, _, err = await run_to_end(["publish", "--subscription", "s"])
    assert code == 2
    assert "unrecognized arguments: --subscription" in err


@pytest.mark.parametrize("command", ["publish", "setup", "replay"])
async def test_a_missing_project_is_named_without_mentioning_a_source(tmp_path, command):
    extra = ["--ledger", str(tmp_path / "l.db")] if command == "replay" else []
    if command == "replay":
        (tmp_path / "l.db").touch()
    code, _, err = await run_to_end([command, *extra], env={"MANDRILL_PROJECT": ""})
    assert code == 2
    assert err.startswith("mandrill: error: --project is required: the Google Cloud project")
    assert "--source" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["history", "--limit", "0"], "--limit: '0' must be at least 1"),
        (["history", "--since", "yesterday"], "--since: 'yesterday' is not a duration"),
        (["history", "--host", "bad host"], "--host: 'bad host' is not an instance name"),
        (["history", "--outcome", "won"], "--outcome: won is not among restarting,"),
        (["replay", "--project", "p", "--host", "a..b"], "--host: 'a..b' is not"),
        (["publish", "--topic", ""], "--topic: must not be empty"),
        (["run", "--topic", "t"], "unrecognized arguments: --topic"),
        (["run", "--profile", "/no/such/dir/run.prof"], "--profile: '/no/such/dir/run.prof':"),
    ],
)
async def test_bad_command_input_exits_2_with_one_line(tmp_path, args, expected):
    ledger = tmp_path / "l.db"
    ledger.touch()
    ledger_flag = ["--ledger", str(ledger)] if args[0] != "publish" else []
    code, _, err = await run_to_end([*args, *ledger_flag])
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("mandrill: error: ")
    assert expected in err


# --- history for people and for pipes --------------------------------------------------

LONG_DOMAIN = "a-rather-long-subdomain-of-the-fleet.example.net"


async def ran(tmp_path, backend_name, *extra: str, count: int = 30) -> str:
    db = str(tmp_path / "ledger.db")
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--count", str(count), "--rate", "0",
        "--restart-latency", "0s", "--ledger", db, "--log-format", "json", *extra,
    ])
    assert code == 0, err
    return db


async def test_history_in_a_pipe_has_every_value_in_full(tmp_path, backend_name):
    db = await ran(tmp_path, backend_name, "--domain", LONG_DOMAIN,
                   "--restart-failure-rate", "0")
    code, out, _ = await run_to_end(["history", "--ledger", db, "--limit", "100"])
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split("\t") == ["decided (UTC)", "host", "outcome", "detail", "message"]
    assert len(lines) == 30
    rows = [line.split("\t") for line in lines]
    assert all(row[1].endswith("." + LONG_DOMAIN) for row in rows)
    assert all("…" not in line for line in lines)


async def test_history_and_replay_take_an_instance_name(tmp_path, backend_name):
    db = await ran(tmp_path, backend_name, "--domain", LONG_DOMAIN,
                   "--restart-failure-rate", "0")
    _, out, _ = await run_to_end(["history", "--ledger", db, "--json", "--limit", "1"])
    host = json.loads(out)["host"]
    instance = host.split(".")[0]
    for value in (instance, host, instance.upper()):
        code, out, err = await run_to_end([
            "history", "--ledger", db, "--json", "--domain", LONG_DOMAIN, "--host", value,
        ])
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows
        assert {row["host"] for row in rows} == {host}


async def test_history_shows_dead_letters_with_their_reason(tmp_path, backend_name):
    db = await ran(tmp_path, backend_name, "--restart-failure-rate", "1", "--max-attempts",
                   "1", count=5)
    code, out, _ = await run_to_end(["history", "--ledger", db, "--json"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(row["outcome"] for row in rows) == ["dead_letter"] * 5 + ["failed"] * 5
    dead = [row for row in rows if row["outcome"] == "dead_letter"]
    assert {row["detail"] for row in dead} == {"restart failed 1 times"}
    assert all(row["host"].endswith(".example.net") for row in dead)

    code, out, _ = await run_to_end([
        "history", "--ledger", db, "--json", "--outcome", "dead_letter", "--limit", "3",
    ])
    assert code == 0
    assert [json.loads(line)["outcome"] for line in out.splitlines()] == ["dead_letter"] * 3
    code, out, _ = await run_to_end(["history", "--ledger", db, "--json", "--outcome",
                                     "failed"])
    assert [json.loads(line)["outcome"] for line in out.splitlines()] == ["failed"] * 5
    code, out, _ = await run_to_end(["history", "--ledger", db, "--outcome", "restarted"])
    assert out.splitlines()[1:] == []


async def test_history_into_a_closed_pipe_ends_quietly(tmp_path, backend_name):
    db = await ran(tmp_path, backend_name, count=5)
    read_end, write_end = os.pipe()
    # The reader is gone before the child writes a byte: `mandrill history | head -0`.
    os.close(read_end)
    try:
        process = await anyio.open_process(
            mandrill_argv("history", "--ledger", db, "--json"), stdin=None, stdout=write_end
        )
    finally:
        os.close(write_end)
    async with process:
        assert process.stderr is not None
        err = b""
        with anyio.fail_after(30), contextlib.suppress(anyio.EndOfStream):
            while True:
                err += await process.stderr.receive()
        assert await process.wait() == 141
    assert err == b""


# --- exit codes -------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (a hung PostgreSQL)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130),
                                                  (signal.SIGTERM, -signal.SIGTERM)])
async def test_a_signal_before_the_daemon_is_up(silent_server, backend_name, signum, expected):
    """SIGINT while the ledger connects: 130 once the connection attempt gives up; SIGTERM
    before the daemon's handlers are installed: its default action (a shell says 143)."""
    port = silent_server.getsockname()[1]
    process = await anyio.open_process(mandrill_argv(
        "run", "--backend", backend_name, "--log-format", "json",
        "--ledger", f"postgresql://mandrill@127.0.0.1:{port}/db?connect_timeout=2",
    ))
    with anyio.fail_after(30):  # the daemon connects to the ledger first thing
        connection, _ = await anyio.to_thread.run_sync(silent_server.accept,
                                                       abandon_on_cancel=True)
    with connection:
        process.send_signal(signum)
        with anyio.fail_after(30):
            assert await process.wait() == expected
    await process.aclose()


async def test_a_ledger_that_cannot_be_opened_exits_1_with_one_line(backend_name):
    closed = free_port()
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--log-format", "json",
        "--ledger", f"postgresql://mandrill@127.0.0.1:{closed}/db",
    ])
    assert code == 1
    (line,) = [json.loads(line) for line in err.splitlines()]
    assert line["severity"] == "ERROR"
    assert line["message"].startswith("stopped: cannot open PostgreSQL ledger")
