"""Seeded fault schedules: a fleet of two daemons (serve(), in this process, on the backend
under test) on one subscription of the real emulator and one ledger, while a schedule drawn
from a seed injects faults at random points of the message path:

* cancellation, three ways: a forced stop (a second signal), the end of the grace with
  restarts under way, a sibling part of the daemon failing; each daemon starts again after;
* a COMMIT whose answer is lost (a decision's, or an outcome's);
* a transaction that does not answer past its deadline (a stall, TCP up);
* a dead-letter topic that is gone (HTTP 404), or that refuses (HTTP 400), for a while;
* a clock 28 s ahead on one of the two daemons (PostgreSQL: one clock for the fleet).

PostgreSQL is reached through :class:`~tests.support.pg_proxy.PostgresFaultProxy`; SQLite
(two daemons on one file) through :class:`FaultySQLite`, a double of a file system that
loses an answer or stops answering. The daemons reach the emulator through
:class:`~tests.support.holding_proxy.HoldingProxy`, which enforces Pub/Sub's publish limits
and refuses dead letters on cue.

After each run, the invariants (:meth:`FaultRun.check`): every published host restarted
exactly once (messages for a host already restarted recorded with their reason); no
``restarting`` row left; no two restarts of one host overlapping; nothing acked without its
outcome kept (checked as each ack goes out, in the ledger or the outcome journal); every
bad message kept as a dead letter.
"""

from __future__ import annotations

import functools
import json
import random
import sqlite3
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from anyio.abc import TaskStatus

from mandrill.errors import ConfigError, LedgerError
from mandrill.ledger import open_ledger
from mandrill.ledger.journal import OutcomeJournal
from mandrill.ledger.sqlite import DIALECT as SQLITE
from mandrill.ledger.sqlite import SQLiteDatabase
from mandrill.ledger.sqlledger import SQLLedger, new_instance
from mandrill.message import Delivery, Message, encode_payload
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.pubsub import open_pubsub_source, setup_pubsub
from mandrill.worker import WorkerSettings
from tests.fixtures.emulator import PubSubNames
from tests.reliability.harness import LedgerFacts, LedgerRef, PubSub, Result
from tests.support.holding_proxy import HoldingProxy
from tests.support.pg_proxy import PostgresFaultProxy
from tests.support.pubsub_limits import refuse_over_limits

T = TypeVar("T")

#: The faults a schedule draws from (``skewed_clock`` only on PostgreSQL, where it must not
#: matter; SQLite's daemons share one machine, and so one clock).
KINDS = (
    "forced_stop", "grace_expiry", "sibling_failure", "lost_commit", "stalled_batch",
    "dead_letter_404", "dead_letter_400",
)
#: The transactions a lost COMMIT answer may hit: a decision (claims), or outcomes.
COMMITS = {"decision": "INSERT INTO restarts", "outcomes": "UPDATE restarts SET finished_at"}
#: How long a stall or a refusing dead-letter topic lasts: past a transaction's deadline.
HOLD_SECONDS = 3.0
#: A transaction's deadline in these runs: twice a 1 s statement timeout.
STATEMENT_TIMEOUT_MS = 1000
SKEW_SECONDS = 28.0
INSTANCE_TIMEOUT = 2.0
#: Faults come within this many seconds of the start.
WINDOW = 4.0
#: How long a run may take to settle every message once its faults are over.
SETTLE_SECONDS = 90.0
HOSTS = 10


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    daemon: int
    #: For lost_commit: which transaction ("decision" or "outcomes").
    target: str = ""

    def __str__(self) -> str:
        target = f"({self.target})" if self.target else ""
        return f"{self.kind}{target}@{self.at:.1f}s/d{self.daemon}"


def schedule(seed: int, database: str) -> tuple[list[Fault], bool]:
    """The faults of run ``seed``, in time order, and whether daemon 1's clock is skewed."""
    rng = random.Random(seed)
    faults = sorted(
        (Fault(round(rng.uniform(0.2, WINDOW), 2), kind, rng.randrange(2),
               rng.choice(sorted(COMMITS)) if kind == "lost_commit" else "")
         for kind in rng.sample(KINDS, rng.randint(2, 4))),
        key=lambda fault: fault.at,
    )
    return faults, database == "postgres" and rng.random() < 0.5


