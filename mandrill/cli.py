"""The ``mandrill`` command: parse, build the configuration, ``anyio.run`` the command.

Exit codes: 0 done, 1 the service failed (one line says why), 2 bad usage or
configuration, 130 interrupted before the daemon was up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, NoReturn

import anyio

from mandrill import config
from mandrill.errors import ConfigError, MandrillError
from mandrill.obs.logs import configured_logging

log = logging.getLogger("mandrill.cli")

Command = Callable[[Any], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block; `mandrill COMMAND --help` shows usage.
        self.exit(2, f"mandrill: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mandrill",
        description="Restart the hosts named in chaos messages from Pub/Sub (or an embedded"
        " demo broker), on asyncio or trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {
        "run": "run the daemon (embedded demo by default)",
        "publish": "publish the talk's chaos messages to a Pub/Sub topic",
        "setup": "create the Pub/Sub topic, subscription and dead-letter topic",
        "history": "show what the ledger says was restarted, skipped or failed",
        "replay": "republish saved messages from the ledger",
    }
    for name, help_text in helps.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="TOML file (flags and env win)")
        for setting in config.settings_for(name):
            env = f" [env {setting.env}; default {setting.default}]"
            if setting.switch or setting.parse is config.boolean:
                sub.add_argument(setting.flag, dest=setting.name, default=None,
                                 action=argparse.BooleanOptionalAction, help=setting.help + env)
            else:
                sub.add_argument(setting.flag, dest=setting.name, default=None,
                                 action="append" if setting.repeat else "store",
                                 metavar=setting.metavar or setting.name.upper(),
                                 help=setting.help + env)
        if name in ("history", "replay"):
            sub.add_argument("--host", help="only this hostname")
            sub.add_argument("--since", help="only the last DURATION (e.g. 1d)")
        if name == "history":
            sub.add_argument("--limit", default="50", help="rows to show (default 50)")
            sub.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "replay":
            sub.add_argument("--until", help="only messages older than DURATION ago")
            sub.add_argument("--dead-letters", action="store_true",
                             help="replay dead-lettered messages instead of received ones")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = SimpleNamespace(
            **config.load(args.command, vars(args), os.environ, args.config), args=args
        )
    except ConfigError as exc:
        print(f"mandrill: error: {exc}", file=sys.stderr)
        return 2
    level = "debug" if getattr(cfg, "debug", False) else cfg.log_level
    with configured_logging(cfg.log_format, level):
        return _run(_commands()[args.command], cfg)


def _run(command: Command, cfg: Any) -> int:
    from mandrill.obs import debug
    from mandrill.obs.profiling import profiled

    debugging = getattr(cfg, "debug", False)
    options = debug.backend_options(cfg.backend, debugging)
    try:
        with profiled(getattr(cfg, "profile", None)):
            return anyio.run(command, cfg, backend=cfg.backend, backend_options=options)
    except OSError as exc:
        if exc.filename == getattr(cfg, "profile", None):
            log.error("error: cannot write profile %s: %s", exc.filename, exc.strerror)
            return 2
        return _report(exc)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except BaseException as exc:  # the process boundary: report, choose the exit code
        return _report(exc)


def _report(exc: BaseException) -> int:
    """One line for an error the user can act on; the traceback only at debug level."""
    leaves = list(_leaves(exc))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    for leaf in leaves:
        if isinstance(leaf, ConfigError):
            # The same one line as a bad flag, wherever the value was found to be wrong.
            print(f"mandrill: error: {leaf}", file=sys.stderr)
            return 2
    for leaf in leaves:
        if isinstance(leaf, MandrillError):
            log.error("stopped: %s", leaf)
            return 1
    if isinstance(exc, SystemExit):
        raise exc
    log.error("internal error: %r (run with --log-level debug for the traceback)", leaves[0])
    log.debug("traceback", exc_info=exc)
    return 1


def _leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _commands() -> dict[str, Command]:
    from mandrill import commands

    return {
        "run": commands.run,
        "history": commands.history,
        "publish": commands.publish,
        "setup": commands.setup,
        "replay": commands.replay,
    }


def parse_since(value: str | None, flag: str) -> float | None:
    """``--since 1d`` → the epoch time one day ago."""
    if value is None:
        return None
    try:
        return datetime.now(UTC).timestamp() - config.duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def print_json_lines(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(row))
