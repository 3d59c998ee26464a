"""Our exactly-once layer over faust-streaming's transactions.

faust-streaming (0.11-0.15 with aiokafka 0.10-0.14) keeps one transactional
producer per assigned source partition and commits consumed offsets with
``send_offsets_to_transaction``. Three things in it fall short of exactly-once,
and this module closes each of them for Beamstream's agents:

1. ``Topic.send`` inside an agent picks the transactional producer from the
   *destination* partition of the message, not from the partition of the event
   being processed, so an output can join another partition's transaction (or
   fail when this worker does not own that partition). We send every output
   through :func:`send_in_transaction` with the producer of the *source*
   partition instead.
2. Table changelog writes go through ``send_soon`` on the plain producer, outside
   any transaction, so a crash can keep a table update whose input offset was
   never committed (or the reverse). :class:`TransactionalTable` collects its
   changelog writes, and :func:`send_in_transaction` flushes them into the source
   partition's transaction together with the event's outputs.
3. The periodic commit (and the commit on rebalance) can run between an output
   being sent and its event being acknowledged; the committed transaction then
   holds the output but not the offset, and the event is processed twice after a
   crash. An app-wide *commit guard* makes "send outputs + ack event" one step
   that a commit can never split: the commit path takes the same lock before it
   even chooses which offsets to commit.

4. After a rebalance faust seeks each partition it keeps to the committed offset
   it fetches from the group coordinator. aiokafka does not ask for *stable*
   offsets (KIP-447), so right after a transactional commit the coordinator can
   still answer with the previous offset, and events whose outputs are already
   committed (or sit in the open transaction) are delivered again. Each worker
   remembers, per source partition, the last offset whose outputs went into a
   transaction of the *same* producer instance; :func:`already_processed` lets
   the agents acknowledge such a redelivery without sending anything twice. A
   failed commit forgets those offsets, and a new producer instance (after the
   partition moved away and back) never matches, so nothing is skipped wrongly.

5. A stream *acknowledges* the events it skips: events fetched before a
   rebalance (an older consumer generation) or while the flow is paused. If the
   worker keeps the partition, that acknowledged offset is committed with the
   next transaction and the event is never processed: a lost image or a lost
   CollectionStarted. Our agents acknowledge only through
   :func:`send_in_transaction`; any other acknowledgement of an event of an
   exactly-once app is turned into "forget it": the message leaves the set of
   in-flight messages (so rebalances need not wait for it) but is not marked
   done, and the rebalance's seek to the committed offset delivers it again.
   Open: faust's commit steps over a single missing offset at the head of a
   partition (it takes it for a transaction marker), so a forgotten event there
   can still be committed past; the end-to-end tests have seen one lost image.

6. Across workers, point 4's stale answer makes the new owner of a partition
   process again events whose outputs another worker already committed (seen
   after a broker restart, when the coordinator completes transactions late).
   :func:`use_stable_offsets` makes the consumer confirm every committed-offset
   fetch with librdkafka, which asks with ``require_stable`` (KIP-447) and waits
   while a transactional offset commit is pending; the later of the two offsets
   wins.

Anything else unexpected from the transactional producer crashes the worker:
a restarted worker fences the old producer and the broker aborts its open
transaction, which is the safe outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import faust
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import IllegalOperation
from aiokafka.structs import OffsetAndMetadata
from faust.events import Event
from faust.exceptions import ProducerSendError
from faust.transport.consumer import Consumer

log = logging.getLogger(__name__)

_GUARD_ATTRIBUTE = "_beamstream_commit_guard"
_PROGRESS_ATTRIBUTE = "_beamstream_processed"
_original_commit_tps = Consumer._commit_tps
_original_fetch_committed = GroupCoordinator._do_fetch_commit_offsets
_stable_offset_sources: dict[str, Any] = {}  # consumer group id -> callable(list of TPs) -> {TP: offset}
_original_event_ack = Event.ack
_acknowledging = contextvars.ContextVar("beamstream_acknowledging", default=False)


def commit_guard(app: faust.App) -> asyncio.Lock:
    """The app's commit guard (created on first use, inside the running loop)."""
    guard = getattr(app, _GUARD_ATTRIBUTE, None)
    if guard is None:
        guard = asyncio.Lock()
        setattr(app, _GUARD_ATTRIBUTE, guard)
    return guard


