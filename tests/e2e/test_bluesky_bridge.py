"""`beamstream bluesky-bridge` on a real broker: a real RunEngine's grid scan (ophyd-async's simulated
motors and HDF5-writing detector) published by bluesky-kafka's own Publisher becomes one CollectionStarted,
one ImageArrived per image and one CollectionEnded, read read_committed; a bridge killed with SIGKILL
mid-run and started again announces no image twice; bad documents go to the dead-letter topic with
their reasons while the run around them is still translated; SIGTERM stops the bridge cleanly."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path, PurePath

import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine
from bluesky_kafka import Publisher
from ophyd_async import sim
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices

from beamstream.connectors.bluesky_bridge import BlueskyBridge
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.retained import read_topic
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.bluesky_beamline import create_document_topic
from beamstream.schemas.serde import make_serde
from tests.helpers.bluesky import PUBLISHER_KEY, SmallRun, publisher_for
from tests.helpers.cli_run import one_line_error, run_cli
from tests.helpers.faults import fault_random, record_fault
from tests.helpers.harness import ServiceProcess, TopicReader, free_port_pair
from tests.helpers.metrics_helpers import scrape, value

pytestmark = pytest.mark.kafka


# -- fixtures ---------------------------------------------------------------------------------------
class Beamline:
    """A RunEngine with two simulated motors (y in um, x in mm) and a simulated detector writing HDF5 into
    ``data_dir``; ``documents`` records what the last run emitted."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        # No SIGINT handler of its own: a test interrupted with Ctrl-C should stop, not pause a plan.
        self.engine = RunEngine({}, context_managers=[])
        self.documents: list[tuple[str, dict]] = []
        self.engine.subscribe(lambda name, doc: self.documents.append((name, doc)))
        with init_devices():
            self.y = sim.SimMotor(name="y", units="um")
            self.x = sim.SimMotor(name="x")
            self.det = sim.SimBlobDetector(StaticPathProvider(UUIDFilenameProvider(), PurePath(data_dir)),
                                           name="det")

    def grid_scan(self, publisher: Publisher, dcid: int, rows: int, columns: int) -> None:
        """Rows of y from 0 to 30 um, columns of x from 1.0 to 1.3 mm, snaked; published by ``publisher``."""
        self.documents.clear()
        token = self.engine.subscribe(publisher)
        try:
            self.engine(bp.grid_scan([self.det], self.y, 0.0, 30.0, rows, self.x, 1.0, 1.3, columns,
                                     snake_axes=True), dcid=dcid, beamline="i03")
        finally:
            self.engine.unsubscribe(token)

    def image_file(self) -> str:
        """The file of the last run's detector images (its stream resource for the ``det`` data key)."""
        [uri] = [doc["uri"] for name, doc in self.documents if name == "stream_resource" and doc["data_key"] == "det"]
        return uri.removeprefix("file://localhost")


@pytest.fixture(scope="module")
def beamline(tmp_path_factory) -> Beamline:
    return Beamline(tmp_path_factory.mktemp("bluesky-data"))


@pytest.fixture
def settings(kafka_settings, beamline) -> Settings:
    """The test's deployment, with the detector's folder as its data root."""
    return load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                         topic_prefix=kafka_settings.topic_prefix, image_partitions=kafka_settings.image_partitions,
                         data_roots=(str(beamline.data_dir),))


@pytest.fixture
def document_topic(settings) -> str:
    """The beamline's document topic (bluesky-kafka's naming; the bridge expects it to exist)."""
    return create_document_topic(settings, f"{settings.topic_prefix}i03.bluesky.runengine.documents")


def image_events(settings: Settings, dcid: int) -> list[dict]:
    """Every committed ImageArrived of ``dcid`` now on the images topic (read_committed, to its end)."""
    serde = make_serde(None)
    topic = topic_name(settings, "images")
    decoded = (serde.decode(record.value, topic) for record in read_topic(settings, topic))
    return [event.value for event in decoded if event.name == "ImageArrived" and event.value["dcid"] == dcid]


def wait_for(reader: TopicReader, predicate, timeout: float, what: str, bridge: ServiceProcess) -> None:
    """``reader.wait_for``, failing with the bridge's log."""
    try:
        reader.wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the bridge's log: {bridge.log_text()[-4000:]}") from None


