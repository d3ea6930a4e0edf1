"""A local stand-in for Google's metadata server (the token endpoint of a GCE instance).

A real HTTP server on 127.0.0.1, served by a thread of its own so that it answers whichever
backend, loop or bridge thread the code under test calls it from. It answers
``/computeMetadata/v1/instance/service-accounts/default/token`` with an access token when
the request carries ``Metadata-Flavor: Google`` (403 otherwise, as Google does), can be told
to answer the first N token requests with 503, and records every request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
ACCESS_TOKEN = "metadata-test-token"


@dataclass(frozen=True)
class MetadataRequest:
    path: str
    query: str
    flavor: str | None
    #: The HTTP status the server answered with.
    status: int


class FakeMetadataServer:
    """Serves while inside :func:`running_metadata_server`; ``host`` is what
    ``GCE_METADATA_HOST`` would hold."""

    def __init__(self, *, fail_first: int = 0, project: str = "metadata-test-project") -> None:
        self.fail_first = fail_first
        self.project = project
        self.requests: list[MetadataRequest] = []
        self._changed = threading.Condition()
        self.host = ""

    def fail_next(self, count: int) -> None:
        """Answer the next ``count`` token requests with 503."""
        with self._changed:
            self.fail_first = count

    @property
    def token_requests(self) -> list[MetadataRequest]:
        with self._changed:
            return [r for r in self.requests if r.path == TOKEN_PATH]

    def wait_for_token_requests(self, count: int, seconds: float = 10.0) -> list[MetadataRequest]:
        """Block until ``count`` token requests came (fails after ``seconds``)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.token_requests) >= count, seconds):
                raise AssertionError(f"{len(self.token_requests)} token requests, not {count}")
            return self.token_requests

    def answer(self, path: str, query: str, flavor: str | None) -> tuple[int, Any]:
        with self._changed:
            status, body = self._decide(path, flavor)
            self.requests.append(MetadataRequest(path, query, flavor, status))
            self._changed.notify_all()
        return status, body

    def _decide(self, path: str, flavor: str | None) -> tuple[int, Any]:
        if flavor != "Google":
            return 403, "Missing required header: Metadata-Flavor"
        if path == PROJECT_PATH:
            return 200, self.project
        if path != TOKEN_PATH:
            return 404, "not found"
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, "metadata server unavailable (a test's failure)"
        return 200, {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        status, body = self.server.fake.answer(path, query, self.headers.get("Metadata-Flavor"))
        if isinstance(body, dict):
            data, kind = json.dumps(body).encode(), "application/json"
        else:
            data, kind = str(body).encode(), "text/plain"
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test's requests are recorded, not printed


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeMetadataServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


@contextmanager
def running_metadata_server(fake: FakeMetadataServer) -> Iterator[FakeMetadataServer]:
    """Serve ``fake`` on a free port of 127.0.0.1 until the block ends."""
    server = _Server(fake)
    fake.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-metadata", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
