"""The dashboard's read-only Kafka views (``GET /api/kafka/...``) against the session broker: topics with their
partitions, offsets and configs; messages by offset, by time and by dcid, decoded or shown raw with the reason;
consumer groups with their members and per-partition lag. Browsing leaves no consumer group behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import KafkaException, TopicPartition

from beamstream.dashboard import kafka_views
from beamstream.dashboard.view import DashboardView
from beamstream.dashboard.web import create_app
from beamstream.platform.kafka_clients import make_admin, make_consumer, make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import apply_topics, declared_topics, topic_name
from beamstream.schemas.keys import image_key
from tests.helpers.dashboard import publish_two_collections

pytestmark = pytest.mark.kafka
PARTITIONS = 4
#: Plain (not transactional) records written to each partition of ``results``, no markers between them.
RESULTS = {0: 5, 1: 3, 2: 0, 3: 2}


def _get(settings, paths: list[str], method: str = "GET") -> list[tuple[int, dict]]:
    """(status, JSON body) of each request to the dashboard app."""
    async def go():
        async with TestClient(TestServer(create_app(settings, DashboardView()))) as client:
            answers = []
            for path in paths:
                response = await client.request(method, path)
                answers.append((response.status, await response.json()))
            return answers
    return asyncio.run(go())


def _one(settings, path: str) -> dict:
    [(status, body)] = _get(settings, [path])
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def cluster(kafka_cluster):
    """A prefix of this module's own with known records: collection 101 (6 images) in one transaction,
    collection 202 (4 images) in a later one, and on images partition 0 a junk value, a JSON value and an
    aborted record; :data:`RESULTS` on results. Returns (settings, the time between the two transactions)."""
    base, _ = kafka_cluster
    settings = load_settings(environ={}, bootstrap_servers=base.kafka_bootstrap, home=base.home,
                             topic_prefix=f"t{uuid.uuid4().hex[:10]}.", image_partitions=PARTITIONS)
    apply_topics(settings)
    images = topic_name(settings, "images")
    between = publish_two_collections(settings)
    plain = make_producer(settings)
    plain.produce(images, b"not avro", image_key(303, 1), partition=0, headers=[("origin", b"test")])
    plain.produce(images, b'{"state": "json"}', b"303:2", partition=0)
    for partition, count in RESULTS.items():
        for n in range(count):
            plain.produce(topic_name(settings, "results"), b"r", f"{partition}:{n}".encode(), partition=partition)
    plain.flush(10)
    aborting = make_producer(settings, transactional_id=f"{settings.topic_prefix}kv-abort")
    aborting.begin_transaction()
    aborting.produce(images, b"aborted", image_key(404, 1), partition=0)
    aborting.flush(10)
    aborting.abort_transaction(10)
    return settings, between


def _watermarks(settings, topic: str) -> dict[int, tuple[int, int]]:
    consumer = make_consumer(settings, f"{settings.topic_prefix}check-{uuid.uuid4().hex[:8]}")
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
                for p in range(PARTITIONS)}
    finally:
        consumer.close()


def test_topics_with_partitions_offsets_and_configs(cluster):
    settings, _ = cluster
    images = topic_name(settings, "images")
    topics = _one(settings, "/api/kafka/topics")
    assert sorted(t["topic"] for t in topics) == sorted(spec.name(settings) for spec in declared_topics(settings))
    row = next(t for t in topics if t["topic"] == images)
    marks = _watermarks(settings, images)
    assert row["logical"] == "images" and row["record_types"] == ["ImageArrived"]
    assert (row["partitions"], row["replicas"], row["under_replicated"]) == (PARTITIONS, 1, 0)
    # 10 images, the junk, the JSON, the aborted record, and the transactions' markers all take offsets.
    assert row["messages"] == sum(high - low for low, high in marks.values()) >= 13

    detail = _one(settings, "/api/kafka/topics/images")  # the logical name works as well as the full one
    assert detail["topic"] == images and "analysis queue" in detail["description"]
    assert [(p["partition"], p["low"], p["high"]) for p in detail["partitions"]] == \
        [(p, low, high) for p, (low, high) in sorted(marks.items())]
    assert all(p["replicas"] == p["isr"] == [p["leader"]] for p in detail["partitions"])
    configs = {c["name"]: c for c in detail["configs"]}
    retention = configs["retention.ms"]
    assert (retention["value"], retention["declared"], retention["default"]) == (str(14 * 86_400_000),) * 2 + (False,)
    assert retention["source"] == "dynamic_topic_config"
    assert configs["max.message.bytes"]["default"] is True and configs["max.message.bytes"]["declared"] is None
    flags = [c["default"] for c in detail["configs"]]
    assert flags == sorted(flags)  # the non-default configs first


def test_messages_by_offset_and_by_time_decoded(cluster):
    settings, between = cluster
    marks = _watermarks(settings, topic_name(settings, "images"))
    every = _one(settings, "/api/kafka/topics/images/messages?limit=100")["messages"]
    counts = Counter(m["partition"] for m in every if m["value"]["format"] == "avro")
    busiest = max(counts, key=counts.get)  # 10 images on 4 partitions: at least 3 here
    first = _one(settings, f"/api/kafka/topics/images/messages?partition={busiest}&offset=0&limit=2")
    assert len(first["messages"]) == 2 and first["stopped"] == "limit" and first["messages"][0]["offset"] == 0
    message = first["messages"][0]
    assert message["value"]["format"] == "avro" and message["value"]["type"] == "ImageArrived"
    image = message["value"]["json"]
    assert message["key"] == {"text": f"{image['dcid']}:{image['image_number']}", "size": len(message["key"]["text"]),
                              "dcid": image["dcid"]}
    assert message["dcid"] == image["dcid"] and message["dcid_from"] == "value"
    assert image["file_path"].endswith(f"_{image['image_number']:04d}.cbf")
    assert image["arrival_time"].startswith("20")  # times as ISO 8601
    assert first["isolation"] == "read_committed" and first["bounds"][str(busiest)]["end"] == marks[busiest][1]
    following = _one(settings, f"/api/kafka/topics/images/messages?partition={busiest}"
                               f"&offset={first['next_offset']}&limit=100")
    assert following["messages"][0]["offset"] > first["messages"][1]["offset"]
    assert len(first["messages"]) + len(following["messages"]) == \
        len([m for m in every if m["partition"] == busiest])
    assert following["next_offset"] is None and following["stopped"] == "end"

    since = _one(settings, f"/api/kafka/topics/images/messages?time={int(between * 1000)}&limit=100")
    assert since["start"] == "time"
    decoded = [m for m in since["messages"] if m["value"]["format"] == "avro"]
    assert sorted(m["value"]["json"]["image_number"] for m in decoded) == [1, 2, 3, 4]
    assert {m["dcid"] for m in decoded} == {202}  # collection 101's images came before
    assert all(m["timestamp_ms"] >= between * 1000 for m in since["messages"])
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between))  # without a zone: UTC; whole seconds
    assert {m["dcid"] for m in _one(settings, f"/api/kafka/topics/images/messages?time={iso}&limit=100")
            ["messages"] if m["value"]["format"] == "avro"} >= {202}

    # Without transaction markers the end offset is the last record's: reading up to it is the end, not the limit.
    exact = _one(settings, "/api/kafka/topics/results/messages?partition=1&offset=0&limit=3")
    assert [m["offset"] for m in exact["messages"]] == [0, 1, 2]
    assert (exact["stopped"], exact["next_offset"]) == ("end", None)
    cut = _one(settings, "/api/kafka/topics/results/messages?partition=1&offset=0&limit=2")
    assert (cut["stopped"], cut["next_offset"]) == ("limit", 2)
    assert cut["messages"][0]["value"] == {"format": "raw", "error": cut["messages"][0]["value"]["error"],
                                           "text": "r", "size": 1}

    newest = _one(settings, "/api/kafka/topics/images/messages?offset=latest&limit=3")
    assert len(newest["messages"]) == 3
    stamps = [m["timestamp_ms"] for m in newest["messages"]]
    assert stamps == sorted(stamps) and stamps[-1] == max(m["timestamp_ms"] for m in since["messages"])


def test_undecodable_json_and_aborted_records(cluster):
    settings, _ = cluster
    committed = _one(settings, "/api/kafka/topics/images/messages?partition=0&dcid=303")
    junk, text = committed["messages"]
    assert junk["value"]["format"] == "raw" and "not Avro single-object encoded" in junk["value"]["error"]
    assert junk["value"]["text"] == "not avro" and junk["value"]["size"] == 8
    assert (junk["dcid"], junk["dcid_from"]) == (303, "key")  # not decoded: the key names the collection
    assert junk["headers"] == [{"name": "origin", "text": "test", "size": 4}]
    assert text["value"]["format"] == "json" and text["value"]["json"] == {"state": "json"}
    # The aborted record: invisible read_committed, shown read_uncommitted.
    hidden = _one(settings, "/api/kafka/topics/images/messages?partition=0&dcid=404")
    assert hidden["messages"] == [] and hidden["stopped"] == "end"
    shown = _one(settings, "/api/kafka/topics/images/messages?partition=0&dcid=404&isolation=read_uncommitted")
    assert shown["isolation"] == "read_uncommitted"
    assert [m["value"].get("text") for m in shown["messages"]] == ["aborted"]


def test_dcid_filter_scans_forward_within_its_bound(cluster):
    settings, _ = cluster
    found = _one(settings, "/api/kafka/topics/images/messages?dcid=202&limit=100")
    assert sorted(m["value"]["json"]["image_number"] for m in found["messages"]) == [1, 2, 3, 4]
    assert all(m["dcid"] == 202 for m in found["messages"])
    # Every committed record was read: 10 images, the junk and the JSON value (not the aborted one).
    assert found["records_scanned"] == 12 and found["stopped"] == "end"
    assert set(found["scanned"]) == {str(p) for p in range(PARTITIONS)}
    bounded = _one(settings, "/api/kafka/topics/images/messages?dcid=202&scan=3")
    assert (bounded["records_scanned"], bounded["stopped"], bounded["scan_limit"]) == (3, "scan", 3)
    enough = _one(settings, "/api/kafka/topics/images/messages?dcid=101&limit=2")
    assert len(enough["messages"]) == 2 and enough["stopped"] == "limit"
    # Browsing never joins or commits a group: none of its throwaway group ids exists on the cluster.
    assert not [g for g in _group_ids(settings) if g.startswith(f"{settings.topic_prefix}browse-")]


def _group_ids(settings) -> list[str]:
    """Every consumer group on the cluster. Asked again while the listing times out: a fresh broker loads its
    group coordinator's partitions when a client first asks for a coordinator (as the browses just did)."""
    admin = make_admin(settings)
    deadline = time.monotonic() + 30
    while True:
        try:
            return [g.group_id for g in admin.list_consumer_groups(request_timeout=5).result(6).valid]
        except (TimeoutError, KafkaException):
            if time.monotonic() > deadline:
                raise