# -- a run through bluesky-kafka ---------------------------------------------------------------------
def test_a_grid_scan_becomes_one_start_an_event_per_image_and_one_end_and_sigterm_stops_cleanly(
        settings, beamline, document_topic, tmp_path):
    port = free_port_pair()
    bridge = ServiceProcess(settings, tmp_path, "bridge", "--topic", document_topic, "--metrics-port", str(port),
                            command="bluesky-bridge").start()
    reader = TopicReader(settings, ["collections", "images"])
    try:
        beamline.grid_scan(publisher_for(settings, document_topic), dcid=9101, rows=3, columns=4)
        wait_for(reader, lambda: len(reader.values("images", dcid=9101)) >= 12
                 and reader.values("collections", "CollectionEnded", dcid=9101), 60,
                 "12 images and the end of dcid 9101", bridge)

        path = beamline.image_file()
        assert path.startswith(str(beamline.data_dir)) and Path(path).is_file()
        [started] = reader.values("collections", "CollectionStarted", dcid=9101)
        assert (started["experiment_type"], started["number_of_images"], started["file_template"],
                started["beamline"]) == ("grid", 12, path, "i03")
        grid = started["grid"]
        assert (grid["rows"], grid["columns"], grid["snaked"], grid["plane"]) == (3, 4, True, "xy")
        assert grid["step_x_um"] == pytest.approx(100.0) and grid["step_y_um"] == pytest.approx(15.0)
        assert grid["origin_x_mm"] == pytest.approx(1.0) and grid["origin_y_mm"] == pytest.approx(0.0)
        images = image_events(settings, 9101)
        assert sorted((e["image_number"], e["frame_index"], e["file_path"], e["source"]) for e in images) == [
            (n, n - 1, path, "bluesky") for n in range(1, 13)]
        [ended] = reader.values("collections", "CollectionEnded", dcid=9101)
        assert (ended["images_collected"], ended["status"]) == (12, "success")

        samples = scrape(port)
        documents = Counter(name for name, _ in beamline.documents)
        for name, count in documents.items():
            assert value(samples, "beamstream_bluesky_bridge_documents_consumed_total", document=name) == count
        assert value(samples, "beamstream_bluesky_bridge_events_produced_total", record_type="ImageArrived") == 12

        stopping = time.monotonic()
        code = bridge.terminate(timeout=30)
        stopped_in = time.monotonic() - stopping
    finally:
        reader.close()
        bridge.kill()
    log = bridge.log_text()
    assert code == 0, log[-3000:]
    assert stopped_in < 10, f"SIGTERM took {stopped_in:.1f} s"
    assert '"bluesky bridge stopped"' in log.strip().splitlines()[-1], log[-2000:]
    assert "Traceback" not in log


