"""The reliability scenarios: each runs real ``mandrill run`` processes against a real
emulator (and PostgreSQL for the fleet ones), injects one kind of fault, and returns a
:class:`~tests.reliability.harness.Result` computed from the ledger.

The promise under test: **no message lost, no host restarted twice by one message, no crash
on bad input.** Each scenario is ``async def scenario(env, backend, scale) -> Result``:
``backend`` is the daemons' ``--backend``; ``scale`` (1 in the regular suite, larger in the
report) multiplies message counts, rates and durations. A scenario asserts what only it can
check (a log line, an exit code, an attempt count) and leaves ``lost``/``double_restarts``
to its caller, so that the report can print a failing run rather than stop at it.

Terms, as the ledger has them: a message is *processed* when it has a final decision
(``restarts.outcome`` restarted/skipped/dry_run, or ``messages.status = 'dead_letter'``);
*lost* when a published message has none at the end; a *double restart* is a message with
more than one ``restarted`` row, or a host with two ``restarted`` rows less than
``--min-restart-interval`` (7 days here) apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import statistics
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from tests.reliability import payloads
from tests.reliability.harness import (
    MIN_ACK_DEADLINE,
    Daemon,
    Gate,
    LedgerRef,
    Misjudged,
    PinnedEmulator,
    PubSub,
    PubSubNames,
    Result,
    chaos_messages,
    eventually,
    instance_payload,
    postgres_role,
    postgres_schema,
    run_args,
    running_daemon,
    verdict,
)

#: The promise: a message stranded by a daemon killed mid-restart is settled, with a
#: recorded outcome, within this many seconds of the kill (well before a dead-letter
#: policy of 10 deliveries, deferred 10 s each, would take it).
STRANDED_BOUND_SECONDS = 90.0
#: ``--instance-timeout`` in the suite (scale 1): short, to keep it fast. The report, at
#: larger scales, runs with the default (30 s), whose bound is the one promised.
SUITE_INSTANCE_TIMEOUT = "5s"
#: Generous bounds for a shared, busy 2-core machine: they only stop a hung run.
START_SECONDS = 60.0
DRAIN_SECONDS = 120.0


@dataclass
class Env:
    """Where scenarios run: an emulator, a PostgreSQL server, a scratch directory."""

    #: ``host:port`` of a running emulator (the daemons' ``PUBSUB_EMULATOR_HOST``).
    emulator: str
    #: A database the scenarios may create schemas and roles in.
    postgres_admin_url: str
    workdir: Path
    #: The event loop the harness itself runs on (its own Pub/Sub calls).
    harness_backend: str
    #: The emulator's launcher, for scenarios that start an emulator of their own.
    launcher: Path | None = None

    @property
    def pubsub(self) -> PubSub:
        return PubSub(self.emulator, self.harness_backend)

    def path(self, name: str, suffix: str = "") -> Path:
        return self.workdir / f"{name}-{uuid.uuid4().hex[:8]}{suffix}"


Scenario = Callable[[Env, str, int], Awaitable[Result]]

COMMON = ["--restart-failure-rate", "0", "--grace", "5s"]


def _ready(daemon: Daemon) -> Awaitable[int]:
    return daemon.wait_for_message("ready: consuming", seconds=START_SECONDS)


# -- SIGKILL while holding ------------------------------------------------------------------


def _instance_timeout(scale: int) -> list[str]:
    return ["--instance-timeout", SUITE_INSTANCE_TIMEOUT] if scale == 1 else []


async def sigkill_while_holding(env: Env, backend: str, scale: int) -> Result:
    """Two daemons share a subscription (10 s ack deadline, dead-letter policy of 10
    deliveries) and a PostgreSQL ledger; one is SIGKILLed while it holds messages, most of
    them mid-restart.

    Proves: (1) what the dead daemon held comes back by lease expiry and goes to the other
    daemon; (2) the survivor does not restart a host whose claim is live (a crash
    mid-restart looks like a slow restart at first): those messages wait; (3) once the
    dead daemon has missed its heartbeats for ``--instance-timeout``, the survivor resolves
    its claims as ``unknown`` (counted as restarts: no host twice) and settles their
    messages, within :data:`STRANDED_BOUND_SECONDS` of the kill; nothing reaches the
    dead-letter topic. Figures: the claims stranded, and when the last was resolved.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("kill")
    await env.pubsub.setup(names, ack_deadline=MIN_ACK_DEADLINE, dead_letters=True,
                           max_delivery_attempts=10)
    count = 30 * scale
    in_flight = 4 + 2 * scale
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(postgres_schema(env.postgres_admin_url))
        ledger = LedgerRef(url)
        args = run_args(backend=backend, names=names, ledger=url, extra=[
            *COMMON, "--restart-latency", "1s", "--max-in-flight", str(in_flight),
            *_instance_timeout(scale),
        ])
        victim = await stack.enter_async_context(
            running_daemon(args, emulator=env.emulator, name="victim"))
        survivor = await stack.enter_async_context(
            running_daemon(args, emulator=env.emulator, name="survivor"))
        await _ready(victim)
        await _ready(survivor)
        ids = await env.pubsub.publish(names, chaos_messages("kill", count))
        await victim.wait_for_message("restarted ", seconds=START_SECONDS)
        victim.kill()
        assert await victim.exit_code() == -signal.SIGKILL
        killed_at = anyio.current_time()
        facts = await ledger.wait_processed(
            ids, seconds=STRANDED_BOUND_SECONDS + DRAIN_SECONDS, daemons=[survivor])
        resolved_after = anyio.current_time() - killed_at
        assert await survivor.stop() == 0, survivor.tail()
        assert survivor.summary().endswith("unsettled 0"), survivor.summary()
    stranded = [mid for mid in ids if "unknown" in facts.outcomes(mid)]
    for mid in stranded:
        # Resolved, not restarted again: the dead daemon's restart may have happened.
        assert facts.outcomes(mid) == ["unknown"], (mid, facts.outcomes(mid))
    assert resolved_after < STRANDED_BOUND_SECONDS, resolved_after
    letters = await env.pubsub.drain(
        names.project, names.dead_letter_subscription, 1, seconds=2)
    assert not letters, f"{len(letters)} on the dead-letter topic without mandrill's reason"
    result = verdict("sigkill while holding", backend, facts, ids,
                     daemons=[victim, survivor], started=started)
    result.note(stranded_claims=len(stranded), all_settled_after=f"{resolved_after:.1f}s",
                instance_timeout=SUITE_INSTANCE_TIMEOUT if scale == 1 else "30s")
    return result


