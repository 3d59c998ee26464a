"""Long-running services with Kafka gone: none exits while it is down, and they work again when it is back.

At start-up an unreachable cluster is one line and exit 2 (tests/e2e/test_unreachable.py): a
supervisor starts the service again. Once running, a service must ride out an outage. Here every
service runs on a broker of this test's own, the broker stops for longer than the timeouts that
used to end a service (30 s to start a producer, 10 s of consumer session), and comes back.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from beamstream.operations.cluster import LocalCluster
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics
from tests.helpers.faults import record_fault
from tests.helpers.harness import ServiceProcess, Supervisor, free_port_pair

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.fault]

OUTAGE_S = 40.0
IMAGES = 3


def _publish_collection(settings: Settings, dcid: int) -> None:
    from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived

    with EventPublisher(settings) as publisher:
        publisher.publish([collection_started(dcid, file_template="/data/o_######.cbf", number_of_images=IMAGES,
                                              experiment_type="rotation")])
        publisher.publish([image_arrived(dcid, n, f"/data/o_{n:06d}.cbf") for n in range(1, IMAGES + 1)])
        publisher.publish([collection_ended(dcid, IMAGES)])


def _datagrams(listener: socket.socket, dcid: int, seen: set[str]) -> set[int]:
    """Images of ``dcid`` that GDA feedback has sent a PIA datagram for (``seen`` keeps every datagram)."""
    while True:
        try:
            seen.add(listener.recv(4096).decode())
        except BlockingIOError:
            break
    return {int(line.split(":")[2]) for line in seen if line.startswith(f"PIA:{dcid}:")}


def _values_on(settings: Settings, logical_topic: str) -> list[dict]:
    """Every committed record of a topic, decoded, once each.

    Read by offset range with no consumer group: a group's reader would have its own session time out in
    the outage and, committing nothing, read the topic again from the start (and rejoin late).
    """
    from beamstream.platform.retained import offset_bounds, open_reader, partitions_of, read_range
    from beamstream.platform.topics import topic_name
    from beamstream.schemas.serde import make_serde

    serde, name = make_serde(settings.schema_registry_url), topic_name(settings, logical_topic)
    consumer = open_reader(settings)
    try:
        ranges = offset_bounds(consumer, name, partitions_of(consumer, name))
        values = [serde.decode(record.value, name).value for record in read_range(consumer, name, ranges)]
    finally:
        consumer.close()
    return values


def _results_on_the_topic(settings: Settings) -> Counter:
    """(dcid, image) of every committed result, counted once per record."""
    return Counter((value["dcid"], value["image_number"]) for value in _values_on(settings, "results"))


def _rows_in_ispyb(settings: Settings, dcid: int) -> int:
    from sqlalchemy import text

    from beamstream.connectors.ispyb_schema import make_engine

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT COUNT(*) FROM ImageQualityIndicators WHERE dataCollectionId = :d"),
                                      {"d": dcid}).scalar_one()
    finally:
        engine.dispose()


def _feedback_started(settings: Settings) -> bool:
    """Whether the GDA feedback group has a committed offset on every results partition."""
    from confluent_kafka import TopicPartition

    from beamstream.platform.kafka_clients import make_consumer
    from beamstream.platform.topics import topic_name

    results = topic_name(settings, "results")
    consumer = make_consumer(settings, f"{settings.topic_prefix}gda-feedback")  # never subscribes: not a member
    try:
        committed = consumer.committed([TopicPartition(results, p) for p in range(settings.image_partitions)],
                                       timeout=10)
    finally:
        consumer.close()
    return all(tp.offset >= 0 for tp in committed)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.3)


def _results_of(settings: Settings, dcid: int) -> int:
    return sum(1 for (of, _) in _results_on_the_topic(settings) if of == dcid)


def _wait_for_log(service: ServiceProcess, marker: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while marker not in service.log_text():
        assert service.process.poll() is None, f"{service.name} exited: {service.log_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{service.name} never logged {marker!r}: {service.log_text()[-2000:]}"
        time.sleep(0.3)


def test_every_service_rides_out_a_kafka_outage(tmp_path: Path) -> None:
    settings = load_settings({}, home=tmp_path / "home", local_kafka_port=free_port_pair(), topic_prefix="out.",
                             image_partitions=2)
    cluster = LocalCluster(settings)
    cluster.up(progress=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    logs = tmp_path / "logs"
    logs.mkdir()
    worker = ServiceProcess(settings, logs, "worker", "--analysis", "noop", "--summary-timeout", "5")
    others = {
        "ispyb sink started": ServiceProcess(settings, logs, "ispyb-sink", command="ispyb-sink"),
        "state loaded": ServiceProcess(settings, logs, "archiver", command="archiver"),
        "PIA": ServiceProcess(settings, logs, "feedback", "--udp", f"127.0.0.1:{listener.getsockname()[1]}",
                              command="feedback"),
        "status": ServiceProcess(settings, logs, "monitor", "--observe-only", "--interval", "1", command="monitor"),
        "dashboard: http": ServiceProcess(settings, logs, "dashboard", "--port", "0", command="dashboard"),
    }
    supervisor = None
    try:
        from beamstream.connectors.ispyb_schema import create_schema, make_engine

        apply_topics(settings)
        create_schema(make_engine(settings.database_url))
        for service in [worker, *others.values()]:
            service.start()
        # A worker that stalls in a commit after the restart exits 75 by design: its supervisor restarts it.
        supervisor = Supervisor([worker])
        seen: set[str] = set()
        _wait_for_log(worker, "table partitions restored")
        # GDA feedback sends new results only: it pins its start on every results partition when first assigned.
        _wait_until(lambda: _feedback_started(settings), 60, "GDA feedback's first assignment")
        _publish_collection(settings, 1)
        _wait_until(lambda: _results_of(settings, 1) >= IMAGES, 120, "results before")
        _wait_until(lambda: len(_datagrams(listener, 1, seen)) >= IMAGES, 60, "PIA datagrams before")
        for marker, service in others.items():
            if marker != "PIA":
                _wait_for_log(service, marker)

        cluster.down()
        down_until = time.monotonic() + OUTAGE_S
        while time.monotonic() < down_until:  # watched throughout, not only at the end
            for service in [worker, *others.values()]:
                assert service.process.poll() is None, \
                    f"{service.name} exited with {service.process.returncode} while Kafka was down: " \
                    f"{service.log_text()[-2000:]}"
            time.sleep(0.5)
        assert supervisor.restarts == []

        cluster.up(progress=False)
        back = time.monotonic()
        # dcid 2's results land on the results partition dcid 1's did not (2 partitions, murmur2 of the key):
        # one the feedback group has never consumed from, which must not start at "latest" again when the group
        # rejoins after the outage (results written while it was rejoining were never sent before).
        _publish_collection(settings, 2)
        _wait_until(lambda: _results_of(settings, 2) >= IMAGES, 180, "results after")
        recovery_s = time.monotonic() - back
        _wait_until(lambda: len(_datagrams(listener, 2, seen)) >= IMAGES, 60, "PIA datagrams after")
        _wait_until(lambda: _rows_in_ispyb(settings, 2) == IMAGES, 60, "the ISPyB sink's rows after")
        _wait_until(lambda: any(v["dcid"] == 2 for v in _values_on(settings, "archive")), 60, "the archive after")
        for service in others.values():
            assert service.process.poll() is None, f"{service.name} exited after the outage"
        results = _results_on_the_topic(settings)
        record_fault("kafka down 40 s under every service", images=2 * IMAGES,
                     lost=2 * IMAGES - len(results), duplicated=sum(n - 1 for n in results.values()),
                     recovery_s=recovery_s, worker_restarts=len(supervisor.restarts))
        assert set(results) == {(dcid, n) for dcid in (1, 2) for n in range(1, IMAGES + 1)}
        assert all(n == 1 for n in results.values()), results
    finally:
        if supervisor is not None:
            supervisor.stop()
        for service in [worker, *others.values()]:
            service.terminate(30)
        listener.close()
        cluster.down()
