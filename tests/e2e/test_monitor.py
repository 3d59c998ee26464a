"""The process monitor: its scaling policy alone, then a burst through real workers it starts and stops."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from beamstream.operations.scaling import ScalingMemory, ScalingPolicy, decide, workers_for
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.metrics import METRICS_PORT_ENV
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.keys import image_key
from tests.helpers.harness import ServiceProcess, TopicReader, free_port_pair
from tests.helpers.metrics_helpers import scrape, value

POLICY = ScalingPolicy(min_workers=1, max_workers=4, lag_per_worker=100, scale_down_after_s=30.0,
                       growth_intervals=3)


# -- the policy ------------------------------------------------------------------------
@pytest.mark.parametrize(("lag", "workers"), [(0, 1), (1, 1), (100, 1), (101, 2), (350, 4), (10_000, 4)])
def test_workers_for_the_lag_within_bounds(lag, workers):
    assert workers_for(POLICY, lag) == workers


def test_scales_up_at_once_and_down_one_at_a_time_after_the_delay():
    memory = ScalingMemory()
    up = decide(POLICY, memory, workers=1, lag=350, new_dead_letters=0, now=0.0)
    assert (up.code, up.target) == ("scale_up", 4)
    # The lag is gone, but not for long enough: nobody is stopped yet.
    assert decide(POLICY, memory, 4, 0, 0, now=10.0).code is None
    assert decide(POLICY, memory, 4, 0, 0, now=29.0).code is None
    down = decide(POLICY, memory, 4, 0, 0, now=31.0)
    assert (down.code, down.target) == ("scale_down", 3)
    # The next one waits a full delay again.
    assert decide(POLICY, memory, 3, 0, 0, now=40.0).code is None
    assert decide(POLICY, memory, 3, 0, 0, now=62.0).target == 2


def test_a_returning_lag_resets_the_scale_down_clock():
    memory = ScalingMemory()
    decide(POLICY, memory, 2, 150, 0, now=0.0)
    decide(POLICY, memory, 2, 0, 0, now=20.0)
    decide(POLICY, memory, 2, 180, 0, now=25.0)  # two workers needed again
    assert decide(POLICY, memory, 2, 0, 0, now=50.0).code is None
    assert decide(POLICY, memory, 2, 0, 0, now=56.0).code == "scale_down"


def test_never_below_the_minimum_nor_above_the_maximum():
    memory = ScalingMemory()
    assert decide(POLICY, memory, 0, 0, 0, now=0.0).target == 1
    assert decide(POLICY, memory, 4, 99_999, 0, now=1.0).code is None


def test_growing_lag_and_dead_letters_are_warned_about():
    memory = ScalingMemory()
    codes = []
    for step, lag in enumerate((500, 600, 700, 800, 900, 1000, 1100)):
        codes.append([a.code for a in decide(POLICY, memory, 4, lag, 0, now=float(step)).warnings])
    # Grown for 3 intervals at steps 3 and 6, at the maximum of workers each time.
    assert codes == [[], [], [], ["lag_at_max"], [], [], ["lag_at_max"]]
    shrinking = decide(POLICY, memory, 4, 50, 2, now=10.0)
    assert [a.code for a in shrinking.warnings] == ["dead_letters"]
    assert "2 new dead letters" in shrinking.warnings[0].message


def test_bad_bounds_are_named():
    with pytest.raises(ValueError, match="--max-workers"):
        ScalingPolicy(min_workers=3, max_workers=2).check()
    with pytest.raises(ValueError, match="--lag-per-worker"):
        ScalingPolicy(lag_per_worker=0).check()


# -- a burst through real processes ----------------------------------------------------------
ROWS, COLUMNS = 20, 30  # 600 images
N_IMAGES = ROWS * COLUMNS
DCID = 910001
GRID = {"rows": ROWS, "columns": COLUMNS, "step_x_um": 10.0, "step_y_um": 10.0,
        "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": False, "plane": "xy"}


@pytest.mark.kafka
@pytest.mark.slow
def test_a_burst_scales_workers_up_then_down_and_every_image_has_one_result(kafka_settings, tmp_path):
    settings = kafka_settings
    reader = TopicReader(settings, ["monitor", "results", "summaries"])
    metrics_port = free_port_pair()
    # 50 ms per image (sleeping): one worker does 20 images/s, so the burst waits for more.
    # The port comes by environment, as deployed: the workers it starts must not inherit it.
    monitor = ServiceProcess(
        settings, tmp_path, "monitor", "--min-workers", "1", "--max-workers", "3", "--lag-per-worker", "40",
        "--interval", "1", "--scale-down-after", "4", "--json", "--worker-args",
        "--analysis noop --simulated-analysis-time 0.05 --threads 3 --summary-timeout 30 --log-level warning",
        command="monitor", env={METRICS_PORT_ENV: str(metrics_port)}).start()
    try:
        reader.wait_for(lambda: reader.values("monitor"), 60, "the monitor's first observation")
        time.sleep(8)  # the first worker joins its consumer groups
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_started(DCID, file_template="/data/burst_######.cbf",
                                                  number_of_images=N_IMAGES, experiment_type="grid", grid=GRID)])
            for first in range(1, N_IMAGES + 1, 100):
                publisher.publish([image_arrived(DCID, n, f"/data/burst_{n:06d}.cbf")
                                   for n in range(first, first + 100)])
            publisher.publish([collection_ended(DCID, N_IMAGES)])
        poison = make_producer(settings)
        poison.produce(topic_name(settings, "images"), b"\x00not an image event", image_key(DCID, 0))
        poison.flush(10)

        def decisions() -> list[dict]:
            return [e for e in reader.values("monitor", "MonitorEvent") if e["kind"] == "decision"]

        reader.wait_for(lambda: any(d["code"] == "scale_up" and d["target_workers"] == 3 for d in decisions()),
                        60, "a scale-up to 3 workers")
        reader.wait_for(lambda: len({r["image_number"] for r in reader.values("results", "ImageResult", DCID)})
                        >= N_IMAGES, 120, "every image's result")
        reader.wait_for(lambda: any(d["code"] == "scale_down" and d["target_workers"] == 1 for d in decisions()),
                        60, "the scale-down back to 1 worker")
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", DCID), 60, "the summary")
        time.sleep(2)  # anything duplicated would be committed by now
        samples = scrape(metrics_port)
    finally:
        code = monitor.terminate(timeout=120)
        reader.close()
    assert code == 0, monitor.log_text()[-3000:]

    results = reader.values("results", "ImageResult", DCID)
    counts = Counter(r["image_number"] for r in results)
    assert sorted(counts) == list(range(1, N_IMAGES + 1))
    assert max(counts.values()) == 1, f"analysed twice: {[n for n, c in counts.items() if c > 1][:20]}"
    assert len({r["worker_id"] for r in results}) >= 2, "the burst was shared by the started workers"
    [summary] = reader.values("summaries", "CollectionSummary", DCID)
    assert summary["status"] == "complete" and summary["images_analysed"] == N_IMAGES

    events = reader.values("monitor", "MonitorEvent")
    ups = [e for e in events if e["code"] == "scale_up"]
    downs = [e for e in events if e["code"] == "scale_down"]
    assert ups[0]["lag"] > 40 and ups[0]["workers"] == 1
    assert [d["target_workers"] for d in downs] == [2, 1]  # one at a time
    assert max(e["workers"] for e in events) == 3  # never above the maximum
    assert any(e["code"] == "dead_letters" and e["kind"] == "warning" for e in events)
    # Counted as records: the one poison event, however many transactions and markers it took.
    assert sum(e["new_dead_letters"] for e in events if e["kind"] != "warning") == 1
    assert events[-1]["message"] == "monitor stopped"
    # Its Prometheus endpoint counts the same decisions and warnings, and shows the pool as it is now.
    assert value(samples, "beamstream_monitor_events_total", kind="decision", code="scale_up") == len(ups)
    assert value(samples, "beamstream_monitor_events_total", kind="decision", code="scale_down") == 2
    assert value(samples, "beamstream_monitor_dead_letters_seen_total") == 1
    assert value(samples, "beamstream_monitor_workers") == 1
    assert value(samples, "beamstream_monitor_lag") < 40
    # The monitor's own lines on stdout are the same events, as JSON.
    assert '"code": "scale_up"' in monitor.log_text()
