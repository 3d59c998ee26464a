"""Seeded fuzz messages for the consumers: random bytes, broken and mutated Avro, records of other topics,
huge values, bad keys and junk headers, interleaved with valid events (``tests/e2e/test_fuzz.py``,
``scripts/soak-fuzz``).

Every message remembers what was done to it (``kind``) and, where it was built from a valid event, that
event (``record_type``, ``record``), so a test can tell what each consumer must do with it. Nothing here
decides that: the tests ask the real serde and each consumer's own rules.

``BEAMSTREAM_FUZZ_MESSAGES`` (bad messages per consumer) and ``BEAMSTREAM_FUZZ_SEED`` size and seed a run;
a failing run is repeated with the same seed.
"""

from __future__ import annotations

import copy
import io
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import fastavro

from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.examples import example_event
from beamstream.schemas.serde import SINGLE_OBJECT_MAGIC, SchemaVersion, SingleObjectSerde

MESSAGES_ENV = "BEAMSTREAM_FUZZ_MESSAGES"
SEED_ENV = "BEAMSTREAM_FUZZ_SEED"
#: Bad messages per consumer in CI (the soak script asks for more).
CI_MESSAGES = 10_000
#: The engine's and the tools' own headers, given junk values.
ENGINE_HEADERS = ("beamstream-reinjected", "beamstream-reinjected-from", "beamstream-replayed",
                  "beamstream-replayed-from")
#: The largest value sent: a record (value, key and headers) must stay under the producer's and the
#: broker's limit (librdkafka's message.max.bytes, 1,000,000), but its dead letter, which carries
#: the value, the key and the headers again, need not.
HUGE_VALUE_BYTES = (900_000, 990_000)
#: Odd values a mutated field takes, by Avro type.
ODD_INTS = (0, -1, -(2**31), 2**31 - 1, 2**24 + 3)
ODD_LONGS = (0, -1, -(2**63), 2**63 - 1, 2**53 + 1, 2**31)
ODD_DOUBLES = (math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308, 5e-324)
ODD_TIMES = (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
             datetime(1970, 1, 1, tzinfo=UTC))


def fuzz_messages(default: int = CI_MESSAGES) -> int:
    """Bad messages per consumer in this run (``BEAMSTREAM_FUZZ_MESSAGES``)."""
    return int(os.environ.get(MESSAGES_ENV, str(default)))


def fuzz_seed() -> int:
    """The seed of this run (``BEAMSTREAM_FUZZ_SEED``, default 0)."""
    return int(os.environ.get(SEED_ENV, "0"))


@dataclass
class FuzzMessage:
    """One message to send: where, what, and what was done to it."""

    topic: str  # logical topic
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    kind: str = "valid"  # "valid", or the damage done (see Fuzzer.KINDS)
    record_type: str | None = None  # the event it was made from
    record: dict | None = None  # that event (after a value mutation: the mutated one)
    partition: int = -1  # where it landed (filled by produce_all)
    offset: int = -1

    @property
    def valid(self) -> bool:
        return self.kind == "valid"

    @property
    def where(self) -> tuple[int, int]:
        return self.partition, self.offset


