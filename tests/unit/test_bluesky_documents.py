"""The bluesky document translator on documents composed with event-model, as ophyd-async and bluesky's
grid_scan emit them: what each document means, and the one-line reason of each it cannot translate."""

from __future__ import annotations

import json

import pytest
from event_model import compose_run

from beamstream.platform.settings import load_settings
from beamstream.producers.bluesky_callback import BeamstreamCallback
from beamstream.producers.bluesky_documents import DocumentError, RunState, translate
from beamstream.producers.events import EventEncoder
from beamstream.schemas.serde import make_serde

ROWS, COLUMNS = 3, 4
DATA = "/data/i03/2026/cm1234"


def grid_md(**extra) -> dict:
    """What bluesky.plans.grid_scan puts in a start document (y rows 1.0..1.4, x columns 2.0..2.3), plus extra."""
    return {"detectors": ["eiger"], "motors": ["y", "x"], "shape": [ROWS, COLUMNS],
            "extents": [[1.0, 1.4], [2.0, 2.3]], "snaking": [False, True], "plan_name": "grid_scan",
            "num_points": ROWS * COLUMNS, "dcid": 4321, "beamline": "i03", **extra}


class Run:
    """The documents of one run as the RunEngine emits them with an ophyd-async file-writing detector."""

    def __init__(self, md: dict, units: str = "mm", master: str = f"{DATA}/grid_master.h5") -> None:
        self.bundle = compose_run(metadata=md)
        self.docs: list[tuple[str, dict]] = [("start", self.bundle.start_doc)]
        motor = {"dtype": "number", "shape": [], "source": "soft://m", "units": units}
        self.descriptor_bundle = self.bundle.compose_descriptor(
            name="primary",
            data_keys={"eiger": {"dtype": "array", "shape": [1, 1062, 1028], "source": f"file://localhost{master}",
                                 "external": "STREAM:", "dtype_numpy": "<u4"},
                       "eiger-sum": {"dtype": "number", "shape": [1], "source": f"file://localhost{master}",
                                     "external": "STREAM:", "dtype_numpy": "<i8"},
                       "x": motor, "y": motor},
            object_keys={"eiger": ["eiger", "eiger-sum"], "x": ["x"], "y": ["y"]})
        self.descriptor = self.descriptor_bundle.descriptor_doc
        self.docs.append(("descriptor", self.descriptor))
        self.images = self.resource("eiger", master, {"dataset": "/entry/data/data_000001"})
        self.sums = self.resource("eiger-sum", master, {"dataset": "/entry/sum"})
        self.seq = 0
        self.announced: set[str] = set()  # stream resources emitted so far

    def resource(self, data_key: str, path: str, parameters: dict):
        """A stream resource bundle (its document, and the composer of its stream_datum documents)."""
        return self.bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                                   data_key=data_key, parameters=parameters)

    def point(self, resource=None, frames: int = 1, x: float = 0.0, y: float = 0.0) -> list[tuple[str, dict]]:
        """The stream_datum documents and the event of one step (``frames`` frames of ``resource``)."""
        resource = resource or self.images
        docs = []
        for bundle in (resource, self.sums):
            if bundle.stream_resource_doc["uid"] not in self.announced:  # before its first datum, as ophyd-async
                self.announced.add(bundle.stream_resource_doc["uid"])
                docs.append(("stream_resource", bundle.stream_resource_doc))
            start = self.seq * frames if bundle is resource else self.seq
            stop = start + (frames if bundle is resource else 1)
            docs.append(("stream_datum", bundle.compose_stream_datum(
                indices={"start": start, "stop": stop}, seq_nums={"start": self.seq + 1, "stop": self.seq + 2},
                descriptor=self.descriptor)))
        self.seq += 1
        docs.append(("event", self.descriptor_bundle.compose_event(data={"x": x, "y": y},
                                                                  timestamps={"x": 0.0, "y": 0.0})))
        return docs

    def scan(self, points: int = ROWS * COLUMNS) -> list[tuple[str, dict]]:
        """The whole run: start, descriptor, every point, stop."""
        docs = list(self.docs)
        for _ in range(points):
            docs += self.point()
        return docs + [("stop", self.bundle.compose_stop())]


