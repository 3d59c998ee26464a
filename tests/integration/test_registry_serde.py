"""Registry mode of the wire format against a real Confluent-compatible Schema Registry.

The registry is the project's own launcher (:class:`beamstream.registry.LocalRegistry`:
Apicurio Registry from Maven Central, in-memory storage) in a temporary home on a
free port. It is part of CI: when it cannot be had, these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import socket
import struct
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form

from beamstream.operations.artifacts import load_lock
from beamstream.operations.registry import LOCK_FILE, LocalRegistry, RegistryError
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import declared_topics
from beamstream.schemas.examples import example_event
from beamstream.schemas.serde import (
    HISTORY_DIR,
    SCHEMA_DIR,
    CorruptMessageError,
    RegistrySerde,
    SchemaCatalog,
    SchemaMismatchError,
    SerdeError,
    UnknownSchemaError,
)
from tests.helpers.harness import read_decoded

CATALOG = SchemaCatalog()
NAMESPACE = "org.beamstream"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[LocalRegistry]:
    """A running registry for this module, stopped at the end."""
    settings = load_settings(home=tmp_path_factory.mktemp("registry-home"), local_registry_port=_free_port())
    launcher = LocalRegistry(settings)
    launcher.up(progress=False)
    try:
        yield launcher
    finally:
        launcher.down()


@pytest.fixture
def serde(registry: LocalRegistry) -> RegistrySerde:
    """A fresh serde (empty caches) talking to the module's registry."""
    return RegistrySerde(registry.url)


@pytest.fixture
def topic() -> str:
    """A topic name of this test's own, so subjects never collide between tests."""
    return f"t{uuid.uuid4().hex[:10]}.events"


# -- example values built from the schemas themselves -------------------------------------------
_EPOCH = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def example_value(schema: object, fill: bool, named: dict | None = None, path: str = "v") -> object:
    """A valid value of an Avro schema (the ``.avsc`` JSON), exactly representable so that it
    survives a round trip unchanged.

    ``fill=True`` takes the first non-null branch of every union and puts two items in every
    array and map; ``fill=False`` takes null where a union allows it and leaves arrays and maps
    empty. Values differ by their path in the record, so swapped fields would be noticed.
    """
    named = {} if named is None else named
    seed = sum(path.encode()) % 97 + 1
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if not fill and "null" in schema:
            return None
        return example_value(branches[0], fill, named, path)
    if isinstance(schema, str):
        if schema in named:
            return example_value(named[schema], fill, named, path)
        schema = {"type": schema}
    assert isinstance(schema, dict)
    kind = schema["type"]
    if isinstance(kind, (list, dict)) or kind in named:
        return example_value(kind, fill, named, path)
    logical = schema.get("logicalType")
    if kind == "record":
        named[schema["name"]] = named[f"{schema.get('namespace', NAMESPACE)}.{schema['name']}"] = schema
        return {f["name"]: example_value(f["type"], fill, named, f"{path}.{f['name']}") for f in schema["fields"]}
    if kind == "enum":
        named[schema["name"]] = schema
        return schema["symbols"][seed % len(schema["symbols"])]
    if kind == "array":
        return [example_value(schema["items"], fill, named, f"{path}[{i}]") for i in range(2 if fill else 0)]
    if kind == "map":
        return {f"k{i}": example_value(schema["values"], fill, named, f"{path}[k{i}]") for i in range(2 if fill else 0)}
    if kind == "fixed":
        named[schema["name"]] = schema
        return bytes(range(schema["size"]))
    if logical == "timestamp-micros":
        return _EPOCH.replace(second=seed % 60)
    if logical == "timestamp-millis":
        return _EPOCH.replace(second=seed % 60, microsecond=890000)
    if logical == "date":
        return date(2026, 3, seed % 28 + 1)
    scalars = {
        "null": None,
        "boolean": seed % 2 == 0,
        "int": -seed if seed % 3 == 0 else seed,
        "long": 2**40 + seed,
        "float": seed + 0.5,
        "double": seed * 0.25 - 3.0,
        "string": f"{path.rsplit('.', 1)[-1]}-{seed} Å",
        "bytes": bytes([0, 255, seed]),
    }
    return scalars[kind]


def _raw_schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def _variants() -> list[tuple[str, str]]:
    return [(name, variant) for name in CATALOG.names() for variant in ("sample", "filled", "minimal")]


