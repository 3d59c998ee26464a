"""The ISPyB sink: per-image results and collection summaries from Kafka into ISPyB.

It runs on the engine (:mod:`beamstream.engine`): the stage hands it the results and
summaries in batches (up to ``batch_size`` messages), it writes each batch to the database
in one transaction (:class:`~beamstream.connectors.ispyb_writer.IspybWriter`), and only
then does the stage commit the batch's offsets, with any dead letters of the batch, in one
Kafka transaction. A crash anywhere leaves either the batch's offsets uncommitted (it is
read again, and the idempotent writes make the second write change nothing) or
everything done once.

* Database down (connection refused, server gone, lock timeouts): the sink asks the
  stage to back off (:class:`~beamstream.engine.stage.Backoff`): the batch is not
  committed, its partitions are rewound and paused, and the stage waits with
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
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Message
from sqlalchemy.engine import Engine

from beamstream.connectors.ispyb_mapping import RecordError, check_result, check_summary
from beamstream.connectors.ispyb_schema import make_engine
from beamstream.connectors.ispyb_writer import DatabaseUnavailable, DataRefused, IspybWriter
from beamstream.engine.dead_letters import DeadLetters
from beamstream.engine.stage import Backoff, Processor, Stage
from beamstream.engine.transactions import Output
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.serde import SerdeError, make_serde

log = logging.getLogger(__name__)

SERVICE = "ispyb-sink"
#: The record types of the summaries topic (beamstream.platform.topics): the sink stores the first.
SUMMARY_TYPES = ("CollectionSummary", "SampleCentre")
#: Test hook, never set in production: ``N`` makes the sink SIGKILL its own process right after the
#: database commit of its Nth batch, before that batch's Kafka commit, so the fault tests can crash a real
#: sink process exactly there (tests/e2e/test_faults_ispyb.py).
FAULT_KILL_ENV = "BEAMSTREAM_FAULT_KILL_AFTER_DB_COMMIT"


@dataclass(frozen=True)
class SinkOptions:
    """Batching, retry and backoff settings of the sink."""

    batch_size: int = 500
    batch_wait_s: float = 0.2  # the longest a busy sink gathers a batch before committing it
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
class _Batch:
    messages: list[Message]
    stored: list[_Item]
    poison: list[_Poison]
    write_s: float


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
        self.processor = SinkProcessor(settings, self.engine, self.options)
        self.group_id = group_id or f"{settings.topic_prefix}{SERVICE}"
        self.stage = Stage(
            settings, self.group_id, [self.processor.results_topic, self.processor.summaries_topic], self.processor,
            name=SERVICE, chunk_size=self.options.batch_size, commit_interval_s=self.options.batch_wait_s,
            tick_interval_s=self.options.report_every_s,
            # As the workers': a crashed sink's partitions move 10 s after its last heartbeat, not librdkafka's 45.
            consumer_config={"session.timeout.ms": 10_000, "heartbeat.interval.ms": 3_000},
            transactional_id=f"{self.group_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.stop_event = self.stage.stop_requested
        if os.environ.get(FAULT_KILL_ENV):
            self.after_database_commit = _killed_after_database_commit(os.environ[FAULT_KILL_ENV])

    @property
    def stats(self) -> SinkStats:
        """What the sink has done since it started."""
        return self.processor.stats

    @property
    def after_database_commit(self) -> Callable[[list[Message]], None] | None:
        """Called with each batch's messages after its database commit, before its offsets are
        committed (tests use it to crash the sink in between)."""
        return self.processor.after_database_commit

    @after_database_commit.setter
    def after_database_commit(self, hook: Callable[[list[Message]], None] | None) -> None:
        self.processor.after_database_commit = hook

    def run(self, idle_timeout_s: float | None = None) -> SinkStats:
        """Consume until :attr:`stop_event` is set (or nothing arrived for ``idle_timeout_s``)."""
        log.info("ispyb sink started", extra={"group": self.group_id, "database": self._database_name(),
                                              "topics": self.stage.topics})
        try:
            self.stage.run(idle_timeout_s)
        finally:
            self.processor.tick()
        return self.stats

    def _database_name(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


def _killed_after_database_commit(setting: str) -> Callable[[list[Message]], None]:
    """The :data:`FAULT_KILL_ENV` hook: SIGKILL this process after the database commit of batch ``setting``."""
    try:
        kill_at = int(setting)
    except ValueError:
        kill_at = 0
    if kill_at < 1:
        raise BeamstreamError(f"{FAULT_KILL_ENV} must be a batch number of 1 or more, got {setting!r}")
    batches = 0

    def hook(_messages: list[Message]) -> None:
        nonlocal batches
        batches += 1
        if batches >= kill_at:
            log.warning("fault injection: killed after a database commit", extra={"batch": batches})
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class SinkProcessor(Processor):
    """One batch of results and summaries into the database; what it refuses into dead letters."""

    def __init__(self, settings: Settings, engine: Engine, options: SinkOptions) -> None:
        self.options = options
        self.writer = IspybWriter(engine)
        self.serde = make_serde(settings.schema_registry_url)
        self.results_topic = topic_name(settings, "results")
        self.summaries_topic = topic_name(settings, "summaries")
        self.dead_letters = DeadLetters(self.serde, topic_name(settings, "deadletter"), SERVICE)
        self.stats = SinkStats()
        self.after_database_commit: Callable[[list[Message]], None] | None = None
        self._outage_attempts = 0
        self._batch: _Batch | None = None  # the written batch awaiting its Kafka commit

    def process(self, messages: list[Message]) -> list[Output]:
        """Decode and write ``messages`` in one database transaction; their dead letters are the outputs."""
        items, poison = self._decode(messages)
        started = time.monotonic()
        try:
            refused = self._store(items)
        except DatabaseUnavailable as exc:
            raise self._outage(exc) from None
        write_s = time.monotonic() - started
        if self._outage_attempts:
            log.info("database available again, consumption resumed", extra={"attempts": self._outage_attempts})
            self._outage_attempts = 0
        if self.after_database_commit is not None:
            self.after_database_commit(messages)
        poison.extend(refused)
        refused_messages = {id(p.message) for p in refused}
        self._batch = _Batch(messages, [i for i in items if id(i.message) not in refused_messages], poison, write_s)
        return [self.dead_letters.output(bad.message, bad.reason, bad.error_type, attempts=bad.attempts,
                                         dcid=bad.dcid, image_number=bad.image_number) for bad in poison]

    def committed(self) -> None:
        """Count the committed batch."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        results = [i for i in batch.stored if i.kind == "result"]
        summaries = len(batch.stored) - len(results)
        self.stats.batches += 1
        self.stats.results += len(results)
        self.stats.summaries += summaries
        self.stats.dead_lettered += len(batch.poison)
        now = datetime.now(UTC)
        per_topic = {"results": 0, "summaries": 0}
        for message in batch.messages:
            per_topic["results" if message.topic() == self.results_topic else "summaries"] += 1
        metrics.sink_batch_committed(per_topic, len(results), summaries, batch.write_s,
                                     [(now - i.value["event_time"]).total_seconds() for i in results])
        for bad in batch.poison:
            metrics.sink_dead_lettered(bad.error_type)

    def aborted(self) -> None:
        """The batch is read again (its database writes are idempotent)."""
        self._batch = None

    def tick(self) -> None:
        """Log throughput now and then."""
        self._report()

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
                # Anything but the topic's own record types is dead-lettered, not skipped unseen.
                decoded = self.serde.decode(message.value(), topic, SUMMARY_TYPES)
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

    def _outage(self, error: DatabaseUnavailable) -> Backoff:
        """The wait before the batch is tried again: exponential, up to the maximum."""
        self._outage_attempts += 1
        self.stats.outages += 1
        metrics.sink_outage()
        delay = min(self.options.outage_backoff_max_s,
                    self.options.outage_backoff_s * 2 ** (self._outage_attempts - 1))
        log.warning("database unavailable, consumption paused: %s", error,
                    extra={"attempt": self._outage_attempts, "retry_in_s": delay})
        return Backoff(delay, f"database unavailable: {error}")

    # -- reporting --------------------------------------------------------------
    def _report(self) -> None:
        elapsed = max(time.monotonic() - self.stats.started, 1e-9)
        log.info("ispyb sink progress", extra={
            "results": self.stats.results, "summaries": self.stats.summaries,
            "dead_lettered": self.stats.dead_lettered, "outages": self.stats.outages,
            "batches": self.stats.batches, "results_per_s": round(self.stats.results / elapsed, 1)})
