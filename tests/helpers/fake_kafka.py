"""In-memory fakes of a confluent-kafka Consumer and transactional Producer, for the engine's unit tests.

Only what the engine calls is here, and it behaves as librdkafka does where the engine depends on it:

* A :class:`FakeBroker` holds each topic's log, the committed offsets of each consumer group, each
  group's generation and what every ``send_offsets_to_transaction`` was given. Records of a
  transaction stay invisible to read_committed readers until ``commit_transaction`` succeeds; an
  aborted transaction's records are skipped forever; offsets sent in a transaction become the group's
  committed offsets only when it commits.
* Rebalance callbacks (``on_assign``/``on_revoke``/``on_lost``) run only inside ``consume``/``poll``
  (and ``on_revoke`` inside ``close``), never between two calls. The first ``consume`` after
  ``subscribe`` assigns every partition of the subscribed topics; :meth:`FakeBroker.rebalance`
  schedules more. Each rebalance starts a new group generation and ends in an ``on_assign`` call
  (with no partitions when none are new); newly assigned partitions start at the group's committed
  offset (the log's start when there is none).
* Delivery reports are queued by ``produce`` and served by ``poll``/``flush`` only. An aborted
  transaction's reports not yet served fail with ``_PURGE_QUEUE``.
* :meth:`FakeBroker.fail_next` makes the next call(s) of a method raise ``KafkaException(error)``;
  the producer then moves to the state librdkafka would: a fatal error makes it unusable (its open
  transaction is aborted, as the broker does when the transaction times out), an abortable one
  leaves ``abort_transaction`` as the only call that works, anything else leaves it as it was.
  Making a producer with a transactional id already in use fences the older one.
* ``consume`` and ``poll`` never wait: the timeout is recorded, not slept.

Not modelled: transaction markers (a committed record takes one offset, nothing else does),
retention, several members of one group sharing partitions, message timestamps.
"""

from __future__ import annotations

import itertools
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from beamstream.engine.stage import KafkaClients

PartitionKey = tuple[str, int]

COMMITTED, OPEN, ABORTED = "committed", "open", "aborted"


def kafka_error(code: int = KafkaError._FAIL, *, fatal: bool = False, retriable: bool = False,
                txn_requires_abort: bool = False, reason: str = "injected by the test") -> KafkaError:
    """A KafkaError with librdkafka's flags set as given."""
    return KafkaError(code, reason, fatal=fatal, retriable=retriable, txn_requires_abort=txn_requires_abort)


class FakeMessage:
    """A consumed message, or a delivery report's message, or an error event (``error()`` set)."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None = None,
                 value: bytes | None = None, headers: list[tuple[str, bytes | None]] | None = None,
                 error: KafkaError | None = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers, self._error = key, value, headers, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return None if self._headers is None else list(self._headers)

    def error(self) -> KafkaError | None:
        return self._error

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_NOT_AVAILABLE, 0

    def __repr__(self) -> str:
        return f"FakeMessage({self._topic}[{self._partition}]@{self._offset}, key={self._key!r}, value={self._value!r})"


@dataclass(frozen=True)
class FakeGroupMetadata:
    """What ``consumer_group_metadata()`` returns: who the member is, in which generation (KIP-447)."""

    group_id: str
    generation: int
    member_id: str


@dataclass
class FakeRecord:
    """One record of a partition's log."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None
    state: str  # COMMITTED, OPEN (in a transaction, or not yet acknowledged) or ABORTED


@dataclass
class _Rebalance:
    revoke: list[PartitionKey]
    assign: list[PartitionKey]
    lost: bool
    after: int  # consume calls to let pass first


