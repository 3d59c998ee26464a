"""Consumer-group lag: how many events of a topic a group has not committed yet."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from beamstream.platform.kafka_clients import make_admin, make_consumer
from beamstream.platform.settings import Settings

T = TypeVar("T")

#: A partition at most this many offsets behind its end has its waiting events counted by reading
#: them; further behind, the offsets are the lag. Transaction markers and aborted events take offsets
#: but are no events: a group that has taken in every event of a partition written transactionally
#: stays one offset (the last commit marker) or a few short of its end. Further behind is real lag,
#: where a marker or two more make no difference, and reading it all would cost what it reads.
EXACT_WITHIN = 16
#: Failed measurements in a row after which :class:`GroupLag` replaces its clients. After a long
#: broker outage librdkafka's admin client has answered every request with a timeout for a minute
#: while fresh clients answered at once.
REOPEN_AFTER_FAILURES = 3

#: Answers that mean "not yet": a group's coordinator or a partition's leader is still being settled.
_MOVING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
           KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}


def _retrying(call: Callable[[], T], deadline: float) -> T:
    """``call()``, again every 0.2 s while it answers one of :data:`_MOVING` and time is left."""
    while True:
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].code() not in _MOVING or time.monotonic() > deadline - 0.2:
                raise
            time.sleep(0.2)


@dataclass(frozen=True)
class GroupProgress:
    """A group's position on a topic, summed over its partitions."""

    end: int  # offsets written to the topic (read_committed end)
    committed: int  # offsets the group has committed (a partition it never committed counts from its start)
    members: int  # consumers in the group now
    lag: int  # events waiting for the group: counted where few offsets separate it from the end (see EXACT_WITHIN)


@dataclass(frozen=True)
class PartitionProgress:
    """A group's position on one partition of a topic (the parts :class:`GroupProgress` sums)."""

    end: int  # the partition's end (read_committed)
    committed: int | None  # the group's committed offset; None where it never committed
    position: int  # where the group goes on: its committed offset, else the first retained one
    lag: int  # events waiting, counted as GroupProgress.lag is


