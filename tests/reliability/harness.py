"""What the scenarios stand on: daemons as real processes, the Pub/Sub emulator (the shared
one, or one of a scenario's own behind a gate it can cut), PostgreSQL schemas and roles, and
the ledger's verdict on a run.

Nothing here decides what a scenario proves; it starts things, stops them, and reads what
happened. Every wait is a poll or a log line with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import psycopg
from anyio.abc import Process, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from psycopg import sql

from mandrill.sources.pubsub import open_pubsub_source, open_pubsub_topic, setup_pubsub
from tests.fixtures.emulator import PubSubNames, stop_emulator
from tests.support.net import answers, free_port

T = TypeVar("T")
LogLine = dict[str, Any]

#: Outcomes and statuses that end a message's story (the brief's "processed"). ``unknown``
#: is a dead daemon's claim resolved by another one: settled, counted as a restart.
FINAL_OUTCOMES = ("restarted", "skipped", "dry_run", "unknown")
#: Longest log line read (JSON lines of mandrill are short; this only bounds a runaway).
MAX_LINE_BYTES = 16 * 1024 * 1024
#: How long a freshly started emulator may take to answer (a cold JVM on a busy box).
EMULATOR_START_SECONDS = 90.0
#: The ack deadline the scenarios' subscriptions use unless expiry is the point: long
#: enough that a lease is never lost to a slow box, short enough to redeliver a dead pull.
LEASED_SECONDS = 60
#: Pub/Sub's minimum ack deadline: for the scenarios whose point is redelivery by expiry.
MIN_ACK_DEADLINE = 10


# -- failures the suite tells apart ------------------------------------------------------


class DaemonExited(AssertionError):
    """A daemon that should have kept running exited (a crash, for these scenarios)."""


class Misjudged(AssertionError):
    """A payload was taken for valid when it is not, or the other way round."""


@contextlib.contextmanager
def plain_errors() -> Iterator[None]:
    """Re-raise a task group's lone error as itself, so that a test can name its type
    (``xfail(raises=...)``); several errors stay a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


# -- polling ------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    seconds: float,
    what: str,
    interval: float = 0.25,
    describe: Callable[[], Awaitable[str]] | None = None,
) -> T:
    """Call ``check`` until it returns something other than ``None``/``False``; fails with
    ``what`` (and ``describe()``) after ``seconds``."""
    deadline = anyio.current_time() + seconds
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if anyio.current_time() > deadline:
            detail = await describe() if describe is not None else ""
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}. {detail}")
        await anyio.sleep(interval)


# -- daemons as processes -----------------------------------------------------------------


