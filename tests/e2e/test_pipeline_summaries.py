"""Group processing through real workers: progress, X-ray centre, 3D centre, data-reduction request.

Results are published straight onto the results topic (the analysis is tested
elsewhere), so the expected heat maps and centres are known exactly.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.lag import GroupLag
from beamstream.platform.topics import group_name, topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.examples import example_event
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde
from tests.helpers.harness import ServiceProcess, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROWS, COLUMNS = 3, 4


def grid(plane: str) -> dict:
    return {"rows": ROWS, "columns": COLUMNS, "step_x_um": 10.0, "step_y_um": 20.0,
            "origin_x_mm": 1.0, "origin_y_mm": 2.0, "snaked": False, "plane": plane}


def publish_results(settings, dcid: int, spots: list[int]) -> None:
    serde = make_serde()
    topic = topic_name(settings, "results")
    producer = make_producer(settings)
    for image, count in enumerate(spots, start=1):
        result = example_event("ImageResult")
        result.update(dcid=dcid, image_number=image, n_spots_no_ice=count, n_spots_total=count,
                      estimated_d_min=2.0 + image / 100, result_time=datetime.now(UTC))
        producer.produce(topic, serde.encode("ImageResult", result, topic), dcid_key(dcid))
    producer.flush(10)


def wait_until_collected(settings, logical_topic: str, timeout_s: float = 120) -> None:
    """Until the workers' collect stage has committed everything on the topic."""
    lag = GroupLag(settings)
    topic, group = topic_name(settings, logical_topic), group_name(settings, "collect")
    deadline = time.monotonic() + timeout_s
    try:
        while lag.events_between(topic, lag.committed_offsets(group, topic), lag.end_offsets(topic)):
            assert time.monotonic() < deadline, f"the collect stage left events on {logical_topic}"
            time.sleep(0.2)
    finally:
        lag.close()


def test_orthogonal_grids_rotation_and_progress(kafka_settings, tmp_path):
    settings = kafka_settings
    reader = TopicReader(settings, ["announce", "summaries", "requests"])
    worker = ServiceProcess(settings, tmp_path, "w", "--analysis", "noop", "--summary-timeout", "5",
                           "--log-level", "warning").start()
    # xy scan: the peak at row 1, column 2 with equal neighbours left and right
    xy_spots = [0, 0, 0, 0,
                0, 10, 20, 10,
                0, 0, 0, 0]
    # xz scan: the peak at row 2, column 1
    xz_spots = [0, 0, 0, 0,
                0, 0, 0, 0,
                0, 30, 0, 0]
    try:
        publisher = EventPublisher(settings)
        for dcid, plane in ((901, "xy"), (902, "xz")):
            publisher.publish([collection_started(dcid, file_template="/d/g_####.cbf", number_of_images=ROWS * COLUMNS,
                                                  experiment_type="grid", grid=grid(plane), sample_id=55)])
        # The rotation's results are taken in before its start event (the collect stage reads two
        # topics, so it can see them in that order anyway): counted, announced once it starts, summarised.
        publish_results(settings, 903, [5, 6, 7, 8, 9, 10])
        wait_until_collected(settings, "results")
        publisher.publish([collection_started(903, file_template="/d/r_####.cbf", number_of_images=6,
                                              experiment_type="rotation")])
        publish_results(settings, 901, xy_spots)
        publish_results(settings, 902, xz_spots)
        publisher.publish([collection_ended(d, n) for d, n in ((901, 12), (902, 12), (903, 6))])
        # The announce topic is read independently of the summaries: wait for its last word too.
        reader.wait_for(lambda: len(reader.values("summaries", "CollectionSummary")) >= 3
                        and reader.values("summaries", "SampleCentre")
                        and any(a["images_analysed"] == 6
                                for a in reader.values("announce", "CollectionProgress", 903)),
                        180, "three summaries, a 3D centre and the rotation's last progress announcement")
    finally:
        assert worker.terminate() == 0
        reader.close()

    summaries = {s["dcid"]: s for s in reader.values("summaries", "CollectionSummary")}
    assert len(reader.values("summaries", "CollectionSummary")) == 3
    xy = summaries[901]
    assert xy["status"] == "complete" and xy["heat_map"] == xy_spots
    assert (xy["xray_centre"]["centre_row"], xy["xray_centre"]["centre_column"]) == (1.0, 2.0)
    assert xy["xray_centre"]["centre_x_mm"] == pytest.approx(1.0 + 2 * 0.010)
    assert xy["xray_centre"]["centre_y_mm"] == pytest.approx(2.0 + 1 * 0.020)
    assert xy["best_image"] == 7
    [centre] = reader.values("summaries", "SampleCentre")
    assert centre["sample_id"] == 55 and (centre["xy_dcid"], centre["xz_dcid"]) == (901, 902)
    assert centre["x_mm"] == pytest.approx((1.02 + 1.01) / 2)  # x seen by both scans: their mean
    assert centre["y_mm"] == pytest.approx(2.02) and centre["z_mm"] == pytest.approx(2.04)

    rotation = summaries[903]
    assert rotation["data_reduction_requested"] and rotation["xray_centre"] is None
    [request] = reader.values("requests", "ProcessingRequest", 903)
    assert request["kind"] == "data_reduction" and request["image_ranges"] == [{"start": 1, "end": 6}]
    progress = reader.values("announce", "CollectionProgress", 903)
    assert progress and progress[-1]["images_analysed"] == 6
    for dcid in (901, 902):  # every image announced, the last word equal to the summary's
        assert reader.values("announce", "CollectionProgress", dcid)[-1]["images_analysed"] == 12


def test_a_quiet_collection_waits_for_images_still_being_analysed(kafka_settings, tmp_path):
    """Each image takes 3 s, the summary timeout is 1 s: the collection is quiet for longer than
    the timeout between results, yet its summary waits for every image announced (image 4 never is)."""
    settings = kafka_settings
    dcid = 904
    reader = TopicReader(settings, ["results", "summaries"])
    worker = ServiceProcess(settings, tmp_path, "w", "--analysis", "noop", "--simulated-analysis-time", "3",
                           "--summary-timeout", "1", "--log-level", "info").start()
    try:
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_started(dcid, file_template="/d/q_####.cbf", number_of_images=4,
                                                  experiment_type="rotation")])
            publisher.publish([image_arrived(dcid, n, f"/d/q_{n:04d}.cbf") for n in (1, 2, 3)])
            publisher.publish([collection_ended(dcid, 4)])
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", dcid), 120, "the summary")
        time.sleep(2)  # a second summary would be committed by now
    finally:
        assert worker.terminate() == 0
        reader.close()
    [summary] = reader.values("summaries", "CollectionSummary", dcid)
    assert summary["status"] == "incomplete", summary
    assert summary["images_analysed"] == 3 and summary["missing_images"] == [4]
    results = reader.values("results", "ImageResult", dcid)
    assert sorted(r["image_number"] for r in results) == [1, 2, 3]
    # Published after the last result, not during one of the quiet spells between them.
    assert summary["event_time"] >= max(r["result_time"] for r in results)
    assert "waiting for images still being analysed" in worker.log_text()
