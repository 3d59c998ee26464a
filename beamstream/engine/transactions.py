"""Consume-transform-produce transactions with confluent-kafka (KIP-447).

A batch's outputs and its consumed offsets commit in one Kafka transaction. The
offsets carry the consumer's group metadata (generation and member id), so a
process that lost its partitions in a rebalance (a "zombie": paused, partitioned
away, or just slow) can no longer commit them: the broker refuses the offsets,
the transaction is aborted and its outputs are never seen by read_committed
readers. This is what makes a stage exactly-once across workers, crashes and
rebalances, and it needs no fixed transactional id per partition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, KafkaException, Message, TopicPartition

from beamstream.errors import BeamstreamError

log = logging.getLogger(__name__)

#: (topic, key, value), or (topic, key, value, partition) where the partition must not follow the key
#: (a table's changelog record goes to its source event's partition).
Output = tuple[str, bytes | None, bytes | None] | tuple[str, bytes | None, bytes | None, int]
PartitionKey = tuple[str, int]  # (topic, partition)


class TransactionFailed(BeamstreamError):
    """The transactional producer hit a fatal error (fenced, or its transaction timed out):
    it cannot be used again; a new producer must be made."""


class BatchOffsets:
    """Per source partition, the first offset of an uncommitted batch (where to rewind to
    if its transaction is aborted) and the next offset to commit."""

    def __init__(self) -> None:
        self.first: dict[PartitionKey, int] = {}
        self.next: dict[PartitionKey, int] = {}

    def add(self, message: Message) -> None:
        """Count ``message`` as consumed by the batch."""
        key = (message.topic(), message.partition())
        self.first.setdefault(key, message.offset())
        self.next[key] = max(self.next.get(key, 0), message.offset() + 1)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: their events belong to the next owner now."""
        for tp in partitions:
            self.first.pop((tp.topic, tp.partition), None)
            self.next.pop((tp.topic, tp.partition), None)

    def clear(self) -> None:
        """Start a new batch."""
        self.first.clear()
        self.next.clear()

    def __bool__(self) -> bool:
        return bool(self.next)


def commit_batch(producer, consumer, outputs: Iterable[Output], offsets: BatchOffsets,
                 timeout_s: float = 60.0) -> bool:
    """Produce ``outputs`` and commit ``offsets`` in one transaction.

    Returns False when the broker made us abort (a rebalance took the partitions, or a
    retriable failure): the consumer has then been rewound to the batch's first events,
    so they are processed again, by this worker or by their new owner. Raises
    :class:`TransactionFailed` on a fatal error, after which ``producer`` is unusable.
    """
    try:
        producer.begin_transaction()
        for output in outputs:
            produce(producer, output)
        producer.send_offsets_to_transaction(
            [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.next.items()],
            consumer.consumer_group_metadata(), timeout_s)
        producer.commit_transaction(timeout_s)
    except KafkaException as exc:
        error = exc.args[0]
        if error.fatal() or not error.txn_requires_abort() and not error.retriable():
            raise TransactionFailed(f"transaction failed: {error.str()}") from None
        log.warning("transaction aborted, its events will be processed again: %s", error.str())
        try:
            producer.abort_transaction(timeout_s)
        except KafkaException as abort_exc:
            raise TransactionFailed(f"abort failed: {abort_exc.args[0].str()}") from None
        rewind(consumer, offsets.first)
        offsets.clear()
        return False
    offsets.clear()
    return True


def produce(producer, output: Output) -> None:
    """Produce one output (to its own partition when it names one)."""
    topic, key, value, *partition = output
    if partition:
        producer.produce(topic, value, key, partition=partition[0])
    else:
        producer.produce(topic, value, key)


def rewind(consumer, first: dict[PartitionKey, int]) -> None:
    """Seek each partition still assigned back to ``first`` (the batch's first offsets)."""
    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    for (topic, partition), offset in first.items():
        if (topic, partition) in assigned:
            consumer.seek(TopicPartition(topic, partition, offset))


def rewind_to_committed(consumer, timeout_s: float = 30.0) -> None:
    """Seek every assigned partition to its committed offset (the beginning if none):
    after a producer was lost, the uncommitted position is unknown."""
    assignment = consumer.assignment()
    if not assignment:
        return
    for tp in consumer.committed(assignment, timeout=timeout_s):
        consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
