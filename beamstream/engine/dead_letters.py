"""Dead letters: a message no consumer could process, with why and where from.

Every service that consumes builds its dead letters here, so they all carry the same
fields (the dashboard and ``beamstream dlq`` read them back) and each is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from confluent_kafka import Message

from beamstream.engine.dead_letter_store import REINJECTED_HEADER
from beamstream.engine.transactions import Output
from beamstream.platform.retained import header_count

log = logging.getLogger(__name__)

#: The most bytes of the original message (payload, key and headers) a dead letter carries. A dead letter
#: holds all of its message and more, so one of a message near Kafka's record limit (librdkafka's
#: message.max.bytes, 1,000,000) would be refused, and the batch with it, again after every retry.
MAX_CARRIED_BYTES = 900_000
#: What is kept of each header value of a message too large to carry whole.
CUT_HEADER_BYTES = 64
#: The longest reason kept whole (one naming a path of a megabyte would not fit either).
MAX_REASON_CHARS = 2_000


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
    """A DeadLetter value carrying the original message unchanged; one too large for the dead-letter topic
    (over :data:`MAX_CARRIED_BYTES`) with its header values and payload cut short, as its reason says."""
    reinjected = header_count(headers, REINJECTED_HEADER)  # 0 when junk: a dead letter must never fail
    payload, headers = payload or b"", list(headers or ())
    if len(reason) > MAX_REASON_CHARS:
        half = MAX_REASON_CHARS // 2  # both ends: a long value named at the start, what is wrong at the end
        reason = f"{reason[:half]} ...[{len(reason) - 2 * half} characters]... {reason[-half:]}"
    carried = len(payload) + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
    if carried > MAX_CARRIED_BYTES:
        headers = [(k[:CUT_HEADER_BYTES], v[:CUT_HEADER_BYTES] if v else v) for k, v in headers[:100]]
        room = MAX_CARRIED_BYTES - len(key or b"") - sum(len(k) + len(v or b"") for k, v in headers)
        reason += (f" (message of {carried} bytes: payload cut to its first {max(room, 0)} of {len(payload)} "
                   "bytes, headers shortened, to fit the dead-letter topic)")
        payload = payload[:max(room, 0)]
    return {
        "reason": reason,
        "error_type": error_type,
        "service": service,
        "source_topic": source_topic,
        "source_partition": source_partition,
        "source_offset": source_offset,
        "key": key,
        "payload": payload,
        "headers": [{"key": str(k), "value": v} for k, v in headers],
        "attempts": attempts,
        "reinjected_count": reinjected,
        "dcid": dcid,
        "image_number": image_number,
        "failed_at": datetime.now(UTC),
    }


class DeadLetters:
    """Turns a message that failed into the output that sends it to ``topic`` (one per service).
    ``service`` names who gave up; ``{topic}`` in it becomes the message's topic (``worker/{topic}``)."""

    def __init__(self, serde, topic: str, service: str) -> None:
        self.serde, self.topic, self.service = serde, topic, service

    def output(self, message: Message, reason: str, error_type: str, *, attempts: int = 1,
               dcid: int | None = None, image_number: int | None = None) -> Output:
        """The dead letter of ``message`` as an output of the batch (committed with its offset), logged once."""
        service = self.service.format(topic=message.topic())
        log.warning("dead letter: %s", reason, extra={
            "dcid": dcid, "image": image_number, "error_type": error_type,
            "source_topic": message.topic(), "source_partition": message.partition(),
            "source_offset": message.offset()})
        value = dead_letter(
            reason=reason, error_type=error_type, service=service, source_topic=message.topic(),
            source_partition=message.partition(), source_offset=message.offset(), key=message.key(),
            payload=message.value(), headers=list(message.headers() or []), attempts=attempts, dcid=dcid,
            image_number=image_number)
        return (self.topic, message.key(), self.serde.encode("DeadLetter", value, self.topic))
