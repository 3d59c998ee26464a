"""The ISPyB sink: per-image results and collection summaries from Kafka into ISPyB.

One consumer reads the results and summaries topics in batches (up to
``batch_size`` messages or ``batch_wait_s``), writes each batch to the database in
one transaction (:class:`~connectors.ispyb_writer.IspybWriter`), and only then
commits the batch's offsets. The offsets (and any dead letters of the batch) go
in one Kafka transaction, so a crash anywhere leaves either the batch's offsets
uncommitted — it is read again, and the idempotent writes make the second write
change nothing — or everything done once.

* Database down (connection refused, server gone, lock timeouts): the batch is not
  committed; the consumer rewinds to the batch's first offsets, pauses, waits with
  exponential backoff (still polling, so it keeps its partitions) and tries again
  until the database answers. Nothing is dropped and nothing needs restarting.
* A message that can't be decoded, or that the database refuses for its content
  (after ``data_retries`` tries, each row isolated by bisecting the batch), goes to
  the dead-letter topic with its reason and source topic/partition/offset; its
  offset is then committed with the rest of the batch.

The results and summaries topics are co-partitioned by dcid and assigned with the
range strategy, so one sink instance holds both the results and the summary of a
collection; any number of instances share the partitions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from beamstream.connectors.ispyb_mapping import RecordError, check_result, check_summary
from beamstream.connectors.ispyb_schema import make_engine
from beamstream.connectors.ispyb_writer import DatabaseUnavailable, DataRefused, IspybWriter
from beamstream.schemas.serde import SerdeError, make_serde
from confluent_kafka import KafkaException, Message, TopicPartition
from sqlalchemy.engine import Engine

from beamstream.engine.dead_letters import dead_letter
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name

log = logging.getLogger("beamstream.ispyb_sink")

SERVICE = "ispyb-sink"


class SinkError(BeamstreamError):
    """The sink cannot run (Kafka unreachable at start-up)."""


@dataclass(frozen=True)
class SinkOptions:
    """Batching, retry and backoff settings of the sink."""

    batch_size: int = 500
    batch_wait_s: float = 0.2
    #: Tries of a row the database refuses for its content before it is dead-lettered.
    data_retries: int = 3
    data_retry_backoff_s: float = 0.2
    #: First wait after the database failed, doubled on each further failure up to the maximum.
    outage_backoff_s: float = 0.5
    outage_backoff_max_s: float = 30.0
    #: How often throughput is logged.
    report_every_s: float = 30.0


@dataclass
class SinkStats:
    """What a sink has done since it started."""

    batches: int = 0
    results: int = 0  # result messages stored (rows written or rewritten)
    summaries: int = 0
    dead_lettered: int = 0
    skipped: int = 0  # other record types on the summaries topic
    outages: int = 0  # failed database attempts
    programs_created: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Item:
    message: Message
    kind: str  # "result" or "summary"
    value: dict


@dataclass
class _Poison:
    message: Message
    reason: str
    error_type: str
    attempts: int = 1
    dcid: int | None = None
    image_number: int | None = None


class IspybSink:
    """Consumes results and summaries and stores them in ISPyB, exactly once in effect."""

    def __init__(self, settings: Settings, engine: Engine | None = None, options: SinkOptions | None = None,
                 group_id: str | None = None) -> None:
        self.settings = settings
        self.options = options or SinkOptions()
        self.engine = engine or make_engine(settings.database_url)
        self.writer = IspybWriter(self.engine)
        self.serde = make_serde(settings.schema_registry_url)
        self.results_topic = topic_name(settings, "results")
        self.summaries_topic = topic_name(settings, "summaries")
        self.deadletter_topic = topic_name(settings, "deadletter")
        self.group_id = group_id or f"{settings.topic_prefix}{SERVICE}"
        self.stop_event = threading.Event()
        self.stats = SinkStats()
        self._outage_attempts = 0
        #: Called with each batch's messages after its database commit, before its offsets are
        #: committed (tests use it to crash the sink in between).
        self.after_database_commit: Callable[[list[Message]], None] | None = None

    # -- the loop -------------------------------------------------------------
    def run(self, idle_timeout_s: float | None = None) -> SinkStats:
        """Consume until :attr:`stop_event` is set (or nothing arrived for ``idle_timeout_s``)."""
        consumer = make_consumer(
            self.settings, self.group_id,
            # Range keeps partition n of the co-partitioned results and summaries topics together.
            **{"partition.assignment.strategy": "range"},
        )
        try:
            producer = make_producer(
                self.settings,
                transactional_id=f"{self.group_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            )
        except KafkaException as exc:
            consumer.close()
            raise SinkError(f"cannot start a transactional producer on Kafka at {self.settings.kafka_bootstrap}: "
                            f"{exc.args[0].str()} (is the cluster up?)") from None
        consumer.subscribe([self.results_topic, self.summaries_topic],
                           on_revoke=lambda _c, parts: log.info("partitions revoked", extra={"count": len(parts)}))
        log.info("ispyb sink started", extra={"group": self.group_id, "database": self._database_name(),
                                              "topics": [self.results_topic, self.summaries_topic]})
        idle_since = time.monotonic()
        last_report = time.monotonic()
        try:
            while not self.stop_event.is_set():
                messages = [m for m in consumer.consume(self.options.batch_size, self.options.batch_wait_s)
                            if self._usable(m)]
                now = time.monotonic()
                if now - last_report >= self.options.report_every_s:
                    self._report()
                    last_report = now
                if not messages:
                    if idle_timeout_s is not None and now - idle_since >= idle_timeout_s:
                        break
                    continue
                idle_since = now
                self._handle(consumer, producer, messages)
        finally:
            consumer.close()
            producer.flush(10)
            self._report()
        return self.stats

    def _usable(self, message: Message) -> bool:
        if message.error() is None:
            return True
        log.warning("consumer error: %s", message.error().str())
        return False

    def _handle(self, consumer, producer, messages: list[Message]) -> None:
        """Decode, write and commit one batch; on a database outage rewind and wait instead."""
        items, poison = self._decode(messages)
        started = time.monotonic()
        try:
            refused = self._store(items)
        except DatabaseUnavailable as exc:
            self._outage(consumer, messages, exc)
            return
        write_s = time.monotonic() - started
        if self._outage_attempts:
            log.info("database available again, consumption resumed", extra={"attempts": self._outage_attempts})
            self._outage_attempts = 0
        if self.after_database_commit is not None:
            self.after_database_commit(messages)
        poison.extend(refused)
        if not self._commit(consumer, producer, messages, poison):
            self._rewind(consumer, messages)
            return
        refused_messages = {id(p.message) for p in refused}
        stored = [i for i in items if id(i.message) not in refused_messages]
        results = [i for i in stored if i.kind == "result"]
        summaries = len(stored) - len(results)
        self.stats.batches += 1
        self.stats.results += len(results)
        self.stats.summaries += summaries
        self.stats.dead_lettered += len(poison)
        now = datetime.now(UTC)
        per_topic = {"results": 0, "summaries": 0}
        for message in messages:
            per_topic["results" if message.topic() == self.results_topic else "summaries"] += 1
        metrics.sink_batch_committed(per_topic, len(results), summaries, write_s,
                                     [(now - i.value["event_time"]).total_seconds() for i in results])
        for bad in poison:
            metrics.sink_dead_lettered(bad.error_type)

    # -- decoding ---------------------------------------------------------------
    def _decode(self, messages: list[Message]) -> tuple[list[_Item], list[_Poison]]:
        items: list[_Item] = []
        poison: list[_Poison] = []
        for message in messages:
            topic = message.topic()
            value: dict = {}  # what could be decoded, for the dead letter's dcid and image
            try:
                if topic == self.results_topic:
                    value = self.serde.decode(message.value(), topic, "ImageResult").value
                    check_result(value)
                    items.append(_Item(message, "result", value))
                    continue
                decoded = self.serde.decode(message.value(), topic)
                if decoded.name != "CollectionSummary":
                    # The summaries topic carries other summary types too; not ISPyB's business.
                    self.stats.skipped += 1
                    continue
                value = decoded.value
                check_summary(value)
                items.append(_Item(message, "summary", value))
            except (SerdeError, RecordError) as exc:
                poison.append(_Poison(message, str(exc), type(exc).__name__, 1,
                                      value.get("dcid"), value.get("image_number")))
        return items, poison

    # -- database -------------------------------------------------------------
    def _write(self, items: list[_Item]) -> None:
        counts = self.writer.write([i.value for i in items if i.kind == "result"],
                                   [i.value for i in items if i.kind == "summary"])
        self.stats.programs_created += counts.programs_created

    def _store(self, items: list[_Item]) -> list[_Poison]:
        """Write ``items``; returns those the database refuses (isolated by bisection, retried)."""
        if not items:
            return []
        try:
            self._write(items)
            return []
        except DataRefused as exc:
            if len(items) > 1:
                # Halves in order, so later values of a row still win over earlier ones.
                middle = len(items) // 2
                return self._store(items[:middle]) + self._store(items[middle:])
            return self._retry_one(items[0], exc)

    def _retry_one(self, item: _Item, error: DataRefused) -> list[_Poison]:
        for attempt in range(2, self.options.data_retries + 1):
            # A row can be refused for a moment (its ProcessingJob committed a moment later).
            time.sleep(self.options.data_retry_backoff_s * 2 ** (attempt - 2))
            try:
                self._write([item])
                return []
            except DataRefused as exc:
                error = exc
        value = item.value
        log.warning("database refused a %s, dead-lettering it: %s", item.kind, error,
                    extra={"dcid": value.get("dcid"), "image": value.get("image_number")})
        return [_Poison(item.message, f"ISPyB refused the {item.kind}: {error}", "DataRefused",
                        self.options.data_retries, value.get("dcid"), value.get("image_number"))]

    def _outage(self, consumer, messages: list[Message], error: DatabaseUnavailable) -> None:
        """Rewind to the batch, pause, and wait the backoff before the batch is read again."""
        self._outage_attempts += 1
        self.stats.outages += 1
        metrics.sink_outage()
        delay = min(self.options.outage_backoff_max_s,
                    self.options.outage_backoff_s * 2 ** (self._outage_attempts - 1))
        log.warning("database unavailable, consumption paused: %s", error,
                    extra={"attempt": self._outage_attempts, "retry_in_s": delay})
        positions = self._rewind(consumer, messages)
        self._paused_wait(consumer, positions, delay)

    # -- Kafka ------------------------------------------------------------------
    def _commit(self, consumer, producer, messages: list[Message], poison: list[_Poison]) -> bool:
        """Dead letters and the batch's offsets in one transaction; False if it had to be aborted."""
        ends: dict[tuple[str, int], int] = {}
        for message in messages:
            key = (message.topic(), message.partition())
            ends[key] = max(ends.get(key, 0), message.offset() + 1)
        try:
            producer.begin_transaction()
            for bad in poison:
                message = bad.message
                letter = dead_letter(
                    reason=bad.reason, error_type=bad.error_type, service=SERVICE,
                    source_topic=message.topic(), source_partition=message.partition(),
                    source_offset=message.offset(), key=message.key(), payload=message.value(),
                    headers=message.headers(), attempts=bad.attempts, dcid=bad.dcid, image_number=bad.image_number,
                )
                producer.produce(self.deadletter_topic, self.serde.encode("DeadLetter", letter, self.deadletter_topic),
                                 message.key())
                log.warning("dead-lettered: %s", bad.reason, extra={
                    "dcid": bad.dcid, "image": bad.image_number, "source_topic": message.topic(),
                    "source_partition": message.partition(), "source_offset": message.offset()})
            producer.send_offsets_to_transaction(
                [TopicPartition(topic, partition, offset) for (topic, partition), offset in ends.items()],
                consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
            return True
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise
            log.warning("offset commit failed, batch will be read again: %s", error.str())
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                log.warning("abort failed: %s", abort_exc.args[0].str())
            return False

    def _rewind(self, consumer, messages: list[Message]) -> dict[tuple[str, int], int]:
        """Seek every partition of the batch back to the batch's first offset on it."""
        positions: dict[tuple[str, int], int] = {}
        for message in messages:
            key = (message.topic(), message.partition())
            positions[key] = min(positions.get(key, message.offset()), message.offset())
        for (topic, partition), offset in positions.items():
            self._seek(consumer, topic, partition, offset)
        return positions

    def _seek(self, consumer, topic: str, partition: int, offset: int) -> None:
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            # No longer ours (a rebalance): its new owner starts from the committed offset.
            log.info("could not rewind %s[%d]: %s", topic, partition, exc.args[0].str())

    def _paused_wait(self, consumer, positions: dict[tuple[str, int], int], delay: float) -> None:
        """Wait ``delay`` seconds with every partition paused, polling to stay in the group.

        A message that still arrives (fetched before the pause, or from a partition
        assigned meanwhile) is not processed: its partition is rewound to it and paused.
        """
        consumer.pause(consumer.assignment())
        deadline = time.monotonic() + delay
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            key = (message.topic(), message.partition())
            positions[key] = min(positions.get(key, message.offset()), message.offset())
            self._seek(consumer, *key, positions[key])
            consumer.pause([TopicPartition(*key)])
        consumer.resume(consumer.assignment())

    # -- reporting --------------------------------------------------------------
    def _report(self) -> None:
        elapsed = max(time.monotonic() - self.stats.started, 1e-9)
        log.info("ispyb sink progress", extra={
            "results": self.stats.results, "summaries": self.stats.summaries,
            "dead_lettered": self.stats.dead_lettered, "outages": self.stats.outages,
            "batches": self.stats.batches, "results_per_s": round(self.stats.results / elapsed, 1)})

    def _database_name(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)
