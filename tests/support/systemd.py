"""The receiving end of systemd's notification socket: what systemd would read."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio


class NotifySocket:
    """A datagram socket bound at ``path`` (or ``@name``: the abstract namespace); as
    ``NOTIFY_SOCKET``, it receives what the daemon tells systemd."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        #: Every datagram received, with ``anyio.current_time()`` at its receipt.
        self.received: list[tuple[float, str]] = []

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)

    def environment(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def pending(self) -> list[str]:
        """What is queued now, without waiting."""
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return found

    async def receive(self, seconds: float = 10) -> tuple[float, str]:
        """The next datagram and when it came; fails after ``seconds`` without one."""
        with anyio.fail_after(seconds):
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    await anyio.wait_readable(self.sock)
                    continue
                self.received.append((anyio.current_time(), data.decode()))
                return self.received[-1]

    async def wait_for(self, predicate: Callable[[str], bool], seconds: float = 10) -> float:
        """Receive until a datagram matches; return when it came."""
        with anyio.fail_after(seconds):
            while True:
                when, text = await self.receive(seconds)
                if predicate(text):
                    return when


def has(key: str) -> Callable[[str], bool]:
    """Whether a datagram carries ``key`` (``READY=1``) among its lines."""
    return lambda text: key in text.splitlines()
