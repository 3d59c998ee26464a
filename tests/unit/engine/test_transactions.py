"""The engine's commit/abort/retry rules (beamstream.engine.transactions) and its dead-letter builder
(beamstream.engine.dead_letters), against the in-memory Kafka fakes of tests/helpers/fake_kafka.py.

Covers: a committed batch (outputs and offsets visible together, offsets sent with the consumer's
group metadata), an abortable error (aborted, rewound to the batch's first offsets, outputs never
visible), a zombie's refused offsets, retriable errors retried (and aborted past the deadline), fatal
and unclassifiable errors and failed aborts raising TransactionFailed, the rewind helpers, the
at-least-once commit, and the fields of a dead letter.
"""

from __future__ import annotations

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from beamstream.engine.dead_letters import DeadLetters, dead_letter
from beamstream.engine.transactions import (
    BatchOffsets,
    Outcome,
    TransactionFailed,
    commit_at_least_once,
    commit_batch,
    produce,
    rewind,
    rewind_to_committed,
)
from tests.helpers.fake_kafka import FakeBroker, FakeMessage, kafka_error

GROUP = "group"
ABORTABLE = kafka_error(KafkaError._STATE, txn_requires_abort=True)
RETRIABLE = kafka_error(KafkaError._TIMED_OUT, retriable=True)
FATAL = kafka_error(KafkaError._FENCED, fatal=True)
UNCLASSIFIED = kafka_error(KafkaError._FAIL)  # neither fatal, retriable nor abortable


@pytest.fixture
def broker() -> FakeBroker:
    broker = FakeBroker()
    broker.create_topic("in", 2)
    broker.create_topic("out", 2)
    for offset in range(3):
        broker.append("in", 0, f"a{offset}".encode(), key=b"a")
        broker.append("in", 1, f"b{offset}".encode(), key=b"b")
    return broker


@pytest.fixture
def consumer(broker):
    consumer = broker.make_consumer(None, GROUP)
    consumer.subscribe(["in"])
    return consumer


@pytest.fixture
def producer(broker):
    return broker.make_producer(None, transactional_id="txn-1")


def take_batch(consumer, count: int = 100) -> tuple[list, BatchOffsets]:
    """Consume up to ``count`` events as one batch."""
    messages = consumer.consume(count, timeout=0)
    offsets = BatchOffsets()
    for message in messages:
        offsets.add(message)
    return messages, offsets


def outputs_of(messages) -> list[tuple]:
    return [("out", m.key(), b"out-" + m.value()) for m in messages]


def consumed_again(consumer) -> list[tuple[str, int, int]]:
    return [(m.topic(), m.partition(), m.offset()) for m in consumer.consume(100, timeout=0)]


# -- BatchOffsets ------------------------------------------------------------------------------
def test_batch_offsets_keep_each_partitions_first_offset_and_commit_past_its_last():
    offsets = BatchOffsets()
    for partition, offset in [(0, 4), (1, 7), (0, 5), (0, 6)]:
        offsets.add(FakeMessage("in", partition, offset))
    assert offsets.first == {("in", 0): 4, ("in", 1): 7}
    assert {(tp.topic, tp.partition, tp.offset) for tp in offsets.to_commit()} == {("in", 0, 7), ("in", 1, 8)}


def test_batch_offsets_forget_revoked_partitions():
    offsets = BatchOffsets()
    offsets.add(FakeMessage("in", 0, 1))
    offsets.add(FakeMessage("in", 1, 2))
    offsets.forget([TopicPartition("in", 1)])
    assert offsets.first == {("in", 0): 1}
    assert [(tp.partition, tp.offset) for tp in offsets.to_commit()] == [(0, 2)]


def test_batch_offsets_are_empty_after_clear():
    offsets = BatchOffsets()
    assert not offsets
    offsets.add(FakeMessage("in", 0, 1))
    assert offsets
    offsets.clear()
    assert not offsets and offsets.first == {} and offsets.to_commit() == []


