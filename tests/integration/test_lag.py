"""Consumer-group lag as the monitor and the dashboard measure it, on a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import TopicPartition

from beamstream.dashboard import feed
from beamstream.dashboard.server import DashboardServer
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.lag import EXACT_WITHIN, GroupLag
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from tests.helpers.harness import ServiceProcess, TopicReader, free_port_pair, service_env, wait_until

pytestmark = pytest.mark.kafka


def test_lag_counts_what_the_group_has_not_committed(kafka_settings):
    settings = kafka_settings
    topic = topic_name(settings, "images")
    producer = make_producer(settings)
    for n in range(40):
        producer.produce(topic, b"x", f"{n}".encode(), partition=n % settings.image_partitions)
    producer.flush(10)
    group = f"{settings.topic_prefix}lag-test-{uuid.uuid4().hex[:8]}"
    lag = GroupLag(settings)
    try:
        fresh = lag.progress(group, topic, timeout_s=15)
        assert (fresh.end, fresh.committed, fresh.lag, fresh.members) == (40, 0, 40, 0)  # 10 a partition: counted

        consumer = make_consumer(settings, group)
        consumer.subscribe([topic])
        taken = []
        while len(taken) < 15:
            message = consumer.poll(1.0)
            if message is not None and not message.error():
                taken.append(message)
        consumer.commit(asynchronous=False)  # commits the position: everything fetched by poll so far
        committed = sum(tp.offset for tp in consumer.committed(consumer.assignment(), timeout=10) if tp.offset > 0)
        during = lag.progress(group, topic)
        assert during.committed == committed and during.lag == 40 - committed
        assert during.members == 1
        consumer.close()
        assert lag.progress(group, topic).members == 0
    finally:
        lag.close()


def test_events_between_skips_transaction_markers_and_aborted_events(kafka_settings):
    settings = kafka_settings
    topic = topic_name(settings, "images")
    writer = make_producer(settings, transactional_id=f"{settings.topic_prefix}lag-test")
    for n in range(3):  # offsets 0, 2, 4 with commit markers at 1, 3, 5
        writer.begin_transaction()
        writer.produce(topic, f"event {n}".encode(), partition=0)
        writer.commit_transaction(10)
    writer.begin_transaction()  # 6, aborted, and its marker 7
    writer.produce(topic, b"aborted", partition=0)
    writer.flush(10)  # on the broker before the abort
    writer.abort_transaction(10)
    lag = GroupLag(settings)
    try:
        marks = lag.end_offsets(topic)
        assert marks[0] == 8 and all(marks[p] == 0 for p in marks if p != 0)
        group = f"{settings.topic_prefix}lag-test-{uuid.uuid4().hex[:8]}"
        assert lag.committed_offsets(group, topic) == dict.fromkeys(marks, 0)
        assert lag.events_between(topic, {0: 0}, marks)
        assert lag.events_between(topic, {0: 3}, marks)  # event 2 at offset 4
        assert not lag.events_between(topic, {0: 5}, marks)  # a marker, an aborted event, a marker
        assert not lag.events_between(topic, {0: 3}, {0: 4})  # event 2 is at the mark, not before it
        assert not lag.events_between(topic, {0: 8}, marks) and not lag.events_between(topic, {}, marks)
    finally:
        lag.close()


def _consume(consumer, count: int) -> None:
    """Poll until ``count`` events are taken, then commit just past the last one taken of each
    partition, as the engine does (the consumer's position may have moved past a marker already)."""
    taken: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + 30
    for _ in range(count):
        message = None
        while message is None or message.error():
            assert time.monotonic() < deadline, f"fewer than {count} events consumed"
            message = consumer.poll(0.5)
        taken[(message.topic(), message.partition())] = message.offset() + 1
    consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in taken.items()], asynchronous=False)


def test_lag_counts_events_not_transaction_markers(kafka_settings):
    """A group that has consumed every event of partitions written transactionally is one commit
    marker (or an aborted transaction and its markers) short of each end: its lag is 0, and N events
    written after are a lag of N."""
    settings = kafka_settings
    topic = topic_name(settings, "images")
    partitions = range(settings.image_partitions)
    writer = make_producer(settings, transactional_id=f"{settings.topic_prefix}lag-markers")
    for n in range(3):  # an event per partition per transaction: each partition has 3 events, 3 markers
        writer.begin_transaction()
        for p in partitions:
            writer.produce(topic, f"event {n}".encode(), partition=p)
        writer.commit_transaction(10)
    writer.begin_transaction()  # an aborted event and its marker on partition 0
    writer.produce(topic, b"aborted", partition=0)
    writer.flush(10)
    writer.abort_transaction(10)
    group = f"{settings.topic_prefix}lag-markers-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(settings, group)
    consumer.subscribe([topic])
    lag = GroupLag(settings)
    try:
        _consume(consumer, 3 * len(partitions))
        # The coordinator writes a transaction's markers after commit_transaction and abort_transaction
        # return, and a partition's read_committed end moves only then: wait for the abort's marker.
        wait_until(lambda: lag.progress(group, topic, timeout_s=15).end == 3 * 2 * len(partitions) + 2, 15,
                   "the aborted transaction's marker")
        done = lag.progress(group, topic)
        # Offsets alone: the last commit marker of every partition, and partition 0's aborted event and marker.
        assert done.end - done.committed == len(partitions) + 2
        assert done.lag == 0 and done.members == 1

        writer.begin_transaction()  # 5 events in one transaction: 2 on partition 0, one on each other
        for p in [0, *partitions]:
            writer.produce(topic, b"late", partition=p)
        writer.commit_transaction(10)
        counted = []
        wait_until(lambda: counted.append(lag.progress(group, topic).lag) or counted[-1] == 5, 15,
                   "a lag of 5")
        assert max(counted) == 5  # never more than the events written
        _consume(consumer, 2)
        assert lag.progress(group, topic).lag == 3

        # Far behind (more than EXACT_WITHIN offsets), the offsets are the lag: a marker more is noise there.
        for _ in range(EXACT_WITHIN):
            writer.begin_transaction()
            writer.produce(topic, b"far", partition=1)
            writer.commit_transaction(10)
        far = lag.progress(group, topic)
        partition_1 = lag.end_offsets(topic)[1] - lag.committed_offsets(group, topic)[1]
        assert partition_1 > EXACT_WITHIN and far.lag >= 3 - 1 + partition_1
    finally:
        consumer.close()
        lag.close()


