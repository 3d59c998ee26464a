"""Topics declared in code, applied idempotently to a real broker."""

import time

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from beamstream.platform.settings import load_settings
from beamstream.platform.topics import apply_topics, declared_topics, list_topics

pytestmark = pytest.mark.kafka


def test_images_are_keyed_by_dcid_with_room_to_scale():
    specs = {s.logical_name: s for s in declared_topics(load_settings(environ={}))}
    assert specs["images"].partitions >= 12
    assert specs["heartbeats"].configs["cleanup.policy"] == "compact"


def test_apply_is_idempotent_and_grows_partitions(kafka_settings):
    # kafka_settings already applied the topics once with 4 image partitions
    again = apply_topics(kafka_settings)
    assert {c.action for c in again} == {"unchanged"}

    grown = load_settings(bootstrap_servers=kafka_settings.bootstrap_servers,
                          topic_prefix=kafka_settings.topic_prefix, image_partitions=6)
    changes = {c.topic: c for c in apply_topics(grown)}
    images = f"{kafka_settings.topic_prefix}images"
    assert changes[images].action == "partitions" and changes[images].detail == "4 -> 6"
    rows = {r["topic"]: r for r in list_topics(grown)}
    assert rows[images]["partitions"] == 6


def test_apply_restores_a_changed_config(kafka_settings):
    admin = AdminClient(kafka_settings.kafka_client_config())
    topic = f"{kafka_settings.topic_prefix}results"
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result()
    _wait_for_retention(admin, topic, "1000")  # KRaft applies config changes asynchronously
    changes = {c.topic: c for c in apply_topics(kafka_settings)}
    assert changes[topic].action == "config"
    assert _wait_for_retention(admin, topic, str(14 * 24 * 3600 * 1000))


def _wait_for_retention(admin, topic, value, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [future] = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
        if future.result()["retention.ms"].value == value:
            return True
        time.sleep(0.2)
    return False
