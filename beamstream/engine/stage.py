"""A consume-transform-produce stage: events in, outputs out, exactly once. Every Beamstream
service that consumes and then writes runs on this (both worker stages, the ISPyB sink, the
archiver); the rules for committing, aborting and retrying are in
:mod:`beamstream.engine.transactions`.

One step of the loop (:meth:`Stage.step`):

1. ``consume``: top up the local queue. Rebalance callbacks run only in here, between
   transactions, so a revoked partition never has outputs in flight; its queued events
   are dropped (they are the next owner's) and its table partitions are checkpointed and
   dropped. On assignment the committed offsets are fetched *stably* first, so tables are
   restored only once the previous owner's last transaction has settled.
2. ``process``: hand queued events to the :class:`Processor` in chunks for up to
   ``commit_interval_s``, or until the queue is empty: an idle stage commits at once, a
   busy one at most every interval. With ``threads`` > 1 the events are processed one
   each on a pool of threads while the loop goes on consuming (so a slow event never
   holds up a rebalance), and each step commits the events finished by then, in offset
   order per partition. An event in flight for a partition that is revoked is dropped:
   its result is never committed by this stage.
3. ``commit``: the outputs, the tables' changelog records and the consumed offsets
   (with the group metadata, KIP-447) in one transaction. Committed: the tables commit
   their buffers. Aborted: the tables drop them, every partition with queued events is
   rewound and the events are processed again. A fatal error, or a transactional call
   stuck past ``call_limit_s`` (librdkafka after a broker restart): a new producer with
   the same transactional id (which fences the old one and settles its transaction), then
   the committed offsets say whether the batch committed or is processed again.

A processor that cannot go on for now (the ISPyB database is down) raises
:class:`Backoff`: nothing of the batch is committed, its partitions are rewound and
paused, and the stage keeps polling (so it keeps its partitions) until the wait is over.
A batch that cannot be settled within ``stall_limit_s`` (Kafka stopped, not just restarted)
ends the process with :data:`STALLED_EXIT_CODE` (see :meth:`Stage._watch_for_stalls`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from beamstream.engine.table import ChangelogTable
from beamstream.engine.transactions import (
    CALL_LIMIT_S,
    BatchOffsets,
    CallLimit,
    Outcome,
    Output,
    TransactionFailed,
    batch_committed,
    commit_at_least_once,
    commit_batch,
    committed_offsets,
    rewind,
    rewind_to_committed,
)
from beamstream.errors import BeamstreamError
from beamstream.platform import kafka_clients
from beamstream.platform.settings import Settings

log = logging.getLogger(__name__)

#: A killed worker's open transaction holds back read_committed readers of its output
#: partitions until the broker aborts it; keep that short (the group's session timeout
#: moves its input partitions within 10 s anyway).
TRANSACTION_TIMEOUT_MS = 15_000
#: Each transactional call's own limit; the broker aborts our transaction after TRANSACTION_TIMEOUT_MS anyway.
COMMIT_TIMEOUT_S = 30.0
#: Events fetched ahead of processing: under load a batch is as large as its commit interval allows (100 ms of
#: work); at 500 the commits, not the events, set a no-op worker's pace (19,000 against 26,000-34,000 events/s).
FETCH_BATCH = 2000
#: Exit code of a process that left a stalled Kafka client behind (EX_TEMPFAIL: try again).
STALLED_EXIT_CODE = 75


def _hint(error: KafkaError) -> str:
    """What to check after a failed start: the cluster's state, unless the broker refused us by name."""
    refused = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
               KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
               KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}
    return " (check the Kafka user's ACLs and credentials)" if error.code() in refused else " (is the cluster up?)"


class StageError(BeamstreamError):
    """A stage cannot run (Kafka unreachable at start-up)."""