def feed(docs, state=None, roots=(DATA,)):
    """Translate documents in order; (final state, every event)."""
    events = []
    for name, doc in docs:
        state, more = translate(state, name, doc, data_roots=roots)
        events += more
    return state, events


def values(events, record_type):
    return [e.value for e in events if e.record_type == record_type]


# -- what each document means ----------------------------------------------------------------------------
def test_a_grid_scan_becomes_one_collection_with_its_grid_images_and_end():
    state, events = feed(Run(grid_md()).scan())
    assert state is None  # the run is over
    assert [e.record_type for e in events] == ["CollectionStarted"] + ["ImageArrived"] * 12 + ["CollectionEnded"]
    [started] = values(events, "CollectionStarted")
    assert started["dcid"] == 4321 and started["beamline"] == "i03" and started["experiment_type"] == "grid"
    assert started["file_template"] == f"{DATA}/grid_master.h5" and started["number_of_images"] == 12
    grid = started["grid"]
    assert (grid["rows"], grid["columns"], grid["snaked"], grid["plane"]) == (3, 4, True, "xy")
    assert grid["origin_x_mm"] == 2.0 and grid["origin_y_mm"] == 1.0
    assert grid["step_x_um"] == pytest.approx(100.0) and grid["step_y_um"] == pytest.approx(200.0)
    images = values(events, "ImageArrived")
    assert [(i["image_number"], i["frame_index"]) for i in images] == [(n, n - 1) for n in range(1, 13)]
    assert {i["file_path"] for i in images} == {f"{DATA}/grid_master.h5"} and {i["source"] for i in images} == {
        "bluesky"}
    [ended] = values(events, "CollectionEnded")
    assert (ended["dcid"], ended["images_collected"], ended["status"]) == (4321, 12, "success")


def test_every_event_encodes_to_the_wire_format():
    _, events = feed(Run(grid_md(sample_id=77)).scan())
    records = EventEncoder(load_settings(environ={}), make_serde()).encode(events)
    assert [r.topic.rsplit(".", 1)[-1] for r in records] == ["collections"] + ["images"] * 12 + ["collections"]
    assert values(events, "CollectionStarted")[0]["sample_id"] == 77


def test_motor_units_set_the_grid_in_mm_and_um():
    _, events = feed(Run(grid_md(extents=[[100.0, 300.0], [-50.0, 250.0]]), units="um").scan())
    grid = values(events, "CollectionStarted")[0]["grid"]
    assert grid["origin_x_mm"] == pytest.approx(-0.05) and grid["origin_y_mm"] == pytest.approx(0.1)
    assert grid["step_x_um"] == pytest.approx(100.0) and grid["step_y_um"] == pytest.approx(100.0)


def test_an_explicit_grid_in_the_metadata_is_taken_as_it_is():
    explicit = {"rows": 3, "columns": 4, "step_x_um": 20.0, "step_y_um": 25.0, "origin_x_mm": 5.0,
                "origin_y_mm": 6.0, "snaked": False, "plane": "xz"}
    md = {"detectors": ["eiger"], "dcid": 9, "grid": explicit, "sample_id": 3}
    _, events = feed(Run(md).scan())
    started = values(events, "CollectionStarted")[0]
    assert started["grid"] == explicit and started["experiment_type"] == "grid"


def test_a_rotation_takes_its_image_count_from_the_plan():
    md = {"detectors": ["eiger"], "dcid": 10, "experiment_type": "rotation", "num_points": 5}
    _, events = feed(Run(md).scan(5))
    started = values(events, "CollectionStarted")[0]
    assert started["experiment_type"] == "rotation" and started["grid"] is None and started["number_of_images"] == 5
    assert values(events, "CollectionEnded")[0]["images_collected"] == 5


