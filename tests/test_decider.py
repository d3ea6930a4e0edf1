"""The decider, directly: a batch of deliveries decided in one ledger transaction, each
handed one way on (claimed restarts to the workers' stream, skips and duplicates to be
acked, waits deferred, bad input to the dead letters). The ledger is the real SQLite one."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from mandrill.decider import Decider
from mandrill.holdings import Holdings
from mandrill.ledger import SQLLedger, open_ledger, sqlite
from mandrill.ledger.base import DeadLetterRecord
from mandrill.ledger.breaker import Breaker
from mandrill.message import Delivery, Message
from mandrill.obs.counters import Counters
from mandrill.policy import BreakerRule, Outcome, Reason, Refusal, Settlement
from mandrill.settler import Outbox, Settle, settle_stream
from mandrill.shutdown import Shutdown
from mandrill.worker import Claimed, WorkerSettings
from tests.ledger import HOUR, decide, decide_one, delivery, finish, message


@dataclass
class Bench:
    ledger: SQLLedger
    holdings: Holdings
    counters: Counters
    shutdown: Shutdown
    decider: Decider
    restarts: MemoryObjectReceiveStream[Claimed]
    settled: MemoryObjectReceiveStream[Settle]
    lettered: MemoryObjectReceiveStream[DeadLetterRecord]

    def held(self, *deliveries: Delivery) -> list[Delivery]:
        for each in deliveries:
            self.holdings.add(each, 0.0, 600.0)
        return list(deliveries)

    def settlements(self) -> dict[str, Settlement]:
        return {s.delivery.message_id: s.settlement for s in _drain(self.settled)}


def _drain(stream: MemoryObjectReceiveStream[object]) -> list:
    items = []
    while True:
        try:
            items.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return items


async def make_bench(
    ledger: SQLLedger,
    settings: WorkerSettings,
    on_decision: Callable[[Message, Outcome, str], None] | None = None,
    on_breaker: Callable[[Breaker], None] | None = None,
) -> Bench:
    await ledger._beat(forget=True)  # registered and alive, as a daemon's ledger is
    send, settled = settle_stream()
    claims, restarts = anyio.create_memory_object_stream[Claimed](math.inf)
    letters, lettered = anyio.create_memory_object_stream[DeadLetterRecord](math.inf)
    holdings, counters, shutdown = Holdings(64), Counters(), Shutdown()
    decider = Decider(ledger=ledger, settings=settings, counters=counters, shutdown=shutdown,
                      outbox=Outbox(send, holdings), restarts=claims, dead_letters=letters,
                      on_decision=on_decision, on_breaker=on_breaker)
    return Bench(ledger, holdings, counters, shutdown, decider, restarts, settled, lettered)


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    bench = await make_bench(ledger, WorkerSettings())
    yield bench
    for claim in bench.ledger.owned.claims():
        bench.ledger.owned.settled([claim])
    await close(bench)
    await ledger.aclose()


async def close(bench: Bench) -> None:
    pulled, to_decide = anyio.create_memory_object_stream[Sequence[Delivery]](1)
    pulled.close()
    await bench.decider.run(to_decide)  # ends at once; closes what the decider sends on
    for stream in (bench.restarts, bench.settled, bench.lettered):
        stream.close()


async def test_a_batch_is_decided_in_one_transaction_and_each_goes_one_way(
    bench: Bench,
) -> None:
    (earlier,) = await decide(bench.ledger, message("m0", "db-1"))  # db-1 just restarted
    await finish(bench.ledger, earlier, Outcome.RESTARTED)
    batch = bench.held(
        delivery("m1", "web-1"),  # restart
        delivery("m2", "web-1"),  # its host is being restarted: wait
        delivery("m3", "db-1"),  # restarted an hour ago: skip
        delivery("m0", "db-1"),  # already decided: duplicate
        delivery("bad", data=b"{not json"),  # dead letter
    )
    await bench.decider.decide(batch)

    (claimed,) = _drain(bench.restarts)
    assert claimed.message.message_id == "m1"
    assert claimed.claim.message_id in bench.ledger.owned.held()
    assert bench.settlements() == {
        "m2": Settlement.DEFER, "m3": Settlement.ACK, "m0": Settlement.ACK,
    }
    (letter,) = _drain(bench.lettered)
    assert (letter.delivery.message_id, letter.reason) == ("bad", Reason.INVALID)
    assert letter.detail.startswith("invalid: payload is not JSON")
    # Still held: the claimed restart (workers), the dead letter (the dead-letter stage).
    assert sorted(bench.holdings.release_all(), key=lambda d: d.message_id) == [
        batch[4], batch[0]
    ]
    counters = bench.counters
    assert (counters.received, counters.skipped, counters.duplicates) == (5, 1, 1)
    assert counters.skip_reasons == {Reason.INTERVAL: 1}


async def test_a_safety_controls_no_is_recorded_as_a_skip(tmp_path: Path) -> None:
    def no_web(msg: Message, when: datetime) -> Refusal | None:
        if msg.instance_name.startswith("web"):
            return Refusal(Reason.EXCLUDED, "host excluded by pattern 'web-*'")
        return None

    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    bench = await make_bench(ledger, WorkerSettings(skip_checks=[no_web]))
    try:
        await bench.decider.decide(bench.held(delivery("m1", "web-1"), delivery("m2", "db-1")))
        assert bench.settlements() == {"m1": Settlement.ACK}
        assert [c.message.message_id for c in _drain(bench.restarts)] == ["m2"]
        assert bench.counters.skip_reasons == {Reason.EXCLUDED: 1}
        (row,) = await ledger.history(hostname="web-1.example.net")
        assert (row.outcome, row.detail) == ("skipped", "host excluded by pattern 'web-*'")
    finally:
        ledger.owned.settled(ledger.owned.claims())
        await close(bench)
        await ledger.aclose()


async def test_a_ledger_that_cannot_decide_hands_the_batch_back(
    bench: Bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 50)
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None,
                            check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        await bench.decider.decide(bench.held(delivery("m1"), delivery("m2", "db-1")))
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert bench.settlements() == {"m1": Settlement.DEFER, "m2": Settlement.DEFER}
    assert _drain(bench.restarts) == []
    assert bench.counters.ledger_unavailable == 2
    assert len(bench.ledger.owned) == 0  # no claim left reserved


async def test_once_shutdown_began_nothing_is_decided(bench: Bench) -> None:
    bench.shutdown.request("SIGTERM")
    await bench.decider.decide(bench.held(delivery("m1")))
    assert bench.settlements() == {"m1": Settlement.NACK}
    assert await bench.ledger.history() == []


async def test_an_open_breaker_defers_every_restart_and_is_announced_once(
    tmp_path: Path,
) -> None:
    """Two daemons on one ledger: the restarts both would claim are deferred (they come
    back), the breaker announced by the one whose decision opened it; once resumed, the
    deferred messages come back and are restarted."""
    path = str(tmp_path / "ledger.db")
    settings = WorkerSettings(breaker=BreakerRule(0, None, HOUR))
    announced: list[Breaker] = []
    a, b = await open_ledger(path), await open_ledger(path)
    one, two = (await make_bench(a, settings, on_breaker=announced.append),
                await make_bench(b, settings, on_breaker=announced.append))
    try:
        failed = await decide_one(a, message("m0", "db-1"), settings.rules)
        await finish(a, failed, Outcome.FAILED)

        await one.decider.decide(one.held(
            delivery("m1", "web-1"), delivery("m2", "web-2"), delivery("m0", "db-1")
        ))
        await two.decider.decide(two.held(delivery("m3", "web-3")))
        # m0's restart failed: its retry is held back as well.
        assert one.settlements() == {"m1": Settlement.DEFER, "m2": Settlement.DEFER,
                                     "m0": Settlement.DEFER}
        assert two.settlements() == {"m3": Settlement.DEFER}
        assert _drain(one.restarts) == _drain(two.restarts) == []
        assert [breaker.why for breaker in announced] == [
            "1 restart failed in the last 1h (limit 0)"
        ]
        assert announced[0].opened_by == a.instance.instance_id

        assert await b.resume("alice") is not None
        await one.decider.decide(one.held(delivery("m1", "web-1"), delivery("m2", "web-2")))
        assert sorted(c.message.message_id for c in _drain(one.restarts)) == ["m1", "m2"]
        assert len(announced) == 1
    finally:
        for ledger, bench in ((a, one), (b, two)):
            ledger.owned.settled(ledger.owned.claims())
            await close(bench)
            await ledger.aclose()


async def test_an_unknown_outcome_met_again_is_told_as_unknown(tmp_path: Path) -> None:
    """A restart whose daemon stopped mid-way (its claim resolved as unknown by a peer's
    ledger sweep, or its successor's) was told to no one: its message, redelivered, is
    acked as a duplicate and told as ``unknown``; other duplicates are not told."""
    told: list[tuple[str, Outcome, str]] = []
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    bench = await make_bench(ledger, WorkerSettings(),
                             lambda msg, outcome, detail: told.append((msg.message_id, outcome,
                                                                       detail)))
    try:
        stranded, done = await decide(ledger, message("m0", "web-1"), message("m1", "db-1"))
        await finish(ledger, stranded, Outcome.UNKNOWN, "daemon d1 stopped mid-restart")
        await finish(ledger, done, Outcome.RESTARTED)
        await bench.decider.decide(bench.held(delivery("m0", "web-1"), delivery("m1", "db-1")))
        assert bench.settlements() == {"m0": Settlement.ACK, "m1": Settlement.ACK}
        assert [(m, o) for m, o, _ in told] == [("m0", Outcome.UNKNOWN)]
        assert "stopped mid-restart" in told[0][2]
    finally:
        await close(bench)
        await ledger.aclose()

async def test_a_reused_message_id_is_said_counted_and_decided_as_new(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    # A restarted emulator numbers its messages from 1 again.
    (earlier,) = await decide(bench.ledger, message("1", "web-1"))
    await finish(bench.ledger, earlier, Outcome.RESTARTED)
    await bench.decider.decide(bench.held(delivery("1", "db-7")))

    (claimed,) = _drain(bench.restarts)
    assert (claimed.message.message_id, claimed.message.hostname) == ("1", "db-7.example.net")
    assert (bench.counters.message_id_conflicts, bench.counters.duplicates) == (1, 0)
    (record,) = [r for r in caplog.records if "reused" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "message id 1 reused: the ledger holds it for web-1.example.net, this message is"
        " for db-7.example.net; decided as a new message"
    )
