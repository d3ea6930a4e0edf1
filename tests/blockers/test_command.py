"""The command blocker: exit 0 lets a restart go ahead; anything else blocks it, a command
that cannot run or hangs included."""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from mandrill.blockers import Block, ask
from mandrill.blockers.command import CommandBlocker
from mandrill.message import Message

HOST = Message("m-7", "web-1", "web-1.example.net",
               datetime(2026, 1, 1, tzinfo=UTC).timestamp(), None)


async def check(command: str, time_limit: float = 10.0) -> Block | None:
    return await ask(CommandBlocker(command, time_limit=time_limit, kill_grace=0.3), HOST)


async def test_true_lets_the_restart_go_ahead():
    assert await check("true") is None


async def test_false_blocks():
    block = await check("false")
    assert block == Block("command", "'false' exit 1")


async def test_the_reason_is_the_end_of_stderr(tmp_path: Path):
    script = tmp_path / "may-restart.py"
    script.write_text(
        "import os, sys\n"
        "sys.stderr.write(f\"{sys.argv[1]} {os.environ['MANDRILL_HOSTNAME']}"
        " {os.environ['MANDRILL_INSTANCE_NAME']} {os.environ['MANDRILL_MESSAGE_ID']}:\\n"
        "  change freeze until Monday\\n\")\n"
        "sys.exit(3)\n"
    )
    block = await check(f"{shlex.quote(sys.executable)} {script} {{instance_name}}")
    assert block is not None
    assert not block.error
    assert block.reason.endswith(
        "exit 3: web-1 web-1.example.net web-1 m-7: change freeze until Monday"
    )


async def test_a_missing_command_blocks():
    block = await check("/nonexistent/may-restart {hostname}")
    assert block is not None
    assert block.error
    assert "cannot tell, so blocking: cannot run '/nonexistent/may-restart'" in block.reason
    assert "No such file" in block.reason


async def test_a_command_that_hangs_blocks_at_its_time_limit():
    started = anyio.current_time()
    block = await check("sleep 30", time_limit=0.3)
    took = anyio.current_time() - started
    assert block is not None
    assert block.error
    assert "'sleep' timed out after 0.3s; process group terminated (SIGTERM)" in block.reason
    assert took < 5


async def test_an_unsafe_host_name_runs_nothing(tmp_path: Path):
    marker = tmp_path / "ran"
    unsafe = HOST._replace(hostname="-oProxyCommand=evil")
    blocker = CommandBlocker(f"touch {marker} {{hostname}}", time_limit=5)
    block = await ask(blocker, unsafe)
    assert block is not None
    assert block.error
    assert "refusing hostname" in block.reason
    assert not marker.exists()


@pytest.mark.parametrize(("command", "error"), [
    ("", "blocker command is empty"),
    ("{hostname} --check", "the program name cannot be a placeholder"),
    ("check {host}", "unknown placeholder"),
    ("check 'unclosed", "No closing quotation"),
])
def test_a_bad_command_is_refused_in_one_line(command: str, error: str):
    with pytest.raises(ValueError, match=error):
        CommandBlocker(command, time_limit=1)