def mandrill_env(emulator: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a mandrill process: ours without any ``MANDRILL_*`` setting (a
    developer's own must not change a scenario), pointed at ``emulator``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANDRILL_")}
    env["PUBSUB_EMULATOR_HOST"] = emulator
    env.update(extra or {})
    return env


class Daemon:
    """A ``mandrill`` process whose JSON log lines are read as they come (so that a full
    pipe never blocks its logging), with waits on them."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[LogLine] = []
        self.returncode: int | None = None
        self.ended = anyio.Event()
        self._changed = anyio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    def messages(self) -> list[str]:
        return [str(line.get("message", "")) for line in self.lines]

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages())

    def errors(self, logger: str | None = None) -> list[str]:
        return [
            str(line.get("message")) for line in self.lines
            if line.get("level") == "error" and logger in (None, line.get("logger"))
        ]

    def summary(self) -> str:
        """The final ``stopped (...)`` line, or ``""``."""
        return next((m for m in reversed(self.messages()) if m.startswith("stopped (")), "")

    def tail(self, lines: int = 8) -> str:
        return "\n".join(json.dumps(line)[:400] for line in self.lines[-lines:])

    async def wait_for(
        self, predicate: Callable[[LogLine], bool], *, seconds: float, start: int = 0
    ) -> int:
        """Index of the first line from ``start`` on that matches; fails if the process
        ends first or after ``seconds``."""
        index = start
        with anyio.fail_after(seconds):
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return index
                    index += 1
                if self.ended.is_set():
                    raise DaemonExited(
                        f"{self.name} exited ({self.returncode}) before the awaited line;"
                        f" last lines:\n{self.tail()}"
                    )
                changed = self._changed
                await changed.wait()

    async def wait_for_message(self, text: str, *, seconds: float = 60, start: int = 0) -> int:
        return await self.wait_for(
            lambda line: text in str(line.get("message", "")), seconds=seconds, start=start
        )

    async def exit_code(self, *, seconds: float = 60) -> int:
        """Wait for the process to end (its log read to the end); its exit code."""
        with anyio.fail_after(seconds):
            await self.ended.wait()
        assert self.returncode is not None
        return self.returncode

    async def stop(self, *, seconds: float = 60) -> int:
        """SIGTERM, then wait for the exit code."""
        if not self.ended.is_set():
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_code(seconds=seconds)

    def kill(self) -> None:
        if not self.ended.is_set():
            self.process.send_signal(signal.SIGKILL)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def rss_kb(self) -> int | None:
        """Resident memory of the daemon (``VmRSS``), or ``None`` once it is gone."""
        return rss_kb(self.pid)

    async def _pump(self) -> None:
        assert self.process.stderr is not None
        stream = BufferedByteReceiveStream(self.process.stderr)
        try:
            while True:
                try:
                    raw = await stream.receive_until(b"\n", MAX_LINE_BYTES)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
                    break
                text = raw.decode(errors="replace")
                try:
                    line: LogLine = json.loads(text)
                except json.JSONDecodeError:
                    line = {"message": text, "level": "raw"}
                self.lines.append(line)
                self._changed.set()
                self._changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                self.returncode = await self.process.wait()
            self.ended.set()
            self._changed.set()


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.asynccontextmanager
async def running_daemon(
    args: Sequence[str], *, emulator: str, name: str = "mandrill"
) -> AsyncIterator[Daemon]:
    """Start ``mandrill ARGS --log-format json``; SIGKILL it at exit if it still runs."""
    process = await anyio.open_process(
        [sys.executable, "-m", "mandrill", *args, "--log-format", "json"],
        env=mandrill_env(emulator),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon = Daemon(process, name)
    try:
        with plain_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon._pump, name=f"{name} log reader")
                try:
                    yield daemon
                finally:
                    daemon.kill()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


def run_args(
    *,
    backend: str,
    names: PubSubNames,
    ledger: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """``mandrill run`` on a Pub/Sub subscription: the arguments every scenario shares."""
    return [
        "run", "--backend", backend, "--source", "pubsub", "--project", names.project,
        "--subscription", names.subscription, "--ledger", ledger, *extra,
    ]


# -- Pub/Sub ------------------------------------------------------------------------------


@dataclass
class PubSub:
    """The harness's own Pub/Sub client calls (on the harness's event loop)."""

    emulator: str
    backend: str

    async def setup(
        self,
        names: PubSubNames,
        *,
        ack_deadline: int = LEASED_SECONDS,
        dead_letters: bool = False,
        max_delivery_attempts: int = 100,
    ) -> None:
        await setup_pubsub(
            project=names.project,
            topic=names.topic,
            subscription=names.subscription,
            backend=self.backend,
            ack_deadline=ack_deadline,
            dead_letter_topic=names.dead_letter_topic if dead_letters else None,
            max_delivery_attempts=max_delivery_attempts,
            emulator_host=self.emulator,
        )

    async def publish(
        self, names: PubSubNames, messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[str]:
        return await self.publish_to(names.project, names.topic, messages)

    async def publish_to(
        self, project: str, topic: str, messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[str]:
        """Publish in requests under 1 MB (aiohttp warns about larger raw bodies, and the
        suite turns warnings into errors); returns the message ids in order."""
        ids: list[str] = []
        async with open_pubsub_topic(
            project=project, topic=topic, backend=self.backend, emulator_host=self.emulator
        ) as handle:
            for chunk in _chunks(messages, max_bytes=MAX_REQUEST_BYTES):
                ids += await handle.publish(chunk)
        return ids

    async def drain(self, project: str, subscription: str, want: int, *, seconds: float) -> list:
        """Pull and ack from ``subscription`` until ``want`` deliveries came (or the time
        is up); returns the deliveries."""
        got: list = []
        async with open_pubsub_source(
            project=project, subscription=subscription, backend=self.backend,
            emulator_host=self.emulator, pull_wait=2,
        ) as source:
            with anyio.move_on_after(seconds):
                while len(got) < want:
                    deliveries = await source.pull(1000)
                    if deliveries:
                        await source.acknowledge([d.ack_id for d in deliveries])
                    got.extend(deliveries)
        return got


#: Raw payload bytes per publish request: under aiohttp's 1 MiB "large body" warning once
#: base64 and JSON are added.
MAX_REQUEST_BYTES = 600_000


def _chunks(
    messages: Sequence[tuple[bytes, Mapping[str, str]]], *, max_bytes: int
) -> list[list[tuple[bytes, Mapping[str, str]]]]:
    chunks: list[list[tuple[bytes, Mapping[str, str]]]] = [[]]
    size = 0
    for message in messages:
        cost = len(message[0]) + 100
        if chunks[-1] and (size + cost > max_bytes or len(chunks[-1]) >= 1000):
            chunks.append([])
            size = 0
        chunks[-1].append(message)
        size += cost
    return chunks


def instance_payload(instance_name: str) -> bytes:
    return json.dumps({"instance_name": instance_name}).encode()


def chaos_messages(prefix: str, count: int) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` valid messages, each naming a host of its own (so that every message
    means one restart, and a host restarted twice can only be a bug)."""
    return [(instance_payload(f"{prefix}-{i}"), {"seq": str(i)}) for i in range(count)]


# -- an emulator of a scenario's own --------------------------------------------------------


class PinnedEmulator:
    """An emulator that can be stopped and started again on the same port (in memory:
    each start begins empty)."""

    def __init__(self, launcher: Path, log_path: Path, port: int | None = None) -> None:
        self.launcher = launcher
        self.log_path = log_path
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start and wait until it answers (blocking; call from a thread)."""
        with self.log_path.open("ab") as log:
            log.write(f"--- start on {self.host}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [str(self.launcher), "--host=127.0.0.1", f"--port={self.port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + EMULATOR_START_SECONDS
        while self._process.poll() is None and time.monotonic() < deadline:
            if answers(f"http://{self.host}/"):
                return
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace").splitlines()[-10:]
        self.stop()
        raise RuntimeError(f"emulator on {self.host} did not start; log tail:\n" + "\n".join(tail))

    def stop(self) -> None:
        """Stop it (blocking; call from a thread)."""
        if self._process is not None:
            stop_emulator(self._process)
            self._process = None


class Gate:
    """A TCP relay in front of an emulator. Open, it forwards; closed, it cuts every
    connection and closes new ones at once, as a service that went away would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.is_open = True
        self.port = 0
        self.connections = 0
        self._live: set[anyio.CancelScope] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.is_open = False
        for scope in self._live:
            scope.cancel()

    def open(self) -> None:
        self.is_open = True

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started(self.host)
            await listener.serve(self._relay)

    async def _relay(self, client: SocketStream) -> None:
        async with client:
            if not self.is_open:
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
            except OSError:
                return
            self.connections += 1
            with anyio.CancelScope() as scope:
                self._live.add(scope)
                try:
                    async with upstream, anyio.create_task_group() as tg:
                        tg.start_soon(_pipe, client, upstream, scope)
                        tg.start_soon(_pipe, upstream, client, scope)
                finally:
                    self._live.discard(scope)


async def _pipe(source: SocketStream, sink: SocketStream, scope: anyio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        scope.cancel()


# -- PostgreSQL ---------------------------------------------------------------------------


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def _admin(admin_url: str, *statements: sql.Composable | str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for statement in statements:
            conn.execute(statement)


@contextlib.asynccontextmanager
async def postgres_schema(admin_url: str, prefix: str = "rel") -> AsyncIterator[str]:
    """A ledger URL naming a fresh schema (made by the first daemon), dropped at exit."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        yield with_schema(admin_url, schema)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                _admin, admin_url,
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)),
            )


@dataclass
class LedgerRole:
    """A login role of a scenario's own, owning the ledger's schema: taking away its
    LOGIN and ending its sessions makes the ledger unreachable for that daemon alone,
    while every other test goes on using the same server."""

    admin_url: str
    role: str
    #: The daemons' ledger URL: as the role, in the role's schema.
    url: str

    @property
    def probe_url(self) -> str:
        """The same ledger as the administrator sees it (readable during the outage)."""
        return with_schema(self.admin_url, self.role)

    async def cut(self) -> int:
        """Refuse new sessions and end the open ones; how many were ended."""
        def cut() -> int:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(self.role)))
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (self.role,),
                ).fetchall()
            return len(rows)

        return await anyio.to_thread.run_sync(cut)

    async def restore(self) -> None:
        await anyio.to_thread.run_sync(
            _admin, self.admin_url,
            sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(self.role)),
        )


@contextlib.asynccontextmanager
async def postgres_role(admin_url: str) -> AsyncIterator[LedgerRole]:
    role = f"rel_{uuid.uuid4().hex[:12]}"
    password = secrets.token_hex(12)
    ident = sql.Identifier(role)

    def create() -> str:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            (database,) = conn.execute("SELECT current_database()").fetchone() or ("",)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                ident, sql.Literal(password)))
            conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(database), ident))
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
        return str(database)

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))

    await anyio.to_thread.run_sync(create)
    parts = urlsplit(admin_url)
    netloc = f"{role}:{quote(password)}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    base = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    try:
        yield LedgerRole(admin_url, role, with_schema(base, role) + f"&application_name={role}")
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(drop)


# -- the ledger's verdict -----------------------------------------------------------------


@dataclass
class LedgerFacts:
    """Everything the ledger says about a run, read at one moment."""

    #: message id → rows of ``restarts``: (hostname, outcome, decided_at)
    decisions: dict[str, list[tuple[str, str, float]]]
    #: message id → (status, reason, deliveries)
    messages: dict[str, tuple[str, str, int]]
    #: ``restarts.id`` → message id
    restart_ids: dict[int, str] = field(default_factory=dict)

    def finals(self, message_id: str) -> int:
        rows = self.decisions.get(message_id, [])
        count = sum(outcome in FINAL_OUTCOMES for _, outcome, _ in rows)
        status = self.messages.get(message_id, ("", "", 0))[0]
        return count + (status == "dead_letter")

    def outcomes(self, message_id: str) -> list[str]:
        return [outcome for _, outcome, _ in self.decisions.get(message_id, [])]

    def open_claims(self) -> set[str]:
        """Messages whose only story is a ``restarting`` claim (no final decision)."""
        return {
            mid for mid, rows in self.decisions.items()
            if self.finals(mid) == 0 and any(outcome == "restarting" for _, outcome, _ in rows)
        }

    def restarted_per_message(self) -> Counter[str]:
        return Counter(
            mid for mid, rows in self.decisions.items()
            for _, outcome, _ in rows if outcome == "restarted"
        )

    def host_double_restarts(self, min_interval: float) -> list[str]:
        """Hosts with two ``restarted`` rows closer together than ``min_interval``."""
        times: defaultdict[str, list[float]] = defaultdict(list)
        for rows in self.decisions.values():
            for host, outcome, decided_at in rows:
                if outcome == "restarted":
                    times[host].append(decided_at)
        doubles = []
        for host, seen in times.items():
            seen.sort()
            if any(b - a < min_interval for a, b in itertools.pairwise(seen)):
                doubles.append(host)
        return doubles

    def double_restarts(self, min_interval: float) -> int:
        by_message = sum(1 for n in self.restarted_per_message().values() if n > 1)
        return by_message + len(self.host_double_restarts(min_interval))

    def processed(self, ids: Collection[str]) -> int:
        return sum(self.finals(mid) > 0 for mid in ids)


@dataclass(frozen=True)
class LedgerRef:
    """Where a scenario's ledger is: a SQLite file or a PostgreSQL URL (``?schema=``)."""

    url: str

    def _connect_pg(self) -> psycopg.Connection[Any]:
        base, _, query = self.url.partition("?")
        params = dict(item.split("=", 1) for item in query.split("&") if item)
        schema = params.pop("schema")
        conninfo = base + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
        return psycopg.connect(conninfo, autocommit=True, options=f"-csearch_path={schema}")

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.is_postgres:
            with self._connect_pg() as conn:
                return list(conn.execute(statement.replace("?", "%s"), params).fetchall())
        if not Path(self.url).exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.url}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            return list(conn.execute(statement, params).fetchall())

    def _tables_exist(self) -> bool:
        if self.is_postgres:
            rows = self._query("SELECT to_regclass('restarts') IS NOT NULL")
            return bool(rows and rows[0][0])
        rows = self._query("SELECT COUNT(*) FROM sqlite_master WHERE name = 'restarts'")
        return bool(rows and rows[0][0])

    def _facts(self) -> LedgerFacts:
        if not self._tables_exist():
            return LedgerFacts({}, {})
        decisions: defaultdict[str, list[tuple[str, str, float]]] = defaultdict(list)
        restart_ids = {}
        for row_id, mid, host, outcome, decided_at in self._query(
            "SELECT id, message_id, hostname, outcome, decided_at FROM restarts ORDER BY id"
        ):
            decisions[mid].append((host, outcome, float(decided_at)))
            restart_ids[int(row_id)] = mid
        messages = {
            mid: (status, reason, int(deliveries))
            for mid, status, reason, deliveries in self._query(
                "SELECT message_id, status, reason, deliveries FROM messages"
            )
        }
        return LedgerFacts(dict(decisions), messages, restart_ids)

    async def facts(self) -> LedgerFacts:
        return await anyio.to_thread.run_sync(self._facts)

    def _processed_count(self) -> int:
        if not self._tables_exist():
            return 0
        finals = ", ".join(f"'{outcome}'" for outcome in FINAL_OUTCOMES)
        rows = self._query(
            f"SELECT COUNT(*) FROM (SELECT message_id FROM restarts WHERE outcome IN ({finals})"
            " UNION SELECT message_id FROM messages WHERE status = 'dead_letter') AS done"
        )
        return int(rows[0][0])

    async def processed_count(self) -> int:
        """How many distinct messages have a final decision (cheap, for polling)."""
        return await anyio.to_thread.run_sync(self._processed_count)

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        """Change the ledger behind the daemons' backs (PostgreSQL only)."""
        def run() -> None:
            with self._connect_pg() as conn:
                conn.execute(statement.replace("?", "%s"), params)

        await anyio.to_thread.run_sync(run)

    async def wait_processed(
        self,
        ids: Collection[str],
        *,
        seconds: float,
        daemons: Sequence[Daemon] = (),
        excused: Callable[[LedgerFacts], Collection[str]] | None = None,
    ) -> LedgerFacts:
        """Poll until every message of ``ids`` has a final decision, or is ``excused``
        (known never to get one: the caller counts those); fails after ``seconds`` or as
        soon as a daemon that should be running has exited."""
        want = set(ids)

        async def check() -> LedgerFacts | None:
            for daemon in daemons:
                if daemon.ended.is_set():
                    raise DaemonExited(
                        f"{daemon.name} exited ({daemon.returncode}):\n{daemon.tail()}"
                    )
            if excused is None and await self.processed_count() < len(want):
                return None
            facts = await self.facts()
            done = facts.processed(want)
            if excused is not None:
                done += len({mid for mid in excused(facts) if facts.finals(mid) == 0} & want)
            return facts if done == len(want) else None

        async def describe() -> str:
            facts = await self.facts()
            missing = [mid for mid in want if facts.finals(mid) == 0]
            sample = {mid: facts.outcomes(mid) for mid in missing[:5]}
            logs = "".join(f"\n{d.name}:\n{d.tail(4)}" for d in daemons)
            return f"{len(missing)} of {len(want)} not processed, e.g. {sample}{logs}"

        return await eventually(
            check, seconds=seconds, interval=0.3, what="every message processed",
            describe=describe,
        )


# -- the record of a run ------------------------------------------------------------------


@dataclass
class Result:
    """One scenario run, in the brief's terms (all computed from the ledger but
    ``duplicates_suppressed``, which the daemons' logs tell)."""

    scenario: str
    backend: str
    published: int
    processed_once: int
    processed_more: int
    duplicates_suppressed: int
    lost: int
    double_restarts: int
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.double_restarts == 0 and self.processed_more == 0

    def note(self, **figures: Any) -> None:
        self.notes.update(figures)

    def check(self) -> None:
        """Assert the promise: nothing lost, nothing decided or restarted twice."""
        assert self.double_restarts == 0, self
        assert self.processed_more == 0, self
        assert self.lost == 0, self


def verdict(
    scenario: str,
    backend: str,
    facts: LedgerFacts,
    published: Collection[str],
    *,
    daemons: Sequence[Daemon],
    started: float,
    min_interval: float = 7 * 86400.0,
) -> Result:
    """The ledger's verdict on ``published``; double restarts over the whole ledger."""
    once = sum(facts.finals(mid) == 1 for mid in published)
    more = sum(facts.finals(mid) > 1 for mid in published)
    return Result(
        scenario=scenario,
        backend=backend,
        published=len(published),
        processed_once=once,
        processed_more=more,
        duplicates_suppressed=sum(d.count("duplicate message") for d in daemons),
        lost=len(published) - once - more,
        double_restarts=facts.double_restarts(min_interval),
        seconds=anyio.current_time() - started,
    )
