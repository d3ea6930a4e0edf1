"""Restart a Compute Engine instance with the Compute API's ``instances.reset``.

A reset is a hard power-cycle. Each message's reset carries a ``requestId`` derived from
its message id, so that a redelivered or retried message is recognised by Compute Engine
and never resets the instance twice. The operation it returns is then waited on until it is
``DONE``.

aiohttp and gcloud-aio-auth belong to asyncio: the session, the token and every request go
through the :class:`~mandrill.sources.bridge.AsyncioBridge`, so that this runs on trio too.
"""

from __future__ import annotations

import json
import re
import uuid
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import quote

import aiohttp
import anyio

from mandrill.errors import RestartFailed
from mandrill.google_cloud import (
    check_project,
    describe_error,
    google_error,
    is_transient,
    is_transient_status,
    make_token,
)
from mandrill.message import Message
from mandrill.retry import GaveUp, RetryPolicy, retry
from mandrill.sources.bridge import AsyncioBridge

DEFAULT_API_ROOT = "https://compute.googleapis.com/compute/v1"
#: Narrower than cloud-platform: enough for instances.reset and zoneOperations.wait.
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"

#: Pause between two ``operations.wait`` calls that returned before the operation was done.
DEFAULT_POLL_INTERVAL = 1.0
#: Retries of one API call on a 5xx, 429 or connection error: four tries at most, with
#: jittered pauses from up to 0.5 s, doubling.
DEFAULT_RETRY = RetryPolicy(initial=0.5, cap=8.0, total=60.0, attempts=4)
#: Per-request limits: ``operations.wait`` may hold a request for up to two minutes.
REQUEST_SECONDS = 30.0
WAIT_REQUEST_SECONDS = 150.0

#: How long closing the HTTP session may take once the caller is cancelled.
CLOSE_SECONDS = 5.0

# Fixed forever: changing it would let a redelivered message reset its instance again.
_REQUEST_ID_NAMESPACE = uuid.UUID("6f1c1d0e-3b7a-5b8e-9a52-8d0f3c1e6a21")

