"""A reverse proxy in front of the Pub/Sub emulator that can hold requests: a Pub/Sub that
stops answering some calls (settlement at shutdown, say) while the rest still work; and
that can refuse requests the emulator accepts but the real service does not (``refuse``:
see :mod:`tests.support.pubsub_limits`).

It runs in threads of its own (stdlib ``http.server``), so a daemon under test (a real
process, or serve() on either backend) talks to it over real sockets.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

#: How long a held request waits for the proxy to close before it gives up on its own.
HOLD_LIMIT_SECONDS = 300.0


#: ``refuse(method, path, body)``: ``None`` to forward the request, else the
#: ``(status, JSON body)`` to answer in the upstream's stead, or ``(status, JSON body,
#: headers)`` (a ``Retry-After``, say).
Refusal = Callable[
    [str, str, bytes], tuple[int, bytes] | tuple[int, bytes, Mapping[str, str]] | None
]


class HoldingProxy:
    """Forwards every request to ``upstream`` (``host:port``), except those whose path
    matches ``hold`` once :attr:`holding` is set: they get no answer until the proxy
    closes (``held`` counts them); and those ``refuse`` answers itself (``refused`` counts
    them)."""

    def __init__(self, upstream: str, hold: str = "$^", refuse: Refusal | None = None) -> None:
        self.upstream = upstream
        self.hold = re.compile(hold)
        self.refuse = refuse
        self.refused = 0
        self.holding = threading.Event()
        self.closing = threading.Event()
        self.held = 0
        self.first_held = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body in one write, as the emulator sends them: gcloud-aio's
            # acknowledge never reads its answer, and one whose body comes in a segment
            # of its own is dropped unfinished (a ResourceWarning, the connection lost).
            wbufsize = 64 * 1024

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.holding.is_set() and proxy.hold.search(self.path):
                    proxy.held += 1
                    proxy.first_held.set()
                    proxy.closing.wait(HOLD_LIMIT_SECONDS)
                    self.close_connection = True
                    return
                refusal = proxy.refuse and proxy.refuse(self.command, self.path, body or b"")
                if refusal:
                    proxy.refused += 1
                    status, answer, *headers = refusal
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[HoldingProxy]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.closing.set()
            self._server.shutdown()
            self._server.server_close()
            thread.join(10)
