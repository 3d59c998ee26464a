"""Consumer-group lag as the monitor and the dashboard measure it, on a real broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest

from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.lag import GroupLag
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from tests.helpers.harness import free_port_pair, service_env

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
        assert (fresh.end, fresh.committed, fresh.lag, fresh.members) == (40, 0, 40, 0)

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