MIDWAY_SCRIPT = """\
# midway.sh HOSTNAME DIR DAEMON: a restart that takes a while; DIR/started-DAEMON-HOSTNAME
# says it began (and on which daemon), a line in DIR/restarts.log that it completed.
touch "$2/started-$3-$1"
sleep 3
echo "$1" >> "$2/restarts.log"
"""


async def sigkill_mid_restart(env: Env, backend: str, scale: int) -> Result:
    """Two daemons on a subscription (10 s ack deadline, dead-letter policy of 10
    deliveries) and a PostgreSQL ledger, restarting hosts with the command restarter
    (``--live``): a script that takes 3 s and writes every completed restart to a file, an
    account independent of the ledger. One daemon is SIGKILLed while its restarts run.

    Proves: the restart commands of the killed daemon run to their end (they are in a
    session of their own: the documented choice); the other daemon resolves the killed
    one's claims as ``unknown`` once it has missed its heartbeats for
    ``--instance-timeout`` and settles their messages, within :data:`STRANDED_BOUND_SECONDS`
    of the kill; every host is restarted exactly once (the file says so); nothing reaches
    the dead-letter topic. Figures: the claims stranded, and how long after the kill the
    last was resolved.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("midway")
    await env.pubsub.setup(names, ack_deadline=MIN_ACK_DEADLINE, dead_letters=True,
                           max_delivery_attempts=10)
    count = 4 * scale
    workdir = env.path("midway")
    workdir.mkdir()
    script = workdir / "midway.sh"
    script.write_text(MIDWAY_SCRIPT)
    restarts_log = workdir / "restarts.log"

    def args_for(url: str, name: str) -> list[str]:
        command = f"/bin/sh {shlex.quote(str(script))} {{hostname}}"
        command += f" {shlex.quote(str(workdir))} {name}"
        return run_args(backend=backend, names=names, ledger=url, extra=[
            "--restarter", "command", "--live", "--restart-command", command,
            "--restart-timeout", "30s", "--grace", "5s", "--max-in-flight", str(count),
            *_instance_timeout(scale),
        ])

    def begun() -> dict[str, str]:
        """host → the daemon whose restart of it began."""
        marks = (p.name.split("-", 2)[1:] for p in workdir.glob("started-*"))
        return {host: daemon for daemon, host in marks}

    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(postgres_schema(env.postgres_admin_url))
        ledger = LedgerRef(url)
        daemons = {
            name: await stack.enter_async_context(
                running_daemon(args_for(url, name), emulator=env.emulator, name=name))
            for name in ("a", "b")
        }
        for daemon in daemons.values():
            await _ready(daemon)
        ids = await env.pubsub.publish(names, chaos_messages("midway", count))

        async def first_begun() -> str | None:
            return next(iter(begun().values()), None)

        victim_name = await eventually(first_begun, seconds=START_SECONDS,
                                       what="a restart to begin", interval=0.05)
        victim = daemons[victim_name]
        survivor = daemons["b" if victim_name == "a" else "a"]
        victim.kill()
        assert await victim.exit_code() == -signal.SIGKILL
        killed_at = anyio.current_time()
        facts = await ledger.wait_processed(
            ids, seconds=STRANDED_BOUND_SECONDS + DRAIN_SECONDS, daemons=[survivor])
        resolved_after = anyio.current_time() - killed_at

        async def all_completed() -> bool:
            # Every restart that began: a claim the killed daemon made but had not begun
            # to act on is resolved as unknown too, and that host is (by design) not
            # restarted again, so fewer than ``count`` may run.
            return len(_lines(restarts_log)) >= len(begun())

        await eventually(all_completed, seconds=DRAIN_SECONDS, what="every restart to end")
        assert await survivor.stop() == 0, survivor.tail()
    stranded = [mid for mid in ids if "unknown" in facts.outcomes(mid)]
    assert stranded, "no restart was under way in the killed daemon"
    assert resolved_after < STRANDED_BOUND_SECONDS, resolved_after
    restarted = Counter(_lines(restarts_log))
    killed_hosts = {host for host, daemon in begun().items() if daemon == victim_name}
    assert killed_hosts <= set(restarted), (killed_hosts, restarted)  # they ran to the end
    letters = await env.pubsub.drain(
        names.project, names.dead_letter_subscription, 1, seconds=2)
    assert not letters, f"{len(letters)} on the dead-letter topic without mandrill's reason"
    result = verdict("sigkill mid-restart", backend, facts, ids,
                     daemons=[victim, survivor], started=started)
    result.double_restarts += sum(n > 1 for n in restarted.values())
    result.note(stranded_claims=len(stranded), resolved_after=f"{resolved_after:.1f}s",
                file_restarts=sum(restarted.values()),
                instance_timeout=SUITE_INSTANCE_TIMEOUT if scale == 1 else "30s")
    return result


# -- SIGTERM loop ---------------------------------------------------------------------------


async def sigterm_loop(env: Env, backend: str, scale: int) -> Result:
    """One daemon at a time on a subscription and a SQLite ledger, stopped with SIGTERM
    mid-flight over and over, then a last one left to finish. The grace (0.3 s) is shorter
    than a restart (up to 1 s), so stops cancel restarts half-way; every other stop also
    sends a second SIGTERM, which skips what is left of the grace.

    Proves: a graceful stop, however often and however hard, loses nothing and restarts
    nothing twice: work finished in the grace is acked; a restart cut short after it began
    is recorded ``unknown`` and counted (acked: not restarted again, as for a daemon killed
    at that point); a claim not started is recorded ``cancelled`` and nacked, as is held
    work not decided; and the next daemon picks it all up. Each stop exits 0 with nothing
    unsettled.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("term")
    # 10 s: the emulator hands some messages to the pull a stopping daemon abandons, and
    # redelivers them only when their lease expires (see pubsub.DEFAULT_PULL_WAIT).
    await env.pubsub.setup(names, ack_deadline=MIN_ACK_DEADLINE)
    count = 40 * scale
    cycles = 2 + scale
    ids = await env.pubsub.publish(names, chaos_messages("term", count))
    ledger = LedgerRef(str(env.path("term", ".db")))
    args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
        "--restart-failure-rate", "0", "--restart-latency", "1s", "--grace", "0.3s",
        "--max-in-flight", "8",
    ])
    daemons: list[Daemon] = []
    for cycle in range(cycles):
        async with running_daemon(args, emulator=env.emulator, name=f"daemon-{cycle}") as d:
            daemons.append(d)
            await _ready(d)
            await d.wait_for_message("restarted ", seconds=START_SECONDS)
            d.signal(signal.SIGTERM)
            if cycle % 2:
                await d.wait_for_message("stopped pulling", seconds=START_SECONDS)
                d.signal(signal.SIGTERM)
            assert await d.exit_code() == 0, d.tail()
            assert d.summary().endswith("unsettled 0"), d.summary()
    async with running_daemon(args, emulator=env.emulator, name="last") as last:
        daemons.append(last)
        facts = await ledger.wait_processed(
            ids, seconds=MIN_ACK_DEADLINE + DRAIN_SECONDS, daemons=[last])
        assert await last.stop() == 0, last.tail()
    result = verdict("sigterm loop", backend, facts, ids, daemons=daemons, started=started)
    interrupted = sum(o == "unknown" for mid in ids for o in facts.outcomes(mid))
    not_started = sum(o == "cancelled" for mid in ids for o in facts.outcomes(mid))
    result.note(stops=cycles, interrupted_restarts=interrupted, not_started=not_started,
                handed_back_at_stop=sum(_handed_back_at_stop(d) for d in daemons))
    return result


