"""The service's counters: plain integers on the hot path, read by summaries and exporters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Counters:
    received: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    restarted: int = 0
    restart_failed: int = 0
    skipped: int = 0
    duplicates: int = 0
    dry_run: int = 0
    save_failed: int = 0
    ledger_unavailable: int = 0
    errors: int = 0
    lease_extensions: int = 0
    leases_abandoned: int = 0
    #: Messages finished for good (acked or dead-lettered), which ``--count`` counts.
    completed: int = 0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)

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
        if self.save_failed:
            line += f", save failures {self.save_failed}"
        if self.errors:
            line += f", errors {self.errors}"
        if self.dry_run:
            line += f", DRY RUN: {self.dry_run} restarts would have happened"
        return line
