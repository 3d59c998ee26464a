"""Bluesky in, results back to the plan: a real RunEngine drives a grid scan of ophyd-async simulated motors
and the synthetic EIGER over a crystal at a known position; the run reaches Beamstream through the
in-process callback, or through bluesky-kafka's Publisher and the bluesky-bridge service; a real worker
analyses the NeXus frames, and the plan moves the motors to the X-ray centre it gets back."""

from __future__ import annotations

import copy
import threading
import time
import uuid

import bluesky.plans as bp
import pytest

from beamstream.platform.settings import load_settings
from beamstream.producers.bluesky_beamline import create_document_topic, simulated_beamline
from beamstream.producers.bluesky_callback import BeamstreamCallback
from beamstream.producers.bluesky_detector import CrystalPosition
from beamstream.producers.bluesky_plans import (
    NoXrayCentre,
    Summary,
    SummaryTimeout,
    move_to_xray_centre,
    wait_for_summary,
)
from tests.helpers.bluesky import publisher_for
from tests.helpers.harness import ServiceProcess, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROWS, COLUMNS, STEP_MM = 5, 6, 0.1  # y 0.0..0.4 (rows), x 0.0..0.5 (columns)
CRYSTAL = CrystalPosition(x_mm=0.27, y_mm=0.18, sigma_x_mm=0.1, sigma_y_mm=0.1)


@pytest.fixture
def settings(kafka_settings, tmp_path):
    """The test's topics, its own home (the callback's spool) and data root."""
    (tmp_path / "data").mkdir()
    return load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                         topic_prefix=kafka_settings.topic_prefix, image_partitions=4,
                         data_roots=(str(tmp_path / "data"),))


@pytest.mark.parametrize("path", ["callback", "bluesky-kafka"])
def test_a_grid_scan_plan_gets_the_xray_centre_and_moves_there(settings, tmp_path, path):
    dcid = int(time.time() * 10) % 2_000_000_000
    reader = TopicReader(settings, ["collections", "images", "results", "deadletter"])
    worker = ServiceProcess(settings, tmp_path, "w", "--summary-timeout", "10", "--log-level", "warning").start()
    beamline = simulated_beamline(tmp_path / "data", f"grid_{dcid}", CRYSTAL, seed=3)
    if path == "callback":
        callback = BeamstreamCallback.open(settings)
        beamline.engine.subscribe(callback)
        bridge = None
    else:  # the beamline publishes its documents; the bridge announces the images
        topic = create_document_topic(settings, f"{settings.topic_prefix}{dcid}.bluesky.runengine.documents")
        beamline.engine.subscribe(publisher_for(settings, topic))
        bridge = ServiceProcess(settings, tmp_path, "bridge", "--topic", topic, command="bluesky-bridge").start()
        callback = None
    try:
        started = time.monotonic()
        summary = beamline.scan_and_centre(settings, ROWS, COLUMNS, STEP_MM, dcid=dcid, timeout_s=90,
                                           md={"beamline": "sim"})
        took = time.monotonic() - started
        at = beamline.where()
        reader.wait_for(lambda: len(reader.values("results", "ImageResult", dcid)) >= ROWS * COLUMNS, 30,
                        "every result")
        time.sleep(1)  # a duplicate result would be read by now
    finally:
        if callback is not None:
            callback.close()
        assert worker.terminate() == 0
        assert bridge is None or bridge.terminate() == 0
        reader.close()

    assert callback is None or callback.errors == []
    assert summary.complete and summary.images_analysed == ROWS * COLUMNS, summary.describe()
    x_mm, y_mm = summary.centre_mm
    assert abs(x_mm - CRYSTAL.x_mm) <= STEP_MM and abs(y_mm - CRYSTAL.y_mm) <= STEP_MM, summary.describe()
    assert at == pytest.approx((x_mm, y_mm))  # the plan moved the sample to the centre it got
    results = reader.values("results", "ImageResult", dcid)
    assert sorted(r["image_number"] for r in results) == list(range(1, ROWS * COLUMNS + 1))  # one per image
    assert reader.values("deadletter") == []  # every frame read while the series was still being written

    [begun] = reader.values("collections", "CollectionStarted", dcid)
    assert begun["grid"] == {"rows": ROWS, "columns": COLUMNS, "step_x_um": pytest.approx(100.0),
                             "step_y_um": pytest.approx(100.0), "origin_x_mm": 0.0, "origin_y_mm": 0.0,
                             "snaked": True, "plane": "xy"}
    assert begun["file_template"] == str(tmp_path / "data" / f"grid_{dcid}_master.h5") and begun["beamline"] == "sim"
    [ended] = reader.values("collections", "CollectionEnded", dcid)
    assert (ended["images_collected"], ended["status"]) == (ROWS * COLUMNS, "success")
    # The frames the detector wrote were taken where the motors were, snaking along the rows.
    assert beamline.eiger.writer.positions[COLUMNS] == pytest.approx(((COLUMNS - 1) * STEP_MM, STEP_MM))
    print(f"grid scan of {ROWS * COLUMNS} images to X-ray centre in {took:.1f} s through the {path}")