def test_a_group_with_its_member_and_per_partition_lag(cluster):
    settings, _ = cluster
    results = topic_name(settings, "results")
    group = f"{settings.topic_prefix}kv-readers"
    consumer = make_consumer(settings, group, **{"client.id": "kv-reader-1"})
    consumer.subscribe([results])
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, "no partitions assigned"
            consumer.poll(0.2)
        consumer.commit(offsets=[TopicPartition(results, 0, 2), TopicPartition(results, 1, 3)], asynchronous=False)

        listed = {g["group"]: g for g in _one(settings, "/api/kafka/groups")}
        assert listed[group]["state"] == "stable" and listed[group]["members"] == 1
        assert listed[group]["logical"] == "kv-readers"
        detail = _one(settings, "/api/kafka/groups/kv-readers")
        assert detail["state"] == "stable" and detail["lag"] == 3 + 0 + 0 + 2
        [member] = detail["members"]
        assert member["client_id"] == "kv-reader-1" and member["host"]
        assert member["assignment"] == [[results, p] for p in range(PARTITIONS)]
        rows = [(r["topic"], r["partition"], r["committed"], r["end"], r["lag"], r["owner"])
                for r in detail["partitions"]]
        assert rows == [(results, 0, 2, 5, 3, "kv-reader-1"), (results, 1, 3, 3, 0, "kv-reader-1"),
                        (results, 2, None, 0, 0, "kv-reader-1"), (results, 3, None, 2, 2, "kv-reader-1")]
    finally:
        consumer.close()
    after = _one(settings, f"/api/kafka/groups/{group}")
    assert after["state"] == "empty" and after["members"] == [] and after["lag"] == 5
    assert {r["owner"] for r in after["partitions"]} == {None}