class Backoff(Exception):  # noqa: N818 - a request, not an error
    """Raised by :meth:`Processor.process`: nothing can be done for ``delay_s`` (a database outage).
    The batch is not committed; its events are processed again after the wait."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Processor:
    """What a stage does with its events: :meth:`process` is the one method to write; the hooks are
    called on the stage's thread at the points their names say. ``tables`` are restored, checkpointed,
    committed and aborted by the stage."""

    tables: Sequence[ChangelogTable] = ()

    def process(self, messages: list[Message]) -> list[Output]:
        """The outputs of ``messages`` (one chunk of the batch). Bad input becomes a dead letter among
        the outputs, never an exception; raise :class:`Backoff` to retry the whole batch later."""
        raise NotImplementedError

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Partitions were assigned (after the tables' partitions were restored)."""

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Partitions were revoked or lost (their queued events are already dropped)."""

    def committed(self) -> None:
        """The batch's transaction committed."""

    def aborted(self) -> None:
        """The batch's outputs were thrown away; its events will be processed again."""

    def tick(self) -> None:
        """Called about every ``tick_interval_s`` between batches, busy or idle."""


@dataclass(frozen=True)
class KafkaClients:
    """How a stage makes its clients (the engine's unit tests pass in-memory fakes)."""

    consumer: Callable[..., object] = kafka_clients.make_consumer
    producer: Callable[..., object] = kafka_clients.make_producer


