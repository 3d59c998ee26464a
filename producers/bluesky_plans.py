"""Results back to the plan: wait for a collection's summary, move the sample to its X-ray centre.

The workers publish one ``CollectionSummary`` per collection on ``summaries`` (keyed by dcid) once its
last image is analysed, or once it has ended and the summary timeout has passed (then ``incomplete``,
listing the images that never came). :func:`wait_for_summary` reads it; the plan stubs do the same from
inside a bluesky plan without blocking the RunEngine's event loop::

    summary = yield from grid_scan_and_centre(settings, [eiger], y, 0.0, 0.4, 5, x, 0.0, 0.5, 6, dcid=dcid)

or step by step::

    yield from bp.grid_scan([eiger], y, 0.0, 0.4, 5, x, 0.0, 0.5, 6, snake_axes=True, md={"dcid": dcid})
    summary = yield from summary_plan(settings, dcid, timeout_s=60)
    yield from move_to_xray_centre(summary, x, y)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from beamstream.errors import BeamstreamError
from beamstream.platform.retained import offset_bounds, offsets_at, open_reader, partitions_of
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.producers.bluesky_documents import MM_PER_UNIT
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde

#: How far before a scan :func:`grid_scan_and_centre` starts reading summaries (clocks of other hosts differ).
CLOCK_MARGIN = timedelta(minutes=10)


class SummaryTimeout(BeamstreamError, TimeoutError):
    """No summary of the collection came within the time given."""


class NoXrayCentre(BeamstreamError):
    """The summary gives no X-ray centre to move to (nothing diffracted, images missing, not a grid)."""


@dataclass(frozen=True)
class Summary:
    """A collection's summary as a plan needs it; ``value`` is the whole CollectionSummary."""

    dcid: int
    status: str  # complete or incomplete
    images_expected: int
    images_analysed: int
    missing_images: tuple[int, ...]
    #: The X-ray centre (x, y) in mm, in the grid's motor coordinates; None when nothing diffracted.
    centre_mm: tuple[float, float] | None
    #: The same centre as (row, column), 0-based fractional grid positions.
    centre_grid: tuple[float, float] | None
    value: dict

    @classmethod
    def from_value(cls, value: dict) -> Summary:
        """From a decoded CollectionSummary."""
        centre = value.get("xray_centre")
        return cls(dcid=value["dcid"], status=value["status"], images_expected=value["images_expected"],
                   images_analysed=value["images_analysed"], missing_images=tuple(value.get("missing_images") or ()),
                   centre_mm=(centre["centre_x_mm"], centre["centre_y_mm"]) if centre else None,
                   centre_grid=(centre["centre_row"], centre["centre_column"]) if centre else None, value=value)

    @property
    def complete(self) -> bool:
        """True when every image was analysed."""
        return self.status == "complete"

    def describe(self) -> str:
        """One line: the outcome, the centre or why there is none."""
        outcome = f"collection {self.dcid}: {self.status}, {self.images_analysed} of {self.images_expected} images"
        if self.missing_images:
            shown = ", ".join(map(str, self.missing_images[:10]))
            more = f" and {len(self.missing_images) - 10} more" if len(self.missing_images) > 10 else ""
            outcome += f", missing {shown}{more}"
        if self.centre_mm is None:
            return outcome + ", no X-ray centre"
        return outcome + f", X-ray centre at x {self.centre_mm[0]:.4f} mm, y {self.centre_mm[1]:.4f} mm"


