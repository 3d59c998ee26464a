"""How a batch is committed, aborted and retried: the engine's one set of rules.

A batch's outputs and its consumed offsets commit in one Kafka transaction. The
offsets carry the consumer's group metadata (generation and member id, KIP-447),
so a process that lost its partitions in a rebalance (a "zombie": paused,
partitioned away, or just slow) can no longer commit them: the broker refuses
the offsets, the transaction is aborted and its outputs are never seen by
read_committed readers. This is what makes a stage exactly-once across workers,
crashes and rebalances, and it needs no fixed transactional id per partition.

The rules, in the order :func:`commit_batch` applies them to a failed call
(librdkafka's error flags, see confluent-kafka's transactions example):

1. ``fatal()``: the producer is unusable (fenced, or its transaction timed out):
   :class:`TransactionFailed`; the stage replaces the producer and rewinds the
   consumer to its committed offsets.
2. ``retriable()`` on a commit: the same call is tried again until the deadline
   (librdkafka asks for that: the transaction may still commit).
3. ``txn_requires_abort()``, or a retriable error past the deadline: the
   transaction is aborted and the batch's partitions are rewound, so its events
   are processed again, by this worker or by their new owner.
4. Anything else, or an abort that fails: the producer's state is unknown, which
   is treated as fatal (rule 1). Raising is never wrong here; committing twice is.
5. A call that does not return within its :class:`CallLimit`: librdkafka can block
   past its own timeout when the group coordinator went away (a broker restart,
   confluentinc/librdkafka#5456 and #5511), and a blocked C call cannot be interrupted.
   :class:`TransactionStuck` (a :class:`TransactionFailed`): the stage leaves the call
   blocked on its helper thread and makes a producer with the same transactional id,
   which fences the stuck one and settles its open transaction.

After a :class:`TransactionFailed` whether the batch committed is unknown until the new
producer has fenced the old one; then the group's committed offsets tell (they commit
in the batch's transaction): see :func:`batch_committed`.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from beamstream.errors import BeamstreamError

log = logging.getLogger(__name__)

#: (topic, key, value), or (topic, key, value, partition) where the partition must not follow the key
#: (a table's changelog record goes to its source event's partition).
Output = tuple[str, bytes | None, bytes | None] | tuple[str, bytes | None, bytes | None, int]
PartitionKey = tuple[str, int]  # (topic, partition)
Headers = list[tuple[str, bytes | None]]
DeliveryCallback = Callable[[KafkaError | None, Message], None]


@dataclass(frozen=True)
class OutRecord:
    """One record to produce; ``partition`` None means the key decides (the live partitioner)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    partition: int | None = None


class TransactionFailed(BeamstreamError):
    """The transactional producer hit a fatal error (fenced, or its transaction timed out),
    or its state is unknown: it cannot be used again; a new producer must be made."""


class TransactionStuck(TransactionFailed):
    """A transactional call did not return within its :class:`CallLimit` (rule 5)."""


#: How long a transactional call may block before its producer is given up on (rule 5). librdkafka
#: ignores its own timeout when the group coordinator went away; a healthy commit takes milliseconds, one
#: on a loaded two-core machine well under a second.
CALL_LIMIT_S = 2.5


class CallLimit:
    """Runs the blocking transactional calls on a helper thread and gives up on one after ``limit_s``.

    The call itself goes on (it cannot be interrupted) on a thread that is then abandoned, with the
    producer it holds; the caller must not use that producer again. Calls of a healthy cluster take
    milliseconds, so the limit only has to be longer than a slow commit on a loaded machine and
    short enough that results flow again within seconds of the broker's return. The helper thread is
    a daemon: a call that never returns must not keep the process from exiting."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.abandoned = 0  # calls left blocked
        self._calls: queue.SimpleQueue | None = None

    def __call__(self, call: Callable[[], None], what: str) -> None:
        """Run ``call`` (``what`` names it in the error); raises what it raises, or :class:`TransactionStuck`."""
        if self._calls is None:
            self._calls = queue.SimpleQueue()
            threading.Thread(target=_serve_calls, args=(self._calls,), name="transaction-call", daemon=True).start()
        future: futures.Future = futures.Future()
        self._calls.put((call, future))
        try:
            future.result(self.limit_s)
        except futures.TimeoutError:
            self._calls.put(None)  # the thread ends once the stuck call returns, if it ever does
            self._calls = None
            self.abandoned += 1
            raise TransactionStuck(f"{what} did not return within {self.limit_s:g} s") from None


def _serve_calls(calls: queue.SimpleQueue) -> None:
    while (item := calls.get()) is not None:
        call, future = item
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            future.set_exception(exc)


def _unlimited(call: Callable[[], None], what: str) -> None:
    call()


class Outcome(enum.Enum):
    """What became of a batch's transaction."""

    COMMITTED = "committed"
    ABORTED = "aborted"  # its events are processed again


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

    def to_commit(self) -> list[TopicPartition]:
        """The offsets this batch commits."""
        return [TopicPartition(topic, partition, offset) for (topic, partition), offset in self.next.items()]

    def clear(self) -> None:
        """Start a new batch."""
        self.first.clear()
        self.next.clear()

    def __bool__(self) -> bool:
        return bool(self.next)


