"""The Bluesky bridge's pure parts: bluesky-kafka messages decoded (and refused), run keys, the topic
check, and what the processor makes of a run's documents (fake messages, the real translator and table)."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from beamstream.connectors.bluesky_bridge import (
    BridgeProcessor,
    UndecodableDocument,
    decode_document,
    run_key,
    topic_problem,
)
from beamstream.platform.settings import load_settings
from beamstream.schemas.serde import make_serde
from tests.helpers.fake_kafka import FakeMessage

TOPIC = "i03.bluesky.runengine.documents"
UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Tripwire:
    """Unpickling one calls _record_unpickling: proof that a message's pickle ran."""

    def __reduce__(self):
        return (_record_unpickling, ("unpickled",))


def _bluesky_kafka_bytes(name: str, doc: dict) -> bytes:
    """A message as bluesky_kafka.Publisher serialises it (msgpack, patched by msgpack-numpy on import)."""
    import bluesky_kafka  # noqa: F401 - its import patches msgpack with msgpack-numpy, as the Publisher does

    return msgpack.dumps((name, doc))


def test_a_bluesky_kafka_message_decodes_with_numpy_as_plain_values():
    value = _bluesky_kafka_bytes("event", {"uid": "e1", "data": {"x": np.float64(1.5), "roi": np.arange(4)},
                                          "seq_num": np.int32(3)})
    name, doc = decode_document(value)
    assert name == "event"
    assert doc == {"uid": "e1", "data": {"x": 1.5, "roi": [0, 1, 2, 3]}, "seq_num": 3}
    assert type(doc["data"]["x"]) is float and type(doc["seq_num"]) is int


@pytest.mark.parametrize(("value", "reason"), [
    (None, "an empty message"),
    (b"", "an empty message"),
    (b"\xc1 not msgpack", "not a bluesky-kafka document (msgpack of (name, doc))"),
    (msgpack.packb(["start", {}, "extra"]), "expected the msgpack of (name, doc), got a list"),
    (msgpack.packb({"name": "start"}), "expected the msgpack of (name, doc), got a dict"),
    (msgpack.packb([7, {}]), "expected (name, doc) as (str, map), got (int, dict)"),
    (msgpack.packb(["start", [1, 2]]), "expected (name, doc) as (str, map), got (str, list)"),
])
def test_what_is_not_a_document_is_named(value, reason):
    with pytest.raises(UndecodableDocument) as refused:
        decode_document(value)
    assert reason in str(refused.value)


def test_a_pickled_object_array_is_refused_without_unpickling_it():
    UNPICKLED.clear()
    array = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps(_Tripwire())}
    value = msgpack.packb(["event", {"data": {"x": array}}], use_bin_type=True)
    with pytest.raises(UndecodableDocument, match="a numpy object array"):
        decode_document(value)
    assert UNPICKLED == []
    import bluesky_kafka  # noqa: F401 - even with msgpack patched by msgpack-numpy in this process
    with pytest.raises(UndecodableDocument, match="a numpy object array"):
        decode_document(value)
    assert UNPICKLED == []


def test_a_numpy_map_whose_parts_do_not_fit_is_undecodable():
    array = {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [5], b"data": b"\x00" * 8}
    with pytest.raises(UndecodableDocument, match="not a bluesky-kafka document"):
        decode_document(msgpack.packb(["event", {"data": array}], use_bin_type=True))


def test_run_keys_keep_topics_and_publishers_apart():
    assert run_key("a.docs", b"i03") == b"a.docs/i03"
    assert run_key("a.docs", None) == b"a.docs"
    assert run_key("a.docs", b"") != run_key("a.docs", None)
    # A topic name holds no "/", so the first one ends the topic: keys with "/" stay apart.
    assert run_key("a", b"b/c") != run_key("a.b", b"c")


def test_topic_problems_are_named():
    changelog = "p.bluesky-bridge-changelog"
    assert topic_problem({"a": 1, "b": 1}, changelog, 12) is None
    missing = topic_problem({"a": 1, "b": None}, changelog, 12)
    assert missing.startswith("document topic b does not exist") and "--topic b --partitions 1" in missing
    assert "run `beamstream topics apply` first" in topic_problem({"a": 1}, changelog, None)
    assert "different partition counts (a 1, b 3)" in topic_problem({"a": 1, "b": 3}, changelog, 12)
    assert "more than the 12 of p.bluesky-bridge-changelog" in topic_problem({"a": 16}, changelog, 12)


# -- the processor --------------------------------------------------------------------------------
RUN = "run-1"
DESCRIPTOR = "desc-1"


def _run_documents(data_root: str, dcid: int = 31, images: int = 2) -> list[tuple[str, dict]]:
    """A minimal run of ``images`` frames of detector ``det`` (as ophyd-async describes one)."""
    start = {"uid": RUN, "time": 1.0, "dcid": dcid, "detectors": ["det"], "num_points": images,
             "experiment_type": "other"}
    descriptor = {"uid": DESCRIPTOR, "run_start": RUN, "name": "primary", "time": 1.1,
                  "data_keys": {"det": {"dtype": "array", "shape": [1, 8, 8], "source": "sim", "external": "STREAM:"}},
                  "object_keys": {"det": ["det"]}}
    resource = {"uid": "res-1", "run_start": RUN, "data_key": "det", "mimetype": "application/x-hdf5",
                "uri": f"file://localhost{data_root}/scan.h5", "parameters": {}}
    datums = [("stream_datum", {"uid": f"res-1/{i}", "stream_resource": "res-1", "descriptor": DESCRIPTOR,
                                "indices": {"start": i, "stop": i + 1}, "seq_nums": {"start": i + 1, "stop": i + 2}})
              for i in range(images)]
    stop = {"uid": "stop-1", "run_start": RUN, "time": 2.0, "exit_status": "success"}
    return [("start", start), ("descriptor", descriptor), ("stream_resource", resource), *datums, ("stop", stop)]


