"""Which message a message id names. Real Pub/Sub never reuses one, but a restarted
emulator numbers its messages from 1 again: a message whose id the ledger already holds
for another message is a new message, saved beside it as the id's next *generation* (its
restarts name that generation too), never taken for a redelivery. Like
:mod:`mandrill.ledger.sql`, the queries run inside the caller's transaction.

A redelivery carries its message's payload and publish time; a message that differs in
either is another message. Not compared: the host, which is the payload read under
``--domain`` — a changed domain must not turn a redelivery into a second restart.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from mandrill.ledger.schema import Cursor, Dialect

#: What a conflict names as the saved message's host when it had none (a dead letter).
NO_HOST = "no host (a dead letter)"


class Version(NamedTuple):
    """A message the ledger holds under an id (``hostname`` None: a dead letter)."""

    generation: int
    hostname: str | None
    data: bytes
    publish_time: float | None


class Identity(NamedTuple):
    """A message's generation under its id, and ``conflict``: the host of the other
    message the ledger held under that id (its latest generation), "" if there was none."""

    generation: int
    conflict: str = ""


def read_versions(
    cur: Cursor, d: Dialect, subscription: str, message_ids: Collection[str]
) -> dict[str, list[Version]]:
    """Every message saved under ``message_ids`` in ``subscription`` (or in no known
    subscription: rows from before subscriptions were recorded), by id."""
    cur.execute(
        d.sql(
            "SELECT message_id, generation, hostname, data, publish_time FROM messages"
            f" WHERE subscription IN (?, '') AND message_id {d.in_list}"
        ),
        (subscription, d.list_param(list(message_ids))),
    )
    versions: dict[str, list[Version]] = {}
    for message_id, generation, hostname, data, publish_time in cur.fetchall():
        versions.setdefault(message_id, []).append(
            Version(int(generation), hostname, bytes(data), publish_time)
        )
    return versions


def identify(
    versions: dict[str, list[Version]],
    message_id: str,
    hostname: str | None,
    data: bytes,
    publish_time: float | None,
) -> Identity:
    """The generation of the message ``message_id`` with this payload and publish time
    among ``versions``: the saved one it is a redelivery of, else a new one (added to
    ``versions``, so that a later message of the same batch finds it)."""
    known = versions.get(message_id)
    if not known:
        versions[message_id] = [Version(0, hostname, data, publish_time)]
        return Identity(0)
    for version in known:
        if version.data == data and (
            version.publish_time is None or publish_time is None
            or version.publish_time == publish_time
        ):
            return Identity(version.generation)
    latest = max(known, key=_generation)
    known.append(Version(latest.generation + 1, hostname, data, publish_time))
    return Identity(latest.generation + 1, latest.hostname or NO_HOST)


def _generation(version: Version) -> int:
    return version.generation


__all__ = ["NO_HOST", "Identity", "Version", "identify", "read_versions"]
