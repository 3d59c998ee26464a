"""Prometheus endpoints of the sinks: real service processes, real events, /metrics scraped over HTTP."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime

import pytest

from beamstream.connectors.ispyb_collections import create_collection
from beamstream.connectors.ispyb_schema import create_schema, make_engine
from beamstream.producers.events import EventPublisher, collection_ended, collection_started
from beamstream.schemas.keys import dcid_key
from tests.helpers.harness import ServiceProcess, free_port_pair
from tests.helpers.ispyb_helpers import publish, publish_raw, result, scalar, summary
from tests.helpers.metrics_helpers import Samples, scrape, value

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

def wait_for_metrics(service: ServiceProcess, port: int, condition, what: str, timeout: float = 90.0) -> Samples:
    """Scrape until ``condition(samples)`` holds; fail with the service's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            pytest.fail(f"{service.name} exited ({service.process.returncode}):\n{service.log_text()[-3000:]}")
        try:
            samples = scrape(port)
        except OSError:  # not listening yet
            samples = {}
        if samples and condition(samples):
            return samples
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}; last metrics: "
                f"{ {k: v for k, v in samples.items() if k[0].startswith('beamstream_')} }\n"
                f"{service.log_text()[-3000:]}")


def fresh(**fields) -> dict:
    """Event times of now, so the latency histograms measure this test, not the sample's 2026 date."""
    return {**fields, "event_time": datetime.now(UTC)}


def test_ispyb_sink_counts_rows_batches_and_dead_letters(kafka_settings, tmp_path):
    url = f"sqlite:///{tmp_path / 'ispyb.sqlite'}"
    engine = make_engine(url)
    create_schema(engine)
    dcid = create_collection(engine, file_template="/data/m/x_####.cbf", number_of_images=6)
    publish(kafka_settings, "results", "ImageResult", [result(dcid, n, **fresh()) for n in range(1, 7)])
    publish(kafka_settings, "summaries", "CollectionSummary", [summary(dcid, 6, 6)])
    publish_raw(kafka_settings, "results", [(dcid_key(dcid), b"not avro at all")])

    port = free_port_pair()
    sink = ServiceProcess(kafka_settings, tmp_path, "sink", "--metrics-port", str(port), "--batch-wait", "0.1",
                         command="ispyb-sink", env={"BEAMSTREAM_ISPYB_URL": url}).start()
    try:
        samples = wait_for_metrics(
            sink, port, lambda s: value(s, "beamstream_ispyb_sink_rows_written_total", kind="result") == 6
            and value(s, "beamstream_ispyb_sink_rows_written_total", kind="summary") == 1
            and value(s, "beamstream_ispyb_sink_dead_letters_total", error_type="CorruptMessageError") == 1,
            "6 result rows, 1 summary and 1 dead letter")
    finally:
        assert sink.terminate() == 0, sink.log_text()[-3000:]
    assert scalar(engine, "SELECT count(*) FROM ImageQualityIndicators WHERE dataCollectionId = :d", d=dcid) == 6
    assert value(samples, "beamstream_ispyb_sink_events_consumed_total", topic="results") == 7
    assert value(samples, "beamstream_ispyb_sink_events_consumed_total", topic="summaries") == 1
    assert value(samples, "beamstream_ispyb_sink_batch_seconds_count") >= 1
    assert value(samples, "beamstream_ispyb_sink_outages_total") == 0
    assert value(samples, "beamstream_ispyb_sink_result_latency_seconds_count") == 6
    # Published moments ago: the arrival-to-stored latency is seconds, not the sample event's date.
    assert 0 < value(samples, "beamstream_ispyb_sink_result_latency_seconds_sum") < 6 * 60
    # Its own registry: no other service's counters, but the process's.
    assert not any(name.startswith(("beamstream_worker_", "beamstream_archiver_")) for name, _ in samples)
    assert value(samples, "process_resident_memory_bytes") > 0


