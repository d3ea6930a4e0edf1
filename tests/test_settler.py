"""The settler, the last stage: outcomes recorded first (one transaction a batch), then acks,
nacks and deferrals in batches; it ends once every outbox is closed and all is sent. The
ledger is the real SQLite one; the source records what it is sent."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from mandrill.errors import SourceError
from mandrill.holdings import Holdings
from mandrill.ledger import SQLLedger, open_ledger, sqlite
from mandrill.ledger.base import Finish
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import Outcome, Settlement, defer_seconds
from mandrill.settler import Outbox, Settler, settle_stream
from mandrill.sources.memory import MemoryBroker
from tests.ledger import decide_one, delivery, message


class RecordingSource(MemoryBroker):
    """Records what it was sent; the first ``failures`` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.sent: list[tuple[str, list[str]]] = []

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        self._maybe_fail()
        self.sent.append(("ack", list(ack_ids)))

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        self._maybe_fail()
        self.sent.append((f"deadline {seconds:g}", list(ack_ids)))

    def _maybe_fail(self) -> None:
        if self.failures:
            self.failures -= 1
            raise SourceError("refused")


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLLedger]:
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    yield ledger
    await ledger.aclose()


def held(*message_ids: str) -> tuple[Holdings, list[Delivery]]:
    holdings = Holdings(10)
    deliveries = [delivery(message_id) for message_id in message_ids]
    for each in deliveries:
        holdings.add(each, 0.0, 60.0)
    return holdings, deliveries


async def settle_all(
    source: RecordingSource, ledger: SQLLedger, items: list[tuple[Delivery, Settlement]],
    holdings: Holdings, *, finishes: dict[str, Finish] | None = None, max_batch: int = 1000,
) -> Counters:
    """Hand ``items`` to a settler through an outbox, close it, and let the settler end."""
    counters = Counters()
    send, receive = settle_stream()
    settler = Settler(source, ledger, counters, receive, max_batch=max_batch, max_delay=0)
    with Outbox(send, holdings) as outbox:
        for each, settlement in items:
            outbox.settle(each, settlement, (finishes or {}).get(each.message_id))
        assert len(holdings) == 0  # every in-flight slot is freed at once
    with anyio.fail_after(10):
        await settler.run()  # ends: its only outbox is closed, and all is sent
    assert settler.pending == 0
    return counters


async def test_each_kind_goes_in_batches_of_its_own(ledger: SQLLedger) -> None:
    source = RecordingSource()
    holdings, (a, b, c, d, e) = held("a", "b", "c", "d", "e")
    counters = await settle_all(source, ledger, [
        (a, Settlement.ACK), (b, Settlement.ACK), (c, Settlement.ACK),
        (d, Settlement.NACK), (e, Settlement.DEFER),
    ], holdings, max_batch=2)
    # Batches of two, taken in order; in each, acks, then nacks, then deferrals.
    assert source.sent == [
        ("ack", ["ack-a", "ack-b"]),
        ("ack", ["ack-c"]),
        ("deadline 0", ["ack-d"]),
        (f"deadline {defer_seconds(e.delivery_attempt)}", ["ack-e"]),
    ]
    assert (counters.acked, counters.nacked, counters.deferred) == (3, 1, 1)


async def test_an_outcome_is_recorded_before_its_message_is_acked(ledger: SQLLedger) -> None:
    source = RecordingSource()
    claimed = await decide_one(ledger, message("a"))
    assert claimed.claim is not None
    holdings, (a,) = held("a")
    finish = Finish(claimed.claim, Outcome.RESTARTED, "exit 0")
    await settle_all(source, ledger, [(a, Settlement.ACK)], holdings, finishes={"a": finish})
    assert source.sent == [("ack", ["ack-a"])]
    assert [row.outcome for row in await ledger.history()] == ["restarted"]
    assert len(ledger.owned) == 0


