"""Bad image events go to the dead-letter topic with their reason; the rest of the
collection is analysed as usual (a real worker, real CBF files, a real broker)."""

from __future__ import annotations

import bz2

import pytest

from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import apply_topics, topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.keys import dcid_key
from tests.helpers.harness import ServiceProcess, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DCID = 810001


def test_bad_image_events_are_dead_lettered_and_the_rest_analysed(kafka_settings, data_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    settings = load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4,
                             data_roots=(str(root),))
    apply_topics(settings)
    good = []
    for number, source in enumerate(sorted((data_dir / "thaumatin_grid").glob("*.cbf.bz2"))[:2], start=1):
        target = root / f"thau_{number:04d}.cbf"
        target.write_bytes(bz2.decompress(source.read_bytes()))
        good.append(target)
    unreadable = root / "thau_0004.cbf"
    unreadable.write_bytes(b"###CBF: VERSION 1.5\nthis is not an image\n")
    outside = tmp_path / "elsewhere.cbf"
    outside.write_bytes(good[0].read_bytes())

    reader = TopicReader(settings, ["results", "summaries", "deadletter"])
    worker = ServiceProcess(settings, tmp_path, "w", "--analysis", "real", "--retries", "2",
                           "--retry-backoff", "0.1", "--summary-timeout", "15", "--log-level", "warning").start()
    try:
        publisher = EventPublisher(settings)
        publisher.publish([
            collection_started(DCID, file_template=str(root / "thau_####.cbf"), number_of_images=5),
            image_arrived(DCID, 1, str(good[0])),
            image_arrived(DCID, 2, str(good[1])),
            image_arrived(DCID, 3, str(root / "thau_0003.cbf")),  # never written
            image_arrived(DCID, 4, str(unreadable)),
            image_arrived(DCID, 5, str(outside)),
            collection_ended(DCID, 5),
        ])
        producer = make_producer(settings)
        producer.produce(topic_name(settings, "images"), b"\x00not avro", dcid_key(DCID))
        producer.flush(10)

        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", DCID), 150, "the summary")
        reader.wait_for(lambda: len(reader.values("deadletter")) >= 4, 30, "four dead letters")
    finally:
        assert worker.terminate() == 0
        reader.close()

    results = {r["image_number"]: r for r in reader.values("results", "ImageResult", DCID)}
    assert sorted(results) == [1, 2]
    assert all(r["n_spots_total"] > 100 and r["estimated_d_min"] for r in results.values())

    letters = {d["image_number"]: d for d in reader.values("deadletter")}
    assert len(reader.values("deadletter")) == 4
    assert "thau_0003.cbf" in letters[3]["reason"] and letters[3]["attempts"] == 2
    assert letters[3]["error_type"] == "ImageReadError"
    assert letters[4]["error_type"] == "ImageReadError" and letters[4]["attempts"] == 2
    assert "outside the configured data roots" in letters[5]["reason"] and letters[5]["attempts"] == 1
    undecodable = letters[None]
    assert undecodable["error_type"] == "CorruptMessageError"
    assert undecodable["payload"] == b"\x00not avro" and undecodable["key"] == dcid_key(DCID)
    for letter in letters.values():
        assert letter["source_topic"] == topic_name(settings, "images")

    [summary] = reader.values("summaries", "CollectionSummary", DCID)
    assert summary["status"] == "incomplete"
    assert summary["missing_images"] == [3, 4, 5]
    assert summary["images_analysed"] == 2
