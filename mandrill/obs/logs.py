"""Logging that never blocks the event loop: records go through a queue to a thread that
formats and writes them. Human-readable on a terminal, one JSON object per line otherwise."""

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

#: Extra fields (``extra={...}``) copied into JSON lines and shown in text lines.
CONTEXT_FIELDS = ("message_id", "host")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


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
    """Route the ``mandrill`` loggers through a queue to a writer thread for the duration.

    The writer thread is joined at exit, so every record is written before the process ends.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    fmt = choose_format(log_format, stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    root = logging.getLogger("mandrill")
    saved_level, saved_propagate = root.level, root.propagate
    queue_handler = logging.handlers.QueueHandler(records)
    root.addHandler(queue_handler)
    root.setLevel(level.upper())
    root.propagate = False
    listener.start()
    try:
        yield
    finally:
        root.removeHandler(queue_handler)
        root.setLevel(saved_level)
        root.propagate = saved_propagate
        listener.stop()
