"""The consume-transform-produce loop (beamstream.engine.stage.Stage) driven step by step against the
in-memory Kafka fakes of tests/helpers/fake_kafka.py (``open()`` then ``step()``; no watchdog thread).

Covers: when a batch commits (an idle stage at once, a busy one per commit interval, chunk sizes),
what one transaction carries (outputs, offsets with the group metadata, table changelog records),
aborts (events processed again, outputs never visible, tables unchanged), fatal errors and failed
aborts (a new producer, rewound to the committed offsets), rebalances (queued events of revoked
partitions dropped and never committed by this stage, hooks, tables restored and dropped), Backoff
(nothing committed, rewound, paused, resumed), at-least-once mode, ticks, consumer errors, start-up
failure and shutdown. Tables restore through the real ``ChangelogTable.restore`` reading the fake
broker's changelog topic.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException

from beamstream.engine import table as table_module
from beamstream.engine.stage import Backoff, KafkaClients, Processor, Stage, StageError
from beamstream.engine.table import ChangelogTable
from beamstream.platform.settings import load_settings
from tests.helpers.fake_kafka import FakeBroker, kafka_error

GROUP = "group"
ABORTABLE = kafka_error(KafkaError._STATE, txn_requires_abort=True)
RETRIABLE = kafka_error(KafkaError._TIMED_OUT, retriable=True)
FATAL = kafka_error(KafkaError._FENCED, fatal=True)
UNCLASSIFIED = kafka_error(KafkaError._FAIL)


def where(message) -> tuple[str, int, int]:
    return message.topic(), message.partition(), message.offset()


def keys(partitions) -> list[tuple[str, int]]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


class Recorder(Processor):
    """Echoes each event to ``out`` (same partition) and records every call the stage makes."""

    def __init__(self, tables=()) -> None:
        self.tables = tables
        self.chunks: list[list[tuple[str, int, int]]] = []
        self.hooks: list[tuple] = []
        self.ticks = 0
        self.backoffs: list[Backoff | None] = []  # raised by the next process calls, in order (None: no)

    def process(self, messages):
        self.chunks.append([where(m) for m in messages])
        wait = self.backoffs.pop(0) if self.backoffs else None
        if wait is not None:
            raise wait
        return [("out", m.key(), b"out-" + m.value(), m.partition()) for m in messages]

    @property
    def processed(self) -> list[tuple[str, int, int]]:
        return [event for chunk in self.chunks for event in chunk]

    def assigned(self, partitions):
        self.hooks.append(("assigned", keys(partitions)))

    def revoked(self, partitions):
        self.hooks.append(("revoked", keys(partitions)))

    def committed(self):
        self.hooks.append(("committed",))

    def aborted(self):
        self.hooks.append(("aborted",))

    def tick(self):
        self.ticks += 1


class Counter(Recorder):
    """Also counts the events of each key in a table (``{"n": count}``, so values are mutable)."""

    def __init__(self, table: ChangelogTable) -> None:
        super().__init__(tables=(table,))
        self.table = table
        self.assigned_saw: list[list[int]] = []

    def process(self, messages):
        outputs = super().process(messages)
        for message in messages:
            value = self.table.get(message.partition(), message.key()) or {"n": 0}
            value["n"] += 1
            self.table.put(message.partition(), message.key(), value)
        return outputs

    def assigned(self, partitions):
        super().assigned(partitions)
        self.assigned_saw.append(self.table.partitions)


class CountingCodec:
    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, value: dict) -> bytes:
        self.encoded += 1
        return json.dumps(value).encode()

    @staticmethod
    def decode(data: bytes) -> dict:
        return json.loads(data)


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={}, home=tmp_path)


@pytest.fixture
def broker(monkeypatch) -> FakeBroker:
    broker = FakeBroker()
    for topic in ("in", "out", "counts"):
        broker.create_topic(topic, 2)
    monkeypatch.setattr(table_module, "open_reader", broker.open_reader)  # tables restore from the fake
    return broker


@pytest.fixture
def codec() -> CountingCodec:
    return CountingCodec()


@pytest.fixture
def counts(settings, codec) -> ChangelogTable:
    return ChangelogTable(settings, "counts", codec.encode, codec.decode, source_topics=("in",))


def add(broker: FakeBroker, partition: int, count: int, key: bytes | None = None) -> None:
    """``count`` events on in[partition], valued a0, a1... (b0, b1... on partition 1)."""
    prefix = "ab"[partition]
    start = len(broker.logs["in"][partition])
    for number in range(start, start + count):
        broker.append("in", partition, f"{prefix}{number}".encode(), key=key or prefix.encode())


def opened(broker, settings, processor, **options) -> Stage:
    options = {"stall_limit_s": None, "commit_interval_s": 10.0, "tick_interval_s": 3600.0,
               "checkpoint_interval_s": 3600.0, **options}
    stage = Stage(settings, GROUP, ["in"], processor, clients=broker.clients(), **options)
    stage.open()
    return stage


def run_until_idle(stage: Stage, limit: int = 50) -> int:
    """Step until a step finds nothing; returns the busy steps."""
    for busy in range(limit):
        if not stage.step():
            return busy
    raise AssertionError(f"still busy after {limit} steps")


def outputs(broker) -> list[bytes]:
    return sorted(broker.values("out"))


def expected_outputs(broker) -> list[bytes]:
    return sorted(b"out-" + m.value() for m in broker.visible("in"))


# -- committing ---------------------------------------------------------------------------------
def test_single_event_is_committed_in_the_step_that_fetched_it(broker, settings):
    add(broker, 0, 1)
    stage = opened(broker, settings, Recorder())

    assert stage.step() is True

    assert outputs(broker) == [b"out-a0"]
    assert broker.committed_offset(GROUP, "in", 0) == 1
    assert stage.committed_batches == 1


def test_idle_step_begins_no_transaction(broker, settings):
    processor = Recorder()
    stage = opened(broker, settings, processor)

    assert stage.step() is False
    assert stage.step() is False

    assert "producer.begin_transaction" not in broker.calls
    assert processor.chunks == [] and stage.committed_batches == 0


def test_every_queued_event_commits_in_one_transaction(broker, settings):
    add(broker, 0, 3)
    add(broker, 1, 2)
    stage = opened(broker, settings, Recorder())

    stage.step()

    assert stage.producer.committed_transactions == 1
    assert outputs(broker) == expected_outputs(broker)
    ((sent, _),) = broker.sent_offsets
    assert sent == {("in", 0): 3, ("in", 1): 2}
    assert run_until_idle(stage) == 0


def test_offsets_are_sent_with_the_group_metadata_of_the_current_generation(broker, settings):
    add(broker, 0, 1)
    processor = Recorder()
    stage = opened(broker, settings, processor)
    stage.step()
    broker.rebalance()  # a member joined elsewhere: new generation, same partitions here (nothing assigned)
    add(broker, 0, 1)

    stage.step()

    (_, first), (_, second) = broker.sent_offsets
    assert (first.group_id, first.member_id) == (GROUP, stage.consumer.member_id)
    assert [hook for hook in processor.hooks if hook[0] == "assigned"] == [("assigned", [("in", 0), ("in", 1)])]
    assert second.generation == first.generation + 1 == broker.generations[GROUP]
    assert broker.committed_offset(GROUP, "in", 0) == 2


def test_chunk_size_is_respected(broker, settings):
    add(broker, 0, 7)
    processor = Recorder()
    stage = opened(broker, settings, processor, chunk_size=3)

    stage.step()

    assert [len(chunk) for chunk in processor.chunks] == [3, 3, 1]
    assert stage.producer.committed_transactions == 1


def test_busy_stage_commits_once_per_commit_interval(broker, settings):
    add(broker, 0, 5)
    stage = opened(broker, settings, Recorder(), commit_interval_s=0.0, chunk_size=2)

    assert run_until_idle(stage) == 3

    assert [sent[("in", 0)] for sent, _ in broker.sent_offsets] == [2, 4, 5]
    assert outputs(broker) == expected_outputs(broker)


def test_stage_waits_for_events_only_when_its_queue_is_empty(broker, settings):
    add(broker, 0, 3)
    stage = opened(broker, settings, Recorder(), commit_interval_s=0.0)

    run_until_idle(stage)

    first_fetches = [call for call in stage.consumer.consume_calls if call[0] == 1]
    assert [timeout for _, timeout in first_fetches] == [0.2, 0, 0, 0.2]


def test_delivery_reports_are_served_before_the_tables_commit(broker, settings, counts):
    add(broker, 0, 2)
    stage = opened(broker, settings, Counter(counts))

    stage.step()

    assert counts.checkpoint() == 1  # the changelog offset is known only from the delivery report
    assert counts.checkpoint() == 0


# -- tables -----------------------------------------------------------------------------------------
def test_table_changes_commit_with_the_batch_one_changelog_record_per_changed_entry(broker, settings, counts, codec):
    add(broker, 0, 3)
    add(broker, 1, 2)
    stage = opened(broker, settings, Counter(counts))

    stage.step()

    assert broker.values("counts", 0) == [b'{"n": 3}']
    assert broker.values("counts", 1) == [b'{"n": 2}']
    assert codec.encoded == 2
    assert counts.get(0, b"a") == {"n": 3} and counts.get(1, b"b") == {"n": 2}
    assert stage.producer.committed_transactions == 1

    add(broker, 0, 1)
    stage.step()

    assert broker.values("counts", 0) == [b'{"n": 3}', b'{"n": 4}']  # only what the new transaction changed
    assert broker.values("counts", 1) == [b'{"n": 2}']
    assert codec.encoded == 3


def test_table_changes_of_an_aborted_batch_are_dropped_and_counted_once_on_retry(broker, settings, counts):
    add(broker, 0, 3)
    processor = Counter(counts)
    stage = opened(broker, settings, processor)
    broker.fail_next("commit_transaction", ABORTABLE)

    stage.step()

    assert counts.get(0, b"a") is None and len(counts) == 0
    assert broker.values("counts") == []
    assert "producer.abort_transaction" in broker.calls
    assert broker.calls.count("consumer.get_watermark_offsets") == 2  # restored once on assignment, not again

    stage.step()

    assert counts.get(0, b"a") == {"n": 3}
    assert broker.values("counts") == [b'{"n": 3}']


def test_table_changes_are_dropped_when_the_producer_is_lost(broker, settings, counts):
    add(broker, 0, 2)
    stage = opened(broker, settings, Counter(counts))
    stage.step()
    add(broker, 0, 2)
    broker.fail_next("commit_transaction", FATAL)

    stage.step()
    assert counts.get(0, b"a") == {"n": 2}

    stage.step()
    assert counts.get(0, b"a") == {"n": 4}
    assert broker.values("counts") == [b'{"n": 2}', b'{"n": 4}']


def test_tables_are_restored_before_the_assigned_hook(broker, settings, counts):
    broker.append("counts", 0, b'{"n": 5}', key=b"a")
    broker.append("counts", 0, b'{"n": 7}', key=b"a")
    broker.append("counts", 1, b'{"n": 1}', key=b"b")
    add(broker, 0, 1)
    processor = Counter(counts)
    stage = opened(broker, settings, processor)

    stage.step()

    assert processor.hooks[0] == ("assigned", [("in", 0), ("in", 1)])
    assert processor.assigned_saw == [[0, 1]]
    assert counts.get(0, b"a") == {"n": 8}
    assert counts.get(1, b"b") == {"n": 1}


def test_partition_assigned_back_is_restored_with_its_other_owners_writes(broker, settings, counts):
    add(broker, 1, 1)
    processor = Counter(counts)
    stage = opened(broker, settings, processor)
    stage.step()
    broker.rebalance(revoke=[("in", 1)])
    stage.step()
    # meanwhile another worker processed in[1]@1 and committed its state and offset
    add(broker, 1, 1)
    broker.append("counts", 1, b'{"n": 2}', key=b"b")
    broker.group_offsets[GROUP][("in", 1)] = 2
    add(broker, 1, 1)
    broker.rebalance(assign=[("in", 1)])

    run_until_idle(stage)

    assert counts.get(1, b"b") == {"n": 3}
    assert ("in", 1, 1) not in processor.processed and ("in", 1, 2) in processor.processed


# -- aborting -----------------------------------------------------------------------------------------
def test_abortable_error_aborts_and_the_events_are_processed_again(broker, settings):
    add(broker, 0, 2)
    add(broker, 1, 1)
    processor = Recorder()
    stage = opened(broker, settings, processor)
    broker.fail_next("commit_transaction", ABORTABLE)

    assert stage.step() is True

    assert stage.aborted_batches == 1 and ("aborted",) in processor.hooks
    assert outputs(broker) == [] and broker.committed_offset(GROUP, "in", 0) is None
    assert sorted(stage.consumer.seeks) == [("in", 0, 0), ("in", 1, 0)]

    stage.step()

    assert sorted(processor.processed) == sorted(2 * [("in", 0, 0), ("in", 0, 1), ("in", 1, 0)])
    assert outputs(broker) == expected_outputs(broker)  # each once: the aborted copies stay invisible
    assert len(broker.producers) == 1
    assert broker.committed_offset(GROUP, "in", 0) == 2 and broker.committed_offset(GROUP, "in", 1) == 1


def test_abort_rewinds_partitions_whose_events_were_queued_outside_the_batch(broker, settings):
    add(broker, 0, 2)
    add(broker, 1, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor, commit_interval_s=0.0)
    broker.fail_next("commit_transaction", ABORTABLE)

    stage.step()  # the batch is in[0]@0 only; the other three events were queued

    assert processor.chunks == [[("in", 0, 0)]]
    assert sorted(stage.consumer.seeks) == [("in", 0, 0), ("in", 1, 0)]
    run_until_idle(stage)
    assert outputs(broker) == expected_outputs(broker)
    assert broker.committed_offset(GROUP, "in", 0) == 2 and broker.committed_offset(GROUP, "in", 1) == 2


def test_retriable_commit_error_is_retried_within_the_step(broker, settings):
    add(broker, 0, 2)
    stage = opened(broker, settings, Recorder())
    broker.fail_next("commit_transaction", RETRIABLE)

    stage.step()

    assert broker.calls.count("producer.commit_transaction") == 2
    assert stage.committed_batches == 1 and stage.aborted_batches == 0
    assert outputs(broker) == expected_outputs(broker)


# -- losing the producer --------------------------------------------------------------------------------
@pytest.mark.parametrize("failures", [
    [("commit_transaction", FATAL)],
    [("commit_transaction", UNCLASSIFIED)],
    [("commit_transaction", ABORTABLE), ("abort_transaction", UNCLASSIFIED)],
    [("send_offsets_to_transaction", ABORTABLE), ("abort_transaction", FATAL)],
], ids=["fatal", "neither-retriable-nor-abortable", "failed-abort", "fatal-abort"])
def test_lost_producer_is_replaced_and_the_consumer_rewound_to_committed_offsets(broker, settings, failures):
    add(broker, 0, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor)
    stage.step()
    add(broker, 0, 2)
    add(broker, 1, 1)
    first = stage.producer
    for method, error in failures:
        broker.fail_next(method, error)

    assert stage.step() is True

    assert stage.producer is not first and stage.producer is broker.producers[-1] and len(broker.producers) == 2
    # The same id: making the replacement fenced the lost producer and settled its transaction.
    assert stage.producer.transactional_id == first.transactional_id
    assert stage.producer.transactional_id.startswith(f"{GROUP}-")
    assert stage.producers_replaced == 1
    assert stage.producer.config == {"transaction.timeout.ms": 15_000}
    assert sorted(stage.consumer.seeks) == [("in", 0, 2), ("in", 1, OFFSET_BEGINNING)]
    assert stage.aborted_batches == 1 and processor.hooks[-1] == ("aborted",)

    run_until_idle(stage)

    assert outputs(broker) == expected_outputs(broker)
    assert broker.committed_offset(GROUP, "in", 0) == 4 and broker.committed_offset(GROUP, "in", 1) == 1


def test_a_stuck_transactional_call_is_abandoned_and_its_batch_processed_again(broker, settings):
    add(broker, 0, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor, call_limit_s=0.2)
    stage.step()
    add(broker, 0, 2)
    first = stage.producer
    release = threading.Event()
    broker.hang_next("send_offsets_to_transaction", release)
    try:
        assert stage.step() is True

        assert stage.producer is not first and stage.producer.transactional_id == first.transactional_id
        assert stage.call_limit.abandoned == 1 and stage.producers_replaced == 1
        assert stage.aborted_batches == 1 and processor.hooks[-1] == ("aborted",)
        # The stuck producer's open transaction was aborted by its replacement, not left to time out.
        assert broker.stable_end("out", 0) == len(broker.records("out", 0))
        run_until_idle(stage)
    finally:
        release.set()  # the abandoned call returns (fenced); nothing uses its producer again

    assert outputs(broker) == expected_outputs(broker)
    assert broker.committed_offset(GROUP, "in", 0) == 4


def test_a_commit_that_went_through_but_never_returned_counts_as_committed(broker, settings):
    add(broker, 0, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor, call_limit_s=0.2)
    stage.step()
    add(broker, 0, 2)
    release = threading.Event()
    broker.hang_next("commit_transaction", release, after_effect=True)
    try:
        stage.step()

        assert stage.call_limit.abandoned == 1 and stage.producers_replaced == 1
        # The committed offsets show the batch committed: not processed again, hooks as for a commit.
        assert stage.committed_batches == 2 and stage.aborted_batches == 0 and processor.hooks[-1] == ("committed",)
        assert stage.consumer.seeks == []
        run_until_idle(stage)
    finally:
        release.set()

    assert outputs(broker) == expected_outputs(broker)
    assert processor.processed == [("in", 0, n) for n in range(4)]


def test_replacing_a_producer_keeps_trying_while_kafka_is_unreachable(broker, settings):
    add(broker, 0, 2)
    stage = opened(broker, settings, Recorder())
    broker.fail_next("commit_transaction", FATAL)
    broker.fail_next("make_producer", kafka_error(KafkaError._TRANSPORT), times=2)

    stage.step()

    assert broker.calls.count("make_producer") == 4 and stage.producers_replaced == 1
    run_until_idle(stage)
    assert outputs(broker) == expected_outputs(broker)


def test_replacement_producer_keeps_a_stable_transactional_id(broker, settings):
    add(broker, 0, 1)
    stage = opened(broker, settings, Recorder(), transactional_id="archiver-host")
    broker.fail_next("commit_transaction", FATAL)

    stage.step()
    run_until_idle(stage)

    assert [p.transactional_id for p in broker.producers] == ["archiver-host", "archiver-host"]
    assert outputs(broker) == [b"out-a0"]


def test_a_stage_asked_to_stop_while_its_producer_cannot_be_replaced_stops(broker, settings):
    add(broker, 0, 1)
    stage = opened(broker, settings, Recorder())
    broker.fail_next("commit_transaction", FATAL)
    broker.fail_next("make_producer", kafka_error(KafkaError._TRANSPORT, reason="broker down"))
    stage.stop_requested.set()

    with pytest.raises(StageError, match="stopped before Kafka was back.*broker down"):
        stage.step()
    assert outputs(broker) == []


def test_stage_error_when_the_producer_cannot_be_made(broker, settings):
    broker.fail_next("make_producer", kafka_error(KafkaError._TRANSPORT, reason="broker down"))
    stage = Stage(settings, GROUP, ["in"], Recorder(), clients=broker.clients(), stall_limit_s=None)

    with pytest.raises(StageError, match="cannot start a transactional producer.*broker down"):
        stage.open()
    assert broker.consumers[0].closed


# -- rebalances --------------------------------------------------------------------------------------------
def test_queued_events_of_revoked_partitions_are_dropped_and_not_committed(broker, settings):
    add(broker, 0, 2)
    add(broker, 1, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor, commit_interval_s=0.0)
    stage.step()  # commits in[0]@0; in[0]@1 and in[1]@0..1 stay queued
    broker.rebalance(revoke=[("in", 1)])

    run_until_idle(stage)

    assert processor.processed == [("in", 0, 0), ("in", 0, 1)]
    assert ("revoked", [("in", 1)]) in processor.hooks
    assert all(("in", 1) not in sent for sent, _ in broker.sent_offsets)
    assert broker.committed_offset(GROUP, "in", 1) is None
    assert keys(stage.consumer.assignment()) == [("in", 0)]


def test_events_fetched_in_the_step_that_revokes_their_partition_are_dropped(broker, settings):
    add(broker, 1, 2)
    processor = Recorder()
    stage = opened(broker, settings, processor)
    broker.rebalance(revoke=[("in", 1)], after=1)  # in the second fetch of the first step

    run_until_idle(stage)

    assert processor.processed == []
    assert ("revoked", [("in", 1)]) in processor.hooks
    assert broker.sent_offsets == [] and outputs(broker) == []


def test_revoked_partitions_are_checkpointed_and_dropped_from_tables(broker, settings, counts):
    add(broker, 0, 1)
    add(broker, 1, 1)
    stage = opened(broker, settings, Counter(counts))
    stage.step()
    broker.rebalance(revoke=[("in", 1)])

    stage.step()

    assert counts.partitions == [0] and counts.get(1, b"b") is None
    assert sorted(path.name for path in counts.checkpoint_dir.iterdir()) == ["1.checkpoint"]


def test_lost_partitions_are_dropped_from_tables_without_a_checkpoint(broker, settings, counts):
    add(broker, 0, 1)
    add(broker, 1, 1)
    processor = Counter(counts)
    stage = opened(broker, settings, processor)
    stage.step()
    broker.rebalance(revoke=[("in", 1)], lost=True)

    stage.step()

    assert counts.partitions == [0]
    assert not counts.checkpoint_dir.exists()
    assert ("revoked", [("in", 1)]) in processor.hooks


# -- backing off --------------------------------------------------------------------------------------------
def test_backoff_commits_nothing_then_processes_the_batch_again_after_the_wait(broker, settings):
    add(broker, 0, 2)
    add(broker, 1, 1)
    processor = Recorder()
    processor.backoffs.append(Backoff(0.005, "database down"))
    stage = opened(broker, settings, processor)

    started = time.monotonic()
    assert stage.step() is True
    waited = time.monotonic() - started

    assert waited >= 0.005
    assert "producer.begin_transaction" not in broker.calls
    assert stage.aborted_batches == 0 and stage.committed_batches == 0 and ("aborted",) in processor.hooks
    assert sorted(stage.consumer.seeks) == [("in", 0, 0), ("in", 1, 0)]
    pause, resume = broker.calls.index("consumer.pause"), broker.calls.index("consumer.resume")
    assert pause < resume and stage.consumer.paused == set()

    stage.step()

    assert outputs(broker) == expected_outputs(broker)
    assert broker.committed_offset(GROUP, "in", 0) == 2 and stage.committed_batches == 1


def test_backoff_rewinds_to_the_batch_and_its_queued_events(broker, settings):
    add(broker, 0, 3)
    add(broker, 1, 2)
    processor = Recorder()
    processor.backoffs += [None, Backoff(0.001, "later")]  # the second chunk backs off
    stage = opened(broker, settings, processor, chunk_size=2)

    stage.step()

    assert processor.chunks == [[("in", 0, 0), ("in", 0, 1)], [("in", 0, 2), ("in", 1, 0)]]
    assert sorted(stage.consumer.seeks) == [("in", 0, 0), ("in", 1, 0)]
    run_until_idle(stage)
    assert outputs(broker) == expected_outputs(broker)


def test_partitions_are_paused_while_backing_off(broker, settings):
    add(broker, 0, 1)
    add(broker, 1, 1)
    processor = Recorder()
    processor.backoffs.append(Backoff(0.003, "wait"))
    stage = opened(broker, settings, processor)
    consume, paused_during_wait = stage.consumer.consume, []

    def spying(num_messages=1, timeout=-1):
        paused_during_wait.append(set(stage.consumer.paused))
        return consume(num_messages, timeout)

    stage.consumer.consume = spying
    stage.step()

    assert paused_during_wait[2:] and all(p == {("in", 0), ("in", 1)} for p in paused_during_wait[2:])
    assert stage.consumer.paused == set()


def test_event_of_a_partition_assigned_while_backing_off_is_rewound_to_and_paused(broker, settings):
    add(broker, 0, 1)
    add(broker, 1, 1)
    processor = Recorder()
    processor.backoffs.append(Backoff(0.005, "wait"))
    stage = opened(broker, settings, processor)
    broker.rebalance(revoke=[("in", 1)])  # served with the join, in the step's first fetch
    broker.rebalance(assign=[("in", 1)], after=2)  # served in the wait: first consume after the two fetches

    stage.step()

    assert ("in", 1, 0) in stage.consumer.seeks
    assert broker.calls.count("consumer.pause") == 2  # the assignment, then the partition that came
    assert processor.processed == [("in", 0, 0)]
    stage.step()
    assert sorted(processor.processed) == [("in", 0, 0), ("in", 0, 0), ("in", 1, 0)]
    assert outputs(broker) == expected_outputs(broker)


# -- at least once, ticks, consumer errors, lifecycle ----------------------------------------------------------------
def test_at_least_once_stage_flushes_outputs_then_commits_offsets(broker, settings, counts):
    add(broker, 0, 2)
    stage = opened(broker, settings, Counter(counts), exactly_once=False)

    stage.step()

    assert broker.producers[0].transactional_id is None
    assert "producer.begin_transaction" not in broker.calls
    assert broker.calls.index("producer.flush") < broker.calls.index("consumer.commit")
    assert outputs(broker) == expected_outputs(broker)
    assert broker.committed_offset(GROUP, "in", 0) == 2
    assert counts.get(0, b"a") == {"n": 2} and counts.checkpoint() == 1


def test_tick_runs_every_tick_interval_busy_or_idle(broker, settings):
    add(broker, 0, 1)
    processor = Recorder()
    stage = opened(broker, settings, processor, tick_interval_s=0.0)

    stage.step()
    stage.step()
    stage.step()

    assert processor.ticks == 3


def test_tick_waits_for_its_interval(broker, settings):
    add(broker, 0, 1)
    processor = Recorder()
    stage = opened(broker, settings, processor, tick_interval_s=3600.0)
    stage.step()
    ticks = processor.ticks  # the first step ticks once the clock is past one interval (since boot)

    for _ in range(3):
        stage.step()

    assert processor.ticks == ticks <= 1


def test_consumer_error_events_are_not_processed(broker, settings):
    add(broker, 0, 1)
    processor = Recorder()
    stage = opened(broker, settings, processor, consumer_config={"enable.partition.eof": True})
    broker.consumer_error(kafka_error(KafkaError._TRANSPORT), "in", 0)

    run_until_idle(stage)

    assert processor.processed == [("in", 0, 0)]
    assert outputs(broker) == [b"out-a0"]


def test_fatal_consumer_error_stops_the_step(broker, settings):
    stage = opened(broker, settings, Recorder())
    broker.consumer_error(kafka_error(KafkaError._FATAL, fatal=True))

    with pytest.raises(KafkaException):
        stage.step()


def test_consumer_uses_range_assignment_and_the_stages_config(broker, settings):
    stage = opened(broker, settings, Recorder(), consumer_config={"max.poll.interval.ms": 1000})

    assert stage.consumer.group_id == GROUP and stage.consumer.subscription == ["in"]
    assert stage.consumer.config == {"partition.assignment.strategy": "range", "max.poll.interval.ms": 1000}


def test_checkpoint_interval_checkpoints_tables_after_a_commit(broker, settings, counts):
    add(broker, 0, 1)
    stage = opened(broker, settings, Counter(counts), checkpoint_interval_s=0.0)

    stage.step()

    assert [path.name for path in counts.checkpoint_dir.iterdir()] == ["0.checkpoint"]


def test_run_until_idle_processes_everything_then_closes(broker, settings, counts):
    add(broker, 0, 2)
    add(broker, 1, 1)
    processor = Counter(counts)
    stage = Stage(settings, GROUP, ["in"], processor, clients=broker.clients(), stall_limit_s=None,
                  checkpoint_interval_s=3600.0)

    stage.run(idle_timeout_s=0.0)

    assert outputs(broker) == expected_outputs(broker)
    assert stage.consumer.closed and broker.calls[-1] == "producer.flush"
    assert sorted(path.name for path in counts.checkpoint_dir.iterdir()) == ["0.checkpoint", "1.checkpoint"]
    assert ("revoked", [("in", 0), ("in", 1)]) in processor.hooks  # leaving the group revokes
    assert not any(thread.name.endswith("stall-watch") for thread in threading.enumerate())


# -- threads ------------------------------------------------------------------------------------
class Gated(Recorder):
    """Processes each event on the stage's threads, but only once its gate is opened."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[tuple[str, int, int], threading.Event] = {}
        self.started: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def gate(self, event: tuple[str, int, int]) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(event, threading.Event())

    def process(self, messages):
        for message in messages:
            with self._lock:
                self.started.append(where(message))
            assert self.gate(where(message)).wait(5), f"{where(message)} was never let through"
        return super().process(messages)

    def open_all(self) -> None:
        for event in [("in", p, o) for p in (0, 1) for o in range(10)]:
            self.gate(event).set()


