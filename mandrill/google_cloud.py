"""What every Google Cloud adapter (Pub/Sub, Compute Engine) shares: reading Google's
error bodies, sorting HTTP failures into transient and permanent, and credentials (where
they come from, and the start-up check that one access token can be had).

Imported only by those adapters (it loads aiohttp).
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import aiohttp
import anyio

from mandrill.errors import CredentialsError, one_line
from mandrill.retry import GaveUp, RetryPolicy, retry

if TYPE_CHECKING:
    from gcloud.aio.auth import Token

    from mandrill.sources.bridge import AsyncioBridge

_TRANSIENT_STATUSES: Final = frozenset({408, 429})
#: Longest error text kept from a body that is not Google's JSON (an HTML error page).
_MAX_RAW_ERROR = 300


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


def retry_after(exc: BaseException, now: Callable[[], float] = time.time) -> float | None:
    """The seconds an answer's ``Retry-After`` header asks to wait (RFC 9110: a number of
    seconds, or an HTTP date, from ``now()`` on); ``None`` without one, or with one that is
    neither. gcloud-aio raises aiohttp's ``ClientResponseError`` with the answer's headers."""
    if not isinstance(exc, aiohttp.ClientResponseError) or not exc.headers:
        return None
    value = exc.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP date is in GMT, and says so
    return max(0.0, when.timestamp() - now())


def describe_error(exc: BaseException) -> str:
    """One line for a log or an exit message, e.g. ``HTTP 404 NOT_FOUND: Topic not found``."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {google_error(exc.message)}"
    text = one_line(str(exc))
    if isinstance(exc, TimeoutError) and not text:
        text = "no response in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- credentials ------------------------------------------------------------------------------

#: How long the start-up check may take to get one access token; a daemon that cannot get
#: one fails within this, instead of retrying every request for minutes.
CREDENTIALS_CHECK_SECONDS: Final = 10.0
#: Client-side timeout of one token request during the check.
_CHECK_REQUEST_SECONDS: Final = 4
_CHECK_RETRY: Final = RetryPolicy(initial=0.5, cap=4.0, total=CREDENTIALS_CHECK_SECONDS)
_WHAT_TO_DO: Final = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run"
    " 'gcloud auth application-default login', or run on Google Cloud with a service account"
)


def _adc_path() -> str:
    # Where gcloud-aio-auth (like google-auth) looks for application default credentials.
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".config", "gcloud"
    )
    return os.path.join(config, "application_default_credentials.json")


def _metadata_host() -> str:
    # gcloud-aio-auth read GCE_METADATA_HOST (or GCE_METADATA_ROOT) when it was imported.
    from gcloud.aio.auth import token

    return urlsplit(token.GCE_METADATA_BASE).netloc


def credentials_source(service_file: str | None = None, *, why: bool = False) -> str:
    """Where gcloud-aio-auth will take credentials from, in its order, as words for a log
    or an error: the key file ``service_file`` or ``GOOGLE_APPLICATION_CREDENTIALS`` names,
    else application default credentials, else the metadata server (with ``why``: and
    what was not found before it)."""
    if service_file:
        return f"the credentials file {service_file}"
    explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return f"the credentials file {explicit} (GOOGLE_APPLICATION_CREDENTIALS)"
    adc = _adc_path()
    if os.path.exists(adc):
        return f"the application default credentials {adc}"
    metadata = f"the metadata server {_metadata_host()}"
    if not why:
        return metadata
    return (
        f"{metadata} (GOOGLE_APPLICATION_CREDENTIALS is unset, and there are no application"
        f" default credentials at {adc})"
    )


def make_token(
    session: aiohttp.ClientSession, scopes: list[str], service_file: str | None = None
) -> Token:
    """A gcloud-aio-auth token; run it on the asyncio loop that owns ``session``.

    Reads the key file named by ``service_file`` or ``GOOGLE_APPLICATION_CREDENTIALS`` now:
    raises :class:`~mandrill.errors.CredentialsError` naming it if it cannot be read or is
    no credentials file (gcloud-aio-auth's own error names neither the file nor the variable).
    """
    from gcloud.aio.auth import Token

    try:
        return Token(service_file=service_file, session=session, scopes=scopes)
    except OSError as exc:
        raise CredentialsError(
            f"cannot read {credentials_source(service_file)}: {exc.strerror or exc};"
            f" {_WHAT_TO_DO}"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsError(
            f"{credentials_source(service_file)} holds no usable credentials"
            f" ({type(exc).__name__}: {one_line(str(exc))[:200]}); {_WHAT_TO_DO}"
        ) from None


async def check_credentials(
    bridge: AsyncioBridge,
    scopes: list[str],
    *,
    service_file: str | None = None,
    on_retry: Callable[[str, BaseException, float], None] | None = None,
) -> None:
    """Get one access token, so that a daemon without credentials stops at start with one
    line instead of failing every request later.

    Retries transient failures (told to ``on_retry(source, error, delay)`` as they happen)
    for up to ``CREDENTIALS_CHECK_SECONDS``; raises
    :class:`~mandrill.errors.CredentialsError` saying what was tried and what to do if no
    token comes in that time, or at once for a permanent failure.
    """
    source = credentials_source(service_file)

    async def fetch_one() -> None:
        session = aiohttp.ClientSession()
        try:
            token = make_token(session, scopes, service_file)
            await retry(
                functools.partial(token.refresh, timeout=_CHECK_REQUEST_SECONDS),
                _CHECK_RETRY,
                transient=is_transient,
                on_retry=functools.partial(on_retry, source) if on_retry else None,
            )
        finally:
            await session.close()

    failure: str | None = None
    with anyio.move_on_after(CREDENTIALS_CHECK_SECONDS + _CHECK_REQUEST_SECONDS) as scope:
        try:
            await bridge.call(fetch_one)
        except GaveUp as exc:
            failure = f"{describe_error(exc.error)} (gave up after {exc.attempts} attempts)"
        except CredentialsError:
            raise
        except Exception as exc:  # gcloud-aio-auth raises what its HTTP client or parser did
            failure = describe_error(exc)
    if scope.cancelled_caught:
        failure = f"no token within {CREDENTIALS_CHECK_SECONDS:.0f} s"
    if failure is not None:
        raise CredentialsError(
            f"no Google Cloud access token from {credentials_source(service_file, why=True)}:"
            f" {failure}; {_WHAT_TO_DO}"
        )