def wait_for_summary(settings: Settings, dcid: int, timeout_s: float, *, since: datetime | None = None,
                     stop: threading.Event | None = None) -> Summary:
    """The summary of live collection ``dcid`` (not of a reprocessing job), once the workers publish it;
    :class:`SummaryTimeout` if none comes within ``timeout_s`` seconds, or once ``stop`` is set. Summaries
    published before the call count: the topic is read from ``since`` (default: everything retained) onwards."""
    topic = topic_name(settings, "summaries")
    serde = make_serde(settings.schema_registry_url)
    key = dcid_key(dcid)
    deadline = time.monotonic() + timeout_s
    consumer = open_reader(settings)
    try:
        bounds = offset_bounds(consumer, topic, partitions_of(consumer, topic))
        starts = {p: first for p, (first, _) in bounds.items()}
        if since is not None:
            starts = offsets_at(consumer, topic, since, {p: end for p, (_, end) in bounds.items()})
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        while (left := deadline - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
            message = consumer.poll(min(left, 0.5))
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue  # read up to now: the summary may still come
                raise BeamstreamError(f"reading {topic} failed: {message.error().str()}")
            if message.key() != key:
                continue  # another collection's summary
            decoded = serde.decode(message.value(), topic)
            if decoded.name == "CollectionSummary" and decoded.value["processing_job_id"] is None:
                return Summary.from_value(decoded.value)
    finally:
        consumer.close()
    if stop is not None and stop.is_set():
        raise SummaryTimeout(f"stopped waiting for the summary of collection {dcid}")
    raise SummaryTimeout(f"no summary of collection {dcid} on {topic} within {timeout_s:g} s (are workers running, "
                         "and did the run announce its images?)")


def summary_plan(settings: Settings, dcid: int, timeout_s: float, *, since: datetime | None = None):
    """Plan stub: ``summary = yield from summary_plan(...)`` waits as :func:`wait_for_summary` does, on a thread,
    so the RunEngine keeps serving its devices meanwhile; its errors are raised into the plan."""
    import bluesky.plan_stubs as bps

    stop = threading.Event()

    async def wait() -> Summary:
        try:
            return await asyncio.to_thread(wait_for_summary, settings, dcid, timeout_s, since=since, stop=stop)
        finally:  # a plan aborted meanwhile cancels this; the reading thread then stops within 0.5 s
            stop.set()

    [task] = yield from bps.wait_for([wait])
    return task.result()


def move_to_xray_centre(summary: Summary, x_motor: Any, y_motor: Any, *, units: str = "mm",
                        require_complete: bool = True):
    """Plan stub: move ``x_motor`` and ``y_motor`` (moving in ``units``) to the summary's X-ray centre.
    :class:`NoXrayCentre` when there is none, or (``require_complete``) when images are missing."""
    import bluesky.plan_stubs as bps

    if summary.centre_mm is None or (require_complete and not summary.complete):
        raise NoXrayCentre(f"not moving to an X-ray centre: {summary.describe()}")
    if units not in MM_PER_UNIT:
        raise BeamstreamError(f"unknown motor units {units!r}; Beamstream knows {', '.join(MM_PER_UNIT)}")
    x_mm, y_mm = summary.centre_mm
    scale = MM_PER_UNIT[units]
    yield from bps.mv(x_motor, x_mm / scale, y_motor, y_mm / scale)


def grid_scan_and_centre(settings: Settings, detectors: Sequence[Any], y_motor: Any, y_start: float, y_stop: float,
                         rows: int, x_motor: Any, x_start: float, x_stop: float, columns: int, *, dcid: int,
                         timeout_s: float = 60.0, snake: bool = True, units: str = "mm", md: dict | None = None):
    """Plan: a grid scan (rows along ``y_motor``, columns along ``x_motor``) announced as collection ``dcid``,
    then its summary, then both motors moved to the X-ray centre. Returns the :class:`Summary`.

    The run's images reach Beamstream through a subscribed :class:`~beamstream.producers.bluesky_callback.
    BeamstreamCallback` (or the bluesky-bridge service)."""
    import bluesky.plans as bp

    since = datetime.now(UTC) - CLOCK_MARGIN
    yield from bp.grid_scan(list(detectors), y_motor, y_start, y_stop, rows, x_motor, x_start, x_stop, columns,
                            snake_axes=snake, md={**(md or {}), "dcid": dcid})
    summary = yield from summary_plan(settings, dcid, timeout_s, since=since)
    yield from move_to_xray_centre(summary, x_motor, y_motor, units=units)
    return summary