@pytest.mark.parametrize(("exit_status", "status"), [("abort", "aborted"), ("fail", "failed")])
def test_a_stopped_run_ends_its_collection_with_the_images_it_got(exit_status, status):
    run = Run(grid_md())
    docs = list(run.docs)
    for _ in range(5):
        docs += run.point()
    _, events = feed(docs + [("stop", run.bundle.compose_stop(exit_status=exit_status, reason="stopped"))])
    [ended] = values(events, "CollectionEnded")
    assert (ended["images_collected"], ended["status"]) == (5, status)


def test_a_run_without_images_announces_nothing():
    run = Run(grid_md())
    state, events = feed(run.docs + [("stop", run.bundle.compose_stop(exit_status="abort"))])
    assert state is None and events == []


def test_several_frames_per_datum_are_several_images():
    run = Run(grid_md())
    docs = list(run.docs)
    for _ in range(3):
        docs += run.point(frames=4)  # a fly scan's datum: indices 0..4, 4..8, 8..12
    _, events = feed(docs)
    assert [(e["image_number"], e["frame_index"]) for e in values(events, "ImageArrived")] == [
        (n, n - 1) for n in range(1, 13)]


def test_a_second_file_continues_the_numbering():
    run = Run(grid_md())
    second = run.resource("eiger", f"{DATA}/grid_2_master.h5", {"dataset": "/entry/data/data_000001"})
    docs = list(run.docs)
    for _ in range(6):
        docs += run.point()
    run.seq = 0  # the second file's frames start at index 0
    for _ in range(6):
        docs += run.point(resource=second)
    _, events = feed(docs)
    images = values(events, "ImageArrived")
    assert [i["image_number"] for i in images] == list(range(1, 13))
    assert [(i["file_path"].rsplit("/", 1)[-1], i["frame_index"]) for i in images[5:7]] == [
        ("grid_master.h5", 5), ("grid_2_master.h5", 0)]
    assert len(values(events, "CollectionStarted")) == 1


def test_a_document_seen_again_announces_nothing_new():
    run = Run(grid_md())
    docs = run.docs + run.point() + run.point()
    state, events = feed(docs)
    state, again = feed([d for d in docs if d[0] in ("stream_resource", "stream_datum")], state)
    assert again == [] and state.images == 2 and len(values(events, "ImageArrived")) == 2


def test_the_state_survives_json_between_any_two_documents():
    docs = Run(grid_md()).scan()
    _, expected = feed(docs)
    state, events = None, []
    for name, doc in docs:
        if state is not None:
            state = RunState.from_json(state.to_json())
        state, more = translate(state, name, json.loads(json.dumps(doc)), data_roots=(DATA,))  # as Kafka carries it
        events += more
    strip = ("event_time", "arrival_time")
    assert [{k: v for k, v in e.value.items() if k not in strip} for e in events] == \
        [{k: v for k, v in e.value.items() if k not in strip} for e in expected]


def test_ignored_documents_change_nothing():
    run = Run(grid_md())
    state, _ = feed(run.docs)
    for name in ("resource", "datum", "datum_page"):
        after, events = translate(state, name, {"uid": "x"})
        assert after is state and events == []


def test_a_run_with_two_detectors_takes_the_one_named():
    md = grid_md(detectors=["oav", "eiger"], detector="eiger")
    _, events = feed(Run(md).scan())
    assert len(values(events, "ImageArrived")) == 12


# -- what cannot be translated, and why (the state passed in stays usable) -------------------------------------
def expect_error(state, name, doc, match: str, roots=(DATA,)) -> str:
    before = None if state is None else state.to_json()
    with pytest.raises(DocumentError, match=match) as caught:
        translate(state, name, doc, data_roots=roots)
    reason = str(caught.value)
    assert "\n" not in reason
    assert (None if state is None else state.to_json()) == before
    return reason


