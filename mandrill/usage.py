"""How the command line reports bad usage and bad configuration (exit code 2): one line on
stderr, a JSON object shaped like the log lines when the logs are asked to be JSON.

A usage error comes before any configuration is loaded, so the log format is read the way
the loader would read it, as far as it can be: the last ``--log-format`` of the command
line, else ``MANDRILL_LOG_FORMAT``, else the ``--config`` file's ``log_format``. Only an
explicit ``json`` gives JSON: ``auto`` (the default) keeps the plain line that a person at
a terminal and an existing script expect.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from mandrill.obs.logs import JsonFormatter

FLAG = "--log-format"
VARIABLE = "MANDRILL_LOG_FORMAT"


def requested_log_format(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The log format asked for (``auto`` when none is, or it cannot be read)."""
    given = _last_value(argv, FLAG)
    if given is None and environ.get(VARIABLE, "").strip():
        given = environ[VARIABLE]
    if given is None:
        config_file = _last_value(argv, "--config")
        if config_file is not None:
            given = _from_file(config_file)
    return str(given).strip().lower() if given is not None else "auto"


def error_line(message: str, log_format: str) -> str:
    """The one line saying ``message`` (a ConfigError's, argparse's) before exit code 2."""
    if log_format != "json":
        return f"mandrill: error: {message}"
    record = logging.LogRecord(
        "mandrill.cli", logging.ERROR, __file__, 0, "error: %s", (message,), None
    )
    record.exit_code = 2
    return JsonFormatter().format(record)


def print_error(message: str, log_format: str) -> None:
    print(error_line(message, log_format), file=sys.stderr)


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.removeprefix(flag + "=")
    return value


def _from_file(path: str) -> Any:
    """The file's log format; ``None`` when it has none or cannot be read (the loader says
    why, when it gets there)."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    table = data.get("mandrill", data)
    if not isinstance(table, dict):
        return None
    return table.get("log_format", table.get("log-format"))
