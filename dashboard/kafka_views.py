"""Read-only views of the cluster, the ones staff opened Kafka UI for: topics with partitions, offsets and
configs; messages browsed by partition, offset or time, decoded from Avro, filterable by dcid; consumer
groups with their members and per-partition lag.

Every function here blocks on Kafka, within :data:`TIMEOUT_S` (a browse within :data:`BROWSE_S` more);
:mod:`dashboard.kafka_routes` runs them off the event loop. Nothing here writes. A browse reads with its own
consumer, by ``assign()`` under a throwaway group id, and never commits: it leaves no consumer group behind.
Committed offsets and lag come from :class:`GroupLag`, whose clients never join a group either.
Only the deployment's topics and groups (those named with its prefix) are shown.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache, wraps
from typing import Any, TypeVar

from confluent_kafka import ConsumerGroupState, KafkaException, TopicPartition
from confluent_kafka.admin import ConfigResource, ConfigSource, OffsetSpec

from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_admin, make_consumer
from beamstream.platform.lag import GroupLag
from beamstream.platform.retained import Record, RetainedError, offset_bounds, offsets_at, read_range
from beamstream.platform.settings import Settings
from beamstream.platform.topics import TopicSpec, declared_topics
from beamstream.schemas.keys import parse_dcid_key
from beamstream.schemas.serde import Serde, SerdeError, make_serde

#: How long one cluster request may take before the page is told Kafka did not answer.
TIMEOUT_S = 10.0
#: How long a browse may read (then it stops and says how far it got).
BROWSE_S = 10.0
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
DEFAULT_SCAN, MAX_SCAN = 5_000, 50_000
#: Bytes of an undecodable value shown (as hex and, when it is UTF-8, as text).
RAW_SHOWN = 512
T = TypeVar("T")
_MAX_DCID = 2**63 - 1  # dcids are Avro longs
_WHITESPACE = str.maketrans("", "", "\n\r\t")
_BROWSE_PARAMETERS = ("partition", "offset", "time", "limit", "isolation", "dcid", "scan")


class QueryError(Exception):
    """The caller asked for something that is not there or cannot be meant (a 400); one line."""


class KafkaViewError(BeamstreamError):
    """The cluster did not answer in time or refused (a 503); one line."""


@dataclass(frozen=True)
class BrowseQuery:
    """What to read: where to start, how many, how, and which dcid to keep."""

    partition: int | None = None  # None: every partition
    start: str = "earliest"  # earliest | latest | offset | time
    offset: int | None = None
    time: datetime | None = None
    limit: int = DEFAULT_LIMIT
    read_committed: bool = True
    dcid: int | None = None
    scan: int = DEFAULT_SCAN


def parse_browse(query: Mapping[str, str]) -> BrowseQuery:
    """A :class:`BrowseQuery` from a request's query string; :class:`QueryError` naming the first mistake."""
    unknown = sorted(set(query) - set(_BROWSE_PARAMETERS))
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0]!r} (known: {', '.join(_BROWSE_PARAMETERS)})")
    raw_partition = query.get("partition", "")
    partition = None if raw_partition in ("", "all") else _whole(raw_partition, "partition", 0, 2**31 - 1)
    raw_offset, raw_time = query.get("offset", ""), query.get("time", "")
    if raw_offset and raw_time:
        raise QueryError("give a start offset or a start time, not both")
    start, offset, when = "earliest", None, None
    if raw_time:
        start, when = "time", parse_time(raw_time)
    elif raw_offset in ("earliest", "latest"):
        start = raw_offset
    elif raw_offset:
        start, offset = "offset", _whole(raw_offset, "offset", 0, 2**63 - 1, "'earliest' or 'latest'")
        if partition is None:
            raise QueryError("a start offset needs a partition (offsets are per partition)")
    isolation = query.get("isolation", "read_committed")
    if isolation not in ("read_committed", "read_uncommitted"):
        raise QueryError(f"isolation is read_committed or read_uncommitted, got {isolation!r}")
    raw_dcid = query.get("dcid", "")
    return BrowseQuery(partition, start, offset, when,
                       _whole(query.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT),
                       isolation == "read_committed",
                       _whole(raw_dcid, "dcid", 1, _MAX_DCID) if raw_dcid else None,
                       _whole(query.get("scan", str(DEFAULT_SCAN)), "scan", 1, MAX_SCAN))