def test_a_stream_datum_or_event_of_a_missing_descriptor():
    run = Run(grid_md())
    state, _ = feed(run.docs + run.point())
    stray = run.bundle.compose_descriptor(name="other", data_keys={"z": {"dtype": "number", "shape": [],
                                                                          "source": "soft://z"}})
    datum = run.images.compose_stream_datum(indices={"start": 1, "stop": 2}, descriptor=stray.descriptor_doc)
    reason = expect_error(state, "stream_datum", datum, "missing descriptor")
    assert stray.descriptor_doc["uid"] in reason and run.bundle.start_doc["uid"] in reason
    expect_error(state, "event", stray.compose_event(data={"z": 1}, timestamps={"z": 0}), "missing descriptor")
    # The state given is still good: the run carries on.
    _, events = feed(run.point(), state)
    assert [e["image_number"] for e in values(events, "ImageArrived")] == [2]


def test_a_stream_datum_of_a_missing_stream_resource():
    run = Run(grid_md())
    state, _ = feed(run.docs)
    datum = run.images.compose_stream_datum(indices={"start": 0, "stop": 1}, descriptor=run.descriptor)
    expect_error(state, "stream_datum", datum, "missing stream_resource")


def test_an_unknown_detector():
    expect_error(None, "start", compose_run(metadata=grid_md(detector="pilatus")).start_doc,
                 "unknown detector 'pilatus' .the run's detectors are eiger.")
    run = Run(grid_md())
    state, _ = feed(run.docs)
    stranger = run.bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{DATA}/p.h5",
                                                  data_key="pilatus", parameters={})
    expect_error(state, "stream_resource", stranger.stream_resource_doc, "unknown detector data key 'pilatus'")


def test_a_path_outside_the_data_roots():
    run = Run(grid_md(), master="/tmp/elsewhere/grid_master.h5")
    state, _ = feed(run.docs)
    resource = run.images.stream_resource_doc
    reason = expect_error(state, "stream_resource", resource, "outside the data roots")
    assert "/tmp/elsewhere/grid_master.h5" in reason and DATA in reason and "dcid 4321" in reason
    # Without data roots every path is accepted (as the workers do).
    _, events = translate(state, "stream_resource", resource, data_roots=())
    assert values(events, "CollectionStarted")[0]["file_template"] == "/tmp/elsewhere/grid_master.h5"


def test_a_uri_that_is_no_file():
    run = Run(grid_md())
    state, _ = feed(run.docs)
    resource = dict(run.images.stream_resource_doc, uri="tiled://server/eiger")
    expect_error(state, "stream_resource", resource, "is not a file")


def test_the_older_root_and_resource_path():
    run = Run(grid_md())
    state, _ = feed(run.docs)
    resource = {k: v for k, v in run.images.stream_resource_doc.items() if k != "uri"}
    resource.update(root=DATA, resource_path="old/grid_master.h5")
    _, events = translate(state, "stream_resource", resource, data_roots=(DATA,))
    assert values(events, "CollectionStarted")[0]["file_template"] == f"{DATA}/old/grid_master.h5"


@pytest.mark.parametrize(("md", "match"), [
    ({"dcid": None}, "no 'dcid' in the run's metadata"),
    ({"dcid": 0}, "dcid must be a positive integer, got 0"),
    ({"dcid": "abc"}, "dcid must be a positive integer, got 'abc'"),
    ({"dcid": True}, "dcid must be a positive integer"),
    ({"detectors": ["a", "b"]}, "name the detector whose images Beamstream analyses"),
    ({"shape": [12], "extents": [[0, 1]]}, "a grid needs a 2-D shape and extents"),
    ({"extents": [[0, 1], [0, float("nan")]]}, "extents must be a finite number"),
    ({"plan_name": "rel_grid_scan"}, "relative to where the motors were"),
    ({"experiment_type": "powder"}, "experiment_type 'powder' is not one of"),
    ({"grid": {"rows": 3}}, "md 'grid' lacks columns, step_x_um, step_y_um"),
    ({"grid_plane": "yz"}, "grid_plane must be xy or xz"),
    ({"sample_id": -1}, "sample_id must be a positive integer"),
])
def test_a_start_without_what_a_collection_needs(md, match):
    metadata = {k: v for k, v in grid_md(**md).items() if v is not None}
    expect_error(None, "start", compose_run(metadata=metadata).start_doc, match)


