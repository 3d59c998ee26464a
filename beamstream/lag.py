"""Consumer-group lag: how many events of a topic a group has not committed yet."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient


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


def group_progress(admin: AdminClient, consumer, group: str, topic: str, timeout_s: float = 5.0) -> GroupProgress:
    """Measure ``group`` on ``topic``: end offsets from ``consumer`` (read_committed, any group),
    committed offsets and members from ``admin``. Raises KafkaException or TimeoutError."""
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    partitions = sorted(metadata.partitions)
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                               request_timeout=timeout_s)[group]
    committed = {tp.partition: tp.offset for tp in future.result(timeout_s).topic_partitions if tp.topic == topic}
    end_total = committed_total = 0
    for partition in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s,
                                                   cached=False)
        end_total += high
        # A partition the group never committed is consumed from its first retained offset.
        committed_total += max(committed.get(partition, -1), low)
    described = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group].result(timeout_s)
    return GroupProgress(end_total, committed_total, len(described.members))