def _whole(raw: str, name: str, low: int, high: int, alternatives: str = "") -> int:
    """``raw`` as a whole number within [low, high], else a QueryError naming ``name``."""
    text = raw.strip()
    if not text.isdigit() or not low <= int(text) <= high:
        also = f", {alternatives}" if alternatives else ""
        raise QueryError(f"{name} is a whole number from {low} to {high}{also}, got {raw!r}")
    return int(text)


def parse_time(raw: str) -> datetime:
    """An ISO-8601 time (without a zone: UTC) or epoch milliseconds, as an aware datetime."""
    text = raw.strip()
    try:
        when = datetime.fromtimestamp(int(text) / 1000, UTC) if text.isdigit() else datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise QueryError(f"time is ISO 8601 (e.g. 2026-12-05T10:30:00Z) or epoch milliseconds, got {raw!r}") \
            from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _answered(view: Callable[..., T]) -> Callable[..., T]:
    """``view`` with every way the cluster fails it (a refusal, no answer in time) as one KafkaViewError line."""
    @wraps(view)
    def answered(settings: Settings, *args: Any) -> T:
        try:
            return view(settings, *args)
        except (KafkaException, RetainedError, TimeoutError) as exc:
            why = _one_line(exc) or f"no answer within {TIMEOUT_S:g} s"
            raise KafkaViewError(f"Kafka at {settings.kafka_bootstrap}: {why}") from None
    return answered


# -- topics ----------------------------------------------------------------------------------
@_answered
def list_topics(settings: Settings) -> list[dict]:
    """The deployment's topics: partitions, replicas, under-replicated partitions and retained offsets."""
    admin = make_admin(settings)
    topics = _cluster_topics(admin, settings)
    offsets = _offsets(admin, {name: sorted(meta.partitions) for name, meta in topics.items()})
    specs = _specs(settings)
    rows = []
    for name, meta in sorted(topics.items()):
        spans = [offsets[name, p] for p in meta.partitions]
        rows.append({
            "topic": name, "logical": specs[name].logical_name if name in specs else None,
            "record_types": list(specs[name].record_types) if name in specs else [],
            "partitions": len(meta.partitions),
            "replicas": max((len(p.replicas) for p in meta.partitions.values()), default=0),
            "under_replicated": sum(len(p.isrs) < len(p.replicas) for p in meta.partitions.values()),
            "messages": sum(high - low for low, high in spans) if None not in spans else None,
        })
    return rows


@_answered
def describe_topic(settings: Settings, name: str) -> dict:
    """One topic: each partition's leader, replicas, in-sync replicas and offsets; its configs, non-default
    ones marked (and what Beamstream declares for it)."""
    admin = make_admin(settings)
    topics = _cluster_topics(admin, settings)
    topic = resolve(settings, topics, name)
    meta = topics[topic]
    offsets = _offsets(admin, {topic: sorted(meta.partitions)})
    spec = _specs(settings).get(topic)
    partitions = []
    for p, info in sorted(meta.partitions.items()):
        low, high = offsets[topic, p] or (None, None)
        partitions.append({"partition": p, "leader": info.leader, "replicas": list(info.replicas),
                           "isr": list(info.isrs), "low": low, "high": high,
                           "messages": None if low is None else high - low})
    return {"topic": topic, "logical": spec.logical_name if spec else None,
            "record_types": list(spec.record_types) if spec else [],
            "description": spec.description if spec else "", "partitions": partitions,
            "configs": _configs(admin, topic, spec.configs if spec else {})}


def resolve(settings: Settings, topics: Mapping[str, Any], name: str) -> str:
    """The cluster name of ``name`` (full, or without the deployment's prefix) among ``topics``."""
    for candidate in (name, f"{settings.topic_prefix}{name}"):
        if candidate in topics:
            return candidate
    shown = ", ".join(sorted(t.removeprefix(settings.topic_prefix) for t in topics)[:20])
    raise QueryError(f"no topic {name!r} on the cluster (topics: {shown or 'none'})")