def _handed_back_at_stop(daemon: Daemon) -> int:
    for message in daemon.messages():
        if message.startswith("handing back ") and "still held at shutdown" in message:
            return int(message.split()[2])
    return 0


# -- source outage --------------------------------------------------------------------------


async def emulator_outage(env: Env, backend: str, scale: int) -> Result:
    """The emulator is stopped mid-run, for a few seconds, and started again on the same
    port; the daemon (SQLite ledger) must ride it out.

    The emulator keeps everything in memory, so its restart loses every topic, message and
    lease: the harness re-creates topic and subscription and republishes what had not been
    processed when the emulator stopped. A real Pub/Sub keeps its state through an outage
    and never answers "subscription not found" for a moment, so the daemon reaches the
    emulator through a relay (:class:`~tests.reliability.harness.Gate`) that stays shut
    until the new emulator is set up again: to the daemon the source is simply gone, then
    back. (The fresh emulator also numbers message ids from 1 again, where Pub/Sub never
    reuses one: ids are burnt past the old ones first, or the ledger would take the new
    messages for old ones.)

    Proves: the daemon survives the outage of its source (no crash, exit 0 at the end),
    retries with backoff, and resumes; *published* is what exists after the restart, and
    each of those is processed exactly once; over the whole ledger (before, during and after
    the outage) no host is restarted twice, although some republished messages name hosts
    whose restart completed during the outage (the host rule skips them). What it cannot
    prove: that messages lost *with* the emulator are recovered (nobody could).
    """
    if env.launcher is None:
        raise RuntimeError("emulator_outage needs env.launcher")
    started = anyio.current_time()
    names = PubSubNames.fresh("outage")
    count = 20 * scale
    extra_outage = scale - 1.0  # the emulator's own restart takes a few seconds already
    emulator = PinnedEmulator(env.launcher, env.path("emulator", ".log"))
    await anyio.to_thread.run_sync(emulator.start)
    try:
        pubsub = PubSub(emulator.host, env.harness_backend)
        await pubsub.setup(names)
        messages = chaos_messages("outage", count)
        first = await pubsub.publish(names, messages)
        by_id = dict(zip(first, messages, strict=True))
        ledger = LedgerRef(str(env.path("outage", ".db")))
        gate = Gate(emulator.port)
        async with anyio.create_task_group() as tg:
            relay = await tg.start(gate.run)
            args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
                *COMMON, "--restart-latency", "1s", "--max-in-flight", "5",
            ])
            async with running_daemon(args, emulator=relay, name="daemon") as daemon:
                await daemon.wait_for_message("restarted ", seconds=START_SECONDS)
                gate.close()
                await anyio.to_thread.run_sync(emulator.stop)
                stopped_at = anyio.current_time()
                if extra_outage:
                    await anyio.sleep(extra_outage)  # the fault itself, made longer
                before = await ledger.facts()
                await anyio.to_thread.run_sync(emulator.start)
                await pubsub.setup(names)
                await _burn_message_ids(pubsub, names, max(int(i) for i in first))
                again = [by_id[mid] for mid in first if before.finals(mid) == 0]
                fresh = chaos_messages("after", count // 2)
                ids = await pubsub.publish(names, again + fresh)
                gate.open()
                reopened_at = anyio.current_time()
                resumed = await _resumed(ledger, reopened_at)
                facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS, daemons=[daemon])
                drained = anyio.current_time() - reopened_at
                assert await daemon.stop() == 0, daemon.tail()
                assert daemon.summary().endswith("unsettled 0"), daemon.summary()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(emulator.stop)
    result = verdict("emulator outage", backend, facts, ids, daemons=[daemon], started=started)
    result.note(
        outage=f"{reopened_at - stopped_at:.1f}s",
        resumed_after=f"{resumed:.1f}s",
        drained_after=f"{drained:.1f}s",
        republished=len(again),
        retries_logged=daemon.count("retrying"),
    )
    return result