class Fuzzer:
    """Builds valid and damaged messages for a topic, from a seeded random generator."""

    #: Damage to a message's value, with weights (the value kinds), then to its key and headers alone.
    KINDS = {
        "random-bytes": 8, "empty": 2, "null": 2, "bad-magic": 4, "confluent-header": 2,
        "unknown-fingerprint": 4, "truncated": 8, "trailing-bytes": 4, "flipped-bytes": 8,
        "other-body": 6, "wrong-field-type": 8, "bad-enum": 3, "bad-utf8": 3, "timestamp-overflow": 3,
        "other-record-type": 8, "huge": 1, "huge-avro": 1, "mutated-value": 16, "bad-key": 5,
        "junk-headers": 5,
    }

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.serde = SingleObjectSerde()
        self.catalog = self.serde.catalog
        self._kinds = list(self.KINDS)
        self._weights = [self.KINDS[k] for k in self._kinds]

    # -- valid -------------------------------------------------------------------------
    def valid(self, topic: str, record_type: str, record: dict, key: bytes) -> FuzzMessage:
        """A valid event as producers send it (no headers)."""
        return FuzzMessage(topic, key, self.serde.encode(record_type, record), [], "valid", record_type, record)

    # -- damaged -----------------------------------------------------------------------
    def bad(self, topic: str, record_type: str, record: dict, key: bytes, others: Sequence[str] = (),
            kind: str | None = None) -> FuzzMessage:
        """A damaged message made from a valid ``record`` of ``record_type``; ``others`` are record types
        that do not belong on ``topic`` (for "other-record-type")."""
        kind = kind or self.rng.choices(self._kinds, self._weights)[0]
        version = self.catalog.schema(record_type)
        record = copy.deepcopy(record)
        encoded = self.serde.encode(record_type, record)
        build: dict[str, Callable[[], bytes | None]] = {
            "random-bytes": lambda: self.rng.randbytes(self.rng.randint(1, 80)),
            "empty": lambda: b"",
            "null": lambda: None,
            "bad-magic": lambda: self._bad_magic(encoded),
            "confluent-header": lambda: b"\x00" + self.rng.randbytes(4) + encoded[10:],
            "unknown-fingerprint": lambda: SINGLE_OBJECT_MAGIC + self.rng.randbytes(8) + encoded[10:],
            "truncated": lambda: encoded[: self.rng.randint(0, len(encoded) - 1)],
            "trailing-bytes": lambda: encoded + self.rng.randbytes(self.rng.randint(1, 16)),
            "flipped-bytes": lambda: self._flipped(encoded),
            "other-body": lambda: encoded[:10] + self._other_body(record_type),
            "wrong-field-type": lambda: self._retyped(version, record, self._wrong_type),
            "bad-enum": lambda: self._retyped(version, record, self._bad_enum),
            "bad-utf8": lambda: self._retyped(version, record, self._bad_utf8),
            "timestamp-overflow": lambda: self._retyped(version, record, self._overflowing_time),
            "other-record-type": lambda: self._other_record(others or [n for n in self.catalog.names()
                                                                        if n != record_type]),
            "huge": lambda: self.rng.randbytes(self.rng.randint(*HUGE_VALUE_BYTES)),
            "huge-avro": lambda: self._huge_avro(version, record),
            "mutated-value": lambda: None,  # below: it keeps a record
            "bad-key": lambda: encoded,
            "junk-headers": lambda: encoded,
        }
        value = build[kind]()
        if kind == "mutated-value":
            record = self._mutated(version.schema, record)
            value = self.serde.encode(record_type, record)
        bad_key = kind == "bad-key" or (kind not in ("junk-headers",) and self.rng.random() < 0.2)
        if bad_key:
            key = self._bad_key(record)
        headers = self._junk_headers() if kind == "junk-headers" or self.rng.random() < 0.2 else []
        if value is not None and len(value) + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers) \
                > 995_000:
            key, headers = key[:1000] if key else key, headers[:3]  # the source record itself must fit
        keeps_record = kind in ("mutated-value", "bad-key", "junk-headers")
        return FuzzMessage(topic, key, value, headers, kind, record_type, record if keeps_record else None)

    # -- values --------------------------------------------------------------------------
    def _bad_magic(self, encoded: bytes) -> bytes:
        first = self.rng.choice([b"\xc3\x02", b"\xc4\x01", b"\x01\xc3", b"{\""])
        return first + encoded[2:]

    def _flipped(self, encoded: bytes) -> bytes:
        data = bytearray(encoded)
        for _ in range(self.rng.randint(1, 4)):
            position = self.rng.randrange(10, len(data)) if len(data) > 10 else self.rng.randrange(len(data))
            data[position] = self.rng.randrange(256)
        return bytes(data)

    def _other_body(self, record_type: str) -> bytes:
        other = self.rng.choice([n for n in self.catalog.names() if n != record_type])
        return self.serde.encode(other, example_event(other))[10:]

    def _other_record(self, names: Sequence[str]) -> bytes:
        other = self.rng.choice(list(names))
        return self.serde.encode(other, example_event(other))

    def _huge_avro(self, version: SchemaVersion, record: dict) -> bytes:
        """The record with a string field grown to most of a megabyte (it decodes)."""
        strings = [f["name"] for f in version.schema["fields"] if f["type"] == "string"]
        if not strings:
            return self.rng.randbytes(self.rng.randint(*HUGE_VALUE_BYTES))
        record[self.rng.choice(strings)] = "x" * self.rng.randint(*HUGE_VALUE_BYTES)
        return self.serde.encode(version.name, record)

    def _retyped(self, version: SchemaVersion, record: dict, change: Callable) -> bytes:
        """The record written with one field's type changed by ``change`` (schema field -> (type, value) or
        None when it does not apply), behind the real schema's fingerprint: what a producer with a wrong
        or stale schema, or a corrupted one, would send."""
        schema = copy.deepcopy(version.schema)
        fields = list(schema["fields"])
        self.rng.shuffle(fields)
        for spec in fields:
            changed = change(spec)
            if changed is not None:
                spec["type"], record = changed[0], {**record, spec["name"]: changed[1]}
                spec.pop("default", None)  # the old default need not fit the new type
                break
        else:  # nothing to change of that kind: a wrong type then
            return self._retyped(version, record, self._wrong_type)
        parsed = fastavro.parse_schema(schema, named_schemas={})
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed, record)
        return SINGLE_OBJECT_MAGIC + version.fingerprint + out.getvalue()

    def _wrong_type(self, spec: dict):
        return self.rng.choice([("string", "not a number " * self.rng.randint(1, 4)), ("long", 2**40 + 7),
                                ("double", math.nan), ("boolean", True), ("bytes", self.rng.randbytes(7)),
                                ({"type": "array", "items": "long"}, [1, -2, 3])])

    @staticmethod
    def _bad_enum(spec: dict):
        kind = spec["type"]
        if isinstance(kind, dict) and kind.get("type") == "enum":
            return "int", len(kind["symbols"]) + 5  # an index past the symbols
        return None

    @staticmethod
    def _bad_utf8(spec: dict):
        if spec["type"] == "string":
            return "bytes", b"bad \xff\xfe utf-8 \xc3"
        return None

    def _overflowing_time(self, spec: dict):
        kind = spec["type"]
        if isinstance(kind, dict) and kind.get("logicalType", "").startswith("timestamp"):
            return "long", self.rng.choice([2**62, -(2**62), 2**63 - 1])
        return None

    def _mutated(self, schema: dict, record: dict) -> dict:
        """The record with one to three fields set to odd values their types allow."""
        fields = [f for f in schema["fields"]]
        for spec in self.rng.sample(fields, min(len(fields), self.rng.randint(1, 3))):
            record[spec["name"]] = self._odd(spec["type"], record.get(spec["name"]))
        return record

    def _odd(self, kind, current):
        """An odd value of Avro type ``kind`` (``current`` is the field's valid value)."""
        if isinstance(kind, list):  # a union: null, or an odd value of another branch
            branches = [b for b in kind if b != "null"]
            if "null" in kind and (current is not None or not branches) and self.rng.random() < 0.5:
                return None
            branch = self.rng.choice(branches)
            return self._odd(branch, current if current is not None else _default_of(branch))
        if isinstance(kind, dict):
            logical, base = kind.get("logicalType"), kind.get("type")
            if logical and logical.startswith("timestamp"):
                return self.rng.choice(ODD_TIMES)
            if base == "enum":
                return self.rng.choice(kind["symbols"])
            if base == "array":
                items = current or [_default_of(kind["items"])]
                return self.rng.choice([[], items * self.rng.randint(50, 2000),
                                        [self._odd(kind["items"], items[0]) for _ in range(3)]])
            if base == "map":
                odd = [self._odd(kind["values"], _default_of(kind["values"])) for _ in range(3)]
                return self.rng.choice([{}, {"": odd[0], "k" * 300: odd[1], "\x00": odd[2]}])
            if base == "record":
                value = copy.deepcopy(current) if isinstance(current, dict) else _default_of(kind)
                return self._mutated(kind, value)
            return self._odd(base, current)
        return {
            "int": lambda: self.rng.choice(ODD_INTS),
            "long": lambda: self.rng.choice(ODD_LONGS),
            "double": lambda: self.rng.choice(ODD_DOUBLES),
            "float": lambda: self.rng.choice(ODD_DOUBLES),
            "boolean": lambda: not current,
            "string": lambda: self.rng.choice(["", "x" * 100_000, "nul\x00in/the/middle", "../../../../etc/passwd",
                                               "é☃\U0001f4a5", " ", "####"]),
            "bytes": lambda: self.rng.choice([b"", self.rng.randbytes(5000)]),
            "null": lambda: None,
        }[kind]()

    # -- keys and headers ------------------------------------------------------------------
    def _bad_key(self, record: dict) -> bytes | None:
        dcid = record.get("dcid") if isinstance(record.get("dcid"), int) else 1
        return self.rng.choice([None, b"", b"not-a-number", b"-7", str(dcid + 1).encode(), b"1:2:3", b"\xff\xfe",
                                b"9" * 40, self.rng.randbytes(self.rng.randint(1, 10_000))])

    def _junk_headers(self) -> list[tuple[str, bytes | None]]:
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(self.rng.randint(1, 6)):
            name = self.rng.choice(ENGINE_HEADERS + ("", "x" * 300, "é", "content-type"))
            value = self.rng.choice([None, b"", b"-3", b"abc", b"99999999999999999999", b"2147483648",
                                     b"\xff\x00", b"1" * 5000, b"  4 ", b"1_0", b"0x10", b"nan"])
            headers.append((name, value))
        if self.rng.random() < 0.05:
            headers += [(f"h{i}", b"v") for i in range(200)]
        return headers


