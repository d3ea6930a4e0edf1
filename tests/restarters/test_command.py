from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from mandrill.errors import RestartFailed
from mandrill.message import Message
from mandrill.restarters import CommandRestarter
from mandrill.restarters.command import parse_template
from tests.support.daemon import start as start_daemon

RECORDER = """
import json, sys
with open(sys.argv[1], "w") as f:
    json.dump(sys.argv[2:], f)
"""


def message(instance: str = "web-1", hostname: str | None = None) -> Message:
    return Message(
        "m-1",
        instance,
        hostname if hostname is not None else f"{instance.lower()}.example.net",
        datetime(2026, 1, 1, tzinfo=UTC).timestamp(),
        None,
    )


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    return script, tmp_path / "argv.json"


async def test_runs_the_command_with_placeholders_filled(recorder):
    script, record = recorder
    argv = [sys.executable, str(script), str(record), "{hostname}", "--name={instance_name}"]
    restarter = CommandRestarter([*argv, "{{literal}}"], timeout=30)
    assert await restarter.restart(message("Web-1")) == "exit 0"
    assert json.loads(record.read_text()) == [
        "web-1.example.net",
        "--name=Web-1",
        "{literal}",
    ]


async def test_template_string_is_split_like_a_shell_but_never_run_by_one(recorder, tmp_path):
    script, record = recorder
    template = f"{sys.executable} {script} {record} 'sudo reboot {{hostname}}' $HOME;"
    restarter = CommandRestarter(template, timeout=30)
    await restarter.restart(message())
    assert json.loads(record.read_text()) == ["sudo reboot web-1.example.net", "$HOME;"]


async def test_non_zero_exit_reports_the_stderr_tail():
    script = "import sys; sys.stderr.write('x' * 500 + '\\nhost\\n  unreachable\\n'); sys.exit(3)"
    restarter = CommandRestarter([sys.executable, "-c", script], timeout=30)
    with pytest.raises(RestartFailed) as caught:
        await restarter.restart(message())
    detail = str(caught.value)
    assert detail.startswith("exit 3: ")
    assert detail.endswith("xxx host unreachable")
    assert "\n" not in detail
    assert len(detail) == len("exit 3: ") + 200


async def test_non_zero_exit_without_stderr():
    restarter = CommandRestarter([sys.executable, "-c", "raise SystemExit(1)"], timeout=30)
    with pytest.raises(RestartFailed, match=r"^exit 1$"):
        await restarter.restart(message())


def hanging_command(pid_file: Path) -> list[str]:
    code = (
        f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))"
        "; time.sleep(60)"
    )
    return [sys.executable, "-c", code]


def assert_gone(pid_file: Path) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


async def test_a_hanging_command_is_killed_after_the_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    restarter = CommandRestarter(hanging_command(pid_file), timeout=0.5)
    expected = r"^timed out after 0.5s; process group terminated \(SIGTERM\)$"
    with anyio.fail_after(20), pytest.raises(RestartFailed, match=expected):
        await restarter.restart(message())
    assert_gone(pid_file)


async def test_cancellation_kills_the_command_and_propagates(tmp_path):
    pid_file = tmp_path / "pid"
    restarter = CommandRestarter(hanging_command(pid_file), timeout=60)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(restarter.restart, message())
            # Polled: a child process cannot set an anyio.Event. The deadline is fail_after's.
            while not pid_file.exists() or not pid_file.read_text():  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert_gone(pid_file)


# -- a process tree: the command's own children must go with it --------------------------

GRANDCHILD = """
import os, pathlib, signal, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(31)
"""


def process_tree(tmp_path: Path, kind: str = "polite") -> tuple[list[str], Path]:
    """``sh -c '<python grandchild>; true'``: the shell waits for its child (it cannot
    exec it, there is more to run), as in ``sh -c 'sleep 31; true'``; the grandchild
    writes its pid to a file."""
    script = tmp_path / "grandchild.py"
    script.write_text(GRANDCHILD)
    pid_file = tmp_path / "grandchild.pid"
    line = " ".join(shlex.quote(part) for part in (sys.executable, str(script), str(pid_file)))
    return ["/bin/sh", "-c", f"{line} {kind}; true"], pid_file


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: it only waits to be reaped,
    and in a container whose init does not reap, it may wait for ever)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def pid_in(pid_file: Path) -> int | None:
    text = pid_file.read_text() if pid_file.exists() else ""
    return int(text) if text else None


async def started(pid_file: Path) -> int:
    # Polled: a child process cannot set an anyio.Event. The deadline is the caller's.
    while (pid := pid_in(pid_file)) is None:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    return pid


async def test_a_timed_out_command_leaves_no_process_behind(tmp_path):
    # Issue 10, bug 2: only the shell was killed; its child ran on.
    argv, pid_file = process_tree(tmp_path)
    restarter = CommandRestarter(argv, timeout=1)
    with anyio.fail_after(20), pytest.raises(RestartFailed) as caught:
        await restarter.restart(message())
    assert str(caught.value) == "timed out after 1s; process group terminated (SIGTERM)"
    assert not running(int(pid_file.read_text()))