def test_bad_document_streams_give_their_one_line_reason(settings, tmp_path):
    """Real documents of a small scan, spoilt three ways, through the callback to Kafka."""
    beamline = simulated_beamline(tmp_path / "data", "small", CRYSTAL, seed=3)
    documents: list[tuple[str, dict]] = []
    beamline.engine.subscribe(lambda name, doc: documents.append((name, copy.deepcopy(doc))))
    beamline.engine(bp.grid_scan([beamline.eiger], beamline.y, 0.0, 0.1, 2, beamline.x, 0.0, 0.2, 3, snake_axes=True,
                                 md={"dcid": 1}))
    reader = TopicReader(settings, ["collections", "images"])

    def replay(dcid: int, roots=None, **change) -> BeamstreamCallback:
        callback = BeamstreamCallback.open(settings, spool=None)
        if roots is not None:
            callback.data_roots = roots
        for name, doc in documents:
            doc = copy.deepcopy(doc)
            if name == "start":
                doc.update(dcid=dcid, **change.get("start", {}))
            if name == "stream_datum" and change.get("datum") == doc["uid"]:
                doc["descriptor"] = "never-described"
            callback(name, doc)
        callback.close()
        return callback

    base = int(time.time() * 10) % 1_000_000_000
    third_datum = [d["uid"] for n, d in documents if n == "stream_datum"][2]
    try:
        missing = replay(base, datum=third_datum)
        unknown = replay(base + 1, start={"detector": "pilatus"})
        outside = replay(base + 2, roots=(str(tmp_path / "elsewhere"),))
        reader.wait_for(lambda: reader.values("collections", "CollectionEnded", base), 30, "the failed end")
        time.sleep(1)  # anything else published would be read by now
    finally:
        reader.close()

    [reason] = missing.errors
    assert "refers to descriptor never-described, never seen (missing descriptor)" in reason and "\n" not in reason
    [ended] = reader.values("collections", "CollectionEnded", base)
    assert (ended["status"], ended["images_collected"]) == ("failed", 2)  # what was announced before it
    assert sorted(i["image_number"] for i in reader.values("images", "ImageArrived", base)) == [1, 2]

    [reason] = unknown.errors
    assert reason.endswith("unknown detector 'pilatus' (the run's detectors are eiger)"), reason
    [reason] = outside.errors
    assert f"{tmp_path / 'data' / 'small_master.h5'} is outside the data roots ({tmp_path / 'elsewhere'})" in reason
    for dcid in (base + 1, base + 2):  # nothing at all of a collection that never started
        assert reader.values("collections", dcid=dcid) == [] and reader.values("images", dcid=dcid) == []


def test_a_plan_is_told_why_there_is_no_centre(settings):
    dcid = 10**12 + uuid.uuid4().int % 10**6
    started = time.monotonic()
    with pytest.raises(SummaryTimeout, match=f"no summary of collection {dcid} on .*summaries within 1 s"):
        wait_for_summary(settings, dcid, 1.0)
    assert time.monotonic() - started < 30
    stop = threading.Event()  # what summary_plan sets when the plan is aborted while it waits
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(SummaryTimeout, match=f"stopped waiting for the summary of collection {dcid}"):
        wait_for_summary(settings, dcid, 600.0, stop=stop)
    incomplete = Summary.from_value({"dcid": 7, "status": "incomplete", "images_expected": 30,
                                     "images_analysed": 28, "missing_images": [4, 9], "xray_centre": None})
    with pytest.raises(NoXrayCentre, match="collection 7: incomplete, 28 of 30 images, missing 4, 9, no X-ray centre"):
        next(move_to_xray_centre(incomplete, object(), object()))