async def _resumed(ledger: LedgerRef, since: float) -> float:
    """Seconds from ``since`` until the ledger records one more processed message."""
    done = await ledger.processed_count()

    async def progressed() -> bool:
        return await ledger.processed_count() > done

    await eventually(progressed, seconds=DRAIN_SECONDS, what="the daemon to resume", interval=0.1)
    return anyio.current_time() - since


async def _burn_message_ids(pubsub: PubSub, names: PubSubNames, past: int) -> None:
    """Publish to a topic nobody reads until the emulator's next message id is > ``past``."""
    topic = f"burn-{names.topic}"
    scratch = PubSubNames(names.project, topic, f"unused-{names.subscription}", "unused")
    await pubsub.setup(scratch)
    while True:
        ids = await pubsub.publish_to(names.project, topic, [(b"burn", {})] * 1000)
        if max(int(i) for i in ids) >= past:
            return


async def source_partition(env: Env, backend: str, scale: int) -> Result:
    """The daemon's connections to Pub/Sub are cut, and new ones refused, for a few seconds
    mid-run, while the emulator keeps its state (a network partition, or a Pub/Sub outage
    as the real service has them).

    Proves: the daemon retries with backoff through the outage and resumes; since nothing
    is lost on the server side, *every* message published before and during the outage is
    processed exactly once, none twice, and the daemon exits 0 at the end. Leases it held
    may expire meanwhile: those messages come back, and the ledger recognises them.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("partition")
    await env.pubsub.setup(names, ack_deadline=MIN_ACK_DEADLINE)
    count = 30 * scale
    outage = 3.0 + scale
    ids = await env.pubsub.publish(names, chaos_messages("part", count))
    ledger = LedgerRef(str(env.path("partition", ".db")))
    gate = Gate(int(env.emulator.rsplit(":", 1)[1]))
    async with anyio.create_task_group() as tg:
        relay = await tg.start(gate.run)
        args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
            *COMMON, "--restart-latency", "1s", "--max-in-flight", "5",
        ])
        async with running_daemon(args, emulator=relay, name="daemon") as daemon:
            await daemon.wait_for_message("restarted ", seconds=START_SECONDS)
            gate.close()
            await anyio.sleep(outage)  # the fault itself
            ids += await env.pubsub.publish(names, chaos_messages("part-during", count // 2))
            gate.open()
            reopened_at = anyio.current_time()
            resumed = await _resumed(ledger, reopened_at)
            facts = await ledger.wait_processed(
                ids, seconds=MIN_ACK_DEADLINE + DRAIN_SECONDS, daemons=[daemon])
            drained = anyio.current_time() - reopened_at
            assert await daemon.stop() == 0, daemon.tail()
            assert daemon.summary().endswith("unsettled 0"), daemon.summary()
        tg.cancel_scope.cancel()
    result = verdict("source partition", backend, facts, ids, daemons=[daemon], started=started)
    result.note(outage=f"{outage:.0f}s", resumed_after=f"{resumed:.1f}s",
                drained_after=f"{drained:.1f}s", retries_logged=daemon.count("retrying"))
    return result


# -- ledger outage --------------------------------------------------------------------------

OUTAGE_LINE = "handing affected messages back until it recovers"
JOURNALED_LINE = "until the ledger is back"


async def ledger_outage(env: Env, backend: str, scale: int, *, exceed_limit: bool) -> Result:
    """The PostgreSQL ledger becomes unreachable for one daemon mid-run: its role loses
    LOGIN and its sessions are ended (the shared server stays up for everyone else), while
    messages keep arriving.

    Proves, with the outage shorter than ``--ledger-outage-limit``: the daemon says so once,
    hands back what it cannot decide (never acks a message without a record; not a line
    per message), keeps the outcome
    of every restart it could not record in its journal, keeps running, and recovers by
    itself: every message processed exactly once, no host twice, the journal emptied.
    With the outage longer than the limit: the daemon stops, exits 1 with one error line
    naming the outage, and nacks what it held; a daemon started after the ledger is back
    records the journal first, then processes everything, none twice.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("ledger")
    # 10 s: a daemon that stops abandons a pull, whose messages come back at expiry.
    await env.pubsub.setup(names, ack_deadline=MIN_ACK_DEADLINE)
    count = 30 * scale
    limit = 2.0 if exceed_limit else 60.0
    outage = 2.0 + scale
    journal = env.path("ledger-outcomes", ".jsonl")
    async with postgres_role(env.postgres_admin_url) as role:
        ledger = LedgerRef(role.probe_url)
        args = run_args(backend=backend, names=names, ledger=role.url, extra=[
            *COMMON, "--restart-latency", "1s", "--max-in-flight", "10",
            "--ledger-outage-limit", f"{limit}s", "--outcome-journal", str(journal),
        ])
        ids = await env.pubsub.publish(names, chaos_messages("ledger", count))
        daemons: list[Daemon] = []
        async with running_daemon(args, emulator=env.emulator, name="daemon") as daemon:
            daemons.append(daemon)
            await daemon.wait_for_message("restarted ", seconds=START_SECONDS)
            cut_at = anyio.current_time()
            ended = await role.cut()
            ids += await env.pubsub.publish(names, chaos_messages("ledger-during", count))
            await daemon.wait_for_message(OUTAGE_LINE, seconds=START_SECONDS)
            if exceed_limit:
                code = await daemon.exit_code(seconds=limit + START_SECONDS)
                down_for = anyio.current_time() - cut_at
                assert code == 1, daemon.tail()
                # One line says why it stopped (the worker's own errors are per message).
                exit_lines = daemon.errors("mandrill.cli")
                assert len(exit_lines) == 1, exit_lines
                assert exit_lines[0].startswith("stopped: ledger unavailable for"), exit_lines
            else:
                await anyio.sleep(outage)  # the fault itself
                down_for = anyio.current_time() - cut_at
                assert not daemon.ended.is_set(), daemon.tail()
                await role.restore()
                facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS, daemons=daemons)
                assert await daemon.stop() == 0, daemon.tail()
        if exceed_limit:
            await role.restore()
            async with running_daemon(args, emulator=env.emulator, name="after") as after:
                daemons.append(after)
                facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS, daemons=[after])
                assert await after.stop() == 0, after.tail()
    assert not journal.exists(), journal.read_text()  # every kept outcome recorded
    result = verdict(
        "ledger outage > limit" if exceed_limit else "ledger outage < limit",
        backend, facts, ids, daemons=daemons, started=started,
    )
    result.note(
        outage=f"{down_for:.1f}s", limit=f"{limit:.0f}s", sessions_ended=ended,
        outcomes_journaled=sum(d.count(JOURNALED_LINE) for d in daemons),
        log_lines=sum(len(d.lines) for d in daemons),
    )
    return result