# -- committing ----------------------------------------------------------------------------
def test_commit_makes_outputs_and_offsets_visible_together(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    assert broker.values("out") == []

    outcome = commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)

    assert outcome is Outcome.COMMITTED
    assert sorted(broker.values("out")) == sorted(b"out-" + m.value() for m in messages)
    assert broker.committed_offset(GROUP, "in", 0) == 3
    assert broker.committed_offset(GROUP, "in", 1) == 3
    assert not offsets  # cleared for the next batch


def test_offsets_are_sent_with_the_consumers_group_metadata(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)

    (sent, metadata), = broker.sent_offsets
    assert sent == {("in", 0): 3, ("in", 1): 3}
    assert metadata == consumer.consumer_group_metadata()
    assert metadata.group_id == GROUP and metadata.generation == broker.generations[GROUP]


def test_nothing_is_visible_before_the_transaction_commits(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", RETRIABLE)
    seen_during_retry = []
    original = producer.commit_transaction

    def commit_and_look(timeout=None):
        seen_during_retry.append((broker.values("out"), broker.committed_offset(GROUP, "in", 0)))
        original(timeout)

    producer.commit_transaction = commit_and_look
    commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)

    assert seen_during_retry == [([], None), ([], None)]
    assert len(broker.values("out")) == len(messages)


def test_outputs_naming_a_partition_go_there_and_get_their_topics_delivery_callback(broker, producer):
    reports = []
    producer.begin_transaction()
    produce(producer, ("out", b"k", b"v", 1), {"out": lambda error, message: reports.append((error, message))})
    produce(producer, ("out", None, b"w"), {"other": lambda error, message: reports.append("wrong topic")})
    producer.commit_transaction()
    producer.poll(0)

    assert broker.values("out", 1) == [b"v"]
    assert broker.values("out", 0) == [b"w"]
    ((error, message),) = reports
    assert error is None and (message.partition(), message.offset()) == (1, 0)


# -- aborting --------------------------------------------------------------------------------
def test_abortable_commit_error_aborts_and_rewinds_to_the_batch_first_offsets(broker, consumer, producer):
    consumer.consume(1, timeout=0)  # in[0]@0 belongs to an earlier batch
    messages, offsets = take_batch(consumer)
    first = dict(offsets.first)
    broker.fail_next("commit_transaction", ABORTABLE)

    outcome = commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)

    assert outcome is Outcome.ABORTED
    assert producer.aborted_transactions == 1
    assert {(t, p): o for t, p, o in consumer.seeks} == first == {("in", 0): 1, ("in", 1): 0}
    assert sorted(consumed_again(consumer)) == sorted((m.topic(), m.partition(), m.offset()) for m in messages)
    assert broker.values("out") == []
    assert broker.committed_offset(GROUP, "in", 0) is None
    assert not offsets