def test_a_finished_collection_lags_zero_in_the_monitor_and_the_dashboard(kafka_settings, tmp_path, monkeypatch):
    """A real worker analyses a grid scan written transactionally over every partition: the analysis
    group's lag on images is 0 for GroupLag and for the dashboard's /api/pipeline; 3 images published
    while it is stopped are a lag of 3 for both."""
    settings = kafka_settings
    monkeypatch.setattr(feed, "LAG_INTERVAL_S", 0.5)  # the dashboard measures every half second
    topic, group = topic_name(settings, "images"), group_name(settings, "analysis")
    grid = {"rows": 4, "columns": 6, "step_x_um": 10.0, "step_y_um": 10.0, "origin_x_mm": 0.0, "origin_y_mm": 0.0,
            "snaked": False, "plane": "xy"}
    reader = TopicReader(settings, ["summaries"])
    worker = ServiceProcess(settings, tmp_path, "w", "--analysis", "noop", "--summary-timeout", "5",
                           "--log-level", "warning").start()
    lag = GroupLag(settings)
    try:
        with DashboardServer(settings, "127.0.0.1", 0) as dashboard, EventPublisher(settings) as publisher:
            publisher.publish([collection_started(7001, file_template="/d/g_######.cbf", number_of_images=24,
                                                  experiment_type="grid", grid=grid)])
            for first in (1, 9, 17):  # three transactions, each over every partition
                publisher.publish([image_arrived(7001, n, f"/d/g_{n:06d}.cbf") for n in range(first, first + 8)])
            publisher.publish([collection_ended(7001, 24)])
            reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", 7001), 90, "the summary")
            # The summary follows every result, and each result was committed with its image's offset.
            finished = lag.progress(group, topic, timeout_s=15)
            ends = lag.end_offsets(topic)
            assert all(ends.values()), f"a partition the collection did not write: {ends}"
            assert finished.end - finished.committed >= len(ends)  # the markers, which are not events
            assert finished.lag == 0
            assert _dashboard_lag(dashboard, since=time.time()) == 0

            assert worker.terminate() == 0
            publisher.publish([image_arrived(7002, n, f"/d/h_{n:06d}.cbf") for n in (1, 2, 3)])
            assert lag.progress(group, topic).lag == 3
            assert _dashboard_lag(dashboard, since=time.time()) == 3
    finally:
        worker.terminate()
        lag.close()
        reader.close()


def _dashboard_lag(dashboard: DashboardServer, since: float) -> int:
    """The analysis group's lag on images from the dashboard's JSON API, measured after ``since``
    (its age is rounded to 0.1 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(dashboard.url + "api/pipeline", timeout=10) as response:
            body = json.load(response)
        for row in body["lags"]:
            if (row["group"], row["topic"]) == ("analysis", "images") and time.time() - row["age_s"] > since + 0.1:
                return row["lag"]
        time.sleep(0.2)
    raise AssertionError("the dashboard measured no lag of analysis on images in 30 s")


def test_groups_measured_while_a_new_broker_loads_its_coordinator(tmp_path):
    """librdkafka's admin ListConsumerGroupOffsets dies with SIGSEGV when the coordinator answers
    NOT_COORDINATOR, as a broker just started does while it loads its offsets topic (librdkafka#5040;
    it crashed 3 runs of 3 of this script's earlier form). GroupLag must measure through that.
    A broker of its own, just started, and a process of its own, so that a crash fails this test only."""
    settings = load_settings(environ={}, home=tmp_path / "home", local_kafka_port=free_port_pair())
    cluster = LocalCluster(settings)
    cluster.up(progress=False)
    script = textwrap.dedent("""
        import uuid
        from beamstream.platform.lag import GroupLag
        from beamstream.platform.settings import load_settings
        from beamstream.platform.topics import apply_topics, topic_name
        settings = load_settings()
        apply_topics(settings)
        lag = GroupLag(settings)
        for _ in range(12):
            group = f"never-seen-{uuid.uuid4().hex[:8]}"
            print(lag.progress(group, topic_name(settings, "images"), timeout_s=15).lag)
        lag.close()
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], env=service_env(settings), capture_output=True,
                              text=True, timeout=300)
    finally:
        cluster.down()
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["0"] * 12
