"""An image event published twice gets one result (issue 12: producers publish at least once).

Real workers on a real broker. The same ImageArrived events (the same bytes) are published again in
a second transaction at once, again after their results are committed, and again after the worker
that answered them was killed with SIGKILL and replaced (its answered-images table restored from
the changelog): each image gets exactly one result and the collection one summary counting each
image once. A dead-lettered image is analysed when reinjected (and its copy skipped afterwards);
a replayed image is analysed again on purpose, and the collect stage still counts it once.
"""

from __future__ import annotations

import bz2
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from beamstream.platform.lag import GroupLag
from beamstream.platform.retained import read_topic
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.streams.answered_images import AnsweredChunk
from tests.helpers.cli_run import run_cli
from tests.helpers.faults import record_fault
from tests.helpers.harness import ServiceProcess, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SKIPPED = "image already answered, copy skipped"


def wait_until_analysed(settings, timeout_s: float = 90) -> None:
    """Until the analysis group has committed every event on the images topic."""
    lag = GroupLag(settings)
    topic, group = topic_name(settings, "images"), group_name(settings, "analysis")
    deadline = time.monotonic() + timeout_s
    try:
        while lag.events_between(topic, lag.committed_offsets(group, topic), lag.end_offsets(topic)):
            assert time.monotonic() < deadline, "the analysis group left image events uncommitted"
            time.sleep(0.2)
    finally:
        lag.close()


def skipped_copies(*workers: ServiceProcess) -> Counter:
    """(dcid, image) -> copies the workers' logs say they skipped."""
    skipped: Counter = Counter()
    for worker in workers:
        for line in worker.log_text().splitlines():
            if SKIPPED in line:
                entry = json.loads(line)
                skipped[(entry["dcid"], entry["image"])] += 1
    return skipped


def answered_in_changelog(settings) -> dict[int, set[int]]:
    """dcid -> images the committed answered-images table holds (latest entry per partition and key)."""
    latest: dict[tuple[int, bytes], bytes | None] = {}
    for record in read_topic(settings, topic_name(settings, "workers-answered-changelog")):
        latest[(record.partition, record.key)] = record.value
    answered: dict[int, set[int]] = {}
    for (_, key), value in latest.items():
        if value is not None:
            answered.setdefault(int(key.split(b":")[0]), set()).update(AnsweredChunk.from_json(value).images)
    return answered


@pytest.mark.fault
def test_an_image_published_twice_gets_one_result_across_a_worker_kill(kafka_settings, tmp_path):
    settings, dcid, n_images = kafka_settings, 760001, 60
    grid = {"rows": 6, "columns": 10, "step_x_um": 10.0, "step_y_um": 10.0, "snaked": True}
    events = {n: image_arrived(dcid, n, f"/data/dup_{n:06d}.cbf") for n in range(1, n_images + 1)}
    reader = TopicReader(settings, ["results", "summaries", "deadletter"])
    args = ("--analysis", "noop", "--threads", "3", "--summary-timeout", "30", "--log-level", "info")
    first = ServiceProcess(settings, tmp_path, "first", *args).start()
    second = ServiceProcess(settings, tmp_path, "second", *args)
    started = time.monotonic()
    try:
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_started(dcid, file_template="/data/dup_######.cbf",
                                                  number_of_images=n_images, experiment_type="grid", grid=grid)])
            for batch in range(1, 41, 10):  # each batch twice, in two transactions, as a spool replays one
                numbers = range(batch, batch + 10)
                publisher.publish([events[n] for n in numbers])
                publisher.publish([events[n] for n in numbers])
            wait_until_analysed(settings)
            # Committed is not yet read: this reader's group may still be joining (the session's first test).
            reader.wait_for(lambda: len(reader.values("results", "ImageResult", dcid)) >= 40, 60, "40 results")
            assert len(reader.values("results", "ImageResult", dcid)) == 40
            publisher.publish([events[n] for n in range(1, 21)])  # long after their results were committed
            wait_until_analysed(settings)
            assert len(reader.values("results", "ImageResult", dcid)) == 40

            first.kill()  # its partitions, and their answered images, go to the next worker
            killed_at = time.time()
            second.start()
            publisher.publish([events[n] for n in range(21, 61)])
            publisher.publish([events[n] for n in range(41, 61)])
            wait_until_analysed(settings, timeout_s=120)
            publisher.publish([collection_ended(dcid, n_images)])
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", dcid), 90, "the summary")
        time.sleep(3)  # a duplicate result or summary would be committed by now
        print(f"scenario took {time.monotonic() - started:.1f} s")

        counts = Counter(r["image_number"] for r in reader.values("results", "ImageResult", dcid))
        after_kill = [t for t in reader.received_at["results"] if t > killed_at]
        record_fault("image events published twice, worker SIGKILLed", images=n_images,
                     lost=n_images - len(counts), duplicated=sum(c - 1 for c in counts.values()),
                     recovery_s=min(after_kill) - killed_at if after_kill else None)
        assert counts == dict.fromkeys(range(1, n_images + 1), 1)
        [summary] = reader.values("summaries", "CollectionSummary", dcid)
        assert (summary["status"], summary["images_analysed"], summary["missing_images"]) == ("complete", 60, [])
        assert reader.values("deadletter") == []
        skipped = skipped_copies(first, second)
        # 40 copies at once, 20 after their results, 20 after the kill (of images the first worker answered)
        # and 20 of images the second answered; a copy is logged again only if its batch was aborted.
        assert set(skipped) == {(dcid, n) for n in range(1, n_images + 1)}
        assert sum(skipped.values()) >= 100
        assert answered_in_changelog(settings)[dcid] == set(range(1, n_images + 1))
    finally:
        first.kill()
        second.terminate()
        reader.close()


