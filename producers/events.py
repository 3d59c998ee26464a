"""The producer API of the acquisition system (GDA / Bluesky): collection started,
image(s) arrived, collection ended.

Events are built as plain dicts by the functions below and published by an
:class:`EventPublisher`: idempotent, and each batch atomically in one Kafka
transaction, so a consumer never sees half of a batch.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Producer

from beamstream.engine.atomic_writer import AtomicWriter, OutRecord
from beamstream.engine.transactions import CALL_LIMIT_S, CallLimit, TransactionStuck
from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.keys import dcid_key, image_key
from beamstream.schemas.serde import Serde, make_serde

log = logging.getLogger(__name__)

#: Which topic each record type is published on.
RECORD_TOPICS = {
    "CollectionStarted": "collections",
    "CollectionEnded": "collections",
    "ImageArrived": "images",
    "ProcessingRequest": "requests",
}


class EventError(BeamstreamError, ValueError):
    """An event that cannot be built from the values given (the message says which)."""


def now() -> datetime:
    """The current time as an aware UTC datetime (what timestamp fields take)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Event:
    """One event to publish: its record type and value."""

    record_type: str
    value: dict

    @property
    def dcid(self) -> int:
        return int(self.value["dcid"])

    @property
    def key(self) -> bytes:
        """The message key (see schemas.keys: images by dcid and number, the rest by dcid)."""
        if self.record_type == "ImageArrived":
            return image_key(self.dcid, self.value["image_number"])
        return dcid_key(self.dcid)


def collection_started(
    dcid: int,
    *,
    file_template: str,
    number_of_images: int,
    experiment_type: str = "rotation",
    beamline: str = "",
    start_image_number: int = 1,
    grid: dict | None = None,
    sample_id: int | None = None,
    detector: dict | None = None,
    exposure_time_s: float | None = None,
    oscillation_start_deg: float | None = None,
    oscillation_width_deg: float | None = None,
    processing_job_id: int | None = None,
) -> Event:
    """A CollectionStarted event. ``grid`` takes the GridScan fields (rows, columns, step_x_um ...)."""
    if number_of_images < 1:
        raise EventError(f"number_of_images must be at least 1, got {number_of_images}")
    if experiment_type == "grid" and grid is None:
        raise EventError("a grid scan needs its grid (rows, columns, steps)")
    if grid is not None and grid["rows"] * grid["columns"] != number_of_images:
        raise EventError(
            f"grid {grid['rows']}x{grid['columns']} does not match number_of_images {number_of_images}"
        )
    return Event("CollectionStarted", {
        "dcid": dcid, "beamline": beamline, "experiment_type": experiment_type,
        "number_of_images": number_of_images, "start_image_number": start_image_number,
        "file_template": file_template, "grid": grid, "sample_id": sample_id, "detector": detector,
        "exposure_time_s": exposure_time_s, "oscillation_start_deg": oscillation_start_deg,
        "oscillation_width_deg": oscillation_width_deg, "processing_job_id": processing_job_id,
        "event_time": now(),
    })


def image_arrived(
    dcid: int,
    image_number: int,
    file_path: str,
    frame_index: int = 0,
    *,
    source: str = "detector",
    processing_job_id: int | None = None,
) -> Event:
    """An ImageArrived event for one image (1-based ``image_number``)."""
    if image_number < 1:
        raise EventError(f"image numbers start at 1, got {image_number}")
    return Event("ImageArrived", {
        "dcid": dcid, "image_number": image_number, "file_path": str(file_path),
        "frame_index": frame_index, "arrival_time": now(), "source": source,
        "processing_job_id": processing_job_id,
    })


def collection_ended(
    dcid: int, images_collected: int, status: str = "success", processing_job_id: int | None = None
) -> Event:
    """A CollectionEnded event."""
    return Event("CollectionEnded", {
        "dcid": dcid, "images_collected": images_collected, "status": status,
        "processing_job_id": processing_job_id, "event_time": now(),
    })