def step_until(stage: Stage, done, limit: int = 500) -> None:
    """Step until ``done()``; the fake consumer never waits, so give the stage's threads a moment each step."""
    for _ in range(limit):
        stage.step()
        if done():
            return
        time.sleep(0.002)
    raise AssertionError("the stage never got there")


def test_threads_process_events_at_once_and_commit_each_as_it_finishes(broker, settings):
    add(broker, 0, 1)
    add(broker, 1, 1)
    processor = Gated()
    stage = opened(broker, settings, processor, threads=2)
    step_until(stage, lambda: len(processor.started) == 2)  # both in flight together
    assert broker.sent_offsets == []

    processor.gate(("in", 1, 0)).set()
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 1) == 1)
    assert outputs(broker) == [b"out-b0"] and broker.committed_offset(GROUP, "in", 0) is None

    processor.gate(("in", 0, 0)).set()
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 0) == 1)
    assert outputs(broker) == [b"out-a0", b"out-b0"]


def test_an_unfinished_event_holds_back_the_later_ones_of_its_partition(broker, settings):
    add(broker, 0, 2)
    processor = Gated()
    stage = opened(broker, settings, processor, threads=2)
    processor.gate(("in", 0, 1)).set()  # the later one finishes first
    step_until(stage, lambda: len(processor.started) == 2)
    for _ in range(5):
        stage.step()
    assert broker.sent_offsets == [] and outputs(broker) == []  # offset 2 cannot be committed past 0

    processor.gate(("in", 0, 0)).set()
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 0) == 2)
    assert outputs(broker) == [b"out-a0", b"out-a1"]


