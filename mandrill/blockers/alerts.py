"""Block a restart while alerts fire: ``--block-on-alerts URL`` with ``--block-alert-filter``.

Just before each restart, one GET of Prometheus's ``/api/v1/alerts`` or Alertmanager's
``/api/v2/alerts`` (:func:`~mandrill.blockers.matchers.parse_alerts_url` tells which): an
alert that fires (Prometheus: ``state`` ``firing``, not ``pending``; Alertmanager:
``status.state`` ``active``, not silenced or inhibited) and matches the filter blocks. The
answer is read afresh every time, never cached: a restart goes ahead only on what the
server says at that moment. Anything else than a well-formed answer in time (an HTTP
error, no connection, a timeout, JSON of the wrong shape) blocks.

The HTTP client is httpx, as for notifications: native on asyncio and trio, pooled, and a
cancelled request is really cancelled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, cast

import anyio
import httpx

from mandrill.blockers.matchers import AlertFilter, AlertsApi, AlertsKind
from mandrill.errors import BlockerError, describe, one_line
from mandrill.message import Message

#: An answer larger than this is refused (blocks): a server gone wrong, not a list of alerts.
MAX_ANSWER_BYTES = 16 << 20
#: Alert names a reason lists before "and N more".
NAMES_SHOWN = 5
#: Connections kept to the server: workers checking at the same moment.
CONNECTIONS = 4


class AlertsBlocker:
    """Asks ``api`` for alerts; those that fire and match ``alert_filter`` block. Each check
    takes at most ``time_limit`` seconds, answer included. Use it as an async context
    manager: it holds an HTTP connection pool."""

    name = "alerts"

    def __init__(self, api: AlertsApi, alert_filter: AlertFilter, *, time_limit: float) -> None:
        if not time_limit > 0:  # also refuses NaN
            raise ValueError(f"alerts time limit must be > 0, not {time_limit}")
        self.api = api
        self.alert_filter = alert_filter
        self.time_limit = time_limit
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> AlertsBlocker:
        # Loading the CA certificates takes tens of milliseconds: not on the event loop.
        self._client = await anyio.to_thread.run_sync(self._open_client)
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(kind, error, traceback)

    def _open_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            # The whole exchange is bounded by check()'s scope: httpx's own timeouts bound
            # each read, so a server trickling its answer could hold a restart.
            timeout=None,
            limits=httpx.Limits(max_connections=CONNECTIONS,
                                max_keepalive_connections=CONNECTIONS),
            headers={"Accept": "application/json", "User-Agent": "mandrill"},
            follow_redirects=False,
        )

    async def check(self, message: Message) -> str | None:
        """``None`` when no matching alert fires, else the names of those that do. Raises
        :class:`BlockerError` when the server cannot be asked or its answer read."""
        alerts = await self.firing()
        host_filter = self.alert_filter.for_host(message.hostname, message.instance_name)
        names = [_name(labels) for labels in alerts if host_filter.matches(labels)]
        if not names:
            return None
        shown = ", ".join(sorted(set(names))[:NAMES_SHOWN])
        more = len(set(names)) - NAMES_SHOWN
        if more > 0:
            shown += f" and {more} more"
        count = f"{len(names)} firing alert" + ("s" if len(names) > 1 else "")
        return f"{count} at {self.api.shown}: {shown}"

    async def firing(self) -> list[dict[str, str]]:
        """The labels of every alert firing now; raises :class:`BlockerError`."""
        with anyio.move_on_after(self.time_limit) as scope:
            status, body = await self._get()
        if scope.cancelled_caught:
            raise BlockerError(f"no answer from {self.api.shown} within {self.time_limit:g}s")
        if status != 200:
            text = one_line(body[:200].decode(errors="replace"))
            raise BlockerError(f"HTTP {status} from {self.api.shown}"
                               + (f": {text}" if text else ""))
        try:
            document = json.loads(body)
            return _firing(self.api.kind, document)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # json's errors and the shape's: the answer is not what the API returns.
            raise BlockerError(f"unexpected answer from {self.api.shown}: {describe(exc)}"
                               ) from None

    async def _get(self) -> tuple[int, bytes]:
        if self._client is None:
            raise RuntimeError("AlertsBlocker used outside its async with")
        try:
            async with self._client.stream("GET", self.api.url) as response:
                answer = bytearray()
                # An async generator (typed as an iterator): closed here, not by the garbage
                # collector, when the answer is cut short.
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        answer += chunk
                        if len(answer) > MAX_ANSWER_BYTES:
                            raise BlockerError(f"answer from {self.api.shown} is over"
                                               f" {MAX_ANSWER_BYTES >> 20} MiB")
                return response.status_code, bytes(answer)
        except httpx.HTTPError as exc:
            raise BlockerError(f"cannot reach {self.api.shown}: {describe(exc)}") from None


def _firing(kind: AlertsKind, document: Any) -> list[dict[str, str]]:
    """The labels of the firing alerts in an API's answer; raises ``ValueError`` (or
    ``TypeError``, ``KeyError``, ``AttributeError``) for an answer of another shape."""
    if kind is AlertsKind.PROMETHEUS:
        if document.get("status") != "success":
            raise ValueError(f"status {document.get('status')!r}, error"
                             f" {document.get('error')!r}")
        alerts = document["data"]["alerts"]
        fires = [alert for alert in _list(alerts) if alert["state"] == "firing"]
    else:
        fires = [alert for alert in _list(document) if alert["status"]["state"] == "active"]
    return [_labels(alert["labels"]) for alert in fires]


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of alerts, not {type(value).__name__}")
    return value


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError("an alert's labels are not a map of strings")
    return value


def _name(labels: dict[str, str]) -> str:
    return labels.get("alertname") or "(no alertname)"

