"""A producer-side commit stuck past its call limit (librdkafka after a broker restart), against the in-memory
Kafka of tests/helpers/fake_kafka.py: the spool's drain thread and EventPublisher leave the stuck producer to
its call, fence it with a new one of the same transactional id, and publish the batch again.

Covers: AtomicWriter raising TransactionStuck without aborting (a stuck commit) and for a stuck abort; the
spool publishing a batch whose stuck commit went through a second time, in order, and one whose commit never
took effect once, acknowledging both; EventPublisher doing the same within one publish() call.
"""

from __future__ import annotations

import threading

import pytest

from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
from beamstream.engine.transactions import CallLimit, TransactionStuck
from beamstream.platform.retained import RetainedError
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers import events as events_module
from beamstream.producers import publishing
from beamstream.producers.events import EventPublisher, image_arrived
from beamstream.producers.publishing import SpooledPublisher
from tests.helpers.fake_kafka import FakeBroker

LIMIT_S = 0.05  # the call limit in these tests: a stuck call is given up on at once
DCID = 42


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={}, home=tmp_path / "home", topic_prefix="t.")


@pytest.fixture
def broker(settings, monkeypatch) -> FakeBroker:
    broker = FakeBroker()
    for logical in ("images", "collections", "requests"):
        broker.create_topic(topic_name(settings, logical), 1)  # one partition: the order is the log's
    monkeypatch.setattr(publishing, "make_producer", broker.make_producer)
    monkeypatch.setattr(events_module, "make_producer", broker.make_producer)
    return broker


@pytest.fixture
def release():
    """Set at the end of the test: the abandoned call returns and its thread ends."""
    event = threading.Event()
    yield event
    event.set()


def images(*numbers: int) -> list:
    return [image_arrived(DCID, n, f"/data/x_{n:04d}.cbf") for n in numbers]


def visible_images(broker: FakeBroker, settings, serde) -> list[int]:
    """Image numbers a read_committed reader sees, in log order."""
    topic = topic_name(settings, "images")
    return [serde.decode(value, topic).value["image_number"] for value in broker.values(topic)]


def test_atomic_writer_gives_up_on_a_stuck_commit_without_aborting(broker, release):
    producer = broker.make_producer(None, transactional_id="writer")
    broker.hang_next("commit_transaction", release)

    with pytest.raises(TransactionStuck, match="commit_transaction did not return.*committed is unknown"):
        with AtomicWriter(producer=producer, limit=CallLimit(LIMIT_S)) as writer:
            writer.produce(OutRecord("t.images", b"k", b"v"))

    assert producer.aborted_transactions == 0  # an abort would queue behind the stuck call


def test_atomic_writer_gives_up_on_a_stuck_abort(broker, release):
    producer = broker.make_producer(None, transactional_id="writer")
    producer.abort_transaction = lambda timeout=None: release.wait()

    with pytest.raises(TransactionStuck, match="abort_transaction did not return"):
        with AtomicWriter(producer=producer, limit=CallLimit(LIMIT_S)):
            raise RetainedError("the block failed")


@pytest.mark.parametrize(("went_through", "expected"), [(True, [1, 2, 3, 4, 3, 4, 5]), (False, [1, 2, 3, 4, 5])])
def test_the_spool_publishes_a_batch_whose_commit_got_stuck_again(broker, settings, release, went_through, expected):
    publisher = SpooledPublisher(settings, "stuck", call_limit_s=LIMIT_S)
    try:
        publisher.publish(images(1, 2))
        assert publisher.wait_drained(30)
        first = publisher._producer
        broker.hang_next("commit_transaction", release, after_effect=went_through)
        publisher.publish(images(3, 4))
        assert publisher.wait_drained(30)
        publisher.publish(images(5))
        assert publisher.wait_drained(30)

        assert publisher.producers_replaced == 1 and publisher.spool.pending_batches == 0
        replacement = broker.producers[-1]
        assert replacement is not first and replacement.transactional_id == first.transactional_id
        assert replacement.epoch > first.epoch  # the stuck producer is fenced: nothing it does is written
    finally:
        publisher.close(timeout=5)
    # A commit that went through is there twice (the workers skip the copy); one that did not, once.
    assert visible_images(broker, settings, publisher.serde) == expected
    # Nothing was left open: the replacement settled the stuck transaction.
    topic = topic_name(settings, "images")
    assert broker.stable_end(topic, 0) == len(broker.records(topic, 0))


@pytest.mark.parametrize(("went_through", "expected"), [(True, [1, 2, 1, 2, 3]), (False, [1, 2, 3])])
def test_event_publisher_publishes_a_batch_whose_commit_got_stuck_again(broker, settings, release, went_through,
                                                                         expected):
    publisher = EventPublisher(settings, transactional_id="t.acquisition", call_limit_s=LIMIT_S)
    first = publisher._producer
    broker.hang_next("commit_transaction", release, after_effect=went_through)

    assert publisher.publish(images(1, 2)) == 2
    assert publisher.publish(images(3)) == 1

    assert publisher.producers_replaced == 1 and publisher._producer is not first
    assert publisher._producer.transactional_id == first.transactional_id
    assert visible_images(broker, settings, publisher.serde) == expected


def test_event_publisher_raises_when_the_republished_batch_gets_stuck_too_and_recovers_on_the_next(
        broker, settings, release, monkeypatch):
    publisher = EventPublisher(settings, transactional_id="t.acquisition", call_limit_s=LIMIT_S)
    broker.hang_next("commit_transaction", release)

    def hang_again(*args, **kwargs):  # the replacement's first commit gets stuck as well
        producer = broker.make_producer(*args, **kwargs)
        if publisher.producers_replaced == 0:
            broker.hang_next("commit_transaction", release)
        return producer

    monkeypatch.setattr(events_module, "make_producer", hang_again)
    with pytest.raises(TransactionStuck, match="committed is unknown"):
        publisher.publish(images(1))

    assert publisher.publish(images(2)) == 1  # a third producer, not the stuck ones
    assert publisher.producers_replaced == 2
    assert visible_images(broker, settings, publisher.serde) == [2]
