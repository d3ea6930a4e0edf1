"""Run every reliability scenario at scale, on asyncio and trio, and print a table.

    python -m tests.reliability.report [--scale N] [--backend asyncio --backend trio]
                                       [--only sigkill --only load ...]

Starts an emulator of its own (the Google Cloud SDK's, as the tests do) and uses the
PostgreSQL that ``MANDRILL_TEST_POSTGRES`` names (default 127.0.0.1:5432, database
``test``), in schemas and roles of its own that each scenario drops when it ends. Exits 1 if
any run lost a message, restarted a host twice, decided a message twice, or failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from tests.fixtures.emulator import find_launcher, start_emulator, stop_emulator
from tests.fixtures.postgres import ADMIN_URL_ENV, DEFAULT_ADMIN_URL
from tests.reliability.harness import Result
from tests.reliability.scenarios import SCENARIOS, Env

BACKENDS = ("asyncio", "trio")
COLUMNS = (
    "scenario", "backend", "published", "processed once", ">once", "dups suppressed",
    "lost", "double restarts", "time", "figures",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10,
                        help="multiplies counts, rates and durations (suite: 1; default 10)")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="daemon backend(s) to run (default: both)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                        help="scenario(s) to run (default: all)")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    return args


def row(result: Result) -> list[str]:
    figures = " ".join(f"{key}={value}" for key, value in result.notes.items())
    return [
        result.scenario, result.backend, str(result.published), str(result.processed_once),
        str(result.processed_more), str(result.duplicates_suppressed), str(result.lost),
        str(result.double_restarts), f"{result.seconds:.1f}s", figures,
    ]


def table(rows: list[list[str]]) -> str:
    """Aligned columns; the last one (figures) left ragged."""
    header = list(COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells: list[str]) -> str:
        aligned = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return " | ".join([*aligned, cells[-1]])

    rule = "-+-".join("-" * width for width in [*widths, len(header[-1])])
    return "\n".join([line(header), rule, *(line(cells) for cells in rows)])


async def run(args: argparse.Namespace) -> int:
    backends = args.backend or list(BACKENDS)
    names = args.only or list(SCENARIOS)
    workdir = Path(tempfile.mkdtemp(prefix="mandrill-reliability-"))
    try:
        launcher = find_launcher()
        process, host = await anyio.to_thread.run_sync(
            start_emulator, launcher, workdir / "emulator.log")
    except pytest.fail.Exception as exc:
        print(f"cannot start the Pub/Sub emulator: {exc}", file=sys.stderr)
        return 2
    rows: list[list[str]] = []
    failed = False
    try:
        env = Env(
            emulator=host,
            postgres_admin_url=os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL),
            workdir=workdir,
            harness_backend="asyncio",
            launcher=launcher,
        )
        for name in names:
            for backend in backends:
                print(f"running {name} on {backend} at scale {args.scale} ...", file=sys.stderr,
                      flush=True)
                try:
                    result = await SCENARIOS[name](env, backend, args.scale)
                except Exception as exc:
                    failed = True
                    traceback.print_exc()
                    reason = " ".join(str(exc).split())[:200]
                    rows.append([name, backend, *["-"] * 7, f"FAILED: {reason}"])
                    continue
                failed |= not result.ok
                rows.append(row(result))
                print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    finally:
        await anyio.to_thread.run_sync(stop_emulator, process)
    print(f"\nmandrill reliability report, scale {args.scale}\n")
    print(table(rows))
    if failed:
        print("\nFAIL: see the rows above (lost, double restarts, >once, or FAILED);"
              f" logs and ledgers kept in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print("\nPASS: nothing lost, nothing restarted twice")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return anyio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
