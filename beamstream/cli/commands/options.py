"""Helpers of the commands that change data: "are you sure?" prompts (ISO 8601 times are ``params.iso_time``)."""

from __future__ import annotations

import sys

from beamstream.errors import BeamstreamError


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
