"""The beamline's bluesky-kafka Publisher with exactly the ACLs compose's bluesky-setup gives it, on a real broker.

``local_security.publish_topic_acls`` (Write and Describe on the document topic, by name; tests/unit/test_compose.py
checks docker/kafka/setup-bluesky.sh grants the same) must be enough for a Publisher with bluesky-kafka's
recommended ``enable.idempotence`` to send a run's documents (no IdempotentWrite on the cluster: Kafka 3.9 gives
an idempotent producer with Write on a topic its producer id, KIP-679), and must not let it read the topic or
write any other.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import msgpack
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    NewTopic,
)

from beamstream.operations import local_security
from tests.e2e.test_security import scram_cluster  # noqa: F401  (the module's own SCRAM broker)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def publisher_login(scram_cluster) -> Iterator[tuple[str, dict, AdminClient, list[str]]]:  # noqa: F811
    """(bootstrap, the Publisher user's librdkafka login, a super user's admin client, [document topic, another
    topic]): a new user with a SCRAM credential and only publish_topic_acls on the document topic."""
    settings, cluster, _ = scram_cluster
    user, password = f"bluesky-publisher-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin = AdminClient(cluster.admin_config())
    local_security.set_scram_credential(admin, user, password)
    topics = [f"i03-{uuid.uuid4().hex[:6]}.bluesky.runengine.documents", f"i04-{uuid.uuid4().hex[:6]}.documents"]
    for future in admin.create_topics([NewTopic(topic, 1, 1) for topic in topics]).values():
        future.result(30)
    for future in admin.create_acls(local_security.publish_topic_acls(topics[:1], user)).values():
        future.result(30)
    yield settings.kafka_bootstrap, local_security.sasl_config(user, password), admin, topics
    admin.delete_topics(topics)


def _publish_run(bootstrap: str, login: dict, topic: str) -> list:
    """Publish one run's documents (start, descriptor, event, stop) as the beamline does; the delivery errors."""
    from bluesky_kafka import Publisher
    from event_model import compose_run

    errors: list = []
    publisher = Publisher(topic=topic, bootstrap_servers=bootstrap, key="i03-re",
                          producer_config={**login, "enable.idempotence": True, "message.timeout.ms": 20000},
                          on_delivery=lambda err, msg: errors.append(err) if err else None, flush_on_stop_doc=True)
    run = compose_run(metadata={"plan_name": "count"})
    descriptor = run.compose_descriptor(name="primary", data_keys={
        "x": {"dtype": "number", "shape": [], "source": "sim", "units": "mm"}})
    publisher("start", run.start_doc)
    publisher("descriptor", descriptor.descriptor_doc)
    publisher("event", descriptor.compose_event(data={"x": 1.5}, timestamps={"x": 0.0}, seq_num=1))
    publisher("stop", run.compose_stop())  # flushes: every delivery report has been served
    return errors


def _read(config: dict, topic: str, count: int) -> tuple[list, list[int]]:
    """(up to ``count`` messages of ``topic`` from the beginning, the error codes met), read by assignment: no
    group is joined, though librdkafka still looks up the group's coordinator (an error the Publisher's user
    gets, having no group ACL). Stops early when reading the topic is refused."""
    consumer = Consumer({**config, "group.id": "unused", "enable.auto.commit": False, "log_level": 0})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    messages: list = []
    errors: list[int] = []
    try:
        for _ in range(60):  # each poll waits at most 0.5 s: 30 s in all
            message = consumer.poll(0.5)
            if message is not None and message.error():
                errors.append(message.error().code())
            elif message is not None:
                messages.append(message)
            if len(messages) == count or KafkaError.TOPIC_AUTHORIZATION_FAILED in errors:
                break
        return messages, errors
    finally:
        consumer.close()


def test_the_publisher_sends_a_run_with_only_its_acls(publisher_login, scram_cluster) -> None:  # noqa: F811
    bootstrap, login, _, (documents, _) = publisher_login
    assert _publish_run(bootstrap, login, documents) == []
    _, cluster, _ = scram_cluster
    messages, errors = _read(cluster.admin_config(), documents, 4)  # as the super user
    assert errors == []
    assert [msgpack.loads(m.value())[0] for m in messages] == ["start", "descriptor", "event", "stop"]
    assert {m.key() for m in messages} == {b"i03-re"}


def test_the_publisher_may_not_read_its_topic_or_write_another(publisher_login) -> None:
    bootstrap, login, _, (documents, other) = publisher_login
    messages, errors = _read({**login, "bootstrap.servers": bootstrap}, documents, 1)
    assert messages == [] and KafkaError.TOPIC_AUTHORIZATION_FAILED in errors, errors
    errors = _publish_run(bootstrap, login, other)
    assert errors and {e.code() for e in errors} == {KafkaError.TOPIC_AUTHORIZATION_FAILED}, errors
