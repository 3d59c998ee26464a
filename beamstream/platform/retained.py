"""Bounded reads of a topic's retained records.

What the dead-letter tools, replay and the archiver's start-up share: find a
topic's partitions and offset ranges (by offset or by time), read exactly a
range with ``read_committed`` (aborted and still-open transactions stay
invisible). Writing them back in one transaction is the engine's
(:class:`beamstream.engine.atomic_writer.AtomicWriter`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.settings import Settings

Headers = list[tuple[str, bytes | None]]
#: Errors of a partition whose leadership is still settling (a topic just created, a broker just restarted).
_SETTLING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}


class RetainedError(BeamstreamError):
    """A topic could not be read or written back (the message says which and why)."""


@dataclass(frozen=True)
class Record:
    """One retained record, as read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)

    @property
    def id(self) -> str:
        """``partition:offset``: how people name a record of a known topic."""
        return f"{self.partition}:{self.offset}"


def open_reader(settings: Settings) -> Consumer:
    """A consumer for assigned (group-less) reads: read_committed, end-of-partition events, never commits."""
    # The group id is never joined (assign, no subscribe) nor committed to; librdkafka just wants one.
    return make_consumer(settings, f"{settings.topic_prefix}reader-{uuid.uuid4().hex[:12]}",
                         **{"enable.partition.eof": True})


def partitions_of(consumer: Consumer, topic: str, timeout: float = 30.0) -> list[int]:
    """The partition numbers of ``topic``; a one-line error when the topic does not exist."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise RetainedError(f"cannot read the metadata of {topic}: {exc.args[0].str()}") from None
    if metadata is not None and metadata.error is not None and metadata.error.code() == \
            KafkaError.TOPIC_AUTHORIZATION_FAILED:  # what the broker says whether the topic exists or not
        raise RetainedError(f"not authorized to read topic {topic}: {metadata.error.str()} "
                            "(the Kafka user needs an ACL for it)")
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise RetainedError(f"topic {topic} does not exist on the cluster (run `beamstream topics apply`)")
    return sorted(metadata.partitions)


def offset_bounds(consumer: Consumer, topic: str, partitions: Iterable[int],
                  timeout: float = 30.0) -> dict[int, tuple[int, int]]:
    """Per partition: (first retained offset, end offset).

    The end is the last stable offset for a read_committed consumer: records of
    transactions still open lie beyond it.
    """
    bounds = {}
    for partition in partitions:
        deadline = time.monotonic() + timeout
        while True:
            try:
                bounds[partition] = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                                   timeout=timeout, cached=False)
                break
            except KafkaException as exc:
                # A topic just created, or a leader just moved: its leadership settles within moments.
                if (exc.args[0].retriable() or exc.args[0].code() in _SETTLING) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise RetainedError(f"cannot read the offsets of {topic}[{partition}]: {exc.args[0].str()}") from None
    return bounds


def offsets_at(consumer: Consumer, topic: str, when: datetime, ends: dict[int, int],
               timeout: float = 30.0) -> dict[int, int]:
    """Per partition: the first offset whose timestamp is at or after ``when`` (the end offset if none)."""
    millis = int(when.timestamp() * 1000)
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, millis) for p in ends], timeout=timeout)
    except KafkaException as exc:
        raise RetainedError(f"cannot map {when.isoformat()} to offsets of {topic}: {exc.args[0].str()}") from None
    result = {}
    for tp in found:
        if tp.error is not None:
            raise RetainedError(f"cannot map {when.isoformat()} to an offset of {topic}[{tp.partition}]: {tp.error}")
        # -1: every retained record is older than `when`.
        result[tp.partition] = ends[tp.partition] if tp.offset < 0 else min(tp.offset, ends[tp.partition])
    return result


def read_range(consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]],
               stall_timeout: float = 30.0) -> Iterator[Record]:
    """Yield the committed records with ``start <= offset < end`` of each partition, partition by partition
    interleaved as they arrive. Offsets below the first retained one start at the first retained one.

    Raises :class:`RetainedError` when no progress is made for ``stall_timeout`` seconds.
    """
    pending = {p: (start, end) for p, (start, end) in ranges.items() if start < end}
    if not pending:
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in pending.items()])
    try:
        last_progress = time.monotonic()
        while pending:
            message = consumer.poll(0.5)
            if message is None:
                if time.monotonic() - last_progress > stall_timeout:
                    left = ", ".join(f"[{p}] {s}..{e}" for p, (s, e) in sorted(pending.items()))
                    raise RetainedError(f"reading {topic} stalled for {stall_timeout:.0f} s (left: {left})")
                continue
            partition = message.partition()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    # The end of what a read_committed reader can see: nothing more in range.
                    pending.pop(partition, None)
                    last_progress = time.monotonic()
                    continue
                raise RetainedError(f"reading {topic}[{partition}] failed: {error.str()}")
            last_progress = time.monotonic()
            if partition not in pending:
                continue
            if message.offset() >= pending[partition][1]:
                pending.pop(partition)
                continue
            yield Record(topic, partition, message.offset(), message.timestamp()[1], message.key(),
                         message.value(), list(message.headers() or []))
            if message.offset() + 1 >= pending[partition][1]:
                pending.pop(partition)
    finally:
        consumer.unassign()


def read_topic(settings: Settings, topic: str, stall_timeout: float = 30.0) -> Iterator[Record]:
    """Every committed record of ``topic`` retained now (up to the current end of each partition)."""
    consumer = open_reader(settings)
    try:
        bounds = offset_bounds(consumer, topic, partitions_of(consumer, topic))
        yield from read_range(consumer, topic, bounds, stall_timeout)
    finally:
        consumer.close()


def header_value(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The value of the last header called ``name`` (None when absent)."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def header_count(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> int:
    """A counter header (``beamstream-reinjected``, ``beamstream-replayed``) as an int; 0 when absent or junk."""
    value = header_value(headers, name)
    try:
        count = int(value) if value else 0
    except ValueError:
        return 0
    return count if 0 <= count < 2**31 - 1 else 0  # the records' counters are Avro ints, and one is added


def with_header(headers: Sequence[tuple[str, bytes | None]] | None, name: str, value: bytes) -> Headers:
    """``headers`` with every ``name`` header replaced by one carrying ``value`` (order otherwise kept)."""
    return [(k, v) for k, v in headers or () if k != name] + [(name, value)]
