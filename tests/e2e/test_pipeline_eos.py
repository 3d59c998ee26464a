"""Exactly-once under failure: real workers, a real broker, kill -9, broker restarts, rebalances.

Each test publishes a grid scan of several hundred images at a detector-like
rate while workers are killed, the broker restarts or a worker joins and leaves,
and then checks with read_committed readers that

* every image has exactly one result,
* the collection table's last committed state equals a fresh fold of all results,
* exactly one summary was published, complete, after the last image.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.streams import collection_state as cs
from tests.helpers.faults import longest_pause, record_fault
from tests.helpers.harness import ServiceProcess, Supervisor, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.fault]

ROWS, COLUMNS = 15, 20  # 300 images
N_IMAGES = ROWS * COLUMNS
GRID = {"rows": ROWS, "columns": COLUMNS, "step_x_um": 10.0, "step_y_um": 10.0,
        "origin_x_mm": 1.0, "origin_y_mm": 2.0, "snaked": True, "plane": "xy"}
WORKER_ARGS = ("--analysis", "noop", "--threads", "3", "--summary-timeout", "45", "--log-level", "warning")


@pytest.fixture
def settings(kafka_settings):
    return kafka_settings


def publish_gridscan(settings, dcid: int, rate_hz: float, batch: int = 5) -> threading.Thread:
    """Announce a grid scan and its images at ``rate_hz`` from a background thread, then its end."""
    def run() -> None:
        publisher = EventPublisher(settings)
        publisher.publish([collection_started(dcid, file_template="/data/grid_######.cbf",
                                              number_of_images=N_IMAGES, experiment_type="grid", grid=GRID)])
        for first in range(1, N_IMAGES + 1, batch):
            numbers = range(first, min(first + batch, N_IMAGES + 1))
            publisher.publish([image_arrived(dcid, n, f"/data/grid_{n:06d}.cbf") for n in numbers])
            time.sleep(batch / rate_hz)
        publisher.publish([collection_ended(dcid, N_IMAGES)])
        publisher.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def changelog_topic(settings) -> str:
    return f"{settings.topic_prefix}workers-collections-changelog"


def assert_exactly_once(reader: TopicReader, settings, dcid: int, fault: str | None = None,
                        recovery_s: float | None = None) -> None:
    """The three statements of the module docstring; with ``fault``, what was counted is recorded first."""
    try:
        reader.wait_for(lambda: len(reader.values("summaries", "CollectionSummary", dcid)) >= 1, 150,
                        "the collection summary")
    except AssertionError as exc:
        numbers = [r["image_number"] for r in reader.values("results", "ImageResult", dcid)]
        key = cs.state_key(dcid, None).encode()
        stored = [value for k, value in reader.raw[changelog_topic(settings)] if k == key]
        table = cs.CollectionState.from_json(stored[-1]) if stored else None
        seen = f"table: started={table.started} ended={table.ended} seen={table.n_seen}" if table else "no table state"
        raise AssertionError(f"{exc}; {len(numbers)} results for {len(set(numbers))} distinct images; {seen}") from None
    # This reader's clients reconnect on their own schedule after a broker restart: its fetches of the
    # results partition can resume seconds after those of the summaries. Give them time to catch up
    # (a lost image still fails below), then a little more for any duplicate to be committed.
    try:
        reader.wait_for(lambda: len({r["image_number"] for r in reader.values("results", "ImageResult", dcid)})
                        >= N_IMAGES, 90, "every image's result")
    except AssertionError:
        pass
    time.sleep(3)
    results = reader.values("results", "ImageResult", dcid)
    counts = Counter(r["image_number"] for r in results)
    duplicated = sorted(n for n, c in counts.items() if c > 1)
    missing = sorted(set(range(1, N_IMAGES + 1)) - set(counts))
    if fault is not None:
        record_fault(fault, images=N_IMAGES, lost=len(missing), duplicated=sum(counts[n] - 1 for n in duplicated),
                     recovery_s=longest_pause([at for at, _ in reader.arrivals("results")]) if recovery_s is None
                     else recovery_s)
    assert not duplicated, f"images with more than one result: {duplicated[:20]}"
    if missing:  # lost by the producer or by the workers? The images topic says which.
        announced = {v["image_number"] for v in reader.values("images", "ImageArrived", dcid)}
        lost_after_commit = [n for n in missing if n in announced]
        summary = reader.values("summaries", "CollectionSummary", dcid)[0]
        raise AssertionError(f"images without a result: {missing[:20]} ({len(missing)}); committed on the images "
                             f"topic: {lost_after_commit[:20]} ({len(lost_after_commit)}); the summary says "
                             f"{summary['status']}, {summary['images_analysed']} analysed")
    assert len(results) == N_IMAGES

    summaries = reader.values("summaries", "CollectionSummary", dcid)
    assert len(summaries) == 1, f"{len(summaries)} summaries"
    assert summaries[0]["status"] == "complete"
    assert summaries[0]["images_analysed"] == N_IMAGES

    # The table's last committed state equals a fresh fold of all results.
    key = cs.state_key(dcid, None).encode()
    stored = [value for k, value in reader.raw[changelog_topic(settings)] if k == key]
    assert stored, "no committed table state for the collection"
    table_state = cs.CollectionState.from_json(stored[-1])
    fresh = cs.CollectionState(dcid)
    cs.apply_start(fresh, {"experiment_type": "grid", "number_of_images": N_IMAGES, "grid": GRID})
    for result in reversed(results):  # order must not matter
        cs.apply_result(fresh, result)
    cs.apply_end(fresh, {"event_time": 0.0, "images_collected": N_IMAGES})
    fresh.summarized = True
    assert table_state.comparable() == fresh.comparable()


def _reader(settings) -> TopicReader:
    return TopicReader(settings, ["images", "results", "summaries", "deadletter"], [changelog_topic(settings)])


def _wait_results(reader, dcid, at_least, timeout=120):
    reader.wait_for(lambda: len(reader.values("results", "ImageResult", dcid)) >= at_least, timeout,
                    f"{at_least} results")


def test_kill_minus_nine_mid_collection(settings, tmp_path):
    dcid = 700001
    reader = _reader(settings)
    workers = [ServiceProcess(settings, tmp_path, f"w{i}", *WORKER_ARGS).start() for i in range(2)]
    supervisor = Supervisor(workers)  # restarts the killed worker after 1 s, as systemd would
    try:
        publisher = publish_gridscan(settings, dcid, rate_hz=25)
        for n, threshold in enumerate((40, 110, 180)):
            _wait_results(reader, dcid, threshold)
            workers[n % 2].kill()
        publisher.join(60)
        assert_exactly_once(reader, settings, dcid, "worker SIGKILLed 3 times mid-scan, restarted")
        assert len(supervisor.restarts) >= 3
    finally:
        supervisor.stop()
        for worker in workers:
            worker.terminate()
        reader.close()


def test_broker_restart_mid_collection(kafka_cluster, settings, tmp_path):
    _, cluster = kafka_cluster
    if cluster is None:
        pytest.skip("the broker is external; the test cannot restart it")
    dcid = 700002
    reader = _reader(settings)
    workers = [ServiceProcess(settings, tmp_path, f"w{i}", *WORKER_ARGS).start() for i in range(2)]
    # A worker whose Kafka client wedges across the restart exits for a restart (the engine's
    # stall watch, beamstream/engine/stage.py); its supervisor starts it again, as systemd or Kubernetes would.
    supervisor = Supervisor(workers)
    try:
        publisher = publish_gridscan(settings, dcid, rate_hz=25)
        _wait_results(reader, dcid, 80)
        cluster.down()
        time.sleep(2)
        cluster.up(progress=False)
        back = time.time()
        publisher.join(120)
        # When the workers produced results again (this reader's own group reconnects later than they do).
        after = [r["result_time"].timestamp() for r in reader.values("results", "ImageResult", dcid)
                 if r["result_time"].timestamp() > back]
        assert_exactly_once(reader, settings, dcid, "single broker restarted mid-scan",
                            recovery_s=min(after) - back if after else None)
    finally:
        supervisor.stop()
        for worker in workers:
            worker.terminate()
        reader.close()


def test_a_third_worker_joins_and_leaves(settings, tmp_path):
    dcid = 700003
    reader = _reader(settings)
    workers = [ServiceProcess(settings, tmp_path, f"w{i}", *WORKER_ARGS).start() for i in range(2)]
    third = ServiceProcess(settings, tmp_path, "w3", *WORKER_ARGS)
    supervisor = Supervisor(workers)
    try:
        publisher = publish_gridscan(settings, dcid, rate_hz=20)
        _wait_results(reader, dcid, 50)
        third.start()
        _wait_results(reader, dcid, 170)
        third.retired = True
        assert third.terminate() == 0, "SIGTERM should stop a worker cleanly"
        publisher.join(60)
        assert_exactly_once(reader, settings, dcid, "a third worker joins and leaves mid-scan")
    finally:
        supervisor.stop()
        for worker in workers:
            worker.terminate()
        third.terminate()
        reader.close()

