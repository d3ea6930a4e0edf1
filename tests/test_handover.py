"""The hand-over from the consumer to the workers: first in first out, straight to a
waiting worker, nothing lost when a worker is cancelled, and an end once closed."""

from __future__ import annotations

import anyio
import pytest

from mandrill.handover import Handover


async def test_items_queued_before_anyone_waits_come_out_in_order() -> None:
    handover: Handover[int] = Handover()
    for item in (1, 2, 3):
        handover.put(item)
    assert [await handover.get() for _ in range(3)] == [1, 2, 3]


async def test_an_item_goes_straight_to_the_worker_that_waited_longest() -> None:
    handover: Handover[str] = Handover()
    got: list[tuple[str, str]] = []

    async def worker(name: str) -> None:
        got.append((name, await handover.get()))

    async with anyio.create_task_group() as tg:
        for name in ("first", "second"):
            tg.start_soon(worker, name)
            await anyio.wait_all_tasks_blocked()
        handover.put("a")
        handover.put("b")
    assert dict(got) == {"first": "a", "second": "b"}  # (they may run in either order)
    assert len(handover) == 0


async def test_closing_ends_waiting_workers_and_lets_the_rest_drain() -> None:
    handover: Handover[int] = Handover()
    drained: list[int] = []

    async def worker() -> None:
        async for item in handover:
            drained.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()
        handover.put(1)
        handover.close()
    assert drained == [1]
    with pytest.raises(anyio.ClosedResourceError):
        handover.put(2)
    with pytest.raises(anyio.EndOfStream):
        await handover.get()


async def test_an_item_handed_to_a_worker_as_it_is_cancelled_goes_to_another() -> None:
    handover: Handover[str] = Handover()
    got: list[str] = []

    async def worker(task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            got.append(await handover.get())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            doomed = await tg.start(worker)
            await anyio.wait_all_tasks_blocked()
            await tg.start(worker)
            await anyio.wait_all_tasks_blocked()
            doomed.cancel()  # its cancellation is on its way, and then …
            handover.put("item")  # … it is handed the item, as the first waiter
    assert got == ["item"]  # the second worker has it


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    handover: Handover[int] = Handover()
    with anyio.move_on_after(0.01):
        await handover.get()
    handover.put(1)  # not handed to the departed waiter
    assert len(handover) == 1
    assert await handover.get() == 1