def test_an_event_in_flight_for_a_revoked_partition_is_never_committed(broker, settings):
    add(broker, 0, 1)
    add(broker, 1, 1)
    processor = Gated()
    stage = opened(broker, settings, processor, threads=2)
    step_until(stage, lambda: len(processor.started) == 2)
    broker.rebalance(revoke=[("in", 1)])
    stage.step()  # the revocation, while in[1]@0 is being processed
    processor.open_all()
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 0) == 1)
    for _ in range(5):
        stage.step()

    assert outputs(broker) == [b"out-a0"]
    assert broker.committed_offset(GROUP, "in", 1) is None
    assert all(("in", 1) not in sent for sent, _ in broker.sent_offsets)


def test_a_slow_event_does_not_hold_up_a_rebalance(broker, settings):
    add(broker, 0, 1)
    processor = Gated()
    stage = opened(broker, settings, processor, threads=2)
    step_until(stage, lambda: len(processor.started) == 1)
    broker.rebalance(revoke=[("in", 1)])
    started = time.monotonic()
    stage.step()  # returns while in[0]@0 is still being processed
    assert time.monotonic() - started < 1.0
    assert ("revoked", [("in", 1)]) in processor.hooks
    processor.open_all()


def test_an_abort_drops_the_events_in_flight_and_processes_them_again(broker, settings):
    add(broker, 0, 2)
    processor = Gated()
    processor.gate(("in", 0, 0)).set()
    stage = opened(broker, settings, processor, threads=2)
    broker.fail_next("commit_transaction", ABORTABLE)
    step_until(stage, lambda: stage.aborted_batches == 1)  # a0 done, a1 still in flight
    processor.open_all()
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 0) == 2)

    assert outputs(broker) == [b"out-a0", b"out-a1"]  # the aborted attempt's a0 is not among them
    assert processor.processed.count(("in", 0, 0)) == 2