def test_a_grid_experiment_needs_a_grid():
    md = {"detectors": ["eiger"], "dcid": 5, "experiment_type": "grid", "num_points": 4}
    expect_error(None, "start", compose_run(metadata=md).start_doc, "a grid scan needs its grid")


def test_documents_out_of_their_run():
    run = Run(grid_md())
    expect_error(None, "descriptor", run.descriptor, "descriptor .* before its run's start")
    state, _ = feed(run.docs)
    other = compose_run(metadata=grid_md())
    expect_error(state, "start", other.start_doc, "while run .* is still open")
    expect_error(state, "stop", other.compose_stop(), "belongs to run")
    expect_error(state, "bananas", {"uid": "x"}, "unknown document type 'bananas'")


def test_an_image_beyond_the_grid():
    run = Run(grid_md())
    state, _ = feed(run.scan()[:-1])  # every point, no stop
    expect_error(state, "stream_datum", run.point()[0][1], "image 13 is beyond the collection's 12 images")


def test_a_malformed_document_is_named():
    run = Run(grid_md())
    state, _ = feed(run.docs)
    expect_error(state, "stream_datum", {"uid": "d1", "descriptor": run.descriptor["uid"]},
                 "stream_datum d1 is malformed: KeyError 'stream_resource'")


def test_a_state_that_is_not_one():
    with pytest.raises(DocumentError, match="not a saved bluesky run state"):
        RunState.from_json(b'{"dcid": 1}')


# -- the RunEngine callback's handling of what cannot be translated (publisher faked: pure logic) ---------------
class ListPublisher:
    """Keeps what is published, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def publish(self, events, headers=()) -> int:
        self.batches.append(list(events))
        return len(self.batches[-1])


def test_the_callback_publishes_each_documents_events_as_one_batch():
    publisher = ListPublisher()
    callback = BeamstreamCallback(publisher, data_roots=(DATA,))
    for name, doc in Run(grid_md()).scan():
        callback(name, doc)
    assert [[e.record_type for e in batch] for batch in publisher.batches] == \
        [["CollectionStarted"]] + [["ImageArrived"]] * 12 + [["CollectionEnded"]]
    assert callback.errors == [] and callback.state is None


def test_the_callback_ends_a_broken_run_as_failed_and_drops_the_rest_of_it(caplog):
    publisher = ListPublisher()
    callback = BeamstreamCallback(publisher, data_roots=(DATA,))
    run = Run(grid_md())
    docs = run.docs + run.point() + run.point()
    stray = dict(run.point()[0][1], descriptor="gone")
    for name, doc in [*docs, ("stream_datum", stray), *run.point(), ("stop", run.bundle.compose_stop())]:
        callback(name, doc)
    [reason] = callback.errors
    assert "refers to descriptor gone, never seen (missing descriptor)" in reason
    assert [r.getMessage() for r in caplog.records] == [f"bluesky stream_datum document not published: {reason}"]
    ended = publisher.batches[-1]
    assert [(e.record_type, e.value["images_collected"], e.value["status"]) for e in ended] == [
        ("CollectionEnded", 2, "failed")]
    assert sum(len(batch) for batch in publisher.batches) == 1 + 2 + 1  # nothing after the failure
    # The next run is taken as usual.
    for name, doc in Run(grid_md(dcid=4322)).scan():
        callback(name, doc)
    assert publisher.batches[-1][0].value["status"] == "success" and len(callback.errors) == 1


def test_the_callback_drops_a_run_whose_start_it_refused_or_never_saw():
    publisher = ListPublisher()
    callback = BeamstreamCallback(publisher, data_roots=(DATA,))
    refused = Run(grid_md(dcid=None))
    joined_late = Run(grid_md())
    for name, doc in refused.scan() + joined_late.scan()[1:]:
        callback(name, doc)
    assert len(callback.errors) == 2 and publisher.batches == []  # one line per run, nothing published
    assert "no 'dcid'" in callback.errors[0] and "before its run's start" in callback.errors[1]
