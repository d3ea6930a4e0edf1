"""A restart worker, directly: a claimed restart in, its outcome handed on as a value (to the
settler's stream, or with the message to the dead letters). Claims come from the real
SQLite ledger; the restarter is scripted."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest

from mandrill.blockers import Blockers
from mandrill.errors import BlockerError
from mandrill.holdings import Holdings
from mandrill.ledger import SQLLedger, open_ledger
from mandrill.ledger.base import DeadLetterRecord
from mandrill.message import Message
from mandrill.obs.counters import Counters
from mandrill.policy import Outcome, Reason, Settlement
from mandrill.settler import Outbox, Settle, settle_stream
from mandrill.shutdown import Shutdown
from mandrill.worker import Claimed, Worker, WorkerSettings
from tests.ledger import decide_one, delivery, message
from tests.support.fakes import ScriptedRestarter


@dataclass
class Bench:
    ledger: SQLLedger
    holdings: Holdings
    counters: Counters
    shutdown: Shutdown
    settled: anyio.abc.ObjectReceiveStream[Settle]
    lettered: anyio.abc.ObjectReceiveStream[DeadLetterRecord]
    outbox: Outbox
    letters: anyio.abc.ObjectSendStream[DeadLetterRecord]
    workers: list[Worker]

    def worker(
        self, restarter: ScriptedRestarter, blockers: Blockers | None = None, **settings: object
    ) -> Worker:
        worker = Worker(
            restarter=restarter, settings=WorkerSettings(**settings),  # type: ignore[arg-type]
            counters=self.counters, shutdown=self.shutdown, outbox=self.outbox.clone(),
            dead_letters=self.letters.clone(), blockers=blockers,
        )
        self.workers.append(worker)
        return worker

    async def claimed(self, host: str, message_id: str | None = None) -> Claimed:
        message_id = message_id or f"m-{host}"
        decided = await decide_one(self.ledger, message(message_id, host))
        assert decided.claim is not None
        each = delivery(message_id, host)
        self.holdings.add(each, 0.0, 600.0)
        return Claimed(each, message(message_id, host), decided.claim)


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    ledger = await open_ledger(":memory:")
    send, receive = settle_stream()
    letters, lettered = anyio.create_memory_object_stream[DeadLetterRecord](math.inf)
    holdings = Holdings(16)
    bench = Bench(ledger, holdings, Counters(), Shutdown(), receive, lettered,
                  Outbox(send, holdings), letters, [])
    with receive, lettered, bench.outbox, letters:
        yield bench
        for worker in bench.workers:
            worker.close()
    await ledger.aclose()


async def test_a_restart_goes_on_to_be_acked_with_its_outcome(bench: Bench) -> None:
    claimed = await bench.claimed("web-1")
    await bench.worker(ScriptedRestarter()).restart(claimed)
    settled = bench.settled.receive_nowait()
    assert settled.delivery is claimed.delivery
    assert settled.settlement is Settlement.ACK
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.detail) == (Outcome.RESTARTED, "scripted")
    assert claimed.claim.began
    assert len(bench.holdings) == 0  # its in-flight slot is free at once
    assert bench.counters.restarted == 1


async def test_a_failed_restart_is_nacked_then_dead_lettered_at_max_attempts(
    bench: Bench,
) -> None:
    worker = bench.worker(ScriptedRestarter(always_fail=["flaky"]), max_attempts=2)
    first = await bench.claimed("flaky")
    await worker.restart(first)
    settled = bench.settled.receive_nowait()
    assert settled.settlement is Settlement.NACK
    assert settled.finish is not None
    assert settled.finish.outcome is Outcome.FAILED
    await bench.ledger.finish([settled.finish])

    second = await bench.claimed("flaky")  # the redelivery: one failure already
    assert second.claim.failures == 1
    await worker.restart(second)
    letter = bench.lettered.receive_nowait()
    assert (letter.reason, letter.detail) == (Reason.MAX_ATTEMPTS, "restart failed 2 times")
    assert letter.finish is not None
    assert letter.finish.outcome is Outcome.FAILED
    assert len(bench.holdings) == 1  # held until the dead letter is kept


async def test_a_claim_taken_once_shutdown_began_is_not_started(bench: Bench) -> None:
    restarter = ScriptedRestarter()
    claimed = await bench.claimed("web-1")
    bench.shutdown.request("SIGTERM")
    await bench.worker(restarter).restart(claimed)
    assert sum(restarter.calls.values()) == 0
    assert not claimed.claim.began
    settled = bench.settled.receive_nowait()
    assert settled.settlement is Settlement.NACK  # never began: redelivered
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (
        Outcome.CANCELLED, Reason.NOT_STARTED,
    )


@pytest.mark.parametrize(("retry_unknown", "settlement"), [
    (False, Settlement.ACK), (True, Settlement.NACK),
])
async def test_a_restart_cancelled_after_it_began_hands_on_an_unknown_outcome(
    bench: Bench, retry_unknown: bool, settlement: Settlement
) -> None:
    restarter = ScriptedRestarter(block=["db-1"])
    claimed = await bench.claimed("db-1")
    worker = bench.worker(restarter, retry_unknown=retry_unknown)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.restart, claimed)
        await restarter.started.wait()
        tg.cancel_scope.cancel()
    settled = bench.settled.receive_nowait()
    assert settled.settlement is settlement
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (Outcome.UNKNOWN, Reason.INTERRUPTED)
    assert "interrupted after it began" in settled.finish.detail
    assert bench.counters.restart_unknown == 1


async def test_a_dry_run_restarts_nothing_and_records_it(bench: Bench) -> None:
    restarter = ScriptedRestarter()
    claimed = await bench.claimed("web-1")
    await bench.worker(restarter, dry_run=True).restart(claimed)
    assert sum(restarter.calls.values()) == 0
    settled = bench.settled.receive_nowait()
    assert settled.finish is not None
    assert (settled.settlement, settled.finish.outcome) == (Settlement.ACK, Outcome.DRY_RUN)


async def test_a_worker_ends_with_its_stream_and_closes_what_it_holds(bench: Bench) -> None:
    claims, to_restart = anyio.create_memory_object_stream[Claimed](math.inf)
    claims.send_nowait(await bench.claimed("web-1"))
    claims.close()
    worker = bench.worker(ScriptedRestarter())
    with anyio.fail_after(5):
        await worker.run(to_restart)
    assert bench.settled.receive_nowait().settlement is Settlement.ACK
    bench.outbox.close()
    bench.letters.close()
    # Every sender closed: both streams end.
    with pytest.raises(anyio.EndOfStream):
        bench.settled.receive_nowait()
    with pytest.raises(anyio.EndOfStream):
        bench.lettered.receive_nowait()


# --- blockers, asked just before a restart begins -------------------------------------------


class ScriptedBlocker:
    """Says ``answer`` (raises it, if an exception); with ``hold``, waits until released."""

    name = "scripted"

    def __init__(self, answer: str | Exception | None, hold: bool = False) -> None:
        self.answer = answer
        self.hold = hold
        self.asked = anyio.Event()
        self.release = anyio.Event()
        self.hosts: list[str] = []

    async def check(self, message: Message) -> str | None:
        self.hosts.append(message.hostname)
        self.asked.set()
        if self.hold:
            await self.release.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_a_blocked_restart_never_begins_and_its_message_comes_back_later(
    bench: Bench,
) -> None:
    restarter = ScriptedRestarter()
    blocker = ScriptedBlocker("1 firing alert: NodeDown")
    claimed = await bench.claimed("web-1")
    await bench.worker(restarter, Blockers([blocker])).restart(claimed)
    assert blocker.hosts == ["web-1.example.net"]
    assert sum(restarter.calls.values()) == 0
    assert not claimed.claim.began
    settled = bench.settled.receive_nowait()
    assert settled.settlement is Settlement.DEFER  # after a pause, not at once
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (Outcome.CANCELLED, Reason.BLOCKED)
    assert settled.finish.detail == (
        "blocked by scripted: 1 firing alert: NodeDown; not started, the message comes back later"
    )
    assert bench.counters.blocked == {"scripted": 1}
    assert not bench.counters.blocker_errors
    assert (bench.counters.restart_cancelled, bench.counters.restarted) == (0, 0)
    # Recorded as never begun: the host is free, and the redelivery is decided afresh.
    await bench.ledger.finish([settled.finish])
    again = await bench.claimed("web-1")
    assert again.claim.restart_id != claimed.claim.restart_id


async def test_a_blocker_that_cannot_tell_blocks(bench: Bench) -> None:
    restarter = ScriptedRestarter()
    blockers = Blockers([ScriptedBlocker(BlockerError("HTTP 500 from http://prom"))])
    claimed = await bench.claimed("web-1")
    await bench.worker(restarter, blockers).restart(claimed)
    assert sum(restarter.calls.values()) == 0
    settled = bench.settled.receive_nowait()
    assert settled.settlement is Settlement.DEFER
    assert settled.finish is not None
    assert settled.finish.reason is Reason.BLOCKED
    assert "cannot tell, so blocking: HTTP 500 from http://prom" in settled.finish.detail
    assert bench.counters.blocker_errors == {"scripted": 1}


async def test_a_blocker_with_a_bug_blocks(bench: Bench) -> None:
    claimed = await bench.claimed("web-1")
    blockers = Blockers([ScriptedBlocker(ZeroDivisionError("oops"))])
    await bench.worker(ScriptedRestarter(), blockers).restart(claimed)
    settled = bench.settled.receive_nowait()
    assert settled.finish is not None
    assert "bug: ZeroDivisionError('oops')" in settled.finish.detail
    assert bench.counters.blocker_errors == {"scripted": 1}


async def test_blockers_that_say_yes_let_the_restart_go_ahead(bench: Bench) -> None:
    blockers = Blockers([ScriptedBlocker(None), ScriptedBlocker(None)])
    claimed = await bench.claimed("web-1")
    await bench.worker(ScriptedRestarter(), blockers).restart(claimed)
    settled = bench.settled.receive_nowait()
    assert settled.finish is not None
    assert (settled.settlement, settled.finish.outcome) == (Settlement.ACK, Outcome.RESTARTED)
    assert not bench.counters.blocked


async def test_a_dry_run_is_blocked_too(bench: Bench) -> None:
    claimed = await bench.claimed("web-1")
    blockers = Blockers([ScriptedBlocker("no")])
    await bench.worker(ScriptedRestarter(), blockers, dry_run=True).restart(claimed)
    settled = bench.settled.receive_nowait()
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (Outcome.CANCELLED, Reason.BLOCKED)
    assert bench.counters.dry_run == 0


async def test_a_worker_cancelled_while_asking_hands_on_a_claim_not_started(
    bench: Bench,
) -> None:
    blocker = ScriptedBlocker(None, hold=True)
    restarter = ScriptedRestarter()
    claimed = await bench.claimed("web-1")
    worker = bench.worker(restarter, Blockers([blocker]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.restart, claimed)
        await blocker.asked.wait()
        tg.cancel_scope.cancel()
    assert not claimed.claim.began
    settled = bench.settled.receive_nowait()
    assert settled.settlement is Settlement.NACK
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (
        Outcome.CANCELLED, Reason.NOT_STARTED,
    )
    assert sum(restarter.calls.values()) == 0


async def test_a_shutdown_that_comes_while_asking_stops_the_restart_beginning(
    bench: Bench,
) -> None:
    blocker = ScriptedBlocker(None, hold=True)
    restarter = ScriptedRestarter()
    claimed = await bench.claimed("web-1")
    worker = bench.worker(restarter, Blockers([blocker]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.restart, claimed)
        await blocker.asked.wait()
        bench.shutdown.request("SIGTERM")
        blocker.release.set()
    assert sum(restarter.calls.values()) == 0
    settled = bench.settled.receive_nowait()
    assert settled.finish is not None
    assert (settled.finish.outcome, settled.finish.reason) == (
        Outcome.CANCELLED, Reason.NOT_STARTED,
    )
