"""SIGUSR1 task dumps: every task by name, nested under its parent, with the line it waits at."""

from __future__ import annotations

import os
import signal

import anyio

from mandrill.obs.taskdump import dump_tasks_on_signal, format_task_tree


async def wait_for_work(event: anyio.Event) -> None:
    await event.wait()


async def supervise(event: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_work, event, name="worker-0")
        tg.start_soon(wait_for_work, event, name="worker-10")
        tg.start_soon(wait_for_work, event, name="worker-2")


def line_of(text: str, name: str) -> str:
    (line,) = [line for line in text.splitlines() if line.lstrip() == f"- {name}"]
    return line


def depth(line: str) -> int:
    return len(line) - len(line.lstrip())


async def test_dump_shows_the_tree_and_where_each_task_waits():
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_work, release, name="consumer")
        tg.start_soon(supervise, release, name="workers")
        await anyio.wait_all_tasks_blocked()
        text = format_task_tree()
        release.set()
    # Idle workers waiting at the same line are one entry, in natural order.
    workers = "worker-0, worker-2, worker-10 (3 tasks, same stack)"
    for name in ("consumer", "workers", workers):
        assert line_of(text, name)
    assert depth(line_of(text, workers)) > depth(line_of(text, "workers"))
    assert depth(line_of(text, "consumer")) == depth(line_of(text, "workers"))
    consumer = text.split("- consumer\n", 1)[1].split("\n- ", 1)[0]
    assert "in wait_for_work" in consumer
    assert "await event.wait()" in consumer
    assert "in supervise" in text


async def test_many_alike_tasks_are_summarised():
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        for number in range(6):
            tg.start_soon(wait_for_work, release, name=f"worker-{number}")
        await anyio.wait_all_tasks_blocked()
        text = format_task_tree()
        release.set()
    assert line_of(text, "worker-0, worker-1, worker-2 and 3 more (6 tasks, same stack)")


async def test_sigusr1_dumps_the_tree():
    dumps: list[str] = []
    dumped = anyio.Event()

    def write(text: str) -> None:
        dumps.append(text)
        dumped.set()

    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: dump_tasks_on_signal(write=write,
                                                                task_status=task_status))
        tg.start_soon(wait_for_work, release, name="consumer")
        await anyio.wait_all_tasks_blocked()
        os.kill(os.getpid(), signal.SIGUSR1)
        with anyio.fail_after(5):
            await dumped.wait()
        release.set()
        tg.cancel_scope.cancel()
    (text,) = dumps
    assert "- consumer" in text
    assert "in wait_for_work" in text
    assert "in dump_tasks_on_signal" in text
