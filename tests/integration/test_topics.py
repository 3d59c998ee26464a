"""Topics declared in code, applied idempotently to a real broker."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

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


def test_applies_racing_to_create_the_topics_each_check_them_all(kafka_settings):
    """Two applies of a new prefix at once: each topic is created by one of them, and the other, refused
    with "already exists", still checks it (partitions and configs) instead of passing it over."""
    settings = load_settings(bootstrap_servers=kafka_settings.bootstrap_servers,
                             topic_prefix=f"race{uuid.uuid4().hex[:8]}.", image_partitions=3)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: {c.topic: (c.action, c.detail) for c in apply_topics(settings)}, range(2))
    names = {spec.name(settings) for spec in declared_topics(settings)}
    assert set(first) == set(second) == names
    for name in names:
        # "unchanged" with no detail: checked like any existing topic (it used to say "created concurrently")
        assert sorted([first[name], second[name]]) == [("created", ""), ("unchanged", "")], name
    assert {r["partitions"] for r in list_topics(settings) if r["topic"] == f"{settings.topic_prefix}images"} == {3}


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


def test_apply_refuses_to_grow_partitions_while_a_collection_is_open(kafka_settings):
    from beamstream.platform.kafka_clients import make_producer
    from beamstream.platform.topics import TopicError, topic_name
    from beamstream.producers.events import EventPublisher, collection_started
    from beamstream.schemas.examples import example_event
    from beamstream.schemas.keys import dcid_key
    from beamstream.schemas.serde import make_serde
    from tests.helpers.cli_run import one_line_error, run_cli

    with EventPublisher(kafka_settings) as publisher:
        publisher.publish([collection_started(5150, file_template="/data/x_####.cbf", number_of_images=2)])
    grown = load_settings(bootstrap_servers=kafka_settings.bootstrap_servers, home=kafka_settings.home,
                          topic_prefix=kafka_settings.topic_prefix, image_partitions=6)
    with pytest.raises(TopicError, match=r"from 4 to 6 partitions: 1 collection\(s\) still open \(dcid 5150\)"):
        apply_topics(grown)
    line = one_line_error(run_cli(grown, "topics", "apply"))
    assert "dcid 5150" in line and "wait until these are summarised" in line
    partitions = {r["topic"]: r["partitions"] for r in list_topics(kafka_settings)}
    assert partitions[f"{kafka_settings.topic_prefix}results"] == 4

    summaries = topic_name(kafka_settings, "summaries")
    summary = example_event("CollectionSummary")
    summary.update(dcid=5150, processing_job_id=None)
    producer = make_producer(kafka_settings)
    producer.produce(summaries, make_serde().encode("CollectionSummary", summary, summaries), dcid_key(5150))
    producer.flush(10)
    changes = {c.topic: c for c in apply_topics(grown)}
    assert changes[f"{kafka_settings.topic_prefix}results"].detail == "4 -> 6"
