"""`beamstream replay`: retained events back onto their topic, counted, filtered, marked (a real broker)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from beamstream.platform.retained import offset_bounds, open_reader, partitions_of, read_topic
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, image_arrived
from beamstream.producers.replay import ReplayError, plan_replay
from tests.helpers.cli_run import one_line_error, run_cli

pytestmark = pytest.mark.kafka


def _ends(settings, topic: str) -> dict[int, int]:
    consumer = open_reader(settings)
    try:
        return {p: end for p, (_, end) in offset_bounds(consumer, topic, partitions_of(consumer, topic)).items()}
    finally:
        consumer.close()


def test_replay_counts_filters_marks_and_refuses_empty_ranges(kafka_settings):
    settings = kafka_settings
    images = topic_name(settings, "images")
    with EventPublisher(settings) as publisher:
        publisher.publish([image_arrived(10, n, f"/data/a_{n:04d}.cbf") for n in range(1, 6)])
        publisher.publish([image_arrived(11, n, f"/data/b_{n:04d}.cbf") for n in range(1, 4)])
        time.sleep(0.05)
        between = datetime.now(UTC)
        time.sleep(0.05)
        publisher.publish([image_arrived(12, n, f"/data/c_{n:04d}.cbf") for n in range(1, 3)])
    originals = list(read_topic(settings, images))
    ends = _ends(settings, images)

    # dry run: counts per partition, nothing written
    plan = plan_replay(settings, "images", from_offset=0)
    assert plan.total == 10 and plan.topic == images
    assert plan.counts == dict(Counter(r.partition for r in originals))
    dry = run_cli(settings, "replay", "--topic", "images", "--from-offset", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 10 event(s) would be replayed" in dry.stdout
    for partition, count in plan.counts.items():
        assert any(line.split()[:1] == [str(partition)] and line.split()[-1] == str(count)
                   for line in dry.stdout.splitlines())
    assert plan_replay(settings, images, from_time=between).total == 2  # by time, full name
    assert plan_replay(settings, "images", from_offset=0, to_time=between).total == 8
    assert _ends(settings, images) == ends

    # without a terminal and without --yes: refused, nothing written
    assert "pass --yes" in one_line_error(run_cli(settings, "replay", "--topic", "images", "--from-offset", "0"))
    assert _ends(settings, images) == ends

    # one collection, by key
    done = run_cli(settings, "replay", "--topic", "images", "--from-offset", "0", "--dcid", "10", "--yes")
    assert done.returncode == 0, done.stderr
    assert "replayed 5 event(s)" in done.stdout
    replayed = [r for r in read_topic(settings, images) if r.offset >= ends[r.partition]]
    assert len(replayed) == 5 and {r.key.split(b":")[0] for r in replayed} == {b"10"}
    source = {(r.partition, r.offset): r for r in originals}
    for record in replayed:
        headers = dict(record.headers)
        assert headers["beamstream-replayed"] == b"1"
        topic, partition, offset = headers["beamstream-replayed-from"].decode().rsplit(":", 2)
        original = source[(int(partition), int(offset))]
        assert topic == images and record.value == original.value and record.partition == original.partition

    # an empty range: one line, nothing written
    ends = _ends(settings, images)
    for args in (("--from-time", "2099-01-01T00:00:00Z"), ("--from-offset", "0", "--dcid", "999"),
                 ("--from-offset", "5", "--to-offset", "5")):
        error = one_line_error(run_cli(settings, "replay", "--topic", "images", *args, "--yes"))
        assert "no events" in error and "nothing written" in error
    assert "no declared topic 'imagez'" in one_line_error(
        run_cli(settings, "replay", "--topic", "imagez", "--from-offset", "0"))
    assert _ends(settings, images) == ends
    with pytest.raises(ReplayError, match="no events of dcid 999"):
        plan_replay(settings, "images", from_offset=0, dcid=999)
