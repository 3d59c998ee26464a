"""The wire format: Avro encoding and decoding of every Beamstream event.

Two encodings, chosen by settings:

* Avro single-object encoding (the default): ``C3 01`` + the writer schema's
  8-byte CRC-64-AVRO fingerprint + the Avro body. Writer schemas are resolved
  by fingerprint from this package's current and historical ``.avsc`` files, so
  messages written before a schema change stay readable.
* The Confluent wire format (``00`` + 4-byte schema id + body) through a Schema
  Registry, with the subject-name strategy set explicitly to topic+record name,
  because some topics (collection events) carry more than one record type.

Every failure is a typed :class:`SerdeError` naming what was wrong; callers
route such messages to a dead-letter topic.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

from beamstream.schemas.writer_checks import compile_check

SCHEMA_DIR = Path(__file__).resolve().parent
HISTORY_DIR = SCHEMA_DIR / "history"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


class SerdeError(Exception):
    """Base of every encoding/decoding failure."""


class CorruptMessageError(SerdeError):
    """The bytes are not a valid message of the expected encoding."""


class UnknownSchemaError(SerdeError):
    """The message names a writer schema (fingerprint or registry id) nobody knows."""


class SchemaMismatchError(SerdeError):
    """The message is a valid event, but of another record type than the caller expects."""


class InvalidRecordError(SerdeError):
    """A value to encode does not fit its schema (the message names the field)."""


@dataclass(frozen=True)
class SchemaVersion:
    """One parsed schema version."""

    name: str  # short record name, e.g. "ImageArrived"
    version: str  # "current" or "v1", "v2" ... (or "id N": a writer schema from a registry)
    schema: dict
    canonical: str
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO as written on the wire

    @cached_property
    def codec(self) -> dict:
        """The schema as fastavro's reader, writer and validator take it. ``schema`` is parsed without
        fastavro's "already parsed" mark (it stays plain JSON for fingerprints and the registry), and
        fastavro parses such a schema again on every call: twice the cost of reading the body."""
        return fastavro.parse_schema(self.schema, named_schemas={})

    @cached_property
    def writer_check(self):
        """The checks fastavro's writer leaves out, for this schema (None: the writer checks it all)."""
        return compile_check(self.schema)

    @property
    def full_name(self) -> str:
        return self.schema["name"]