def _cluster_topics(client, settings: Settings) -> dict[str, Any]:
    """The deployment's topics on the cluster (named with its prefix; Kafka's internal ones left out)."""
    found = client.list_topics(timeout=TIMEOUT_S).topics
    return {name: meta for name, meta in found.items()
            if name.startswith(settings.topic_prefix) and not name.startswith("__") and meta.error is None}


def _specs(settings: Settings) -> dict[str, TopicSpec]:
    return {spec.name(settings): spec for spec in declared_topics(settings)}


def _offsets(admin, partitions: Mapping[str, list[int]]) -> dict[tuple[str, int], tuple[int, int] | None]:
    """(first retained, high watermark) of every partition, in two batched requests; None where its
    leader did not answer."""
    asked = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
    if not asked:
        return {}
    found = {}
    for spec in (OffsetSpec.earliest(), OffsetSpec.latest()):
        futures = admin.list_offsets({tp: spec for tp in asked}, request_timeout=TIMEOUT_S)
        for tp, future in futures.items():
            try:
                found.setdefault((tp.topic, tp.partition), []).append(future.result(TIMEOUT_S).offset)
            except KafkaException:
                found[tp.topic, tp.partition] = [None, None]
    return {key: None if None in spans else (spans[0], spans[1]) for key, spans in found.items()}


def _configs(admin, topic: str, declared: Mapping[str, str]) -> list[dict]:
    """Every config of ``topic``: value, where it comes from, default or not; non-default ones first."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource], request_timeout=TIMEOUT_S)[resource].result(TIMEOUT_S)
    rows = [{"name": name, "value": None if entry.is_sensitive else entry.value,
             "source": ConfigSource(entry.source).name.lower(),
             "default": entry.source == ConfigSource.DEFAULT_CONFIG.value,
             "sensitive": entry.is_sensitive, "declared": declared.get(name)}
            for name, entry in entries.items()]
    return sorted(rows, key=lambda row: (row["default"], row["name"]))


# -- messages --------------------------------------------------------------------------------
@_answered
def browse(settings: Settings, name: str, query: BrowseQuery) -> dict:
    """Up to ``query.limit`` messages of topic ``name`` (per partition when reading all, then the first, or with
    ``latest`` the newest, ``limit`` by time), each decoded. With a dcid, records are scanned forward until
    ``limit`` match or ``query.scan`` are read; the answer says how far it scanned and why it stopped."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}browse-{uuid.uuid4().hex[:12]}",
                             read_committed=query.read_committed,
                             **{"enable.partition.eof": True, "fetch.wait.max.ms": 50})
    try:
        topics = _cluster_topics(consumer, settings)
        topic = resolve(settings, topics, name)
        partitions = sorted(topics[topic].partitions)
        if query.partition is not None and query.partition not in partitions:
            raise QueryError(f"{topic} has partitions 0 to {len(partitions) - 1}, not {query.partition}")
        chosen = partitions if query.partition is None else [query.partition]
        bounds = offset_bounds(consumer, topic, chosen, TIMEOUT_S)
        starts = _starts(consumer, topic, query, bounds)
        return {"topic": topic, "partition": query.partition,
                "isolation": "read_committed" if query.read_committed else "read_uncommitted",
                "start": query.start, "offset": query.offset,
                "time": query.time.isoformat() if query.time else None, "limit": query.limit,
                "dcid": query.dcid, "scan_limit": query.scan,
                "bounds": {p: {"low": low, "end": high, "start": starts[p]} for p, (low, high) in bounds.items()},
                **_read(settings, consumer, topic, query, {p: (starts[p], bounds[p][1]) for p in chosen})}
    finally:
        consumer.close()


