"""What the commands print on stdout: rows for a person at a terminal or for a program.

A terminal gets a table sized to it; a pipe or a file gets every value in full, one row per
line, tab-separated, so that ``grep``, ``cut`` and ``sort`` work on it. JSON lines are for
programs that want field names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from mandrill.errors import one_line


def print_json_lines(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(row))


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on a terminal (a long value wraps, it is not cut); elsewhere a header and
    tab-separated rows, each value whole (whitespace inside a value, tabs and newlines
    included, becomes one space)."""
    if not sys.stdout.isatty():
        for line in (columns, *rows):
            print("\t".join(one_line(cell) for cell in line))
        return
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