class GroupLag:
    """Measures consumer groups on topics with clients of its own that never join a group or fetch.

    Committed offsets are read by a consumer *of the measured group* that never subscribes, not
    with ``AdminClient.list_consumer_group_offsets``: librdkafka's admin path dereferences a null
    consumer group when the coordinator answers NOT_COORDINATOR (as it does while it loads a group
    it has not seen), and the process dies with SIGSEGV (confluentinc/librdkafka#5040,
    confluent-kafka-python#1982; seen here in the monitor and the dashboard). A consumer's own
    offset fetch handles that answer and retries.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.failures = 0  # measurements failed in a row
        self._open()

    def _open(self) -> None:
        self.admin = make_admin(self.settings)
        self.watermarks = make_consumer(self.settings, f"{self.settings.topic_prefix}lag-{uuid.uuid4().hex[:12]}")
        self._committed: dict[str, Consumer] = {}
        self._probe: Consumer | None = None  # reads ranges for events_between, assigned, never in a group

    def progress(self, group: str, topic: str, timeout_s: float = 5.0) -> GroupProgress:
        """``group`` on ``topic`` now. Transient answers (a coordinator or leader still moving, as
        right after a topic or group appears) are asked again within ``timeout_s``; then it raises
        KafkaException or TimeoutError. After :data:`REOPEN_AFTER_FAILURES` failures in a row the
        next measurement is made with new clients."""
        return self._measured(lambda deadline: self._progress(group, topic, deadline), timeout_s)

    def partition_progress(self, group: str, topic: str, timeout_s: float = 5.0) -> dict[int, PartitionProgress]:
        """``group`` on each partition of ``topic`` now; asked again, raising and reopening as :meth:`progress`."""
        return self._measured(lambda deadline: self._partitions(group, topic, deadline), timeout_s)

    def _measured(self, measure: Callable[[float], T], timeout_s: float) -> T:
        if self.failures >= REOPEN_AFTER_FAILURES:
            self.close()
            self._open()
            self.failures = 0
        try:
            measured = measure(time.monotonic() + timeout_s)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        return measured

    def _progress(self, group: str, topic: str, deadline: float) -> GroupProgress:
        partitions = self._partitions(group, topic, deadline).values()
        described = self.admin.describe_consumer_groups([group], request_timeout=_left(deadline))[group].result(
            _left(deadline))
        return GroupProgress(sum(p.end for p in partitions), sum(p.position for p in partitions),
                             len(described.members), sum(p.lag for p in partitions))

    def _partitions(self, group: str, topic: str, deadline: float) -> dict[int, PartitionProgress]:
        bounds = self._bounds(topic, deadline)
        raw = self._committed_raw(group, topic, sorted(bounds), deadline)
        ends = {partition: high for partition, (_, high) in bounds.items()}
        positions = {partition: _from(raw, partition, low) for partition, (low, _) in bounds.items()}
        behind = {p: ends[p] - positions[p] for p in ends if positions[p] < ends[p]}
        near = {p: positions[p] for p, gap in behind.items() if gap <= EXACT_WITHIN}
        with closing(self._events_in(topic, near, ends, deadline)) as events:
            counted = Counter(events)
        return {p: PartitionProgress(ends[p], raw[p] if raw.get(p, -1) >= 0 else None, positions[p],
                                     counted[p] if p in near else behind.get(p, 0))
                for p in ends}

    def end_offsets(self, topic: str, partitions: list[int] | None = None, timeout_s: float = 5.0) -> dict[int, int]:
        """Each partition's end now (its high watermark: the offset the next event will get);
        every partition of ``topic`` unless ``partitions`` are named."""
        bounds = self._bounds(topic, time.monotonic() + timeout_s, partitions)
        return {p: high for p, (_, high) in bounds.items()}

    def committed_offsets(self, group: str, topic: str, partitions: list[int] | None = None,
                          timeout_s: float = 5.0) -> dict[int, int]:
        """Where ``group`` goes on in each partition of ``topic`` (or the named ``partitions``): its
        committed offset, or the first retained one where it never committed."""
        deadline = time.monotonic() + timeout_s
        bounds = self._bounds(topic, deadline, partitions)
        committed = self._committed_raw(group, topic, sorted(bounds), deadline)
        return {p: _from(committed, p, low) for p, (low, _) in bounds.items()}

    def events_between(self, topic: str, starts: dict[int, int], marks: dict[int, int],
                       timeout_s: float = 5.0) -> bool:
        """True when some partition holds a committed event at or after its start and before its mark.

        Offsets alone cannot say: a transaction's commit marker takes an offset too, so a group that
        has taken in every event of a partition still commits one short of its end. A partition
        short of its mark is therefore read from its start (read_committed, which skips markers and
        aborted events) up to the mark or its end. Raises TimeoutError when that read does not
        finish within ``timeout_s``.
        """
        with closing(self._events_in(topic, starts, marks, time.monotonic() + timeout_s)) as events:
            return next(events, None) is not None

    def _events_in(self, topic: str, starts: dict[int, int], marks: dict[int, int],
                   deadline: float) -> Iterator[int]:
        """The partition of each committed event at or after its partition's start and before its
        mark, as read (read_committed: markers and aborted events are skipped). Stopped early, it
        reads no further. Raises TimeoutError past ``deadline``."""
        behind = {p: start for p, start in starts.items() if start < marks.get(p, 0)}
        if not behind:
            return
        if self._probe is None:
            self._probe = make_consumer(self.settings, f"{self.settings.topic_prefix}probe-{uuid.uuid4().hex[:12]}",
                                        **{"enable.partition.eof": True, "fetch.wait.max.ms": 10})
        self._probe.assign([TopicPartition(topic, p, start) for p, start in behind.items()])
        try:
            while behind:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} partitions {sorted(behind)} took too long")
                message = self._probe.poll(0.2)
                if message is None or message.partition() not in behind:
                    continue
                partition, error = message.partition(), message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if error.fatal():
                        raise KafkaException(error)
                    continue
                if error is None and message.offset() < marks[partition]:
                    yield partition
                    if message.offset() + 1 < marks[partition]:
                        continue
                del behind[partition]  # at its end, or at its mark: nothing more in between
        finally:
            self._probe.unassign()

    def _bounds(self, topic: str, deadline: float, partitions: list[int] | None = None) -> dict[int, tuple[int, int]]:
        if partitions is None:
            partitions = sorted(self.watermarks.list_topics(topic, timeout=_left(deadline)).topics[topic].partitions)
        return {p: _retrying(lambda p=p: self.watermarks.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=_left(deadline), cached=False), deadline)
                for p in partitions}

    def committed_topics(self, group: str, topics: list[str], timeout_s: float = 5.0) -> list[str]:
        """Those of ``topics`` in which ``group`` has committed an offset (one request for them all)."""
        deadline = time.monotonic() + timeout_s
        metadata = self.watermarks.list_topics(timeout=_left(deadline)).topics
        asked = [TopicPartition(t, p) for t in topics if t in metadata for p in metadata[t].partitions]
        if not asked:
            return []
        reader = self._reader(group)
        answer = _retrying(lambda: reader.committed(asked, timeout=_left(deadline)), deadline)
        return sorted({tp.topic for tp in answer if tp.offset >= 0})

    def _reader(self, group: str) -> Consumer:
        reader = self._committed.get(group)
        if reader is None:
            reader = self._committed[group] = make_consumer(self.settings, group)
        return reader

    def _committed_raw(self, group: str, topic: str, partitions: list[int], deadline: float) -> dict[int, int]:
        reader = self._reader(group)
        answer = _retrying(lambda: reader.committed([TopicPartition(topic, p) for p in partitions],
                                                    timeout=_left(deadline)), deadline)
        return {tp.partition: tp.offset for tp in answer}

    def close(self) -> None:
        """Close its consumers (none of them ever joined a group, so nothing rebalances)."""
        for consumer in [self.watermarks, *self._committed.values(), *([self._probe] if self._probe else [])]:
            consumer.close()
        self._committed.clear()
        self._probe = None


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _from(committed: dict[int, int], partition: int, low: int) -> int:
    # A partition the group never committed (offset -1001) is consumed from its first retained offset.
    return max(committed.get(partition, -1), low)