def _starts(consumer, topic: str, query: BrowseQuery, bounds: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Where each partition is read from; an offset past a partition's end is the caller's mistake."""
    if query.start == "time":
        return offsets_at(consumer, topic, query.time, {p: high for p, (_, high) in bounds.items()}, TIMEOUT_S)
    if query.start == "latest":
        return {p: max(low, high - query.limit) for p, (low, high) in bounds.items()}
    if query.start == "offset":
        [(low, high)] = bounds.values()
        if query.offset > high:
            raise QueryError(f"offset {query.offset} is past the end of {topic} partition {query.partition} "
                             f"(offsets {low} to {high})")
        return {query.partition: max(query.offset, low)}
    return {p: low for p, (low, _) in bounds.items()}


def _read(settings: Settings, consumer, topic: str, query: BrowseQuery,
          ranges: dict[int, tuple[int, int]]) -> dict:
    """Read ``ranges`` until enough are kept, the scan bound, the time bound or the ends; decode what is kept."""
    serde = _serde(settings.schema_registry_url)
    kept: list[dict] = []
    per_partition: Counter[int] = Counter()
    scanned: dict[int, list[int]] = {}  # partition -> [first, last] offset read
    read, stopped, deadline = 0, "end", time.monotonic() + BROWSE_S

    def at_end(partition: int) -> bool:
        start, end = ranges[partition]
        return scanned.get(partition, [start, start - 1])[1] + 1 >= end

    def full(partition: int) -> bool:
        return per_partition[partition] >= query.limit and not at_end(partition)

    with closing(read_range(consumer, topic, ranges, stall_timeout=TIMEOUT_S)) as records:
        for record in records:
            read += 1
            span = scanned.setdefault(record.partition, [record.offset, record.offset])
            span[1] = record.offset
            if query.dcid is not None:
                row = message_row(serde, record)
                if row["dcid"] == query.dcid:
                    kept.append(row)
            elif per_partition[record.partition] < query.limit:
                kept.append(message_row(serde, record))
                per_partition[record.partition] += 1
            if query.dcid is not None and len(kept) >= query.limit:
                stopped = "limit"
            elif query.dcid is None and all(full(p) or at_end(p) for p in ranges):
                stopped = "limit" if any(full(p) for p in ranges) else "end"
                break
            elif read >= query.scan:
                stopped = "scan"
            elif time.monotonic() > deadline:
                stopped = "time"
            if stopped != "end":
                break
    kept.sort(key=lambda row: (row["timestamp_ms"], row["partition"], row["offset"]))
    kept = kept[-query.limit:] if query.start == "latest" else kept[:query.limit]
    answer = {"messages": kept, "stopped": stopped, "records_scanned": read,
              "scanned": {p: {"first": first, "last": last} for p, (first, last) in sorted(scanned.items())}}
    if query.partition is not None:
        start, end = ranges[query.partition]
        last = scanned.get(query.partition, [start, start - 1])[1]
        if query.dcid is None and kept:
            last = kept[-1]["offset"]
        # At the end, offsets may still lie before it: transaction markers, which are not messages.
        answer["next_offset"] = None if stopped == "end" or last + 1 >= end else last + 1
    return answer


@lru_cache(maxsize=4)
def _serde(registry_url: str) -> Serde:
    # One per registry for the dashboard's life: a registry serde keeps the writer schemas it has fetched.
    return make_serde(registry_url)


def message_row(serde: Serde, record: Record) -> dict:
    """One record for the page: where it is, when, its key (with the dcid it names), headers and value
    (decoded, or raw with the reason it could not be); ``dcid`` from the value where it decodes, else the key."""
    value = _value(serde, record)
    key_dcid = parse_dcid_key(record.key)
    if value["format"] == "avro":
        dcid, source = value["json"].get("dcid"), "value"
    else:
        dcid, source = key_dcid, "key" if key_dcid is not None else None
    return {"partition": record.partition, "offset": record.offset, "timestamp_ms": record.timestamp_ms,
            "timestamp": _iso(record.timestamp_ms),
            "key": None if record.key is None else {**_bytes(record.key), "dcid": key_dcid},
            "headers": [{"name": k, **(_bytes(v) if v is not None else {"text": None})} for k, v in record.headers],
            "value": value, "dcid": dcid, "dcid_from": source if dcid is not None else None}


def _value(serde: Serde, record: Record) -> dict:
    if record.value is None:
        return {"format": "tombstone"}
    try:
        decoded = serde.decode(record.value, record.topic)
    except SerdeError as exc:
        error = str(exc)
    else:
        return {"format": "avro", "type": decoded.name, "json": _plain(decoded.value)}
    try:  # the changelogs and the logs topic hold JSON
        return {"format": "json", "json": json.loads(record.value), "error": error}
    except (ValueError, UnicodeDecodeError):
        return {"format": "raw", "error": error, **_bytes(record.value)}


def _bytes(data: bytes) -> dict:
    """Bytes as UTF-8 text where they are, else hex; at most :data:`RAW_SHOWN` of them."""
    try:
        text = bytes(data).decode()[:RAW_SHOWN]
    except UnicodeDecodeError:
        text = None
    if text is None or not text.translate(_WHITESPACE).isprintable():
        return {"hex": bytes(data[:RAW_SHOWN]).hex(), "size": len(data)}
    return {"text": text, "size": len(data)}


def _plain(value: Any) -> Any:
    """A decoded Avro value as JSON: times as ISO 8601, bytes as text or hex."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return _bytes(value)
    return value


def _iso(millis: int) -> str | None:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds") if millis > 0 else None


def _one_line(exc: Exception) -> str:
    text = exc.args[0].str() if isinstance(exc, KafkaException) and exc.args else str(exc)
    return " ".join(text.split())


# -- consumer groups ---------------------------------------------------------------------------
@_answered
def list_groups(settings: Settings) -> list[dict]:
    """The deployment's consumer groups: state, members, assignor."""
    admin = make_admin(settings)
    listed = admin.list_consumer_groups(request_timeout=TIMEOUT_S).result(TIMEOUT_S)
    if listed.errors:  # a broker that did not answer: its groups would be missing without a word
        raise KafkaException(listed.errors[0])
    ids = sorted(g.group_id for g in listed.valid if g.group_id.startswith(settings.topic_prefix))
    described = _describe(admin, ids)
    return [{"group": g, "logical": g.removeprefix(settings.topic_prefix), "state": _state(described[g].state),
             "members": len(described[g].members), "assignor": described[g].partition_assignor} for g in ids]


@_answered
def describe_group(settings: Settings, name: str) -> dict:
    """One group: its members and what each is assigned; per partition of every topic it is assigned or has
    committed in, the committed offset, the end and the lag (:class:`GroupLag`, as the Pipeline panel counts)."""
    group = name if name.startswith(settings.topic_prefix) else f"{settings.topic_prefix}{name}"
    admin = make_admin(settings)
    described = _describe(admin, [group])[group]
    owners = {(tp.topic, tp.partition): m.client_id for m in described.members
              for tp in m.assignment.topic_partitions}
    lag = GroupLag(settings)
    try:
        topics = sorted({t for t, _ in owners} | set(lag.committed_topics(
            group, list(_cluster_topics(admin, settings)), TIMEOUT_S)))
        if described.state == ConsumerGroupState.DEAD and not topics:
            raise QueryError(f"no consumer group {name!r} (see the list of groups)")
        rows = [{"topic": topic, "partition": p, "committed": part.committed, "end": part.end, "lag": part.lag,
                 "owner": owners.get((topic, p))}
                for topic in topics for p, part in sorted(lag.partition_progress(group, topic, TIMEOUT_S).items())]
    finally:
        lag.close()
    return {"group": group, "state": _state(described.state), "assignor": described.partition_assignor,
            "coordinator": described.coordinator.id if described.coordinator else None,
            "members": [{"member_id": m.member_id, "client_id": m.client_id, "host": m.host,
                         "assignment": sorted([tp.topic, tp.partition] for tp in m.assignment.topic_partitions)}
                        for m in described.members],
            "partitions": rows, "lag": sum(row["lag"] for row in rows)}


def _describe(admin, groups: list[str]) -> dict:
    if not groups:
        return {}
    futures = admin.describe_consumer_groups(groups, request_timeout=TIMEOUT_S)
    return {group: future.result(TIMEOUT_S) for group, future in futures.items()}


def _state(state: ConsumerGroupState) -> str:
    return state.name.lower()