# -- exactly once through a crash -------------------------------------------------------------------
@pytest.mark.fault
def test_a_bridge_killed_mid_run_and_restarted_announces_every_image_once(settings, beamline, document_topic,
                                                                         tmp_path):
    rows, columns, dcid = 4, 6, 9102
    n_images = rows * columns
    kill_after = fault_random("bluesky-bridge-kill").randint(2, n_images // 2)
    bridge = ServiceProcess(settings, tmp_path, "bridge", "--topic", document_topic, "--log-level", "warning",
                            command="bluesky-bridge").start()
    reader = TopicReader(settings, ["collections", "images", "deadletter"])
    restarted_at: list[float] = []

    def kill_mid_run() -> None:
        deadline = time.monotonic() + 90
        while len(reader.values("images", dcid=dcid)) < kill_after and time.monotonic() < deadline:
            time.sleep(0.02)
        bridge.kill()  # SIGKILL: a transaction may be open, documents fetched and not committed
        restarted_at.append(time.time())  # epoch seconds, as the reader's arrivals
        bridge.start()

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    try:
        killer.start()
        beamline.grid_scan(publisher_for(settings, document_topic), dcid=dcid, rows=rows, columns=columns)
        killer.join(120)
        assert restarted_at, "the bridge was never killed"
        wait_for(reader, lambda: reader.values("collections", "CollectionEnded", dcid=dcid), 90,
                 f"the end of dcid {dcid} after the restart", bridge)
        wait_for(reader, lambda: len({e["image_number"] for e in reader.values("images", dcid=dcid)}) == n_images,
                 30, f"{n_images} images", bridge)
        images = Counter(e["image_number"] for e in image_events(settings, dcid))
        after_restart = [at for at, _ in reader.arrivals("images", dcid=dcid) if at > restarted_at[0]]
        starts = reader.values("collections", "CollectionStarted", dcid=dcid)
        ends = reader.values("collections", "CollectionEnded", dcid=dcid)
        # The run's state came back from the changelog: without it every later document would be refused.
        assert reader.values("deadletter") == []
        assert bridge.terminate(timeout=30) == 0, bridge.log_text()[-3000:]
    finally:
        reader.close()
        bridge.kill()
    lost = n_images - len(images)
    duplicated = sum(count - 1 for count in images.values())
    record_fault("bluesky-bridge-kill", images=n_images, lost=lost, duplicated=duplicated,
                 recovery_s=min(after_restart) - restarted_at[0] if after_restart else None,
                 killed_after=kill_after)
    assert (lost, duplicated) == (0, 0), images
    assert set(images) == set(range(1, n_images + 1))
    assert len(starts) == 1 and len(ends) == 1 and ends[0]["images_collected"] == n_images


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_documents_go_to_the_dead_letter_topic_and_the_run_around_them_is_translated(
        settings, beamline, document_topic):
    dcid, data = 9103, str(beamline.data_dir)
    run = SmallRun(dcid, data)
    unknown = run.resource_of("mystery-det", f"{data}/z.h5")
    outside = run.resource_of("det", "/elsewhere/run.h5")
    orphan = {**run.descriptor.compose_event(data={"x": 0.5}, timestamps={"x": 0.0}), "descriptor": "never-described"}

    publisher = publisher_for(settings, document_topic)
    garbage = make_producer(settings)
    for name, doc in [*run.opening(), *run.frame(0)]:
        publisher(name, doc)
    publisher.flush()
    garbage.produce(document_topic, b"\x93not a bluesky document", PUBLISHER_KEY.encode())
    garbage.flush(10)
    for name, doc in [("event", orphan), ("stream_resource", unknown.stream_resource_doc),
                      ("stream_resource", outside.stream_resource_doc), *run.frame(1),
                      ("stop", run.run.compose_stop())]:
        publisher(name, doc)

    reader = TopicReader(settings, ["collections", "images", "deadletter"])
    bridge = BlueskyBridge(settings, [document_topic])
    bridge.check_topics()
    thread = threading.Thread(target=bridge.run, daemon=True)
    thread.start()
    try:
        reader.wait_for(lambda: len(reader.values("deadletter")) >= 4
                        and reader.values("collections", "CollectionEnded", dcid=dcid), 60,
                        "4 dead letters and the run's end")
    finally:
        bridge.stop_event.set()
        thread.join(30)
        reader.close()
    assert not thread.is_alive()

    dead = reader.values("deadletter")
    assert [d["error_type"] for d in dead] == ["UndecodableDocument", "DocumentError", "DocumentError",
                                               "DocumentError"], dead
    reasons = [d["reason"] for d in dead]
    assert reasons[0].startswith("not a bluesky-kafka document")
    assert "refers to descriptor never-described, never seen (missing descriptor)" in reasons[1]
    assert "unknown detector data key 'mystery-det'" in reasons[2]
    assert "/elsewhere/run.h5 is outside the data roots" in reasons[3] and data in reasons[3]
    assert all(d["source_topic"] == document_topic and d["service"] == f"bluesky-bridge/{document_topic}"
               and d["key"] == PUBLISHER_KEY.encode() for d in dead)
    assert dead[0]["payload"] == b"\x93not a bluesky document" and [d["dcid"] for d in dead] == [None] + [dcid] * 3

    [started] = reader.values("collections", "CollectionStarted", dcid=dcid)
    assert started["file_template"] == f"{data}/run.h5" and started["number_of_images"] == 2
    assert sorted((e["image_number"], e["frame_index"]) for e in reader.values("images", dcid=dcid)) == [(1, 0),
                                                                                                        (2, 1)]
    [ended] = reader.values("collections", "CollectionEnded", dcid=dcid)
    assert ended["images_collected"] == 2
    assert bridge.stats["dead_letters"] == 4 and bridge.stats["ImageArrived"] == 2


def test_a_missing_document_topic_is_one_line_naming_it(settings):
    missing = f"{settings.topic_prefix}i24.bluesky.runengine.documents"
    line = one_line_error(run_cli(settings, "bluesky-bridge", "--topic", missing, timeout=60))
    assert line.startswith(f"beamstream bluesky-bridge: error: document topic {missing} does not exist"), line
    assert f"kafka-topics.sh --create --topic {missing}" in line
