"""The ``mandrill`` command: parse, build the configuration, ``anyio.run`` the command.

Exit codes: 0 done (``run`` also after a graceful stop on SIGINT, SIGTERM or SIGHUP), 1
the service failed (one line says why), 2 bad usage or configuration, 130 SIGINT before
the daemon was up (or in another command), 141 the reader of stdout went away. SIGTERM
before the daemon's handlers are installed, or in another command, ends the process by
the signal (a shell reports 143).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import anyio

from mandrill import config
from mandrill.errors import ConfigError, MandrillError
from mandrill.obs.logs import configured_logging
from mandrill.usage import print_error, requested_log_format
from mandrill.version import version

log = logging.getLogger("mandrill.cli")

C = TypeVar("C", bound=config.CommandConfig)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, log_format: str = "auto", **kwargs: Any) -> None:
        # No abbreviations: `run --li` must not silently mean `--live`. Set here so that
        # every subparser gets it too (argparse does not pass it down).
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.log_format = log_format

    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block; `mandrill COMMAND --help` shows usage.
        print_error(f"{message} (see --help)", self.log_format)
        self.exit(2)


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


COMMANDS = {
    "run": "run the daemon (embedded demo by default)",
    "publish": "publish the talk's chaos messages to a Pub/Sub topic",
    "setup": "create the Pub/Sub topic, subscription and dead-letter topic",
    "history": "show what the ledger says was restarted, skipped, failed or dead-lettered",
    "replay": "republish saved messages from the ledger",
    "status": "show the daemons alive, the restarts under way and the hosts in cooldown",
    "explain": "would a message for HOST restart it now? if not, every rule that says no",
    "resume": "close the restart-storm breaker: every daemon of the fleet restarts again",
}


def build_parser(log_format: str = "auto") -> argparse.ArgumentParser:
    """The command line; ``log_format`` is how its usage errors are said (see
    :mod:`mandrill.usage`)."""
    parser = _Parser(
        prog="mandrill", log_format=log_format,
        description="Restart the hosts named in chaos messages from Pub/Sub (or an embedded"
        " demo broker), on asyncio or trio.",
        epilog="exit codes: 0 done (run: also after a graceful stop); 1 the service failed;"
        " 2 bad usage or configuration; 130 SIGINT before the daemon was up; 141 stdout"
        " closed by its reader; 143 SIGTERM before the daemon was up."
        " `mandrill COMMAND --help` lists a command's settings.",
    )
    parser.add_argument("--version", action="version", version=f"mandrill {version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text,
            usage=f"mandrill {name} [OPTIONS]{' HOST' if name == 'explain' else ''}",
            log_format=log_format,
            epilog="Every setting is also a MANDRILL_* environment variable and a key of the"
            " --config file; flags win over the environment, which wins over the file.",
        )
        sub.add_argument("--config", metavar="FILE", help="TOML file (flags and env win)")
        groups = {
            group: sub.add_argument_group(title) if group != "general" else sub
            for group, title in config.GROUPS.items()
        }
        for setting in config.settings_for(name):
            _add_setting(groups[setting.group], setting, name)
        if name in ("history", "replay"):
            sub.add_argument("--host", help="only this host: an instance name (with --domain)"
                             " or a full hostname")
            sub.add_argument("--since", metavar="DURATION",
                             help=f"only the last DURATION ({config.DURATION_UNITS})")
        if name == "history":
            sub.add_argument("--outcome", metavar="OUTCOMES",
                             help="only these outcomes, a comma list of "
                             + ", ".join(config.HISTORY_OUTCOMES))
            sub.add_argument("--limit", default="50", metavar="N",
                             help="rows to show (default 50)")
            sub.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "status":
            sub.add_argument("--json", action="store_true",
                             help="one JSON object per line, each with its kind (daemon,"
                             " claim, cooldown)")

        if name == "explain":
            sub.add_argument("host", nargs="?", metavar="HOST",
                             help="an instance name (with --domain) or a full hostname")
            sub.add_argument("--json", action="store_true", help="one JSON object")
        if name == "resume":
            sub.add_argument("--by", metavar="NAME",
                             help="who resumes, as the ledger records it (default $USER)")
        if name == "replay":
            sub.add_argument("--until", metavar="DURATION",
                             help=f"only messages older than DURATION ago"
                             f" ({config.DURATION_UNITS})")
            sub.add_argument("--dead-letters", action="store_true",
                             help="replay dead-lettered messages instead of received ones")
            sub.add_argument("--dry-run", action="store_true",
                             help="list the messages that would be republished; publish"
                             " nothing")
            sub.add_argument("--limit", metavar="N",
                             help="republish at most N messages, the oldest first")
            sub.add_argument("--all", action="store_true",
                             help="replay every saved message: without it, replay wants"
                             " --host, --since or --until")
    return parser


def _add_setting(
    group: argparse._ActionsContainer, setting: config.Setting, command: str
) -> None:
    """One flag of ``setting`` for ``command``; its help says what the setting means to
    that command, the default as a user would write it and, for a duration, the units."""
    notes = [f"env {setting.env}"]
    shown = setting.shown_default
    if shown is not None:
        notes.insert(0, f"default {shown}")
    units = f" ({config.DURATION_UNITS})" if setting.is_duration else ""
    # argparse %-formats help text.
    help_text = f"{setting.help_for(command)}{units} [{'; '.join(notes)}]".replace("%", "%%")
    if setting.is_boolean:
        group.add_argument(setting.flag, dest=setting.name, default=None,
                           action=argparse.BooleanOptionalAction, help=help_text)
        return
    group.add_argument(setting.flag, dest=setting.name, default=None,
                       action="append" if setting.repeat else "store",
                       metavar=setting.shown_metavar, help=help_text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    error_format = requested_log_format(argv, os.environ)
    args = build_parser(error_format).parse_args(argv)
    try:
        cfg = config.command_config(args.command, vars(args), os.environ, args.config)
    except ConfigError as exc:
        print_error(str(exc), error_format)
        return 2
    debugging = isinstance(cfg, config.RunConfig) and cfg.observability.debug
    with configured_logging(cfg.logs.log_format, "debug" if debugging else cfg.logs.log_level):
        for warning in config.unknown_variables(os.environ):
            log.warning(warning)
        code = _dispatch(cfg)
        stuck = _threads_still_blocked()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    if stuck:
        # The interpreter would join them at exit, for as long as their I/O hangs (a
        # ledger whose writes never finish): the shutdown's bound would not hold.
        sys.stderr.flush()
        os._exit(code)
    return code


#: How long threads that are ending anyway (idle worker threads) get before exit.
THREAD_EXIT_WAIT = 0.5


def _threads_still_blocked() -> int:
    """Threads that would hold the process's exit; logged with a count."""
    deadline = time.monotonic() + THREAD_EXIT_WAIT
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    for thread in others:
        if not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in others if not t.daemon and t.is_alive()]
    if stuck:
        log.warning("exiting without waiting for %d threads still blocked in I/O", len(stuck))
    return len(stuck)


