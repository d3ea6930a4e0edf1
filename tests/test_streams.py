"""``ready``: what a stream holds now, taken as iterated."""

from __future__ import annotations

from itertools import islice

import anyio

from mandrill.streams import ready


def test_takes_what_is_there_and_leaves_the_rest_when_stopped_early() -> None:
    send, receive = anyio.create_memory_object_stream[int](10)
    with send, receive:
        for item in range(5):
            send.send_nowait(item)
        assert list(islice(ready(receive), 3)) == [0, 1, 2]
        assert list(ready(receive)) == [3, 4]
        assert list(ready(receive)) == []  # empty: stops rather than waits


def test_stops_at_the_end_of_a_stream_and_at_a_closed_one() -> None:
    send, receive = anyio.create_memory_object_stream[int](10)
    send.send_nowait(1)
    send.close()
    assert list(ready(receive)) == [1]  # then EndOfStream
    receive.close()
    assert list(ready(receive)) == []  # ClosedResourceError
