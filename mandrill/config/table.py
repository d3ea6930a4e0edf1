"""The one table of settings (:data:`SETTINGS`): each setting's name, parser, default, help,
``--help`` group and the commands that take it. The CLI's flags, the ``MANDRILL_*``
variables and the TOML keys all come from it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mandrill.config.values import (
    Choice,
    alert_filter,
    alerts_url,
    api_root,
    blocker_command,
    boolean,
    choice,
    dates,
    dates_file,
    domain,
    duration,
    fraction,
    group_by,
    http_addr,
    is_duration,
    limit_or_forever,
    new_file,
    notify_headers,
    notify_template,
    optional,
    optional_count,
    optional_int,
    optional_ms,
    optional_positive_duration,
    optional_positive_int,
    optional_rate,
    optional_text,
    patterns,
    positive_duration,
    positive_int,
    show,
    text,
    zone,
)
from mandrill.message import DEFAULT_DOMAIN
from mandrill.policy import Outcome
from mandrill.safety import parse_hours, parse_weekdays

ENV_PREFIX = "MANDRILL_"

#: What ``history --outcome`` accepts: the ledger's restart outcomes and dead letters.
HISTORY_OUTCOMES = (*(outcome.value for outcome in Outcome), "dead_letter")


@dataclass(frozen=True)
class Setting:
    """One setting: its flag, variable and TOML key come from ``name``; ``parse`` turns any
    of their values into the setting's type or raises ``ValueError``."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    #: The commands that take this setting.
    commands: frozenset[str]
    metavar: str | None = None
    #: A boolean switch (``--live``) rather than a flag taking a value.
    switch: bool = False
    #: Where ``--help`` lists it (see :data:`GROUPS`).
    group: str = "general"
    #: A flag that may be given several times; the parser receives the list.
    repeat: bool = False
    #: ``(command, help)``: what the setting means to a command, where commands differ
    #: (``--count`` stops ``run``, sizes ``publish``); else ``help``.
    per_command: tuple[tuple[str, str], ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_boolean(self) -> bool:
        return self.switch or self.parse is boolean

    @property
    def shown_metavar(self) -> str:
        """``{asyncio,trio}`` for a choice, else the table's metavar or the value's kind."""
        if isinstance(self.parse, Choice):
            return "{" + ",".join(self.parse.options) + "}"
        if self.metavar is not None:
            return self.metavar
        if self.is_duration:
            return "DURATION"
        kinds: dict[Callable[[object], Any], str] = {
            positive_int: "N", optional_positive_int: "N",
            optional_int: "N", fraction: "FRACTION", optional_count: "N",
        }
        return kinds.get(self.parse, self.name.upper())

    def help_for(self, command: str) -> str:
        """What ``command``'s ``--help`` says of this setting."""
        return dict(self.per_command).get(command, self.help)

    @property
    def is_duration(self) -> bool:
        return is_duration(self.parse)

    @property
    def choices(self) -> tuple[str, ...]:
        return self.parse.options if isinstance(self.parse, Choice) else ()

    @property
    def shown_default(self) -> str | None:
        """The default as a user writes it (``7d``, ``on``), or ``None`` when there is
        none to show (unset, an empty list, a switch that is off)."""
        return show(self.default, self.parse)


RUN = frozenset({"run"})
PUBSUB = frozenset({"run", "publish", "setup", "replay"})
#: Settings of the subscription: publish and replay only send to the topic.
SUBSCRIPTION = frozenset({"run", "setup"})
#: The topic: run pulls from the subscription and never publishes.
TOPIC = frozenset({"publish", "setup", "replay"})
LEDGER = frozenset({"run", "history", "replay", "status", "explain"})
ALL = frozenset(
    {"run", "publish", "setup", "history", "replay", "status", "explain", "resume"}
)
#: What ``status`` needs to tell a live daemon and a host in cooldown, as ``run`` does.
RUN_AND_STATUS = frozenset({"run", "status"})
#: What ``explain`` checks a host against: the daemon's own settings of its decisions.
DECIDES = RUN | {"explain"}

#: The groups of ``--help``, in order; "general" is argparse's own list of options.
GROUPS = {
    "general": "options",
    "source": "source (where messages come from)",
    "ledger": "ledger (what was decided, shared by a fleet)",
    "restarter": "restarter (how hosts are restarted)",
    "safety": "safety (which restarts may go ahead)",
    "blockers": "blockers (asked just before each restart; a no, or an error, defers it)",
    "shutdown": "shutdown",
    "notifications": "notifications",
    "observability": "observability (logs, metrics, health, debugging)",
}


def _s(name: str, parse: Callable[[object], Any], default: Any, help: str,
       commands: frozenset[str], metavar: str | None = None, switch: bool = False,
       repeat: bool = False, *, group: str,
       per_command: dict[str, str] | None = None) -> Setting:
    return Setting(name, parse, default, help, commands, metavar, switch, group, repeat,
                   tuple((per_command or {}).items()))


SETTINGS: tuple[Setting, ...] = (
    _s("backend", choice("asyncio", "trio"), "asyncio", "event loop to run on", ALL,
       group="general"),
    _s("max_in_flight", positive_int, 256, "messages held at once (backpressure)", RUN,
       group="general"),
    _s("count", optional_positive_int, None,
       "run: stop after N messages are done; publish: publish N messages",
       frozenset({"run", "publish"}), "N", group="general", per_command={
           "run": "stop gracefully once N messages are done (acked: decided, or"
                  " dead-lettered), then exit 0; unset: run until stopped",
           "publish": "publish N messages, then exit; unset: publish until stopped",
       }),
    # -- source --
    _s("source", choice("memory", "pubsub"), "memory",
       "memory: the embedded in-process broker; pubsub: Google Cloud Pub/Sub",
       RUN, group="source"),
    _s("project", optional_text, None, "Google Cloud project (pubsub)", PUBSUB, group="source"),
    _s("subscription", text, "mandrill", "Pub/Sub subscription to pull from",
       SUBSCRIPTION, group="source"),
    _s("topic", text, "mandrill", "Pub/Sub topic to publish to", TOPIC, group="source"),
    _s("dead_letter_topic", optional_text, None,
       "topic receiving invalid and poison messages", SUBSCRIPTION, group="source"),
    _s("pubsub_api_root", api_root, None,
       "Pub/Sub endpoint, e.g. a regional https://europe-west1-pubsub.googleapis.com"
       " (default: PUBSUB_EMULATOR_HOST's emulator, without credentials, else the global"
       " endpoint); always used with credentials", PUBSUB, "URL", group="source"),
    _s("ack_deadline", duration, 10.0,
       "run: the embedded broker's ack deadline; setup: the subscription's (10s to 600s)",
       frozenset({"run", "setup"}), group="source", per_command={
           "run": "--source memory only: how long the embedded broker waits for an ack"
                  " before it redelivers a message (mandrill extends the lease while it"
                  " works); with --source pubsub the subscription's own deadline applies,"
                  " set by `mandrill setup --ack-deadline`",
           "setup": "the subscription's ack deadline, 10s to 600s: how long Pub/Sub waits"
                    " for an ack before it redelivers a message (the daemon extends the"
                    " lease while it works)",
       }),
    _s("max_delivery_attempts", positive_int, 10,
       "setup: deliveries after which Pub/Sub forwards a message to the dead-letter topic",
       frozenset({"setup"}), group="source"),
    _s("max_lease", duration, 3600.0, "longest a message is kept leased while worked on", RUN,
       group="source"),
    _s("source_outage_limit", limit_or_forever, math.inf,
       "how long Pub/Sub may fail before the daemon stops (exit 1); meanwhile it retries"
       " with backoff and /readyz says not ready (forever: never stop)", RUN,
       group="source"),
    _s("publish", boolean, True, "embedded demo: run the talk's publisher in-process", RUN,
       group="source"),
    _s("rate", optional_rate, 20.0,
       "messages per second the publisher sends (0: as fast as possible)",
       frozenset({"run", "publish"}), "PER_SECOND", group="source", per_command={
           "run": "embedded demo (--source memory --publish): messages per second its"
                  " publisher sends (0: as fast as possible)",
           "publish": "messages per second to publish (0: as fast as possible)",
       }),
    _s("seed", optional_int, None, "random seed for the simulated parts", RUN | {"publish"},
       group="source", per_command={
           "run": "random seed of the simulated parts (the embedded publisher's hosts, the"
                  " simulated restarter's latencies and failures)",
           "publish": "random seed of the hosts the published messages name",
       }),
    # -- ledger --
    _s("ledger", text, "mandrill.db",
       "SQLite file (or :memory:), or postgresql://… for a fleet", LEDGER | {"resume"}, "URL",
       group="ledger"),
    _s("ledger_outage_limit", duration, 60.0,
       "how long the ledger may be unreachable before the daemon stops", RUN, group="ledger"),
    _s("outcome_journal", text, "auto",
       "file keeping restart outcomes while the ledger is unreachable (auto: beside a"
       " SQLite ledger; $XDG_STATE_HOME/mandrill/ for PostgreSQL)", RUN, "PATH",
       group="ledger"),
    _s("instance_timeout", positive_duration, 30.0,
       "a daemon silent in the ledger this long is dead: its restart claims are resolved as"
       " 'unknown' by the others (it heartbeats 6 times as often)", DECIDES | RUN_AND_STATUS,
       group="ledger"),
    _s("retry_unknown", boolean, False,
       "restart again a host whose restart outcome is unknown (its daemon died mid-restart)"
       " instead of counting it as restarted", DECIDES | RUN_AND_STATUS, group="ledger"),
    # -- restarter --
    _s("restarter", choice("simulated", "command", "gce"), "simulated",
       "how hosts are restarted", DECIDES, group="restarter"),
    _s("domain", domain, DEFAULT_DOMAIN, "DNS domain appended to instance names", LEDGER,
       group="restarter"),
    _s("max_attempts", positive_int, 5,
       "failed restarts of one message before it is dead-lettered", RUN, group="restarter"),
    _s("restart_latency", duration, 0.5,
       "simulated restarter: restarts take up to this long", RUN, group="restarter"),
    _s("restart_failure_rate", fraction, 0.1,
       "simulated restarter: share of restarts that fail", RUN, group="restarter"),
    _s("restart_command", optional_text, None,
       "command restarter: argv template, e.g. 'ssh {hostname} sudo systemctl reboot'", RUN,
       group="restarter"),
    _s("restart_timeout", duration, 60.0, "command restarter: kill a restart after this", RUN,
       group="restarter"),
    _s("gce_project", optional_text, None, "gce restarter: project (else the message's)", RUN,
       group="restarter"),
    _s("gce_zone", optional_text, None, "gce restarter: zone (else the message's)", RUN,
       group="restarter"),
    _s("gce_api_root", text, "https://compute.googleapis.com/compute/v1",
       "gce restarter: Compute Engine API root", RUN, "URL", group="restarter"),
    # -- safety controls --
    _s("live", boolean, False,
       "really restart with a real restarter (command, gce); without it they dry-run", DECIDES,
       group="safety"),
    _s("dry_run", boolean, False, "decide and record, restart nothing (any restarter)", DECIDES,
       group="safety"),
    _s("min_restart_interval", duration, 7 * 86400.0,
       "do not restart a host restarted more recently than this", DECIDES | RUN_AND_STATUS,
       group="safety"),
    _s("exclude", patterns, (), "never restart hosts matching these globs (comma list)",
       DECIDES, "GLOBS", group="safety"),
    _s("only", patterns, (), "restart only hosts matching these globs (comma list)",
       DECIDES, "GLOBS", group="safety"),
    _s("weekdays", optional(parse_weekdays), None,
       "restart only on these days, e.g. mon-fri", DECIDES, "DAYS", group="safety"),
    _s("hours", optional(parse_hours), (),
       "restart only in these hours, e.g. 09:00-17:00", DECIDES, "HH:MM-HH:MM", group="safety"),
    _s("skip_dates", dates, frozenset(),
       "never restart on these dates, e.g. 2026-12-24,2026-12-31 (in --timezone)", DECIDES,
       "DATES", group="safety"),
    _s("skip_dates_file", dates_file, frozenset(),
       "never restart on the dates of this file: one YYYY-MM-DD a line, # comments"
       " (in --timezone; read at start)", DECIDES, "PATH", group="safety"),
    _s("timezone", zone, "UTC", "time zone of --weekdays, --hours and the skip dates", DECIDES,
       "ZONE", group="safety"),
    _s("max_concurrent_restarts", optional_positive_int, None,
       "restarts under way at once in this daemon", DECIDES, "N", group="safety"),
    _s("max_restarts", optional_positive_int, None,
       "fleet rate limit: restarts per --max-restarts-window across all daemons", DECIDES, "N",
       group="safety"),
    _s("max_restarts_window", duration, 3600.0, "fleet rate limit window", DECIDES,
       group="safety"),
    _s("breaker_failures", optional_count, None,
       "restart-storm breaker: when more than N restarts fail within --breaker-window,"
       " across all daemons, every daemon stops restarting (messages are deferred) until"
       " `mandrill resume` (off unless given)", DECIDES, group="safety"),
    _s("breaker_unknown", optional_count, None,
       "restart-storm breaker: the same when more than N restarts end with an unknown"
       " outcome (their daemon died mid-restart)", DECIDES, group="safety"),
    _s("breaker_window", optional_positive_duration, None,
       "restart-storm breaker: the window the failures are counted in (1h unless given)",
       DECIDES, group="safety"),
    _s("group_by", group_by, None,
       "groups of hosts for --max-concurrent-restarts-per-group: attribute:NAME (a message"
       " attribute, e.g. attribute:zone) or pattern:REGEX (its one capture group in the host"
       " name, e.g. 'pattern:^[^.]+\\.([^.]+)\\.')", DECIDES,
       "attribute:NAME|pattern:REGEX", group="safety"),
    _s("max_concurrent_restarts_per_group", optional_positive_int, None,
       "restarts under way at once in each --group-by group, across all daemons", DECIDES,
       "N", group="safety"),
    # -- blockers --
    _s("block_on_alerts", alerts_url, None,
       "hold restarts back while matching alerts fire: Prometheus's …/api/v1/alerts,"
       " Alertmanager's …/api/v2/alerts, or prometheus+http://HOST:PORT,"
       " alertmanager+http://HOST:PORT", DECIDES, "URL", group="blockers"),
    _s("block_alert_filter", alert_filter, None,
       "the alerts that block, as label matchers, e.g."
       " 'alertname=~\"Node.*\",severity=\"critical\"' ({hostname} and {instance_name}"
       " stand for the host; default: every firing alert)", DECIDES, "MATCHERS",
       group="blockers"),
    _s("block_on_command", blocker_command, None,
       "run this before each restart (argv template with {hostname} {instance_name}; also"
       " MANDRILL_HOSTNAME in its environment); a non-zero exit holds the restart back", DECIDES,
       "COMMAND", group="blockers"),
    _s("block_timeout", positive_duration, 10.0,
       "a blocker that does not answer within this blocks", DECIDES, "DURATION",
       group="blockers"),
    # -- shutdown --
    _s("grace", duration, 10.0, "time in-flight work gets to finish at shutdown", RUN,
       group="shutdown"),
    _s("settle_timeout", duration, 5.0,
       "bound on the final nack/ack flush at shutdown", RUN, group="shutdown"),
    # -- notifications --
    _s("notify_url", optional_text, None,
       "POST a JSON document for every restart and skip to this URL", RUN, "URL",
       group="notifications"),
    _s("notify_header", notify_headers, (),
       "notifications: a request header; ${VAR} takes VAR from the environment (repeat the"
       " flag for more; one per line in the environment variable; a list in TOML)",
       RUN, "NAME=VALUE", repeat=True, group="notifications"),
    _s("notify_template", notify_template, None,
       "notifications: the body, a JSON document (or @FILE holding one) whose strings may"
       " hold {host} {message_id} {outcome} {detail} {time}", RUN, "JSON|@FILE",
       group="notifications"),
    _s("notify_timeout", positive_duration, 10.0,
       "notifications: bound on one POST, answer included", RUN, group="notifications"),
    # -- observability --
    _s("log_format", choice("auto", "text", "json"), "auto",
       "log format; auto: text on a terminal, JSON otherwise", ALL, group="observability"),
    _s("log_level", choice("debug", "info", "warning", "error"), "info", "log level", ALL,
       group="observability"),
    _s("metrics_addr", http_addr, None,
       "serve /metrics, /healthz, /readyz on HOST:PORT, and the status page (/status) unless"
       " --status-addr is given (off unless given)", RUN, "HOST:PORT", group="observability"),
    _s("status_addr", http_addr, None,
       "serve the status page (/status, /status.json, /explain?host=) on HOST:PORT rather"
       " than on --metrics-addr (off unless one of them is given)", RUN, "HOST:PORT",
       group="observability"),
    _s("debug", boolean, False,
       "asyncio debug mode / trio step timing, slow steps from 20 ms, debug logs", RUN,
       group="observability"),
    _s("slow_callback_ms", optional_ms, None,
       "report steps that block the event loop longer than this many milliseconds (0: off;"
       " default 100)",
       RUN, "MS", group="observability"),
    _s("profile", new_file, None, "write cProfile stats to FILE when the daemon stops",
       RUN, "FILE", group="observability"),
)

BY_NAME = {s.name: s for s in SETTINGS}


def settings_for(command: str) -> list[Setting]:
    return [s for s in SETTINGS if command in s.commands]
