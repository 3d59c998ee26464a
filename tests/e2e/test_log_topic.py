"""Log lines shipped to the logs topic: the setting, a Kafka that is down, and a real service's lines read back."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid

import pytest
from prometheus_client import REGISTRY

import beamstream.platform.metrics  # noqa: F401  (defines the dropped-records counter)
from beamstream.errors import SettingError
from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.logs import LIBRDKAFKA_LOGGER, JsonFormatter, KafkaLogHandler
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, collection_ended
from tests.helpers.harness import ServiceProcess


def read_logs(settings, until, timeout: float = 60.0) -> list[tuple[bytes, dict]]:
    """(key, JSON line) of the logs topic from its beginning, until ``until(lines)`` holds or time runs out."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}log-reader-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic_name(settings, "logs")])
    lines: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(lines):
            message = consumer.poll(0.3)
            if message is not None and not message.error():
                lines.append((message.key(), json.loads(message.value().decode("utf-8"))))
    finally:
        consumer.close()
    return lines


def dropped_queue_full() -> float:
    """``beamstream_log_records_dropped_total{reason="queue_full"}`` in this process, as /metrics would show it."""
    return REGISTRY.get_sample_value("beamstream_log_records_dropped_total", {"reason": "queue_full"}) or 0.0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("ON", True), ("yes", True),
                                               ("0", False), ("false", False), ("", False), ("off", False)])
def test_the_log_topic_setting_is_a_boolean(raw, expected):
    assert load_settings(environ={"BEAMSTREAM_LOG_TOPIC": raw}).log_topic is expected
    assert load_settings(environ={}).log_topic is False


def test_a_wrong_log_topic_setting_is_named():
    with pytest.raises(SettingError, match="BEAMSTREAM_LOG_TOPIC: expected true or false"):
        load_settings(environ={"BEAMSTREAM_LOG_TOPIC": "maybe"})


def test_logging_never_blocks_when_kafka_is_down():
    """Nothing listens at the bootstrap address: records queue up to the bound, the rest are dropped and counted."""
    settings = load_settings(environ={}, bootstrap_servers=f"127.0.0.1:{closed_port()}")
    handler = KafkaLogHandler(settings, "down-test", JsonFormatter("down-test"), queue_size=5,
                              delivery_timeout_s=1.0, flush_timeout_s=0.5)
    logger = logging.getLogger(f"beamstream.test.down.{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.addHandler(handler)
    before = dropped_queue_full()
    try:
        started = time.monotonic()
        for n in range(200):
            logger.warning("line %d", n, extra={"dcid": 5})
        elapsed = time.monotonic() - started
    finally:
        logger.removeHandler(handler)
        closing = time.monotonic()
        handler.close()
        closed_in = time.monotonic() - closing
    assert elapsed < 2.0, f"200 log calls took {elapsed:.1f} s with Kafka down"
    assert handler.dropped >= 195  # at most the 5 queued ones were not dropped at once
    assert dropped_queue_full() - before >= 195
    assert closed_in < 3.0, f"closing took {closed_in:.1f} s"


@pytest.mark.kafka
def test_librdkafka_records_are_not_shipped(kafka_settings):
    handler = KafkaLogHandler(kafka_settings, "ship-test", JsonFormatter("ship-test"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logging.getLogger(LIBRDKAFKA_LOGGER).error("FAIL|rdkafka#producer-1| a client complaint")
        logging.getLogger("beamstream.test.ship").error("image refused", extra={"dcid": 4242, "image": 7})
    finally:
        root.removeHandler(handler)
        handler.close()  # flushes
    lines = read_logs(kafka_settings, lambda got: any(line.get("dcid") == 4242 for _, line in got), timeout=30)
    assert [line["message"] for _, line in lines] == ["image refused"]
    key, line = lines[0]
    assert key == b"ship-test"
    assert (line["service"], line["level"], line["image"], line["logger"]) == ("ship-test", "error", 7,
                                                                               "beamstream.test.ship")
    assert handler.dropped == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_a_service_ships_its_json_lines_with_the_dcid(kafka_settings, tmp_path):
    archiver = ServiceProcess(kafka_settings, tmp_path, "archiver", command="archiver",
                             env={"BEAMSTREAM_LOG_TOPIC": "1"}).start()
    try:
        with EventPublisher(kafka_settings) as publisher:
            publisher.publish([collection_ended(31337, 10)])  # never started: a dead letter, logged with its dcid
        lines = read_logs(kafka_settings, lambda got: any(line.get("dcid") == 31337 for _, line in got))
        [(key, letter)] = [(k, line) for k, line in lines if line.get("dcid") == 31337]
    finally:
        code = archiver.terminate()
    assert code == 0, archiver.log_text()[-3000:]
    assert key == b"archiver"
    assert letter["service"] == "archiver" and letter["level"] == "warning"
    assert letter["message"].startswith("dead letter: no CollectionStarted for dcid 31337")
    # The very line printed to stderr, not a re-rendering of it.
    printed = [json.loads(text) for text in archiver.log_text().splitlines() if text.startswith("{")]
    assert letter in printed
    # The last line, logged on the way out, was flushed before the process exited.
    final = read_logs(kafka_settings, lambda got: any(line["message"] == "archiver stopped" for _, line in got),
                      timeout=30)
    assert any(line["message"] == "archiver stopped" for _, line in final)