# -- poison message -------------------------------------------------------------------------

RESTART_SCRIPT = """\
# restart.sh HOSTNAME LOG POISON: a restart that leaves a line in LOG, or in LOG.failed
# and fails (exit 3) when HOSTNAME is POISON.
if [ "$1" = "$3" ]; then
  echo "$1" >> "$2.failed"
  echo "cannot reach $1: connection refused" >&2
  exit 3
fi
echo "$1" >> "$2"
"""


def _restart_command(env: Env, poison: str) -> tuple[str, Path]:
    script = env.path("restart", ".sh")
    script.write_text(RESTART_SCRIPT)
    log = env.path("restarts", ".log")
    command = " ".join(shlex.quote(part) for part in ("/bin/sh", str(script)))
    return f"{command} {{hostname}} {shlex.quote(str(log))} {shlex.quote(poison)}", log


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def poison_message(env: Env, backend: str, scale: int) -> Result:
    """A restart that always fails for one host, among good ones: the command restarter
    (``--live``) runs a script that fails for that host and appends every other host to a
    file, an account of restarts independent of the ledger.

    Proves: the poison message is retried, reaches the dead-letter path after exactly
    ``--max-attempts`` failed restarts (ledger ``dead_letter`` with the reason, and the
    dead-letter topic), then stops cycling: messages published after it are processed and
    its attempt count has not moved. Every good host appears in the file exactly once.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("poison")
    await env.pubsub.setup(names, dead_letters=True)
    max_attempts = 3
    count = 20 * scale
    poison = "poison-0"
    command, restarts_log = _restart_command(env, f"{poison}.example.net")
    ledger = LedgerRef(str(env.path("poison", ".db")))
    args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
        "--restarter", "command", "--live", "--restart-command", command,
        "--restart-timeout", "30s", "--max-attempts", str(max_attempts),
        "--dead-letter-topic", names.dead_letter_topic, "--grace", "5s",
    ])
    first = [(instance_payload(poison), {}), *chaos_messages("ok", count)]
    ids = await env.pubsub.publish(names, first)
    poison_id = ids[0]
    async with running_daemon(args, emulator=env.emulator, name="daemon") as daemon:

        async def dead_lettered() -> bool:
            facts = await ledger.facts()
            return facts.messages.get(poison_id, ("",))[0] == "dead_letter"

        await eventually(dead_lettered, seconds=DRAIN_SECONDS, what="the poison dead-lettered")
        # After the dead letter: more work, and the poison must not come back meanwhile.
        ids += await env.pubsub.publish(names, chaos_messages("after", count))
        facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS, daemons=[daemon])
        assert await daemon.stop() == 0, daemon.tail()
    failed = [o for o in facts.outcomes(poison_id) if o == "failed"]
    assert len(failed) == max_attempts, facts.outcomes(poison_id)
    assert _lines(Path(f"{restarts_log}.failed")) == [f"{poison}.example.net"] * max_attempts
    _, reason, _ = facts.messages[poison_id]
    assert reason == f"restart failed {max_attempts} times", reason
    letters = await env.pubsub.drain(
        names.project, names.dead_letter_subscription, 1, seconds=START_SECONDS)
    assert letters, "nothing on the dead-letter topic"
    assert letters[0].attributes["mandrill_original_message_id"] == poison_id, letters
    result = verdict("poison message", backend, facts, ids, daemons=[daemon], started=started)
    restarted = Counter(_lines(restarts_log))
    twice = [host for host, n in restarted.items() if n > 1]
    result.double_restarts += len(twice)
    assert len(restarted) == len(ids) - 1, (len(restarted), len(ids))
    result.note(attempts=len(failed), file_restarts=sum(restarted.values()),
                file_doubles=len(twice))
    return result


# -- bad input ------------------------------------------------------------------------------


async def bad_input(env: Env, backend: str, scale: int) -> Result:
    """Thousands of generated payloads (:mod:`tests.reliability.payloads`: not JSON, binary,
    empty, huge, wrong types, missing or hostile ``instance_name`` such as ``; rm -rf /``,
    ``../``, 300-character labels, control and right-to-left characters, deep nesting),
    about a quarter valid ones interleaved, to one daemon with a dead-letter topic.

    Proves: the daemon never crashes; every invalid payload is dead-lettered with a reason
    (ledger ``dead_letter`` and ``reason``, and the dead-letter topic), every valid one is
    processed (the host it names restarted, the name as sent), and no valid one is taken
    for invalid or the other way round.
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("bad")
    await env.pubsub.setup(names, dead_letters=True)
    generated = payloads.generate(1000 * scale, seed=scale)
    ledger = LedgerRef(str(env.path("bad", ".db")))
    args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
        *COMMON, "--restart-latency", "0s", "--dead-letter-topic", names.dead_letter_topic,
    ])
    async with running_daemon(args, emulator=env.emulator, name="daemon") as daemon:
        await _ready(daemon)
        ids: list[str] = []
        for start in range(0, len(generated), 500):
            batch = generated[start : start + 500]
            ids += await env.pubsub.publish(
                names, [(p.data, {"kind": p.kind}) for p in batch])
        facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS * scale,
                                            daemons=[daemon])
        assert await daemon.stop() == 0, daemon.tail()
        assert daemon.summary().endswith("unsettled 0"), daemon.summary()
    expected = dict(zip(ids, generated, strict=True))
    wrong = []
    for mid, payload in expected.items():
        status, reason, _ = facts.messages.get(mid, ("", "", 0))
        if payload.valid:
            hosts = {host for host, _, _ in facts.decisions.get(mid, [])}
            ok = status == "received" and hosts == {f"{payload.instance_name.lower()}.example.net"}
        else:
            ok = status == "dead_letter" and reason.startswith("invalid: ") and len(reason) > 10
        if not ok:
            wrong.append((payload.kind, payload.data[:80], status, reason[:80]))
    if wrong:
        raise Misjudged(f"{len(wrong)} misjudged, e.g. {wrong[:5]}")
    bad = {mid for mid, p in expected.items() if not p.valid}
    letters = await env.pubsub.drain(
        names.project, names.dead_letter_subscription, len(bad), seconds=DRAIN_SECONDS)
    lettered = {d.attributes.get("mandrill_original_message_id") for d in letters}
    assert lettered == bad, f"dead-letter topic: {len(lettered)} of {len(bad)}"
    result = verdict("bad input", backend, facts, ids, daemons=[daemon], started=started)
    kinds = Counter(p.kind for p in generated)
    result.note(valid=kinds["valid"], invalid=len(bad), kinds=len(kinds))
    return result


