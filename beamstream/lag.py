"""Consumer-group lag: how many events of a topic a group has not committed yet."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from beamstream.kafka_clients import make_admin, make_consumer
from beamstream.settings import Settings

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

    def progress(self, group: str, topic: str, timeout_s: float = 5.0) -> GroupProgress:
        """``group`` on ``topic`` now. Transient answers (a coordinator or leader still moving, as
        right after a topic or group appears) are asked again within ``timeout_s``; then it raises
        KafkaException or TimeoutError."""
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(deadline - time.monotonic(), 0.1)

        metadata = self.watermarks.list_topics(topic, timeout=left()).topics[topic]
        partitions = sorted(metadata.partitions)
        reader = self._committed.get(group)
        if reader is None:
            reader = self._committed[group] = make_consumer(self.settings, group)
        answer = _retrying(lambda: reader.committed([TopicPartition(topic, p) for p in partitions], timeout=left()),
                           deadline)
        committed = {tp.partition: tp.offset for tp in answer}
        end_total = committed_total = 0
        for partition in partitions:
            low, high = _retrying(lambda p=partition: self.watermarks.get_watermark_offsets(
                TopicPartition(topic, p), timeout=left(), cached=False), deadline)
            end_total += high
            # A partition the group never committed (offset -1001) is consumed from its first retained offset.
            committed_total += max(committed.get(partition, -1), low)
        described = self.admin.describe_consumer_groups([group], request_timeout=left())[group].result(left())
        return GroupProgress(end_total, committed_total, len(described.members))

    def close(self) -> None:
        """Close its consumers (none of them ever joined a group, so nothing rebalances)."""
        for consumer in [self.watermarks, *self._committed.values()]:
            consumer.close()
        self._committed.clear()
