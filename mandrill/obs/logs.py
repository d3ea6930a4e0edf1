"""Logging that never blocks the event loop: records go through a queue to a thread that
formats and writes them. Human-readable on a terminal, one JSON object per line otherwise.

The JSON lines carry ``severity`` as Google Cloud Logging reads it (GKE and Cloud Run
take it from stdout/stderr; without it every line lands as DEFAULT), ``level`` for
everyone else, and every ``extra={...}`` field of the record.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO

#: The loggers routed through mandrill's handler: its own, and asyncio's (its debug-mode
#: lines, "Executing <Task …> took 0.2 seconds", would otherwise go out raw through
#: logging's last-resort handler, even with --log-format json).
LOGGERS = ("mandrill", "asyncio")

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_SEVERITIES = (
    (logging.CRITICAL, "CRITICAL"),
    (logging.ERROR, "ERROR"),
    (logging.WARNING, "WARNING"),
    (logging.INFO, "INFO"),
)


def severity(record: logging.LogRecord) -> str:
    """Cloud Logging's severity for a record: DEBUG, INFO, WARNING, ERROR or CRITICAL (a
    custom level takes the nearest standard one below it)."""
    return next((name for level, name in _SEVERITIES if record.levelno >= level), "DEBUG")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "severity": severity(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in document and value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        # default=str: an extra field that JSON cannot hold still gets written, as text.
        return json.dumps(document, ensure_ascii=False, default=str)


class _Handoff(logging.handlers.QueueHandler):
    """Queues the record as it is: formatting (the message, the JSON document, a traceback)
    happens in the writer thread, not on the event loop's thread.

    The stock ``prepare`` formats every record before queueing it (about half of what a
    log call costs its caller). mandrill's log arguments are immutable values (strings,
    numbers, exceptions), so formatting them later in the writer thread writes the same
    line.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")


def choose_format(log_format: str, stream: IO[str]) -> str:
    if log_format != "auto":
        return log_format
    return "text" if stream.isatty() else "json"


@contextmanager
def configured_logging(
    log_format: str = "auto", level: str = "info", stream: IO[str] | None = None
) -> Iterator[None]:
    """Route the :data:`LOGGERS` through a queue to a writer thread for the duration.

    The writer thread is joined at exit, so every record is written before the process ends.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    fmt = choose_format(log_format, stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    queue_handler = _Handoff(records)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(queue_handler)
        logger.setLevel(level.upper())
        logger.propagate = False
    listener.start()
    try:
        yield
    finally:
        for logger, (saved_level, saved_propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(queue_handler)
            logger.setLevel(saved_level)
            logger.propagate = saved_propagate
        listener.stop()
