"""Dead-letter tools: list, show, reinject and purge what no consumer could process.

A dead letter is named by its place in the dead-letter topic, ``partition:offset``.

* Reinjection produces the original key, payload and headers back to the source
  topic, with the ``beamstream-reinjected`` header counting reinjections (the
  dead-letter builder reads it, so a message that fails again says how often it
  was retried) and ``beamstream-reinjected-from`` naming the dead letter. In the
  same Kafka transaction a ``DeadLetterResolved`` marker goes to the compacted
  ``deadletter-resolved`` topic, keyed by ``partition:offset``: the copies and
  the markers become visible together or not at all, and a dead letter with a
  marker is never reinjected again, whoever runs the tool on whichever machine.
* One message can have several dead letters: every consumer group that gave up on
  it wrote one (a poison event on ``collections`` is refused by the workers and
  the archiver alike). Its copy reaches every group, so it is produced once and
  marks all of them resolved; a dead letter whose message was reinjected after it
  failed counts as resolved by that copy.
  All reinjectors share one transactional id, so the markers are re-read after
  ``init_transactions`` has settled any concurrent run (closing the check-then-write race).
* Kafka cannot delete single records, so a purge advances each partition's
  start (``delete_records``) past the purged dead letters, after a JSON copy of
  every one of them is safely on disk under ``<home>/dlq-purged/``.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaException, TopicPartition

from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_admin
from beamstream.platform.retained import (
    Record,
    header_count,
    offset_bounds,
    open_reader,
    partitions_of,
    read_range,
    with_header,
)
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.serde import Serde, SerdeError, make_serde

REINJECTED_HEADER = "beamstream-reinjected"
REINJECTED_FROM_HEADER = "beamstream-reinjected-from"
_ID = re.compile(r"^(\d+):(\d+)$")


class DeadLetterError(BeamstreamError):
    """A dead-letter operation that cannot be done (the message names the dead letter and why)."""


@dataclass
class DeadLetterEntry:
    """One record of the dead-letter topic: decoded when it decodes, and how it was resolved, if it was."""

    record: Record
    value: dict | None  # the DeadLetter, None when the record itself does not decode
    error: str | None = None  # why it does not decode
    resolution: dict | None = None  # the DeadLetterResolved marker, when reinjected

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def failed_at(self) -> datetime:
        """When processing was given up (the record's timestamp for a record that does not decode)."""
        if self.value is not None:
            return self.value["failed_at"]
        return datetime.fromtimestamp(self.record.timestamp_ms / 1000, UTC)

    def of_service(self, service: str | None) -> bool:
        """True when ``service`` is None, this dead letter's service, or its prefix before a ``/``."""
        if service is None:
            return True
        own = self.value["service"] if self.value else ""
        return own == service or own.startswith(service + "/")

    def row(self) -> dict:
        """The summary ``dlq list`` shows."""
        v = self.value or {}
        return {
            "id": self.id, "partition": self.record.partition, "offset": self.record.offset,
            "failed_at": self.failed_at.isoformat(), "service": v.get("service"),
            "source_topic": v.get("source_topic"), "source_partition": v.get("source_partition"),
            "source_offset": v.get("source_offset"), "dcid": v.get("dcid"), "image_number": v.get("image_number"),
            "reason": v.get("reason") if self.value else f"(dead letter does not decode: {self.error})",
            "error_type": v.get("error_type"), "attempts": v.get("attempts"),
            "reinjected_count": v.get("reinjected_count"),
            "resolution": _resolution_summary(self.resolution),
        }

    def describe(self, serde: Serde | None = None) -> dict:
        """Everything about the dead letter, JSON-ready: the original bytes exactly (base64) and the
        original payload decoded where it decodes (with ``serde``, default the single-object one)."""
        record = self.record
        described = {
            "id": self.id, "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "timestamp": datetime.fromtimestamp(record.timestamp_ms / 1000, UTC).isoformat(),
        }
        if self.value is None:
            described.update(error=self.error, record_value=_bytes_view(record.value))
            return described
        v = self.value
        described.update({k: v[k] for k in ("reason", "error_type", "service", "source_topic", "source_partition",
                                             "source_offset", "attempts", "reinjected_count", "dcid",
                                             "image_number")})
        described["failed_at"] = v["failed_at"].isoformat()
        described["key"] = _bytes_view(v["key"])
        described["headers"] = [{"key": h["key"], "value": _bytes_view(h["value"])} for h in v["headers"]]
        described["payload"] = _bytes_view(v["payload"])
        described["payload_decoded"] = _decode_payload(v["payload"], v["source_topic"], serde or make_serde())
        described["resolution"] = jsonable(self.resolution)
        return described


@dataclass
class DeadLetterScan:
    """The dead-letter topic as read: its name, each partition's (start, end) and every entry."""

    topic: str
    bounds: dict[int, tuple[int, int]]
    entries: list[DeadLetterEntry]

    def find(self, ids: Iterable[str]) -> list[DeadLetterEntry]:
        """The entries named ``partition:offset``; one error naming every id that is not there."""
        by_id = {e.id: e for e in self.entries}
        wanted = [normal_id(i) for i in ids]
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            held = ", ".join(f"[{p}] {lo}..{hi - 1}" if hi > lo else f"[{p}] none"
                             for p, (lo, hi) in sorted(self.bounds.items()))
            raise DeadLetterError(f"no dead letter {', '.join(unknown)} in {self.topic} (it holds {held})")
        return [by_id[i] for i in dict.fromkeys(wanted)]


@dataclass
class Reinjected:
    """One reinjected dead letter and where its copy landed."""

    entry: DeadLetterEntry
    target: str  # topic[partition]@offset
    reinjected_count: int


@dataclass
class PurgePlan:
    """Where each partition of the dead-letter topic will start after the purge, and what goes."""

    topic: str
    cut: dict[int, int]  # partition -> new first offset (only partitions that move)
    entries: list[DeadLetterEntry]


def read_dead_letters(settings: Settings) -> DeadLetterScan:
    """Every dead letter retained now, in (partition, offset) order, with its resolution marker if any."""
    serde = make_serde(settings.schema_registry_url)
    topic = topic_name(settings, "deadletter")
    consumer = open_reader(settings)
    try:
        bounds = offset_bounds(consumer, topic, partitions_of(consumer, topic))
        entries = []
        for record in read_range(consumer, topic, bounds):
            try:
                entries.append(DeadLetterEntry(record, serde.decode(record.value, topic, "DeadLetter").value))
            except SerdeError as exc:
                entries.append(DeadLetterEntry(record, None, str(exc)))
    finally:
        consumer.close()
    resolutions = _Resolutions(read_resolutions(settings))
    for entry in entries:
        entry.resolution = resolutions.of(entry)
    entries.sort(key=lambda e: (e.record.partition, e.record.offset))
    return DeadLetterScan(topic, bounds, entries)


def read_resolutions(settings: Settings) -> dict[str, dict]:
    """The latest resolution marker per dead-letter id (the compacted topic's current view)."""
    serde = make_serde(settings.schema_registry_url)
    topic = topic_name(settings, "deadletter-resolved")
    consumer = open_reader(settings)
    markers: dict[str, dict] = {}
    try:
        bounds = offset_bounds(consumer, topic, partitions_of(consumer, topic))
        for record in read_range(consumer, topic, bounds):
            key = (record.key or b"").decode(errors="replace")
            if record.value is None:
                markers.pop(key, None)  # a tombstone
                continue
            try:
                markers[key] = serde.decode(record.value, topic, "DeadLetterResolved").value
            except SerdeError:
                continue  # not ours: a marker that does not decode resolves nothing
    finally:
        consumer.close()
    return markers


def select(scan: DeadLetterScan, ids: Iterable[str] = (), every: bool = False,
           service: str | None = None) -> tuple[list[DeadLetterEntry], list[DeadLetterEntry]]:
    """What to reinject: the named dead letters (or every one of ``service``) not reinjected before.

    Returns (to reinject, named ones skipped because already reinjected). Dead letters that do
    not decode cannot be reinjected: naming one is an error, ``every`` leaves them out.
    """
    chosen = [e for e in scan.entries if e.value is not None and e.of_service(service)] if every else scan.find(ids)
    broken = [e.id for e in chosen if e.value is None]
    if broken:
        raise DeadLetterError(f"dead letter {', '.join(broken)} does not decode, so it cannot be reinjected "
                              "(see `beamstream dlq show`)")
    todo = [e for e in chosen if e.resolution is None]
    # The other dead letters of the same messages go with them: one copy resolves them all.
    sources, ids = {_source(e.value) for e in todo}, {e.id for e in todo}
    todo += [e for e in scan.entries if e.value is not None and e.resolution is None and e.id not in ids
             and _source(e.value) in sources]
    # With ``every``, dead letters reinjected before are simply not chosen; named ones are reported.
    return todo, [] if every else [e for e in chosen if e.resolution is not None]


def reinject(settings: Settings, entries: list[DeadLetterEntry],
             resolved_by: str | None = None) -> tuple[list[Reinjected], list[DeadLetterEntry]]:
    """Produce each dead letter's original message back to its source topic and mark it resolved,
    all in one transaction; dead letters of one message (several groups gave up on it) share one
    copy. Returns (reinjected, skipped because reinjected meanwhile by someone else).

    ``resolved_by`` names who asked (the dashboard's staff member); by default the local user@host."""
    serde = make_serde(settings.schema_registry_url)
    marker_topic = topic_name(settings, "deadletter-resolved")
    writer = AtomicWriter(settings, f"{settings.topic_prefix}dlq-reinject")
    # After init_transactions, any concurrent reinjection has committed or aborted: look again.
    resolutions = _Resolutions(read_resolutions(settings))
    todo, skipped = [], []
    for entry in entries:
        marker = resolutions.of(entry)
        if marker is None:
            todo.append(entry)
        else:
            entry.resolution = marker
            skipped.append(entry)
    if not todo:
        return [], skipped
    messages: dict[tuple[str, int, int], list[DeadLetterEntry]] = defaultdict(list)
    for entry in todo:
        messages[_source(entry.value)].append(entry)
    counts = []
    with writer:
        for first, *_ in messages.values():
            v = first.value
            count = header_count(_pairs(v["headers"]), REINJECTED_HEADER) + 1
            headers = with_header(_pairs(v["headers"]), REINJECTED_HEADER, str(count).encode())
            headers = with_header(headers, REINJECTED_FROM_HEADER, f"{first.record.topic}:{first.id}".encode())
            # Keyed messages go where the live partitioner puts them (co-partitioned by dcid);
            # unkeyed ones back to the partition they came from.
            writer.produce(OutRecord(v["source_topic"], v["key"], v["payload"], headers,
                                     None if v["key"] is not None else v["source_partition"]))
            counts.append(count)
        positions = writer.positions()
        now = datetime.now(UTC)
        done = []
        copies = zip(messages.values(), counts, positions, strict=True)
        for entry, count, (partition, offset) in ((e, c, p) for group, c, p in copies for e in group):
            v = entry.value
            marker = {
                "dead_letter_topic": entry.record.topic, "dead_letter_partition": entry.record.partition,
                "dead_letter_offset": entry.record.offset, "action": "reinjected",
                "source_topic": v["source_topic"], "source_partition": v["source_partition"],
                "source_offset": v["source_offset"], "failed_at": v["failed_at"],
                "target_topic": v["source_topic"], "target_partition": partition, "target_offset": offset,
                "reinjected_count": count, "resolved_by": resolved_by or _who(), "resolved_at": now,
            }
            writer.produce(OutRecord(marker_topic, entry.id.encode(),
                                     serde.encode("DeadLetterResolved", marker, marker_topic)))
            entry.resolution = marker
            done.append(Reinjected(entry, f"{v['source_topic']}[{partition}]@{offset}", count))
    return done, skipped


def plan_purge(scan: DeadLetterScan, before: datetime | None = None) -> PurgePlan:
    """What a purge removes: everything retained, or per partition the run of dead letters from the
    start up to the first one that failed at or after ``before`` (a partition is cut at one offset,
    so a dead letter newer than ``before`` is never removed; an older one after it stays)."""
    cut: dict[int, int] = {}
    purged: list[DeadLetterEntry] = []
    for partition, (_low, end) in scan.bounds.items():
        entries = sorted((e for e in scan.entries if e.record.partition == partition), key=lambda e: e.record.offset)
        stop = end
        if before is not None:
            stop = next((e.record.offset for e in entries if e.failed_at >= before), end)
        going = [e for e in entries if e.record.offset < stop]
        if going:
            cut[partition] = stop
            purged.extend(going)
    return PurgePlan(scan.topic, cut, purged)


def purge(settings: Settings, plan: PurgePlan) -> Path:
    """Write the JSON copy of every dead letter in ``plan``, then delete them from the topic.

    Returns the copy's path. Nothing is deleted unless the copy is complete on disk.
    """
    folder = Path(settings.home) / "dlq-purged"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = folder / f"{plan.topic}-{stamp}.json"
    document = {
        "topic": plan.topic, "purged_at": datetime.now(UTC).isoformat(), "purged_by": _who(),
        "new_start_offsets": {str(p): o for p, o in sorted(plan.cut.items())},
        "dead_letters": [e.describe(make_serde(settings.schema_registry_url)) for e in plan.entries],
    }
    partial = path.with_suffix(".json.partial")
    with open(partial, "w") as handle:
        json.dump(document, handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)

    admin = make_admin(settings)
    futures = admin.delete_records([TopicPartition(plan.topic, p, o) for p, o in sorted(plan.cut.items())],
                                   request_timeout=60, operation_timeout=60)
    for tp, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            raise DeadLetterError(f"deleting {plan.topic}[{tp.partition}] below offset {tp.offset} failed: "
                                  f"{exc.args[0].str()} (the copy is in {path})") from None
    return path


def jsonable(value):
    """A decoded Avro value made JSON-ready: datetimes ISO 8601, bytes as text or base64."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return _bytes_view(value)
    return value


def normal_id(text: str) -> str:
    """A dead letter's id as ``partition:offset`` (``" 0:007"`` is ``0:7``); a one-line error for anything else."""
    match = _ID.match(text.strip())
    if not match:
        raise DeadLetterError(f"bad dead-letter id {text!r}: expected PARTITION:OFFSET, e.g. 0:17")
    return f"{int(match.group(1))}:{int(match.group(2))}"


def _matching(marker: dict | None, entry: DeadLetterEntry) -> dict | None:
    """The marker if it is about this very dead letter (a recreated topic reuses offsets)."""
    if marker is None or entry.value is None:
        return None
    v = entry.value
    same = (marker["source_topic"], marker["source_partition"], marker["source_offset"], marker["failed_at"]) == (
        v["source_topic"], v["source_partition"], v["source_offset"], v["failed_at"])
    return marker if same else None


def _source(value: dict) -> tuple[str, int, int]:
    """Which message a dead letter is about: its topic, partition and offset."""
    return value["source_topic"], value["source_partition"], value["source_offset"]


class _Resolutions:
    """The resolution markers, by dead-letter id and by the message they put back."""

    def __init__(self, markers: dict[str, dict]) -> None:
        self.markers = markers
        self.by_source: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
        for marker in markers.values():
            self.by_source[_source(marker)].append(marker)

    def of(self, entry: DeadLetterEntry) -> dict | None:
        """The marker resolving ``entry``: its own, else that of another dead letter of the same message
        reinjected after this one failed (the copy reached every consumer group, this one's too)."""
        own = _matching(self.markers.get(entry.id), entry)
        if own is not None or entry.value is None:
            return own
        later = [m for m in self.by_source.get(_source(entry.value), ())
                 if m["resolved_at"] >= entry.value["failed_at"]]
        return min(later, key=lambda m: m["resolved_at"], default=None)


def _resolution_summary(marker: dict | None) -> dict | None:
    if marker is None:
        return None
    return {"action": marker["action"], "resolved_at": marker["resolved_at"].isoformat(),
            "resolved_by": marker["resolved_by"],
            "target": f"{marker['target_topic']}[{marker['target_partition']}]@{marker['target_offset']}"}


def _pairs(headers: list[dict]) -> list[tuple[str, bytes | None]]:
    return [(h["key"], h["value"]) for h in headers]


def _bytes_view(data: bytes | None) -> dict | None:
    """Bytes for people and for exact recovery: text when it is UTF-8, a hex preview, always base64."""
    if data is None:
        return None
    view: dict = {"length": len(data), "base64": base64.b64encode(data).decode()}
    try:
        view["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        view["hex_preview"] = data[:64].hex(" ") + (" ..." if len(data) > 64 else "")
    return view


def _decode_payload(payload: bytes, topic: str, serde: Serde) -> dict:
    """The original message decoded with the serde, or why it does not decode."""
    try:
        decoded = serde.decode(payload, topic) if payload else None
    except SerdeError as exc:
        return {"error": str(exc)}
    if decoded is None:
        return {"error": "empty payload"}
    return {"record_type": decoded.name, "value": jsonable(decoded.value)}


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"