def _processed(app: faust.App) -> dict:
    """source TP -> (producer instance, offsets whose outputs it has sent)."""
    progress = getattr(app, _PROGRESS_ATTRIBUTE, None)
    if progress is None:
        progress = {}
        setattr(app, _PROGRESS_ATTRIBUTE, progress)
    return progress


async def _guarded_commit_tps(self: Consumer, tps: Any, start_new_transaction: bool) -> bool:
    # The guard covers choosing the offsets as well as committing them: offsets
    # chosen before an agent's "send + ack" step and committed after it would put
    # that step's outputs in this transaction without their offsets.
    if not self.app.in_transaction:
        return await _original_commit_tps(self, tps, start_new_transaction)
    async with commit_guard(self.app):
        tps = list(tps)
        try:
            return await _original_commit_tps(self, tps, start_new_transaction)
        except IllegalOperation:
            if not (self.should_stop or self.app.should_stop):
                raise
            # Stopping: the final commit has ended the transactions, and what was
            # acknowledged since (redeliveries skipped as already processed) has no
            # outputs of its own; the next owner reads those offsets again.
            log.info("commit after the final commit skipped while stopping")
            return False
        except BaseException:
            # The outputs of these partitions' open transactions may be lost: never skip them.
            progress = _processed(self.app)
            for tp in tps:
                progress.pop(tp, None)
            raise


def _event_ack(self: Event) -> bool:
    if _acknowledging.get() or not self.app.in_transaction:
        return _original_event_ack(self)
    # Skipped by the stream (stale generation or paused flow): forget it without marking
    # it done. It leaves the in-flight set, so a rebalance need not wait for it; the
    # rebalance's seek to the committed offset delivers it again.
    self.app.consumer._unacked_messages.discard(self.message)
    return False


def _acknowledge(event: faust.EventT) -> None:
    token = _acknowledging.set(True)
    try:
        event.ack()
    finally:
        _acknowledging.reset(token)


async def _fetch_stable_committed(self: GroupCoordinator, partitions):
    offsets = await _original_fetch_committed(self, partitions)
    source = _stable_offset_sources.get(self.group_id)
    if source is None or not partitions:
        return offsets
    try:
        stable = await asyncio.to_thread(source, list(partitions))
    except Exception as exc:  # the check must never stall a rebalance: keep aiokafka's answer
        log.warning("could not confirm committed offsets as stable: %s", exc)
        return offsets
    for tp, offset in stable.items():
        known = offsets.get(tp)
        if offset >= 0 and (known is None or offset > known.offset):
            log.warning("committed offset of %s was stale (%s); resuming at %s", tp,
                     known.offset if known else None, offset)
            offsets[tp] = OffsetAndMetadata(offset, known.metadata if known else "")
    return offsets


def use_stable_offsets(group_id: str, client_config: dict) -> None:
    """Confirm the committed offsets of ``group_id`` with a librdkafka client using
    ``client_config`` (read_committed, so it asks for stable offsets)."""
    from confluent_kafka import Consumer as RdKafkaConsumer
    from confluent_kafka import TopicPartition

    checker = RdKafkaConsumer({**client_config, "group.id": group_id, "enable.auto.commit": False,
                               "isolation.level": "read_committed"})

    def fetch(partitions) -> dict:
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        committed = checker.committed(wanted, timeout=STABLE_OFFSETS_TIMEOUT_S)
        return {next(tp for tp in partitions if tp.topic == c.topic and tp.partition == c.partition): c.offset
                for c in committed if c.error is None}

    _stable_offset_sources[group_id] = fetch


def install() -> None:
    """Patch faust: commits take the commit guard, and only our agents' own
    acknowledgements mark events done (idempotent)."""
    if Consumer._commit_tps is not _guarded_commit_tps:
        Consumer._commit_tps = _guarded_commit_tps  # type: ignore[method-assign]
    if Event.ack is not _event_ack:
        Event.ack = _event_ack  # type: ignore[method-assign]
    if GroupCoordinator._do_fetch_commit_offsets is not _fetch_stable_committed:
        GroupCoordinator._do_fetch_commit_offsets = _fetch_stable_committed  # type: ignore[method-assign]