class Stage:
    """Consume ``topics`` in consumer group ``group_id`` and run ``processor`` on them; each event's
    outputs commit together with its offset. ``chunk_size`` events go to each ``process`` call.
    With ``exactly_once`` off, outputs are flushed and offsets committed afterwards (at-least-once,
    only to measure what the guarantee costs)."""

    def __init__(self, settings: Settings, group_id: str, topics: list[str], processor: Processor, *,
                 name: str = "stage", exactly_once: bool = True, commit_interval_s: float = 0.1,
                 chunk_size: int = 1, tick_interval_s: float = 1.0, checkpoint_interval_s: float = 30.0,
                 transactional_id: str | None = None, consumer_config: dict | None = None,
                 threads: int = 1, stall_limit_s: float | None = 60.0, call_limit_s: float = CALL_LIMIT_S,
                 last_words: Callable[[Stage], None] | None = None,
                 clients: KafkaClients = KafkaClients()) -> None:
        self.settings, self.group_id, self.topics, self.processor = settings, group_id, topics, processor
        self.name = name
        self.exactly_once = exactly_once
        self.commit_interval_s = commit_interval_s
        self.chunk_size = chunk_size
        self.threads = threads
        self.tick_interval_s = tick_interval_s
        self.checkpoint_interval_s = checkpoint_interval_s
        # One id for every producer of this stage: a replacement fences a stuck predecessor and settles its
        # transaction at once (KIP-447 fences zombies by group generation, so the id only has to be unique).
        self.transactional_id = transactional_id or f"{group_id}-{uuid.uuid4().hex[:12]}"
        self.call_limit = CallLimit(call_limit_s)
        self.producers_replaced = 0
        self.consumer_config = consumer_config or {}
        self.stall_limit_s = stall_limit_s
        self.last_words = last_words  # called before a stalled process exits (a service's "failed" heartbeat)
        self.clients = clients
        self.stop_requested = threading.Event()
        self.error: BaseException | None = None
        self.committed_batches = 0
        self.aborted_batches = 0
        self.committing_since: float | None = None  # time.monotonic() when the commit in progress began
        self.consumer = None
        self.producer = None
        self._thread: threading.Thread | None = None
        self._pending: deque[Message] = deque()
        #: With threads: events being processed, in the order they were fetched.
        self._in_flight: deque[tuple[Message, futures.Future]] = deque()
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None
        self._seconds_per_event: float | None = None  # moving average of the processor's time, with threads
        self._offsets = BatchOffsets()
        self._last_tick = 0.0
        self._last_checkpoint = time.monotonic()
        self._changelogs = {table.changelog_topic: table.delivered for table in processor.tables}

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Stage:
        """Run the stage on a daemon thread."""
        self._thread = threading.Thread(target=self._run_guarded, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
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
        except BaseException as exc:  # the service notices (running is False) and exits
            self.error = exc
            log.critical("%s stopped: %s", self.name, exc, exc_info=True)

    def run(self, idle_timeout_s: float | None = None) -> None:
        """Run until :meth:`stop` (or nothing came for ``idle_timeout_s``); blocking."""
        self.open()
        idle_since = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                if self.step():
                    idle_since = time.monotonic()
                elif idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                    break
            self.finish_in_flight()
        finally:
            self.close()

    def open(self) -> None:
        """Make the clients and subscribe (:meth:`run` does this; tests driving :meth:`step` call it)."""
        config = {
            # Range keeps partition p of every input topic on one member: the inputs are co-partitioned
            # by dcid and a table partition needs all of its events.
            "partition.assignment.strategy": "range",
            **self.consumer_config,
        }
        self.consumer = self.clients.consumer(self.settings, self.group_id, **config)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        try:
            self.producer = self._new_producer()
        except KafkaException as exc:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError):
                pass  # one that never reached the cluster may refuse to close; the producer's error is the one to tell
            raise StageError(f"{self.name}: cannot start a transactional producer on Kafka at "
                             f"{self.settings.kafka_bootstrap}: {exc.args[0].str()}{_hint(exc.args[0])}") from None
        if self.exactly_once and self.stall_limit_s is not None:
            threading.Thread(target=self._watch_for_stalls, name=f"{self.name}-stall-watch", daemon=True).start()

    def finish_in_flight(self, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
        """Let the events in flight finish (up to ``timeout_s``) and commit them; queued ones are left
        for the partitions' next owner. What is unfinished by then is dropped, not committed."""
        self._pending.clear()
        if not self._in_flight:
            return
        futures.wait([future for _, future in self._in_flight], timeout=timeout_s)
        try:
            outputs = self._harvest(wait_s=0)
        except Backoff:
            self._discard_batch()  # stopping: the next owner processes them
            return
        if self._offsets:
            self._commit(outputs)

    def close(self) -> None:
        """Checkpoint the tables, leave the group and flush the producer."""
        self._pending.clear()
        self.stop_requested.set()  # ends the stall watch
        self._drop_in_flight(lambda _message: True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._checkpoint()
            self.consumer.close()  # leaves the group: the partitions move without a session timeout
        finally:
            self.producer.flush(10)

    def _watch_for_stalls(self) -> None:
        """End the process when a commit, with the producer replacements it took, has not settled for
        ``stall_limit_s``: the last resort. A call stuck in librdkafka after a broker restart
        (confluentinc/librdkafka#5456, #5511) is abandoned after ``call_limit_s`` and its producer
        replaced; what is left is a cluster that answers nothing (stopped, partitioned away) or a
        call outside that limit. The broker aborts this process's open transaction once it is gone,
        and the supervisor (systemd, Kubernetes, `beamstream monitor`) starts a fresh one."""
        while not self.stop_requested.wait(1.0):
            if self.stalled_for > self.stall_limit_s:
                log.critical("stage stalled in a Kafka transaction, the process exits for a restart",
                             extra={"stage": self.name, "stalled_s": round(self.stalled_for, 1)})
                faulthandler.dump_traceback(all_threads=True)  # which call hung, for the log
                try:
                    if self.last_words is not None:
                        self.last_words(self)
                finally:
                    logging.shutdown()
                    os._exit(STALLED_EXIT_CODE)

    # -- one step -------------------------------------------------------------------
    def step(self) -> bool:
        """Fetch, process and commit one batch; True when there was one."""
        if time.monotonic() - self._last_tick >= self.tick_interval_s:
            self._last_tick = time.monotonic()
            self.processor.tick()
        if not self._fill():
            return False
        try:
            outputs = self._process_batch() if self._pool is None else self._harvest()
        except Backoff as wait:
            self._back_off(wait)
            return True
        if self._offsets:
            self._commit(outputs)
        return True

    def _commit(self, outputs: list[Output]) -> None:
        """Commit the batch: ``outputs``, the tables' changes and the offsets (the rules of the module docstring)."""
        for table in self.processor.tables:
            outputs.extend(table.flush())  # changed entries, once per transaction
        if not self.exactly_once:
            commit_at_least_once(self.producer, self.consumer, outputs, self._offsets, self._changelogs)
            self._committed()
            return
        self.committing_since = time.monotonic()
        in_batch = set(self._offsets.first)
        batch_next = dict(self._offsets.next)
        try:
            outcome = commit_batch(self.producer, self.consumer, outputs, self._offsets,
                                   timeout_s=COMMIT_TIMEOUT_S, on_delivery=self._changelogs, limit=self.call_limit)
        except TransactionFailed as exc:
            self._replace_producer(exc, batch_next)
            return
        finally:
            self.committing_since = None
        if outcome is Outcome.COMMITTED:
            self._committed()
        else:
            # commit_batch rewound the batch's partitions; events queued for the others were not
            # in it and are dropped below, so fetch them again too.
            rewind(self.consumer, self._first_pending(exclude=in_batch))
            self._aborted()

    def _replace_producer(self, failure: TransactionFailed, batch_next: dict[tuple[str, int], int]) -> None:
        """A new producer after ``failure``; then the batch counts as committed or aborted, as it turned out.

        The new producer has the same transactional id, so making it fences the old one and settles the
        old one's transaction (a stuck producer's is aborted at once, not after its timeout). Only then
        do the committed offsets tell whether the batch committed. While Kafka is unreachable this keeps
        trying; the stall watch still ends a process that cannot settle its batch within ``stall_limit_s``."""
        log.warning("%s: %s; starting a new producer", self.name, failure)
        started = time.monotonic()
        while True:
            try:
                self.producer = self._new_producer()
                committed = committed_offsets(self.consumer, COMMIT_TIMEOUT_S)
                break
            except KafkaException as exc:
                if self.stop_requested.is_set():
                    raise StageError(f"{self.name}: stopped before Kafka was back to settle the last batch "
                                     f"({exc.args[0].str()}); its events are processed again") from None
                log.warning("%s: Kafka not usable yet, trying again: %s", self.name, exc.args[0].str())
                self.stop_requested.wait(1.0)
        self.producers_replaced += 1
        settled = batch_committed(batch_next, committed)
        log.info("%s: new producer after %.1f s; the batch %s", self.name, time.monotonic() - started,
                 "had committed" if settled else "is processed again")
        if settled:
            # Committed by this stage, or (a zombie's partitions) by their new owner up to the same offset:
            # the rebalance served in the next consume drops lost partitions, so no checkpoint before it.
            self._committed(checkpoint=False)
            return
        rewind_to_committed(self.consumer, committed)
        self._aborted()

    def _committed(self, checkpoint: bool = True) -> None:
        self.producer.poll(0)  # serves the changelog records' delivery reports before the tables commit
        for table in self.processor.tables:
            table.commit()
        self.committed_batches += 1
        self.processor.committed()
        if checkpoint and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s:
            self._checkpoint()

    def _aborted(self) -> None:
        self.aborted_batches += 1
        self._discard_batch()

    def _discard_batch(self) -> None:
        """Forget the batch and everything fetched after it (the consumer was rewound to them)."""
        self._pending.clear()
        self._drop_in_flight(lambda _message: True)
        self._offsets.clear()
        for table in self.processor.tables:
            table.abort()
        self.processor.aborted()

    def _checkpoint(self) -> None:
        self._last_checkpoint = time.monotonic()
        for table in self.processor.tables:
            try:
                table.checkpoint()
            except OSError as exc:  # a full disk costs a slower restore, nothing else
                log.warning("table checkpoint not written: %s", exc, extra={"table": table.changelog_topic})

    def _new_producer(self):
        if not self.exactly_once:
            return self.clients.producer(self.settings)
        return self.clients.producer(self.settings, transactional_id=self.transactional_id,
                                     **{"transaction.timeout.ms": TRANSACTION_TIMEOUT_MS})

    def _first_pending(self, exclude: set) -> dict[tuple[str, int], int]:
        """The lowest offset in flight or queued of each partition not in ``exclude``."""
        first: dict[tuple[str, int], int] = {}
        for message in [m for m, _ in self._in_flight] + list(self._pending):
            key = (message.topic(), message.partition())
            if key not in exclude:
                first[key] = min(first.get(key, message.offset()), message.offset())
        return first

    def _drop_in_flight(self, dropped: Callable[[Message], bool]) -> None:
        """Forget events in flight that ``dropped`` names: their results are never committed."""
        kept: deque[tuple[Message, futures.Future]] = deque()
        for message, future in self._in_flight:
            if dropped(message):
                future.cancel()  # a started one runs to its end; its result is ignored
            else:
                kept.append((message, future))
        self._in_flight = kept

    def _fill(self) -> bool:
        """Top up the local queue from the consumer; True when there is something to process.

        ``consume`` is called between every two transactions even with events still queued:
        rebalance callbacks only run inside it, and an eager rebalance waits for every member
        to give up its partitions, so the whole group would wait out a slow queue."""
        room = max(FETCH_BATCH - len(self._pending), 1)
        # consume(n, timeout) waits for n messages or the timeout, so block for the first event
        # only (when idle) and then take what is already fetched: a batch never waits to fill up.
        # With events in flight, do not wait here: _harvest waits for them (and they are committed as they come).
        timeout = 0.0 if self._pending or self._in_flight else 0.2
        messages = self.consumer.consume(1, timeout=timeout)
        # Queued before the second consume: a revocation served in there must drop them too.
        self._queue(messages)
        if messages and room > 1:
            self._queue(self.consumer.consume(room - 1, timeout=0))
        return bool(self._pending or self._in_flight)

    def _queue(self, messages: list[Message]) -> None:
        for message in messages:
            error = message.error()
            if error is None:
                self._pending.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("%s: consumer error: %s", self.name, error.str())

    def _process_batch(self) -> list[Output]:
        """Hand queued events to the processor for up to ``commit_interval_s`` (at least one chunk)."""
        outputs: list[Output] = []
        deadline = time.monotonic() + self.commit_interval_s
        while self._pending:
            chunk = [self._pending.popleft() for _ in range(min(self.chunk_size, len(self._pending)))]
            for message in chunk:
                self._offsets.add(message)  # before processing: a Backoff rewinds to them
            outputs.extend(self.processor.process(chunk))
            if time.monotonic() >= deadline or self.stop_requested.is_set():
                break
        return outputs

    def _harvest(self, wait_s: float = 0.05) -> list[Output]:
        """Hand queued events to the threads; take the outputs of those finished, in offset order per
        partition (an unfinished event holds back the later ones of its partition). Waits up to ``wait_s``
        for one to finish when every thread is busy."""
        self._submit()
        unfinished = {f for _, f in self._in_flight if not f.done()}
        if unfinished and (len(unfinished) >= self.threads or not self._pending):
            # Every thread busy, or nothing else to start: wait for a result (briefly when a thread is
            # free, so a new event is fetched and started soon).
            busy = len(unfinished) >= self.threads
            futures.wait(unfinished, timeout=wait_s if busy else min(wait_s, 0.005),
                         return_when=futures.FIRST_COMPLETED)
        outputs: list[Output] = []
        blocked: set[tuple[str, int]] = set()
        taken: set[futures.Future] = set()
        kept: deque[tuple[Message, futures.Future]] = deque()
        for message, future in self._in_flight:
            key = (message.topic(), message.partition())
            if key in blocked or not future.done():
                blocked.add(key)
                kept.append((message, future))
                continue
            self._offsets.add(message)
            if future not in taken:  # one task's outputs, once (a task is a run of one partition's events)
                taken.add(future)
                outputs.extend(future.result())  # a Backoff (or a bug) surfaces here
        self._in_flight = kept
        self._submit()  # the threads work on while the batch commits
        return outputs

    def _submit(self) -> None:
        # Beyond the threads, events wait in the pool's queue: a batch under load is as large as what
        # finished meanwhile, and a queued event of a revoked partition is cancelled before it starts.
        while self._pending and len(self._in_flight) < FETCH_BATCH:
            task = self._next_task()
            future = self._pool.submit(self._process_timed, task)
            self._in_flight.extend((message, future) for message in task)

    def _next_task(self) -> list[Message]:
        """The next events for one thread: one slow event, or a run of quick ones of one partition (a task
        per event would cost more than a quick event's processing, and a revoked partition's task is
        dropped whole)."""
        size = 1 if self._seconds_per_event is None else max(1, min(64, int(0.002 / max(self._seconds_per_event,
                                                                                        1e-7))))
        first = self._pending.popleft()
        task = [first]
        key = (first.topic(), first.partition())
        while self._pending and len(task) < size and (self._pending[0].topic(),
                                                       self._pending[0].partition()) == key:
            task.append(self._pending.popleft())
        return task

    def _process_timed(self, messages: list[Message]) -> list[Output]:
        started = time.perf_counter()
        outputs = self.processor.process(messages)
        per_event = (time.perf_counter() - started) / len(messages)
        previous = self._seconds_per_event
        self._seconds_per_event = per_event if previous is None else 0.9 * previous + 0.1 * per_event
        return outputs

    # -- waiting ------------------------------------------------------------------------
    def _back_off(self, wait: Backoff) -> None:
        """Throw the batch away, rewind to it, and wait ``wait.delay_s`` with every partition paused,
        polling to stay in the group; a message that still arrives is rewound to and paused too."""
        positions = self._first_pending(exclude=set())
        for key, offset in self._offsets.first.items():
            positions[key] = min(positions.get(key, offset), offset)
        rewind(self.consumer, positions)
        self._discard_batch()  # nothing was sent to Kafka: not an aborted transaction
        self.consumer.pause(self.consumer.assignment())
        deadline = time.monotonic() + wait.delay_s
        while not self.stop_requested.is_set() and time.monotonic() < deadline:
            for message in self.consumer.consume(1, timeout=0.1):
                if message.error() is not None:
                    continue
                key = (message.topic(), message.partition())
                positions[key] = min(positions.get(key, message.offset()), message.offset())
                rewind(self.consumer, {key: positions[key]})
                self.consumer.pause([TopicPartition(*key)])
        self.consumer.resume(self.consumer.assignment())

    # -- rebalances (inside consume) ------------------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        if not partitions:
            return
        if self.processor.tables:
            # Asked with require_stable, this waits until the previous owner's last transactional
            # offset commit is committed or aborted; state restored after it matches those offsets.
            consumer.committed(partitions, timeout=60)
            for table in self.processor.tables:
                numbers = {tp.partition for tp in partitions if tp.topic in table.source_topics}
                started = time.monotonic()
                loaded = table.restore(numbers)
                log.info("table partitions restored", extra={
                    "table": table.changelog_topic, "partitions": sorted(numbers), "records": loaded,
                    "seconds": round(time.monotonic() - started, 3)})
        self.processor.assigned(list(partitions))

    def _on_revoke(self, _consumer, partitions) -> None:
        self._give_up(partitions, checkpoint=True)

    def _on_lost(self, _consumer, partitions) -> None:
        self._give_up(partitions, checkpoint=False)

    def _give_up(self, partitions, checkpoint: bool) -> None:
        # Called inside consume(), between transactions: whatever is still queued for these
        # partitions is the next owner's now.
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = deque(m for m in self._pending if (m.topic(), m.partition()) not in revoked)
        self._drop_in_flight(lambda m: (m.topic(), m.partition()) in revoked)
        self._offsets.forget(partitions)
        for table in self.processor.tables:
            numbers = {tp.partition for tp in partitions if tp.topic in table.source_topics}
            if checkpoint:
                table.checkpoint(numbers)
            table.drop(numbers)
        self.processor.revoked(list(partitions))