async def test_nothing_is_acked_whose_outcome_is_kept_nowhere(
    ledger: SQLLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No journal, and the ledger locked by another process: the outcome is kept only in
    # memory (written by a later heartbeat). Its message is handed back for later.
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 50)
    source = RecordingSource()
    claimed = await decide_one(ledger, message("a"))
    assert claimed.claim is not None
    holdings, (a,) = held("a")
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None,
                            check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        finish = Finish(claimed.claim, Outcome.RESTARTED, "exit 0")
        counters = await settle_all(source, ledger, [(a, Settlement.ACK)], holdings,
                                    finishes={"a": finish})
        other.execute("COMMIT")
    finally:
        other.close()
    assert source.sent == [(f"deadline {defer_seconds(a.delivery_attempt)}", ["ack-a"])]
    assert (counters.acked, counters.deferred) == (0, 1)


async def test_a_source_that_gives_up_stops_the_settler(ledger: SQLLedger) -> None:
    source = RecordingSource(failures=1)
    holdings, (a,) = held("a")
    with pytest.raises(ExceptionGroup) as stopped:
        await settle_all(source, ledger, [(a, Settlement.ACK)], holdings)
    assert stopped.group_contains(SourceError, match="refused")


async def test_a_source_that_does_not_answer_does_not_hold_up_the_recording(
    ledger: SQLLedger,
) -> None:
    # Pub/Sub down: the first ack is retried for as long as it takes. The outcomes that
    # come meanwhile are recorded all the same, so that their claims do not stay open
    # (their hosts waiting) for as long as the outage lasts.
    gate = anyio.Event()

    class Unanswered(RecordingSource):
        async def acknowledge(self, ack_ids: Sequence[str]) -> None:
            await gate.wait()
            await super().acknowledge(ack_ids)

    source = Unanswered()
    first = await decide_one(ledger, message("a", "a"))
    second = await decide_one(ledger, message("b", "b"))
    holdings, (a, b) = held("a", "b")
    send, receive = settle_stream()
    settler = Settler(source, ledger, Counters(), receive, max_delay=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(settler.run)
        with Outbox(send, holdings) as outbox:
            assert first.claim is not None
            assert second.claim is not None
            outbox.settle(a, Settlement.ACK, Finish(first.claim, Outcome.RESTARTED, ""))
            await anyio.wait_all_tasks_blocked()  # its ack is sent: and waits
            outbox.settle(b, Settlement.ACK, Finish(second.claim, Outcome.RESTARTED, ""))
            await anyio.wait_all_tasks_blocked()
            assert [row.outcome for row in await ledger.history()] == ["restarted"] * 2
            gate.set()
    assert source.sent == [("ack", ["ack-a"]), ("ack", ["ack-b"])]


async def test_the_settler_ends_only_when_every_outbox_is_closed(ledger: SQLLedger) -> None:
    source = RecordingSource()
    holdings, (a, b) = held("a", "b")
    send, receive = settle_stream()
    settler = Settler(source, ledger, Counters(), receive, max_delay=0)
    first = Outbox(send, holdings)
    second = first.clone()
    done = anyio.Event()

    async def run() -> None:
        await settler.run()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        first.settle(a, Settlement.ACK)
        first.close()
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()  # the second outbox may still hand something on
        second.settle(b, Settlement.NACK)
        second.close()
    assert source.sent == [("ack", ["ack-a"]), ("deadline 0", ["ack-b"])]


async def test_a_settlement_frees_its_slot_even_from_a_cancelled_task(ledger: SQLLedger) -> None:
    # What a worker cancelled mid-restart does: hand its message on, then re-raise.
    holdings, (a,) = held("a")
    send, receive = settle_stream()
    with anyio.CancelScope() as scope:
        scope.cancel()
        with Outbox(send, holdings) as outbox:
            outbox.settle(a, Settlement.ACK)
            await anyio.lowlevel.checkpoint()  # where the cancelled task re-raises
    assert scope.cancelled_caught
    assert len(holdings) == 0
    assert receive.receive_nowait().delivery is a
    receive.close()
