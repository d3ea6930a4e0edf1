"""What every Google Cloud adapter (Pub/Sub, Compute Engine) shares: reading Google's
error bodies, sorting HTTP failures into transient and permanent, credentials (where
they come from, and the start-up check that one access token can be had), and the default
project (where it comes from when no flag names one).

Imported only by those adapters (it loads aiohttp).
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import aiohttp
import anyio

from mandrill.errors import ConfigError, CredentialsError, one_line
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


# -- the default project ----------------------------------------------------------------------

#: Where gcloud and Google's client libraries take a default project from, in their order.
PROJECT_VARIABLES: Final = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT")
#: How long the metadata server may take to name the project. Off Google Cloud its name
#: does not resolve, or nothing answers: the daemon goes on without it after this.
METADATA_PROJECT_SECONDS: Final = 3.0
#: The longest answer read from the metadata server (a project id has at most 30 characters;
#: domain-scoped ones a few more).
_MAX_METADATA_ANSWER: Final = 256
_HOW_TO_SET: Final = (
    "set {flag}, or GOOGLE_CLOUD_PROJECT, or run on Google Cloud, where the metadata server"
    " names it (a service account key file's project_id counts too)"
)

# Project ids ("my-project-123"), optionally domain-scoped ("example.com:my-project").
_PROJECT = re.compile(r"^(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")


def check_project(project: str) -> str:
    """``project`` if it is a Google Cloud project id; raises ``ValueError`` (one line) if
    not."""
    if not _PROJECT.match(project):
        raise ValueError(f"refusing project {project[:80]!r}: not a GCE project id")
    return project


@dataclass(frozen=True)
class DefaultProject:
    """A project no flag named, and where it came from (words for a log line)."""

    project: str
    source: str


def _key_file_project() -> DefaultProject | None:
    # gcloud-aio-auth's key file (or application default credentials): a service account's
    # has project_id. One that cannot be read is said when the token is made, not here.
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or _adc_path()
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    project = data.get("project_id") if isinstance(data, dict) else None
    if not isinstance(project, str) or not project:
        return None
    return DefaultProject(project, f"the credentials file {path}")


async def _ask_metadata(url: str) -> tuple[int, str]:
    # No proxy (aiohttp ignores the proxy variables unless trust_env): the metadata server
    # is link-local, as Google's libraries reach it.
    headers = {"Metadata-Flavor": "Google"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        body = await answer.content.read(_MAX_METADATA_ANSWER)
        return answer.status, body.decode("utf-8", "replace").strip()


async def _metadata_project(bridge: AsyncioBridge, seconds: float) -> DefaultProject | str:
    """The metadata server's project, or why there is none (one line)."""
    # gcloud-aio-auth read GCE_METADATA_HOST (or GCE_METADATA_ROOT) when it was imported,
    # as it does for tokens: the project comes from the same server.
    from gcloud.aio.auth import token

    where = f"the metadata server {_metadata_host()}"
    with anyio.move_on_after(seconds):
        try:
            status, text = await bridge.call(_ask_metadata, token.GCE_ENDPOINT_PROJECT)
        except (aiohttp.ClientError, OSError) as exc:
            return f"{where}: {describe_error(exc)}"
        if status != 200:
            return f"{where}: HTTP {status} {one_line(text)[:_MAX_RAW_ERROR]}"
        if not text:
            return f"{where}: an empty answer"
        return DefaultProject(text, where)
    return f"{where}: no answer within {seconds:g} s"


async def find_default_project(
    bridge: AsyncioBridge, flag: str, *, metadata_seconds: float = METADATA_PROJECT_SECONDS
) -> DefaultProject:
    """The project to use when ``flag`` (or its variable, or the config file) names none,
    from the first of, as Google's libraries look: ``GOOGLE_CLOUD_PROJECT`` (or
    ``GCLOUD_PROJECT``), the key file's ``project_id``, the metadata server (asked through
    ``bridge``, for at most ``metadata_seconds``).

    Raises ``ConfigError`` (one line, starting with ``flag``) naming every way to set one
    and why the metadata server gave none if none does, or for a value that is no project
    id. Blocks for at most ``metadata_seconds``; cancellable.
    """
    found: DefaultProject | str | None = None
    for variable in PROJECT_VARIABLES:
        if os.environ.get(variable):
            found = DefaultProject(os.environ[variable], variable)
            break
    else:
        found = _key_file_project() or await _metadata_project(bridge, metadata_seconds)
    if isinstance(found, str):
        raise ConfigError(
            f"{flag}: no default project: {_HOW_TO_SET.format(flag=flag)} ({found})"
        )
    try:
        check_project(found.project)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {found.source}: {exc}") from None
    return found
