"""The settler: batched acks, nacks and deferrals, and no ack id ever dropped."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from mandrill.errors import LedgerError, SourceError
from mandrill.holdings import Holdings
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import DEFER_SECONDS
from mandrill.settler import Settler
from mandrill.sources.memory import MemoryBroker
from tests.ledger import delivery


class FlakySource(MemoryBroker):
    """Records what it was sent; the first ``failures`` calls of each kind fail."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = {"ack": failures, "deadline": failures}
        self.sent: list[tuple[str, list[str]]] = []

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        self._maybe_fail("ack")
        self.sent.append(("ack", list(ack_ids)))

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        self._maybe_fail("deadline")
        self.sent.append((f"deadline {seconds:g}", list(ack_ids)))

    def _maybe_fail(self, kind: str) -> None:
        if self.failures[kind]:
            self.failures[kind] -= 1
            raise SourceError(f"{kind} refused")


def held(*message_ids: str) -> tuple[Holdings, list[Delivery]]:
    holdings = Holdings(10)
    deliveries = [delivery(message_id) for message_id in message_ids]
    for each in deliveries:
        holdings.add(each, 0.0, 60.0)
    return holdings, deliveries


async def test_each_kind_goes_in_batches_of_its_own() -> None:
    source = FlakySource(failures=0)
    holdings, (a, b, c, d, e) = held("a", "b", "c", "d", "e")
    settler = Settler(source, holdings, Counters(), max_batch=2)
    settler.ack(a)
    settler.ack(b)
    settler.ack(c)
    settler.nack(d)
    settler.defer(e)
    assert len(holdings) == 0
    await settler.flush()
    assert source.sent == [
        ("ack", ["ack-a", "ack-b"]),
        ("deadline 0", ["ack-d"]),
        (f"deadline {DEFER_SECONDS:g}", ["ack-e"]),
        ("ack", ["ack-c"]),
    ]
    assert settler.pending == 0


async def test_what_a_failed_request_carried_is_sent_by_the_next_flush() -> None:
    source = FlakySource(failures=1)
    holdings, (a, b, c) = held("a", "b", "c")
    settler = Settler(source, holdings, Counters())
    settler.ack(a)
    settler.nack(b)
    settler.defer(c)
    with pytest.raises(SourceError, match="ack refused"):
        await settler.flush()
    assert settler.pending == 3  # nothing dropped
    with pytest.raises(SourceError, match="deadline refused"):
        await settler.flush()
    assert settler.pending == 2
    await settler.flush()
    assert source.sent == [
        ("ack", ["ack-a"]),
        ("deadline 0", ["ack-b"]),
        (f"deadline {DEFER_SECONDS:g}", ["ack-c"]),
    ]
    assert settler.pending == 0


class GatedSource(FlakySource):
    """Acknowledgements wait at a gate the test opens."""

    def __init__(self) -> None:
        super().__init__(failures=0)
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().acknowledge(ack_ids)


async def test_a_final_flush_waits_for_the_request_the_run_loop_has_in_flight() -> None:
    # The final settlement flushes while the run loop may be sending: returning early
    # would leave that request to be cancelled with the loop, its ack ids unsent.
    source = GatedSource()
    holdings, (a,) = held("a")
    settler = Settler(source, holdings, Counters(), max_delay=0)
    async with anyio.create_task_group() as tg:
        await tg.start(settler.run)
        settler.ack(a)
        await source.waiting.wait()  # the run loop's request is in flight, nothing queued
        flushed = anyio.Event()

        async def final_flush() -> None:
            await settler.flush()
            flushed.set()

        tg.start_soon(final_flush)
        await anyio.wait_all_tasks_blocked()
        assert not flushed.is_set()
        source.gate.set()
        await flushed.wait()
        tg.cancel_scope.cancel()
    assert settler.pending == 0
    assert source.sent == [("ack", [a.ack_id])]


async def test_deferrals_go_with_their_own_delay() -> None:
    source = FlakySource(failures=0)
    holdings, (a, b, c) = held("a", "b", "c")
    settler = Settler(source, holdings, Counters())
    settler.defer(a, 10)
    settler.defer(b, 40)
    settler.defer(c, 10)
    await settler.flush()
    assert sorted(source.sent) == [("deadline 10", ["ack-a", "ack-c"]), ("deadline 40", ["ack-b"])]
    assert settler.pending == 0


async def test_a_settlement_after_a_write_waits_for_it_and_keeps_the_lease() -> None:
    source = FlakySource(failures=0)
    holdings, (a, b) = held("a", "b")
    settler = Settler(source, holdings, Counters())
    written = anyio.Event()
    settler.after(written.wait(), a, settler.ack)
    settler.nack(b)
    assert len(holdings) == 0  # in-flight slots are freed at once, as for every settlement
    async with anyio.create_task_group() as tg:
        tg.start_soon(settler.flush)
        await anyio.wait_all_tasks_blocked()
        assert source.sent == []  # nothing goes out ahead of the write
        written.set()
    assert source.sent == [("ack", ["ack-a"]), ("deadline 0", ["ack-b"])]


async def test_a_failed_write_is_logged_and_its_delivery_settled_all_the_same(caplog) -> None:
    source = FlakySource(failures=0)
    holdings, (a,) = held("a")
    settler = Settler(source, holdings, Counters())

    async def failed() -> None:
        raise LedgerError("ledger write failed: disk full")

    settler.after(failed(), a, settler.ack)
    await settler.flush()
    assert source.sent == [("ack", ["ack-a"])]
    assert "could not record the outcome of message a: ledger write failed" in caplog.text
