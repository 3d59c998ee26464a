"""The argparse types of every command's options, in one place.

Each takes the option's text and returns the value, or raises
:class:`argparse.ArgumentTypeError` saying what was expected and what was given.
argparse puts the option's name in front (``argument --retries: must be at least 1,
got 0``) and :class:`beamstream.cli.main.OneLineErrorParser` prints that as one line,
so a bad value is refused before anything connects to Kafka or a database, and no
command needs to check its own options' ranges.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime


def _whole_number(text: str, expected: str = "expected a whole number") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None


def _finite_number(text: str, expected: str = "expected a number") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    # float() accepts "inf" and "nan": neither is a usable count of seconds, hertz or micrometres.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _refuse_unless(ok: bool, message: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(message)


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts of images, rows, workers, retries, lines)."""
    value = _whole_number(text)
    _refuse_unless(value >= 1, f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (offsets, lower bounds that may be zero)."""
    value = _whole_number(text)
    _refuse_unless(value >= 0, f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, intervals, steps)."""
    value = _finite_number(text)
    _refuse_unless(value > 0, f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (timeouts and delays where 0 means none)."""
    value = _finite_number(text)
    _refuse_unless(value >= 0, f"must be 0 or more, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port to serve on, 1 to 65535 (``--metrics-port``)."""
    expected = "expected a port number (1-65535)"
    value = _whole_number(text, expected)
    _refuse_unless(0 < value < 65536, f"{expected}, got {text!r}")
    return value


def port_or_zero(text: str) -> int:
    """A TCP port to listen on, 0 to 65535, where 0 lets the system pick a free one."""
    expected = "expected a port number (0-65535; 0 picks a free one)"
    value = _whole_number(text, expected)
    _refuse_unless(0 <= value < 65536, f"{expected}, got {text!r}")
    return value


def dcid(text: str) -> int:
    """An ISPyB data collection id: a whole number >= 1."""
    value = _whole_number(text, "a dcid is a whole number")
    _refuse_unless(value >= 1, f"a dcid is positive, got {value}")
    return value


def batch_size(text: str) -> int:
    """Messages per database transaction: a whole number from 1 to 100000."""
    value = _whole_number(text)
    _refuse_unless(1 <= value <= 100_000, f"must be between 1 and 100000, got {value}")
    return value


def seconds_up_to_a_minute(text: str) -> float:
    """A wait in seconds, more than 0 and at most 60 (long enough to batch, short enough to stop promptly)."""
    value = _finite_number(text, "expected a number of seconds")
    _refuse_unless(0 < value <= 60, f"must be more than 0 and at most 60 seconds, got {text}")
    return value


def iso_time(text: str) -> datetime:
    """An ISO 8601 time (``2026-01-01T12:00``, ``...Z``, ``...+01:00``) as an aware datetime.

    A time without a zone is local time, as people type it at the beamline.
    """
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2026-01-31T14:05:00Z, got {text!r}") from None
    return value if value.tzinfo is not None else value.astimezone()


def dead_letter_id(text: str) -> str:
    """A dead letter's ``PARTITION:OFFSET`` in the dead-letter topic (``0:17``), normalised."""
    # The store's own parser, so the form accepted here is the one it looks up.
    from beamstream.engine.dead_letter_store import DeadLetterError, normal_id

    try:
        return normal_id(text)
    except DeadLetterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def detector_name(text: str) -> str:
    """A simulated detector preset, as ``eiger2-4m`` or ``eiger2_4m``; returns its key."""
    # Imported here: the simulator pulls in the image writers, which only `simulate` needs.
    from beamstream.producers.simulator import SimulationError, detector_key

    try:
        return detector_key(text)
    except SimulationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kafka_topic(text: str) -> str:
    """A topic name as Kafka allows it: 1-249 characters of ``a-z A-Z 0-9 . _ -``, not ``.`` or ``..``."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    _refuse_unless(0 < len(text) <= 249 and set(text) <= allowed and text not in (".", ".."),
                   f"expected a topic name (1-249 of a-z A-Z 0-9 . _ -), got {text!r}")
    return text