def test_ispyb_sink_counts_outages_while_the_database_is_unreachable(kafka_settings, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    publish(kafka_settings, "results", "ImageResult", [result(77, n) for n in range(1, 4)])
    port = free_port_pair()
    sink = ServiceProcess(kafka_settings, tmp_path, "sink-down", "--metrics-port", str(port), command="ispyb-sink",
                         env={"BEAMSTREAM_ISPYB_URL": f"mysql+pymysql://u:p@127.0.0.1:{closed}/ispyb"}).start()
    try:
        samples = wait_for_metrics(sink, port, lambda s: value(s, "beamstream_ispyb_sink_outages_total") >= 2,
                                   "two failed database attempts")
    finally:
        assert sink.terminate() == 0, sink.log_text()[-3000:]
    assert not value(samples, "beamstream_ispyb_sink_rows_written_total", kind="result")
    assert value(samples, "beamstream_ispyb_sink_batch_seconds_count") == 0


def test_archiver_counts_archives_events_and_dead_letters(kafka_settings, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for n in (1, 2):
        (data / f"x_{n:04d}.cbf").write_bytes(b"image %d" % n)
    with EventPublisher(kafka_settings) as publisher:  # ends are stamped now: the latency is this test's
        publisher.publish([collection_started(1, file_template=str(data / "x_####.cbf"), number_of_images=2),
                           collection_ended(1, 2), collection_ended(3, 10)])  # 3 never started: a dead letter
    publish_raw(kafka_settings, "collections", [(dcid_key(4), b"\x00\x01 not an event")])

    port = free_port_pair()
    archiver = ServiceProcess(kafka_settings, tmp_path, "archiver", "--metrics-port", str(port),
                             command="archiver", env={"BEAMSTREAM_ARCHIVE_ROOT": str(tmp_path / "archive")}).start()
    try:
        samples = wait_for_metrics(
            archiver, port, lambda s: value(s, "beamstream_archiver_collections_archived_total") == 1
            and value(s, "beamstream_archiver_dead_letters_total", error_type="MissingCollectionStarted") == 1
            and value(s, "beamstream_archiver_dead_letters_total", error_type="CorruptMessageError") == 1,
            "one collection archived and two dead letters")
    finally:
        assert archiver.terminate() == 0, archiver.log_text()[-3000:]
    assert (tmp_path / "archive" / "1" / "x.manifest.json").is_file()
    assert value(samples, "beamstream_archiver_events_consumed_total", record_type="CollectionStarted") == 1
    assert value(samples, "beamstream_archiver_events_consumed_total", record_type="CollectionEnded") == 2
    assert value(samples, "beamstream_archiver_events_consumed_total", record_type="undecodable") == 1
    assert value(samples, "beamstream_archiver_collections_skipped_total") == 0
    assert value(samples, "beamstream_archiver_manifest_seconds_count") == 1
    assert value(samples, "beamstream_archiver_latency_seconds_count") == 1
    assert 0 < value(samples, "beamstream_archiver_latency_seconds_sum") < 5 * 60


def test_feedback_counts_datagrams_latency_and_skipped_results(kafka_settings, tmp_path):
    values = [result(1001, image, **fresh()) for image in range(1, 5)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gda:
        gda.bind(("127.0.0.1", 0))
        gda.settimeout(30)
        port = free_port_pair()
        feedback = ServiceProcess(kafka_settings, tmp_path, "feedback", "--udp", f"127.0.0.1:{gda.getsockname()[1]}",
                                 "--from-beginning", "--metrics-port", str(port), command="feedback").start()
        try:
            publish(kafka_settings, "results", "ImageResult", values[:2])
            publish_raw(kafka_settings, "results", [(dcid_key(1001), b"garbage")])
            publish(kafka_settings, "results", "ImageResult", values[2:])
            samples = wait_for_metrics(
                feedback, port, lambda s: value(s, "beamstream_feedback_datagrams_sent_total") == 4
                and value(s, "beamstream_feedback_results_skipped_total", error_type="CorruptMessageError") == 1,
                "4 datagrams sent and 1 result skipped")
            received = sorted(gda.recv(1024).split(b":")[2] for _ in range(4))
        finally:
            assert feedback.terminate() == 0, feedback.log_text()[-3000:]
    assert received == [b"1", b"2", b"3", b"4"]
    assert value(samples, "beamstream_feedback_results_consumed_total") == 5
    assert value(samples, "beamstream_feedback_latency_seconds_count") == 4
    assert 0 < value(samples, "beamstream_feedback_latency_seconds_sum") < 4 * 60
