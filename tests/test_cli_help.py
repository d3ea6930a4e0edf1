"""What ``mandrill COMMAND --help`` says of each flag, read from the parser itself (no
process): units of every duration, the meaning of a shared flag for each command."""

from __future__ import annotations

import argparse
import contextlib

import pytest

from mandrill import config
from mandrill.cli import COMMANDS, build_parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings]


def takes_durations(action: argparse.Action) -> bool:
    """Found by behaviour, not by a list: a setting whose parser reads ``90s`` and
    ``250ms`` as seconds, or a command's own flag whose value is a DURATION."""
    setting = config.BY_NAME.get(action.dest)
    if setting is None:
        return action.metavar == "DURATION"
    with contextlib.suppress(ValueError, TypeError):
        return bool(setting.parse("90s") == 90 and setting.parse("250ms") == 0.25)
    return False


def test_the_parsers_are_every_command():
    assert set(command_parsers()) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_duration_says_its_units(command):
    durations = [a for a in flags_of(command_parsers()[command]) if takes_durations(a)]
    for action in durations:
        assert action.help is not None
        assert config.DURATION_UNITS in action.help, action.option_strings
        assert "seconds" in action.help
        assert action.metavar == "DURATION", action.option_strings
    if command == "run":  # the test is not vacuous
        assert len(durations) >= 10


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_number_of_milliseconds_says_so(command):
    for action in flags_of(command_parsers()[command]):
        if action.dest.endswith("_ms"):
            assert action.help is not None
            assert "milliseconds" in action.help


def test_a_duration_default_is_shown_as_written():
    assert config.BY_NAME["instance_timeout"].shown_default == "30s"
    assert config.BY_NAME["notify_timeout"].shown_metavar == "DURATION"


def help_of(command: str, flag: str) -> str:
    (action,) = [a for a in flags_of(command_parsers()[command]) if flag in a.option_strings]
    return " ".join((action.help or "").split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_flag_shared_by_commands_explains_itself_to_each(command):
    """No ``run: …; publish: …`` help: each command says what the flag does there."""
    others = [other for other in COMMANDS if other != command]
    for action in flags_of(command_parsers()[command]):
        for other in others:
            assert f"{other}: " not in (action.help or ""), (command, action.option_strings)


def test_count_per_command():
    run, publish = help_of("run", "--count"), help_of("publish", "--count")
    assert run.startswith("stop gracefully once N messages are done")
    assert "until stopped" in run
    assert publish.startswith("publish N messages, then exit")
    assert "until stopped" in publish


def test_ack_deadline_per_command():
    run, setup = help_of("run", "--ack-deadline"), help_of("setup", "--ack-deadline")
    assert run.startswith("--source memory only:")
    assert "mandrill setup --ack-deadline" in run
    assert setup.startswith("the subscription's ack deadline, 10s to 600s")
    assert "--source memory" not in setup
    for text in (run, setup):
        assert config.DURATION_UNITS in text
