"""A TCP proxy in front of PostgreSQL that injects the faults a real server does not produce
on demand: a COMMIT whose answer is lost (committed, yet the client sees the connection
drop), a COMMIT held in flight until the test releases it, and a stall (the server stops
answering while TCP stays up).

It reads the frontend/backend protocol's message framing in both directions, so it knows
statement and transaction boundaries: a fault can target the transaction that ran a given
statement (``match``, a regex over the SQL text) and leave the others (heartbeats) alone.
It runs in threads of its own (stdlib sockets), so the code under test may use any event
loop, or run in another process.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import anyio

#: How often an idle thread looks for a released fault or a stopping proxy.
POLL_SECONDS = 0.05
#: Bound on joining the proxy's threads when it stops.
STOP_SECONDS = 5.0
#: Startup requests the server answers with one unframed byte ('S'/'G': encryption follows).
_ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest
_CANCEL_REQUEST = 80877102
_COMMIT = re.compile(r"\s*(COMMIT|END)(\s+(WORK|TRANSACTION))?\s*;?\s*", re.IGNORECASE)


class Fault:
    """An armed fault. ``fired`` is set when it takes effect; :meth:`release` ends a hold or
    a stall (harmless for the others)."""

    def __init__(self, kind: str, match: str | None) -> None:
        self.kind = kind
        self.match = None if match is None else re.compile(match, re.IGNORECASE)
        self.fired = threading.Event()
        self.released = threading.Event()
        self.fired_count = 0

    def release(self) -> None:
        self.released.set()

    def matches(self, statements: list[str]) -> bool:
        return self.match is None or any(self.match.search(sql) for sql in statements)

    # A timeout of its own, not fail_after: a cancelled wait would leave its thread waiting.
    async def wait_fired(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait for :attr:`fired` without blocking the event loop (asyncio or trio); raises
        ``TimeoutError`` if it is not set within ``timeout`` seconds."""
        if not await anyio.to_thread.run_sync(self.fired.wait, timeout, abandon_on_cancel=True):
            raise TimeoutError(f"{self!r} did not fire within {timeout}s")

    def __repr__(self) -> str:
        target = "any transaction" if self.match is None else repr(self.match.pattern)
        released = ", released" if self.released.is_set() else ""
        return f"<Fault {self.kind} on {target}: fired {self.fired_count}x{released}>"


class _Dropped(Exception):
    """The server has answered a COMMIT whose answer is to be lost: close both sides."""


def _take(buf: bytearray, typed: bool = True) -> bytes | None:
    """Remove the first complete message from ``buf`` and return it (None if there is none
    yet). Startup-phase messages have no type byte."""
    start = 1 if typed else 0
    if len(buf) < start + 4:
        return None
    end = max(start + struct.unpack_from("!i", buf, start)[0], start + 4)
    if len(buf) < end:
        return None
    message = bytes(buf[:end])
    del buf[:end]
    return message


def _cstrings(body: bytes, count: int) -> list[str]:
    return [s.decode(errors="replace") for s in body.split(b"\0", count)[:count]]


