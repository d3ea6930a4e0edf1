"""mandrill: a structured-concurrency Pub/Sub worker that restarts the hosts its messages name."""

from mandrill.errors import (
    ConfigError,
    InvalidMessage,
    LedgerError,
    MandrillError,
    RestartFailed,
    SourceError,
)

__all__ = [
    "ConfigError",
    "InvalidMessage",
    "LedgerError",
    "MandrillError",
    "RestartFailed",
    "SourceError",
]