async def test_a_command_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    argv, pid_file = process_tree(tmp_path, "stubborn")
    restarter = CommandRestarter(argv, timeout=1, kill_grace=0.3)
    with anyio.fail_after(20), pytest.raises(RestartFailed) as caught:
        await restarter.restart(message())
    assert str(caught.value) == (
        "timed out after 1s; process group killed (SIGKILL after 0.3s)"
    )
    assert not running(int(pid_file.read_text()))


async def test_cancellation_leaves_no_process_behind(tmp_path):
    argv, pid_file = process_tree(tmp_path)
    restarter = CommandRestarter(argv, timeout=60)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(restarter.restart, message())
            pid = await started(pid_file)
            tg.cancel_scope.cancel()
    assert not running(pid)


async def test_a_restart_outlives_a_daemon_killed_outright(tmp_path):
    # The documented choice: SIGKILL of the daemon does not reach the command (a session of
    # its own): the restart runs to its end, and its outcome is recorded as unknown.
    argv, pid_file = process_tree(tmp_path)
    code = (
        "import anyio, sys\n"
        "from mandrill.restarters import CommandRestarter\n"
        "from tests.restarters.test_command import message\n"
        f"anyio.run(CommandRestarter({argv!r}, timeout=60).restart, message())\n"
    )
    async with await anyio.open_process([sys.executable, "-c", code]) as daemon:
        with anyio.fail_after(20):
            pid = await started(pid_file)
        daemon.kill()
        await daemon.wait()
    try:
        assert running(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


async def test_a_missing_program_is_a_restart_failure(tmp_path):
    restarter = CommandRestarter([str(tmp_path / "no-such-program")], timeout=5)
    with pytest.raises(RestartFailed, match="cannot run"):
        await restarter.restart(message())


@pytest.mark.parametrize(
    ("instance", "hostname"),
    [
        ("web-1", "; rm -rf /"),
        ("web-1", "-oProxyCommand=x"),
        ("web-1", "../x"),
        ("web-1", "web-1.example.net x"),
        ("web-1", "web-1..example.net"),
        ("web-1", ""),
        ("-oProxyCommand=x", "web-1.example.net"),
        ("../x", "web-1.example.net"),
        ("a b", "web-1.example.net"),
        ("web-1", "a" * 64 + ".example.net"),
    ],
)
async def test_hostile_names_are_refused_without_running_anything(recorder, instance, hostname):
    script, record = recorder
    restarter = CommandRestarter(
        [sys.executable, str(script), str(record), "{hostname}", "{instance_name}"], timeout=30
    )
    with pytest.raises(RestartFailed, match=r"^refusing"):
        await restarter.restart(message(instance, hostname))
    assert not record.exists()


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ([], "empty"),
        (["", "x"], "empty"),
        ("ssh 'unterminated", "No closing quotation"),
        ("ssh {host}", "unknown placeholder"),
        ("ssh {}", "unknown placeholder"),
        ("ssh {0}", "unknown placeholder"),
        ("ssh {hostname.__class__}", "unknown placeholder"),
        ("ssh {hostname!r}", "unknown placeholder"),
        ("ssh {hostname:>30}", "unknown placeholder"),
        ("ssh {hostname", "expected '}'"),
        ("ssh }", "Single '}'"),
        ("{hostname} reboot", "program name"),
        ("/usr/bin/{instance_name}", "program name"),
    ],
)
def test_bad_templates_are_refused(template, error):
    with pytest.raises(ValueError, match=error) as caught:
        CommandRestarter(template, timeout=1)
    assert "\n" not in str(caught.value)


def test_parse_template_keeps_an_argv_as_is():
    assert parse_template(["ssh", "-o", "BatchMode=yes", "{hostname}", "sudo reboot"]) == (
        "ssh",
        "-o",
        "BatchMode=yes",
        "{hostname}",
        "sudo reboot",
    )


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_bad_timeout(timeout):
    with pytest.raises(ValueError, match="timeout"):
        CommandRestarter("true", timeout=timeout)


async def test_a_daemons_shutdown_leaves_no_restart_process_behind(tmp_path, backend_name):
    # At shutdown, restarts still running after the grace are cancelled: each command's
    # process group goes with them. The daemon runs as a real process, as in production.
    script = tmp_path / "grandchild.py"
    script.write_text(GRANDCHILD)
    line = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"
    command = shlex.join(
        ["/bin/sh", "-c", f"{line} {shlex.quote(str(tmp_path))}/{{hostname}}.pid polite; true"]
    )
    daemon = await start_daemon([
        "run", "--backend", backend_name, "--ledger", str(tmp_path / "ledger.db"),
        "--restarter", "command", "--live", "--restart-command", command,
        "--grace", "0.2s", "--rate", "20", "--seed", "1",
    ])
    async with daemon.process:
        with anyio.fail_after(30):
            while not (pid_files := list(tmp_path.glob("*.pid"))):  # noqa: ASYNC110
                await anyio.sleep(0.02)  # polled: files tell no event
            await started(pid_files[0])
        daemon.signal(signal.SIGTERM)
        assert await daemon.finish() == 0
    pids = [pid for path in tmp_path.glob("*.pid") if (pid := pid_in(path)) is not None]
    assert pids
    assert [pid for pid in pids if running(pid)] == []
