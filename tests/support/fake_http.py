"""A fake HTTP server in the test's own task group (anyio, so on either backend): it answers
every request with what it is told, or never answers at all."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream


@dataclass
class FakeHttpServer:
    """Answers ``status`` with ``body``; with ``hang``, reads the request and says nothing."""

    status: int = 200
    body: bytes = b""
    hang: bool = False
    port: int = 0
    #: Request lines seen (``GET /api/v1/alerts HTTP/1.1``).
    requests: list[str] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            buffered = BufferedByteReceiveStream(stream)
            with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead,
                                     anyio.BrokenResourceError):
                head = await buffered.receive_until(b"\r\n\r\n", 65536)
                self.requests.append(head.split(b"\r\n", 1)[0].decode())
                if self.hang:
                    await anyio.sleep_forever()
                await stream.send(
                    f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n".encode()
                    + self.body
                )


@contextlib.asynccontextmanager
async def serving(server: FakeHttpServer) -> AsyncIterator[FakeHttpServer]:
    """Serve on 127.0.0.1 (a free port, in ``server.port``) until the block ends."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server._handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()
