"""Helpers of the commands that change data: ISO 8601 times and "are you sure?" prompts."""

from __future__ import annotations

import sys
from datetime import datetime

from beamstream.errors import BeamstreamError


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time (``2026-01-01T12:00``, ``...Z``, ``...+01:00``) as an aware datetime.

    A time without a zone is local time, as people type it at the beamline.
    """
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BeamstreamError(f"{option}: expected an ISO 8601 time like 2026-01-31T14:05:00Z, got {text!r}") from None
    return value if value.tzinfo is not None else value.astimezone()


def add_yes_flag(parser) -> None:
    """The common ``--yes`` option."""
    parser.add_argument("--yes", "-y", action="store_true",
                        help="do it without asking (needed when stdin is not a terminal)")


def confirm(question: str, assume_yes: bool, what: str) -> None:
    """Ask ``question`` on the terminal; raise unless the answer is yes.

    Without a terminal on stdin nobody can answer, so that is a refusal naming
    ``--yes`` rather than a silent yes (scripts must say they mean it).
    """
    if assume_yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise BeamstreamError(f"refusing to {what} without confirmation: stdin is not a terminal (pass --yes)")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise BeamstreamError(f"{what}: cancelled, nothing changed")
