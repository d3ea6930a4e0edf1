"""The service's counters: plain integers on the hot path, read by summaries and exporters."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

#: Publish → settle, seconds: from a fast ack to a message redelivered for an hour.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)
#: One restarter call, seconds: simulated restarts take milliseconds, real ones minutes.
RESTART_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """A fixed-bucket histogram cheap enough for the hot path: ``observe`` is a bisect and
    three additions, with no lock (the event loop is its only writer; exporters read it
    from the same thread). Negative values (wall-clock skew) count as 0.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be distinct and ascending")
        self.bounds = tuple(float(bound) for bound in bounds)
        #: ``counts[i]`` holds values in ``(bounds[i-1], bounds[i]]``; the last one, above all.
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values <= bound)`` pairs ending with ``(inf, count)``."""
        total = 0
        pairs = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


@dataclass(slots=True)
class Counters:
    """What the daemon counts, as plain integers and histograms that the hot path bumps
    without locks; ``/metrics`` reads them at scrape time."""

    received: int = 0
    acked: int = 0
    nacked: int = 0
    #: Handed back with a pause: another worker holds the message's claim, or the ledger
    #: cannot decide on it now.
    deferred: int = 0
    dead_lettered: int = 0
    #: Dead letters that could not be published (the message was nacked instead).
    dead_letter_failures: int = 0
    restarted: int = 0
    restart_failed: int = 0
    #: Restarts interrupted after they began (shutdown): their outcome is unknown.
    restart_unknown: int = 0
    #: Claimed restarts that never began (shutdown): cancelled, the message redelivered.
    restart_cancelled: int = 0
    skipped: int = 0
    duplicates: int = 0
    #: Messages whose id the ledger held for another message (a reused id): decided as new.
    message_id_conflicts: int = 0
    dry_run: int = 0
    save_failed: int = 0
    ledger_unavailable: int = 0
    errors: int = 0
    lease_extensions: int = 0
    leases_abandoned: int = 0
    #: Messages finished for good (acked or dead-lettered), which ``--count`` counts.
    completed: int = 0
    #: Failed pull requests (each retry counts), whether or not the source recovered.
    pull_errors: int = 0
    #: Notifications (``--notify-url``) delivered, given up on, and dropped unsent (the
    #: queue full, or the daemon stopping): :class:`~mandrill.notify.Notifier` counts them.
    notifications_sent: int = 0
    notifications_failed: int = 0
    notifications_dropped: int = 0
    #: By :class:`~mandrill.policy.Reason` (one of ``DEAD_LETTER_REASONS``).
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    #: By :class:`~mandrill.policy.Reason` (one of ``SKIP_REASONS``).
    skip_reasons: Counter[str] = field(default_factory=Counter)
    #: Restarts a blocker held back (deferred), by blocker (``alerts``, ``command``).
    blocked: Counter[str] = field(default_factory=Counter)
    #: Of those, the ones held back because the blocker could not tell (failing closed).
    blocker_errors: Counter[str] = field(default_factory=Counter)
    #: Publish time → final settlement (ack or dead-letter), wall-clock seconds.
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    #: Duration of each restarter call that returned or failed (not cancelled ones).
    restart_duration: Histogram = field(default_factory=lambda: Histogram(RESTART_BUCKETS))

    def as_dict(self) -> dict[str, int]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), int)
        }

    def summary(self) -> str:
        """The one line printed when the daemon stops."""
        line = (
            f"received {self.received}, acked {self.acked}, nacked {self.nacked},"
            f" dead-lettered {self.dead_lettered}, restarted {self.restarted},"
            f" skipped {self.skipped}, duplicates {self.duplicates},"
            f" restart failures {self.restart_failed}"
        )
        if self.blocked:
            line += f", restarts blocked {self.blocked.total()}"
        if self.save_failed:
            line += f", save failures {self.save_failed}"
        if self.errors:
            line += f", errors {self.errors}"
        if self.dry_run:
            line += f", DRY RUN: {self.dry_run} restarts would have happened"
        return line
