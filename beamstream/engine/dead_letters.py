"""Dead-letter envelopes: a message no consumer could process, with why and where from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime


def dead_letter(
    *,
    reason: str,
    error_type: str,
    service: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    key: bytes | None,
    payload: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None = None,
    attempts: int = 1,
    dcid: int | None = None,
    image_number: int | None = None,
) -> dict:
    """A DeadLetter value carrying the original message unchanged."""
    reinjected = 0
    for name, value in headers or ():
        if name == "beamstream-reinjected" and value:
            reinjected = int(value)
    return {
        "reason": reason,
        "error_type": error_type,
        "service": service,
        "source_topic": source_topic,
        "source_partition": source_partition,
        "source_offset": source_offset,
        "key": key,
        "payload": payload or b"",
        "headers": [{"key": str(k), "value": v} for k, v in headers or ()],
        "attempts": attempts,
        "reinjected_count": reinjected,
        "dcid": dcid,
        "image_number": image_number,
        "failed_at": datetime.now(UTC),
    }