def _dispatch(cfg: config.CommandConfig) -> int:
    """Run the command ``cfg`` is the configuration of (mypy checks that each command gets
    its own)."""
    from mandrill import commands

    match cfg:
        case config.RunConfig():
            return _run(commands.run, cfg)
        case config.PublishConfig():
            return _run(commands.publish, cfg)
        case config.SetupConfig():
            return _run(commands.setup, cfg)
        case config.HistoryConfig():
            return _run(commands.history, cfg)
        case config.ReplayConfig():
            return _run(commands.replay, cfg)
        case config.StatusConfig():
            return _run(commands.status, cfg)

        case config.ExplainConfig():
            return _run(commands.explain, cfg)
        case config.ResumeConfig():
            return _run(commands.resume, cfg)


def _run(command: Callable[[C], Awaitable[int]], cfg: C) -> int:
    from mandrill.obs import debug
    from mandrill.obs.profiling import profiled

    run = cfg if isinstance(cfg, config.RunConfig) else None
    debugging = run is not None and run.observability.debug
    options = debug.backend_options(cfg.backend, debugging)
    profile = run.observability.profile if run is not None else None
    if run is not None:
        from mandrill.parts import import_adapters

        import_adapters(run)
    try:
        with profiled(profile):
            return anyio.run(command, cfg, backend=cfg.backend, backend_options=options)
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:
        if profile is not None and exc.filename == profile:
            log.error("error: cannot write profile %s: %s", exc.filename, exc.strerror)
            return 2
        return _report(exc, cfg.logs.log_format)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except BaseException as exc:  # the process boundary: report, choose the exit code
        return _report(exc, cfg.logs.log_format)


#: The exit status of a command whose reader went away (`mandrill history | head`): what
#: a shell reports for a process ended by SIGPIPE, as `cat` or `grep` would be.
EXIT_BROKEN_PIPE = 128 + 13


def _reader_gone() -> int:
    """The reader of stdout closed the pipe: normal for a CLI, not an error to report.

    stdout is pointed at /dev/null so that the interpreter's final flush of what is still
    buffered does not fail again (the recipe of Python's documentation, "Note on SIGPIPE").
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _report(exc: BaseException, log_format: str) -> int:
    """One line for an error the user can act on; the traceback only at debug level.
    A configuration error is said as a bad flag is (JSON with ``--log-format json``)."""
    leaves = list(_leaves(exc))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
        return _reader_gone()
    for leaf in leaves:
        if isinstance(leaf, ConfigError):
            # The same one line as a bad flag, wherever the value was found to be wrong.
            print_error(str(leaf), log_format)
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


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