# -- load -----------------------------------------------------------------------------------


async def load(env: Env, backend: str, scale: int) -> Result:
    """A sustained publish rate well above the restart capacity: restarts take up to 0.5 s
    (0.25 s on average), ``--max-in-flight`` bounds the daemon to a few hundred restarts
    per second at most, and messages arrive faster than that for a while.

    Proves: the backlog stays in Pub/Sub, not in the daemon: its memory stays flat (VmRSS
    sampled all along: max and growth reported), the work it holds stays bounded (claims
    under way in the ledger never exceed ``--max-in-flight``; the time from a message's
    first receipt to its decision's end stays near the restart time), it does not fall
    over, and once publishing stops it drains everything, each message exactly once.

    Claims under way are bounded by twice ``--max-in-flight``: the restarts running (one
    per held message at most), and those whose outcome the settler is about to commit (a
    worker frees its message's slot as it hands the outcome on).
    """
    started = anyio.current_time()
    names = PubSubNames.fresh("load")
    await env.pubsub.setup(names)
    rate = max(150, 50 * scale)
    duration = 2.0 * scale
    in_flight = max(20, 5 * scale)
    ledger = LedgerRef(str(env.path("load", ".db")))
    args = run_args(backend=backend, names=names, ledger=ledger.url, extra=[
        *COMMON, "--restart-latency", "0.5s", "--max-in-flight", str(in_flight),
    ])
    rss: list[int] = []
    claims_seen: list[int] = []
    async with running_daemon(args, emulator=env.emulator, name="daemon") as daemon:
        await _ready(daemon)
        ready_rss = daemon.rss_kb() or 0
        ids: list[str] = []
        stop_sampling = anyio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                value = daemon.rss_kb()
                if value is not None:
                    rss.append(value)
                claims_seen.append(await anyio.to_thread.run_sync(_open_claims, ledger.url))
                with anyio.move_on_after(0.25):
                    await stop_sampling.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            publish_started = anyio.current_time()
            serial = 0
            while (elapsed := anyio.current_time() - publish_started) < duration:
                due = int(elapsed * rate) + 1 - serial
                if due > 0:
                    ids += await env.pubsub.publish(
                        names, chaos_messages(f"load-{serial}", due))
                    serial += due
                await anyio.sleep(0.05)  # pacing: the publisher's schedule, not a wait
            published_for = anyio.current_time() - publish_started
            backlog_rss = daemon.rss_kb() or 0
            facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS * scale,
                                                daemons=[daemon])
            stop_sampling.set()
        drained = anyio.current_time() - publish_started
        assert await daemon.stop() == 0, daemon.tail()
    latencies = _decision_latencies(ledger.url)
    result = verdict("load", backend, facts, ids, daemons=[daemon], started=started)
    result.note(
        rate=f"{len(ids) / published_for:.0f}/s",
        throughput=f"{len(ids) / drained:.0f}/s",
        rss_ready_mb=round(ready_rss / 1024, 1),
        rss_max_mb=round(max(rss) / 1024, 1),
        rss_growth_mb=round((max(rss) - backlog_rss) / 1024, 1),
        max_claims=max(claims_seen),
        in_flight=in_flight,
        p50_s=round(statistics.median(latencies), 2),
        p99_s=round(statistics.quantiles(latencies, n=100)[98], 2),
        max_s=round(max(latencies), 2),
    )
    assert max(claims_seen) <= 2 * in_flight, (max(claims_seen), in_flight)
    return result