def commit_batch(producer, consumer, outputs: Iterable[Output], offsets: BatchOffsets,
                 timeout_s: float = 30.0, on_delivery: dict[str, DeliveryCallback] | None = None,
                 limit: CallLimit | None = None) -> Outcome:
    """Produce ``outputs`` and commit ``offsets`` in one transaction (the rules are the module's).
    ``on_delivery`` names a delivery callback per topic (a table learns where its records landed);
    ``limit`` bounds each blocking call (rule 5).

    On :attr:`Outcome.ABORTED` the consumer has been rewound to the batch's first events.
    Raises :class:`TransactionFailed` when the producer must be replaced; ``offsets`` is
    cleared in every case.
    """
    run = limit or _unlimited
    try:
        producer.begin_transaction()
        for output in outputs:
            produce(producer, output, on_delivery)
        metadata = consumer.consumer_group_metadata()
        _retrying(lambda: run(lambda: producer.send_offsets_to_transaction(offsets.to_commit(), metadata, timeout_s),
                              "send_offsets_to_transaction"), timeout_s)
        _retrying(lambda: run(lambda: producer.commit_transaction(timeout_s), "commit_transaction"), timeout_s)
    except TransactionStuck:
        offsets.clear()
        raise
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.fatal() or not (error.txn_requires_abort() or error.retriable()):
            offsets.clear()
            raise TransactionFailed(f"transaction failed: {error.str()}") from None
        log.warning("transaction aborted, its events will be processed again: %s", error.str())
        try:
            run(lambda: producer.abort_transaction(timeout_s), "abort_transaction")
        except KafkaException as abort_exc:
            offsets.clear()  # the caller rewinds to the committed offsets with the new producer
            raise TransactionFailed(f"abort failed: {abort_exc.args[0].str()}") from None
        except TransactionStuck:
            offsets.clear()
            raise
        rewind(consumer, offsets.first)
        offsets.clear()
        return Outcome.ABORTED
    offsets.clear()
    return Outcome.COMMITTED


def _retrying(call: Callable[[], None], timeout_s: float) -> None:
    """Run ``call``, again while it fails with a retriable error that does not need an abort (rule 2)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
            return
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if (error.fatal() or error.txn_requires_abort() or not error.retriable()
                    or time.monotonic() >= deadline):
                raise
            log.info("transaction call failed, trying again: %s", error.str())
            time.sleep(0.01)


def produce(producer, output: Output, on_delivery: dict[str, DeliveryCallback] | None = None) -> None:
    """Produce one output (to its own partition when it names one)."""
    topic, key, value, *partition = output
    extra = {}
    if partition:
        extra["partition"] = partition[0]
    if on_delivery and topic in on_delivery:
        extra["on_delivery"] = on_delivery[topic]
    producer.produce(topic, value, key, **extra)


def rewind(consumer, first: dict[PartitionKey, int]) -> None:
    """Seek each partition still assigned back to ``first`` (the batch's first offsets)."""
    if not first:
        return
    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    for (topic, partition), offset in first.items():
        if (topic, partition) in assigned:
            consumer.seek(TopicPartition(topic, partition, offset))


def committed_offsets(consumer, timeout_s: float = 30.0) -> dict[PartitionKey, int]:
    """The group's committed offset of every assigned partition (-1 when none); raises KafkaException."""
    assignment = consumer.assignment()
    if not assignment:
        return {}
    return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(assignment, timeout=timeout_s)}


def batch_committed(batch_next: dict[PartitionKey, int], committed: dict[PartitionKey, int]) -> bool:
    """Whether a batch whose transaction failed committed after all: its offsets commit in its transaction,
    so it did when every partition of it still assigned has the batch's next offset committed. Only
    meaningful once the failed producer is fenced (its transaction can no longer change)."""
    mine = [key for key in batch_next if key in committed]
    return bool(mine) and all(committed[key] == batch_next[key] for key in mine)


def rewind_to_committed(consumer, committed: dict[PartitionKey, int] | None = None, timeout_s: float = 30.0) -> None:
    """Seek every assigned partition to its committed offset (the beginning if none):
    after a producer was lost, the uncommitted position is unknown. ``committed`` as read by
    :func:`committed_offsets`, which is asked when not given."""
    if committed is None:
        committed = committed_offsets(consumer, timeout_s)
    for (topic, partition), offset in committed.items():
        consumer.seek(TopicPartition(topic, partition, offset if offset >= 0 else OFFSET_BEGINNING))


def commit_at_least_once(producer, consumer, outputs: Iterable[Output], offsets: BatchOffsets,
                         on_delivery: dict[str, DeliveryCallback] | None = None) -> Outcome:
    """Flush ``outputs``, then commit ``offsets`` (no transaction: only to measure what exactly-once costs)."""
    for output in outputs:
        produce(producer, output, on_delivery)
    producer.flush(30)
    if offsets:
        consumer.commit(offsets=offsets.to_commit(), asynchronous=False)
    offsets.clear()
    return Outcome.COMMITTED


def commit_producer_transaction(producer, timeout_s: float = 60.0, limit: CallLimit | None = None) -> None:
    """Commit a producer-only transaction (no consumed offsets), retrying while librdkafka says so (rule 2).
    Raises the KafkaException otherwise (the caller aborts), or :class:`TransactionStuck` past ``limit`` (rule 5)."""
    run = limit or _unlimited
    _retrying(lambda: run(lambda: producer.commit_transaction(timeout_s), "commit_transaction"), timeout_s)


def abort_quietly(producer, timeout_s: float = 30.0, limit: CallLimit | None = None) -> None:
    """Abort a producer-only transaction; a failure is not reported, because a fenced or timed-out
    producer's transaction is aborted by the broker anyway, and the error that led here is the one to tell.
    :class:`TransactionStuck` past ``limit`` is raised: the producer must be replaced."""
    run = limit or _unlimited
    try:
        run(lambda: producer.abort_transaction(timeout_s), "abort_transaction")
    except KafkaException as exc:
        log.info("abort failed (the broker aborts the transaction): %s", exc.args[0].str())