# -- the world's hosts ----------------------------------------------------------------------


class WorldRestarter:
    """The fleet's hosts, as the restart commands see them: which restarts began, when each
    ran; a restart takes 20-500 ms (a few past a 200 ms grace)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.begun: Counter[str] = Counter()
        self.runs: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        self.running: Counter[str] = Counter()
        self.overlaps: list[str] = []

    async def restart(self, message: Message) -> str:
        host = message.hostname
        self.begun[host] += 1
        self.running[host] += 1
        if self.running[host] > 1:
            self.overlaps.append(host)
        started = time.monotonic()
        try:
            await anyio.sleep(self.rng.uniform(0.02, 0.5))
        finally:
            self.running[host] -= 1
            self.runs[host].append((started, time.monotonic()))
        return "done"


# -- SQLite's faults --------------------------------------------------------------------------


class SQLiteFaults:
    """What the daemons' :class:`FaultySQLite` databases do wrong, armed by the schedule."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lose: str | None = None
        self.flowing = threading.Event()
        self.flowing.set()
        self.lost = 0

    def lose_next_answer(self, kind: str) -> None:
        with self._lock:
            self._lose = {"decision": "_decide", "outcomes": "_finish"}[kind]

    def stall(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    def answer_lost(self, work: Callable[[Any], Any]) -> bool:
        name = getattr(getattr(work, "func", None), "__name__", "")
        with self._lock:
            if self._lose is None or name != self._lose:
                return False
            self._lose = None
            self.lost += 1
            return True


class FaultySQLite(SQLiteDatabase):
    """The real SQLite file, seen through a file system that may commit a transaction and
    then fail to say so, or stop answering (its transactions hold, in their threads)."""

    def __init__(self, path: str, faults: SQLiteFaults) -> None:
        super().__init__(path)
        self.faults = faults

    def try_transaction_now(self, work: Callable[[Any], T]) -> tuple[bool, T | None]:
        if not self.faults.flowing.is_set():
            return False, None  # to a thread, where it holds
        ran, result = super().try_transaction_now(work)
        if ran and self.faults.answer_lost(work):
            raise sqlite3.OperationalError("disk I/O error (injected: the answer is lost)")
        return ran, result

    def transaction(self, work: Callable[[Any], T]) -> T:
        self.faults.flowing.wait(60)
        result = super().transaction(work)
        if self.faults.answer_lost(work):
            raise sqlite3.OperationalError("disk I/O error (injected: the answer is lost)")
        return result


# -- what the daemons see of Pub/Sub ------------------------------------------------------------


class Refusals:
    """Pub/Sub's limits (always), and a dead-letter topic that refuses (on cue)."""

    def __init__(self, dead_letter_topic: str) -> None:
        self.dead_letter_topic = dead_letter_topic
        self.refusing = False

    def __call__(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if self.refusing and path.endswith(f"/topics/{self.dead_letter_topic}:publish"):
            error = {"error": {"code": 400, "message": "injected: refused",
                               "status": "INVALID_ARGUMENT"}}
            return 400, json.dumps(error).encode()
        return refuse_over_limits(method, path, body)


class CheckedSource:
    """A daemon's Pub/Sub source, which checks each ack as it goes out: the message's
    outcome must be kept already (a final decision in the ledger, a dead letter, or an
    outcome in a journal)."""

    def __init__(self, source: Any, run: FaultRun) -> None:
        self._source = source
        self._run = run
        self.ack_deadline = source.ack_deadline
        self.keeps_dead_letters = source.keeps_dead_letters
        self._message_ids: dict[str, str] = {}

    def problem(self) -> str | None:
        return self._source.problem()

    async def pull(self, max_messages: int) -> Sequence[Delivery]:
        deliveries = await self._source.pull(max_messages)
        for each in deliveries:
            self._message_ids[each.ack_id] = each.message_id
        return deliveries

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        ids = [self._message_ids[ack_id] for ack_id in ack_ids if ack_id in self._message_ids]
        await anyio.to_thread.run_sync(self._run.check_acked, ids)
        await self._source.acknowledge(ack_ids)

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        await self._source.modify_ack_deadline(ack_ids, seconds)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._source.dead_letter(delivery, reason)


# -- a run ----------------------------------------------------------------------------------


@dataclass
class Incarnation:
    """One start of a daemon: what the schedule acts on."""

    shutdown: Shutdown = field(default_factory=Shutdown)
    sibling_fails: anyio.Event = field(default_factory=anyio.Event)


class FaultRun:
    """One seeded schedule against a fleet of two daemons; :meth:`run` returns its result."""

    def __init__(
        self, *, seed: int, backend: str, database: str, ledger_url: str, emulator: str,
        workdir: Path,
    ) -> None:
        self.seed = seed
        self.backend = backend
        self.database = database
        self.ledger = LedgerRef(ledger_url)
        self.emulator = emulator
        self.workdir = workdir
        self.faults, self.skewed = schedule(seed, database)
        self.rng = random.Random(seed * 7919)
        self.restarter = WorldRestarter(self.rng)
        self.names = PubSubNames.fresh(f"fs{seed}")
        self.refusals = Refusals(self.names.dead_letter_topic)
        self.sqlite_faults = SQLiteFaults()
        self.pg_proxy: PostgresFaultProxy | None = None
        self.journal = workdir / f"journal-{seed}.jsonl"
        self.current: list[Incarnation | None] = [None, None]
        self.starts: Counter[int] = Counter()
        self.unexpected: list[str] = []
        self.acked_without_outcome: list[str] = []
        self.done = anyio.Event()
        self.applied: list[str] = []
        #: While the dead-letter topic is deleted: a daemon that starts then refuses.
        self.topic_gone = False

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> Result:
        started = anyio.current_time()
        pubsub = PubSub(self.emulator, self.backend)
        await self._setup(pubsub)
        waves, published, bad = self._messages()
        async with AsyncExitStack() as stack:
            limits = stack.enter_context(
                HoldingProxy(self.emulator, refuse=self.refusals).running()
            )
            if self.database == "postgres":
                self.pg_proxy = stack.enter_context(PostgresFaultProxy().running())
            async with anyio.create_task_group() as tg:
                for index in (0, 1):
                    tg.start_soon(self._daemon, index, limits.address)
                # Messages come in waves while the faults do, so that faults hit work
                # under way; a run is judged once every fault has come and gone.
                async with anyio.create_task_group() as schedule_:
                    schedule_.start_soon(self._inject, anyio.current_time())
                    schedule_.start_soon(self._publish, pubsub, waves, published, bad)
                facts = await self._wait_settled(published, bad)
                self._lift_faults()
                self.done.set()
                for incarnation in self.current:
                    if incarnation is not None:
                        incarnation.shutdown.request("the run is over")
        facts = await self.ledger.facts()
        return self._result(facts, published, bad, started)

    async def _setup(self, pubsub: PubSub) -> None:
        names = self.names
        for topic, subscription in ((names.dead_letter_topic, names.dead_letter_subscription),
                                    (names.topic, names.subscription)):
            await setup_pubsub(project=names.project, topic=topic, subscription=subscription,
                               backend=pubsub.backend, ack_deadline=10,
                               emulator_host=self.emulator)

    def _messages(
        self,
    ) -> tuple[list[tuple[float, list[tuple[bytes, dict[str, str]]]]], list[str], list[str]]:
        """The run's messages in waves ``(at seconds, messages)``: a host each, a second
        request for two of them (recorded with its reason, not done), two bad ones."""
        hosts = [f"fs{self.seed}-{n}" for n in range(HOSTS)]
        again = self.rng.sample(hosts, 2)
        messages: list[tuple[bytes, dict[str, str]]] = [
            (encode_payload(host), {}) for host in hosts + again
        ]
        many_attributes = {f"key-{n:02d}": "x" for n in range(99)}
        messages += [(b"{not json", many_attributes), (b"[]", {})]
        self.rng.shuffle(messages)
        times = sorted([0.0] + [round(self.rng.uniform(0.2, WINDOW), 2) for _ in range(3)])
        waves = [(at, messages[n::len(times)]) for n, at in enumerate(times)]
        return waves, [], []

    async def _publish(
        self, pubsub: PubSub, waves: list[tuple[float, list[tuple[bytes, dict[str, str]]]]],
        published: list[str], bad: list[str],
    ) -> None:
        """Publish each wave at its time; ids of good messages to ``published``, of bad ones
        to ``bad``."""
        started = anyio.current_time()
        for at, wave in waves:
            await anyio.sleep(max(0.0, started + at - anyio.current_time()))
            for (data, _), message_id in zip(wave, await pubsub.publish(self.names, wave),
                                             strict=True):
                (published if data.startswith(b'{"instance_name"') else bad).append(message_id)

    @asynccontextmanager
    async def _ledger(self, index: int) -> AsyncIterator[SQLLedger]:
        clock = (lambda: time.time() + SKEW_SECONDS) if self.skewed and index == 1 else time.time
        common: dict[str, Any] = {
            "instance_timeout": INSTANCE_TIMEOUT, "clock": clock,
            "subscription": f"projects/{self.names.project}/subscriptions/"
                            f"{self.names.subscription}",
        }
        if self.pg_proxy is not None:
            url = (self.pg_proxy.url(self.ledger.url)
                   + f"&options=-cstatement_timeout%3D{STATEMENT_TIMEOUT_MS}")
            ledger = await open_ledger(url, journal=str(self.journal), **common)
        else:
            db = await anyio.to_thread.run_sync(FaultySQLite, self.ledger.url, self.sqlite_faults)
            ledger = SQLLedger(db, SQLITE, journal=OutcomeJournal(self.journal, self.ledger.url),
                               instance=new_instance(self.backend), **common)
        try:
            yield ledger
        finally:
            await ledger.aclose()

    async def _daemon(self, index: int, pubsub_host: str) -> None:
        """Daemon ``index``: started again each time a fault stops it, until the run ends."""
        while not self.done.is_set():
            self.starts[index] += 1
            incarnation = self.current[index] = Incarnation()
            sibling = functools.partial(_failing_sibling, incarnation.sibling_fails)
            try:
                async with self._ledger(index) as ledger, open_pubsub_source(
                    project=self.names.project, subscription=self.names.subscription,
                    backend=self.backend, dead_letter_topic=self.names.dead_letter_topic,
                    emulator_host=pubsub_host,
                ) as source:
                    await serve(
                        ServiceSettings(handle_signals=False, grace=0.2, settle_timeout=4,
                                        defer=0.3, max_in_flight=6),
                        WorkerSettings(),
                        Parts(CheckedSource(source, self), ledger, self.restarter,
                              companions=[sibling]),
                        shutdown=incarnation.shutdown,
                    )
            except BaseExceptionGroup as group:
                _, others = group.split(_injected)
                if others is not None:
                    self.unexpected.append(f"daemon {index}: {others!r}")
            except ConfigError as exc:
                # Started while the dead-letter topic is gone: a daemon refuses to start
                # (exit 2), and its supervisor tries again later.
                if "dead-letter topic" not in str(exc) or not self.topic_gone:
                    self.unexpected.append(f"daemon {index} at start: {exc!r}")
                await anyio.sleep(0.5)
            except (LedgerError, OSError) as exc:  # a ledger that cannot open mid-stall
                self.unexpected.append(f"daemon {index} at start: {exc!r}")
                await anyio.sleep(0.5)

    async def _inject(self, started: float) -> None:
        for fault in self.faults:
            await anyio.sleep(max(0.0, started + fault.at - anyio.current_time()))
            if self.done.is_set():
                return
            self.applied.append(str(fault))
            await self._apply(fault)

    async def _apply(self, fault: Fault) -> None:
        incarnation = self.current[fault.daemon]
        if fault.kind == "forced_stop" and incarnation is not None:
            incarnation.shutdown.force("injected: forced stop")
        elif fault.kind == "grace_expiry" and incarnation is not None:
            incarnation.shutdown.request("injected: stop, the grace too short")
        elif fault.kind == "sibling_failure" and incarnation is not None:
            incarnation.sibling_fails.set()
        elif fault.kind == "lost_commit":
            if self.pg_proxy is not None:
                self.pg_proxy.drop_commit_answer(match=COMMITS[fault.target])
            else:
                self.sqlite_faults.lose_next_answer(fault.target)
        elif fault.kind == "stalled_batch":
            stall = self.pg_proxy.stall() if self.pg_proxy is not None else None
            if stall is None:
                self.sqlite_faults.stall()
            await anyio.sleep(HOLD_SECONDS)
            if stall is not None:
                stall.release()
            self.sqlite_faults.release()
        elif fault.kind == "dead_letter_404":
            self.topic_gone = True
            await self._dead_letter_topic("DELETE")
            await anyio.sleep(HOLD_SECONDS)
            await self._dead_letter_topic("PUT")
            self.topic_gone = False
        elif fault.kind == "dead_letter_400":
            self.refusals.refusing = True
            await anyio.sleep(HOLD_SECONDS)
            self.refusals.refusing = False

    async def _dead_letter_topic(self, method: str) -> None:
        url = (f"http://{self.emulator}/v1/projects/{self.names.project}/topics/"
               f"{self.names.dead_letter_topic}")
        async with httpx.AsyncClient() as client:
            answer = await client.request(method, url, json={} if method == "PUT" else None)
            assert answer.status_code == 200, answer.text

    def _lift_faults(self) -> None:
        self.refusals.refusing = False
        self.sqlite_faults.release()
        if self.pg_proxy is not None:
            self.pg_proxy.reset()

    async def _wait_settled(self, published: list[str], bad: list[str]) -> LedgerFacts:
        deadline = anyio.current_time() + WINDOW + HOLD_SECONDS + SETTLE_SECONDS
        while True:
            facts = await self.ledger.facts()
            if all(facts.finals(mid) for mid in published) and all(
                facts.messages.get(mid, ("",))[0] == "dead_letter" for mid in bad
            ):
                return facts
            if anyio.current_time() > deadline:
                missing = {mid: facts.outcomes(mid) for mid in published + bad
                           if not facts.finals(mid)}
                raise AssertionError(
                    f"seed {self.seed}: not settled in time: {missing}; faults {self.applied};"
                    f" unexpected {self.unexpected}"
                )
            await anyio.sleep(0.2)  # polled: the ledger tells nobody in this process

    # -- the invariants ------------------------------------------------------------------------

    def check_acked(self, message_ids: list[str]) -> None:
        """Called as acks go out (in a thread): each message's outcome must be kept."""
        if not message_ids:
            return
        facts = self.ledger._facts()
        journaled = self._journaled()
        for mid in message_ids:
            kept = {rid for rid, owner in facts.restart_ids.items() if owner == mid} & journaled
            if not facts.finals(mid) and not kept:
                self.acked_without_outcome.append(f"{mid}: {facts.outcomes(mid)}")

    def _journaled(self) -> set[int]:
        try:
            lines = self.journal.read_text().splitlines()
        except FileNotFoundError:
            return set()
        kept = set()
        for line in lines:
            try:
                kept.add(int(json.loads(line)["restart_id"]))
            except (ValueError, KeyError):
                continue
        return kept

    def _result(
        self, facts: LedgerFacts, published: list[str], bad: list[str], started: float
    ) -> Result:
        assert (len(published), len(bad)) == (HOSTS + 2, 2), (published, bad)
        hosts = {f"fs{self.seed}-{n}.example.net" for n in range(HOSTS)}
        begun = self.restarter.begun
        not_once = sorted(f"{host}x{begun[host]}" for host in hosts if begun[host] != 1)
        open_claims = sorted(mid for mid, rows in facts.decisions.items()
                             if any(outcome == "restarting" for _, outcome, _ in rows))
        lost = [mid for mid in published + bad if not facts.finals(mid)]
        result = Result(
            scenario="fault schedule",
            backend=f"{self.backend}/{self.database}",
            published=len(published) + len(bad),
            processed_once=len(published) + len(bad) - len(lost),
            processed_more=0,
            duplicates_suppressed=0,
            lost=len(lost),
            double_restarts=sum(begun[host] > 1 for host in hosts)
            + len(set(self.restarter.overlaps)),
            seconds=anyio.current_time() - started,
        )
        result.note(
            seed=self.seed, faults=" ".join(self.applied) or "-",
            skew="d1+28s" if self.skewed else "-", starts=sum(self.starts.values()),
            hosts_not_restarted_once=",".join(not_once) or "-",
            open_claims=",".join(open_claims) or "-",
            acked_without_outcome=";".join(self.acked_without_outcome) or "-",
            unexpected=";".join(self.unexpected) or "-",
        )
        return result


async def _failing_sibling(fails: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    """A part of the daemon beside the others (a companion) that fails on cue."""
    task_status.started()
    await fails.wait()
    raise RuntimeError("injected: a sibling part failed")


def _injected(error: BaseException) -> bool:
    """An error a fault caused on purpose (a sibling part failing)."""
    return "injected" in str(error)


def check(result: Result) -> None:
    """Assert every invariant of a fault-schedule run."""
    notes = result.notes
    assert result.lost == 0, result
    assert result.double_restarts == 0, result
    for name in ("hosts_not_restarted_once", "open_claims", "acked_without_outcome",
                 "unexpected"):
        assert notes[name] == "-", (name, result)


async def run_schedule(
    seed: int, backend: str, database: str, *, ledger_url: str, emulator: str, workdir: Path
) -> Result:
    """One seeded run (see the module docstring)."""
    run = FaultRun(seed=seed, backend=backend, database=database, ledger_url=ledger_url,
                   emulator=emulator, workdir=workdir)
    return await run.run()


__all__ = ["KINDS", "FaultRun", "check", "run_schedule", "schedule"]


# -- many schedules, in a process of their own (the reliability report) ------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.reliability.faults BACKEND FIRST_SEED COUNT EMULATOR ADMIN_URL``:
    run seeds ``FIRST_SEED ..`` on SQLite and PostgreSQL, on BACKEND's event loop; one JSON
    line per run on stdout."""
    import sys

    backend, first, count, emulator, admin_url = (argv or sys.argv[1:])[:5]

    async def runs() -> None:
        from tests.reliability.harness import postgres_schema

        with tempfile.TemporaryDirectory(prefix="mandrill-faults-") as directory:
            workdir = Path(directory)
            for seed in range(int(first), int(first) + int(count)):
                for database in ("sqlite", "postgres"):
                    try:
                        if database == "postgres":
                            async with postgres_schema(admin_url, "faults") as url:
                                result = await run_schedule(seed, backend, database,
                                                            ledger_url=url, emulator=emulator,
                                                            workdir=workdir)
                        else:
                            result = await run_schedule(
                                seed, backend, database,
                                ledger_url=str(workdir / f"ledger-{seed}.db"),
                                emulator=emulator, workdir=workdir,
                            )
                        line = {"seed": seed, "database": database, "lost": result.lost,
                                "double": result.double_restarts,
                                "published": result.published, "notes": result.notes}
                        try:
                            check(result)
                            line["ok"] = True
                        except AssertionError:
                            line["ok"] = False
                    except Exception as exc:
                        line = {"seed": seed, "database": database, "ok": False,
                                "error": " ".join(str(exc).split())[:300]}
                    print(json.dumps(line), flush=True)

    anyio.run(runs, backend=backend)


if __name__ == "__main__":
    main()