def test_outputs_of_an_aborted_attempt_are_never_visible_after_the_retry_commits(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", ABORTABLE)
    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.ABORTED

    again, offsets = take_batch(consumer)
    assert commit_batch(producer, consumer, outputs_of(again), offsets, timeout_s=1.0) is Outcome.COMMITTED

    assert sorted(broker.values("out")) == sorted(b"out-" + m.value() for m in messages)  # each once
    written = sum(len(broker.records("out", p)) for p in range(2))
    assert written == 2 * len(messages)  # the aborted copies are in the log, skipped by readers


def test_abortable_error_on_send_offsets_aborts(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("send_offsets_to_transaction", ABORTABLE)

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.ABORTED
    assert "producer.commit_transaction" not in broker.calls
    assert broker.values("out") == [] and broker.committed_offset(GROUP, "in", 1) is None


def test_offsets_of_a_zombie_are_refused_and_its_transaction_aborted(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fence(GROUP)  # the group moved on without this member

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.ABORTED
    assert broker.values("out") == []
    assert broker.committed_offset(GROUP, "in", 0) is None


def test_rewind_after_abort_skips_partitions_no_longer_assigned(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    del consumer.positions[("in", 1)]  # in[1] went to another member meanwhile
    broker.fail_next("commit_transaction", ABORTABLE)

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.ABORTED
    assert consumer.seeks == [("in", 0, 0)]


# -- retrying -------------------------------------------------------------------------------
def test_retriable_commit_error_is_retried_then_committed(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", RETRIABLE, times=2)

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.COMMITTED
    assert broker.calls.count("producer.commit_transaction") == 3
    assert producer.aborted_transactions == 0
    assert len(broker.values("out")) == len(messages)
    assert broker.committed_offset(GROUP, "in", 0) == 3


def test_retriable_send_offsets_error_is_retried(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("send_offsets_to_transaction", RETRIABLE)

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0) is Outcome.COMMITTED
    assert broker.calls.count("producer.send_offsets_to_transaction") == 2
    assert broker.calls.count("producer.commit_transaction") == 1
    assert broker.committed_offset(GROUP, "in", 1) == 3


def test_retriable_error_past_the_deadline_aborts(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", RETRIABLE, times=100)

    assert commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=0.0) is Outcome.ABORTED
    assert broker.calls.count("producer.commit_transaction") == 1
    assert producer.aborted_transactions == 1
    assert broker.values("out") == []
    assert sorted(consumed_again(consumer)) == sorted((m.topic(), m.partition(), m.offset()) for m in messages)


# -- failing --------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["begin_transaction", "produce", "send_offsets_to_transaction", "commit_transaction"])
def test_fatal_error_raises_transaction_failed_without_aborting_or_rewinding(broker, consumer, producer, call):
    messages, offsets = take_batch(consumer)
    broker.fail_next(call, FATAL)

    with pytest.raises(TransactionFailed, match="transaction failed"):
        commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)

    assert "producer.abort_transaction" not in broker.calls
    assert consumer.seeks == []  # the stage rewinds to the committed offsets instead
    assert not offsets
    assert broker.values("out") == [] and broker.committed_offset(GROUP, "in", 0) is None


def test_non_retriable_non_abortable_error_is_treated_as_fatal(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", UNCLASSIFIED)

    with pytest.raises(TransactionFailed):
        commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)
    assert broker.calls.count("producer.commit_transaction") == 1  # never retried
    assert broker.values("out") == []


@pytest.mark.parametrize("abort_error", [FATAL, UNCLASSIFIED, RETRIABLE])
def test_failed_abort_raises_transaction_failed(broker, consumer, producer, abort_error):
    messages, offsets = take_batch(consumer)
    broker.fail_next("commit_transaction", ABORTABLE)
    broker.fail_next("abort_transaction", abort_error)

    with pytest.raises(TransactionFailed, match="abort failed"):
        commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)
    assert broker.calls.count("producer.abort_transaction") == 1  # not retried: the producer is replaced
    assert not offsets
    assert broker.values("out") == [] and broker.committed_offset(GROUP, "in", 0) is None


def test_transaction_failed_is_raised_from_a_fenced_producer(broker, consumer, producer):
    messages, offsets = take_batch(consumer)
    broker.make_producer(None, transactional_id=producer.transactional_id)  # a restarted twin

    with pytest.raises(TransactionFailed):
        commit_batch(producer, consumer, outputs_of(messages), offsets, timeout_s=1.0)
    assert broker.values("out") == []


# -- rewinding ------------------------------------------------------------------------------
def test_rewind_seeks_only_assigned_partitions(broker, consumer):
    consumer.consume(100, timeout=0)
    rewind(consumer, {("in", 0): 1, ("in", 1): 2, ("elsewhere", 0): 5})
    assert sorted(consumer.seeks) == [("in", 0, 1), ("in", 1, 2)]
    assert sorted(consumed_again(consumer)) == [("in", 0, 1), ("in", 0, 2), ("in", 1, 2)]


def test_rewind_of_nothing_asks_nothing(broker, consumer):
    consumer.consume(0, timeout=0)
    calls = len(broker.calls)
    rewind(consumer, {})
    assert broker.calls[calls:] == []


def test_rewind_to_committed_seeks_the_committed_offsets_or_the_beginning(broker, consumer):
    consumer.consume(100, timeout=0)
    broker.group_offsets[GROUP] = {("in", 0): 2}

    rewind_to_committed(consumer, timeout_s=1.0)

    assert sorted(consumer.seeks) == [("in", 0, 2), ("in", 1, OFFSET_BEGINNING)]
    assert sorted(consumed_again(consumer)) == [("in", 0, 2), ("in", 1, 0), ("in", 1, 1), ("in", 1, 2)]


def test_rewind_to_committed_without_assignment_does_nothing(broker):
    consumer = broker.make_consumer(None, GROUP)
    rewind_to_committed(consumer, timeout_s=1.0)
    assert consumer.seeks == [] and "consumer.committed" not in broker.calls


# -- at least once ----------------------------------------------------------------------------
def test_at_least_once_commits_offsets_after_flushing_outputs(broker, consumer):
    producer = broker.make_producer(None)
    messages, offsets = take_batch(consumer)
    start = len(broker.calls)

    assert commit_at_least_once(producer, consumer, outputs_of(messages), offsets) is Outcome.COMMITTED

    calls = [c for c in broker.calls[start:] if c in ("producer.produce", "producer.flush", "consumer.commit")]
    assert calls == ["producer.produce"] * len(messages) + ["producer.flush", "consumer.commit"]
    assert len(broker.values("out")) == len(messages)
    assert broker.committed_offset(GROUP, "in", 0) == 3 and broker.committed_offset(GROUP, "in", 1) == 3
    assert "producer.begin_transaction" not in broker.calls
    assert not offsets


def test_at_least_once_without_offsets_commits_none(broker, consumer):
    producer = broker.make_producer(None)
    commit_at_least_once(producer, consumer, [("out", None, b"tick")], BatchOffsets())
    assert "consumer.commit" not in broker.calls
    assert broker.values("out") == [b"tick"]


# -- dead letters ------------------------------------------------------------------------------
class RecordingSerde:
    """Encodes to a marker and keeps what it was given."""

    def __init__(self) -> None:
        self.encoded: list[tuple[str, dict, str]] = []

    def encode(self, name: str, value: dict, topic: str) -> bytes:
        self.encoded.append((name, value, topic))
        return b"encoded-dead-letter"


def test_dead_letter_carries_the_original_message_and_where_it_came_from():
    value = dead_letter(reason="bad", error_type="SerdeError", service="worker/images", source_topic="images",
                        source_partition=3, source_offset=42, key=b"k", payload=b"\x00raw",
                        headers=[("trace", b"t1"), ("empty", None)], attempts=2, dcid=7, image_number=9)
    assert {k: v for k, v in value.items() if k != "failed_at"} == {
        "reason": "bad", "error_type": "SerdeError", "service": "worker/images", "source_topic": "images",
        "source_partition": 3, "source_offset": 42, "key": b"k", "payload": b"\x00raw",
        "headers": [{"key": "trace", "value": b"t1"}, {"key": "empty", "value": None}],
        "attempts": 2, "reinjected_count": 0, "dcid": 7, "image_number": 9}
    assert value["failed_at"].tzinfo is not None


def test_dead_letter_of_an_empty_message_has_an_empty_payload():
    value = dead_letter(reason="r", error_type="E", service="s", source_topic="t", source_partition=0,
                        source_offset=0, key=None, payload=None)
    assert value["payload"] == b"" and value["headers"] == [] and value["key"] is None


@pytest.mark.parametrize(("headers", "count"), [
    ([("beamstream-reinjected", b"2")], 2),
    ([("other", b"5"), ("beamstream-reinjected", b"1"), ("beamstream-reinjected", b"3")], 3),
    ([("beamstream-reinjected", None)], 0),
    ([("beamstream-reinjected", b"not a number")], 0),
    (None, 0),
])
def test_dead_letter_reinjected_count_is_read_from_the_header(headers, count):
    value = dead_letter(reason="r", error_type="E", service="s", source_topic="t", source_partition=0,
                        source_offset=0, key=None, payload=b"p", headers=headers)
    assert value["reinjected_count"] == count


def test_dead_letters_output_names_the_messages_topic_in_the_service():
    serde = RecordingSerde()
    builder = DeadLetters(serde, "deadletter", "worker/{topic}")
    message = FakeMessage("images", 1, 17, key=b"dcid-1", value=b"junk", headers=[("beamstream-reinjected", b"1")])

    output = builder.output(message, "cannot decode", "SerdeError", attempts=3, dcid=1, image_number=4)

    assert output == ("deadletter", b"dcid-1", b"encoded-dead-letter")
    ((name, value, topic),) = serde.encoded
    assert (name, topic) == ("DeadLetter", "deadletter")
    assert value["service"] == "worker/images"
    assert (value["source_topic"], value["source_partition"], value["source_offset"]) == ("images", 1, 17)
    assert (value["key"], value["payload"], value["reinjected_count"]) == (b"dcid-1", b"junk", 1)
    assert (value["attempts"], value["dcid"], value["image_number"]) == (3, 1, 4)
    assert value["headers"] == [{"key": "beamstream-reinjected", "value": b"1"}]


def test_dead_letters_output_of_a_message_without_headers():
    serde = RecordingSerde()
    DeadLetters(serde, "dlq", "ispyb-sink").output(FakeMessage("results", 0, 0, value=b"x"), "r", "E")
    ((_, value, _),) = serde.encoded
    assert value["service"] == "ispyb-sink" and value["headers"] == [] and value["reinjected_count"] == 0


def test_atomic_writer_turns_a_system_error_out_of_flush_into_an_aborted_transaction(broker, producer):
    # confluent-kafka 2.16 raises SystemError out of flush() once a fatal error (fenced) is pending.
    from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
    from beamstream.platform.retained import RetainedError

    def failing_flush(timeout=None):
        raise SystemError("<method 'str' of 'KafkaError' objects> returned a result with an exception set")

    producer.flush = failing_flush
    with pytest.raises(RetainedError, match="nothing written: the producer failed"):
        with AtomicWriter(producer=producer) as writer:
            writer.produce(OutRecord("out", b"k", b"v"))

    assert producer.aborted_transactions == 1 and broker.values("out") == []


def test_a_call_past_its_limit_is_abandoned_on_a_daemon_thread_and_the_next_call_gets_a_fresh_one():
    import threading

    from beamstream.engine.transactions import CallLimit, TransactionStuck

    limit = CallLimit(0.1)
    release = threading.Event()
    ran_on: list[threading.Thread] = []

    def stuck():
        ran_on.append(threading.current_thread())
        release.wait(10)

    with pytest.raises(TransactionStuck, match="commit_transaction did not return within 0.1 s"):
        limit(stuck, "commit_transaction")
    # A call that never returns must not keep the process from exiting.
    assert ran_on[0].daemon and ran_on[0].is_alive() and limit.abandoned == 1

    limit(lambda: ran_on.append(threading.current_thread()), "send_offsets_to_transaction")
    assert ran_on[1] is not ran_on[0]
    with pytest.raises(ValueError, match="refused"):
        limit(lambda: (_ for _ in ()).throw(ValueError("refused")), "commit_transaction")
    release.set()
    ran_on[0].join(5)
    assert not ran_on[0].is_alive()