def _value(name: str, variant: str) -> dict:
    if variant == "sample":
        return example_event(name)
    return example_value(_raw_schema(name), fill=variant == "filled")


def _schema_id(data: bytes) -> int:
    return struct.unpack(">I", data[1:5])[0]


def _canonical(schema_str: str) -> str:
    return to_parsing_canonical_form(fastavro.parse_schema(json.loads(schema_str), _write_hint=False,
                                                           named_schemas={}))


# -- tests ---------------------------------------------------------------------------------------
def test_registry_serves_the_confluent_api(registry: LocalRegistry):
    status = registry.status()
    assert status.running and status.pid == registry.pid()
    assert registry.url.endswith("/apis/ccompat/v7")
    assert registry.up(progress=False).pid == status.pid  # idempotent while running


@pytest.mark.parametrize(("name", "variant"), _variants())
def test_every_record_type_round_trips(serde: RegistrySerde, topic: str, name: str, variant: str):
    value = _value(name, variant)
    data = serde.encode(name, value, topic)
    assert data[:1] == b"\x00"
    decoded = serde.decode(data, topic, expected=name)
    assert decoded.name == name
    assert decoded.value == value


def test_subjects_are_topic_and_full_record_name(serde: RegistrySerde, topic: str):
    ids = {name: _schema_id(serde.encode(name, example_event(name), topic)) for name in CATALOG.names()}
    subjects = set(serde.client.get_subjects())
    for name in CATALOG.names():
        subject = f"{topic}-{NAMESPACE}.{name}"
        assert subject in subjects
        registered = serde.client.get_latest_version(subject)
        assert registered.schema_id == ids[name]
        assert _canonical(registered.schema.schema_str) == CATALOG.current[name].canonical
    assert len(set(ids.values())) == len(ids)  # one schema id per record type


def test_two_record_types_share_one_topic(serde: RegistrySerde, registry: LocalRegistry, topic: str):
    started = serde.encode("CollectionStarted", example_event("CollectionStarted"), topic)
    ended = serde.encode("CollectionEnded", example_event("CollectionEnded"), topic)
    reader = RegistrySerde(registry.url)  # a consumer knows only the ids on the wire
    kinds = ("CollectionStarted", "CollectionEnded")
    assert reader.decode(started, topic, expected=kinds).name == "CollectionStarted"
    assert reader.decode(ended, topic, expected=kinds).value == example_event("CollectionEnded")


def test_message_of_another_type_is_a_mismatch(serde: RegistrySerde, topic: str):
    data = serde.encode("CollectionEnded", example_event("CollectionEnded"), topic)
    with pytest.raises(SchemaMismatchError, match="is of type CollectionEnded, expected ImageArrived"):
        serde.decode(data, topic, expected="ImageArrived")


def test_corrupted_message_is_a_corrupt_message_error(serde: RegistrySerde, topic: str):
    data = serde.encode("ImageArrived", example_event("ImageArrived"), topic)
    with pytest.raises(CorruptMessageError, match="ImageArrived body cannot be decoded"):
        serde.decode(data[:-6], topic, expected="ImageArrived")
    with pytest.raises(CorruptMessageError, match="ImageArrived body cannot be decoded"):
        serde.decode(data[:5] + b"\xff" * 4, topic, expected="ImageArrived")
    with pytest.raises(CorruptMessageError, match="trailing bytes"):
        serde.decode(data + b"\x00\x01", topic, expected="ImageArrived")
    with pytest.raises(CorruptMessageError, match="not in the Confluent wire format"):
        serde.decode(b'{"dcid": 1}', topic)
    with pytest.raises(CorruptMessageError, match="not in the Confluent wire format"):
        serde.decode(b"\x00\x00", topic)


def test_unknown_schema_id_is_named(serde: RegistrySerde, topic: str):
    data = serde.encode("ImageArrived", example_event("ImageArrived"), topic)
    forged = b"\x00" + struct.pack(">I", 987654) + data[5:]
    with pytest.raises(UnknownSchemaError, match="schema id 987654 unknown to the registry"):
        serde.decode(forged, topic)


