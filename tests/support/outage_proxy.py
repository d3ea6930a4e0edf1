"""A TCP proxy in front of a service (the Pub/Sub emulator) that can play an outage: while
:meth:`OutageProxy.cut` holds, every connection open through it is reset and every new one
is reset as soon as it is accepted, as a service that went away would; :meth:`restore`
ends the outage. It knows nothing of HTTP.

It runs in threads of its own (stdlib sockets), so the code under test may use any event
loop, or run in another process.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator

#: How often the accepting thread looks for a stopping proxy.
POLL_SECONDS = 0.05
#: Bound on joining the proxy's threads when it stops.
STOP_SECONDS = 5.0


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), not an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class OutageProxy:
    """Forwards connections to ``upstream`` (``host:port``) until :meth:`cut`; ``address``
    is what to connect to instead. ``refused`` counts connections reset while cut."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_SECONDS)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._down = False
        self._stopping = threading.Event()
        self.refused = 0

    def cut(self) -> None:
        """Begin the outage: reset every connection, and refuse new ones."""
        with self._lock:
            self._down = True
            dropped, self._open = self._open, set()
        for sock in dropped:
            # Wakes the pump blocked on it; the pump closes its pair.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        """End the outage: forward new connections again."""
        with self._lock:
            self._down = False

    @contextlib.contextmanager
    def running(self) -> Iterator[OutageProxy]:
        accepting = threading.Thread(target=self._accept, daemon=True)
        accepting.start()
        try:
            yield self
        finally:
            self._stopping.set()
            self.cut()
            accepting.join(STOP_SECONDS)
            for thread in self._threads:
                thread.join(STOP_SECONDS)
            self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                down = self._down
            if down:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes or the proxy cuts them."""
        pair = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(pair), [], [])
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.difference_update(pair)
            _reset(client)
            _reset(upstream)
