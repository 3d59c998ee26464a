"""Avro contracts: round trips through real topics, schema evolution, typed decode errors."""

import io

import fastavro
import pytest

from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.topics import declared_topics
from beamstream.schemas.examples import example_event, example_names
from beamstream.schemas.serde import (
    CorruptMessageError,
    InvalidRecordError,
    SchemaCatalog,
    SchemaMismatchError,
    SingleObjectSerde,
    UnknownSchemaError,
)
from tests.helpers.harness import read_decoded

CATALOG = SchemaCatalog()


def _version_key(version) -> int:
    return int(version.version.lstrip("v"))


def test_every_record_type_has_an_example_and_a_history():
    assert example_names() == CATALOG.names()
    for name in CATALOG.names():
        assert CATALOG.history.get(name), f"{name} has no recorded version in schemas/history"


def test_current_schema_is_the_latest_recorded_version():
    # A schema change must add a history version, so compatibility is checked against it.
    for name, current in CATALOG.current.items():
        latest = max(CATALOG.history[name], key=_version_key)
        assert latest.canonical == current.canonical, f"{name}: record the change as a new history version"


def test_every_field_is_documented():
    for name, version in CATALOG.current.items():
        undocumented = [f["name"] for f in version.schema["fields"] if not f.get("doc")]
        assert not undocumented, f"{name}: fields without doc: {undocumented}"
        assert version.full_name.startswith("org.beamstream.")


def _write(schema, value) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, value)
    return out.getvalue()


def _sample_for(version) -> dict:
    fields = {f["name"] for f in version.schema["fields"]}
    return {k: v for k, v in example_event(version.name).items() if k in fields}


@pytest.mark.parametrize("name", CATALOG.names())
def test_backward_and_forward_compatible_with_every_previous_version(name):
    current = CATALOG.current[name]
    for old in CATALOG.history[name]:
        # backward: today's readers read what old writers wrote
        old_value = _sample_for(old)
        read = fastavro.schemaless_reader(io.BytesIO(_write(old.schema, old_value)), old.schema, current.schema)
        for key, value in old_value.items():
            assert read[key] == value
        # forward: old readers read what today's writers write
        new_value = example_event(name)
        read = fastavro.schemaless_reader(io.BytesIO(_write(current.schema, new_value)), current.schema,
                                          old.schema)
        assert set(read) == {f["name"] for f in old.schema["fields"]}


def test_messages_of_an_older_version_decode_by_fingerprint():
    serde = SingleObjectSerde()
    old = next(v for v in CATALOG.history["ImageResult"] if v.version == "v1")
    assert old.fingerprint != CATALOG.current["ImageResult"].fingerprint
    data = b"\xc3\x01" + old.fingerprint + _write(old.schema, _sample_for(old))
    decoded = serde.decode(data, "t", "ImageResult")
    assert decoded.value["analysis_backend"] == "numba"  # the default filled in for the old writer
    assert decoded.value["n_spots_total"] == example_event("ImageResult")["n_spots_total"]


@pytest.mark.kafka
def test_every_schema_round_trips_through_its_real_topic(kafka_settings):
    serde = SingleObjectSerde()
    producer = make_producer(kafka_settings)
    expected = {}
    topics = []
    for spec in declared_topics(kafka_settings):
        topic = spec.name(kafka_settings)
        topics.append(topic)
        for name in spec.record_types:
            producer.produce(topic, serde.encode(name, example_event(name), topic), name.encode())
            expected[(topic, name)] = example_event(name)
    assert producer.flush(30) == 0

    assert read_decoded(kafka_settings, topics, serde, len(expected)) == expected


def test_corrupted_body_is_a_corrupt_message_error():
    serde = SingleObjectSerde()
    data = serde.encode("ImageArrived", example_event("ImageArrived"), "t")
    with pytest.raises(CorruptMessageError, match="ImageArrived body cannot be decoded"):
        serde.decode(data[:-6], "t", "ImageArrived")
    with pytest.raises(CorruptMessageError, match="trailing bytes"):
        serde.decode(data + b"\x00\x01", "t", "ImageArrived")
    with pytest.raises(CorruptMessageError, match="not Avro single-object encoded"):
        serde.decode(b'{"dcid": 1}', "t", "ImageArrived")


def test_unknown_fingerprint_is_named():
    serde = SingleObjectSerde()
    data = serde.encode("ImageArrived", example_event("ImageArrived"), "t")
    forged = data[:2] + bytes(8) + data[10:]
    with pytest.raises(UnknownSchemaError, match="unknown schema fingerprint 0000000000000000"):
        serde.decode(forged, "t")


def test_message_of_another_schema_is_a_mismatch():
    serde = SingleObjectSerde()
    data = serde.encode("CollectionEnded", example_event("CollectionEnded"), "beamstream.images")
    with pytest.raises(SchemaMismatchError, match="is of type CollectionEnded, expected ImageArrived"):
        serde.decode(data, "beamstream.images", "ImageArrived")


def test_invalid_value_names_the_field():
    serde = SingleObjectSerde()
    value = example_event("ImageArrived")
    value["image_number"] = "seven"
    with pytest.raises(InvalidRecordError, match="image_number"):
        serde.encode("ImageArrived", value, "t")