def test_schema_id_of_a_foreign_record_is_unknown(serde: RegistrySerde, topic: str):
    from confluent_kafka.schema_registry import Schema

    foreign = {"type": "record", "name": "Reading", "namespace": "com.example",
               "fields": [{"name": "x", "type": "int"}]}
    schema_id = serde.client.register_schema(f"{topic}-com.example.Reading", Schema(json.dumps(foreign), "AVRO"))
    with pytest.raises(UnknownSchemaError, match="is a Reading, not a Beamstream event"):
        serde.decode(b"\x00" + struct.pack(">I", schema_id) + b"\x02", topic)


def test_message_of_an_older_schema_version_decodes_to_the_current_one(serde: RegistrySerde, topic: str):
    from confluent_kafka.schema_registry import topic_record_subject_name_strategy
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    old_schema = json.loads((HISTORY_DIR / "ImageResult.v1.avsc").read_text())
    old_fields = {f["name"] for f in old_schema["fields"]}
    old_value = {k: v for k, v in example_event("ImageResult").items() if k in old_fields}
    old_writer = AvroSerializer(serde.client, json.dumps(old_schema),
                                conf={"auto.register.schemas": True,
                                      "subject.name.strategy": topic_record_subject_name_strategy})
    data = old_writer(old_value, SerializationContext(topic, MessageField.VALUE))
    current = serde.encode("ImageResult", example_event("ImageResult"), topic)
    assert _schema_id(data) != _schema_id(current)  # two versions under one subject

    decoded = serde.decode(data, topic, expected="ImageResult")
    assert decoded.value == {**old_value, "analysis_backend": "numba"}  # the default filled in


def test_unreachable_registry_is_a_serde_error_not_an_unknown_schema(serde: RegistrySerde, topic: str):
    data = serde.encode("ImageArrived", example_event("ImageArrived"), topic)
    offline = RegistrySerde(f"http://127.0.0.1:{_free_port()}/apis/ccompat/v7", client_config={"max.retries": 0})
    with pytest.raises(SerdeError, match="schema registry at .* refused ImageArrived"):
        offline.encode("ImageArrived", example_event("ImageArrived"), topic)
    with pytest.raises(SerdeError, match="could not be asked for schema id") as raised:
        offline.decode(data, topic)
    assert not isinstance(raised.value, UnknownSchemaError)  # an outage says nothing about the message


def test_registry_state_lives_under_home(registry: LocalRegistry):
    home = Path(registry.settings.home)
    assert registry.pid_file.is_file() and registry.pid_file.is_relative_to(home / "registry")
    assert registry.log_file.is_relative_to(home / "registry")
    assert registry.log_file.stat().st_size > 0


def test_registry_lock_file_pins_the_distribution_with_sha256():
    repository, [artifact] = load_lock(LOCK_FILE)
    assert repository == "https://repo1.maven.org/maven2"
    assert (artifact.group, artifact.artifact, artifact.classifier, artifact.extension) == (
        "io.apicurio", "apicurio-registry-app", "all", "tar.gz")
    assert artifact.relative_path == (
        f"io/apicurio/apicurio-registry-app/{artifact.version}/apicurio-registry-app-{artifact.version}-all.tar.gz")
    assert len(artifact.sha256) == 64 and artifact.size > 0


def test_taken_port_is_refused_naming_the_setting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        launcher = LocalRegistry(load_settings(home=tmp_path, local_registry_port=taken.getsockname()[1]))
        with pytest.raises(RegistryError, match="BEAMSTREAM_LOCAL_REGISTRY_PORT"):
            launcher.up(progress=False)
    assert not launcher.status().running


@pytest.mark.kafka
def test_every_record_type_round_trips_through_its_real_topic(registry: LocalRegistry, kafka_settings):
    serde = RegistrySerde(registry.url)
    producer = make_producer(kafka_settings)
    expected = {}
    topics = []
    for spec in declared_topics(kafka_settings):
        name_on_cluster = spec.name(kafka_settings)
        topics.append(name_on_cluster)
        for name in spec.record_types:
            producer.produce(name_on_cluster, serde.encode(name, example_event(name), name_on_cluster), name.encode())
            expected[(name_on_cluster, name)] = example_event(name)  # a record type may live on several topics
    assert producer.flush(30) == 0

    reader = RegistrySerde(registry.url)
    assert read_decoded(kafka_settings, topics, reader, len(expected)) == expected