def _transaction_producer(app: faust.App, transactional_id: str):
    # faust keeps its per-partition aiokafka producers in this private dict; the
    # instance identity tells a producer that survived a rebalance from a new one.
    return app.consumer.transactions.producer._transaction_producers.get(transactional_id)


def already_processed(app: faust.App, event: faust.EventT) -> bool:
    """True for a redelivered event whose outputs this worker already sent in a transaction
    that is committed or still open; the event is then acknowledged and must be skipped."""
    tp = event.message.tp
    seen = _processed(app).get(tp)
    if seen is None:
        return False
    producer, offsets = seen
    current = _transaction_producer(app, transactional_id_for(app, event))
    # An exact set, not a high-water mark: events skipped by the stream leave holes
    # below the highest offset sent, and those must be processed when they return.
    if current is producer and current is not None and event.message.offset in offsets:
        _acknowledge(event)
        return True
    return False


_REMEMBERED_PER_PARTITION = 200_000
#: How long a rebalance may wait for a pending transactional offset commit to settle.
STABLE_OFFSETS_TIMEOUT_S = 5.0


def _remember(app: faust.App, tp, producer, offset: int) -> None:
    progress = _processed(app)
    seen = progress.get(tp)
    if seen is None or seen[0] is not producer:
        seen = progress[tp] = (producer, set())
    offsets = seen[1]
    offsets.add(offset)
    if len(offsets) > _REMEMBERED_PER_PARTITION:  # bound the memory of a long-lived worker
        for old in sorted(offsets)[: len(offsets) // 2]:
            offsets.discard(old)


class PartitionLost(Exception):
    """The source partition was revoked while its event was processed: another worker
    owns it now and will process the event; this one must drop it."""


def transactional_id_for(app: faust.App, event: faust.EventT) -> str:
    """The transactional id faust uses for the event's source partition."""
    tp = event.message.tp
    group = app.assignor.group_for_topic(tp.topic)
    return f"{app.conf.id}-{group}-{tp.partition}"


class TransactionalTable(faust.Table):
    """A faust Table whose changelog writes join the source event's transaction.

    Keys and values must be bytes (the table's serializers are ``raw``). Writes are
    held until :func:`send_in_transaction` flushes them; only the latest value per
    key is sent, which keeps the changelog small for busy keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[tuple[int, bytes], bytes | None] = {}

    def send_changelog(self, partition, key, value, key_serializer=None, value_serializer=None):  # noqa: D102
        self.pending[(partition, key)] = value
        # faust reads the partition back from the returned future's message.
        return SimpleNamespace(message=SimpleNamespace(partition=partition))


async def send_in_transaction(
    app: faust.App,
    event: faust.EventT,
    outputs: Iterable[tuple[str, bytes | None, bytes | None]],
    tables: Iterable[TransactionalTable] = (),
) -> None:
    """Send ``(topic, key, value)`` outputs and pending table writes in the transaction of
    the event's source partition, then acknowledge the event, as one step no commit splits.

    Raises :class:`PartitionLost` if this worker no longer owns the partition (the
    event is then not acknowledged).
    """
    if not app.in_transaction:
        await _send_at_least_once(app, event, outputs, tables)
        return
    producer = app.consumer.transactions.producer
    transactional_id = transactional_id_for(app, event)
    async with commit_guard(app):
        try:
            for topic, key, value in outputs:
                await producer.send(topic, key, value, None, None, None, transactional_id=transactional_id)
            for table in tables:
                for (partition, key), value in table.pending.items():
                    await producer.send(table.changelog_topic.get_topic_name(), key, value, partition,
                                        None, None, transactional_id=transactional_id)
                table.pending.clear()
            _remember(app, event.message.tp, _transaction_producer(app, transactional_id), event.message.offset)
        except ProducerSendError as exc:
            for table in tables:
                table.pending.clear()
            raise PartitionLost(str(exc)) from None
        _acknowledge(event)


async def _send_at_least_once(app: faust.App, event: faust.EventT, outputs, tables) -> None:
    """The same outputs without transactions (processing_guarantee at_least_once, for comparison)."""
    producer = app.producer
    for topic, key, value in outputs:
        await producer.send(topic, key, value, None, None, None)
    for table in tables:
        for (partition, key), value in table.pending.items():
            await producer.send(table.changelog_topic.get_topic_name(), key, value, partition, None, None)
        table.pending.clear()
    _acknowledge(event)
