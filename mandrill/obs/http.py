"""The HTTP server of ``/metrics``, ``/healthz`` and ``/readyz``, and of the status page
(``/status``, ``/status.json``, ``/explain?host=``, ``/explain.json?host=``).

A few dozen lines on anyio's own sockets rather than prometheus-client's threaded server:
it runs as a task of the daemon's task group (on asyncio and trio alike), so no thread
outlives the daemon and shutdown cancels it like everything else. It speaks just enough
HTTP/1.1: ``GET`` only, one request per connection (``Connection: close``), a bounded
request head, a deadline per connection and a bound on concurrent connections.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qs

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from mandrill.errors import ConfigError, LedgerError
from mandrill.obs.address import parse_addr
from mandrill.obs.health import Health
from mandrill.obs.status import StatusBoard
from mandrill.obs.status_html import REFRESH, render_explanation, render_status

#: Where a server finds the status page's board: ``None`` until the ledger is open.
StatusSource = Callable[[], StatusBoard | None]

log = logging.getLogger(__name__)

#: Request line plus headers; a scraper sends a few hundred bytes.
MAX_REQUEST_BYTES = 8192
#: From accept to the last byte sent; a scrape answers in milliseconds.
CONNECTION_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
#: ``/status?refresh=N``: at most this many seconds between refreshes.
MAX_REFRESH = 3600

_HTML = "text/html; charset=utf-8"
_JSON = "application/json"


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


_PHRASES = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class _Pages:
    """What one server serves: metrics (with a registry), health, the status page."""

    registry: CollectorRegistry | None
    health: Health
    status: StatusSource | None


async def serve_http(
    addr: str,
    registry: CollectorRegistry | None,
    health: Health,
    *,
    status: StatusSource | None = None,
    flag: str = "--metrics-addr",
    connection_timeout: float = CONNECTION_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/healthz`` and ``/readyz`` on ``addr`` until cancelled, with ``/metrics``
    when given a ``registry`` and the status page when given a ``status`` source (503
    until it has a board).

    Reports the bound port through ``task_status`` (so ``HOST:0`` picks a free one).
    Raises ``ValueError`` for a bad ``addr`` and ``ConfigError`` (naming ``flag``) if it
    cannot listen (the port is taken), both before ``started``. A connection's failure (a
    client gone, a timeout, a bug rendering a page) ends that connection only; connections
    beyond ``max_connections`` are closed at once.
    """
    host, port = parse_addr(addr)
    limiter = anyio.CapacityLimiter(max_connections)
    handler = partial(_handle, pages=_Pages(registry, health, status), limiter=limiter,
                      connection_timeout=connection_timeout)
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigError(f"{flag} {addr}: cannot listen: {exc.strerror or exc}") from exc
    async with listener:
        bound = listener.extra(SocketAttribute.local_port)
        shown = f"[{host}]" if ":" in host else host
        if registry is not None:
            log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", shown, bound)
        if status is not None:
            log.info("status page on http://%s:%d/status (also /status.json, /explain)",
                     shown, bound)
        task_status.started(bound)
        await listener.serve(handler)


async def _handle(
    stream: ByteStream,
    *,
    pages: _Pages,
    limiter: anyio.CapacityLimiter,
    connection_timeout: float,
) -> None:
    async with stream:
        try:
            limiter.acquire_on_behalf_of_nowait(stream)
        except anyio.WouldBlock:
            log.debug("metrics: too many connections, closing one")
            return
        try:
            with anyio.move_on_after(connection_timeout):
                response = await _respond(stream, pages)
                if response is not None:
                    await stream.send(_encode(response))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: connection lost: %r", exc)
        finally:
            limiter.release_on_behalf_of(stream)