def test_stopping_commits_the_events_in_flight(broker, settings):
    add(broker, 0, 1)
    processor = Gated()
    stage = opened(broker, settings, processor, threads=2)
    step_until(stage, lambda: len(processor.started) == 1)
    threading.Timer(0.05, processor.open_all).start()

    stage.finish_in_flight(timeout_s=5)

    assert outputs(broker) == [b"out-a0"] and broker.committed_offset(GROUP, "in", 0) == 1


def test_quick_events_go_to_the_threads_in_runs_of_one_partition(broker, settings):
    add(broker, 0, 150)
    add(broker, 1, 150)
    processor = Recorder()
    stage = opened(broker, settings, processor, threads=2)
    step_until(stage, lambda: broker.committed_offset(GROUP, "in", 0) == 150
               and broker.committed_offset(GROUP, "in", 1) == 150)

    assert sorted(processor.processed) == sorted(("in", p, o) for p in (0, 1) for o in range(150))
    assert all(len({(t, p) for t, p, _ in chunk}) == 1 for chunk in processor.chunks)  # one partition each
    assert max(len(chunk) for chunk in processor.chunks) > 1  # quick events share a task
    assert outputs(broker) == expected_outputs(broker)



def test_a_batch_found_committed_after_a_stuck_commit_is_not_checkpointed_before_the_next_rebalance(
        broker, settings, counts):
    # The committed offsets cannot tell this stage's commit from a new owner's (a zombie's partitions):
    # its tables take the batch, but nothing is written to disk until the next consume has served rebalances.
    add(broker, 0, 1)
    stage = opened(broker, settings, Counter(counts), checkpoint_interval_s=0.0, call_limit_s=0.2)
    release = threading.Event()
    broker.hang_next("commit_transaction", release, after_effect=True)
    try:
        stage.step()
    finally:
        release.set()

    assert stage.committed_batches == 1 and stage.producers_replaced == 1
    assert counts.get(0, b"a") == {"n": 1}
    assert not counts.checkpoint_dir.exists()


def test_a_producer_refused_by_acls_says_so_rather_than_asking_whether_the_cluster_is_up(broker, settings):
    broker.fail_next("make_producer", kafka_error(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                                                  reason="Transactional Id authorization failed"))
    stage = Stage(settings, GROUP, ["in"], Recorder(), clients=broker.clients(), stall_limit_s=None)

    with pytest.raises(StageError, match=r"authorization failed \(check the Kafka user's ACLs and credentials\)"):
        stage.open()


def test_a_consumer_that_fails_to_close_does_not_hide_why_the_stage_could_not_start(broker, settings):
    broker.fail_next("make_producer", kafka_error(KafkaError._TIMED_OUT, reason="init_transactions timed out"))

    def consumer_refusing_to_close(*args, **kwargs):
        consumer = broker.make_consumer(*args, **kwargs)

        def close():
            raise KafkaException(KafkaError(KafkaError._DESTROY, "Local: Broker handle destroyed"))
        consumer.close = close
        return consumer

    clients = KafkaClients(consumer=consumer_refusing_to_close, producer=broker.make_producer)
    stage = Stage(settings, GROUP, ["in"], Recorder(), clients=clients, stall_limit_s=None)
    with pytest.raises(StageError, match="init_transactions timed out"):
        stage.open()