def _load(path: Path, name: str, version: str) -> SchemaVersion:
    raw = json.loads(path.read_text())
    parsed = fastavro.parse_schema(raw, _write_hint=False, named_schemas={})
    canonical = to_parsing_canonical_form(parsed)
    return SchemaVersion(name, version, parsed, canonical,
                         bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")))


class SchemaCatalog:
    """All record types: the current schema of each and every historical version."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        self.current: dict[str, SchemaVersion] = {}
        self.history: dict[str, list[SchemaVersion]] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(directory.glob("*.avsc")):
            version = _load(path, path.stem, "current")
            self.current[version.name] = version
            self.by_fingerprint[version.fingerprint] = version
        for path in sorted((directory / "history").glob("*.avsc")):
            name, _, tag = path.stem.partition(".")
            version = _load(path, name, tag)
            self.history.setdefault(name, []).append(version)
            self.by_fingerprint.setdefault(version.fingerprint, version)
        self.by_full_name = {v.full_name: v for v in self.current.values()}

    def names(self) -> list[str]:
        """Short names of every record type."""
        return sorted(self.current)

    def schema(self, name: str) -> SchemaVersion:
        """The current schema of a record type (short or full name)."""
        version = self.current.get(name) or self.by_full_name.get(name)
        if version is None:
            raise SchemaMismatchError(f"no record type {name!r}; known: {', '.join(self.names())}")
        return version


@dataclass(frozen=True)
class Decoded:
    """A decoded message: its record type (short name) and value."""

    name: str
    value: dict


class Serde(Protocol):
    """What producers and consumers use; see :func:`make_serde`."""

    catalog: SchemaCatalog

    def encode(self, name: str, value: dict, topic: str) -> bytes: ...

    def decode(self, data: bytes, topic: str, expected: str | Iterable[str] | None = None) -> Decoded: ...


def _expected_set(expected: str | Iterable[str] | None) -> set[str] | None:
    if expected is None:
        return None
    return {expected} if isinstance(expected, str) else set(expected)


def _check_expected(name: str, expected: set[str] | None, topic: str) -> None:
    if expected is not None and name not in expected:
        raise SchemaMismatchError(
            f"message on {topic} is of type {name}, expected {' or '.join(sorted(expected))}"
        )


def _validate(version: SchemaVersion, value: dict) -> None:
    try:
        validate(value, version.codec, raise_errors=True)
    except fastavro.validation.ValidationError as exc:
        problems = "; ".join(str(e) for e in exc.errors) if hasattr(exc, "errors") else str(exc)
        raise InvalidRecordError(f"{version.name} does not fit its schema: {problems}") from None


def _read_body(body: bytes, writer: SchemaVersion, reader: SchemaVersion, where: str) -> dict:
    stream = io.BytesIO(body)
    try:
        # Resolving a schema against itself costs more than reading the body: only an old writer needs it.
        same = reader.fingerprint == writer.fingerprint
        value = fastavro.schemaless_reader(stream, writer.codec, None if same else reader.codec)
    except (EOFError, ValueError, IndexError, UnicodeDecodeError, struct.error, OverflowError,
            fastavro.read.SchemaResolutionError) as exc:  # OverflowError: a timestamp past year 9999
        raise CorruptMessageError(f"{where}: {writer.name} body cannot be decoded ({exc})") from None
    if stream.tell() != len(body):
        raise CorruptMessageError(
            f"{where}: {len(body) - stream.tell()} trailing bytes after a {writer.name} body"
        )
    # fastavro reads an int field of any width (a corrupt or mistyped body gives 2**40 for an "int"), and a
    # value that does not fit its own schema cannot be written again: consumers re-encode what they read.
    if reader.writer_check is not None and not reader.writer_check(value):
        try:
            _validate(reader, value)
        except InvalidRecordError as exc:
            raise CorruptMessageError(f"{where}: {exc}") from None
    return value


class SingleObjectSerde:
    """Avro single-object encoding with writer schemas found by fingerprint."""

    def __init__(self, catalog: SchemaCatalog | None = None) -> None:
        self.catalog = catalog or SchemaCatalog()

    def encode(self, name: str, value: dict, topic: str = "") -> bytes:
        """Encode ``value`` as record type ``name``; a value that does not fit raises :class:`InvalidRecordError`
        naming the field (the writer's own checks, and :mod:`schemas.writer_checks` for what it lets through)."""
        version = self.catalog.schema(name)
        header = SINGLE_OBJECT_MAGIC + version.fingerprint
        try:
            if version.writer_check is None or version.writer_check(value):
                out = io.BytesIO(header)
                out.seek(len(header))
                fastavro.schemaless_writer(out, version.codec, value)
                return out.getvalue()
        except Exception:  # noqa: BLE001 - whatever the writer says, the validator says it better
            pass
        _validate(version, value)  # raises, naming the field
        out = io.BytesIO(header)  # it fits after all (the checks are stricter than validation)
        out.seek(len(header))
        fastavro.schemaless_writer(out, version.codec, value)
        return out.getvalue()

    def decode(self, data: bytes, topic: str = "", expected: str | Iterable[str] | None = None) -> Decoded:
        """Decode a message, resolving the writer's schema to the current one of its type."""
        where = f"message on {topic}" if topic else "message"
        if data is None or len(data) < 10 or data[:2] != SINGLE_OBJECT_MAGIC:
            raise CorruptMessageError(f"{where} is not Avro single-object encoded (bad header)")
        writer = self.catalog.by_fingerprint.get(bytes(data[2:10]))
        if writer is None:
            raise UnknownSchemaError(f"{where} was written with unknown schema fingerprint {data[2:10].hex()}")
        _check_expected(writer.name, _expected_set(expected), topic or "the topic")
        reader = self.catalog.current[writer.name]
        return Decoded(writer.name, _read_body(bytes(data[10:]), writer, reader, where))


class RegistrySerde:
    """Confluent wire format through a Confluent-compatible Schema Registry."""

    def __init__(self, url: str, catalog: SchemaCatalog | None = None, client_config: dict | None = None) -> None:
        self.catalog = catalog or SchemaCatalog()
        self.url = url
        self._client_config = {"url": url, **(client_config or {})}
        self._serializers: dict[str, Any] = {}
        self._writers: dict[int, SchemaVersion] = {}

    @cached_property
    def client(self):
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient(self._client_config)

    def _schema_str(self, name: str) -> str:
        return json.dumps(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))

    def encode(self, name: str, value: dict, topic: str) -> bytes:
        """Encode through confluent-kafka's AvroSerializer (subject = topic-record name)."""
        from confluent_kafka.schema_registry import topic_record_subject_name_strategy
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        version = self.catalog.schema(name)
        _validate(version, value)
        serializer = self._serializers.get(version.name)
        if serializer is None:
            serializer = AvroSerializer(
                self.client,
                self._schema_str(version.name),
                conf={
                    "auto.register.schemas": True,
                    "subject.name.strategy": topic_record_subject_name_strategy,
                },
            )
            self._serializers[version.name] = serializer
        try:
            return serializer(value, SerializationContext(topic, MessageField.VALUE))
        except Exception as exc:  # registry unreachable or refusing the schema
            raise SerdeError(f"schema registry at {self.url} refused {version.name} for {topic}: {exc}") from None

    def _writer(self, schema_id: int, where: str) -> SchemaVersion:
        writer = self._writers.get(schema_id)
        if writer is None:
            try:
                registered = self.client.get_schema(schema_id)
            except Exception as exc:
                if getattr(exc, "http_status_code", None) == 404:
                    raise UnknownSchemaError(
                        f"{where}: schema id {schema_id} unknown to the registry ({exc})"
                    ) from None
                raise SerdeError(
                    f"{where}: schema registry at {self.url} could not be asked for schema id {schema_id}: {exc}"
                ) from None
            try:
                raw = json.loads(registered.schema_str)
                name = raw.get("name", "").rsplit(".", 1)[-1] if isinstance(raw, dict) else ""
                parsed = fastavro.parse_schema(raw, _write_hint=False, named_schemas={})
            except (ValueError, TypeError, fastavro.schema.SchemaParseException) as exc:
                raise UnknownSchemaError(f"{where}: schema id {schema_id} is not an Avro record ({exc})") from None
            canonical = to_parsing_canonical_form(parsed)
            writer = SchemaVersion(name, f"id {schema_id}", parsed, canonical,
                                   bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")))
            self._writers[schema_id] = writer
        return writer

    def decode(self, data: bytes, topic: str, expected: str | Iterable[str] | None = None) -> Decoded:
        """Decode with the writer schema the registry has for the message's id, resolved to
        the current schema of its type (the same reader as the single-object serde)."""
        where = f"message on {topic}"
        if data is None or len(data) < 5 or data[:1] != CONFLUENT_MAGIC:
            raise CorruptMessageError(f"{where} is not in the Confluent wire format (bad header)")
        schema_id = struct.unpack(">I", data[1:5])[0]
        writer = self._writer(schema_id, where)
        if writer.name not in self.catalog.current:
            raise UnknownSchemaError(f"{where}: schema id {schema_id} is a {writer.name}, not a Beamstream event")
        _check_expected(writer.name, _expected_set(expected), topic)
        reader = self.catalog.current[writer.name]
        return Decoded(writer.name, _read_body(bytes(data[5:]), writer, reader, where))


def make_serde(schema_registry_url: str = "", client_config: dict | None = None) -> Serde:
    """The serde the settings ask for: registry mode when a URL is given, else single-object."""
    if schema_registry_url:
        return RegistrySerde(schema_registry_url, client_config=client_config)
    return SingleObjectSerde()
