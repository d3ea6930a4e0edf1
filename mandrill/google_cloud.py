"""What every Google Cloud adapter (Pub/Sub, Compute Engine) shares: reading Google's
error bodies, sorting HTTP failures into transient and permanent, and credentials.

Imported only by those adapters (it loads aiohttp).
"""

from __future__ import annotations

import json
from typing import Final

import aiohttp

_TRANSIENT_STATUSES: Final = frozenset({408, 429})
#: Longest error text kept from a body that is not Google's JSON (an HTML error page).
_MAX_RAW_ERROR = 300


def one_line(text: str) -> str:
    return " ".join(text.split())


def google_error(body: str | bytes) -> str:
    """One line from the body of a Google API error, e.g. ``NOT_FOUND: Topic not found``.

    Google answers ``{"error": {"code": 404, "message": "…", "status": "NOT_FOUND"}}``;
    gcloud-aio prefixes that with ``"<reason>: "``. Anything else is kept, shortened.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    for candidate in (text, text.partition(": ")[2]):
        try:
            error = json.loads(candidate)["error"]
            message = one_line(str(error["message"])) or "no message"
        except (ValueError, KeyError, TypeError):
            continue
        status = error.get("status") if isinstance(error, dict) else None
        return f"{status}: {message}" if status else message
    return one_line(text)[:_MAX_RAW_ERROR] or "no message"


def is_transient_status(status: int) -> bool:
    """HTTP 408, 429 and 5xx are worth retrying; other statuses >= 400 are permanent."""
    return status in _TRANSIENT_STATUSES or status >= 500


def http_status(exc: BaseException) -> int | None:
    """The HTTP status aiohttp (and gcloud-aio, through it) reported, else ``None``."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: HTTP 408, 429 and 5xx, connection errors, truncated
    responses and timeouts. Other HTTP statuses (400, 401, 403, 404, 409) are permanent."""
    status = http_status(exc)
    if status is not None:
        return is_transient_status(status)
    # TimeoutError and aiohttp's socket timeouts are OSErrors.
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError)


def describe_error(exc: BaseException) -> str:
    """One line for a log or an exit message, e.g. ``HTTP 404 NOT_FOUND: Topic not found``."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {google_error(exc.message)}"
    text = one_line(str(exc))
    if isinstance(exc, TimeoutError) and not text:
        text = "no response in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
