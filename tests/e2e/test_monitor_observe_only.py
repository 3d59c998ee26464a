"""``beamstream monitor --observe-only``, as the compose and Kubernetes deployments run it: next to
workers it did not start, it reports what it sees and starts or stops nothing."""

from __future__ import annotations

import json
import time

import pytest

from beamstream.operations.cluster import LocalCluster
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from tests.helpers.faults import record_fault
from tests.helpers.harness import ServiceProcess, TopicReader, free_port_pair

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROWS, COLUMNS = 10, 16  # 160 images
N_IMAGES = ROWS * COLUMNS
DCID = 920001
GRID = {"rows": ROWS, "columns": COLUMNS, "step_x_um": 10.0, "step_y_um": 10.0,
        "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": True, "plane": "xy"}


def _grid_scan(settings: Settings) -> None:
    with EventPublisher(settings) as publisher:
        publisher.publish([collection_started(DCID, file_template="/data/obs_######.cbf", number_of_images=N_IMAGES,
                                              experiment_type="grid", grid=GRID)])
        for first in range(1, N_IMAGES + 1, COLUMNS):  # a transaction per row, as a detector's batches
            publisher.publish([image_arrived(DCID, n, f"/data/obs_{n:06d}.cbf")
                               for n in range(first, first + COLUMNS)])
        publisher.publish([collection_ended(DCID, N_IMAGES)])


def test_observe_only_reports_the_workers_it_sees_and_manages_none(kafka_settings, tmp_path):
    settings = kafka_settings
    reader = TopicReader(settings, ["monitor", "summaries"])
    # 50 ms per image, one at a time: two workers take 160 images in about 4 s, so the lag is seen.
    workers = [ServiceProcess(settings, tmp_path, f"worker{n}", "--analysis", "noop", "--simulated-analysis-time",
                              "0.05", "--threads", "1", "--summary-timeout", "30", "--log-level", "warning").start()
               for n in (1, 2)]
    pids = [w.process.pid for w in workers]
    monitor_logs = settings.home / "logs" / "monitor"  # where it would log workers it started (shared home)
    logs_before = set(monitor_logs.glob("worker*"))
    monitor = ServiceProcess(settings, tmp_path, "monitor", "--observe-only", "--interval", "1",
                             "--lag-per-worker", "20", "--max-workers", "4", "--json", command="monitor").start()
    try:
        def events() -> list[dict]:
            return reader.values("monitor", "MonitorEvent")

        reader.wait_for(lambda: any(e["workers"] == 2 for e in events()), 60, "both workers seen in the group")
        _grid_scan(settings)
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", DCID), 90, "the summary")
        summarised = len(events())
        # Exactly 0: the commit markers at the end of every partition are not images waiting.
        reader.wait_for(lambda: any(e["lag"] == 0 for e in events()[summarised:]), 30, "an observation of lag 0")
        stopped = monitor.terminate(timeout=60)
        reader.wait_for(lambda: events()[-1]["message"] == "monitor stopped", 30, "its last word")
        assert all(w.process.poll() is None for w in workers), "a worker stopped with the monitor"
        assert [w.process.pid for w in workers] == pids
    finally:
        monitor.terminate(timeout=60)
        worker_codes = [w.terminate() for w in workers]
        reader.close()
    assert stopped == 0, monitor.log_text()[-3000:]
    assert worker_codes == [0, 0]

    [summary] = reader.values("summaries", "CollectionSummary", DCID)
    assert summary["status"] == "complete" and summary["images_analysed"] == N_IMAGES
    observed = [e for e in events() if e["code"] != "stopped"]
    during = [e for e in observed if e["lag"] > 0]
    assert during, "no observation saw the images waiting"
    assert all(e["workers"] == 2 for e in observed[observed.index(during[0]):]), \
        [(e["code"], e["workers"]) for e in observed]
    # Arrival and completion rates while the scan went through; the lag exactly 0 once it was done.
    assert max(e["produce_rate_hz"] for e in observed) > 0 and max(e["consume_rate_hz"] for e in observed) > 0
    assert observed[-1]["lag"] == 0
    assert sum(e["new_dead_letters"] for e in observed) == 0
    # It recommends, and does nothing: no worker of its own, no decision acted on.
    decisions = [e for e in observed if e["kind"] == "decision"]
    assert all(d["message"].startswith("recommended: ") for d in decisions)
    assert any(d["code"] == "scale_up" and d["target_workers"] > 2 for d in decisions), \
        [(e["code"], e["lag"], e["target_workers"]) for e in observed]
    assert set(monitor_logs.glob("worker*")) == logs_before
    assert "worker started" not in monitor.log_text() and "worker stopping" not in monitor.log_text()


OUTAGE_S = 30.0


def _printed_events(monitor: ServiceProcess) -> list[dict]:
    """The events the monitor printed (``--json``: one object a line on stdout, among its log lines)."""
    events = []
    for line in monitor.log_text().splitlines():
        if line.startswith("{") and '"monitor_id"' in line:
            events.append(json.loads(line))
    return events


@pytest.mark.fault
def test_observe_only_observes_again_at_once_after_a_kafka_outage(tmp_path):
    """Its lag clients are replaced after failed observations in a row: with the same clients kept
    (12 image partitions), every observation after a 30 s outage failed (TimeoutError, "Local: Timed
    out") for the 90 s watched after the broker was back, while fresh clients measured at once. A
    broker of this test's own; the worker is there to be seen (its own fate is not this test's)."""
    settings = load_settings({}, home=tmp_path / "home", local_kafka_port=free_port_pair(), topic_prefix="obs.")
    cluster = LocalCluster(settings)
    cluster.up(progress=False)
    worker = ServiceProcess(settings, tmp_path, "worker", "--analysis", "noop", "--log-level", "warning")
    monitor = ServiceProcess(settings, tmp_path, "monitor", "--observe-only", "--interval", "1", "--json",
                             command="monitor")
    try:
        apply_topics(settings)
        worker.start()
        monitor.start()
        _wait(lambda: any(e["workers"] == 1 for e in _printed_events(monitor)), 60, "the worker seen", monitor)
        cluster.down()
        down_until = time.monotonic() + OUTAGE_S
        while time.monotonic() < down_until:
            assert monitor.process.poll() is None, f"the monitor exited: {monitor.log_text()[-2000:]}"
            time.sleep(0.5)
        cluster.up(progress=False)
        back, before = time.monotonic(), len(_printed_events(monitor))
        # Observed again within moments (1-2 s here), where it used to fail on for 90 s and more.
        _wait(lambda: any(e["kind"] != "warning" for e in _printed_events(monitor)[before:]), 20,
              "an observation after the outage", monitor)
        recovery_s = time.monotonic() - back
        stopped = monitor.terminate(timeout=60)
    finally:
        monitor.terminate(timeout=60)
        worker.terminate(timeout=60)
        cluster.down()
    record_fault("kafka down 30 s under monitor --observe-only", images=0, lost=0, duplicated=0,
                 recovery_s=recovery_s)
    assert stopped == 0, monitor.log_text()[-3000:]
    after = _printed_events(monitor)[before:]
    assert after[-1]["message"] == "monitor stopped"
    assert "observation failed" in monitor.log_text()  # it did see the outage


def _wait(predicate, timeout: float, what: str, service: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert service.process.poll() is None, f"{service.name} exited: {service.log_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s: {service.log_text()[-3000:]}"
        time.sleep(0.3)
