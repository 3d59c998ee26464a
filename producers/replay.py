"""Replay: put retained events of a topic back onto the same topic, to be processed again as live ones.

Reprocessing is replay: the workers see a replayed event exactly as a live one
(same bytes, same key, so the same partition), told apart only by the
``beamstream-replayed`` header (how often it was replayed) and
``beamstream-replayed-from`` (``topic:partition:offset`` of the original).

A range is fixed before anything is written (the end offsets are read first),
so replaying onto the topic being read never chases its own copies. The whole
replay is one Kafka transaction: read_committed consumers see all of it or
none. All replays of a deployment share one transactional id, so a replay
that died mid-way is aborted by the next one instead of holding back the
topic's readers until the broker's transaction timeout (``TRANSACTION_TIMEOUT_S``);
a range too big to write within that timeout is aborted as a whole: split it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
from beamstream.errors import BeamstreamError
from beamstream.platform.retained import (
    header_count,
    offset_bounds,
    offsets_at,
    open_reader,
    partitions_of,
    read_range,
    with_header,
)
from beamstream.platform.settings import Settings
from beamstream.platform.topics import resolve_topic
from beamstream.schemas.keys import parse_dcid_key

REPLAYED_HEADER = "beamstream-replayed"
REPLAYED_FROM_HEADER = "beamstream-replayed-from"
TRANSACTION_TIMEOUT_S = 300.0


class ReplayError(BeamstreamError):
    """A replay that cannot be done (empty range, bad offsets); nothing was written."""


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay will write: per partition the offsets ``[start, end)`` and the events in them."""

    topic: str
    ranges: dict[int, tuple[int, int]]
    counts: dict[int, int]
    dcid: int | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def plan_replay(
    settings: Settings,
    topic: str,
    *,
    from_time: datetime | None = None,
    from_offset: int | None = None,
    to_time: datetime | None = None,
    to_offset: int | None = None,
    dcid: int | None = None,
) -> ReplayPlan:
    """Fix the range of a replay and count its events (reading them once).

    ``topic`` is a declared topic's logical or full name. The range starts at
    ``from_time`` (the first event at or after it) or at offset ``from_offset``
    of every partition, and ends before ``to_time`` / ``to_offset`` or at the
    current end. ``dcid`` keeps only that collection's events (by key).
    Raises :class:`ReplayError` for an empty range.
    """
    if (from_time is None) == (from_offset is None):
        raise ReplayError("give exactly one of a start time or a start offset")
    if to_time is not None and to_offset is not None:
        raise ReplayError("give at most one of an end time or an end offset")
    if from_offset is not None and from_offset < 0 or to_offset is not None and to_offset < 0:
        raise ReplayError("offsets are never negative")
    name = resolve_topic(settings, topic)
    consumer = open_reader(settings)
    try:
        bounds = offset_bounds(consumer, name, partitions_of(consumer, name))
        ends = {p: end for p, (_, end) in bounds.items()}
        starts = (offsets_at(consumer, name, from_time, ends) if from_time is not None
                  else {p: max(from_offset, low) for p, (low, _) in bounds.items()})
        if to_time is not None:
            stops = offsets_at(consumer, name, to_time, ends)
        elif to_offset is not None:
            stops = {p: min(to_offset, end) for p, end in ends.items()}
        else:
            stops = ends
        ranges = {p: (starts[p], stops[p]) for p in bounds if starts[p] < stops[p]}
        counts = Counter(r.partition for r in read_range(consumer, name, ranges)
                         if dcid is None or parse_dcid_key(r.key) == dcid)
    finally:
        consumer.close()
    plan = ReplayPlan(name, ranges, {p: counts.get(p, 0) for p in ranges}, dcid)
    if plan.total == 0:
        start = from_time.isoformat() if from_time is not None else f"offset {from_offset}"
        end = to_time.isoformat() if to_time is not None else f"offset {to_offset}" if to_offset is not None else "now"
        which = f" of dcid {dcid}" if dcid is not None else ""
        raise ReplayError(f"no events{which} in {name} from {start} to {end}; nothing written")
    return plan


def replay(settings: Settings, plan: ReplayPlan) -> dict[int, int]:
    """Write the plan's events back onto its topic in one transaction; returns events written per
    source partition (fewer than planned only if retention removed some meanwhile)."""
    written: Counter[int] = Counter()
    writer = AtomicWriter(settings, f"{settings.topic_prefix}replay", timeout_s=TRANSACTION_TIMEOUT_S)
    consumer = open_reader(settings)
    try:
        with writer:
            for record in read_range(consumer, plan.topic, plan.ranges):
                if plan.dcid is not None and parse_dcid_key(record.key) != plan.dcid:
                    continue
                headers = with_header(record.headers, REPLAYED_HEADER,
                                      str(header_count(record.headers, REPLAYED_HEADER) + 1).encode())
                headers = with_header(headers, REPLAYED_FROM_HEADER,
                                      f"{record.topic}:{record.partition}:{record.offset}".encode())
                # Keyed events go where the live partitioner puts them; unkeyed ones where they were.
                writer.produce(OutRecord(plan.topic, record.key, record.value, headers,
                                         None if record.key is not None else record.partition))
                written[record.partition] += 1
    finally:
        consumer.close()
    return dict(written)