def _open_claims(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        conn.execute("PRAGMA busy_timeout = 10000")
        try:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM restarts WHERE outcome = 'restarting'").fetchone()
        except sqlite3.OperationalError:
            return 0
    return int(n)


def _decision_latencies(path: str) -> list[float]:
    """First receipt of each message to the end of its final decision, in seconds."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT r.finished_at - m.first_seen FROM restarts r JOIN messages m"
            " USING (message_id) WHERE r.outcome IN ('restarted', 'skipped')"
        ).fetchall()
    return [float(value) for (value,) in rows]


# -- the catalogue --------------------------------------------------------------------------


async def ledger_outage_recovers(env: Env, backend: str, scale: int) -> Result:
    return await ledger_outage(env, backend, scale, exceed_limit=False)


async def ledger_outage_exits(env: Env, backend: str, scale: int) -> Result:
    return await ledger_outage(env, backend, scale, exceed_limit=True)


async def fault_schedules(env: Env, backend: str, scale: int) -> Result:
    """``10 * scale`` seeded fault schedules on each database (``tests/reliability/faults.py``),
    run by a process of their own on ``backend``'s event loop (the daemons are in-process).

    Proves, over hundreds of schedules at the report's default scale: nothing lost, no host
    restarted twice or at once on two daemons, no claim left open, nothing acked without
    its outcome, whatever the faults and whenever they come.
    """
    started = anyio.current_time()
    count = 10 * scale
    done = await anyio.run_process(
        [sys.executable, "-m", "tests.reliability.faults", backend, "1", str(count),
         env.emulator, env.postgres_admin_url],
        check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    runs = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    failed = [f"{run['seed']}/{run['database']}" for run in runs if not run["ok"]]
    result = Result(
        scenario="fault schedules", backend=backend,
        published=sum(run.get("published", 0) for run in runs),
        processed_once=sum(run.get("published", 0) - run.get("lost", 0) for run in runs),
        processed_more=0, duplicates_suppressed=0,
        lost=sum(run.get("lost", 0) for run in runs) + len(failed),
        double_restarts=sum(run.get("double", 0) for run in runs),
        seconds=anyio.current_time() - started,
    )
    kinds = Counter(fault.split("@")[0].split("(")[0]
                    for run in runs for fault in run.get("notes", {}).get("faults", "").split()
                    if fault != "-")
    result.note(schedules=len(runs), failed=",".join(failed) or "-",
                faults=" ".join(f"{kind}={n}" for kind, n in sorted(kinds.items())))
    if done.returncode != 0 or len(runs) != 2 * count:
        raise AssertionError(
            f"fault schedules: {len(runs)} of {2 * count} runs reported, exit"
            f" {done.returncode}: {done.stderr.decode()[-2000:]}"
        )
    return result


SCENARIOS: dict[str, Scenario] = {
    "sigkill": sigkill_while_holding,
    "sigkill-mid-restart": sigkill_mid_restart,
    "sigterm": sigterm_loop,
    "emulator-outage": emulator_outage,
    "partition": source_partition,
    "ledger-recovers": ledger_outage_recovers,
    "ledger-exits": ledger_outage_exits,
    "poison": poison_message,
    "bad-input": bad_input,
    "load": load,
    "fault-schedules": fault_schedules,
}

__all__ = ["SCENARIOS", "Env", "Scenario"]