def _thaumatin(data_dir: Path, number: int, target: Path) -> Path:
    target.write_bytes(bz2.decompress((data_dir / "thaumatin_grid" / f"thau_3_2_{number:04d}.cbf.bz2").read_bytes()))
    return target


def test_reinjected_dead_letters_and_replays_are_analysed_and_counted_once(kafka_settings, data_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    settings = load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4, data_roots=(str(root),))
    failing, replayed = 770001, 770002
    grid = {"rows": 1, "columns": 3, "step_x_um": 20.0, "step_y_um": 20.0}
    frames = {n: root / f"thau_{n:04d}.cbf" for n in (1, 2, 3)}
    _thaumatin(data_dir, 1, frames[1])
    _thaumatin(data_dir, 2, frames[2])  # frame 3 is "not written yet"
    events = {(dcid, n): image_arrived(dcid, n, str(frames[n])) for dcid in (failing, replayed) for n in (1, 2, 3)}
    reader = TopicReader(settings, ["results", "summaries", "deadletter"])
    worker = ServiceProcess(settings, tmp_path, "worker", "--analysis", "real", "--retries", "1",
                            "--summary-timeout", "30", "--log-level", "info").start()
    try:
        with EventPublisher(settings) as publisher:
            for dcid in (failing, replayed):
                publisher.publish([collection_started(dcid, file_template=str(root / "thau_####.cbf"),
                                                      number_of_images=3, experiment_type="grid", grid=grid)])
            publisher.publish([events[(failing, n)] for n in (1, 2, 3)])
            publisher.publish([events[(replayed, n)] for n in (1, 2)])
            reader.wait_for(lambda: len(reader.values("deadletter")) == 1, 120, "the dead letter of image 3")
            # A copy of the dead-lettered event: not answered, so analysed again (and dead-lettered again).
            publisher.publish([events[(failing, 3)]])
            reader.wait_for(lambda: len(reader.values("deadletter")) == 2, 60, "the copy's dead letter")

            # -- the cause fixed, the first dead letter reinjected: analysed --------------------------------
            _thaumatin(data_dir, 3, frames[3])
            dead_letter_id = json.loads(run_cli(settings, "dlq", "list", "--json").stdout)[0]["id"]
            done = run_cli(settings, "dlq", "reinject", dead_letter_id, "--yes")
            assert done.returncode == 0, done.stderr
            reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", failing), 60, "the summary")
            publisher.publish([events[(failing, 3)]])  # a copy after the reinjected event's result: skipped

            # -- a replay is analysed again; the collect stage counts its images once ----------------------
            wait_until_analysed(settings)
            assert len(reader.values("results", "ImageResult", replayed)) == 2
            done = run_cli(settings, "replay", "--topic", "images", "--from-offset", "0", "--dcid", str(replayed),
                           "--yes")
            assert done.returncode == 0 and "replayed 2 event(s)" in done.stdout, done.stderr
            reader.wait_for(lambda: len(reader.values("results", "ImageResult", replayed)) == 4, 60,
                            "the replayed images' results")
            publisher.publish([events[(replayed, 1)]])  # a plain copy after the replay: skipped
            publisher.publish([events[(replayed, 3)]])
            reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", replayed), 60, "the summary")
            wait_until_analysed(settings)
        time.sleep(3)  # a duplicate result or summary would be committed by now

        failing_results = reader.values("results", "ImageResult", failing)
        assert Counter(r["image_number"] for r in failing_results) == {1: 1, 2: 1, 3: 1}
        assert [d["image_number"] for d in reader.values("deadletter")] == [3, 3]
        replayed_results = reader.values("results", "ImageResult", replayed)
        assert Counter(r["image_number"] for r in replayed_results) == {1: 2, 2: 2, 3: 1}
        for dcid, results in ((failing, failing_results), (replayed, replayed_results)):
            [summary] = reader.values("summaries", "CollectionSummary", dcid)
            assert (summary["status"], summary["images_analysed"]) == ("complete", 3)
            once = {r["image_number"]: r["n_spots_no_ice"] for r in results}  # the analysis is deterministic
            assert summary["total_spots"] == sum(once.values()) > 0
        assert skipped_copies(worker) == {(failing, 3): 1, (replayed, 1): 1}
    finally:
        assert worker.terminate() == 0
        reader.close()
