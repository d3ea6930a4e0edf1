"""The image's init reaps the orphans of restart commands (issue 19, item 3).

In a container the entrypoint is PID 1, and PID 1 inherits every orphan: a restart command
that leaves a background process (``ssh -f``, ``sh -c '… &'``) hands it over when it exits.
mandrill waits for its own children only, so as PID 1 those orphans stay zombies for ever.
The image's ENTRYPOINT therefore starts mandrill under tini. Both are run here as PID 1 of
a fresh PID namespace (``unshare --pid --fork --mount-proc``), a real ``mandrill run`` with
the command restarter: bare, the zombies pile up (the double reproduces the bug); under
the Containerfile's ENTRYPOINT, none is left. The namespace's own /proc is read, through
``/proc/PID/root/proc`` of its PID 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.support import tools
from tests.support.daemon import Daemon

CONTAINERFILE = Path(__file__).parent.parent / "deploy" / "Containerfile"
#: Restarts the daemon makes (its fleet rate limit): one orphan each.
RESTARTS = 4
#: Leaves one orphan per restart: the background sleep outlives its shell.
ORPHANING_COMMAND = shlex.join(["/bin/sh", "-c", "sleep 0.1 </dev/null >/dev/null 2>&1 &"])
#: How often the namespace's /proc is read: no event tells when an orphan exits or is reaped.
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    state: str
    ppid: int


def entrypoint() -> list[str]:
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            argv: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
            return argv
    raise AssertionError("no ENTRYPOINT in the Containerfile")


def unshare_or_skip() -> None:
    try:
        result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) missing")
    if result.returncode != 0:
        pytest.skip(f"no PID namespace allowed here: {result.stderr.strip()}")


def processes(proc: Path) -> list[Proc]:
    """Every process of a /proc, as the kernel says in each /proc/PID/stat."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid …": comm may hold anything but its last ")".
        head, _, tail = raw.rpartition(b")")
        fields = tail.split()
        comm = head.split(b"(", 1)[1].decode(errors="replace")
        found.append(Proc(int(entry.name), comm, fields[0].decode(), int(fields[1])))
    return found


def namespace_init(unshare_pid: int) -> int:
    """The host's pid of the namespace's PID 1: unshare's only child."""
    (init,) = [p.pid for p in processes(Path("/proc")) if p.ppid == unshare_pid]
    return init


def orphans(procs: list[Proc]) -> list[Proc]:
    return [p for p in procs if p.comm == "sleep"]


def alive(procs: list[Proc]) -> list[Proc]:
    return [p for p in procs if p.state not in ("Z", "X")]


@pytest.mark.slow
@pytest.mark.parametrize("init", ["bare", "entrypoint"])
async def test_orphans_of_restart_commands_as_pid_1(tmp_path, backend_name, init):
    unshare_or_skip()
    mandrill = [sys.executable, "-m", "mandrill"]
    prefix = mandrill
    if init == "entrypoint":
        # What runs mandrill in the image (its init, from tests.support.tools), as written.
        wrapper = entrypoint()[:-1]
        if wrapper:
            wrapper[0] = tools.require(wrapper[0])
        prefix = [*wrapper, *mandrill]
    argv = [
        # --kill-child: should the test end early, the namespace goes with unshare.
        "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *prefix,
        "run", "--backend", backend_name, "--ledger", str(tmp_path / "ledger.db"),
        "--restarter", "command", "--live", "--restart-command", ORPHANING_COMMAND,
        "--max-restarts", str(RESTARTS), "--rate", "20", "--seed", "1",
        "--log-format", "json",
    ]
    process = await anyio.open_process(argv, stdin=None, stdout=None)
    daemon = Daemon(process)
    try:
        for _ in range(RESTARTS):
            await daemon.wait_for(lambda line: line.get("message", "").startswith("restarted "))
        init_pid = namespace_init(process.pid)
        proc = Path(f"/proc/{init_pid}/root/proc")  # the namespace's own /proc
        with anyio.fail_after(10):
            # Each restart's orphan has exited (a zombie, or reaped and gone).
            while alive(orphans(processes(proc))):  # noqa: ASYNC110 - see POLL_SECONDS
                await anyio.sleep(POLL_SECONDS)
        if init == "bare":
            zombies = [p for p in processes(proc) if p.state == "Z"]
            # Every orphan a zombie of PID 1, the daemon, which never reaps it.
            assert len(zombies) >= RESTARTS
            assert {(p.comm, p.ppid) for p in zombies} == {("sleep", 1)}
        else:
            with anyio.move_on_after(10):
                while orphans(processes(proc)):  # noqa: ASYNC110 - see POLL_SECONDS
                    await anyio.sleep(POLL_SECONDS)
            # Reaped by the init: no zombie left, the daemon's or anyone's.
            assert [p for p in processes(proc) if p.state == "Z"] == []
        os.kill(init_pid, signal.SIGTERM)  # the container runtime's stop
        assert await daemon.finish(30) == 0, daemon.lines[-5:]
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await process.wait()