class EventEncoder:
    """Events as the records that carry them: the topic of their record type, their key, their Avro value."""

    def __init__(self, settings: Settings, serde: Serde | None = None) -> None:
        self.serde = serde or make_serde(settings.schema_registry_url)
        self._topics = {record: topic_name(settings, logical) for record, logical in RECORD_TOPICS.items()}

    def encode(self, events: Iterable[Event], headers: Sequence[tuple[str, bytes]] = ()) -> list[OutRecord]:
        """Every event encoded, or the first bad one's error raised (nothing half encoded is returned)."""
        records = []
        for event in events:
            topic = self._topics[event.record_type]
            records.append(OutRecord(topic, event.key, self.serde.encode(event.record_type, event.value, topic),
                                     list(headers)))
        return records


def default_transactional_id(settings: Settings) -> str:
    """A transactional id of this process's own, under the deployment's prefix."""
    return f"{settings.topic_prefix}producer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class EventPublisher:
    """Publishes events atomically: each :meth:`publish` call is one Kafka transaction, sent before it returns.

    The transactional id defaults to one per process; two publishers given the
    same id fence each other, which is what a restarted acquisition service wants.
    Kafka must be reachable: to keep accepting events while it is not, use
    :class:`beamstream.producers.publishing.SpooledPublisher`, which has the same ``publish``.

    A commit or abort that does not return within ``call_limit_s`` (librdkafka after a broker restart,
    rule 5 of :mod:`beamstream.engine.transactions`) is left blocked with its producer, and the batch is
    published once more by a new producer with the same transactional id: see :meth:`publish`.
    """

    def __init__(self, settings: Settings, transactional_id: str | None = None, serde: Serde | None = None,
                 call_limit_s: float = CALL_LIMIT_S):
        self.settings = settings
        self.encoder = EventEncoder(settings, serde)
        self.serde = self.encoder.serde
        # Under the deployment's prefix, like every id it owns: deployments sharing a cluster do not
        # collide, and prefix ACLs (BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram) cover it.
        self.transactional_id = transactional_id or default_transactional_id(settings)
        self.producers_replaced = 0
        self._limit = CallLimit(call_limit_s)
        self._producer: Producer | None = make_producer(settings, transactional_id=self.transactional_id)

    def publish(self, events: Iterable[Event], headers: Sequence[tuple[str, bytes]] = ()) -> int:
        """Send ``events`` in one transaction; returns how many were sent. All or nothing, except after a stuck call.

        A stuck commit's outcome is unknown: the broker may have committed the batch. The new producer's
        ``init_transactions`` fences the stuck one and settles its transaction (committed if the commit had
        reached the coordinator, aborted otherwise), after which nothing the stuck producer does can be
        written. The batch is then published again, so it is there at least once and maybe twice, whole
        and in order either way: a copy of an image event is dropped by the workers (the answered-images
        table), as from the spool. A second stuck call raises :class:`TransactionStuck` (outcome unknown)."""
        # Encode everything first: a bad event aborts nothing half-sent.
        records = self.encoder.encode(events, headers)
        if not records:
            return 0
        try:
            self._write(records)
        except TransactionStuck as stuck:
            log.warning("%s; a new producer fences it and the batch of %d events is published again",
                        stuck, len(records))
            self._write(records)
        return len(records)

    def _write(self, records: list[OutRecord]) -> None:
        if self._producer is None:  # the last one was stuck: this one fences it (init_transactions)
            self._producer = make_producer(self.settings, transactional_id=self.transactional_id)
            self.producers_replaced += 1
        try:
            with AtomicWriter(producer=self._producer, limit=self._limit) as writer:
                for record in records:
                    writer.produce(record)
        except TransactionStuck:
            self._producer = None  # left to its blocked call; never used again
            raise

    def close(self) -> None:
        """Flush and release the producer."""
        if self._producer is not None:
            self._producer.flush(30)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
