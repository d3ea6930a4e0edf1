"""The lifetime of gcloud-aio-pubsub's clients: one aiohttp session, one token, a
subscriber and a publisher, all created and closed on the asyncio bridge's loop.

Where requests go: ``emulator_host`` if given (an emulator's ``host:port``, no credentials),
else ``api_root`` (a regional endpoint, or an emulator standing in for the real service:
with credentials), else the emulator named by ``PUBSUB_EMULATOR_HOST`` (no credentials),
else the real service.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import aiohttp
import anyio
from gcloud.aio.pubsub import PublisherClient, SubscriberClient

from mandrill.google_cloud import make_token
from mandrill.sources.bridge import AsyncioBridge, open_asyncio_bridge

#: Client-side timeout of every request but a pull.
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
#: How long closing the clients may take once the caller is cancelled.
CLOSE_SECONDS: Final = 5.0
#: The scope of the clients' access tokens.
PUBSUB_SCOPES: Final = ["https://www.googleapis.com/auth/pubsub"]
EMULATOR_HOST_VARIABLE: Final = "PUBSUB_EMULATOR_HOST"


def uses_credentials(api_root: str | None, emulator_host: str | None = None) -> bool:
    """Whether calls need access tokens: never for an emulator (``emulator_host``, or
    ``PUBSUB_EMULATOR_HOST`` without an ``api_root``: gcloud-aio's convention), else always."""
    if emulator_host:
        return False
    return api_root is not None or not os.environ.get(EMULATOR_HOST_VARIABLE)


@dataclass(frozen=True, slots=True)
class Clients:
    session: aiohttp.ClientSession
    subscriber: SubscriberClient
    publisher: PublisherClient


async def _make_clients(api_root: str | None, emulator_host: str | None) -> Clients:
    # Runs on the asyncio loop: an aiohttp session binds to the loop it is created on.
    # One session (one connection pool) and one token serve both clients.
    session = aiohttp.ClientSession()
    token = make_token(session, PUBSUB_SCOPES)
    # gcloud-aio treats any api_root as a development server (no token, no TLS checks)
    # unless told otherwise: only an emulator is one.
    dev: bool | None = None
    if emulator_host:
        api_root, dev = f"http://{emulator_host}/v1", True
    elif api_root is not None:
        dev = False
    return Clients(
        session=session,
        subscriber=SubscriberClient(
            session=session, token=token, api_root=api_root, api_is_dev=dev
        ),
        publisher=PublisherClient(session=session, token=token, api_root=api_root, api_is_dev=dev),
    )


@contextlib.asynccontextmanager
async def open_clients(
    backend: str,
    bridge: AsyncioBridge | None,
    api_root: str | None,
    emulator_host: str | None = None,
) -> AsyncIterator[tuple[AsyncioBridge, Clients]]:
    """The clients, on ``bridge`` (shared, not closed) or on a bridge of their own for
    ``backend``; closing closes their session, shielded but bounded by ``CLOSE_SECONDS``."""
    async with contextlib.AsyncExitStack() as stack:
        if bridge is None:
            bridge = await stack.enter_async_context(open_asyncio_bridge(backend))
        clients = await bridge.call(_make_clients, api_root, emulator_host)
        try:
            yield bridge, clients
        finally:
            # Close even when cancelled, but never hang a shutdown on it.
            with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                await bridge.call(clients.session.close)