def _default_of(kind):
    """Some valid value of Avro type ``kind``."""
    if isinstance(kind, list):
        return None if "null" in kind else _default_of(kind[0])
    if isinstance(kind, dict):
        if kind.get("logicalType", "").startswith("timestamp"):
            return datetime(2026, 1, 1, tzinfo=UTC)
        base = kind.get("type")
        if base == "record":
            return {f["name"]: _default_of(f["type"]) for f in kind["fields"]}
        if base == "enum":
            return kind["symbols"][0]
        if base == "array":
            return []
        if base == "map":
            return {}
        return _default_of(base)
    return {"int": 1, "long": 1, "double": 1.0, "float": 1.0, "boolean": False, "string": "s", "bytes": b"",
            "null": None}[kind]


def interleave(rng: random.Random, valid: list[FuzzMessage], bad: list[FuzzMessage]) -> list[FuzzMessage]:
    """``bad`` messages spread at random among ``valid`` ones, each list keeping its own order."""
    slots = [True] * len(valid) + [False] * len(bad)
    rng.shuffle(slots)
    valid_iter, bad_iter = iter(valid), iter(bad)
    return [next(valid_iter) if is_valid else next(bad_iter) for is_valid in slots]


def produce_all(settings: Settings, messages: Sequence[FuzzMessage], timeout_s: float = 120.0) -> None:
    """Send ``messages`` in order (each to its own logical topic, by its own key) and note where each landed.
    Raises if any was not delivered."""
    producer = make_producer(settings, **{"message.max.bytes": 1_000_000, "linger.ms": 20})
    failures: list[str] = []

    def delivered(message: FuzzMessage):
        def report(error, record) -> None:
            if error is not None:
                failures.append(f"{message.kind} on {message.topic}: {error.str()}")
            else:
                message.partition, message.offset = record.partition(), record.offset()
        return report

    names = {}
    for message in messages:
        topic = names.setdefault(message.topic, topic_name(settings, message.topic))
        while True:
            try:
                producer.produce(topic, message.value, message.key, headers=message.headers or None,
                                 on_delivery=delivered(message))
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(timeout_s)
    if remaining or failures:
        raise AssertionError(f"{remaining} fuzz messages not delivered; failures: {failures[:5]}")
