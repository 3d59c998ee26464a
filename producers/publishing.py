"""Publishing for the producers: events through a durable local spool while Kafka is away, and Kafka
failures as one-line errors for people, not tracebacks.

:class:`SpooledPublisher` is what the file watcher, the simulator and an acquisition
system use: ``publish()`` returns once the batch is fsynced in the spool
(:mod:`beamstream.producers.spool`), and a background thread publishes the spooled
batches in order (a batch never split over Kafka transactions) whenever Kafka can be reached.
Delivery from the spool is at-least-once (a batch committed just before a crash,
its acknowledgement not yet written, is published again); the workers drop an
image event they have already answered for, which makes the pipeline exactly-once.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Producer

from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
from beamstream.engine.transactions import CALL_LIMIT_S, CallLimit, TransactionStuck
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.retained import RetainedError
from beamstream.platform.settings import Settings
from beamstream.producers.events import Event, EventEncoder, EventPublisher
from beamstream.producers.spool import Backlog, Spool, SpooledBatch, SpooledRecord, SpoolError, check_name, spool_root
from beamstream.schemas.serde import Serde

log = logging.getLogger(__name__)

#: A backlog is published in transactions of whole batches holding up to this many events together: catching
#: up after an outage takes one transaction per few hundred events, not one per batch (a consumer still never
#: sees part of a batch).
TRANSACTION_EVENTS = 500
#: How long a backlog may sit without a batch committed before the publisher counts as stuck.
STUCK_AFTER_S = 5.0
#: Waits between attempts to reach Kafka: doubling from the first to the last.
RETRY_FIRST_S, RETRY_CAP_S = 0.5, 5.0
#: How long :func:`drain_spool` still publishes after a stop request while Kafka is reachable.
STOP_GRACE_S = 5.0


class ProducerError(BeamstreamError):
    """Events could not be published (broker unreachable, topic missing, transaction failed, spool unusable)."""


def _reason(exc: Exception) -> str:
    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args else None
        return error.str() if hasattr(error, "str") else str(exc)
    return str(exc)


def spool_transactional_id(settings: Settings, name: str) -> str:
    """The one transactional id of a spool on this host: a restarted process draining the spool fences its
    dead predecessor at once, and the broker aborts the transaction that one left open."""
    return f"{settings.topic_prefix}spool-{socket.gethostname()}-{name}"


class SpooledPublisher:
    """Accepts events whether or not Kafka is reachable: each :meth:`publish` batch is fsynced to the spool
    ``name`` (``<home>/spool/<name>/``), then published in order by a background thread that connects (and
    reconnects) by itself: a batch is never split over transactions (a backlog goes out several batches
    per transaction, up to :data:`TRANSACTION_EVENTS` events).

    A new publisher on a spool with batches left publishes those first. Construction never
    touches Kafka; it raises :class:`~beamstream.producers.spool.SpoolBusy` when another
    process holds the spool. A commit or abort stuck past ``call_limit_s`` (librdkafka after a
    broker restart) costs its producer, not the batches: see :meth:`_commit`.
    """

    def __init__(self, settings: Settings, name: str, *, serde: Serde | None = None, directory: Path | None = None,
                 segment_bytes: int | None = None, call_limit_s: float = CALL_LIMIT_S) -> None:
        self.settings = settings
        self.name = check_name(name)
        self.encoder = EventEncoder(settings, serde)
        self.serde = self.encoder.serde
        self.transactional_id = spool_transactional_id(settings, name)
        extra = {"segment_bytes": segment_bytes} if segment_bytes else {}
        self.spool = Spool(directory or spool_root(settings) / name, name, **extra)
        self.path = self.spool.directory
        self._wake = threading.Condition()
        self._producer: Producer | None = None
        self._limit = CallLimit(call_limit_s)
        self.producers_replaced = 0  # producers left stuck in a call (the next connect replaces each)
        self._connected = False
        self._broker_up = False  # from the client's statistics
        self._last_error: str | None = None
        self._last_progress = time.monotonic()  # a batch committed, or the backlog last empty
        self._closing = False
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._drain, name=f"spool-{name}", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------
    def publish(self, events: Iterable[Event], headers: Sequence[tuple[str, bytes]] = ()) -> int:
        """Spool ``events`` as one batch (published in one transaction later); returns how many. A bad event
        raises at once and nothing is spooled; :class:`SpoolError` if the disk refuses."""
        records = self.encoder.encode(events, headers)
        if not records:
            return 0
        if self._closing:
            raise SpoolError(f"spool {self.name}: the publisher is closed")
        with self._wake:
            if self.spool.pending_batches == 0:
                self._last_progress = time.monotonic()  # the clock of a stuck backlog starts now
            self.spool.append([SpooledRecord(r.topic, r.key, r.value, r.headers) for r in records])
            self._wake.notify_all()
        self._report()
        return len(records)

    def backlog(self) -> Backlog:
        """What is spooled and not yet in Kafka, and whether Kafka is reachable now."""
        backlog = self.spool.backlog()
        if self._connected:
            why = None
        else:  # the first attempt can take init_transactions' 30 s to fail: say what is going on meanwhile
            why = self._last_error or f"connecting to Kafka at {self.settings.kafka_bootstrap}"
        return Backlog(backlog.name, backlog.path, backlog.batches, backlog.events, backlog.oldest_age_s,
                       connected=self._connected, holder_pid=backlog.holder_pid, last_error=why)

    def can_publish(self) -> bool:
        """True while Kafka is reachable and the backlog drains (empty, or a batch committed lately):
        the file watcher's "no new image" timeout runs only then."""
        if not self._connected:
            return False
        return self.spool.pending_batches == 0 or time.monotonic() - self._last_progress < STUCK_AFTER_S

    def failing(self) -> bool:
        """True once reaching Kafka or publishing has failed, until a batch is committed again."""
        return not self._connected and self._last_error is not None

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until every spooled batch is committed to Kafka; False if ``timeout`` passed first (or the
        publisher has stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self.spool.pending_batches:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(0.2 if left is None else min(left, 0.2))
        return True

    def close(self, timeout: float = 30.0, announce: bool = True) -> Backlog:
        """Publish what is spooled for up to ``timeout`` seconds, then stop; what is left stays on disk for
        the next publisher on this spool (one log line says so, unless ``announce`` is False: the caller
        says it). Returns the backlog left."""
        with self._wake:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._wake.notify_all()
        # A Kafka call in progress (a flush, an init) cannot be interrupted: wait for it a little longer.
        self._thread.join(max(timeout, 0) + 2.0)
        left = self.backlog()
        if left.batches and announce:
            log.warning("%d events in %d batches kept in spool %s: published by the next run on spool %s or by "
                        "`beamstream spool drain %s`", left.events, left.batches, self.path, self.name, self.name)
        return left

    def __enter__(self) -> SpooledPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the drain thread ------------------------------------------------------------------------
    def _drain(self) -> None:
        retry = RETRY_FIRST_S
        try:
            while not self._finished():
                if self._producer is None and not self._connect():
                    self._pause(retry)
                    retry = min(retry * 2, RETRY_CAP_S)
                    continue
                batches = self.spool.peek(TRANSACTION_EVENTS)
                if not batches:
                    self._idle()
                    continue
                if self._commit(batches):
                    retry = RETRY_FIRST_S
                else:
                    self._pause(retry)
                    retry = min(retry * 2, RETRY_CAP_S)
        except Exception:  # the spool stays on disk; the next publisher on it carries on
            log.exception("spool %s: publishing stopped", self.name)
        finally:
            self._drop_producer()
            self._connected = False
            self._report()
            self.spool.close()
            with self._wake:
                self._wake.notify_all()

    def _finished(self) -> bool:
        with self._wake:
            return self._closing and (self.spool.pending_batches == 0 or time.monotonic() >= self._deadline)

    def _pause(self, seconds: float) -> None:
        with self._wake:
            self._wake.wait(max(min(seconds, self._deadline - time.monotonic()), 0.0))

    def _idle(self) -> None:
        """Nothing to publish: serve the client's callbacks (its statistics say whether Kafka is reachable)."""
        with self._wake:
            self._last_progress = time.monotonic()
            if not self._closing and not self.spool.pending_batches:  # (publish() appends under this lock)
                self._wake.wait(0.2)
        if self._producer is not None:
            self._producer.poll(0)
            self._connected = self._broker_up
        self._report()

    def _connect(self) -> bool:
        """Make the transactional producer (init_transactions fences the spool's earlier producers)."""
        try:
            self._producer = make_producer(self.settings, transactional_id=self.transactional_id, **{
                # Back within a second of the broker, not librdkafka's default 10 s reconnect backoff.
                "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 1000,
                "statistics.interval.ms": 1000, "stats_cb": self._stats, "error_cb": self._error,
            })
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            timed_out = isinstance(error, KafkaError) and error.code() == KafkaError._TIMED_OUT
            # librdkafka's words for a timed-out init_transactions ("retry call to resume") mean no answer.
            self._failed(f"cannot reach Kafka at {self.settings.kafka_bootstrap}: "
                         f"{'no answer within 30 s' if timed_out else _reason(exc)}")
            return False
        self._broker_up = self._connected = True
        self._last_error = None
        log.info("spool %s: connected to Kafka at %s", self.name, self.settings.kafka_bootstrap)
        return True

    def _commit(self, batches: list[SpooledBatch]) -> bool:
        """Publish the oldest spooled batches, in order, in one transaction and acknowledge them; False (and a
        new producer to come) if it failed: the same batches are published again.

        Nothing is lost or reordered: batches are acknowledged (dropped from the spool) only after their
        commit returned, and the next transaction always starts again from the oldest batch not
        acknowledged. A commit stuck past the call limit has an unknown outcome: its producer is left to
        the blocked call, and the next one, with the spool's transactional id, fences it in
        ``init_transactions``, which also settles its transaction (committed if the commit had reached
        the coordinator, aborted otherwise); nothing the stuck producer does can be written after that. The
        same batches are then published again, so they are in Kafka at least once and maybe twice, each
        copy whole and in order; the workers drop a copy of an image event they have answered."""
        try:
            with AtomicWriter(producer=self._producer, limit=self._limit) as writer:
                for batch in batches:
                    for record in batch.records:
                        writer.produce(OutRecord(record.topic, record.key, record.value, list(record.headers)))
        except TransactionStuck as exc:
            self._producer = None  # not purged or flushed: a call is still blocked in it
            self.producers_replaced += 1
            log.warning("spool %s: %s; a new producer fences it and batches %d-%d are published again",
                        self.name, exc, batches[0].seq, batches[-1].seq)
            return False
        except Exception as exc:  # noqa: BLE001 - see below
            # Whatever failed (the broker away, a fenced or fatally failed producer), a new
            # producer starts clean: its init_transactions aborts whatever this one left open. Not only
            # KafkaException: confluent-kafka 2.16 raises SystemError out of flush() once the producer is fenced
            # (its delivery callback's error.str() meets the pending fatal error).
            self._drop_producer()
            events = sum(len(batch.records) for batch in batches)
            self._failed(f"publishing batches {batches[0].seq}-{batches[-1].seq} ({events} events) failed: "
                         f"{_reason(exc)}")
            return False
        self.spool.ack(batches[-1].seq)
        with self._wake:
            self._last_progress = time.monotonic()
            if self._last_error is not None:
                log.warning("spool %s: publishing again; %d events left", self.name, self.spool.pending_events)
            self._last_error = None
            self._connected = True
            self._wake.notify_all()
        self._report()
        return True

    def _failed(self, reason: str) -> None:
        if self._last_error is None:  # one line per outage, not one per attempt
            log.warning("spool %s: %s; events are kept in %s and published when Kafka is back",
                        self.name, reason, self.path)
        self._last_error = reason
        self._connected = False
        self._report()

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.purge()  # whatever it still holds belongs to an aborted or fenced transaction
                producer.flush(0)
            except Exception:  # noqa: BLE001 - a failed producer may fail this too; it is dropped either way
                pass

    def _stats(self, stats_json: str) -> None:
        """librdkafka's statistics: connected while any broker (a known node, not a bootstrap address) is up."""
        try:
            brokers = json.loads(stats_json).get("brokers", {}).values()
        except ValueError:
            return
        self._broker_up = any(b.get("nodeid", -1) >= 0 and b.get("state") == "UP" for b in brokers)
        if not self._broker_up:
            self._connected = False

    def _error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._broker_up = self._connected = False
            self._last_error = error.str()

    def _report(self) -> None:
        backlog = self.spool.backlog() if self.spool is not None else None
        if backlog is not None:
            metrics.spool_backlog(self.name, backlog.batches, backlog.events, backlog.oldest_age_s, self._connected)


Publisher = EventPublisher | SpooledPublisher


def open_publisher(settings: Settings, spool: str | None = None) -> Publisher:
    """A :class:`SpooledPublisher` on spool ``spool`` (Kafka need not be reachable; a :class:`SpoolError`
    when the spool is held by another process or unusable), or without a spool an :class:`EventPublisher`,
    raising :class:`ProducerError` when the cluster can't be reached."""
    if spool is not None:
        return SpooledPublisher(settings, spool)
    try:
        return EventPublisher(settings)
    except KafkaException as exc:
        raise ProducerError(
            f"cannot start a transactional producer on Kafka at {settings.kafka_bootstrap}: {_reason(exc)} "
            "(is the cluster up? `beamstream cluster up`)"
        ) from None


def publish(publisher: Publisher, events: Sequence[Event]) -> int:
    """``publisher.publish(events)`` as one batch, with Kafka and spool failures as :class:`ProducerError`."""
    try:
        return publisher.publish(events)
    except (KafkaException, RetainedError, SpoolError) as exc:
        kinds = ", ".join(sorted({event.record_type for event in events}))
        raise ProducerError(f"publishing {len(events)} {kinds} event(s) failed: {_reason(exc)}") from None


def drain_spool(publisher: SpooledPublisher, timeout_s: float | None, stop: threading.Event | None = None,
                on_waiting: Callable[[Backlog], None] | None = None, every_s: float = 5.0,
                announce: bool = True) -> Backlog:
    """Wait until the spool is published, ``timeout_s`` passes (None: no limit) or ``stop`` is set, then close
    the publisher; ``on_waiting(backlog)`` is called once events have waited a moment, then every ``every_s``
    seconds. Once stopped, a publisher that has not failed to reach Kafka gets :data:`STOP_GRACE_S` more
    (a stopped watch's CollectionEnded is normally on its way). Returns what is left in the spool (``announce``:
    see :meth:`SpooledPublisher.close`)."""
    deadline = float("inf") if timeout_s is None else time.monotonic() + timeout_s
    stopping = False
    next_report = time.monotonic()
    while not publisher.wait_drained(0.2):
        now = time.monotonic()
        if stop is not None and stop.is_set() and not stopping:
            stopping = True
            deadline = min(deadline, now + (0.0 if publisher.failing() else STOP_GRACE_S))
        if now >= deadline:
            break
        if on_waiting is not None and now >= next_report:
            on_waiting(publisher.backlog())
            next_report = now + every_s
    return publisher.close(timeout=5.0 if publisher.wait_drained(0) else 0.0, announce=announce)
