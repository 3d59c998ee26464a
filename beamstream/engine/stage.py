"""A consume-transform-produce stage on its own thread: events in, outputs out, exactly once.

The per-image analysis runs here rather than as a Faust agent. faust-streaming
commits offsets through aiokafka, which cannot send the consumer group's
generation with them (KIP-447), so a worker that lost a partition could still
commit results for it while the new owner processed the same images again; a
patch layer over Faust narrowed that window but never closed it (README,
"Why not Faust").
With confluent-kafka the broker itself refuses offsets from an old generation,
which closes it (see :mod:`beamstream.transactions`).

Loop: fetch events, hand each to ``handle`` (which returns its outputs and never
raises for bad input), and every ``commit_interval_s`` commit the outputs with
the offsets in one transaction. Rebalance callbacks run only inside ``consume``,
between transactions, so a revoked partition never has outputs in flight.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from beamstream.engine.transactions import (
    BatchOffsets,
    Output,
    TransactionFailed,
    commit_batch,
    produce,
    rewind,
    rewind_to_committed,
)
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.settings import Settings

log = logging.getLogger("beamstream.worker")

Handler = Callable[[Message], list[Output]]

#: A killed worker's open transaction holds back read_committed readers of its output
#: partitions until the broker aborts it; keep that short (the group's session timeout
#: moves its input partitions within 10 s anyway).
TRANSACTION_TIMEOUT_MS = 15_000
#: Each transactional call's own limit; the broker aborts our transaction after TRANSACTION_TIMEOUT_MS anyway.
COMMIT_TIMEOUT_S = 30.0
FETCH_BATCH = 500


class TransactionalStage:
    """Consume ``topics`` in consumer group ``group_id``; each event's outputs and its offset
    commit together. With ``exactly_once`` off, outputs are flushed and offsets committed
    afterwards (at-least-once, to measure what the guarantee costs). ``flush``, if given, returns
    outputs to add to every transaction after its events' own (a table's changed entries)."""

    def __init__(self, settings: Settings, group_id: str, topics: list[str], handle: Handler, *,
                 exactly_once: bool = True, commit_interval_s: float = 0.1, name: str = "stage",
                 session_timeout_s: float = 10.0,
                 on_assigned: Callable[[list[TopicPartition]], None] | None = None,
                 on_revoked: Callable[[list[TopicPartition]], None] | None = None,
                 on_aborted: Callable[[], None] | None = None,
                 flush: Callable[[], list[Output]] | None = None,
                 tick: Callable[[], None] | None = None, tick_interval_s: float = 1.0) -> None:
        self.settings = settings
        self.on_aborted = on_aborted
        self.flush = flush
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.tick = tick
        self.tick_interval_s = tick_interval_s
        self._last_tick = 0.0
        self.group_id = group_id
        self.topics = topics
        self.handle = handle
        self.exactly_once = exactly_once
        self.commit_interval_s = commit_interval_s
        self.name = name
        self.session_timeout_s = session_timeout_s
        self.stop_requested = threading.Event()
        self.error: BaseException | None = None
        self.committed_batches = 0
        self.committing_since: float | None = None  # time.monotonic() when the commit in progress began
        self.aborted_batches = 0
        self._thread: threading.Thread | None = None
        self._pending: deque[Message] = deque()
        self._offsets = BatchOffsets()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> TransactionalStage:
        """Run the stage on a daemon thread."""
        self._thread = threading.Thread(target=self._run_guarded, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand, commit it, leave the group (its partitions move at once)."""
        self.stop_requested.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def stalled_for(self) -> float:
        """Seconds the commit in progress has taken (0 when none is)."""
        since = self.committing_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def running(self) -> bool:
        """True while the stage thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # the worker notices (running is False) and exits
            self.error = exc
            log.critical("%s stopped: %s", self.name, exc, exc_info=True)

    # -- the loop -----------------------------------------------------------------
    def run(self) -> None:
        """Consume until :meth:`stop` (blocking; :meth:`start` runs it on a thread)."""
        consumer = make_consumer(self.settings, self.group_id, **{
            "session.timeout.ms": int(self.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(self.session_timeout_s * 300),
            "max.poll.interval.ms": 600_000,  # one very slow image must not cost the partitions
            # Range keeps partition p of every input topic on one worker: the inputs are
            # co-partitioned by dcid and a table partition needs all of its events.
            "partition.assignment.strategy": "range",
        })
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        producer = self._new_producer()
        try:
            while not self.stop_requested.is_set():
                if self.tick is not None and time.monotonic() - self._last_tick >= self.tick_interval_s:
                    self._last_tick = time.monotonic()
                    self.tick()
                if not self._fill(consumer):
                    continue
                outputs = self._process_batch()
                if self.flush is not None:
                    outputs.extend(self.flush())  # e.g. table changes, once per transaction
                if self.exactly_once:
                    self.committing_since = time.monotonic()
                    in_batch = set(self._offsets.first)
                    try:
                        if commit_batch(producer, consumer, outputs, self._offsets, timeout_s=COMMIT_TIMEOUT_S):
                            self.committed_batches += 1
                            continue
                        # commit_batch rewound the batch's partitions; events fetched for the others
                        # were not in it and are dropped below, so fetch them again too.
                        rewind(consumer, self._first_pending(exclude=in_batch))
                    except TransactionFailed as exc:
                        log.warning("%s: %s; starting a new producer", self.name, exc)
                        self._offsets.clear()
                        producer = self._new_producer()
                        rewind_to_committed(consumer)
                    finally:
                        self.committing_since = None
                    self.aborted_batches += 1
                    self._pending.clear()
                    if self.on_aborted is not None:
                        self.on_aborted()
                else:
                    self._commit_at_least_once(producer, consumer, outputs)
        finally:
            self._pending.clear()
            try:
                consumer.close()  # leaves the group: the partitions move without a session timeout
            finally:
                producer.flush(10)

    def _new_producer(self):
        if not self.exactly_once:
            return make_producer(self.settings)
        # KIP-447 fences by consumer generation, so the id only has to be unique.
        transactional_id = f"{self.group_id}-{uuid.uuid4().hex[:12]}"
        return make_producer(self.settings, transactional_id=transactional_id,
                             **{"transaction.timeout.ms": TRANSACTION_TIMEOUT_MS})

    def _first_pending(self, exclude: set) -> dict[tuple[str, int], int]:
        """The lowest queued offset of each partition not in ``exclude``."""
        first: dict[tuple[str, int], int] = {}
        for message in self._pending:
            key = (message.topic(), message.partition())
            if key not in exclude:
                first.setdefault(key, message.offset())
        return first

    def _fill(self, consumer) -> bool:
        """Top up the local queue from the consumer; True when there is something to process.

        ``consume`` is called between every two transactions even with events still queued:
        rebalance callbacks only run inside it, and an eager rebalance waits for every member
        to give up its partitions, so the whole group would wait out a slow queue."""
        room = max(FETCH_BATCH - len(self._pending), 1)
        # consume(n, timeout) waits for n messages or the timeout, so block for the first event
        # only (when idle) and then take what is already fetched: a batch never waits to fill up.
        messages = consumer.consume(1, timeout=0 if self._pending else 0.2)
        if messages and room > 1:
            messages += consumer.consume(room - 1, timeout=0)
        for message in messages:
            error = message.error()
            if error is None:
                self._pending.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("%s: consumer error: %s", self.name, error.str())
        return bool(self._pending)

    def _process_batch(self) -> list[Output]:
        """Handle queued events for up to ``commit_interval_s`` (at least one event)."""
        outputs: list[Output] = []
        deadline = time.monotonic() + self.commit_interval_s
        while self._pending:
            message = self._pending.popleft()
            outputs.extend(self.handle(message))
            self._offsets.add(message)
            if time.monotonic() >= deadline or self.stop_requested.is_set():
                break
        return outputs

    def _on_assign(self, consumer, partitions) -> None:
        if self.on_assigned is None or not partitions:
            return
        # Asked with require_stable, this waits until the previous owner's last transactional
        # offset commit is committed or aborted; state restored after it matches those offsets.
        consumer.committed(partitions, timeout=60)
        self.on_assigned(list(partitions))

    def _on_revoke(self, _consumer, partitions) -> None:
        # Called inside consume(), between transactions: whatever is still queued for
        # these partitions is the next owner's now.
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = deque(m for m in self._pending if (m.topic(), m.partition()) not in revoked)
        self._offsets.forget(partitions)
        if self.on_revoked is not None:
            self.on_revoked(list(partitions))

    def _commit_at_least_once(self, producer, consumer, outputs: list[Output]) -> None:
        for output in outputs:
            produce(producer, output)
        producer.flush(30)
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self._offsets.next.items()],
                        asynchronous=False)
        self._offsets.clear()