@dataclass
class FakeBroker:
    """Topic logs, committed group offsets and generations, and the knobs the tests turn."""

    logs: dict[str, list[list[FakeRecord]]] = field(default_factory=dict)
    #: group -> (topic, partition) -> committed offset
    group_offsets: dict[str, dict[PartitionKey, int]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    #: Every send_offsets_to_transaction call: ({(topic, partition): offset}, the group metadata given).
    sent_offsets: list[tuple[dict[PartitionKey, int], Any]] = field(default_factory=list)
    consumers: list[FakeConsumer] = field(default_factory=list)
    producers: list[FakeProducer] = field(default_factory=list)
    #: Every client call in order, as "consumer.seek", "producer.commit_transaction", ...
    calls: list[str] = field(default_factory=list)
    _failures: dict[str, deque[KafkaError]] = field(default_factory=dict)
    _hangs: dict[str, tuple[threading.Event, bool]] = field(default_factory=dict)
    _epochs: dict[str, int] = field(default_factory=dict)  # transactional id -> producer epoch
    _members: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- topics -------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        self.logs[name] = [[] for _ in range(partitions)]

    def append(self, topic: str, partition: int, value: bytes | None, key: bytes | None = None,
               headers: list[tuple[str, bytes | None]] | None = None) -> int:
        """Write a committed record (as another service would); returns its offset."""
        log = self.logs[topic][partition]
        log.append(FakeRecord(key, value, headers, COMMITTED))
        return len(log) - 1

    def visible(self, topic: str, partition: int | None = None) -> list[FakeMessage]:
        """The records a read_committed reader sees, partition by partition."""
        found = []
        for number, log in enumerate(self.logs[topic]):
            if partition is None or number == partition:
                found += [FakeMessage(topic, number, offset, r.key, r.value, r.headers)
                          for offset, r in enumerate(log) if r.state == COMMITTED]
        return found

    def values(self, topic: str, partition: int | None = None) -> list[bytes | None]:
        """The values of :meth:`visible`."""
        return [message.value() for message in self.visible(topic, partition)]

    def records(self, topic: str, partition: int) -> list[FakeRecord]:
        """Everything written to a partition, aborted and open records too."""
        return list(self.logs[topic][partition])

    def stable_end(self, topic: str, partition: int) -> int:
        """The last stable offset: the first record of a transaction still open, or the log's end."""
        log = self.logs[topic][partition]
        return next((offset for offset, record in enumerate(log) if record.state == OPEN), len(log))

    def committed_offset(self, group: str, topic: str, partition: int) -> int | None:
        return self.group_offsets.get(group, {}).get((topic, partition))

    # -- knobs ------------------------------------------------------------------------------
    def fail_next(self, method: str, error: KafkaError, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` (``commit_transaction``, ``make_producer``, ...) raise
        ``KafkaException(error)`` without taking effect."""
        self._failures.setdefault(method, deque()).extend([error] * times)

    def hang_next(self, method: str, release: threading.Event, *, after_effect: bool = False) -> None:
        """Make the next call of ``method`` block until ``release`` is set, as librdkafka's transactional
        calls can after a broker restart: before it takes effect, or (``after_effect``) once it has
        (a commit that went through but never returned)."""
        self._hangs[method] = (release, after_effect)

    def _hang(self, method: str, after_effect: bool) -> None:
        hang = self._hangs.get(method)
        if hang is not None and hang[1] == after_effect:
            del self._hangs[method]
            hang[0].wait()

    def rebalance(self, revoke: list[PartitionKey] = (), assign: list[PartitionKey] = (), *, lost: bool = False,
                  after: int = 0) -> None:
        """Revoke (or lose) then assign partitions in the ``after + 1``-th ``consume``/``poll`` from now of
        every subscribed consumer: the group starts a new generation."""
        for consumer in self.consumers:
            if consumer.subscription and not consumer.closed:
                consumer._rebalances.append(_Rebalance(list(revoke), list(assign), lost, after))

    def fence(self, group: str) -> None:
        """Start a new generation of ``group`` without telling its members (they are zombies now)."""
        self.generations[group] = self.generations.get(group, 0) + 1

    def consumer_error(self, error: KafkaError, topic: str = "", partition: int = -1) -> None:
        """Make every consumer's next ``consume`` return an error event first."""
        for consumer in self.consumers:
            consumer._errors.append(FakeMessage(topic, partition, -1, error=error))

    def _injected(self, method: str) -> KafkaError | None:
        queued = self._failures.get(method)
        return queued.popleft() if queued else None

    # -- client factories (the engine's KafkaClients) -----------------------------------------
    def clients(self) -> KafkaClients:
        return KafkaClients(consumer=self.make_consumer, producer=self.make_producer)

    def make_consumer(self, settings, group_id: str, **config) -> FakeConsumer:
        consumer = FakeConsumer(self, group_id, config)
        self.consumers.append(consumer)
        return consumer

    def make_producer(self, settings, transactional_id: str | None = None, **config) -> FakeProducer:
        self.calls.append("make_producer")
        error = self._injected("make_producer")
        if error is not None:
            raise KafkaException(error)
        epoch = None
        if transactional_id is not None:  # init_transactions: fences the id's older producer
            epoch = self._epochs[transactional_id] = self._epochs.get(transactional_id, -1) + 1
            for older in self.producers:
                if older.transactional_id == transactional_id:
                    older._abort_open_transaction()
        producer = FakeProducer(self, transactional_id, epoch, config)
        self.producers.append(producer)
        return producer

    def open_reader(self, settings) -> FakeConsumer:
        """A group-less read_committed reader with end-of-partition events (``retained.open_reader``)."""
        return self.make_consumer(settings, f"reader-{next(self._members)}", **{"enable.partition.eof": True})


class FakeConsumer:
    """A confluent-kafka Consumer over a :class:`FakeBroker` (read_committed unless configured otherwise)."""

    def __init__(self, broker: FakeBroker, group_id: str, config: dict) -> None:
        self.broker, self.group_id, self.config = broker, group_id, dict(config)
        self.member_id = f"member-{next(broker._members)}"
        self.generation = -1
        self.subscription: list[str] = []
        self.closed = False
        self.positions: dict[PartitionKey, int] = {}  # the assignment, with each partition's next offset
        self.paused: set[PartitionKey] = set()
        #: Every consume/poll call's (num_messages, timeout).
        self.consume_calls: list[tuple[int, float | None]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self._callbacks: dict[str, Any] = {}
        self._rebalances: deque[_Rebalance] = deque()
        self._errors: deque[FakeMessage] = deque()
        self._eof_sent: dict[PartitionKey, int] = {}

    def _call(self, method: str) -> None:
        if self.closed:
            raise RuntimeError("Consumer closed")
        self.broker.calls.append(f"consumer.{method}")
        error = self.broker._injected(method)
        if error is not None:
            raise KafkaException(error)

    # -- group membership ---------------------------------------------------------------------
    def subscribe(self, topics: list[str], on_assign=None, on_revoke=None, on_lost=None) -> None:
        self._call("subscribe")
        self.subscription = list(topics)
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        everything = [(topic, p) for topic in topics for p in range(len(self.broker.logs.get(topic, [])))]
        self._rebalances.append(_Rebalance([], everything, False, 0))  # joining: served by the first consume

    def _serve_rebalances(self) -> None:
        for pending in self._rebalances:
            pending.after -= 1
        while self._rebalances and self._rebalances[0].after < 0:
            event = self._rebalances.popleft()
            revoked = [TopicPartition(t, p) for t, p in event.revoke if (t, p) in self.positions]
            if revoked:
                callback = self._callbacks.get("lost" if event.lost else "revoke") or self._callbacks.get("revoke")
                if callback is not None:
                    callback(self, revoked)
                for tp in revoked:
                    self.positions.pop((tp.topic, tp.partition), None)
                    self.paused.discard((tp.topic, tp.partition))
            self.broker.fence(self.group_id)
            self.generation = self.broker.generations[self.group_id]
            assigned = [TopicPartition(t, p) for t, p in event.assign if (t, p) not in self.positions]
            if self._callbacks.get("assign") is not None:  # every rebalance ends in one, even an empty one
                self._callbacks["assign"](self, assigned)
            for tp in assigned:  # fetching starts at the committed offset, else auto.offset.reset
                committed = self.broker.committed_offset(self.group_id, tp.topic, tp.partition)
                if committed is None:
                    reset = self.config.get("auto.offset.reset", "earliest")
                    committed = len(self.broker.logs[tp.topic][tp.partition]) if reset == "latest" else 0
                self.positions[(tp.topic, tp.partition)] = committed

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Group-less assignment at the partitions' offsets."""
        self._call("assign")
        for tp in partitions:
            self.positions[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else 0
            self._eof_sent.pop((tp.topic, tp.partition), None)

    def unassign(self) -> None:
        self._call("unassign")
        self.positions.clear()
        self.paused.clear()

    def assignment(self) -> list[TopicPartition]:
        self._call("assignment")
        return [TopicPartition(t, p) for t, p in self.positions]

    def consumer_group_metadata(self) -> FakeGroupMetadata:
        self._call("consumer_group_metadata")
        return FakeGroupMetadata(self.group_id, self.generation, self.member_id)

    # -- reading ----------------------------------------------------------------------------
    def consume(self, num_messages: int = 1, timeout: float | None = -1) -> list[FakeMessage]:
        self._call("consume")
        self.consume_calls.append((num_messages, timeout))
        self._serve_rebalances()
        messages: list[FakeMessage] = []
        while self._errors and len(messages) < num_messages:
            messages.append(self._errors.popleft())
        read_committed = self.config.get("isolation.level", "read_committed") == "read_committed"
        for (topic, partition), position in list(self.positions.items()):
            if (topic, partition) in self.paused:
                continue
            log = self.broker.logs[topic][partition]
            end = self.broker.stable_end(topic, partition) if read_committed else len(log)
            while position < end and len(messages) < num_messages:
                record = log[position]
                if record.state != ABORTED:
                    messages.append(FakeMessage(topic, partition, position, record.key, record.value, record.headers))
                position += 1
            self.positions[(topic, partition)] = position
            if (position >= end and len(messages) < num_messages and self.config.get("enable.partition.eof")
                    and self._eof_sent.get((topic, partition)) != position):
                self._eof_sent[(topic, partition)] = position
                messages.append(FakeMessage(topic, partition, position, error=KafkaError(KafkaError._PARTITION_EOF)))
        return messages

    def poll(self, timeout: float | None = None) -> FakeMessage | None:
        messages = self.consume(1, timeout)
        return messages[0] if messages else None

    def seek(self, partition: TopicPartition) -> None:
        self._call("seek")
        key = (partition.topic, partition.partition)
        if key not in self.positions:
            raise KafkaException(KafkaError(KafkaError._STATE, "Local: Erroneous state"))
        offset = partition.offset
        if offset == OFFSET_BEGINNING:
            offset = 0
        elif offset == OFFSET_END:
            offset = len(self.broker.logs[partition.topic][partition.partition])
        self.seeks.append((partition.topic, partition.partition, partition.offset))
        self.positions[key] = offset
        self._eof_sent.pop(key, None)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._call("pause")
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._call("resume")
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def committed(self, partitions: list[TopicPartition], timeout: float | None = None) -> list[TopicPartition]:
        self._call("committed")
        found = []
        for tp in partitions:
            offset = self.broker.committed_offset(self.group_id, tp.topic, tp.partition)
            found.append(TopicPartition(tp.topic, tp.partition, OFFSET_INVALID if offset is None else offset))
        return found

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        """(log start, last stable offset): what a read_committed reader is told."""
        self._call("get_watermark_offsets")
        return 0, self.broker.stable_end(partition.topic, partition.partition)

    def commit(self, message=None, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        """A plain (non-transactional) offset commit: visible at once."""
        self._call("commit")
        if offsets is None:
            raise NotImplementedError("the fake commits explicit offsets only")
        group = self.broker.group_offsets.setdefault(self.group_id, {})
        for tp in offsets:
            group[(tp.topic, tp.partition)] = tp.offset

    def close(self) -> None:
        """Leave the group: the assignment is revoked (``on_revoke`` runs in here, as librdkafka does)."""
        self._call("close")
        if self.subscription and self.positions and self._callbacks.get("revoke") is not None:
            self._callbacks["revoke"](self, [TopicPartition(t, p) for t, p in self.positions])
        self.positions.clear()
        self.closed = True


class FakeProducer:
    """A confluent-kafka Producer over a :class:`FakeBroker`, transactional when made with a transactional id
    (``init_transactions`` done, as ``make_producer`` returns it)."""

    def __init__(self, broker: FakeBroker, transactional_id: str | None, epoch: int | None, config: dict) -> None:
        self.broker, self.transactional_id, self.epoch, self.config = broker, transactional_id, epoch, dict(config)
        self.state = "ready"  # ready, in_transaction, abortable, fatal
        self.fatal_error: KafkaError | None = None
        self.abortable_error: KafkaError | None = None
        self.committed_transactions = 0
        self.aborted_transactions = 0
        self._records: list[tuple[str, int, int]] = []  # the open transaction's (topic, partition, offset)
        self._offsets: dict[str, dict[PartitionKey, int]] = {}  # the open transaction's offsets, per group
        self._reports: deque[tuple[Any, KafkaError | None, FakeMessage]] = deque()

    @property
    def transactional(self) -> bool:
        return self.transactional_id is not None

    def _call(self, method: str, transactional: bool = True) -> None:
        self.broker.calls.append(f"producer.{method}")
        if transactional and not self.transactional:
            raise KafkaException(KafkaError(KafkaError._NOT_CONFIGURED, "transactional.id not configured"))
        if self.transactional and self.broker._epochs[self.transactional_id] != self.epoch and self.state != "fatal":
            self._fail(KafkaError(KafkaError._FENCED, "producer fenced by a newer instance", fatal=True))
        if self.state == "fatal":
            raise KafkaException(self.fatal_error)
        error = self.broker._injected(method)
        if error is not None:
            self._fail(error)
            raise KafkaException(error)

    def _fail(self, error: KafkaError) -> None:
        if error.fatal():
            self.state, self.fatal_error = "fatal", error
            self._abort_open_transaction()  # the broker aborts it when the transaction times out
            raise KafkaException(error)
        if error.txn_requires_abort() and self.state == "in_transaction":
            self.state, self.abortable_error = "abortable", error

    def _require_transaction(self) -> None:
        if self.state == "abortable":
            raise KafkaException(self.abortable_error)
        if self.state != "in_transaction":
            raise KafkaException(KafkaError(KafkaError._STATE, "Local: Erroneous state: no transaction"))

    # -- transactions -------------------------------------------------------------------------
    def begin_transaction(self) -> None:
        self._call("begin_transaction")
        if self.state != "ready":
            raise KafkaException(KafkaError(KafkaError._STATE, f"Local: Erroneous state: {self.state}"))
        self.state = "in_transaction"

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int = -1,
                on_delivery=None, headers: list[tuple[str, bytes | None]] | None = None, **kwargs) -> None:
        self._call("produce", transactional=False)
        if self.transactional:
            self._require_transaction()
        if topic not in self.broker.logs:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, f"Local: Unknown topic {topic}"))
        partitions = self.broker.logs[topic]
        if partition < 0:
            partition = zlib.crc32(key) % len(partitions) if key is not None else 0
        if partition >= len(partitions):
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "Local: Unknown partition"))
        log = partitions[partition]
        log.append(FakeRecord(key, value, headers, OPEN))
        offset = len(log) - 1
        if self.transactional:
            self._records.append((topic, partition, offset))
        self._reports.append((on_delivery, None, FakeMessage(topic, partition, offset, key, value, headers)))

    def send_offsets_to_transaction(self, positions: list[TopicPartition], group_metadata: FakeGroupMetadata,
                                    timeout: float | None = None) -> None:
        self.broker._hang("send_offsets_to_transaction", after_effect=False)
        self._call("send_offsets_to_transaction")
        self._require_transaction()
        offsets = {(tp.topic, tp.partition): tp.offset for tp in positions}
        self.broker.sent_offsets.append((offsets, group_metadata))
        if group_metadata.generation != self.broker.generations.get(group_metadata.group_id):
            error = KafkaError(KafkaError.ILLEGAL_GENERATION, "Broker: Specified group generation id is not valid",
                               txn_requires_abort=True)
            self._fail(error)
            raise KafkaException(error)
        self._offsets.setdefault(group_metadata.group_id, {}).update(offsets)

    def commit_transaction(self, timeout: float | None = None) -> None:
        self.broker._hang("commit_transaction", after_effect=False)
        self._call("commit_transaction")
        self._require_transaction()
        for topic, partition, offset in self._records:
            self.broker.logs[topic][partition][offset].state = COMMITTED
        for group, offsets in self._offsets.items():
            self.broker.group_offsets.setdefault(group, {}).update(offsets)
        self._records, self._offsets = [], {}
        self.state = "ready"
        self.committed_transactions += 1
        self.broker._hang("commit_transaction", after_effect=True)

    def abort_transaction(self, timeout: float | None = None) -> None:
        self._call("abort_transaction")
        if self.state not in ("in_transaction", "abortable"):
            raise KafkaException(KafkaError(KafkaError._STATE, "Local: Erroneous state: no transaction to abort"))
        self._abort_open_transaction()
        self.state = "ready"
        self.aborted_transactions += 1

    def _abort_open_transaction(self) -> None:
        for topic, partition, offset in self._records:
            self.broker.logs[topic][partition][offset].state = ABORTED
        self._records, self._offsets = [], {}
        purged = KafkaError(KafkaError._PURGE_QUEUE, "Local: Purged in queue")
        self._reports = deque((callback, purged, message) for callback, _, message in self._reports)

    # -- delivery reports ----------------------------------------------------------------------
    def poll(self, timeout: float | None = None) -> int:
        self.broker.calls.append("producer.poll")
        return self._serve_reports()

    def flush(self, timeout: float | None = None) -> int:
        self.broker.calls.append("producer.flush")
        self._serve_reports()
        return 0

    def _serve_reports(self) -> int:
        served = 0
        while self._reports:
            callback, error, message = self._reports.popleft()
            if not self.transactional and error is None:  # acknowledged: visible now
                self.broker.logs[message.topic()][message.partition()][message.offset()].state = COMMITTED
            if callback is not None:
                callback(error, message)
            served += 1
        return served
