"""Consumer-group lag: how many events of a topic a group has not committed yet."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from beamstream.platform.kafka_clients import make_admin, make_consumer
from beamstream.platform.settings import Settings

T = TypeVar("T")

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

    @property
    def lag(self) -> int:
        """Events waiting for the group."""
        return max(self.end - self.committed, 0)


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
        self.admin = make_admin(settings)
        self.watermarks = make_consumer(settings, f"{settings.topic_prefix}lag-{uuid.uuid4().hex[:12]}")
        self._committed: dict[str, Consumer] = {}
        self._probe: Consumer | None = None  # reads ranges for events_between, assigned, never in a group

    def progress(self, group: str, topic: str, timeout_s: float = 5.0) -> GroupProgress:
        """``group`` on ``topic`` now. Transient answers (a coordinator or leader still moving, as
        right after a topic or group appears) are asked again within ``timeout_s``; then it raises
        KafkaException or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        bounds = self._bounds(topic, deadline)
        committed = self._committed_raw(group, topic, sorted(bounds), deadline)
        end_total = sum(high for _, high in bounds.values())
        committed_total = sum(_from(committed, partition, low) for partition, (low, _) in bounds.items())
        described = self.admin.describe_consumer_groups([group], request_timeout=_left(deadline))[group].result(
            _left(deadline))
        return GroupProgress(end_total, committed_total, len(described.members))

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
        behind = {p: start for p, start in starts.items() if start < marks.get(p, 0)}
        if not behind:
            return False
        if self._probe is None:
            self._probe = make_consumer(self.settings, f"{self.settings.topic_prefix}probe-{uuid.uuid4().hex[:12]}",
                                        **{"enable.partition.eof": True, "fetch.wait.max.ms": 10})
        self._probe.assign([TopicPartition(topic, p, start) for p, start in behind.items()])
        deadline = time.monotonic() + timeout_s
        try:
            while behind:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} partitions {sorted(behind)} took over {timeout_s:.0f} s")
                message = self._probe.poll(0.2)
                if message is None or message.partition() not in behind:
                    continue
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if error.fatal():
                        raise KafkaException(error)
                    continue
                if error is None and message.offset() < marks[message.partition()]:
                    return True
                del behind[message.partition()]  # at its end, or past the mark: nothing in between
            return False
        finally:
            self._probe.unassign()

    def _bounds(self, topic: str, deadline: float, partitions: list[int] | None = None) -> dict[int, tuple[int, int]]:
        if partitions is None:
            partitions = sorted(self.watermarks.list_topics(topic, timeout=_left(deadline)).topics[topic].partitions)
        return {p: _retrying(lambda p=p: self.watermarks.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=_left(deadline), cached=False), deadline)
                for p in partitions}

    def _committed_raw(self, group: str, topic: str, partitions: list[int], deadline: float) -> dict[int, int]:
        reader = self._committed.get(group)
        if reader is None:
            reader = self._committed[group] = make_consumer(self.settings, group)
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