# Compute Engine resource names (RFC 1035, lower case).
_RESOURCE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class GceSettingError(ValueError):
    """A restarter setting is invalid; ``setting`` names it (project, zone, api_root)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_zone(zone: str) -> str:
    """``zone`` if it is a GCE zone name; raises ``ValueError`` (one line) if not."""
    if not _RESOURCE.match(zone):
        raise ValueError(f"refusing zone {zone[:80]!r}: not a GCE zone name")
    return zone


class _HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {google_error(body)}")
        self.status = status


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, _HttpError):
        return is_transient_status(exc.status)
    return isinstance(exc, aiohttp.ClientError | OSError) and is_transient(exc)


class TokenSource(Protocol):
    """What the restarter needs of a ``gcloud.aio.auth.Token``; awaited on the asyncio side."""

    async def get(self) -> str | None: ...


def request_id(message_id: str) -> str:
    """The ``requestId`` of the reset for ``message_id``: the same UUID on every retry."""
    return str(uuid.uuid5(_REQUEST_ID_NAMESPACE, message_id))


async def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _post(
    session: aiohttp.ClientSession, url: str, token: str, limits: aiohttp.ClientTimeout
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"}
    # An explicit empty body makes aiohttp send Content-Length: 0; Google answers a POST
    # without it with 411.
    async with session.post(url, data=b"", headers=headers, timeout=limits) as response:
        return response.status, await response.read()


def _operation_error(operation: dict[str, Any]) -> str | None:
    error = operation.get("error")
    if not error:
        return None
    errors = error.get("errors", []) if isinstance(error, dict) else []
    messages = [
        str(item.get("message") or item.get("code")) for item in errors if isinstance(item, dict)
    ]
    return "; ".join(messages) or str(operation.get("httpErrorMessage") or "unknown error")


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _HttpError) else describe_error(exc)


class GceRestarter:
    """Resets the Compute Engine instance named by a message's ``instance_name``.

    The project and zone come from the message attributes ``project`` and ``zone``, else
    from ``project`` / ``zone`` here. A default project is required (a restarter without
    one would fail every message that lacks the attribute; where it comes from when no flag
    names it is :func:`mandrill.google_cloud.find_default_project`'s to say); a default
    zone is not, as a fleet spans zones, but then every message must name its zone.
    Credentials are gcloud-aio-auth's (``service_file``, else the application default
    credentials); tests inject ``token`` instead.

    Constructing raises :class:`GceSettingError` for a missing or malformed project, a
    malformed zone or API root. Use it as an async context manager: entering opens the
    HTTP session on the bridge's asyncio loop and reads the credentials
    (:class:`~mandrill.errors.CredentialsError` if the key file cannot be read); leaving
    closes the session (shielded). Leave before the bridge closes.
    """

    def __init__(
        self,
        bridge: AsyncioBridge,
        *,
        project: str,
        zone: str | None = None,
        api_root: str = DEFAULT_API_ROOT,
        token: TokenSource | None = None,
        service_file: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if not api_root.startswith(("https://", "http://")):
            raise GceSettingError("api_root", f"GCE API root {api_root!r} is not an http(s) URL")
        if not project:
            raise GceSettingError("project", "no project")
        checks = (("project", project, check_project), ("zone", zone, check_zone))
        for setting, value, check in checks:
            try:
                if value:
                    check(value)
            except ValueError as exc:
                raise GceSettingError(setting, str(exc)) from None
        self.project = project
        self.zone = zone
        self.api_root = api_root.rstrip("/")
        self.poll_interval = poll_interval
        self.retry = retry
        self._bridge = bridge
        self._token = token
        self._service_file = service_file
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = await self._bridge.call(_new_session)
        if self._token is None:
            try:
                self._token = make_token(self._session, [COMPUTE_SCOPE], self._service_file)
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                await self._bridge.call(session.close)

    async def restart(self, message: Message) -> str:
        """Reset the instance and wait until the reset operation is done.

        Returns ``"operation <name>"``. Raises :class:`RestartFailed` for a missing or
        invalid project, zone or instance name (nothing is sent), a 4xx answer, a 5xx or
        connection error that outlasts the retries, a token that cannot be had, or an
        operation that ends in error. Blocks until the operation is done; cancellable.
        """
        base = self._zone_url(message)
        instance = message.instance_name.lower()
        if not _RESOURCE.match(instance):
            raise RestartFailed(f"refusing instance name {instance[:80]!r}: not a GCE name")
        reset_url = f"{base}/instances/{instance}/reset?requestId={request_id(message.message_id)}"
        operation = await self._call(reset_url, REQUEST_SECONDS)
        name = str(operation.get("name", ""))
        wait_url = f"{base}/operations/{quote(name, safe='')}/wait"
        while operation.get("status") != "DONE":
            if not name:
                raise RestartFailed("reset answered without an operation name")
            operation = await self._call(wait_url, WAIT_REQUEST_SECONDS)
            if operation.get("status") != "DONE":
                await anyio.sleep(self.poll_interval)
        error = _operation_error(operation)
        if error is not None:
            raise RestartFailed(f"operation {name} failed: {error}")
        return f"operation {name}"

    def _zone_url(self, message: Message) -> str:
        project = message.attributes.get("project") or self.project
        zone = message.attributes.get("zone") or self.zone
        if not project:
            raise RestartFailed("no project: set --gce-project or the attribute 'project'")
        if not zone:
            raise RestartFailed("no zone: set --gce-zone or the attribute 'zone'")
        try:
            return f"{self.api_root}/projects/{check_project(project)}/zones/{check_zone(zone)}"
        except ValueError as exc:
            raise RestartFailed(str(exc)) from None

    async def _call(self, url: str, seconds: float) -> dict[str, Any]:
        """POST ``url`` with retries (:data:`DEFAULT_RETRY`); its JSON object, or
        :class:`RestartFailed`."""
        session = self._session
        if session is None or self._token is None:
            raise RuntimeError("GceRestarter used outside 'async with'")
        limits = aiohttp.ClientTimeout(total=seconds)

        async def attempt() -> dict[str, Any]:
            token = await self._get_token()
            status, body = await self._bridge.call(_post, session, url, token, limits)
            if status >= 400:
                raise _HttpError(status, body)
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise RestartFailed(f"HTTP {status}: the answer is not a JSON object")
            return document

        try:
            return await retry(attempt, self.retry, transient=_is_transient)
        except GaveUp as exc:
            raise RestartFailed(
                f"{_describe(exc.error)} (gave up after {exc.attempts} attempts)"
            ) from exc.error
        except (_HttpError, aiohttp.ClientError, OSError) as exc:
            raise RestartFailed(_describe(exc)) from exc

    async def _get_token(self) -> str:
        assert self._token is not None
        try:
            token = await self._bridge.call(self._token.get)
        except Exception as exc:
            # gcloud-aio-auth raises whatever its HTTP client or JSON parsing raised.
            raise RestartFailed(f"no access token: {type(exc).__name__}: {exc}") from exc
        if not token:
            raise RestartFailed("no access token")
        return token