class _Connection:
    """One client connection and its server connection, relayed by one thread."""

    def __init__(self, proxy: PostgresFaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self.from_client, self.from_server = bytearray(), bytearray()  # not a whole message yet
        self.to_client, self.to_server = bytearray(), bytearray()  # to send
        self.held = bytearray()  # client bytes held back by ``hold``
        self.hold: Fault | None = None
        self.dropping: Fault | None = None
        self.startup = True
        self.unframed = 0  # single-byte answers the server owes (SSL/GSS requests)
        self.opaque = False  # encrypted: relay without parsing
        self.prepared: dict[str, str] = {}  # named statement -> SQL
        self.statements: list[str] = []  # SQL run in the current transaction

    def run(self) -> None:
        try:
            self.server = socket.create_connection(self.proxy.upstream, timeout=5)
            self.client.setblocking(False)
            self.server.setblocking(False)
            self._relay(self.client, self.server)
        except (OSError, _Dropped):
            pass
        finally:
            self.client.close()
            if self.server is not None:
                self.server.close()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        owed = {client: self.to_server, server: self.to_client}  # when that side has closed
        out = {client: self.to_client, server: self.to_server}
        ended: set[socket.socket] = set()
        while not self.proxy.stopping.is_set():
            if self.hold is not None and self.hold.released.is_set():
                self.to_server += self.held
                self.held.clear()
                self.hold = None
            flowing = not self.proxy.stalled()
            # One side closed: deliver what is owed to the other, then close it too.
            if flowing and any(not owed[s] and not self.held for s in ended):
                return
            readers = [s for s in (client, server) if s not in ended]
            writers = [s for s in (client, server) if flowing and out[s]]
            readable, writable, _ = select.select(readers, writers, [], POLL_SECONDS)
            for sock in writable:
                del out[sock][: sock.send(out[sock])]
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    ended.add(sock)
                elif sock is client:
                    self._from_client(data)
                else:
                    self._from_server(data)

    def _to_server(self, data: bytes) -> None:
        (self.held if self.hold is not None else self.to_server).extend(data)

    def _from_client(self, data: bytes) -> None:
        buf = self.from_client
        buf += data
        while buf:
            if self.opaque:
                self._to_server(bytes(buf))
                buf.clear()
                return
            message = _take(buf, typed=not self.startup)
            if message is None:
                return
            if self.startup:
                code = struct.unpack_from("!i", message, 4)[0]
                if code in _ENCRYPTION_REQUESTS:
                    self.unframed += 1
                elif code != _CANCEL_REQUEST:
                    self.startup = False  # a StartupMessage: typed messages follow
            else:
                self._inspect(message)
            self._to_server(message)

    def _inspect(self, message: bytes) -> None:
        """Note the SQL a client message runs; arm a commit fault on a matching COMMIT."""
        kind, body = message[:1], message[5:]
        sql = None
        if kind == b"Q":
            sql = _cstrings(body, 1)[0]
        elif kind == b"P":
            name, sql = _cstrings(body, 2)
            if name:  # Prepared (psycopg does that from a query's 6th run): a Bind runs it.
                self.prepared[name] = sql
                sql = None
        elif kind == b"B":
            sql = self.prepared.get(_cstrings(body, 2)[1])
        if sql is None:
            return
        if not _COMMIT.fullmatch(sql):
            self.statements.append(sql)
        elif (fault := self.proxy._take_commit_fault(self.statements)) is not None:
            if fault.kind == "hold_commit":
                self.hold = fault
            else:
                self.dropping = fault

    def _from_server(self, data: bytes) -> None:
        buf = self.from_server
        buf += data
        while buf:
            if self.unframed:
                byte = bytes(buf[:1])
                del buf[:1]
                self.unframed -= 1
                self.opaque = self.opaque or byte in (b"S", b"G")
                self.to_client += byte
                continue
            if self.opaque:
                self.to_client += buf
                buf.clear()
                return
            message = _take(buf)
            if message is None:
                return
            kind = message[:1]
            if kind == b"Z" and message[5:6] == b"I":  # ReadyForQuery, idle: transaction over
                self.statements.clear()
            if self.dropping is not None:
                if kind in (b"C", b"E", b"Z"):  # the COMMIT's answer: it has committed
                    raise _Dropped
                continue
            self.to_client += message


class PostgresFaultProxy:
    """Relays TCP connections from :attr:`address` to ``upstream`` (``host:port``) and
    injects the faults armed with :meth:`drop_commit_answer`, :meth:`hold_commit` and
    :meth:`stall` (from any thread). :meth:`reset` disarms and releases them all."""

    def __init__(self, upstream: str = "127.0.0.1:5432") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._armed: list[Fault] = []  # commit faults not fired yet, in arming order
        self._issued: list[Fault] = []  # every fault, for reset()
        self._stall: Fault | None = None
        self._threads: list[threading.Thread] = []

    def url(self, url: str) -> str:
        """``url`` (libpq URL) pointed at the proxy, its user, database and other query
        parameters kept; encryption off unless the URL says otherwise (it would hide the
        messages from the proxy)."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        query = [
            item
            for item in parts.query.split("&")
            if item and item.partition("=")[0] not in ("host", "hostaddr", "port")
        ]
        keys = {item.partition("=")[0] for item in query}
        query += [f"{key}=disable" for key in ("sslmode", "gssencmode") if key not in keys]
        netloc = f"{userinfo}{at}{self.address}"
        return urlunsplit(parts._replace(netloc=netloc, query="&".join(query)))

    def drop_commit_answer(self, match: str | None = None) -> Fault:
        """The next COMMIT of a transaction that ran SQL matching ``match`` (any if None)
        reaches the server and commits, then both sides are closed before its answer is
        relayed."""
        return self._arm(Fault("drop_commit_answer", match))

    def hold_commit(self, match: str | None = None) -> Fault:
        """The next matching COMMIT, and all the client sends after it, waits in the proxy
        until ``release()``."""
        return self._arm(Fault("hold_commit", match))

    def stall(self) -> Fault:
        """From now until ``release()``, every connection (new ones too) relays nothing in
        either direction, all sockets kept open; then what was held is delivered in order."""
        fault = Fault("stall", None)
        with self._lock:
            self._issued.append(fault)
            self._stall = fault
            fault.fired_count = 1
        fault.fired.set()
        return fault

    def stalled(self) -> bool:
        stall = self._stall
        return stall is not None and not stall.released.is_set()

    def reset(self) -> None:
        with self._lock:
            for fault in self._issued:
                fault.release()
            self._armed.clear()
            self._issued.clear()
            self._stall = None

    def _arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._armed.append(fault)
            self._issued.append(fault)
        return fault

    def _take_commit_fault(self, statements: list[str]) -> Fault | None:
        with self._lock:
            for fault in self._armed:
                if fault.matches(statements):
                    self._armed.remove(fault)
                    fault.fired_count += 1
                    fault.fired.set()
                    return fault
        return None

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                if not select.select([self._listener], [], [], POLL_SECONDS)[0]:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                continue
            thread = threading.Thread(
                target=_Connection(self, client).run, name="pg-proxy-connection", daemon=True
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    @contextmanager
    def running(self) -> Iterator[PostgresFaultProxy]:
        acceptor = threading.Thread(target=self._accept, name="pg-proxy-accept", daemon=True)
        acceptor.start()
        try:
            yield self
        finally:
            # Every thread notices within POLL_SECONDS and closes its sockets.
            self.stopping.set()
            deadline = time.monotonic() + STOP_SECONDS
            acceptor.join(STOP_SECONDS)
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            self._listener.close()