def _messages(documents, key: bytes = b"i03", first_offset: int = 0) -> list[FakeMessage]:
    return [FakeMessage(TOPIC, 0, first_offset + n, key, _bluesky_kafka_bytes(name, doc))
            for n, (name, doc) in enumerate(documents)]


@pytest.fixture
def processor(tmp_path) -> BridgeProcessor:
    settings = load_settings({}, home=tmp_path, topic_prefix="u.", data_roots=(str(tmp_path),))
    return BridgeProcessor(settings, [TOPIC])


def _decoded(outputs) -> list[tuple[str, str, dict]]:
    serde = make_serde(None)
    decoded = []
    for topic, _key, value, *_ in outputs:
        event = serde.decode(value, topic)
        decoded.append((topic, event.name, event.value))
    return decoded


def test_a_run_becomes_its_events_and_its_state_a_tombstone_at_the_stop(processor, tmp_path):
    documents = _run_documents(str(tmp_path))
    outputs = processor.process(_messages(documents[:-1]))
    events = _decoded(outputs)
    assert [(topic, name) for topic, name, _ in events] == [
        ("u.collections", "CollectionStarted"), ("u.images", "ImageArrived"), ("u.images", "ImageArrived")]
    assert [(e["image_number"], e["frame_index"], e["file_path"]) for _, _, e in events[1:]] == [
        (1, 0, f"{tmp_path}/scan.h5"), (2, 1, f"{tmp_path}/scan.h5")]
    assert [key for _, key, _ in outputs[1:]] == [b"31:1", b"31:2"]
    state = processor.runs.get(0, run_key(TOPIC, b"i03"))
    assert (state.dcid, state.images) == (31, 2)

    outputs = processor.process(_messages(documents[-1:], first_offset=len(documents) - 1))
    assert [(name, value["images_collected"]) for _, name, value in _decoded(outputs)] == [("CollectionEnded", 2)]
    changelog = processor.runs.flush()
    assert changelog == [("u.bluesky-bridge-changelog", b"i03.bluesky.runengine.documents/i03", None, 0)]
    processor.committed()
    assert processor.stats == {"documents": len(documents), "dead_letters": 0, "CollectionStarted": 1,
                               "ImageArrived": 2, "CollectionEnded": 1}


def test_bad_documents_are_dead_letters_and_the_run_goes_on(processor, tmp_path):
    documents = _run_documents(str(tmp_path))
    orphan = ("event", {"uid": "ev-x", "descriptor": "never-described", "time": 1.5, "seq_num": 1, "data": {},
                        "timestamps": {}})
    outside = ("stream_resource", {**documents[2][1], "uid": "res-2", "uri": "file://localhost/elsewhere/x.h5"})
    stream = [*documents[:3], orphan, outside, *documents[3:]]
    messages = _messages(stream)
    messages.insert(3, FakeMessage(TOPIC, 0, 99, b"i03", b"garbage"))
    decoded = _decoded(processor.process(messages))
    dead = [value for _, name, value in decoded if name == "DeadLetter"]
    assert [d["error_type"] for d in dead] == ["UndecodableDocument", "DocumentError", "DocumentError"]
    assert "descriptor never-described, never seen (missing descriptor)" in dead[1]["reason"]
    assert "/elsewhere/x.h5 is outside the data roots" in dead[2]["reason"]
    assert [d["dcid"] for d in dead] == [None, 31, 31]
    assert {d["service"] for d in dead} == {f"bluesky-bridge/{TOPIC}"}
    assert dead[0]["payload"] == b"garbage" and dead[0]["source_offset"] == 99
    assert [name for _, name, _ in decoded if name != "DeadLetter"] == [
        "CollectionStarted", "ImageArrived", "ImageArrived", "CollectionEnded"]


def test_a_start_while_a_run_is_open_ends_that_run_as_aborted(processor, tmp_path):
    first = _run_documents(str(tmp_path), dcid=40, images=3)
    second = [(name, {**doc, "uid": doc["uid"].replace("1", "2"),
                      **({"run_start": "run-2"} if "run_start" in doc else {}),
                      **({"dcid": 41} if name == "start" else {})})
              for name, doc in _run_documents(str(tmp_path), images=1)]
    second[3][1].update(stream_resource="res-2", descriptor="desc-2")
    # The first run's stop never comes (its RunEngine died after one image); its start comes twice.
    stream = [*first[:4], first[0], *second]
    decoded = _decoded(processor.process(_messages(stream)))
    assert [(name, value["dcid"]) for _, name, value in decoded] == [
        ("CollectionStarted", 40), ("ImageArrived", 40), ("CollectionEnded", 40),
        ("CollectionStarted", 41), ("ImageArrived", 41), ("CollectionEnded", 41)]
    assert (decoded[2][2]["status"], decoded[2][2]["images_collected"]) == ("aborted", 1)


def test_an_aborted_batch_counts_nothing(processor, tmp_path):
    processor.process(_messages(_run_documents(str(tmp_path))))
    processor.aborted()
    processor.committed()
    assert sum(processor.stats.values()) == 0