async def _respond(stream: ByteStream, pages: _Pages) -> _Response | None:
    """Read one request and build its response; ``None`` when the client went away."""
    try:
        head = await _read_head(stream)
    except anyio.EndOfStream:
        return None
    except _BadRequest as exc:
        return _Response(exc.status, f"{exc}\n".encode())
    try:
        method, path, query, headers = _parse_head(head)
        if method != "GET":
            return _Response(405, b"only GET\n", headers=(("Allow", "GET"),))
        return await _route(path, query, headers, pages)
    except _BadRequest as exc:
        return _Response(exc.status, f"{exc}\n".encode())
    except Exception:
        # One page failing (a collector's bug) must not stop the server nor the service.
        log.exception("metrics: error answering a request")
        return _Response(500, b"internal error\n")


async def _read_head(stream: ByteStream) -> bytes:
    """Bytes up to the blank line ending the headers. Raises ``EndOfStream``/_BadRequest."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        if end >= 0:
            return bytes(data[:end])
        if len(data) > MAX_REQUEST_BYTES:
            raise _BadRequest(431, "request head too large")
        chunk = await stream.receive(4096)
        data += chunk


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """``(method, path, query, headers)``; the query's last value of each name."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505, "HTTP/1.x only")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    try:
        values = parse_qs(query, max_num_fields=8, errors="strict")
    except ValueError as exc:
        raise _BadRequest(400, f"malformed query: {exc}") from None
    return method, path, {name: found[-1] for name, found in values.items()}, headers


async def _route(
    path: str, query: Mapping[str, str], headers: Mapping[str, str], pages: _Pages
) -> _Response:
    registry, health, source = pages.registry, pages.health, pages.status
    status = None if source is None else source()
    if path == "/metrics" and registry is not None:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return _Response(200, encoder(registry), content_type)
    if path in ("/healthz", "/readyz"):
        ok, reason = health.loop_alive() if path == "/healthz" else health.ready()
        return _Response(200 if ok else 503, f"{reason}\n".encode())
    if source is not None and status is None and path in _STATUS_PATHS:
        return _Response(503, b"starting: the ledger is not open yet\n",
                         headers=(("Retry-After", "2"),))
    if status is not None and path in _STATUS_PATHS:
        try:
            return await _status_page(path, query, status)
        except LedgerError as exc:
            return _Response(503, f"cannot read the ledger: {exc}\n".encode(),
                             headers=(("Retry-After", "2"),))
    found = ["/metrics"] if registry is not None else []
    found += ["/healthz", "/readyz"] + (["/status"] if source is not None else [])
    return _Response(404, f"not found: try {', '.join(found)}\n".encode())


_STATUS_PATHS = frozenset({"/", "/status", "/status.json", "/explain", "/explain.json"})


async def _status_page(path: str, query: Mapping[str, str], status: StatusBoard) -> _Response:
    if path == "/":
        return _Response(302, b"", headers=(("Location", "/status"),))
    if path == "/status.json":
        return _Response(200, await status.json(), _JSON)
    if path == "/status":
        refresh = _refresh(query.get("refresh"))
        if refresh == REFRESH:
            page = await status.rendered("html", lambda snap: render_status(snap).encode())
        else:
            page = render_status(await status.snapshot(), refresh).encode()
        return _Response(200, page, _HTML)
    host = query.get("host", "").strip()
    if path == "/explain.json":
        if not host:
            return _Response(400, b"explain.json needs ?host=HOST\n")
        try:
            explanation = await status.explain(host)
        except ValueError as exc:
            return _Response(400, f"{exc}\n".encode())
        return _Response(200, json.dumps(explanation.to_json()).encode(), _JSON)
    if not host:
        return _Response(200, render_explanation(None, "").encode(), _HTML)
    try:
        explanation = await status.explain(host)
    except ValueError as exc:
        return _Response(400, render_explanation(None, host, str(exc)).encode(), _HTML)
    return _Response(200, render_explanation(explanation, host).encode(), _HTML)


def _refresh(value: str | None) -> int:
    if value is None:
        return REFRESH
    if not value.isdigit() or int(value) > MAX_REFRESH:
        raise _BadRequest(400, f"refresh must be a number of seconds from 0 to {MAX_REFRESH}")
    return int(value)


def _encode(response: _Response) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body
