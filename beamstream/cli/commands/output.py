"""Output helpers shared by the commands: JSON for scripts, aligned tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_json(value: Any) -> None:
    """Print one JSON document (paths and datetimes as strings)."""
    print(json.dumps(value, default=str, indent=None))


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], file=None) -> None:
    """Print rows as a left-aligned, space-separated table."""
    file = file or sys.stdout
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=file)
        if index == 0:
            print("  ".join("-" * w for w in widths), file=file)


def add_json_flag(parser) -> None:
    """The common ``--json`` option."""
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
