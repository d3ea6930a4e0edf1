"""The exceptions mandrill raises, named by meaning so that callers can catch them."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with each run of whitespace (newlines too) as one space: what goes into a
    log line or an error's one line."""
    return " ".join(text.split())


def describe(exc: BaseException) -> str:
    """``exc``'s message as one line, or its type's name when it has none."""
    return one_line(str(exc)) or type(exc).__name__


class MandrillError(Exception):
    """Base of every error mandrill raises on purpose."""


class ConfigError(MandrillError):
    """A flag, environment variable or config file value is invalid (exit code 2)."""


class CredentialsError(ConfigError):
    """No usable Google Cloud credentials: a key file that cannot be read, or no token to
    be had at start (exit code 2, like any configuration error)."""


class InvalidMessage(MandrillError):
    """A message payload cannot be processed; ``reason`` says why, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RestartFailed(MandrillError):
    """A host restart did not succeed; the message is nacked so that it is redelivered."""


class BlockerError(MandrillError):
    """A blocker cannot tell whether a restart may go ahead (its server answers an error, or
    nothing in time; its command cannot run): the restart is blocked, failing closed."""


class SourceError(MandrillError):
    """The message source is gone past its retries, or refuses us for good (403, 404)."""


class LedgerError(MandrillError):
    """The ledger cannot be reached or written."""


class LedgerPathError(ConfigError, LedgerError):
    """The SQLite ledger's path cannot be used as it is (a directory that is not writable,
    a file that cannot be read, or is not SQLite): the configuration's to fix (exit 2)."""