@pytest.mark.parametrize("path, reason", [
    ("/api/kafka/topics/nope", "no topic 'nope'"),
    ("/api/kafka/topics/nope/messages", "no topic 'nope'"),
    ("/api/kafka/topics/images/messages?partition=9", "has partitions 0 to 3, not 9"),
    ("/api/kafka/topics/images/messages?partition=x", "partition is a whole number"),
    ("/api/kafka/topics/images/messages?partition=0&offset=abc", "offset is a whole number from 0"),
    ("/api/kafka/topics/images/messages?offset=5", "a start offset needs a partition"),
    ("/api/kafka/topics/images/messages?partition=0&offset=99999", "offset 99999 is past the end"),
    ("/api/kafka/topics/images/messages?time=yesterday", "time is ISO 8601"),
    ("/api/kafka/topics/images/messages?time=2026-01-01&offset=1", "not both"),
    ("/api/kafka/topics/images/messages?limit=101", "limit is a whole number from 1 to 100"),
    ("/api/kafka/topics/images/messages?dcid=-3", "dcid is a whole number"),
    ("/api/kafka/topics/images/messages?isolation=dirty", "read_committed or read_uncommitted"),
    ("/api/kafka/topics/images/messages?color=red", "unknown parameter 'color'"),
    ("/api/kafka/groups/never-seen", "no consumer group 'never-seen'"),
])
def test_bad_queries_get_a_400_with_a_one_line_reason(cluster, path, reason):
    settings, _ = cluster
    [(status, body)] = _get(settings, [path])
    assert status == 400 and reason in body["error"] and "\n" not in body["error"], body


def test_a_cluster_that_does_not_answer_is_a_503_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(kafka_views, "TIMEOUT_S", 1.0)
    closed = load_settings(environ={}, bootstrap_servers="127.0.0.1:9", home=tmp_path)
    started = time.monotonic()
    answers = _get(closed, ["/api/kafka/topics", "/api/kafka/topics/images/messages?dcid=7", "/api/kafka/groups",
                            "/api/kafka/groups/analysis"])
    assert time.monotonic() - started < 4 * 1.0 + 6  # each within its bound, and a little for the clients
    for status, body in answers:
        assert status == 503 and body["error"].startswith("Kafka at 127.0.0.1:9: ") and "\n" not in body["error"]


def test_the_views_are_read_only(cluster):
    settings, _ = cluster
    paths = ["/api/kafka/topics", "/api/kafka/topics/images", "/api/kafka/topics/images/messages",
             "/api/kafka/groups", "/api/kafka/groups/kv-readers"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert {status for status, _ in _get(settings, paths, method)} == {405}
